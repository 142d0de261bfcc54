"""The I/O-free base of both stagers: options, cache, streams, and one call in progress.

``Stager`` (async) and ``SyncStager`` (blocking) are thin drivers over :class:`StagerBase`: they
share the plan, the cache and the batching, and differ only in how they wait. A :class:`Run` is
one ``stage()`` call: the walk that builds its plan, the batches cut from the copies found so
far, the work in flight, and how far the copies have landed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import time
from collections import deque
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch

from ._bridge import EventBridge
from ._cache import BufferCache, CacheInfo
from ._engine import MAX_BATCH_COPIES, Batch, CudaStreams, make_batches
from ._errors import StagerClosedError, StagingError
from ._options import ResolvedOptions, StagingOptions, cuda_available, make_options
from ._plan import Leaf, Plan, build_plan


class StageStats(NamedTuple):
    """Figures of one completed stage() call."""

    tensors: int
    """Tensors reached from the containers (a tensor at two paths counts twice)."""
    storages: int
    """Distinct source storages copied (shared storages are copied once)."""
    nbytes: int
    """Bytes copied."""
    new_nbytes: int
    """Bytes of host buffers allocated by this call; 0 when every buffer came from the cache."""
    seconds: float
    """Wall time of the call."""

    @property
    def reused_fraction(self) -> float:
        """Share of the copied bytes that went into cached buffers."""
        return 1.0 - self.new_nbytes / self.nbytes if self.nbytes else 1.0

    @property
    def gb_per_s(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


class Pending:
    """A batch in flight: a worker-thread future, a device event, or both (future yields event)."""

    __slots__ = ("batch", "event", "future")

    def __init__(
        self,
        batch: Batch,
        future: concurrent.futures.Future[Any] | None = None,
        event: Any = None,
    ) -> None:
        self.batch = batch
        self.future = future
        self.event = event

    def done(self) -> bool:
        if self.future is not None:
            if not self.future.done():
                return False
            self._take_event()
        return self.event is None or bool(self.event.query())

    def _take_event(self) -> None:
        future, self.future = self.future, None
        if future is not None and not future.cancelled():
            self.event = future.result()  # re-raises a copy error from the worker

    async def wait(self, bridge: EventBridge) -> None:
        if self.future is not None:
            if not self.future.done():
                # Shielded: cancelling the caller must not cancel a batch still queued in the
                # pool, or the next call could not tell whether its bytes were ever copied.
                await asyncio.shield(asyncio.wrap_future(self.future))
            self._take_event()
        if self.event is not None:
            await bridge.wait(self.event, self.batch.device)
            self.event = None

    def wait_blocking(self) -> None:
        if self.future is not None:
            concurrent.futures.wait([self.future])
            self._take_event()
        if self.event is not None:
            self.event.synchronize()
            self.event = None


class Run:
    """One stage() call in progress: its walk, the batches cut from it, the work in flight."""

    def __init__(self, base: StagerBase, state_dict: Any, *, track_leaves: bool) -> None:
        self.plan = Plan(track_leaves=track_leaves)
        self.walk = build_plan(base.cache, state_dict, self.plan)
        self.started = time.perf_counter()
        self.pending: deque[Pending] = deque()
        self.pending_bytes = 0
        self.landed = 0  # copies [0, landed) have landed in their host buffers
        self.devices: set[torch.device] = set()  # CUDA devices ordered after their producer
        self._chunk = base.resolved.chunk_bytes
        self._max_inflight = base.resolved.max_inflight_bytes
        self._cut = 0  # copies [0, _cut) have been handed to make_batches
        self._scanned = 0  # copies [0, _scanned) are counted in nbytes
        self._uncut_bytes = 0
        self._batches: Iterator[Batch] = iter(())  # cut lazily: a few at a time per turn
        self._next: Batch | None = None
        self.nbytes = 0
        """Bytes of the copies found so far (all of them once the walk is done)."""
        self._leaves: list[Leaf] | None = None
        self._next_leaf = 0

    def next_batch(self, final: bool) -> Batch | None:
        """The next batch to start, if the in-flight budget has room for it.

        While the walk still runs (``final`` false) copies are only cut into batches once a
        full batch has gathered, so the walk does not produce a trickle of tiny tasks.
        """
        batch = self._peek(final)
        if batch is None:
            return None
        if self.pending and self.pending_bytes + batch.nbytes > self._max_inflight:
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
        found = len(copies)
        buffers = copies.buffers
        for index in range(self._scanned, found):
            self._uncut_bytes += buffers[index].nbytes
        self._scanned = found
        uncut = found - self._cut
        if uncut and (final or self._uncut_bytes >= self._chunk or uncut >= MAX_BATCH_COPIES):
            self._batches = make_batches(copies, self._cut, found, self._chunk)
            self.nbytes += self._uncut_bytes
            self._cut = found
            self._uncut_bytes = 0

    def start(self, pending: Pending) -> None:
        self.pending.append(pending)
        self.pending_bytes += pending.batch.nbytes

    def reap(self) -> None:
        """Retire the batches that completed, in order; raises a copy's error."""
        pending = self.pending
        while pending and pending[0].done():
            done = pending.popleft()
            self.pending_bytes -= done.batch.nbytes
            self.landed = max(self.landed, done.batch.end)
            # A pool thread may still hold the finished work item for a moment: drop the
            # batch's tensors now, so the sources die when the caller lets go of them.
            done.batch.clear()

    @property
    def finished(self) -> bool:
        return self.plan.done and not self.pending and self._peek(final=True) is None

    def landed_leaves(self) -> list[Leaf]:
        """Tensors whose copies have all landed and that were not handed out yet."""
        if self._leaves is None:
            self._leaves = sorted(self.plan.leaves, key=_last_copy)
        start = self._next_leaf
        stop = start
        leaves = self._leaves
        landed = self.landed if not self.finished else len(self.plan.copies)
        while stop < len(leaves) and leaves[stop].last_copy < landed:
            stop += 1
        self._next_leaf = stop
        return leaves[start:stop]


