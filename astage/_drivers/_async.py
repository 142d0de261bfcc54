"""Stager: the async face of the staging core, on anyio (asyncio, asyncio with uvloop, trio).

The walk runs on the event loop in slices of at most ``max_loop_hold_s``; copies run in anyio
worker threads (host sources: ``torch`` drops the GIL while it copies; at most ``copy_threads``
at once, each taking the call's host batches one after another, see :class:`_HostLane`) or on
device staging streams (enqueued from a worker thread, after the producer marks) whose
completions are awaited with :func:`~astage._drivers._events.wait_for_event`.

``stage()`` and ``stage_iter()`` are plain methods that take the call's producer marks (see
:class:`~astage._drivers._base.CallOrder`) in the thread that calls them, and return the
awaitable or the async context manager: so ``run_coroutine_threadsafe(stager.stage(sd), loop)``
from a training thread marks the training thread's streams, not the loop thread's.

Copying starts while the walk is still running, and at most ``max_inflight_bytes`` of device
copies are in flight at once (host batches queue for the workers whatever their bytes).

Each call owns its copies: they are tasks of the call's task group, so a call returns or
raises, cancelled or not, only once every copy it started has landed, and nothing writes into
the buffers afterwards.
"""

from __future__ import annotations

import asyncio
import importlib
import math
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Iterator
from functools import partial
from types import TracebackType
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import torch

from .._core._batches import MAX_BATCH_COPIES, Batch
from .._core._cache import BufferCache
from .._core._plan import Leaf, Plan
from .._core._run import Run
from .._core._tables import empty_in_steps
from .._devices import _pinning
from .._devices._backend import DeviceBackend, DeviceCopies, enqueue_batch
from .._devices._host import copy_host_piece, reserve_batch, run_host_batch
from .._errors import StagingError, UsageError
from .._options import StagingOptions
from .._paths import Path
from .._torch import staging_defaults
from ._base import (
    CallOrder,
    Reservation,
    ReserveProgress,
    ReserveWork,
    StagerBase,
    check_progress,
)
from ._events import DeviceLimiters, wait_for_event
from ._gc import gc_paused
from ._leases import Lease
from ._sets import BufferSet
from ._slices import in_copy_slice
from ._snapshots import Snapshot


def _import_loop_backends() -> None:
    """Import anyio's backend modules of the event loops this program has imported.

    anyio imports a loop's backend module on its first use, on that loop: 0.1-0.2 s of the
    first ``stage()`` would hold the loop (the demo's first call showed it). Importing them with
    astage costs the same once, while no loop waits. asyncio's always (most programs run it).
    """
    for name in ("asyncio", "trio"):
        if name == "asyncio" or name in sys.modules:
            importlib.import_module(f"anyio._backends._{name}")


_import_loop_backends()


