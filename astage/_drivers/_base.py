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
from collections.abc import Iterator
from typing import Any

import torch

from .._core._batches import Batch
from .._core._cache import BufferCache, CacheInfo
from .._core._run import Run
from .._core._stats import StageStats
from .._devices._cuda import CudaStreams
from .._errors import StagerClosedError, StagingError
from .._options import ResolvedOptions, StagingOptions, cuda_available, make_options
from ._bridge import EventBridge


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

    def new_run(self, state_dict: Any, *, track_leaves: bool) -> Run[Pending]:
        return Run(
            self.cache,
            state_dict,
            track_leaves=track_leaves,
            chunk_bytes=self.resolved.chunk_bytes,
            max_inflight_bytes=self.resolved.max_inflight_bytes,
        )

    def before_batch(self, run: Run[Pending], batch: Batch) -> None:
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

    def finish(self, run: Run[Pending]) -> StageStats:
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
