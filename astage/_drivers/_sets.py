"""Buffer sets: a stager's N reusable sets of host buffers, taken in turn, never while leased.

Each set is a :class:`~astage._core._cache.BufferCache` of its own (``StagingOptions(buffers=N)``
gives N of them), so staging a state dict again into the same set finds its buffers and
allocates nothing. A call takes the next set in rotation that carries no unreleased
:class:`~astage._drivers._leases.Lease`; when every set is leased it waits (the faces say how).
Host memory is therefore up to N times the staged bytes, allocated as sets are first used.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator

from .._core._cache import BufferCache, CacheInfo
from ._leases import Lease, LeaseBoard


class BufferSet:
    """One set of host buffers and the leases taken on it."""

    __slots__ = ("_leases", "cache", "index")

    def __init__(self, index: int, cache: BufferCache) -> None:
        self.index = index
        self.cache = cache
        self._leases: list[Lease | weakref.ref[Lease]] = []
        """Its leases: a shared one itself, a private one by a weak reference (see lease())."""

    def __repr__(self) -> str:
        return f"<BufferSet {self.index}: {len(self._leases)} leases seen held>"


class BufferSets:
    """A stager's buffer sets, the rotation among them and their leases; thread-safe."""

    def __init__(self, count: int, make_cache: Callable[[], BufferCache], *, shared: bool) -> None:
        self._sets = [BufferSet(index, make_cache()) for index in range(count)]
        self._shared = shared  # leases in shared memory: releasable from another process
        self._lock = threading.Lock()  # guards every set's list of leases
        self._last = count - 1  # the set the last call used: the first call takes set 0
        self.board = LeaseBoard()
        self.current = self._sets[0]
        """The set of the call in progress, or of the last call (what hold_buffers() leases)."""

    def __iter__(self) -> Iterator[BufferSet]:
        return iter(self._sets)

    def __len__(self) -> int:
        return len(self._sets)

    def held(self, buffer_set: BufferSet) -> bool:
        """Whether a lease on ``buffer_set`` is still unreleased (released ones are forgotten)."""
        with self._lock:
            leases = [entry for entry in buffer_set._leases if _holding(entry)]
            buffer_set._leases = leases
            return bool(leases)

    def free(self) -> BufferSet | None:
        """The next set in rotation that no lease holds, or None when all are leased."""
        count = len(self._sets)
        for step in range(1, count + 1):
            candidate = self._sets[(self._last + step) % count]
            if not self.held(candidate):
                return candidate
        return None

    def use(self, buffer_set: BufferSet) -> tuple[BufferSet, int]:
        """Record that a call stages into ``buffer_set`` (the rotation goes on from it).

        Returns what to hand :meth:`undo` should the call end without a result.
        """
        before = (self.current, self._last)
        self._last = buffer_set.index
        self.current = buffer_set
        return before

    def undo(self, before: tuple[BufferSet, int]) -> None:
        """A call ended without a result (it failed, was cancelled, or its stage_iter block
        was left early): the last call that had one is current again, and the rotation goes
        on from it. Otherwise ``hold_buffers()`` after a failed call leased the failed call's
        set, and the next call staged over the result the caller meant to hold."""
        self.current, self._last = before

    def lease(self, buffer_set: BufferSet) -> Lease:
        """A new lease on ``buffer_set``.

        A private lease (``share_memory=False``) is tracked by a weak reference: once its
        consumer dropped it unreleased (a snapshot collected after its writer failed), nobody
        could ever release it, and the set would stay leased for good, so that the next call
        and ``close()`` waited forever; collected, it counts as released (a waiter sees that
        within ``POLL_S``). A shared lease is kept: another process it was sent to may still
        release it after this process dropped its own copy.
        """
        lease = Lease(self.board, shared=self._shared)
        entry: Lease | weakref.ref[Lease] = lease if self._shared else weakref.ref(lease)
        with self._lock:
            buffer_set._leases.append(entry)
        return lease

    def all_released(self) -> bool | None:
        """True when no set is leased, else None (the shape ``LeaseBoard.wait_for`` expects)."""
        return True if not any(self.held(buffer_set) for buffer_set in self._sets) else None

    def info(self) -> CacheInfo:
        """The host buffers of every set together."""
        infos = [buffer_set.cache.info() for buffer_set in self._sets]
        return CacheInfo(
            storages=sum(info.storages for info in infos),
            nbytes=sum(info.nbytes for info in infos),
            pinned_nbytes=sum(info.pinned_nbytes for info in infos),
        )

    def clear(self) -> None:
        """Drop every set's buffers; staged tensors handed out keep theirs alive."""
        for buffer_set in self._sets:
            buffer_set.cache.clear()


def _holding(entry: Lease | weakref.ref[Lease]) -> bool:
    """Whether a set's lease entry still holds it: alive (for a weak one) and unreleased."""
    lease = entry() if isinstance(entry, weakref.ref) else entry
    return lease is not None and not lease.released