class Stager(StagerBase):
    """Stages state dicts into reusable host buffers without blocking the event loop.

    ``Stager(options, **overrides)``: keyword arguments override fields of ``options``.
    Runs on asyncio, asyncio with uvloop, and trio. Concurrent calls from one event loop run
    one after the other; a call from a second thread's event loop while the first one's calls
    are in progress raises :class:`~astage.BusyError`. Use it as ``async with``, or call
    :meth:`aclose` when done.
    """

    def __init__(self, options: StagingOptions | None = None, **overrides: Any) -> None:
        super().__init__(options, **overrides)
        # Made anew by the first caller of a turn, inside its event loop: anyio primitives
        # belong to the loop (and backend) that made them.
        self._lock: anyio.Lock | None = None
        self._lock_holder: int | None = None  # anyio task id of the task inside a call

    def stage(self, state_dict: Any, *, after: object = None) -> Coroutine[Any, Any, Any]:
        """A copy of ``state_dict`` whose tensors all live in host buffers of this stager.

        Use as ``await stager.stage(state_dict)``. Nothing protects the result: a later call
        that stages into the same buffer set overwrites it (with ``buffers=1``, the next call).
        Use :meth:`snapshot` to hold it. The call stages into a buffer set that no snapshot or
        hold leases, waiting (cancellably, off the loop) while every set is leased.

        Ordering: device copies come after everything queued, before ``stage()`` was called,
        on the calling thread's current stream of the device it has selected and of every
        device this stager staged from before (marked when ``stage()`` is called, in the
        calling thread, even when the coroutine is run by another thread's loop), and after
        ``after`` (a stream or event, or a list of them: for a device first met by this call
        when the call is scheduled from another thread). A device first met by the walk is
        marked when met, on the event loop thread's current stream. Refused with
        :class:`~astage.UsageError` while one of those streams is capturing a graph, and in
        a forked child.
        """
        call = _Call(self, state_dict, track_leaves=False, after=after, what="stage()")
        return self._stage(call)

    async def _stage(self, call: _Call) -> Any:
        async with call:
            await call.run_to_end()
        return call.result

    def snapshot(self, state_dict: Any, *, after: object = None) -> _SnapshotCall:
        """Stage ``state_dict`` like :meth:`stage` and lease its buffers until released.

        No later call stages into the snapshot's buffer set until ``release()``: with
        ``buffers=1`` the next call waits (off the loop, cancellably), with ``buffers=N`` it
        stages into another free set (host memory: up to N x the staged bytes). An async
        context manager that releases on exit, or an awaitable for a consumer that releases
        later (a writer thread; another process through torch.multiprocessing when
        ``share_memory=True``)::

            async with stager.snapshot(model.state_dict()) as snap:
                await anyio.to_thread.run_sync(torch.save, snap.state_dict, path)

            snap = await stager.snapshot(model.state_dict())
            queue.put(snap)  # the writer calls snap.release() when done

        Ordered like :meth:`stage` (marks taken when called).
        """
        return _SnapshotCall(
            _Call(self, state_dict, track_leaves=False, after=after, what="snapshot()")
        )

    def stage_iter(self, state_dict: Any, *, after: object = None) -> _StageIter:
        """Stage ``state_dict`` and hand out each tensor as soon as its bytes have landed.

        An async context manager, like httpx's ``stream()``::

            async with stager.stage_iter(state_dict) as landed:
                async for path, tensor in landed:
                    ...

        The stager is busy until the block exits, also when the iteration was abandoned
        midway (the copies still in flight land first). Nothing is yielded before the whole
        state dict has been walked, so an object that cannot be staged raises before any
        tensor is handed out. Ordered like :meth:`stage` (marks taken when called).
        """
        return _StageIter(self, state_dict, after)

    async def reserve(
        self, state_dict: Any, *, progress: ReserveProgress | None = None
    ) -> Reservation:
        """Allocate, touch and (with an accelerator) pin every host buffer ``state_dict`` needs.

        Await it once before the first checkpoint (at startup, while the data loader warms
        up): the first ``stage()`` then allocates nothing (``last_stats.new_nbytes == 0``) and
        runs at the speed of a cached call, and its structure is already recorded for replay.
        The state dict's bytes are not copied: new buffers are written with zeros in worker
        threads, so that the kernel maps their pages now. With ``buffers=N`` every set is
        reserved: N x the bytes, and N x the time. Buffers a call staged into are left as they
        are (a snapshot may be reading them), so awaiting it again costs one walk and commits
        nothing, or only what an earlier reserve() cut short left untouched.

        The walk runs on the loop in slices of ``max_loop_hold_s``, like a call's; the touching
        and pinning run in worker threads. ``progress``, if given, is called on the loop with
        (bytes committed so far, bytes to commit). Cancellable: a cancelled reserve() leaves
        the buffers it allocated in the cache, maybe untouched, for the next reserve() to
        touch or the first call to fill.
        Takes the stager's turn like a call. Returns the figures of what it committed.
        """
        check_progress(progress)
        self._check_open()
        async with self._turn("reserve()"):
            self._check_open()
            await self._decide_huge_pages()
            work = ReserveWork(self, state_dict)
            hold = self._resolved.max_loop_hold_s
            with gc_paused(self._resolved.pause_gc), work.allocating():
                for run, _ in work.runs:
                    while not _walk_for(run.walk, hold):
                        await _yield_to_due_timers()
            limiter = anyio.CapacityLimiter(1)  # one batch at a time: torch spreads a fill
            for batch, first_serial, pin in work.batches():
                touched = await anyio.to_thread.run_sync(
                    partial(in_copy_slice, reserve_batch, batch, first_serial, pin_buffers=pin),
                    limiter=limiter,
                )
                work.landed(batch, touched, progress)
            return work.result(self)

    async def aclose(self) -> None:
        """Wait for calls in progress and every lease (snapshots, holds), then release every
        buffer and stream.

        Cancel-safe: cancelled while it waits, the stager stays open and usable, and a second
        ``aclose()`` finishes the job.
        """
        if self._closed:
            return
        if self._forked:
            # In a forked child the turn may have been copied taken, by a call of the parent's
            # loop (BusyError here) or its lock held: the parent's calls never end in the child.
            # Nothing of the parent's is touched in the child anyway (see _release_everything).
            self._release_everything()
            return
        async with self._turn("aclose()"):
            if self._closed:
                return
            await self._sets.board.wait_for_async(self._sets.all_released)
            await anyio.to_thread.run_sync(self._synchronize_devices)
            with anyio.CancelScope(shield=True):  # closed from here on: finish the job
                # In a worker thread: dropping every buffer, and the recordings with them,
                # held the loop 50-70 ms over 20,000 buffers (found by the first-use hunt).
                await anyio.to_thread.run_sync(self._release_everything)
                # The buffers just let go of are unpinned now, in a worker thread (never on
                # the loop): their copies have all landed.
                await anyio.to_thread.run_sync(_pinning.unpin_released)

    async def __aenter__(self) -> Stager:
        self._check_open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _decide_huge_pages(self) -> None:
        """With ``huge_pages=None``, run the probe (first call only) in a worker thread: at the
        walk's first large buffer it held the event loop 10-150 ms."""
        for buffer_set in self._sets:
            if buffer_set.cache.huge_pages_undecided:
                await anyio.to_thread.run_sync(buffer_set.cache.decide_huge_pages)

    # -- one caller at a time --------------------------------------------------------------

    def _turn(self, what: str = "a call") -> _Turn:
        return _Turn(self, what)


class _Turn:
    """The stager's lock for one caller, with the busy and re-entry checks around it."""

    def __init__(self, stager: Stager, what: str = "a call") -> None:
        self._stager = stager
        self._what = what  # the call, for the re-entry error

    async def __aenter__(self) -> None:
        stager = self._stager
        task = anyio.get_current_task().id
        if stager._lock_holder == task:
            raise UsageError(
                f"{self._what} on this {type(stager).__name__} from inside this task's own "
                "stage_iter() block would wait for the block to end, forever; leave the "
                "block first (or use a second stager)"
            )
        if stager._enter(threading.get_ident()) or stager._lock is None:
            stager._lock = anyio.Lock()  # a new turn, maybe on another loop than the last one
        try:
            await stager._lock.acquire()
        except BaseException:
            stager._leave()
            raise
        stager._lock_holder = task

    async def __aexit__(self, *exc_info: object) -> None:
        stager = self._stager
        stager._lock_holder = None
        assert stager._lock is not None
        stager._lock.release()
        stager._leave()


