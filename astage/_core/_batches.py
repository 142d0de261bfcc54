"""Batches: a plan's copies cut into bounded units of copy work.

A batch is either many small copies of one device or one slice of a large copy, so no single
task moves more than ``chunk_bytes``. The core only cuts them; the device layer
(``astage._devices``) executes them: host batches synchronously wherever they are called (one
``torch._foreach_copy_`` call, which drops the GIL for the whole list), device batches through
the backend of their device (``_devices._backend``), which enqueues them on a staging stream
and returns a completion event.
"""

from __future__ import annotations

import operator
from bisect import bisect_right
from collections.abc import Iterator
from itertools import accumulate

import torch

from ._cache import HostBuffer
from ._plan import Copies

MAX_BATCH_COPIES = 1024  # small copies per foreach call: bounds the time one task takes

_buffer_device = operator.attrgetter("device")


class Batch:
    """A unit of copy work: small whole copies, or one slice of a large copy."""

    __slots__ = ("buffers", "device", "dsts", "end", "gathered", "largest", "nbytes", "srcs")

    def __init__(
        self,
        device: torch.device,
        *,
        srcs: list[torch.Tensor],
        dsts: list[torch.Tensor],
        buffers: list[HostBuffer],
        nbytes: int,
        end: int,
        largest: int | None = None,
    ) -> None:
        self.device = device
        self.srcs = srcs
        self.dsts = dsts
        self.buffers = buffers
        self.nbytes = nbytes
        self.end = end
        """Copies ``[0, end)`` of the plan are complete once this batch and all before it are."""
        self.largest = largest
        """The bytes of the batch's largest copy, where the batch was cut from a plan's
        :class:`Copies` (whose sources and destinations are contiguous and cover their
        storages): a device layer then decides whether to gather from this and the count
        alone. None: the batch's tensors are all it knows of them."""
        self.gathered: bool | None = None
        """Whether a device layer gathers the batch's copies, once it has asked (it asks more
        than once per batch, and the answer reads every copy)."""

    def clear(self) -> None:
        """Drop the tensors, once the batch's copies are known to be complete."""
        self.srcs = []
        self.dsts = []
        self.buffers = []


def make_batches(copies: Copies, start: int, stop: int, chunk_bytes: int) -> Iterator[Batch]:
    """Split copies ``[start, stop)`` into batches of at most about ``chunk_bytes`` each.

    A batch holds copies from one device only; a copy of ``chunk_bytes`` or more is sliced.
    """
    if start >= stop:
        return
    assert len(copies.sizes) == len(copies.buffers)
    sizes = copies.sizes[start:stop]
    if max(sizes) < chunk_bytes and len(copies.devices) == 1:
        yield from _small_copies(copies, start, sizes, chunk_bytes)
        return
    devices = list(map(_buffer_device, copies.buffers[start:stop]))
    yield from _mixed_copies(copies, start, sizes, devices, chunk_bytes)


def _small_copies(
    copies: Copies, start: int, sizes: list[int], chunk_bytes: int
) -> Iterator[Batch]:
    """:func:`make_batches` for copies of one device, each under ``chunk_bytes``: the cuts found
    by bisecting the running byte total, without a Python step per copy or a read of any
    buffer."""
    totals = list(accumulate(sizes))
    first = 0
    before = 0  # bytes of the copies ahead of ``first``
    while first < len(sizes):
        stop = min(bisect_right(totals, before + chunk_bytes, first), first + MAX_BATCH_COPIES)
        largest = max(sizes[first:stop])
        yield _gathered(copies, start + first, start + stop, totals[stop - 1] - before, largest)
        before = totals[stop - 1]
        first = stop


def _mixed_copies(
    copies: Copies, start: int, sizes: list[int], devices: list[torch.device], chunk_bytes: int
) -> Iterator[Batch]:
    """:func:`make_batches` copy by copy: devices change, or some copies are sliced."""
    first = 0  # first copy of the batch being gathered
    gathered = 0
    largest = 0
    for index, (nbytes, device) in enumerate(zip(sizes, devices, strict=True)):
        if first < index and (
            nbytes >= chunk_bytes
            or gathered + nbytes > chunk_bytes
            or index - first >= MAX_BATCH_COPIES
            or device != devices[first]
        ):
            yield _gathered(copies, start + first, start + index, gathered, largest)
            first, gathered, largest = index, 0, 0
        if nbytes >= chunk_bytes:
            yield from _slices(copies, start + index, chunk_bytes)
            first = index + 1
            continue
        gathered += nbytes
        largest = max(largest, nbytes)
    if first < len(sizes):
        yield _gathered(copies, start + first, start + len(sizes), gathered, largest)


def _gathered(copies: Copies, first: int, stop: int, nbytes: int, largest: int) -> Batch:
    buffers = copies.buffers[first:stop]
    return Batch(
        buffers[0].device,
        srcs=copies.srcs[first:stop],
        dsts=copies.dsts[first:stop],
        buffers=buffers,
        nbytes=nbytes,
        end=stop,
        largest=largest,
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
