"""Leases: a consumer's claim that keeps a stager from overwriting one buffer set.

Staged tensors live in a stager's host buffers, which a later call overwrites. A consumer that
reads them for longer than the caller's next call (a writer thread, ``torch.save`` in a thread,
another process) holds a :class:`Lease` on the buffer set it reads; the stager never stages into
a leased set: the next call takes another free set (``StagingOptions(buffers=N)``) or waits
until the lease is released. ``close()`` and ``aclose()`` wait for every lease.

A lease is released from wherever its consumer finishes: the event loop, a writer thread, a
callback, or another process it was sent to. Its state is therefore one byte in a tensor (in
shared memory for a stager with ``share_memory=True``, so that a lease pickled to another
process by :mod:`torch.multiprocessing` releases the parent's set), plus, in the owning
process, a :class:`LeaseBoard` that wakes up whoever waits. A release in another process wakes
nobody: waiters poll the shared bytes every :data:`POLL_S`.

Waiting on the async face runs in an anyio worker thread that polls for its caller's
cancellation, so the event loop never blocks and a cancelled caller leaves no thread behind.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

import anyio
import anyio.from_thread
import anyio.to_thread
import torch

from .._errors import InvalidOptionsError, UsageError
from . import _fork

T = TypeVar("T")

POLL_S = 0.01
"""How often a waiter looks at the shared bytes: how soon it sees a release made in another
process (a release in this process wakes it at once)."""

_CANCEL_POLL_S = 0.05  # how soon a waiting worker thread notices that its caller was cancelled


class Lease:
    """A claim on one buffer set of a stager; the set is not staged into until :meth:`release`.

    ``release()`` is idempotent and may be called from any thread, from the event loop, or from
    another process the lease was sent to through :mod:`torch.multiprocessing` (a stager with
    ``share_memory=True`` only). A lease is also a context manager that releases itself on exit.
    """

    __slots__ = ("__weakref__", "_board", "_born", "_flag", "_released")

    def __init__(self, board: LeaseBoard | None = None, *, shared: bool = False) -> None:
        # A lease that may cross to another process is one byte of shared memory, 0 while
        # held. Any other is a Python flag: a torch call lets go of the GIL, and a lease is
        # taken on the event loop (a save's first landed tensor), which then waited to get the
        # GIL back from the worker threads that took it meanwhile: 0.1-2 ms without a
        # heartbeat, the longest stall of a save's staging with one (3-5 ms).
        self._released = False
        self._flag: torch.Tensor | None = None
        if shared:
            self._flag = torch.zeros(1, dtype=torch.uint8, device="cpu")
            self._flag.share_memory_()
        self._board = board  # None in a process the lease was sent to: nobody waits there
        self._born = _fork.generation()

    @property
    def released(self) -> bool:
        """Whether :meth:`release` was called (here or in a process the lease was sent to)."""
        flag = self._flag
        return self._released if flag is None else bool(flag.item())

    @property
    def shared(self) -> bool:
        """Whether the lease can be released from another process."""
        return self._flag is not None and bool(self._flag.is_shared())

    def release(self) -> None:
        """Let the stager stage into this lease's buffer set again (as far as it is concerned)."""
        if self._flag is None:
            self._released = True
        else:
            self._flag.fill_(1)
        board = self._here()
        if board is not None:
            board.notify()

    def wait(self, timeout: float | None = None) -> bool:
        """Block the calling thread until the lease is released; False when ``timeout`` ran out."""
        # A negative one only looks, as threading.Event.wait's does.
        limit = wait_seconds(timeout)
        deadline = None if limit is None else time.monotonic() + limit
        while not self.released:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            board = self._here()
            if board is None:
                time.sleep(POLL_S)
            else:
                board.pause(deadline)
        return True

    def _here(self) -> LeaseBoard | None:
        """The board, in the process that made the lease only.

        A forked child inherits the lease with its board, whose waiters stayed in the parent;
        the board's lock may even have been copied taken by one of them (a waiter takes it
        every :data:`POLL_S`), so that a release in the child waited for it forever. There,
        as in a process the lease was sent to, nobody is woken and a wait polls.
        """
        return self._board if self._born == _fork.generation() else None

    async def wait_async(self) -> None:
        """Wait until the lease is released without blocking the event loop; cancellable."""
        if not self.released:
            await wait_in_worker(lambda: self.released or None)

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __reduce__(self) -> tuple[Any, ...]:
        if not self.shared:
            raise UsageError(
                "a lease of a stager without share_memory=True cannot go to another process: "
                "its release could not reach the stager; build the stager with "
                "share_memory=True, or release the lease in this process"
            )
        assert self._flag is not None
        return (_rebuild_lease, (self._flag,))

    def __repr__(self) -> str:
        return f"<Lease {'released' if self.released else 'held'}>"