class _InFlight:
    """A batch handed to a worker thread or a device; set once its bytes have landed."""

    __slots__ = ("backend", "batch", "error", "finished", "landed", "serial")

    def __init__(self, batch: Batch, backend: DeviceBackend | None, serial: int) -> None:
        self.batch = batch
        self.backend = backend
        self.serial = serial  # the order in which the call started its batches
        self.finished = False
        self.error: Exception | None = None
        self.landed = anyio.Event()

    def done(self) -> bool:
        if self.error is not None:
            raise self.error
        return self.finished


LoopPost = Callable[[Callable[[], object]], object]
"""Runs a function on an event loop soon, called from any thread, without waiting for it."""


def _loop_post() -> LoopPost:
    """The running loop's thread-safe, non-blocking ``call soon`` (trio's or asyncio's)."""
    trio = sys.modules.get("trio")  # imported by whoever runs a trio loop
    if trio is not None:
        try:
            post: LoopPost = trio.lowlevel.current_trio_token().run_sync_soon
        except RuntimeError:  # trio is imported, but this loop is asyncio's
            pass
        else:
            return post
    return asyncio.get_running_loop().call_soon_threadsafe


class _HostLane:
    """A call's host batches, queued for worker threads that copy them back to back.

    Why: a worker-thread call per batch (``to_thread.run_sync``) put two thread wake-ups and
    a loop turn between one batch's end and the next one's start, 0.4-0.6 ms in which no core
    copied: 15 times in a cached call of 1 GiB (64 MiB batches), which took 1.15-1.2x a plain
    copy of the same bytes. A worker here takes the next queued batch as soon as it finished
    one, and tells the loop that batches landed without waiting for the loop.

    It tells the loop only when the queue ran dry (the call may be done, or has more batches
    to cut), and after every batch where a consumer waits for each one (``stage_iter``). Each
    wake-up of the loop meanwhile takes a core from the copy: telling it after each batch, or
    whenever half the in-flight budget was left, made the copying of 1 GiB 3-5% slower on 2
    cores. Host batches are not bounded by that budget (see ``Run.next_batch``), so a cached
    call's queue runs dry only at its end. Finished batches are marked at once (``finished``,
    ``error``): a loop that reaps meanwhile (between walk slices of a first call) sees them
    untold.

    At most ``workers`` (``copy_threads``) run at once; one ends when it finds the queue empty,
    and the next batch queued starts another. A worker also gives way, between two batches, to
    a device batch started before the next queued one and waiting for a thread (host and device
    batches share ``copy_threads``): the device's copy is not held up behind host batches that
    came after it, as it was not when each batch took a thread in turn. :meth:`close` (the
    call's exit) stops them after the batch each is copying, which still lands before the call
    returns; so does a batch that failed (the call raises its error).
    """

    def __init__(self, workers: int, post: LoopPost, *, tell_each: bool) -> None:
        self._lock = threading.Lock()  # all of the below, between the loop and the workers
        self._queue: deque[_InFlight] = deque()
        self._untold: list[_InFlight] = []  # landed, the loop not told yet
        self._max_workers = workers
        self._workers = 0
        self._closed = False
        self._post = post
        self._tell_each = tell_each
        self._device_waiting: set[int] = set()  # serials of device batches waiting for a thread

    def submit(self, inflight: _InFlight) -> bool:
        """Queue a batch (on the loop); True when the caller must start a worker for it."""
        with self._lock:
            self._queue.append(inflight)
            if self._workers < self._max_workers and not self._closed:  # closed: a batch failed
                self._workers += 1
                return True
            return False

    def restart(self) -> bool:
        """After a worker returned (on the loop): True when the caller must start another.

        So it is when the worker gave way to a device batch and batches are still queued; the
        new worker waits for a thread behind that batch.
        """
        with self._lock:
            if self._closed or not self._queue or self._workers >= self._max_workers:
                return False
            self._workers += 1
            return True

    def device_waits(self, serial: int) -> None:
        """A device batch was started (on the loop) and waits for a thread to enqueue it."""
        with self._lock:
            self._device_waiting.add(serial)

    def device_enqueues(self, serial: int) -> None:
        """That device batch got its thread (or was cancelled before it did)."""
        with self._lock:
            self._device_waiting.discard(serial)

    def close(self) -> list[_InFlight]:
        """Let no queued batch start any more (on the loop); returns those that never will."""
        with self._lock:
            self._closed = True
            dropped = list(self._queue)
            self._queue.clear()
            return dropped

    def copying(self) -> bool:
        """Whether a worker was started and has not returned: between its ``foreach`` calls it
        needs the GIL (a read without the lock: a stale answer costs one hand-over)."""
        return self._workers > 0

    def worker_not_started(self) -> list[_InFlight]:
        """A started worker's task ended before its thread ran :meth:`copy_queued` (it was
        cancelled). Returns the queued batches that no worker will copy now, closing the lane:
        the call fails them (see :func:`_cancelled_before_landing`)."""
        with self._lock:
            self._workers -= 1
            if self._workers or self._closed or not self._queue:
                return []
            self._closed = True
            dropped = list(self._queue)
            self._queue.clear()
            return dropped

    def _device_batch_first(self) -> bool:
        """A device batch started before the next queued one waits for a thread (lock held)."""
        waiting = self._device_waiting
        return bool(waiting) and min(waiting) < self._queue[0].serial

    def copy_queued(self) -> list[_InFlight]:
        """In a worker thread: copy queued batches, in order, until none is left, the lane is
        closed, or a device batch comes first.

        Returns the batches that landed and that the loop was not told of: the worker's return
        wakes the loop anyway, which tells them (one wake-up at the end of a call, not two).
        """
        inflight: _InFlight | None = None
        while True:
            with self._lock:
                if inflight is not None:
                    self._untold.append(inflight)
                ending = self._closed or not self._queue or self._device_batch_first()
                tell: list[_InFlight] = []
                if ending or self._tell_each:
                    tell, self._untold = self._untold, []
                if ending:
                    self._workers -= 1
                else:
                    inflight = self._queue.popleft()
            if ending:
                return tell
            if tell:
                self._post(partial(_set_landed, tell))
            assert inflight is not None
            try:
                run_host_batch(inflight.batch)
            except Exception as exc:  # noqa: BLE001 - handed to the call, which raises it
                inflight.error = exc
                # The call fails with it: no queued batch starts any more, and this worker
                # returns now, which tells the loop. Copying on, it told the loop only once
                # the queue ran dry, and the call raised after copying all the rest.
                with self._lock:
                    self._closed = True
            else:
                inflight.finished = True
            # Its tensors dropped here, a batch at a time: left to the loop's reap, which
            # retires all the batches that landed since it last looked, the ~50 batches of a
            # call over 50,000 small tensors held the loop 2 ms at the call's end.
            inflight.batch.clear()