def _last_copy(leaf: Leaf) -> int:
    return leaf.last_copy


_NO_COPIES = Batch(torch.device("cpu"), srcs=[], dsts=[], buffers=[], nbytes=0, end=0)


@contextlib.contextmanager
def gc_paused(enabled: bool = True) -> Iterator[None]:
    """Pause CPython's cyclic garbage collector while the walk runs (``pause_gc`` option).

    The walk allocates a few objects per tensor (the staged result); with tens of thousands of
    tensors alive, those allocations set off collections over the whole heap, which doubled the
    time of a cached call and stalled an event loop for 0.2-0.4 s. The walk leaves no garbage
    cycles behind. On the way out, what the call allocated is filed straight into the oldest
    generation (``gc.freeze()`` then ``gc.unfreeze()`` moves every tracked object there without
    traversing any): otherwise the first collection after the call would traverse it all at
    once, a 20-30 ms stall with 50,000 tensors. Acyclic objects, the staged result among them,
    are still freed by reference counting the moment they are dropped.
    """
    if not enabled or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        if gc.get_freeze_count() == 0:  # never unfreeze objects the application froze
            gc.freeze()
            gc.unfreeze()
        gc.enable()


class StagerBase:
    """What both drivers share; holds no thread, loop or stream until staging needs one."""

    def __init__(self, options: StagingOptions) -> None:
        self.options = options
        self.resolved: ResolvedOptions = options.resolve()
        self.cache = BufferCache(
            pin_memory=self.resolved.pin_memory,
            share_memory=self.resolved.share_memory,
            pin_memory_min_bytes=self.resolved.pin_memory_min_bytes,
        )
        self.cuda = CudaStreams(self.resolved.non_blocking) if cuda_available() else None
        self.closed = False
        self.staging = False
        self.outstanding: list[Pending] = []  # work left in flight by a failed or cancelled call
        self.last_stats: StageStats | None = None

    def cache_info(self) -> CacheInfo:
        """How many host buffers the cache holds, and how many bytes (pinned and in all)."""
        return self.cache.info()

    def clear_cache(self) -> None:
        """Release every cached host buffer; the next call allocates afresh."""
        if self.staging:
            raise StagingError("clear_cache() cannot run while a stage() call is in progress")
        self.cache.clear()

    def before_batch(self, run: Run, batch: Batch) -> None:
        """Order a CUDA device's staging stream after its producer, once per call and device.

        Runs in the caller's thread, where the producer's current stream is the right one.
        """
        device = batch.device
        if device.type == "cuda" and device not in run.devices:
            assert self.cuda is not None
            self.cuda.follow_producer(device)
            run.devices.add(device)

    def hold_buffers(self, future: concurrent.futures.Future[None]) -> None:
        """Make the next call wait for ``future`` before it touches the buffers.

        For a reader of staged tensors (a checkpoint writer) that must not see them overwritten:
        the hold joins the work that a failed or cancelled call left in flight, which every
        call (and ``aclose``) drains under the stager's lock before it starts.
        """
        self.outstanding.append(Pending(_NO_COPIES, future))

    def check_open(self) -> None:
        if self.closed:
            raise StagerClosedError(f"this {type(self).__name__} is closed")

    def finish(self, run: Run) -> StageStats:
        plan = run.plan
        stats = StageStats(
            tensors=plan.tensors,
            storages=len(plan.copies),
            nbytes=run.nbytes,
            new_nbytes=plan.new_nbytes,
            seconds=time.perf_counter() - run.started,
        )
        self.last_stats = stats
        return stats


class StagerFace:
    """What both stagers show besides staging: their options, figures and cache.

    ``Stager`` and ``SyncStager`` derive from it and add only how they drive a call.
    """

    def __init__(self, options: StagingOptions | None = None, **overrides: Any) -> None:
        self._base = StagerBase(make_options(options, overrides))

    @property
    def options(self) -> StagingOptions:
        return self._base.options

    @property
    def last_stats(self) -> StageStats | None:
        """Figures of the last completed call, or None before the first one."""
        return self._base.last_stats

    def cache_info(self) -> CacheInfo:
        """How many host buffers the cache holds, and how many bytes (pinned and in all)."""
        return self._base.cache_info()

    def clear_cache(self) -> None:
        """Release every cached host buffer; refused while a call is in progress."""
        self._base.clear_cache()
