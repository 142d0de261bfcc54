"""Host buffers for snapshots that outlive the call: a set is reused only once nothing reads it.

``dcp.async_save`` stages, hands the staged dict to an upload thread, and returns; the next
save may stage while that upload still reads the previous snapshot. One buffer cache would then
copy the new values over the snapshot under the writer. A :class:`SnapshotPool` holds one or
more buffer sets (each a :class:`~astage.SyncStager` with its own cache) and stages each call
into a set whose buffers no live tensor uses (``BufferCache.in_use``: the upload still holding
the snapshot is exactly such a use). In the usual pattern, where each upload ends before the
next save, that is always the same set: its cached (and pinned) buffers are reused every time.
A save that overlaps an upload gets a second set; sets found idle are closed, so the pool holds
only as many sets as there are snapshots alive, plus the one being filled.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from .._core._cache import CacheInfo
from .._core._stats import StageStats
from .._drivers._gc import gc_paused
from .._drivers._sync import SyncStager
from .._errors import StagerClosedError
from .._options import StagingOptions

GRACE_S = 0.005
"""How long a call looks for a set to come free before it allocates a new one."""


def _in_use(stager: SyncStager) -> bool:
    # The check creates a storage object per buffer the first time (torch keeps them): new
    # objects by the thousand would set off full collections of the whole heap, as in the walk.
    with gc_paused():
        return stager._cache.in_use()


class SnapshotPool:
    """Stages into a buffer set that no live snapshot uses; thread-safe (calls run in turn)."""

    def __init__(self, options: StagingOptions, owner: str) -> None:
        self._options = options
        self._owner = owner  # the class the user holds, for the closed-stager message
        self._sets: list[SyncStager] = []  # least recently used first
        self._lock = threading.Lock()
        self._closed = False
        self.last_stats: StageStats | None = None

    @property
    def sets(self) -> int:
        """Buffer sets held now."""
        return len(self._sets)

    def stage(self, state_dict: Any) -> Any:
        with self._lock:
            if self._closed:
                raise StagerClosedError(f"this {self._owner} is closed")
            chosen = self._free_set()
            try:
                result = chosen.stage(state_dict)
            except BaseException:
                # The error's traceback holds the tensors staged before it (uses of this set's
                # buffers) for as long as the caller keeps it: kept in the pool, the set would
                # count as in use that long, and every failed save whose error is kept (a
                # future's, say) would add a set, a whole copy of the state. Closed instead:
                # what the error holds stays valid, and goes with it.
                self._sets.remove(chosen)
                chosen.close()
                raise
            self.last_stats = chosen.last_stats
            return result

    def _free_set(self) -> SyncStager:
        """The most recently used free set (or a new one); the other free sets are closed."""
        free = self._find_free()
        chosen = free[-1] if free else SyncStager(self._options)
        for stager in free[:-1]:
            stager.close()
        self._sets = [s for s in self._sets if s is not chosen and s not in free]
        self._sets.append(chosen)
        return chosen

    def _find_free(self) -> list[SyncStager]:
        """The free sets; when all are in use, look again for a moment before giving up.

        An upload that has just completed may still hold its snapshot for a few microseconds:
        DCP resolves the upload's future before its worker thread drops the work item that
        references the snapshot. A caller that waits for that future and saves again at once
        would find the set in use and pay for a new one; a short grace avoids that.
        """
        deadline = time.perf_counter() + GRACE_S
        while True:
            free = [stager for stager in self._sets if not _in_use(stager)]
            if free or not self._sets or time.perf_counter() >= deadline:
                return free
            time.sleep(GRACE_S / 20)

    def cache_info(self) -> CacheInfo:
        """Host buffers held by all sets together."""
        with self._lock:
            infos = [stager.cache_info() for stager in self._sets]
        return CacheInfo(
            storages=sum(info.storages for info in infos),
            nbytes=sum(info.nbytes for info in infos),
            pinned_nbytes=sum(info.pinned_nbytes for info in infos),
        )

    def close(self) -> None:
        """Release every set's buffers; snapshots handed out stay valid."""
        with self._lock:
            self._closed = True
            sets, self._sets = self._sets, []
        for stager in sets:
            stager.close()
