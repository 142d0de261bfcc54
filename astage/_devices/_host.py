"""Host copies: a batch whose sources are on the CPU (or any device torch copies synchronously)."""

from __future__ import annotations

import torch

from .._core._batches import Batch


def _pin(batch: Batch) -> None:
    for buffer in batch.buffers:
        if buffer.wants_pin:
            buffer.ensure_pinned()


def run_host_batch(batch: Batch) -> None:
    """Copy a batch whose sources are not CUDA tensors; returns when the bytes have landed."""
    with torch.no_grad():
        _pin(batch)
        if len(batch.srcs) == 1:
            batch.dsts[0].copy_(batch.srcs[0])
        else:
            torch._foreach_copy_(batch.dsts, batch.srcs)
