"""Copy threads that give way to the event loop: a long scheduler slice while they copy.

On a machine with as many busy copying threads as cores (a 2-core VM: astage's copy thread and
torch's second intra-op thread), the event loop's thread wakes up every millisecond or so and
finds no core free. Linux's scheduler (EEVDF) lets a waking thread preempt a running one only
if the running one has used up its slice; otherwise the waking one waits for the next tick
(4 ms at ``HZ=250``). Measured here, a 1 ms heartbeat beside one copy thread with two intra-op
threads woke 3-4 ms late at p99 (``python -m benchmarks.lag_floor``). The same copies in
another process left it at 0.2 ms: most of the lateness came from the GIL, whose release by the
copy thread wakes the loop's thread onto the copy thread's own core, where it then waits.

Since Linux 6.12 a thread may ask for a slice of its own (``sched_setattr``'s
``sched_runtime`` for ``SCHED_OTHER``, 0.1-100 ms, no privilege needed), and a waking thread
with a shorter slice than the running one preempts it at once. So a copy thread runs its batch
with a long slice: it still gets its fair share of the CPU (its weight is unchanged), but any
thread with the default slice that wakes up (the event loop, the training loop) takes a core
from it without waiting for the tick. The slice it had is restored when the batch ends, so
anyio's worker thread goes back to the application as it was; torch's intra-op threads that
the copy itself started (OpenMP makes a pool per calling thread, at its first parallel region)
keep the long slice, which only ever makes them give way.

Elsewhere (other systems, other architectures, older kernels, which ignore the field, or a
thread with a real-time or idle policy) nothing changes.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import platform
import sys
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

__all__ = ["COPY_SLICE_NS", "copy_slice", "in_copy_slice"]

COPY_SLICE_NS = 50_000_000
"""The slice a copy thread asks for: 50 ms (the kernel clamps to 0.1-100 ms)."""

_SCHED_OTHER, _SCHED_BATCH = 0, 3
_SYSCALLS = {"x86_64": (314, 315), "aarch64": (274, 275)}
"""(sched_setattr, sched_getattr) system call numbers per architecture."""


class _SchedAttr(ctypes.Structure):
    """``struct sched_attr`` (``SCHED_ATTR_SIZE_VER1``, 56 bytes)."""

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("sched_policy", ctypes.c_uint32),
        ("sched_flags", ctypes.c_uint64),
        ("sched_nice", ctypes.c_int32),
        ("sched_priority", ctypes.c_uint32),
        ("sched_runtime", ctypes.c_uint64),
        ("sched_deadline", ctypes.c_uint64),
        ("sched_period", ctypes.c_uint64),
        ("sched_util_min", ctypes.c_uint32),
        ("sched_util_max", ctypes.c_uint32),
    ]


class _Scheduler:
    """The two system calls, through the C library's ``syscall``."""

    def __init__(self, setattr_nr: int, getattr_nr: int) -> None:
        self._syscall = ctypes.CDLL(None, use_errno=True).syscall
        self._set, self._get = setattr_nr, getattr_nr

    def get(self) -> _SchedAttr | None:
        """The calling thread's attributes, or None where the call fails."""
        attr = _SchedAttr()
        size = ctypes.sizeof(_SchedAttr)
        if self._syscall(self._get, 0, ctypes.byref(attr), size, 0) != 0:
            return None
        return attr

    def set(self, attr: _SchedAttr) -> bool:
        attr.size = ctypes.sizeof(_SchedAttr)
        attr.sched_flags = 0
        return bool(self._syscall(self._set, 0, ctypes.byref(attr), 0) == 0)


@functools.cache
def _scheduler() -> _Scheduler | None:
    numbers = _SYSCALLS.get(platform.machine())
    if not sys.platform.startswith("linux") or numbers is None:
        return None
    try:
        return _Scheduler(*numbers)
    except (OSError, AttributeError):  # no C library to call through
        return None


@contextlib.contextmanager
def copy_slice(slice_ns: int = COPY_SLICE_NS) -> Iterator[None]:
    """The calling thread runs the block with a scheduler slice of ``slice_ns``, then its own.

    Only the slice changes: the thread's policy and nice value are written back as read. A
    thread whose policy is neither ``SCHED_OTHER`` nor ``SCHED_BATCH`` is left alone.
    """
    scheduler = _scheduler()
    before = scheduler.get() if scheduler is not None else None
    if (
        scheduler is None
        or before is None
        or before.sched_policy not in {_SCHED_OTHER, _SCHED_BATCH}
        or before.sched_runtime >= slice_ns
    ):
        yield
        return
    own = before.sched_runtime
    before.sched_runtime = slice_ns
    changed = scheduler.set(before)
    try:
        yield
    finally:
        if changed:
            before.sched_runtime = own
            scheduler.set(before)


P = ParamSpec("P")
R = TypeVar("R")


def in_copy_slice(function: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """``function(*args, **kwargs)`` under :func:`copy_slice`: a worker thread's copy work."""
    with copy_slice():
        return function(*args, **kwargs)
