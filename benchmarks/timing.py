"""Timing helpers: medians, a level playing field for first calls, and the collector's pauses.

First calls allocate their host buffers, and on a virtual machine the cost of that depends on
where the pages come from: glibc hands back pages it freed earlier almost for free, while pages
the guest has never touched must be faulted in from the hypervisor, which is several times
slower. :func:`level_heap` puts every contender in the same state before its first call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import mmap
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import torch

__all__ = [
    "GcPauses",
    "level_heap",
    "median",
    "prefault",
    "rotate",
    "timed",
    "timed_async",
]

T = TypeVar("T")

_libc: ctypes.CDLL | None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _libc.malloc_trim.argtypes = [ctypes.c_size_t]
except (OSError, AttributeError):  # not glibc: trimming is a no-op
    _libc = None


def median(values: Sequence[float]) -> float:
    """The median, or NaN for no values (a contender that never ran)."""
    return statistics.median(values) if values else float("nan")


def rotate(items: Sequence[T], shift: int) -> list[T]:
    """``items`` rotated left by ``shift``: repeat ``r`` runs the contenders in another order."""
    if not items:
        return []
    shift %= len(items)
    return list(items[shift:]) + list(items[:shift])


def level_heap() -> None:
    """Free what the last contender left behind and give glibc's free pages back to the kernel.

    Without this, a contender that runs after another one finds a heap full of freed pages and
    its "first call" skips the page faults that the first contender paid for.
    """
    gc.collect()
    if _libc is not None:
        _libc.malloc_trim(0)


def prefault(nbytes: int) -> None:
    """Touch ``nbytes`` of fresh memory once and free it.

    The first touch of a page the guest never used costs a hypervisor fault; afterwards the guest
    kernel recycles pages it already owns. Doing this once up front spares whichever contender
    happens to run first from paying that one-off cost alone.
    """
    chunk = 64 << 20
    blocks = [torch.ones(chunk // 4) for _ in range(max(1, nbytes // chunk))]
    del blocks
    level_heap()
    # The same again in transparent huge pages, which the kernel assembles from 2 MiB blocks:
    # a stager that asks for them must not pay the one-off cost of the first ones alone.
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None:
        return
    regions = []
    for _ in range(max(1, nbytes // chunk)):
        region = mmap.mmap(-1, chunk, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        region.madvise(advice)
        for offset in range(0, chunk, 1 << 21):  # one write faults in a whole huge page
            region[offset] = 1
        regions.append(region)
    for region in regions:
        region.close()


def timed(call: Callable[[], object]) -> float:
    """Seconds one call takes (its result is dropped after the clock stops)."""
    start = time.perf_counter()
    result = call()
    seconds = time.perf_counter() - start
    del result
    return seconds


async def timed_async(call: Callable[[], Awaitable[object]]) -> float:
    """Seconds one awaited call takes, measured on the loop that runs it."""
    start = time.perf_counter()
    result = await call()
    seconds = time.perf_counter() - start
    del result
    return seconds


class GcPauses:
    """The cyclic garbage collector's pauses while a ``with`` block runs, from any thread.

    A collection holds the GIL, so a long one stalls the event loop whichever thread runs it;
    this attributes loop lag to the collector rather than to the stager.
    """

    def __init__(self) -> None:
        self.pauses: list[tuple[int, float]] = []  # (generation, seconds)
        self._started: dict[int, float] = {}

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        generation = int(info.get("generation", -1))
        if phase == "start":
            self._started[generation] = time.perf_counter()
        elif generation in self._started:
            self.pauses.append((generation, time.perf_counter() - self._started.pop(generation)))

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def full(self) -> list[float]:
        """Seconds of each full (generation 2) collection."""
        return [seconds for generation, seconds in self.pauses if generation == 2]

    def longest(self) -> float:
        """Seconds of the longest collection of any generation."""
        return max((seconds for _, seconds in self.pauses), default=0.0)
