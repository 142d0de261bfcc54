"""SyncStager: the blocking face of the staging core, for code that is not async.

It runs the same walk, cache and batches as :class:`~astage.Stager`, in the calling thread:
host copies inline, device copies enqueued on the staging streams (after the producer marks
taken at the call, in the caller's thread) and waited for with ``synchronize()``.
It needs no event loop and starts no thread, so it works anywhere,
including legacy code called from inside a running loop (where it blocks that loop, as any
blocking call would).
"""

from __future__ import annotations

import threading
from types import TracebackType
from typing import Any

from .._core._batches import Batch
from .._core._run import Run
from .._devices._backend import Completion
from .._devices._host import run_host_batch
from .._options import StagingOptions
from ._base import CallOrder, StagerBase
from ._gc import gc_paused

_ANY_THREAD = "sync"  # the blocking face serializes threads on its lock: none is ever busy


class _Enqueued:
    """Device copies on a staging stream; ``done()`` polls their completion."""

    __slots__ = ("batch", "event")

    def __init__(self, batch: Batch, event: Completion) -> None:
        self.batch = batch
        self.event = event

    def done(self) -> bool:
        return bool(self.event.query())


class SyncStager(StagerBase):
    """Stages state dicts into reusable host buffers, blocking until the copies are done.

    Thread-safe: calls from several threads run one after the other (each waits for the one
    in progress), so one stager may serve a pool of threads.
    """

    def __init__(self, options: StagingOptions | None = None, **overrides: Any) -> None:
        super().__init__(options, **overrides)
        self._lock = threading.Lock()

    def stage(self, state_dict: Any, *, after: object = None) -> Any:
        """A copy of ``state_dict`` whose tensors all live in host buffers of this stager.

        Device copies are ordered after everything queued, before this call, on the calling
        thread's current stream of each device the state dict touches, and after ``after``
        (a stream or event, or a list of them). Refused with :class:`~astage.UsageError`
        while one of those streams is capturing a graph, and in a forked child.
        """
        self._check_open()
        self._enter(_ANY_THREAD)
        try:
            with self._lock:
                self._check_open()
                self._holds.wait()
                # Taken once the lock is ours: a call that waited for another one is ordered
                # after what its caller queued meanwhile too (the thread is the same).
                order = self._start_order(after)
                run: Run[_Enqueued] = self._new_run(state_dict, track_leaves=False)
                try:
                    self._copy_all(run, order)
                finally:
                    # Whatever happened, no copy this call enqueued lands after it returned.
                    for enqueued in run.pending:
                        enqueued.event.synchronize()
                self._finish(run)
                return run.plan.result
        finally:
            self._leave()

    def _copy_all(self, run: Run[_Enqueued], order: CallOrder) -> None:
        with gc_paused(self._resolved.pause_gc):
            for _ in run.walk:
                pass
        while True:
            batch = run.next_batch(final=True)
            if batch is None:
                if not run.pending:
                    return
                run.pending[0].event.synchronize()
                run.reap()
                continue
            backend = self._backend_for_batch(order, batch)
            if backend is None:
                run_host_batch(batch)
            else:
                marks = order.marks_for(batch.device)
                done = backend.enqueue(batch, marks, non_blocking=self._resolved.non_blocking)
                run.start(_Enqueued(batch, done))

    def close(self) -> None:
        """Wait for a call in progress and for buffer holds, then release buffers and streams."""
        with self._lock:
            if self._closed:
                return
            if not self._forked:
                self._holds.wait()
                self._synchronize_devices()
            self._release_everything()

    def __enter__(self) -> SyncStager:
        self._check_open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
