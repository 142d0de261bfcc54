"""Host copies: a batch whose sources are on the CPU (or any device torch copies synchronously)."""

from __future__ import annotations

import torch

from .._core._batches import Batch
from .._torch import foreach_copy_
from ._pinning import pin


def _pin(batch: Batch) -> None:
    """Pin the batch's buffers that want it (first copy only); runs in a worker thread."""
    for buffer in batch.buffers:
        if buffer.wants_pin and buffer.registration is None:
            pin(buffer)


def run_host_batch(batch: Batch) -> None:
    """Copy a batch whose sources are not CUDA tensors; returns when the bytes have landed."""
    with torch.no_grad():
        _pin(batch)
        if len(batch.srcs) == 1:
            batch.dsts[0].copy_(batch.srcs[0])
        else:
            foreach_copy_(batch.dsts, batch.srcs)
