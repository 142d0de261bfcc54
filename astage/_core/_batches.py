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
    while first < stop:
        count, gathered = _small_run(buffers, first, stop, chunk_bytes)
        if not count:  # a large copy, or a change of device near by: one copy at a time
            if buffers[first].nbytes >= chunk_bytes:
                yield from _slices(copies, first, chunk_bytes)
                first += 1
                continue
            count, gathered = _one_by_one(buffers, first, stop, chunk_bytes)
        yield _gathered(copies, first, first + count, gathered)
        first += count


_RUN_PROBE = 64
"""Copies :func:`_small_run` looks at first; doubled while they all fit in the batch."""
_nbytes_of = operator.attrgetter("nbytes")
_device_of = operator.attrgetter("device")


def _small_run(
    buffers: list[HostBuffer], first: int, stop: int, chunk_bytes: int
) -> tuple[int, int]:
    """The batch starting at ``first`` when it is a run of small copies of one device: its
    length and bytes, found with a few C calls per probe rather than a Python step per copy
    (a replay cuts 50,000 small copies at once); ``(0, 0)`` when a large copy or another device
    comes first (:func:`_one_by_one` decides then)."""
    device = buffers[first].device
    limit = min(stop, first + MAX_BATCH_COPIES)
    end = first
    total = 0
    probe = _RUN_PROBE
    while end < limit:
        window = buffers[end : min(limit, end + probe)]
        sizes = list(map(_nbytes_of, window))
        if max(sizes) >= chunk_bytes or not all(map(device.__eq__, map(_device_of, window))):
            return 0, 0
        totals = list(accumulate(sizes, initial=total))
        fit = bisect_right(totals, chunk_bytes, lo=1) - 1  # copies of the window that fit
        if fit < len(window):
            return end + fit - first, totals[fit]
        total = totals[-1]
        end += len(window)
        probe *= 2
    return end - first, total


def _one_by_one(
    buffers: list[HostBuffer], first: int, stop: int, chunk_bytes: int
) -> tuple[int, int]:
    """The batch starting at ``first`` (a copy under ``chunk_bytes``), copy by copy."""
    device = buffers[first].device
    gathered = 0
    index = first
    while index < stop:
        buffer = buffers[index]
        nbytes = buffer.nbytes
        if first < index and (
            nbytes >= chunk_bytes
            or gathered + nbytes > chunk_bytes
            or index - first >= MAX_BATCH_COPIES
            or buffer.device != device
        ):
            break
        gathered += nbytes
        index += 1
    return index - first, gathered


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
