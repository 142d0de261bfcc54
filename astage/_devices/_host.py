"""Host copies: a batch whose sources are on the CPU."""

from __future__ import annotations

import torch

from .._core._batches import Batch
from .._torch import foreach_copy_
from ._pinning import begin_copies, unpin_released


def run_host_batch(batch: Batch) -> None:
    """Copy a batch whose sources are on the CPU; returns when the bytes have landed.

    Runs in astage's worker thread (the async face) or the caller's (the sync face), which is
    also where pins queued meanwhile are undone. Nothing is pinned: a CPU-to-CPU copy gains
    nothing from page-locked memory.
    """
    if batch.device.type == "cpu":
        # A CPU source's buffer is never pinned (HostBuffer.wants_pin), so no copy into it is
        # counted: begin_copies would read all its buffers, 1,024 cache misses a batch, to
        # find none. The pins queued meanwhile are still undone here.
        unpin_released()
        _copy(batch)
        return
    copies = begin_copies(batch, pin_buffers=False)
    try:
        _copy(batch)
    finally:
        copies.landed()  # a synchronous copy has landed (or failed) once copy_ returned


def copy_host_piece(batch: Batch, start: int, stop: int) -> None:
    """Copy ``batch``'s copies ``start:stop``, all from the CPU into unpinned buffers: one piece
    of a batch that the loop's own thread copies (the async face's loop lane). Pins queued
    for release are left to astage's worker threads: unregistering one may block."""
    with torch.no_grad():
        foreach_copy_(batch.dsts[start:stop], batch.srcs[start:stop])


def _copy(batch: Batch) -> None:
    with torch.no_grad():
        if len(batch.srcs) == 1:
            batch.dsts[0].copy_(batch.srcs[0])
        else:
            foreach_copy_(batch.dsts, batch.srcs)


def reserve_batch(batch: Batch, first_serial: int, *, pin_buffers: bool) -> int:
    """Commit the host memory of ``batch``'s new buffers without copying; returns its bytes.

    For ``reserve()``: only buffers allocated at or after ``first_serial`` (by reserve's own
    walk) are written, with zeros, so the kernel maps their pages now rather than during the
    first checkpoint's copy; a buffer that already existed may hold staged bytes that a
    snapshot still reads, and is left alone. Buffers that want a CUDA pin are pinned here (this
    runs in astage's worker thread or the blocking face's caller, like a copy), when
    ``pin_buffers`` (the source device's backend gains from it).
    """
    copies = begin_copies(batch, pin_buffers=pin_buffers)
    touched = 0
    try:
        with torch.no_grad():
            for dst, buffer in zip(batch.dsts, batch.buffers, strict=True):
                if buffer.serial >= first_serial:
                    dst.zero_()  # torch drops the GIL here: the loop keeps running
                    touched += dst.nbytes
    finally:
        copies.landed()
    return touched
