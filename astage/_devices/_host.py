"""Host copies: a batch whose sources are on the CPU."""

from __future__ import annotations

import torch

from .._core._batches import Batch
from .._torch import foreach_copy_
from ._pinning import begin_copies


def run_host_batch(batch: Batch) -> None:
    """Copy a batch whose sources are on the CPU; returns when the bytes have landed.

    Runs in astage's worker thread (the async face) or the caller's (the sync face), which is
    also where pins queued meanwhile are undone. Nothing is pinned: a CPU-to-CPU copy gains
    nothing from page-locked memory.
    """
    copies = begin_copies(batch, pin_buffers=False)
    try:
        with torch.no_grad():
            if len(batch.srcs) == 1:
                batch.dsts[0].copy_(batch.srcs[0])
            else:
                foreach_copy_(batch.dsts, batch.srcs)
    finally:
        copies.landed()  # a synchronous copy has landed (or failed) once copy_ returned