def wait_seconds(timeout: float | None) -> float | None:
    """A wait's ``timeout`` checked, in seconds (None: no limit). Refused
    (:class:`~astage.InvalidOptionsError`): anything but a number, a bool, and NaN, with which
    the deadline would never come (a wait forever)."""
    if timeout is None:
        return None
    if (
        not isinstance(timeout, (int, float))
        or isinstance(timeout, bool)
        or math.isnan(seconds(timeout))
    ):
        raise InvalidOptionsError(f"timeout must be None or a number of seconds, got {timeout!r}")
    return seconds(timeout)


def seconds(timeout: float) -> float:
    """A checked ``timeout`` as a float: an int too large for one (``10**400``) is no limit,
    as ``inf`` is, rather than an OverflowError out of the deadline's sum."""
    try:
        return float(timeout)
    except OverflowError:
        return math.inf


def _rebuild_lease(flag: torch.Tensor) -> Lease:
    if not flag.is_shared():
        # A plain pickler copied the byte: releasing the copy would never reach the stager,
        # which would wait forever. torch.multiprocessing's pickler shares it instead.
        raise UsageError(
            "a lease was unpickled as a copy, so its release could not reach the stager: send "
            "leases and snapshots through torch.multiprocessing (its Queue, Pipe or Process "
            "arguments), not a plain pickle"
        )
    lease = Lease.__new__(Lease)
    lease._flag = flag
    lease._released = False
    lease._board = None
    lease._born = _fork.generation()
    return lease


class LeaseBoard:
    """Where one stager's leases wake up its waiters: a condition, notified on each release."""

    def __init__(self) -> None:
        # Reentrant: a release() may run in a thread that is inside pause() (a finalizer the
        # collector sets off there, a signal handler), which would wait on its own lock.
        self._changed = threading.Condition(threading.RLock())

    def notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def pause(self, deadline: float | None) -> None:
        """Sleep until a release in this process, :data:`POLL_S`, or ``deadline``."""
        wait = POLL_S if deadline is None else max(0.0, min(POLL_S, deadline - time.monotonic()))
        with self._changed:
            self._changed.wait(wait)

    def wait_for(self, ready: Callable[[], T | None], timeout: float | None = None) -> T | None:
        """Block until ``ready()`` returns something (returned), or None once ``timeout`` ran out.

        ``ready`` runs in the calling thread, not under the board's lock: it may take leases'
        states in whatever way it likes.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            found = ready()
            if found is not None:
                return found
            if deadline is not None and time.monotonic() >= deadline:
                return None
            self.pause(deadline)

    async def wait_for_async(self, ready: Callable[[], T | None]) -> T:
        """Wait, without blocking the loop, until ``ready()`` returns something; cancellable."""
        found = ready()
        if found is not None:
            return found
        return await wait_in_worker(ready, self)


async def wait_in_worker(ready: Callable[[], T | None], board: LeaseBoard | None = None) -> T:
    """Poll ``ready`` in an anyio worker thread until it returns something; cancellable.

    Not abandoned on cancel: the thread notices the cancellation within a poll and returns, so
    no thread outlives the caller however long the lease stays taken.
    """

    def poll() -> T:
        while True:
            found = ready()
            if found is not None:
                return found
            anyio.from_thread.check_cancelled()
            if board is None:
                time.sleep(POLL_S)
            else:
                board.pause(time.monotonic() + _CANCEL_POLL_S)

    return await anyio.to_thread.run_sync(poll)
