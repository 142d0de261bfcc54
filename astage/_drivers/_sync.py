"""SyncStager: the blocking face of the staging core, for code that is not async.

It runs the same walk, cache and batches as :class:`~astage.Stager`, in the calling thread:
host copies inline, device copies enqueued on the staging streams (after the producer marks
taken at the call, in the caller's thread) and waited for with ``synchronize()``.
It needs no event loop and starts no thread, so it works anywhere,
including legacy code called from inside a running loop (where it blocks that loop, as any
blocking call would).

Pinning, too, runs in the calling thread: buffers are registered before their first copy and
queued unpins are undone before each batch and at ``close()``. That is the blocking face's
contract rather than a leak of work into a training thread: the caller asked for the work to be
done in its thread and waits for all of it anyway, so a helper thread would save it no time.
What must not reach the caller is kept away all the same: each call selects the buffer's
device around it (and restores the caller's), a failed call leaves no CUDA error for the
caller's next kernel, and a source dropped between calls (in whatever thread) only queues its
buffer's unpin. Callers who want staging off their thread use :class:`~astage.Stager` or
``compat.DefaultStager(use_async_staging=True)``, whose pins run in astage's worker threads.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any

from .._core._batches import Batch
from .._core._run import Run
from .._devices import _pinning
from .._devices._backend import DeviceCopies, enqueue_batch
from .._devices._host import reserve_batch, run_host_batch
from .._errors import InvalidOptionsError, StagerClosedError, UsageError
from .._options import StagingOptions
from .._torch import staging_defaults
from ._base import (
    CallOrder,
    Reservation,
    ReserveProgress,
    ReserveWork,
    StagerBase,
    check_progress,
)
from ._gc import gc_paused
from ._leases import POLL_S, Lease, seconds
from ._sets import BufferSet
from ._snapshots import Snapshot

_ANY_THREAD = "sync"  # the blocking face serializes threads on its lock: none is ever busy


class _Enqueued:
    """Device copies on a staging stream; ``done()`` polls their completion."""

    __slots__ = ("batch", "copies")

    def __init__(self, batch: Batch, copies: DeviceCopies) -> None:
        self.batch = batch
        self.copies = copies

    def done(self) -> bool:
        if not self.copies.completion.query():
            return False
        self.copies.landed()  # before the run clears the batch: its buffers may be unpinned
        return True

    def wait(self) -> None:
        """Block until the copies have landed; a wait that raises leaves them counted."""
        self.copies.completion.synchronize()
        self.copies.landed()


class SyncStager(StagerBase):
    """Stages state dicts into reusable host buffers, blocking until the copies are done.

    Thread-safe: calls from several threads run one after the other (each waits for the one
    in progress), so one stager may serve a pool of threads.
    """

    def __init__(self, options: StagingOptions | None = None, **overrides: Any) -> None:
        super().__init__(options, **overrides)
        self._lock = threading.Lock()
        # The thread inside a call (holding _lock), None between calls: a call made again from
        # that thread (a reserve() progress callback that stages) would wait on the lock for
        # itself forever, so it is refused instead.
        self._owner: int | None = None
        # close() is waiting (holding _lock) for the leases: a call behind it can never run.
        self._closing = False

    def stage(self, state_dict: Any, *, after: object = None, timeout: float | None = None) -> Any:
        """A copy of ``state_dict`` whose tensors all live in host buffers of this stager.

        Nothing protects the result: a later call that stages into the same buffer set
        overwrites it (with ``buffers=1``, the next call). Use :meth:`snapshot` to hold it.
        The call stages into a buffer set that no snapshot or hold leases; when every set is
        leased it blocks until one is released, or raises :class:`~astage.LeaseTimeoutError`
        after ``timeout`` seconds (None: no limit), also when it waits behind another thread's
        call that itself waits for a release.

        Device copies are ordered after everything queued, before this call, on the calling
        thread's current stream of each device the state dict touches, and after ``after``
        (a stream or event, or a list of them). Refused with :class:`~astage.UsageError`
        while one of those streams is capturing a graph, and in a forked child.
        """
        result, _ = self._stage(state_dict, after, timeout, lease=False)
        return result

    def snapshot(
        self, state_dict: Any, *, after: object = None, timeout: float | None = None
    ) -> Snapshot:
        """Stage ``state_dict`` like :meth:`stage` and lease its buffers until released.

        No later call stages into the snapshot's buffer set until ``release()``: with
        ``buffers=1`` the next call blocks, with ``buffers=N`` it stages into another free
        set (host memory: up to N x the staged bytes). Use it as a context manager, or hand
        it to a consumer (a writer thread; another process through torch.multiprocessing
        when ``share_memory=True``) that calls ``release()`` when done::

            with stager.snapshot(model.state_dict()) as snap:
                torch.save(snap.state_dict, path)

        ``timeout`` bounds the wait for a free set, as in :meth:`stage`.
        """
        result, lease = self._stage(state_dict, after, timeout, lease=True)
        assert lease is not None
        return Snapshot(result, lease)

    def reserve(self, state_dict: Any, *, progress: ReserveProgress | None = None) -> Reservation:
        """Allocate, touch and (with an accelerator) pin every host buffer ``state_dict`` needs.

        Run it once before the first checkpoint (at startup, while the data loader warms up):
        the first ``stage()`` then allocates nothing (``last_stats.new_nbytes == 0``) and runs
        at the speed of a cached call, and its structure is already recorded for replay. The
        state dict's bytes are not copied: new buffers are written with zeros, so that the
        kernel maps their pages now. With ``buffers=N`` every set is reserved: N x the bytes,
        and N x the time. Buffers a call staged into are left as they are (a snapshot may be
        reading them), so calling it again costs one walk and commits nothing, or only what
        an earlier reserve() cut short (its ``progress`` raised) left untouched.

        ``progress``, if given, is called in this thread with (bytes committed so far, bytes
        to commit) as the work goes on. Blocks the calling thread; thread-safe like
        :meth:`stage` (calls run one after the other). Returns the figures of what it
        committed.
        """
        check_progress(progress)
        self._check_open()
        self._enter(_ANY_THREAD)
        try:
            with self._locked("reserve()"):
                self._check_open()
                work = ReserveWork(self, state_dict)
                with gc_paused(self._resolved.pause_gc), staging_defaults(), work.allocating():
                    for run, _ in work.runs:
                        for _ in run.walk:
                            pass
                for batch, first_serial, pin in work.batches():
                    touched = reserve_batch(batch, first_serial, pin_buffers=pin)
                    work.landed(batch, touched, progress)
                return work.result(self)
        finally:
            self._leave()

    def _stage(
        self, state_dict: Any, after: object, timeout: float | None, *, lease: bool
    ) -> tuple[Any, Lease | None]:
        if timeout is not None and (
            # `not >= 0` refuses NaN too, with which the wait's deadline never came.
            not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout >= 0
        ):
            raise InvalidOptionsError(
                f"timeout must be None or a non-negative number of seconds, got {timeout!r}"
            )
        if timeout is not None:
            timeout = seconds(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        self._check_open()
        self._enter(_ANY_THREAD)
        try:
            with self._locked("snapshot()" if lease else "stage()", timeout, deadline):
                try:
                    self._check_open()
                    buffer_set = self._wait_for_set(timeout, deadline)
                    # Taken once the lock is ours: a call that waited for another one is
                    # ordered after what its caller queued meanwhile too (the same thread).
                    order = self._start_order(after)
                    run: Run[_Enqueued] = self._new_run(state_dict, buffer_set, track_leaves=False)
                    try:
                        # The device batches are cut and enqueued in this thread too (gathers).
                        with staging_defaults():
                            self._copy_all(run, order)
                    finally:
                        # Whatever happened, no copy this call enqueued lands after it returned.
                        for enqueued in run.pending:
                            enqueued.wait()
                        run.cache.written(run.plan.copies.buffers)  # a failed call's too
                    self._finish(run)
                    # Leased before the lock is let go: no other call can choose the set.
                    taken = self._sets.lease(buffer_set) if lease else None
                    return run.plan.result, taken
                finally:
                    self._end_call()
        finally:
            self._leave()

    @contextlib.contextmanager
    def _locked(
        self, what: str, timeout: float | None = None, deadline: float | None = None
    ) -> Iterator[None]:
        """The stager's lock for one call; refuses a call from inside a call of this thread.

        With a ``deadline`` (a call's ``timeout``), waiting for the lock is bounded too while
        every set is leased: the call in progress may itself be waiting for a release, and
        the caller behind it asked not to wait for one longer than ``timeout``. A call in
        progress that stages (a set is free) is waited for, however long it takes.
        """
        # Read without the lock: only this thread ever sets it to this thread's id.
        if self._owner == threading.get_ident():
            raise UsageError(
                f"{what} called on this {type(self).__name__} from inside one of its own calls "
                "in the same thread (a reserve() progress callback, say): it would wait for "
                "itself forever; call it after that call returned, or use a second stager"
            )
        if deadline is None:
            self._lock.acquire()
        # At most TIMEOUT_MAX: a timeout of inf (or 1e300) means no limit, not OverflowError.
        elif not self._lock.acquire(
            timeout=min(max(0.0, deadline - time.monotonic()), threading.TIMEOUT_MAX)
        ):
            # Past the deadline: give up once every set is leased, or close() waits for a
            # lease (the call would only be refused once it is done); look every POLL_S.
            while not self._lock.acquire(timeout=POLL_S):
                if self._closing:
                    raise StagerClosedError(
                        f"this {type(self).__name__} is closing: close() waits for its "
                        "snapshots and buffer holds to be released"
                    )
                if self._free_set() is None:
                    assert timeout is not None
                    raise self._lease_timeout(timeout)
        try:
            self._owner = threading.get_ident()
            try:
                yield
            finally:
                self._owner = None
        finally:
            self._lock.release()

    def _wait_for_set(self, timeout: float | None, deadline: float | None) -> BufferSet:
        """A buffer set no lease holds, blocking while all are leased (until ``deadline``)."""
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        buffer_set = self._sets.board.wait_for(self._free_set, left)
        if buffer_set is None:
            assert timeout is not None
            raise self._lease_timeout(timeout)
        return buffer_set

    def _copy_all(self, run: Run[_Enqueued], order: CallOrder) -> None:
        with gc_paused(self._resolved.pause_gc):
            for _ in run.walk:
                pass
        while True:
            self._landed(run)
            batch = run.next_batch(final=True)
            if batch is None:
                if not run.pending:
                    break
                run.pending[0].wait()
                run.reap()
                continue
            backend = self._backend_for_batch(order, batch)
            if backend is None:
                run_host_batch(batch)
                if not run.pending:  # copies land in order: only then is this one the frontier
                    run.landed = max(run.landed, batch.end)
            else:
                marks = order.marks_for(batch.device)
                copies = enqueue_batch(
                    backend, batch, marks, non_blocking=self._resolved.non_blocking
                )
                run.start(_Enqueued(batch, copies))
        self._landed(run)

    def _landed(self, run: Run[_Enqueued]) -> None:
        """Called between batches as copies land; a subclass hands landed tensors out here."""

    def close(self) -> None:
        """Wait for a call in progress and for every lease (snapshots, holds), then release
        buffers and streams.

        The released buffers are unpinned here, in the calling thread (see the module's
        docstring): every copy into them has landed, so this is the moment it is safe.
        """
        if self._forked:
            # In a forked child the lock may have been copied taken, by a parent's thread that
            # was inside a call and does not exist here: waiting for it would hang. Nothing of
            # the parent's is touched in the child anyway (see _release_everything).
            self._release_everything()
            return
        with self._locked("close()"):
            if self._closed:
                return
            self._closing = True
            try:
                self._sets.board.wait_for(self._sets.all_released)
            finally:
                self._closing = False  # closed now, or interrupted (KeyboardInterrupt): open
            self._synchronize_devices()
            self._release_everything()
            _pinning.unpin_released()

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