LOOP_LANE_LARGEST_COPY = 256 << 10
"""The largest copy a batch may hold to be copied on the loop's thread (:class:`_LoopLane`):
one such copy into a touched buffer takes ~25 us, a small part of a turn."""

LOOP_LANE_PIECE_S = 2.5e-4
"""How long one piece of the loop lane's copying should take: half of a default turn
(``max_loop_hold_s``), so that a piece and the cutting of a batch fit in one."""

_FIRST_PIECE = 64
"""Copies in the loop lane's first piece, before it has timed any (~50 us of small copies)."""


class _LoopLane:
    """A call's host batches of small copies into buffers it did not allocate, copied on the
    loop's own thread, a piece at a time within its turns.

    Why not in a worker thread (:class:`_HostLane`): between two ``foreach`` calls the worker
    needs the GIL, which the loop's walk holds but for its turns' ends, so the copies waited
    for hand-overs (:func:`_hand_over_gil`) and overlapped the walk only in part; on this
    project's 2 cores a cached call over 50,000 small tensors took 1.15-1.25x the blocking
    face's, which walks and copies on one thread. Copied here, in pieces timed to fit a turn
    (:data:`LOOP_LANE_PIECE_S`, the piece's length adapted to what the last ones took), the
    same call took 0.81-0.87x as long as through the worker, level with the blocking face.

    Only batches whose copies are all small, from the CPU, into buffers the call did not
    allocate: a copy into fresh memory takes its page faults (several times the copy, and
    uneven), which the loop must not wait for; a first call gained nothing from it either
    (585 against 584 ms over 50,000 small tensors). Large copies keep their worker threads,
    which copy them with the GIL let go for their whole length.
    """

    __slots__ = ("_copied", "_piece", "_queue")

    def __init__(self) -> None:
        self._queue: deque[_InFlight] = deque()
        self._copied = 0  # copies of the head batch made so far
        self._piece = _FIRST_PIECE

    def __bool__(self) -> bool:
        return bool(self._queue)

    @staticmethod
    def takes(batch: Batch, plan: Plan, cache: BufferCache) -> bool:
        """Whether ``batch`` is one for the loop's thread to copy (see the class). Buffers a
        ``reserve()`` cut short left untouched are fresh memory too."""
        largest = batch.largest
        return (
            plan.new_buffers == 0
            and not cache.untouched
            and batch.device.type == "cpu"
            and len(batch.srcs) > 1
            and largest is not None
            and largest <= LOOP_LANE_LARGEST_COPY
        )

    def submit(self, inflight: _InFlight) -> None:
        self._queue.append(inflight)

    def copy_for(self, seconds: float) -> None:
        """Copy pieces of the queued batches, at least one, while the next would end within
        ``seconds`` from now (``bool(lane)`` then tells whether any is left)."""
        queue = self._queue
        now = time.perf_counter()
        deadline = now + seconds
        while queue:
            inflight = queue[0]
            batch = inflight.batch
            count = len(batch.srcs)
            start = self._copied
            stop = min(start + self._piece, count)
            try:
                copy_host_piece(batch, start, stop)
            except Exception as exc:  # noqa: BLE001 - handed to the call, which raises it
                inflight.error = exc
                stop = count
            before, now = now, time.perf_counter()
            self._fit(stop - start, now - before)
            if stop < count:
                self._copied = stop
            else:
                queue.popleft()
                self._copied = 0
                inflight.finished = inflight.error is None
                batch.clear()
                inflight.landed.set()
            if 2 * now - before >= deadline:  # now + (now - before): the next piece's end
                break

    def _fit(self, copies: int, seconds: float) -> None:
        """Resize the next pieces toward :data:`LOOP_LANE_PIECE_S` from a full piece's time."""
        if copies < self._piece:
            return  # a batch's last piece, shorter: it tells nothing of a full one
        if seconds < LOOP_LANE_PIECE_S / 2 and self._piece < MAX_BATCH_COPIES:
            self._piece *= 2
        elif seconds > LOOP_LANE_PIECE_S and self._piece > 1:
            self._piece //= 2

    def close(self) -> list[_InFlight]:
        """Drop the batches not copied yet (the call is ending); returns them."""
        dropped = list(self._queue)
        self._queue.clear()
        self._copied = 0
        return dropped


