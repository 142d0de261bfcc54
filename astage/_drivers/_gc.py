"""Pausing CPython's cyclic garbage collector while a walk runs, politely.

The walk allocates a few objects per tensor (the staged result); with tens of thousands of
tensors alive, those allocations set off collections over the whole heap, which doubled the time
of a cached call and stalled an event loop for 0.2-0.4 s. The walk leaves no garbage cycles
behind, so automatic collection is paused while it runs (the ``pause_gc`` option).

Politely means three things:

* **Re-entrant and shared.** One process-wide depth counter serves every stager, in every thread
  and task: the first caller in pauses, the last one out resumes. A call that ends while another
  is still walking neither resumes the collector under it nor leaves it paused for good.
* **The application's switches stay the application's.** The pause sets the first generation's
  threshold to zero (documented: "setting threshold0 to zero disables collection") instead of
  calling ``gc.disable()``. So ``gc.isenabled()`` stays whatever the application makes it: a
  ``gc.disable()`` or ``gc.enable()`` it calls while a walk runs is exactly what it finds
  afterwards (with ``gc.disable()``/``gc.enable()`` astage could not tell the application's
  ``disable()`` from its own, and would re-enable a collector the application had turned off).
  Nothing is paused if the collector is off when the first caller comes in; the threshold is
  restored on the way out only if it is still the zero astage set (an application that set its
  own threshold meanwhile keeps it).
* **The call's objects skip the young generations.** On the way out, what the calls allocated
  is filed straight into the oldest generation: ``gc.freeze()`` then ``gc.unfreeze()`` moves
  every tracked object there without traversing any. Otherwise the first collection after the
  call would traverse it all at once, a 20-30 ms stall with 50,000 tensors. This is skipped
  whenever the application has frozen objects of its own (before or during the call), because
  ``gc.unfreeze()`` would thaw them. Acyclic objects, the staged result among them, are still
  freed by reference counting the moment they are dropped.

  Only a call that left many young objects (:data:`FILE_AWAY_FROM`) is worth it: the one way to
  ask whether the application froze anything, ``gc.get_freeze_count()``, walks every frozen
  object (18 ms for the 196,000 objects of a process that imported torch, pytest and
  hypothesis, then froze), while a young collection over a few hundred objects costs next to
  nothing. And an application found with a frozen heap is asked ever more rarely (after 1, 2,
  4, ... up to :data:`MOST_CALLS_UNASKED` large calls), since it usually keeps its heap frozen:
  its calls would otherwise each hold the thread, an event loop's too, for that walk. There,
  the call's objects stay young, and the next young collection traverses them. A cached call
  therefore makes as few as it can: it hands out its last results' tensors and the item dicts
  of their groups again (``_core/_reuse.py``), and keeps them in lists of its own
  (``Recording.shells``), since a list of 50,000 entries made anew each call would stay
  young. Over 50,000 tensors in 25,000 dicts, the loop's longest stall per cached call went
  from a median of 25 ms (238-248 ms once in 20 calls, a middle-generation collection) to
  4.2 ms (``python -m benchmarks.frozen_heap_lag``).
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
from collections.abc import Iterator

__all__ = ["FILE_AWAY_FROM", "MOST_CALLS_UNASKED", "gc_paused"]

FILE_AWAY_FROM = 2000
"""Young objects a call must leave before they are filed into the oldest generation: below
this, the next young collection traverses them in well under a millisecond."""

MOST_CALLS_UNASKED = 1024
"""The longest run of large calls that skip the filing without asking whether the application
still has frozen objects, once it was found with some."""


class _Pause:
    """The process-wide pause: how many callers are inside, and what to restore."""

    def __init__(self) -> None:
        # Callers come from several threads (SyncStagers, several event loops); the counter
        # and the collector's settings change together under this lock.
        self.lock = threading.Lock()
        self.depth = 0
        self.saved_threshold: int | None = None
        """The first generation's threshold before astage set it to 0; None: nothing paused."""
        self.calls_unasked = 0
        """Large calls still to skip the filing without asking (the application froze objects)."""
        self.next_calls_unasked = 1

    def enter(self) -> None:
        with self.lock:
            self.depth += 1
            if self.depth > 1:
                return
            threshold = gc.get_threshold()[0]
            if gc.isenabled() and threshold != 0:
                self.saved_threshold = threshold
                gc.set_threshold(0, *gc.get_threshold()[1:])

    def leave(self) -> None:
        with self.lock:
            if self.depth == 0:
                # The forking thread's own pause, in a forked child: the reset after the fork
                # already resumed the collector (see after_fork_in_child).
                return
            self.depth -= 1
            if self.depth > 0 or self.saved_threshold is None:
                return
            saved, self.saved_threshold = self.saved_threshold, None
            if gc.get_count()[0] >= FILE_AWAY_FROM:  # free to ask, unlike the freeze count
                self._file_away()
            current = gc.get_threshold()
            if current[0] == 0:  # still astage's zero: the application set none of its own
                gc.set_threshold(saved, *current[1:])

    def _file_away(self) -> None:
        """File the call's objects into the oldest generation, unless the application froze
        objects (which ``gc.unfreeze()`` would thaw) or was found to, not long ago."""
        if self.calls_unasked:
            self.calls_unasked -= 1
            return
        if gc.get_freeze_count():
            self.calls_unasked = self.next_calls_unasked
            self.next_calls_unasked = min(2 * self.next_calls_unasked, MOST_CALLS_UNASKED)
            return
        self.next_calls_unasked = 1
        gc.freeze()
        gc.unfreeze()

    def after_fork_in_child(self) -> None:
        """Resume the collector in a forked child whose parent had calls inside the pause.

        Those callers are threads of the parent: in the child nobody leaves, and the collector
        stayed paused (threshold 0) for the child's whole life, a DataLoader worker forked
        while a staging thread walked, say. The lock is made anew: a parent's thread may have
        held it (the ``before`` hook takes it, so the state copied is whole; the new lock is
        for the child's own callers).
        """
        self.lock = threading.Lock()
        saved, self.saved_threshold = self.saved_threshold, None
        self.depth = 0
        current = gc.get_threshold()
        if saved is not None and current[0] == 0:  # still astage's zero, as in leave()
            gc.set_threshold(saved, *current[1:])


_pause = _Pause()


def _before_fork() -> None:
    _pause.lock.acquire()


def _after_fork_in_parent() -> None:
    _pause.lock.release()


os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_pause.after_fork_in_child,
)


@contextlib.contextmanager
def gc_paused(enabled: bool = True) -> Iterator[None]:
    """Pause automatic cyclic collection for the block (nothing happens if ``enabled`` is off).

    Re-entrant, and shared by every stager in the process: see the module's docstring.
    """
    if not enabled:
        yield
        return
    _pause.enter()
    try:
        yield
    finally:
        _pause.leave()
