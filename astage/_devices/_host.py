"""Host copies: a batch whose sources are on the CPU (or any device torch copies synchronously)."""

from __future__ import annotations

import torch

from .._core._batches import Batch
from .._torch import foreach_copy_
from ._pinning import begin_copies, pin_batch


def _pin(batch: Batch) -> None:
    """Unpin what is queued, then pin the batch's buffers that want it; in a worker thread.

    What the CUDA streams call before they enqueue; they should move to
    :func:`~astage._devices._pinning.begin_copies` (and report the copies landed), which
    also keeps a buffer dropped meanwhile pinned until its copies have completed.
    """
    pin_batch(batch)


def run_host_batch(batch: Batch) -> None:
    """Copy a batch whose sources are not CUDA tensors; returns when the bytes have landed.

    Runs in astage's worker thread (the async face) or the caller's (the sync face), which is
    also where pins queued meanwhile are undone.
    """
    copies = begin_copies(batch)
    try:
        with torch.no_grad():
            if len(batch.srcs) == 1:
                batch.dsts[0].copy_(batch.srcs[0])
            else:
                foreach_copy_(batch.dsts, batch.srcs)
    finally:
        copies.landed()  # a synchronous copy has landed (or failed) once copy_ returned
