"""Host memory for large buffers on transparent huge pages, where that helps.

Fresh memory costs more than the copy into it: the kernel maps each 4 KiB page on its first
write. With transparent huge pages it maps 2 MiB at a time, which on a quiet machine populates
memory several times faster. On a VM it can be the other way round: this one hands freed huge
pages back to the host within about two seconds, and populating them again then takes 1-2 s
per 256 MiB, four times the cost of small pages. So huge pages are an option
(``StagingOptions(huge_pages=)``): off by default, on by request, or ``None`` to let a one-off
probe (:func:`huge_pages_help`, cached per process) compare the two on this machine.

A huge-page buffer is an anonymous private mapping, 2 MiB-aligned and advised
``MADV_HUGEPAGE``, wrapped by ``torch.frombuffer``: the tensor keeps the mapping alive, its
storage spans exactly the buffer's bytes (no padding, offset 0), and its memory is page-aligned
(which ``O_DIRECT`` writes need). Buffers under 2 MiB stay on torch's allocator: a huge page
would waste most of itself on them.
"""

from __future__ import annotations

import functools
import mmap
import time

import torch

HUGE_PAGE = 2 << 20
"""Size of a transparent huge page on x86-64 and most arm64 kernels."""

_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
_PROBE_BYTES = 8 << 20  # four huge pages: long enough to time, short enough to run anywhere


def thp_mode() -> str:
    """The kernel's transparent huge page mode (``always``, ``madvise``, ``never``), or ``""``."""
    try:
        with open(_THP_ENABLED, encoding="ascii") as enabled:
            text = enabled.read()
    except OSError:
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else ""


@functools.cache
def huge_pages_available() -> bool:
    """Whether ``madvise(MADV_HUGEPAGE)`` can give this process huge pages."""
    return hasattr(mmap, "MADV_HUGEPAGE") and thp_mode() in {"always", "madvise"}


def huge_empty(nbytes: int) -> torch.Tensor:
    """A flat ``uint8`` tensor of ``nbytes`` on a 2 MiB-aligned mapping advised for huge pages.

    Not populated: its pages are mapped on first write (by the copy, or by ``reserve()``).
    """
    # One huge page more than needed, so that an aligned start fits inside the mapping; the
    # part before the start and after the end is never written, so it costs no memory.
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = torch.frombuffer(mapping, dtype=torch.uint8, count=1).data_ptr()
    offset = -base % HUGE_PAGE
    # Only whole huge pages are advised: a tail on huge pages would commit up to 2 MiB that the
    # buffer does not use (host memory must stay within a few percent of the staged bytes).
    mapping.madvise(mmap.MADV_HUGEPAGE, offset, nbytes // HUGE_PAGE * HUGE_PAGE)
    # frombuffer holds the mapping (a buffer export) for as long as the storage lives; the
    # mapping is unmapped when the last tensor over it is gone.
    return torch.frombuffer(mapping, dtype=torch.uint8, offset=offset, count=nbytes)


PAGE_ALIGNED_MIN_BYTES = 1 << 20
"""Buffers of at least this size get a mapping of their own (page-aligned); smaller ones stay
on torch's allocator, where a page-aligned start would waste most of a page on each."""


def page_empty(nbytes: int) -> torch.Tensor:
    """A flat ``uint8`` tensor of ``nbytes`` on an anonymous mapping of its own: page-aligned.

    Why: a checkpoint writer can then send the buffer's whole pages to the file with
    ``O_DIRECT`` (no copy into the page cache: most of the writer's CPU time); torch's allocator
    starts large blocks 64 bytes past a page. Costs what torch's large allocations cost (they
    are mappings too, above glibc's threshold). Not populated until first written.
    """
    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes)


def _populate_seconds(memory: torch.Tensor) -> float:
    started = time.perf_counter()
    memory.fill_(1)
    return time.perf_counter() - started


@functools.cache
def huge_pages_help() -> bool:
    """Whether fresh huge pages populate clearly faster than small ones here (probed once).

    Populates :data:`_PROBE_BYTES` of each kind, twice in alternation, and compares the faster
    run of each: huge pages are chosen only when they take under 70% of the small pages' time.
    A VM that has handed its huge pages back to the host answers no.
    """
    if not huge_pages_available():
        return False
    small: list[float] = []
    huge: list[float] = []
    for _ in range(2):
        small.append(_populate_seconds(torch.empty(_PROBE_BYTES, dtype=torch.uint8, device="cpu")))
        huge.append(_populate_seconds(huge_empty(_PROBE_BYTES)))
    return min(huge) < 0.7 * min(small)
