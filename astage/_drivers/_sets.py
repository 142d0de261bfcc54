"""Buffer sets: a stager's N reusable sets of host buffers, taken in turn, never while leased.

Each set is a :class:`~astage._core._cache.BufferCache` of its own (``StagingOptions(buffers=N)``
gives N of them), so staging a state dict again into the same set finds its buffers and
allocates nothing. A call takes the next set in rotation that carries no unreleased
:class:`~astage._drivers._leases.Lease`; when every set is leased it waits (the faces say how).
Host memory is therefore up to N times the staged bytes, allocated as sets are first used.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from .._core._cache import BufferCache, CacheInfo
from ._leases import Lease, LeaseBoard


class BufferSet:
    """One set of host buffers and the leases taken on it."""

    __slots__ = ("_leases", "cache", "index")

    def __init__(self, index: int, cache: BufferCache) -> None:
        self.index = index
        self.cache = cache
        self._leases: list[Lease] = []

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
            leases = [lease for lease in buffer_set._leases if not lease.released]
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

    def use(self, buffer_set: BufferSet) -> None:
        """Record that a call stages into ``buffer_set`` (the rotation goes on from it)."""
        self._last = buffer_set.index
        self.current = buffer_set

    def lease(self, buffer_set: BufferSet) -> Lease:
        """A new lease on ``buffer_set``."""
        lease = Lease(self.board, shared=self._shared)
        with self._lock:
            buffer_set._leases.append(lease)
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