def _cancelled_before_landing(inflight: _InFlight) -> None:
    """Fail a batch whose copy task was cancelled before the batch landed, and let it be reaped.

    Why: the copies are tasks of the call's task group, which the caller's task entered, so a
    scope around the call that is cancelled cancels them too. The caller is then cancelled as
    well, and never reaps this error, unless it shields what it does inside a ``stage_iter()``
    block (to finish a checkpoint it began): that iteration waited for batches nobody would
    copy, forever (a device batch: it spun, its batch set landed but neither done nor failed).
    """
    inflight.error = StagingError(
        "a copy of this call was cancelled before it ran, by a cancel scope around the call; "
        "to finish a stage_iter() block under a cancelled scope, shield the whole "
        "`async with stager.stage_iter(...)` block, not only the iteration inside it"
    )
    inflight.landed.set()


def _born_cancelled() -> bool:
    """Whether the copy task calling it starts inside a scope that is cancelled already.

    Why: on asyncio, anyio delivers a scope's cancellation to its tasks in a loop that ends
    once no unshielded task is left to cancel. A caller that shields a ``stage_iter()``
    iteration under a cancelled scope leaves none, so the loop ends, and copy tasks that
    iteration spawns afterwards waited at their first checkpoint (a limiter) for a
    cancellation nobody would deliver: a spin, forever (anyio 4.16; trio has no such gap).
    Such a task fails its batches instead (:func:`_cancelled_before_landing`).
    """
    return anyio.current_effective_deadline() == -math.inf


def _set_landed(landed: list[_InFlight]) -> None:
    for inflight in landed:
        inflight.landed.set()


