"""Batches: a plan's copies cut into bounded units of copy work.

A batch is either many small copies of one device or one slice of a large copy, so no single
task moves more than ``chunk_bytes``. The core only cuts them; the device layer
(``astage._devices``) executes them: host batches synchronously wherever they are called (one
``torch._foreach_copy_`` call, which drops the GIL for the whole list), device batches through
the backend of their device (``_devices._backend``), which enqueues them on a staging stream
and returns a completion event.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ._cache import HostBuffer
from ._plan import Copies

MAX_BATCH_COPIES = 1024  # small copies per foreach call: bounds the time one task takes


class Batch:
    """A unit of copy work: small whole copies, or one slice of a large copy."""

    __slots__ = ("buffers", "device", "dsts", "end", "nbytes", "srcs")

    def __init__(
        self,
        device: torch.device,
        *,
        srcs: list[torch.Tensor],
        dsts: list[torch.Tensor],
        buffers: list[HostBuffer],
        nbytes: int,
        end: int,
    ) -> None:
        self.device = device
        self.srcs = srcs
        self.dsts = dsts
        self.buffers = buffers
        self.nbytes = nbytes
        self.end = end
        """Copies ``[0, end)`` of the plan are complete once this batch and all before it are."""

    def clear(self) -> None:
        """Drop the tensors, once the batch's copies are known to be complete."""
        self.srcs = []
        self.dsts = []
        self.buffers = []


def make_batches(copies: Copies, start: int, stop: int, chunk_bytes: int) -> Iterator[Batch]:
    """Split copies ``[start, stop)`` into batches of at most about ``chunk_bytes`` each.

    A batch holds copies from one device only; a copy of ``chunk_bytes`` or more is sliced.
    """
    buffers = copies.buffers
    first = start  # first copy of the batch being gathered
    gathered = 0
    device: torch.device | None = None
    for index in range(start, stop):
        buffer = buffers[index]
        nbytes = buffer.nbytes
        if first < index and (
            nbytes >= chunk_bytes
            or gathered + nbytes > chunk_bytes
            or index - first >= MAX_BATCH_COPIES
            or buffer.device != device
        ):
            yield _gathered(copies, first, index, gathered)
            first, gathered = index, 0
        if nbytes >= chunk_bytes:
            yield from _slices(copies, index, chunk_bytes)
            first = index + 1
            continue
        if first == index:
            device = buffer.device
        gathered += nbytes
    if first < stop:
        yield _gathered(copies, first, stop, gathered)


def _gathered(copies: Copies, first: int, stop: int, nbytes: int) -> Batch:
    buffers = copies.buffers[first:stop]
    return Batch(
        buffers[0].device,
        srcs=copies.srcs[first:stop],
        dsts=copies.dsts[first:stop],
        buffers=buffers,
        nbytes=nbytes,
        end=stop,
    )


def _slices(copies: Copies, index: int, chunk_bytes: int) -> Iterator[Batch]:
    buffer = copies.buffers[index]
    src = copies.srcs[index].view(-1)
    dst = copies.dsts[index].view(-1)
    itemsize = src.element_size()
    step = max(1, chunk_bytes // itemsize)
    total = src.numel()
    for begin in range(0, total, step):
        end = min(begin + step, total)
        done = index + 1 if end == total else index
        yield Batch(
            buffer.device,
            srcs=[src[begin:end]],
            dsts=[dst[begin:end]],
            buffers=[buffer],
            nbytes=(end - begin) * itemsize,
            end=done,
        )
