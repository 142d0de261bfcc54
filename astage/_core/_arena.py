"""Host memory for buffers: storages a caller cannot resize, page-aligned and huge-page mappings.

Not resizable. Staged tensors share their storage with the cached buffer that the next call
copies into. torch's allocator makes resizable storages, so a caller freeing a staged tensor's
memory the usual way (``staged.untyped_storage().resize_(0)``) would shrink the buffer under
the next copy, which then writes past its end (a segfault). Every buffer therefore lies on
memory torch did not allocate, whose storage refuses ``resize_`` with torch's "Trying to resize
storage that is not resizable": small ones on numpy's (:func:`host_empty`, ~0.25 us more per
buffer than ``torch.empty_like``; a ``bytearray`` where numpy is not installed, ~3 us more),
large ones on mappings of their own (below).

Huge pages. Fresh memory costs more than the copy into it: the kernel maps each 4 KiB page on
its first write. With transparent huge pages it maps 2 MiB at a time, which on a quiet machine
populates memory several times faster. On a VM it can be the other way round: this one hands
freed huge pages back to the host within about two seconds, and populating them again then takes
1-2 s per 256 MiB, four times the cost of small pages. So huge pages are an option
(``StagingOptions(huge_pages=)``): off by default, on by request, or ``None`` to let a one-off
probe (:func:`huge_pages_help`, cached per process) compare the two on this machine.

A huge-page buffer is an anonymous private mapping, 2 MiB-aligned and advised
``MADV_HUGEPAGE``, wrapped by ``torch.frombuffer``: the tensor keeps the mapping alive, its
storage spans exactly the buffer's bytes (no padding, offset 0), and its memory is page-aligned
(which ``O_DIRECT`` writes need). Buffers under 2 MiB stay on small pages: a huge page would
waste most of itself on them.
"""

from __future__ import annotations

import functools
import math
import mmap
import time
from typing import Any

import torch

from .._torch import dense_strides

try:
    import numpy
except ImportError:  # pragma: no cover - numpy is optional for astage (torch imports it if present)
    numpy = None  # type: ignore[assignment]

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


def sole_tensor(storage: torch.UntypedStorage, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous ``shape``/``dtype`` tensor over all of ``storage``, the only tensor on it.

    Why: :meth:`BufferCache.in_use` tells a free buffer by its storage's reference count, which
    must equal a plain ``torch.empty`` buffer's. A view (``flat.view(dtype).view(shape)``) keeps
    the tensor it was taken from alive, one reference more for as long as the buffer lives: such
    a buffer looks in use forever (compat's pool then allocated a new buffer set for every save).
    """
    return torch.empty((0,), dtype=dtype, device="cpu").set_(
        storage, 0, shape, dense_strides(shape)
    )


Shape = torch.Size | tuple[int, ...]


def _numpy_twins() -> dict[torch.dtype, tuple[Any, bool]]:
    """For each torch dtype numpy can hold: the numpy dtype, and whether torch must view it as
    its own (bfloat16 and the float8s have no numpy dtype: an integer of their size carries them;
    ``view(dtype)`` of a same-size dtype keeps no base, so the tensor stays its storage's only one).
    """
    if numpy is None:  # pragma: no cover
        return {}
    try:  # a torch built without numpy support has from_numpy, which then raises
        torch.from_numpy(numpy.empty(1, dtype=numpy.uint8))
    except (RuntimeError, TypeError):  # pragma: no cover
        return {}
    twins: dict[torch.dtype, tuple[Any, bool]] = {
        torch.bool: (numpy.bool_, False),
        torch.uint8: (numpy.uint8, False),
        torch.int8: (numpy.int8, False),
        torch.int16: (numpy.int16, False),
        torch.uint16: (numpy.uint16, False),
        torch.int32: (numpy.int32, False),
        torch.uint32: (numpy.uint32, False),
        torch.int64: (numpy.int64, False),
        torch.uint64: (numpy.uint64, False),
        torch.float16: (numpy.float16, False),
        torch.float32: (numpy.float32, False),
        torch.float64: (numpy.float64, False),
        torch.complex64: (numpy.complex64, False),
        torch.complex128: (numpy.complex128, False),
        torch.bfloat16: (numpy.int16, True),
    }
    for name in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz"):
        dtype = getattr(torch, name, None)
        if isinstance(dtype, torch.dtype):
            twins[dtype] = (numpy.uint8, True)
    return twins


_NUMPY_TWINS = _numpy_twins()
_from_numpy = torch.from_numpy


def host_empty(shape: Shape, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous CPU tensor of ``shape``/``dtype`` whose storage cannot be resized.

    Not populated (numpy's ``empty``). The tensor is the only one on its storage, as
    :func:`sole_tensor`'s are.
    """
    twin = _NUMPY_TWINS.get(dtype)
    if twin is not None:
        numpy_dtype, viewed = twin
        tensor = _from_numpy(numpy.empty(shape, dtype=numpy_dtype))
        return tensor.view(dtype) if viewed else tensor
    nbytes = dtype.itemsize * math.prod(shape)
    if nbytes == 0:  # nothing to write past: torch.frombuffer refuses an empty buffer
        return torch.empty(shape, dtype=dtype, device="cpu")
    storage = torch.frombuffer(bytearray(nbytes), dtype=torch.uint8).untyped_storage()
    return sole_tensor(storage, shape, dtype)


PAGE_ALIGNED_MIN_BYTES = 1 << 20
"""Buffers of at least this size get a mapping of their own (page-aligned); smaller ones come
from :func:`host_empty` (malloc'd by numpy), where a page-aligned start would waste most of a
page on each."""


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