class _Call:
    """One call on the async face: the stager's turn, the run, and a task group of copies.

    An async context manager entered and exited by the caller's task. The task group spans
    the caller's block (for ``stage_iter``, the consumer's code), so copies go on while the
    consumer works on the tensors that already landed; on the way out, copies not started are
    cancelled and those started land first.
    """

    def __init__(
        self,
        stager: Stager,
        state_dict: Any,
        *,
        track_leaves: bool,
        after: object,
        what: str = "stage()",
    ) -> None:
        stager._check_open()
        # In the caller's thread, at the call: see Stager.stage.
        self._order: CallOrder = stager._start_order(after)
        self._stager = stager
        self._state_dict = state_dict
        self._track_leaves = track_leaves
        self._turn = _Turn(stager, what)
        self._copies: anyio.abc.TaskGroup | None = None
        self._run: Run[_InFlight] | None = None
        self._first_serial = 0
        """The serial of the first buffer this call may allocate (``HostBuffer.serial``)."""
        self.buffer_set: BufferSet | None = None
        self._walked = False
        self._host_limiter: anyio.CapacityLimiter | None = None
        self._host_lane: _HostLane | None = None
        self._loop_lane = _LoopLane()
        self._started_batches = 0
        self._cut_short = False
        """Whether the last turn of cutting batches ended on its deadline, not for want of one."""
        self._device_limiters = DeviceLimiters()
        self._device_lanes = DeviceLimiters()
        """One token per device: the host work of its batches runs one batch at a time."""
        self.result: Any = None

    async def __aenter__(self) -> _Call:
        stager = self._stager
        await self._turn.__aenter__()
        try:
            stager._check_open()
            buffer_set = await stager._sets.board.wait_for_async(stager._free_set)
            await stager._decide_huge_pages()
            self._first_serial = buffer_set.cache.allocations
            self._run = stager._new_run(
                self._state_dict, buffer_set, track_leaves=self._track_leaves
            )
            # The run has it now, until the call exits. A stage_iter() block's iterator, which
            # its caller keeps bound after the block, would otherwise keep every source alive
            # (device memory too) and their buffers cached.
            self._state_dict = None
            self.buffer_set = buffer_set
            # Per call (calls run one at a time), so that they belong to the caller's loop.
            self._host_limiter = anyio.CapacityLimiter(stager._resolved.copy_threads)
            self._host_lane = _HostLane(
                stager._resolved.copy_threads,
                _loop_post(),
                tell_each=self._track_leaves,
            )
            self._copies = anyio.create_task_group()
            await self._copies.__aenter__()
        except BaseException:
            stager._end_call()
            await self._turn.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._copies is not None and self._host_lane is not None
        try:
            # Queued host batches never start.
            for inflight in (*self._host_lane.close(), *self._loop_lane.close()):
                inflight.landed.set()
            self._copies.cancel_scope.cancel()  # nor do other copies not started yet
            # The caller's exception is not handed to the task group, which would wrap it in
            # an ExceptionGroup; the copies catch their own errors, so exiting the group only
            # waits for the started ones to land.
            await self._copies.__aexit__(None, None, None)
        finally:
            run = self._run
            try:
                if run is not None:  # a failed or cancelled call's (a finished one's: empty)
                    buffers = run.plan.copies.buffers
                    run.cache.written(buffers[: run.landed])
                    # Copies from the first that did not land (some after it may have): those
                    # the call allocated stay fresh memory for the next call to fault in.
                    run.cache.unwritten(buffers[run.landed :], self._first_serial)
                    # A stage_iter block's (or a call cut short): let go of in turns. In one
                    # go, the leaves and copies of 50,000 tensors held the loop 10-13 ms.
                    with anyio.CancelScope(shield=True):
                        await self._empty_in_turns(run.held_lists())
            finally:
                self._run = None
                self._state_dict = None
                self._stager._end_call()
                await self._turn.__aexit__(None, None, None)

    @property
    def run(self) -> Run[_InFlight]:
        if self._run is None:
            raise UsageError("this stage_iter() block has exited; iterate inside the block")
        return self._run

    async def run_to_end(self) -> None:
        """Walk, copy, and wait until every copy has landed; keep the result."""
        while await self.step():
            pass
        self.result = self.run.plan.result
        await self._release_copies()

    async def _release_copies(self) -> None:
        """Let go of the plan's copy lists a slice at a time: the call no longer needs them.

        Dropped with the run in one go, their references to 50,000 tensors (sources, staged
        twins, buffers) held the loop 1.2-1.8 ms at the end of a call. ``stage_iter`` keeps
        them: it hands out tensors by copy index until its block exits.
        """
        await self._empty_in_turns(self.run.plan.copies.lists())

    async def _empty_in_turns(self, lists: tuple[list[Any], ...]) -> None:
        steps = empty_in_steps(*lists)
        hold = self._stager._resolved.max_loop_hold_s
        while not _walk_for(steps, hold):
            await _yield_to_due_timers()

    async def step(self) -> bool:
        """Advance the call: walk it all first, then wait for the next batch; False when done."""
        run = self.run
        if not self._walked:
            await self._walk()
            self._walked = True
            # What landed during the walk goes to a stage_iter consumer now: waiting for
            # the next batch first held it back by that batch's copy.
            return True
        if run.finished:
            self._stager._finish(run)
            return False
        if self._dispatch(final=True) and self._loop_lane:
            # Copies left for the loop's thread: they go on in the next turn.
            await _yield_to_due_timers()
        elif run.pending and not self._cut_short:
            await run.pending[0].landed.wait()
            run.reap()
        else:
            # The turn ended before a batch could start, or with batches still to cut that
            # the budget has room for: let the loop run, then cut those. Waiting for a landing
            # instead left the worker idle between batches (it copies one in ~1 ms, then the
            # loop woke, cut the next and handed it over): 49 such gaps in a call over
            # 50,000 small tensors whose copies were cut after its walk.
            await _yield_to_due_timers()
        return True

    async def _walk(self) -> None:
        run = self.run
        hold = self._stager._resolved.max_loop_hold_s
        walk = run.walk
        # Paused for the whole walk, awaits included: resumed between slices, the collector
        # ran hundreds of times per call and promoted the call's objects into the old
        # generations, whose full collections stalled the loop 0.2-0.4 s.
        lane = self._host_lane
        assert lane is not None
        plan = run.plan
        with gc_paused(self._stager._resolved.pause_gc):
            while True:
                # The hand-over is part of the turn: the turn stays within max_loop_hold_s.
                # Not in a full walk's tail, whose frees and the copies into fresh buffers
                # slow each other: first calls over 50,000 small tensors gained nothing there
                # (1.017x, 12 pairs, ~87 hand-overs a call).
                handing = lane.copying() and not plan.walking
                # At most half the turn: a turn under GIL_HAND_OVER_S (max_loop_hold_s=5e-5)
                # held the loop for the whole sleep.
                spent = _hand_over_gil(min(GIL_HAND_OVER_S, hold / 2)) if handing else 0.0
                if _walk_for(walk, max(hold - spent, 0.0)):
                    break
                await _yield_to_due_timers()
                # Starting batches gets a turn of its own: cutting one batch of small copies
                # costs 0.3-0.6 ms, which after a full walk slice held the loop 1-1.7 ms.
                if self._dispatch(final=False):
                    await _yield_to_due_timers()

    def _dispatch(self, *, final: bool) -> bool:
        """Retire finished batches and start new ones while the in-flight budget allows.

        Cutting and starting batches is loop time too: a turn starts at least one batch, and
        another only while one more of the same cost fits in ``max_loop_hold_s``; the rest
        waits for the next turn. The loop lane's copies (:class:`_LoopLane`) take what is left
        of the turn, or one piece where no batch was started. Returns whether it did anything.
        """
        run = self.run
        run.reap()
        deadline = time.perf_counter() + self._stager._resolved.max_loop_hold_s
        assert self._copies is not None and self._host_lane is not None
        started = False
        now = time.perf_counter()
        cost = 0.0  # of the last batch: another one is cut only if one such still fits
        self._cut_short = True
        while not started or now + cost < deadline:
            batch = run.next_batch(final)
            if batch is None:
                self._cut_short = False
                break
            backend = self._stager._backend_for_batch(self._order, batch)
            inflight = _InFlight(batch, backend, self._started_batches)
            self._started_batches += 1
            run.start(inflight)
            if backend is not None:
                self._copies.start_soon(self._copy_from_device, inflight, backend)
            elif _LoopLane.takes(batch, run.plan, run.cache):
                self._loop_lane.submit(inflight)
            elif self._host_lane.submit(inflight):
                self._copies.start_soon(self._copy_on_host)
            started = True
            cost, now = time.perf_counter() - now, time.perf_counter()
        lane = self._loop_lane
        if lane and (not started or now + LOOP_LANE_PIECE_S < deadline):
            lane.copy_for(deadline - now)
            return True
        return started

    async def _copy_on_host(self) -> None:
        """A worker thread that copies the host lane's queued batches until it runs dry."""
        lane = self._host_lane
        assert lane is not None
        started = False

        def copy_queued() -> list[_InFlight]:
            nonlocal started
            started = True
            # With a long scheduler slice: the loop's thread takes a core from the copy
            # the moment it wakes up (see _slices).
            return in_copy_slice(lane.copy_queued)

        try:
            if _born_cancelled():
                return  # the finally fails the queued batches
            landed = await anyio.to_thread.run_sync(copy_queued, limiter=self._host_limiter)
        finally:
            if not started:  # cancelled while waiting for a thread: the call is ending
                for inflight in lane.worker_not_started():
                    _cancelled_before_landing(inflight)
        _set_landed(landed)
        if lane.restart():  # it gave way to a device batch: the rest of the queue goes on after
            assert self._copies is not None
            self._copies.start_soon(self._copy_on_host)

    async def _copy_from_device(self, inflight: _InFlight, backend: DeviceBackend) -> None:
        """Enqueue a device batch and await its completion; its error goes to the call."""
        try:
            if _born_cancelled():
                return  # the finally fails the batch
            await self._enqueue_and_wait(inflight, backend)
        except Exception as exc:  # noqa: BLE001 - handed to the call, which raises it when reaped
            inflight.error = exc
        else:
            inflight.finished = True
        finally:
            if not inflight.finished and inflight.error is None:  # cancelled before it landed
                _cancelled_before_landing(inflight)
            inflight.landed.set()

    async def _enqueue_and_wait(self, inflight: _InFlight, backend: DeviceBackend) -> None:
        """Enqueue a device batch in a worker thread, then wait for it to land.

        The host work of a device's batches (pinning and enqueueing; a gathered batch's
        scatter) runs one batch at a time, in the device's lane. Why: every torch call lets go
        of the GIL and takes it back, and two threads doing so in turn paid a thread switch a
        call: ``view()`` took 3.8 us beside another such thread against 0.7 us alone (H200
        machine, ``benchmarks/gpu_pin_probe.py``), and a cached call over 10,002 small device
        tensors took 0.9 s on the async face against 0.24 s on the blocking one. Waiting for
        the device holds no GIL and stays outside the lane, so the next batch is enqueued while
        one is in flight.
        """
        batch = inflight.batch
        marks = self._order.marks_for(batch.device)
        non_blocking = self._stager._resolved.non_blocking
        lane = self._host_lane
        assert lane is not None
        device_lane = self._device_lanes[batch.device]
        enqueued: list[DeviceCopies] = []
        started = False

        def enqueue() -> None:
            nonlocal started
            started = True
            lane.device_enqueues(inflight.serial)
            enqueued.append(enqueue_batch(backend, batch, marks, non_blocking=non_blocking))

        try:
            async with device_lane:
                # Only now does it wait for a copy thread: host workers give way to it.
                lane.device_waits(inflight.serial)
                try:
                    # Pinning (slow, and never on the loop) and enqueueing run in a worker.
                    await anyio.to_thread.run_sync(
                        in_copy_slice, enqueue, limiter=self._host_limiter
                    )
                finally:
                    if not started:  # cancelled while waiting for a thread
                        lane.device_enqueues(inflight.serial)
        finally:
            if enqueued:  # copies were enqueued: they land before this call may end
                copies = enqueued[0]
                with anyio.CancelScope(shield=True):
                    await self._wait_landed(copies, batch.device, device_lane)
                # Reached only when the wait returned: a wait that raised leaves the buffers
                # counted, so they stay pinned rather than being unpinned under a copy.
                copies.landed()

    async def _wait_landed(
        self, copies: DeviceCopies, device: torch.device, device_lane: anyio.CapacityLimiter
    ) -> None:
        """Wait for a batch's completion; a gathered batch's scatter runs in the device's lane."""
        completion = copies.completion
        waits = self._device_limiters[device]
        device_part = getattr(completion, "device_completion", None)
        if device_part is None or completion.query():
            await wait_for_event(completion, waits)
            return
        await wait_for_event(device_part, waits)
        async with device_lane:
            # The device's copies are done: this only scatters the slab on the host.
            await anyio.to_thread.run_sync(completion.synchronize, limiter=waits)


