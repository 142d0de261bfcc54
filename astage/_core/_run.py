"""One stage() call in progress: its walk, the batches cut from it, the work in flight.

The drivers decide how to start a batch and how to wait for it; what they hand back is any
object with the batch and a ``done()`` poll (:class:`InFlight`).
"""

from __future__ import annotations

import bisect
import itertools
import operator
import time
from collections import deque
from collections.abc import Iterator
from typing import Any, Generic, Protocol, TypeVar

from ._batches import MAX_BATCH_COPIES, Batch, make_batches
from ._cache import BufferCache
from ._plan import Leaf, Plan
from ._replay import walk_or_replay


class InFlight(Protocol):
    """A batch handed to a device or a thread, not yet known to be complete."""

    batch: Batch

    def done(self) -> bool: ...


T = TypeVar("T", bound=InFlight)

_SCAN_STEP = 1024
"""Copies whose sizes one turn adds up before cutting batches (~0.3 ms on a quiet core)."""
_CUT_STEP = 2 * MAX_BATCH_COPIES
"""Most copies handed to one :func:`make_batches`. Its first batch sums their sizes: 0.1 ms
for 2,048 on a quiet core. 8,192 took 0.3 ms quiet, but 1.3-1.8 ms at the end of a first call
over 50,000 small tensors, beside the copies that had started (loop-thread CPU time): every
fourth turn held the loop past a 1 ms beat."""


