"""The base of both stagers: options, cache, streams, holds, and the lifecycle of a call.

``Stager`` (async) and ``SyncStager`` (blocking) derive from :class:`StagerBase`, the way
httpx's ``AsyncClient`` and ``Client`` share ``BaseClient``: the base owns everything that is
not waiting (the options, the buffer cache, the CUDA streams, the buffer holds, the checks
before a call, a call's run and its figures, and what closing releases); each face only says
how it waits (awaiting with anyio, or blocking the calling thread).

A call never leaves work behind: both faces return or raise only once every copy they started
has landed, so what a failed or cancelled call leaves is buffers with stale bytes, which the
next call overwrites, and nothing in flight.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from .._core._batches import Batch
from .._core._cache import BufferCache, CacheInfo
from .._core._run import Run
from .._core._stats import StageStats
from .._devices._cuda import CudaStreams
from .._errors import BusyError, StagerClosedError
from .._options import StagingOptions, cuda_available, make_options
from ._holds import BufferHold, HoldRegistry


class StagerBase:
    """What both stagers share; holds no thread, loop or stream until staging needs one."""

    def __init__(self, options: StagingOptions | None = None, **overrides: Any) -> None:
        self._options = make_options(options, overrides)
        self._resolved = self._options.resolve()
        self._cache = BufferCache(
            pin_memory=self._resolved.pin_memory,
            share_memory=self._resolved.share_memory,
            pin_memory_min_bytes=self._resolved.pin_memory_min_bytes,
        )
        self._cuda = CudaStreams(self._resolved.non_blocking) if cuda_available() else None
        self._holds = HoldRegistry()
        self._closed = False
        self._last_stats: StageStats | None = None
        # Who is inside or waiting for a call: the face's key for its caller (the async face:
        # the thread running the event loop), and how many callers. Another key while calls
        # are in progress is refused at once (BusyError) rather than left to wait on a lock
        # of another event loop forever.
        self._occupancy = threading.Lock()
        self._occupant: object = None
        self._callers = 0

    # -- what both faces show --------------------------------------------------------------

    @property
    def options(self) -> StagingOptions:
        """The options this stager was built with (overrides applied)."""
        return self._options

    @property
    def last_stats(self) -> StageStats | None:
        """Figures of the last completed call, or None before the first one."""
        return self._last_stats

    @property
    def closed(self) -> bool:
        """Whether the stager was closed; a closed stager refuses to stage."""
        return self._closed

    def cache_info(self) -> CacheInfo:
        """How many host buffers the cache holds, and how many bytes (pinned and in all)."""
        return self._cache.info()

    def clear_cache(self) -> None:
        """Release every cached host buffer; the next call allocates afresh.

        Refused (:class:`~astage.BusyError`) while a call is in progress. Staged tensors
        already handed out stay valid: they keep their own buffers alive.
        """
        with self._occupancy:
            if self._callers:
                raise BusyError(
                    f"clear_cache() cannot run while a call on this {type(self).__name__} "
                    "is in progress"
                )
            self._cache.clear()

    def hold_buffers(self) -> BufferHold:
        """Keep the staged tensors from being overwritten until the hold is released.

        The next call, ``close()`` and ``aclose()`` wait, before they touch the buffers, until
        every hold is released. For a reader that streams staged tensors somewhere (a
        checkpoint writer) while the caller goes on. ``release()`` may be called from any
        thread; the hold is also a context manager.
        """
        return self._holds.take()

    # -- the lifecycle of a call, for the faces --------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StagerClosedError(f"this {type(self).__name__} is closed")

    def _enter(self, occupant: object) -> bool:
        """Count a caller in (True: the first one); refuse one that cannot share the stager."""
        with self._occupancy:
            if self._callers and self._occupant != occupant:
                raise BusyError(
                    f"this {type(self).__name__} is in use by another thread's event loop; "
                    "calls on one Stager must come from one event loop (use one stager each)"
                )
            self._occupant = occupant
            self._callers += 1
            return self._callers == 1

    def _leave(self) -> None:
        with self._occupancy:
            self._callers -= 1
            if not self._callers:
                self._occupant = None

    def _new_run(self, state_dict: Any, *, track_leaves: bool) -> Run[Any]:
        return Run(
            self._cache,
            state_dict,
            track_leaves=track_leaves,
            chunk_bytes=self._resolved.chunk_bytes,
            max_inflight_bytes=self._resolved.max_inflight_bytes,
        )

    def _before_batch(self, run: Run[Any], batch: Batch) -> None:
        """Order a CUDA device's staging stream after its producer, once per call and device.

        Runs in the caller's thread, where the producer's current stream is the right one.
        """
        device = batch.device
        if device.type == "cuda" and device not in run.devices:
            assert self._cuda is not None
            self._cuda.follow_producer(device)
            run.devices.add(device)

    def _finish(self, run: Run[Any]) -> StageStats:
        plan = run.plan
        stats = StageStats(
            tensors=plan.tensors,
            storages=len(plan.copies),
            nbytes=run.nbytes,
            new_nbytes=plan.new_nbytes,
            seconds=time.perf_counter() - run.started,
        )
        self._last_stats = stats
        return stats

    def _release_everything(self) -> None:
        """The end of close: the caller waited for calls, holds and streams first."""
        self._closed = True
        self._cache.clear()