class _SnapshotCall:
    """``snapshot()``'s result: awaitable (a :class:`Snapshot`) and an async context manager."""

    def __init__(self, call: _Call) -> None:
        self._call = call
        self._taken = False
        self._snapshot: Snapshot | None = None

    def __await__(self) -> Generator[Any, None, Snapshot]:
        return self._take().__await__()

    async def _take(self) -> Snapshot:
        if self._taken:
            raise UsageError("a snapshot() call stages once: await it (or enter it) only once")
        self._taken = True
        call = self._call
        lease: Lease | None = None
        try:
            async with call:
                await call.run_to_end()
                # Leased inside the turn: no other call can choose the set meanwhile.
                assert call.buffer_set is not None
                lease = call._stager._sets.lease(call.buffer_set)
        except BaseException:
            if lease is not None:  # the turn's exit failed: nobody will ever release it
                lease.release()
            raise
        snapshot = Snapshot(call.result, lease)
        call.result = None  # the snapshot's now: released, it lets go of it
        return snapshot

    async def __aenter__(self) -> Snapshot:
        self._snapshot = await self._take()
        return self._snapshot

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._snapshot is not None
        self._snapshot.release()


class _StageIter:
    """``stage_iter``'s async context manager: a call whose tensors are handed out as they land."""

    def __init__(self, stager: Stager, state_dict: Any, after: object) -> None:
        self._call = _Call(stager, state_dict, track_leaves=True, after=after, what="stage_iter()")
        self._entered = False
        self._landed: _Landed | None = None

    async def __aenter__(self) -> AsyncIterator[tuple[Path, torch.Tensor]]:
        # A call's state (its walk, its producer marks) serves one block: entered again, the
        # second block's run was never walked and its iteration waited forever.
        if self._entered:
            raise UsageError(
                "a stage_iter() call stages once: enter it only once (call stage_iter() "
                "again for another block)"
            )
        self._entered = True
        await self._call.__aenter__()
        self._landed = _Landed(self._call)
        return self._landed

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self._call.__aexit__(exc_type, exc, tb)
        finally:
            if self._landed is not None:
                self._landed.let_go()


