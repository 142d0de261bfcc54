"""Snapshot slots: staged copies of a checkpoint that stay intact until their write is done.

A slot is one :class:`~astage.SyncStager` (one set of reusable host buffers) and, while a write
reads its staged tensors, the lease that keeps the next call from overwriting them. The pool
keeps up to ``size`` slots, so a save made while an earlier write is still running stages into
another slot instead of waiting for it; only when every slot is held (or host memory for
another slot was refused) does a save wait, for the oldest write.

Why N stagers of one buffer set each rather than one ``SyncStager(buffers=N)``: the pool must
notice that a save waits (it counts those waits) and must stop growing when host memory for
another set is refused, falling back to the sets it has; a stager of N sets would retry the set
whose allocation failed on every later call. :func:`_stage_held` is the one place that stages
and leases (``SyncStager.snapshot``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .._drivers._leases import Lease
from .._drivers._sync import SyncStager
from .._options import StagingOptions


@dataclass(frozen=True)
class Snapshot:
    """A staged checkpoint and how to give its host buffers back."""

    staged: Any
    release: Callable[[], None]
    waited_s: float | None
    """How long the save waited for an earlier write to free a slot (None: it did not wait)."""
    memory_refused: bool
    """Whether host memory for another slot was refused, so the save reused a held one."""


def is_memory_refusal(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) says host or device memory could not be had."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, MemoryError | torch.OutOfMemoryError):
            return True
        if isinstance(current, RuntimeError):
            text = str(current).lower()
            if "can't allocate memory" in text or "out of memory" in text:
                return True
        current = current.__cause__ or current.__context__
    return False


def _stage_held(stager: SyncStager, state: Any) -> tuple[Any, Lease]:
    """Stage ``state`` and keep it from being overwritten until the lease is released."""
    snapshot = stager.snapshot(state)
    # The writer reads the state dict it is handed; the lease alone says when it is done.
    return snapshot.state_dict, snapshot.lease


class _Slot:
    __slots__ = ("hold", "stager", "taken_at")

    def __init__(self, stager: SyncStager) -> None:
        self.stager = stager
        self.hold: Lease | None = None
        self.taken_at = 0  # the pool's counter when it was last taken: the oldest waits first

    @property
    def free(self) -> bool:
        return self.hold is None or self.hold.released


class SnapshotPool:
    """Up to ``size`` buffer sets that saves stage into, one per write still in progress."""

    def __init__(
        self,
        size: int,
        options: StagingOptions | None,
        make_stager: Callable[[StagingOptions | None], SyncStager] = SyncStager,
    ) -> None:
        self._size = size
        self._options = options
        self._make_stager = make_stager
        self._slots: list[_Slot] = []
        self._taken = 0
        self._memory_refused = False
        self._lock = threading.Lock()

    @property
    def slots(self) -> int:
        """How many buffer sets exist now."""
        return len(self._slots)

    def take(self, state: Any) -> Snapshot:
        """Stage ``state`` into a free slot, making one or, failing that, waiting for one."""
        with self._lock:
            refused = False
            slot = next((slot for slot in self._slots if slot.free), None)
            if slot is None and len(self._slots) < self._size and not self._memory_refused:
                slot = _Slot(self._make_stager(self._options))
                try:
                    staged, hold = _stage_held(slot.stager, state)
                except BaseException as error:
                    slot.stager.close()  # gives back what it allocated before it failed
                    if not self._slots or not is_memory_refusal(error):
                        raise
                    # No memory for another snapshot: from now on saves take turns on the
                    # slots that exist, waiting for the oldest write (counted in the stats).
                    self._memory_refused = refused = True
                else:
                    self._slots.append(slot)
                    return self._taken_now(slot, staged, hold, None, refused)
                slot = None
            waited: float | None = None
            if slot is None:
                slot = min(self._slots, key=lambda candidate: candidate.taken_at)
                assert slot.hold is not None
                started = time.perf_counter()
                slot.hold.wait()
                waited = time.perf_counter() - started
            staged, hold = _stage_held(slot.stager, state)
            return self._taken_now(slot, staged, hold, waited, refused)

    def _taken_now(
        self, slot: _Slot, staged: Any, hold: Lease, waited: float | None, refused: bool
    ) -> Snapshot:
        self._taken += 1
        slot.hold = hold
        slot.taken_at = self._taken
        return Snapshot(staged, hold.release, waited, refused)

    def close(self) -> None:
        """Release every buffer set (each waits for its lease first)."""
        with self._lock:
            slots, self._slots = self._slots, []
            self._memory_refused = False
            for slot in slots:
                slot.stager.close()
