"""Stager: the asyncio driver of the staging core.

The walk runs on the event loop in slices of at most ``max_loop_hold_s``; copies run in worker
threads (host sources: ``torch`` drops the GIL while it copies) or on CUDA staging streams whose
completion events are awaited through the :class:`~astage._bridge.EventBridge`. Copying starts
while the walk is still running, and at most ``max_inflight_bytes`` are in flight at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any

import torch

from .._core._batches import Batch
from .._core._run import Run
from .._devices._host import run_host_batch
from .._errors import StagingError
from .._options import StagingOptions
from .._paths import Path
from ._base import Pending, StagerFace, gc_paused
from ._bridge import EventBridge


class Stager(StagerFace):
    """Stages state dicts into reusable host buffers without blocking the event loop.

    ``Stager(options, **overrides)``: keyword arguments override fields of ``options``.
    Concurrent calls on one stager run one after the other. Use it as ``async with``, or call
    :meth:`aclose` when done.
    """

    def __init__(self, options: StagingOptions | None = None, **overrides: Any) -> None:
        super().__init__(options, **overrides)
        self._lock = asyncio.Lock()
        self._bridge = EventBridge()
        self._executor: ThreadPoolExecutor | None = None
        self._owner: asyncio.Task[Any] | None = None  # the task inside a call, to refuse re-entry

    async def stage(self, state_dict: Any) -> Any:
        """A copy of ``state_dict`` whose tensors all live in host buffers of this stager.

        The buffers are reused by the next call on this stager, which overwrites them.
        """
        async with contextlib.aclosing(self._drive(state_dict, with_leaves=False)) as steps:
            async for result in steps:
                return result
        raise AssertionError("unreachable: _drive yields the result or raises")

    async def stage_iter(self, state_dict: Any) -> AsyncIterator[tuple[Path, torch.Tensor]]:
        """Yield ``(path, staged_tensor)`` for every tensor, each as soon as its bytes landed.

        Nothing is yielded before the whole state dict has been walked, so an object that
        cannot be staged raises before any tensor is handed out.
        """
        async for leaves in self._drive(state_dict, with_leaves=True):
            for leaf in leaves:
                yield leaf.path, leaf.tensor

    async def _drive(self, state_dict: Any, *, with_leaves: bool) -> AsyncGenerator[Any, None]:
        """Run one call; yield lists of landed leaves (``with_leaves``) or, once, the result."""
        base = self._base
        if self._owner is not None and self._owner is asyncio.current_task():
            # An abandoned stage_iter() of this task is closed by the loop's async-generator
            # finalizer within a few iterations; one still being iterated never will be.
            for _ in range(4):
                await asyncio.sleep(0)
        if self._owner is not None and self._owner is asyncio.current_task():
            raise StagingError(
                "this task is still iterating stage_iter() on this stager; finish or close "
                "that iteration (or use a second stager) before staging again"
            )
        async with self._lock:
            self._owner = asyncio.current_task()
            base.check_open()
            await self._drain_outstanding()
            base.staging = True
            run = base.new_run(state_dict, track_leaves=with_leaves)
            try:
                hold = base.resolved.max_loop_hold_s
                walk = run.walk
                # Paused for the whole walk, awaits included: resumed between slices, the
                # collector ran hundreds of times per call and promoted the call's objects
                # into the old generations, whose full collections stalled the loop 0.2-0.4 s.
                with gc_paused(base.resolved.pause_gc):
                    while True:
                        deadline = time.perf_counter() + hold
                        for _ in walk:
                            if time.perf_counter() >= deadline:
                                break
                        else:
                            break
                        self._dispatch(run, final=False)
                        await _yield_to_due_timers()
                while not run.finished:
                    self._dispatch(run, final=True)
                    if run.pending:
                        await run.pending[0].wait(self._bridge)
                        run.reap()
                    else:  # the turn ended before a batch could start: let the loop run
                        await _yield_to_due_timers()
                    if with_leaves:
                        leaves = run.landed_leaves()
                        if leaves:
                            yield leaves
                if with_leaves:
                    leaves = run.landed_leaves()
                    if leaves:
                        yield leaves
                base.finish(run)
                result = run.plan.result
            except BaseException:
                base.outstanding.extend(run.pending)
                raise
            finally:
                base.staging = False
                self._owner = None
        if not with_leaves:
            yield result  # outside the lock: the next call need not wait for this generator

    def _dispatch(self, run: Run[Pending], *, final: bool) -> None:
        """Retire finished batches and start new ones while the in-flight budget allows.

        Cutting and starting batches is loop time too: a turn stops after ``max_loop_hold_s``
        (having started at least one batch) and the rest waits for the next turn.
        """
        run.reap()
        deadline = time.perf_counter() + self._base.resolved.max_loop_hold_s
        while True:
            batch = run.next_batch(final)
            if batch is None:
                return
            run.start(self._start(run, batch))
            if time.perf_counter() >= deadline:
                return

    def _start(self, run: Run[Pending], batch: Batch) -> Pending:
        base = self._base
        base.before_batch(run, batch)
        executor = self._executor
        if executor is None:
            executor = self._executor = ThreadPoolExecutor(
                base.resolved.copy_threads,
                thread_name_prefix="astage-copy",
            )
        if batch.device.type == "cuda":
            assert base.cuda is not None
            return Pending(batch, executor.submit(base.cuda.enqueue, batch))
        return Pending(batch, executor.submit(run_host_batch, batch))

    async def _drain_outstanding(self) -> None:
        """Wait for copies that a cancelled or failed call left in flight into our buffers."""
        outstanding = self._base.outstanding
        while outstanding:
            try:
                await outstanding[0].wait(self._bridge)
            except asyncio.CancelledError:
                raise
            except BaseException:  # noqa: BLE001 - that call already reported its error
                pass
            outstanding.pop(0)

    async def aclose(self) -> None:
        """Wait for the call in progress, then release every buffer, thread and stream."""
        if self._base.closed:
            return
        async with self._lock:
            if self._base.closed:
                return
            await self._drain_outstanding()
            self._base.closed = True
            if self._base.cuda is not None:
                await asyncio.to_thread(self._base.cuda.synchronize)
            self._base.cache.clear()
            self._bridge.close()
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    async def __aenter__(self) -> Stager:
        self._base.check_open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


async def _yield_to_due_timers() -> None:
    """Hand the loop back so that timers already due run before this task's next slice.

    ``sleep(0)`` requeues the task ahead of timers that fall due meanwhile, so a due callback
    waits one more slice; a timer of our own (``sleep`` with a tiny delay) is ordered by its
    deadline, after theirs.
    """
    await asyncio.sleep(1e-6)