class Run(Generic[T]):
    """One stage() call in progress: its walk, the batches cut from it, the work in flight."""

    def __init__(
        self,
        cache: BufferCache,
        state_dict: Any,
        *,
        track_leaves: bool,
        chunk_bytes: int,
        max_inflight_bytes: int,
        ahead: bool = False,
    ) -> None:
        self.cache = cache
        self.plan = Plan(track_leaves=track_leaves, ahead=ahead)
        self.walk = walk_or_replay(cache, state_dict, self.plan)
        self.started = time.perf_counter()
        self.pending: deque[T] = deque()
        self.pending_bytes = 0
        """Bytes of the device batches in :attr:`pending`: the ones ``max_inflight_bytes``
        bounds (see :meth:`next_batch`)."""
        self.landed = 0  # copies [0, landed) have landed in their host buffers
        self._chunk = chunk_bytes
        self._max_inflight = max_inflight_bytes
        self._cut = 0  # copies [0, _cut) have been handed to make_batches
        self._scanned = 0  # copies [0, _scanned) are counted in nbytes
        self._uncut_bytes = 0
        self._batches: Iterator[Batch] = iter(())  # cut lazily: a few at a time per turn
        self._next: Batch | None = None
        self.nbytes = 0
        """Bytes of the copies found so far (all of them once the walk is done)."""
        self._leaves: list[Leaf] | None = None
        self._last_copies: list[int] = []  # of the leaves in that order
        self._next_leaf = 0

    def next_batch(self, final: bool) -> Batch | None:
        """The next batch to start, if the in-flight budget has room for it.

        While the walk still runs (``final`` false) copies are only cut into batches once a
        full batch has gathered, so the walk does not produce a trickle of tiny tasks.

        The budget bounds device batches only, as ``max_inflight_bytes`` says: a host batch
        copies into buffers that exist already, in a worker thread that takes the queued ones
        one after another, and holds nothing a queue would need to bound. Held back by the
        budget too, the async face's cached call over 1 GiB in 64 MiB batches queued half of
        them, and its worker ran dry halfway: a loop round trip and a thread start (0.6 ms)
        in which no core copied.
        """
        batch = self._peek(final)
        if batch is None:
            return None
        if (
            self.pending_bytes
            and batch.device.type != "cpu"
            and self.pending_bytes + batch.nbytes > self._max_inflight
        ):
            return None
        self._next = None
        return batch

    def _peek(self, final: bool) -> Batch | None:
        if self._next is None:
            self._next = next(self._batches, None)
        if self._next is None:
            self._cut_batches(final)
            self._next = next(self._batches, None)
        return self._next

    def _cut_batches(self, final: bool) -> None:
        copies = self.plan.copies
        # At most _SCAN_STEP copies a turn: a replay hands the plan thousands at once, and
        # summing 50,000 sizes in one go held the loop 5-8 ms. Copies past ``found`` are cut on
        # a later turn (``_peek`` comes back here until every copy has been cut).
        found = min(len(copies), self._scanned + _SCAN_STEP)
        self._uncut_bytes += sum(copies.sizes[self._scanned : found])
        self._scanned = found
        uncut = found - self._cut
        allocating = self._allocating_walk()
        if uncut and (
            final
            or (self._uncut_bytes >= self._chunk and not allocating)
            or (uncut >= MAX_BATCH_COPIES and not allocating)
        ):
            # At most _CUT_STEP copies at once too: after an allocating walk all its copies
            # wait to be cut, and cutting 50,000 (their sizes' running total) in one go held
            # the loop 2-5 ms.
            stop = min(found, self._cut + _CUT_STEP)
            if not final:
                # Cut at a multiple of MAX_BATCH_COPIES: where a walk's scan happened to be
                # must not decide where a batch ends. Then every call over the same structure
                # cuts the same batches, which a device layer keeps its gathers for
                # (_devices/_gather.GatherLayout); cut where the scan stood, an async cached
                # call over 10,002 small tensors cut other batches every call, and rebuilt
                # every gather: 130-175 ms against the blocking face's 44 (gather on CPU).
                aligned = stop - stop % MAX_BATCH_COPIES
                if aligned > self._cut:
                    stop = aligned
            nbytes = self._uncut_bytes
            if stop < found:
                nbytes = sum(copies.sizes[self._cut : stop])
            self._batches = make_batches(copies, self._cut, stop, self._chunk)
            self.nbytes += nbytes
            self._uncut_bytes -= nbytes
            self._cut = stop

    def _allocating_walk(self) -> bool:
        """Whether a full walk that allocates buffers fills the plan, and no tensor is handed
        out as it lands (``stage_iter``): then no copy starts before the walk has met every
        tensor. Its tail (its tables emptied, the replay recording finished) allocates nothing,
        and host copies start there: the async face's first call over 50,000 small tensors
        went 4.4-5% faster (paired, 12 and 20 alternating calls), the loop's lag unchanged
        (``benchmarks.lag_ab``, three rounds). Copies from a device still wait for the tail's
        end: each pins its buffer first (below), and the tail frees the walk's big tables.

        Why, for each kind of copy:

        * Small host batches copied in worker threads beside such a walk made the walk itself
          10-15% slower (loop-thread CPU, first call over 50,000 small tensors, 2 cores; a
          wall-clock loss of 6-12%), more than the overlap saved.
        * Large host copies (``chunk_bytes``) fault in fresh pages while the walk maps new
          buffers, and each slowed the other: over 1 GiB in 64 tensors (2 cores, interleaved,
          old code beside the new) first calls went 5-10% faster on both faces, and the async
          face's first calls with a beat over 3 ms late went from 28 to 14 of 48.
        * Device copies pin their buffers first, and a page-lock (``cudaHostRegister``) of
          fresh memory holds the process's address space for as long as it runs: the walk's
          next ``mmap`` waited for it, which held an event loop 6-9 ms per 16 MiB buffer
          (H200, first call over 1 GiB from the device, ``benchmarks/gpu_lag_probe.py``).

        A replay, a walk into cached buffers and a streaming call keep cutting batches as they
        go: there the overlap pays.
        """
        plan = self.plan
        if not plan.walking or plan.new_buffers == 0 or plan.track_leaves:
            return False
        return not plan.tail or any(device.type != "cpu" for device in plan.copies.devices)

    def start(self, pending: T) -> None:
        self.pending.append(pending)
        if pending.batch.device.type != "cpu":
            self.pending_bytes += pending.batch.nbytes

    def reap(self) -> None:
        """Retire the batches that completed, in order; raises a copy's error."""
        pending = self.pending
        while pending and pending[0].done():
            done = pending.popleft()
            if done.batch.device.type != "cpu":
                self.pending_bytes -= done.batch.nbytes
            self.landed = max(self.landed, done.batch.end)
            # A pool thread may still hold the finished work item for a moment: drop the
            # batch's tensors now, so the sources die when the caller lets go of them.
            done.batch.clear()

    @property
    def finished(self) -> bool:
        return self.plan.done and not self.pending and self._peek(final=True) is None

    def held_lists(self) -> tuple[list[Any], ...]:
        """What the run holds per tensor (copies, leaves), for a caller that empties it in
        steps before letting go of the run."""
        return (*self.plan.copies.lists(), self.plan.leaves, self._leaves or [])

    def landed_leaves(self) -> list[Leaf]:
        """Tensors whose copies have all landed and that were not handed out yet; at most
        :data:`LEAF_STEP` more than were ordered before, so a caller that got some asks again
        (an empty list: none has landed that was not handed out).

        Found by bisection over the leaves ordered by their last copy, each step of which is
        C code, ordered :data:`LEAF_STEP` at a time: a save's stage_iter over 20,000 small
        tensors sorted them all with a Python key and stepped over every landed one in a
        Python loop, holding the event loop 4-5 ms at once.
        """
        leaves, keys = self._leaves, self._last_copies
        if leaves is None:
            leaves = self._leaves = self.plan.leaves
        start = self._next_leaf
        copies = len(self.plan.copies)
        landed = self.landed if self.landed >= copies or not self.finished else copies
        if len(keys) < len(leaves) and (not keys or keys[-1] < landed):
            more = list(map(_last_copy, itertools.islice(leaves, len(keys), len(keys) + LEAF_STEP)))
            if (keys and more[0] < keys[-1]) or not all(
                map(operator.le, more, itertools.islice(more, 1, None))
            ):
                # A walk issues copies in its own order, so this is rare (a tensor that needs
                # no copy, adopted copies): the rest are sorted at once.
                rest = sorted(itertools.islice(leaves, start, None), key=_last_copy)
                leaves = self._leaves = [*leaves[:start], *rest]
                keys = self._last_copies = list(map(_last_copy, leaves))
            else:
                keys.extend(more)
        stop = bisect.bisect_left(keys, landed, start)
        self._next_leaf = stop
        return leaves[start:stop]


LEAF_STEP = 4096
"""How many more leaves :meth:`Run.landed_leaves` orders per call (about 0.3 ms)."""
_last_copy = operator.itemgetter(2)  # Leaf.last_copy, read in C