class _Landed:
    """The async iterator of ``(path, tensor)`` pairs inside a ``stage_iter`` block."""

    def __init__(self, call: _Call) -> None:
        self._call = call
        self._ready: list[Leaf] = []
        self._done = False
        self._stepped = False  # the first step walks: nothing is asked of the run before it
        self._hold = call._stager._resolved.max_loop_hold_s
        self._turn_ends = time.perf_counter() + self._hold

    def __aiter__(self) -> _Landed:
        return self

    def let_go(self) -> None:
        """The block exited: drop the tensors that landed and were never handed out, which
        the caller may no longer read and which would stay alive as long as this iterator
        (usually bound in the caller's frame after the block)."""
        self._ready = []

    async def __anext__(self) -> tuple[Path, torch.Tensor]:
        # Checked first, not only when more must be awaited: tensors that had landed before
        # the block exited were handed out after it, when a later call may be overwriting
        # their buffers already.
        _ = self._call.run  # raises UsageError once the block has exited
        if self._ready and time.perf_counter() > self._turn_ends:
            # The tensors that landed during a turn are handed out without awaiting anything:
            # over 20,000 small tensors a consumer that queued each for a writer (astage.save)
            # held the loop 150-185 ms in one go. The loop gets a turn once one has passed.
            await _yield_to_due_timers()
            self._turn_ends = time.perf_counter() + self._hold
        while not self._ready:
            if self._stepped:
                # The run hands out what landed a part at a time: the rest before more work.
                self._ready = self._call.run.landed_leaves()
            if not self._ready:
                if self._done:
                    raise StopAsyncIteration
                self._done = not await self._call.step()
                self._stepped = True
                self._ready = self._call.run.landed_leaves()
            self._ready.reverse()  # handed out from the end, in landing order
            self._turn_ends = time.perf_counter() + self._hold
        leaf = self._ready.pop()
        return leaf.path, leaf.tensor


GIL_HAND_OVER_S = 1e-4
"""How long a replay's turn sleeps, at its start, while host copies are in progress, so that
the copying worker thread can take the GIL (see :func:`_hand_over_gil`)."""


def _hand_over_gil(seconds: float) -> float:
    """Let a copier thread that waits for the GIL take it, sleeping ``seconds``; returns the
    seconds this took.

    Why: a thread that waits for the GIL asks its holder to let go only once the holder kept it
    for a whole switch interval (5 ms) with no switch in between, and the loop lets go of it at
    every turn (its ``select``) and takes it straight back before the woken copier runs, which
    counts as a switch. So the copier waited for the end of the walk, every call: over 50,000
    small tensors its thread entered the copies 0.2 ms after the walk ended, 50-90 ms after
    they were handed to it. Sleeping a tenth of a millisecond lets the woken copier take the
    GIL, start a ``foreach`` call and let go of it again in its C++ part, where it copies
    while the loop walks on. The sleep counts against the turn's ``max_loop_hold_s``, so the
    loop's other tasks wait no longer: cached calls over 50,000 small tensors took 0.941-0.948x
    as long (paired, 30 calls a side, with and without a 1 ms heartbeat), the heartbeat's p99
    0.75 against 0.71 ms, and ``benchmarks.lag_ab`` (three rounds against the code before) saw
    no change in lag. A sleep that adds to the turn instead gained as much and cost the
    heartbeat 0.1-0.3 ms of p99. Host copies only: a device batch's thread, which needs the
    GIL to enqueue, is not handed it yet (not measured on a device).
    """
    started = time.perf_counter()
    time.sleep(seconds)
    return time.perf_counter() - started


def _walk_for(walk: Iterator[object], seconds: float) -> bool:
    """Advance ``walk`` for at most ``seconds`` (one slice of loop time); True once it is done.

    A step is not started where one as long as the last would end past the slice: a bulk
    replay step (256 tensors) takes 0.3-0.6 ms on a loaded core, and a slice that checked the
    clock only after each step ran two of them, holding the loop 1.1-1.4 ms, which made the
    slowest 1% of a 1 ms heartbeat's beats 1.2-1.5 ms late (``benchmarks.lag_trace``).
    """
    now = time.perf_counter()
    deadline = now + seconds
    with staging_defaults():  # per slice: the thread's defaults, which the loop's tasks share
        for _ in walk:
            before, now = now, time.perf_counter()
            if 2 * now - before >= deadline:  # now + (now - before): the next step's end
                return False
        return True


async def _yield_to_due_timers() -> None:
    """Hand the loop back so that timers already due run before this task's next slice.

    ``sleep(0)`` requeues the task ahead of timers that fall due meanwhile, so a due callback
    waits one more slice; a timer of our own (``sleep`` with a tiny delay) is ordered by its
    deadline, after theirs.
    """
    await anyio.sleep(1e-6)
