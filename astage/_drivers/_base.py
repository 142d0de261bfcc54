"""The base of both stagers: options, buffer sets, streams, leases, and the lifecycle of a call.

``Stager`` (async) and ``SyncStager`` (blocking) derive from :class:`StagerBase`, the way
httpx's ``AsyncClient`` and ``Client`` share ``BaseClient``: the base owns everything that is
not waiting (the options, the buffer sets and their leases, the device backends, the checks
before a call, a call's producer marks, its run and its figures, and what closing releases);
each face only says how it waits (awaiting with anyio, or blocking the calling thread).

Snapshots (:class:`~astage._drivers._snapshots.Snapshot`): a call stages into a buffer set that
no lease holds (see :mod:`~astage._drivers._sets`), waiting for a release when every set is
leased; ``snapshot()`` leases the set it staged into before the stager's turn ends, so no other
call can choose that set in between. ``hold_buffers()`` leases the current set the same way.

Ordering after the producer (:class:`CallOrder`): when a call is made, in the caller's thread,
the base records a producer mark on the caller's current stream of every device this stager
has staged from before and of the device the caller has selected, plus the marks of an
explicit ``after=``. A device first met while the call runs is marked when it is met, in the
thread that cuts the batches (the caller's for ``SyncStager``, the event loop's for ``Stager``).
Every batch of a device is enqueued after all of that device's marks.

A call never leaves work behind: both faces return or raise only once every copy they started
has landed, so what a failed or cancelled call leaves is buffers with stale bytes, which the
next call overwrites, and nothing in flight.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any, NamedTuple

import torch

from .._core._batches import Batch
from .._core._cache import BufferCache, CacheInfo
from .._core._run import Run
from .._core._stats import StageStats
from .._devices._backend import (
    DeviceBackend,
    Mark,
    backend_for,
    current_backends,
    mark_after,
    pins_host_memory,
)
from .._devices._gather import should_gather
from .._errors import (
    BusyError,
    InvalidOptionsError,
    LeaseTimeoutError,
    StagerClosedError,
    UsageError,
)
from .._options import StagingOptions, make_options
from . import _fork
from ._leases import Lease
from ._sets import BufferSet, BufferSets

_inherited_marks: ContextVar[tuple[Mark, ...]] = ContextVar("astage_inherited_marks", default=())


@contextlib.contextmanager
def ordered_after(marks: Sequence[Mark]) -> Iterator[None]:
    """Calls made in this block (this thread) are ordered after ``marks`` too.

    For code that stages on behalf of another thread, which took the marks at its call
    (compat's staging thread): the stager the block calls need not take ``after=``.
    """
    token = _inherited_marks.set(tuple(marks))
    try:
        yield
    finally:
        _inherited_marks.reset(token)


def producer_mark(device: torch.device, backend: DeviceBackend) -> Mark:
    """A mark on the calling thread's current stream of ``device``; refused while capturing."""
    if backend.is_capturing(device):
        raise UsageError(
            f"cannot stage while the current stream of {device} is capturing a graph: the "
            "copies would become part of the graph; stage before or after the capture"
        )
    return backend.mark(device)


def mark_devices(devices: Iterable[torch.device]) -> list[Mark]:
    """Marks on the calling thread's current streams: of ``devices``, and of its own device.

    CPU devices need none.
    """
    chosen: dict[torch.device, DeviceBackend] = {}
    for current in current_backends():
        selected = current.current_device()
        if selected is not None:
            chosen.setdefault(selected, current)
    for device in devices:
        found = None if device in chosen else backend_for(device)
        if found is not None:
            chosen[device] = found
    return [producer_mark(device, backend) for device, backend in chosen.items()]


class CallOrder:
    """One call's producer marks, per device, and the backend of each device it met."""

    __slots__ = ("backends", "marks")

    def __init__(self) -> None:
        self.marks: dict[torch.device, list[Mark]] = {}
        self.backends: dict[torch.device, DeviceBackend | None] = {}

    def add(self, mark: Mark) -> None:
        self.marks.setdefault(mark.device, []).append(mark)

    def marks_for(self, device: torch.device) -> list[Mark]:
        return self.marks.get(device, [])


ReserveProgress = Callable[[int, int], None]
"""``reserve()``'s progress callback: called with (bytes committed so far, bytes to commit)."""


class Reservation(NamedTuple):
    """What ``reserve()`` committed: the host memory the first checkpoint will not have to."""

    nbytes: int
    """Bytes of host buffers this call touched: those it allocated, and those an earlier
    reserve() allocated but was cut short before touching (0 when all were ready already)."""
    buffers: int
    """Host buffers it touched."""
    sets: int
    """Buffer sets it reserved (``StagingOptions(buffers=N)``: all N)."""
    held_nbytes: int
    """Bytes of host buffers the stager holds afterwards, in every set together."""
    pinned_nbytes: int
    """Of those, bytes page-locked with CUDA (0 without an accelerator)."""
    seconds: float
    """Wall time of the call."""


def check_progress(progress: object) -> None:
    """Refuse a ``reserve()`` progress that cannot be called, before anything is allocated
    (it raised TypeError at the first batch, the buffers already allocated), and an ``async
    def`` one, whose calls would only make coroutines that nobody awaits (no progress shown,
    a RuntimeWarning per batch)."""
    if progress is not None and not callable(progress):
        raise InvalidOptionsError(
            "progress must be None or a callable taking (bytes done, bytes to do), got "
            f"{type(progress).__name__}"
        )
    if inspect.iscoroutinefunction(progress):
        raise InvalidOptionsError(
            "progress is called, not awaited (on the event loop for Stager): pass a plain "
            "function, not an async def one"
        )


class ReserveWork:
    """One ``reserve()`` call: a walk per buffer set, then the batches whose buffers it touches.

    A walk allocates the buffers a stage() call would (and records the structure for replay),
    but nothing is copied: the batches cut from it only write zeros into the buffers no call
    has staged into yet (and pin them where that helps), so that the first checkpoint's copies
    find their memory mapped. Those are the buffers this walk allocated, and those an earlier
    reserve() allocated but was cut short (cancelled, or its ``progress`` raised) before
    touching (``BufferCache.untouched``), which are numbered as if this walk had allocated
    them. A buffer a call staged into is never written: it may hold staged bytes that a
    snapshot still reads, which is also why reserve() needs no free buffer set.
    """

    def __init__(self, stager: StagerBase, state_dict: Any) -> None:
        self.started = time.perf_counter()
        resolved = stager._resolved
        self.runs: list[tuple[Run[Any], int]] = []
        """Per buffer set: its run, and the serial from which its buffers are touched."""
        self._revived: list[bool] = []
        for buffer_set in stager._sets:
            cache = buffer_set.cache
            first_serial = cache.allocations
            run: Run[Any] = Run(
                cache,
                state_dict,
                track_leaves=False,
                chunk_bytes=resolved.chunk_bytes,
                max_inflight_bytes=resolved.max_inflight_bytes,
                ahead=True,
            )
            self.runs.append((run, first_serial))
            # Few, and only after a reserve cut short: one step each.
            left = list(cache.untouched.values())
            for buffer in left:
                buffer.serial = first_serial
            self._revived.append(bool(left))
        self._touch: list[tuple[int, int]] | None = None
        self._settling = self.runs[0][0]  # the run whose batches are being touched
        self._settled = 0  # copies [0, _settled) of the run being touched are off its list
        self.done = 0

    @contextlib.contextmanager
    def allocating(self) -> Iterator[None]:
        """Around the walks: the buffers they allocate are to be touched (until a call is)."""
        caches = [run.cache for run, _ in self.runs]
        for cache in caches:
            cache.reserving = True
        try:
            yield
        finally:
            for cache in caches:
                cache.reserving = False

    def _to_touch(self) -> list[tuple[int, int]]:
        """Per buffer set, the bytes and buffers to touch (once every walk has run)."""
        if self._touch is None:
            self._touch = []
            for (run, first_serial), revived in zip(self.runs, self._revived, strict=True):
                plan = run.plan
                if not revived:  # the walk's new buffers, all of them
                    self._touch.append((plan.new_nbytes, plan.new_buffers))
                    continue
                # An earlier reserve's buffers too, where this state dict has them: one look
                # per copy, only in the call after a reserve was cut short.
                copies = plan.copies
                sizes = [
                    size
                    for buffer, size in zip(copies.buffers, copies.sizes, strict=True)
                    if buffer.serial >= first_serial
                ]
                self._touch.append((sum(sizes), len(sizes)))
        return self._touch

    @property
    def total(self) -> int:
        """Bytes to touch (known once every walk has run)."""
        return sum(nbytes for nbytes, _ in self._to_touch())

    def batches(self) -> Iterator[tuple[Batch, int, bool]]:
        """Each batch to touch, with the serial from which its buffers are touched, and
        whether to pin it.

        Cut lazily, a few at a time, so that the async face's loop never cuts them all at once.
        """
        pins: dict[torch.device, bool] = {}
        for (run, first_serial), (_, buffers) in zip(self.runs, self._to_touch(), strict=True):
            if not buffers:
                continue
            self._settling = run
            self._settled = 0
            while (batch := run.next_batch(final=True)) is not None:
                device = batch.device
                if device not in pins:
                    backend = backend_for(device)
                    pins[device] = backend is not None and pins_host_memory(backend, device)
                yield batch, first_serial, pins[device] and not should_gather(batch)

    def landed(self, batch: Batch, touched: int, progress: ReserveProgress | None) -> None:
        """``batch`` was touched: the buffers it completed are to be touched no more."""
        batch.clear()
        run = self._settling
        untouched = run.cache.untouched
        for buffer in run.plan.copies.buffers[self._settled : batch.end]:
            untouched.pop(id(buffer), None)
        self._settled = max(self._settled, batch.end)
        self.done += touched
        if progress is not None and touched:
            progress(self.done, self.total)

    def result(self, stager: StagerBase) -> Reservation:
        info = stager._sets.info()
        return Reservation(
            nbytes=self.total,
            buffers=sum(buffers for _, buffers in self._to_touch()),
            sets=len(self.runs),
            held_nbytes=info.nbytes,
            pinned_nbytes=info.pinned_nbytes,
            seconds=time.perf_counter() - self.started,
        )


class StagerBase:
    """What both stagers share; holds no thread, loop or stream until staging needs one."""

    def __init__(self, options: StagingOptions | None = None, **overrides: Any) -> None:
        self._options = make_options(options, overrides)
        self._resolved = self._options.resolve()
        resolved = self._resolved
        self._sets = BufferSets(
            resolved.buffers,
            lambda: BufferCache(
                pin_memory=resolved.pin_memory,
                share_memory=resolved.share_memory,
                pin_memory_min_bytes=resolved.pin_memory_min_bytes,
                huge_pages=resolved.huge_pages,
                record=resolved.replay,
            ),
            shared=resolved.share_memory,
        )
        # The devices this stager has staged from, with their backends: a call marks them all
        # at its start (a state dict usually touches the same devices every time).
        self._backends: dict[torch.device, DeviceBackend] = {}
        self._born = _fork.generation()
        self._closed = False
        self._last_stats: StageStats | None = None
        # Who is inside or waiting for a call: the face's key for its caller (the async face:
        # the thread running the event loop), and how many callers. Another key while calls
        # are in progress is refused at once (BusyError) rather than left to wait on a lock
        # of another event loop forever.
        self._occupancy = threading.Lock()
        self._occupant: object = None
        self._callers = 0
        # The buffer sets' state before the call in progress (see BufferSets.undo); None
        # between calls and once the call has its result.
        self._sets_before: tuple[BufferSet, int] | None = None

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

    @property
    def _cache(self) -> BufferCache:
        """The cache of the current buffer set (the only one with ``buffers=1``)."""
        return self._sets.current.cache

    def cache_info(self) -> CacheInfo:
        """How many host buffers the cache holds, and how many bytes (pinned and in all).

        With ``buffers=N``, the buffers of all N sets together.
        """
        return self._sets.info()

    def clear_cache(self) -> None:
        """Release every cached host buffer; the next call allocates afresh.

        Refused (:class:`~astage.BusyError`) while a call is in progress. Staged tensors
        already handed out (snapshots included) stay valid: they keep their own buffers alive,
        and a leased set stays leased (the next call into it allocates afresh).
        """
        with self._occupancy:
            if self._callers:
                raise BusyError(
                    f"clear_cache() cannot run while a call on this {type(self).__name__} "
                    "is in progress"
                )
            self._sets.clear()
            self._release_device_slabs()

    def hold_buffers(self) -> Lease:
        """Keep the staged tensors from being overwritten until the hold is released.

        A lease on the buffer set of the call in progress (or of the last call): no later call
        stages into that set until the lease is released; with ``buffers=1`` the next call
        waits, with more it stages into another free set. ``close()`` and ``aclose()`` wait for
        every lease. For a reader that streams staged tensors somewhere (a checkpoint writer)
        while the caller goes on. ``release()`` may be called from any thread; the hold is
        also a context manager. ``snapshot()`` stages and leases in one call.

        Refused (:class:`~astage.UsageError`) in a forked child, like every call there: its
        lease would wake the parent's waiters through a lock a parent thread may have held
        at the fork, so that its release() hung.
        """
        _fork.check_not_forked(self._born, type(self).__name__)
        return self._sets.lease(self._sets.current)

    # -- the lifecycle of a call, for the faces --------------------------------------------

    def _check_open(self) -> None:
        _fork.check_not_forked(self._born, type(self).__name__)
        if self._closed:
            raise StagerClosedError(f"this {type(self).__name__} is closed")

    @property
    def _forked(self) -> bool:
        return self._born != _fork.generation()

    def _start_order(self, after: object) -> CallOrder:
        """The producer marks taken when a call is made; runs in the caller's thread.

        Marks the caller's current stream of every device this stager staged from before and
        of the device the caller has selected, and takes the marks of ``after=``. Refuses
        (:class:`~astage.UsageError`) before anything is enqueued when one of those streams
        is capturing a graph.
        """
        order = CallOrder()
        for mark in (*_inherited_marks.get(), *mark_after(after)):
            order.add(mark)
        devices = dict(self._backends)
        for backend in current_backends():
            device = backend.current_device()
            if device is not None and device not in devices:
                devices[device] = backend
        for device, backend in devices.items():
            self._mark(order, device, backend)
        return order

    def _backend_for_batch(self, order: CallOrder, batch: Batch) -> DeviceBackend | None:
        """The backend that copies ``batch`` (None: a host copy); marks a device met first.

        Runs in the thread that cuts the batches, before the batch is started.
        """
        device = batch.device
        try:
            return order.backends[device]
        except KeyError:
            pass
        known = self._backends.get(device)
        backend = known if known is not None else backend_for(device)
        if backend is None:
            order.backends[device] = None
            return None
        self._mark(order, device, backend)
        return backend

    def _mark(self, order: CallOrder, device: torch.device, backend: DeviceBackend) -> None:
        order.add(producer_mark(device, backend))
        order.backends[device] = backend
        self._backends[device] = backend

    def _release_device_slabs(self) -> None:
        """Let go of the free host slabs and the kept gather layouts of every backend this
        stager used (``release_slabs()``, where a backend has it). A kept layout holds its
        batch's destination buffers: without this they would outlive ``clear_cache()``. Those
        in use by another stager's call come back, and are kept, when it ends."""
        for backend in self._unique_backends():
            release = getattr(backend, "release_slabs", None)
            if release is not None:
                release()

    def _synchronize_devices(self) -> None:
        """Wait for every staging stream this stager used (blocking)."""
        if self._forked:
            return  # the device state belongs to the parent
        for backend in self._unique_backends():
            backend.synchronize()

    def _unique_backends(self) -> list[DeviceBackend]:
        """The backends this stager used, each once (one backend may serve several devices)."""
        return list({id(backend): backend for backend in self._backends.values()}.values())

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

    def _free_set(self) -> BufferSet | None:
        """The buffer set the next call may stage into, or None while every set is leased."""
        return self._sets.free()

    def _lease_timeout(self, timeout: float) -> LeaseTimeoutError:
        count = len(self._sets)
        return LeaseTimeoutError(
            f"waited {timeout:g} s for a snapshot or buffer hold on this {type(self).__name__} "
            f"to be released (buffers={count}: all {count} sets leased); release snapshots "
            "once their consumer is done, or stage into more sets (StagingOptions(buffers=))"
        )

    def _new_run(self, state_dict: Any, buffer_set: BufferSet, *, track_leaves: bool) -> Run[Any]:
        """A run into ``buffer_set``, which becomes the current set (hold_buffers() leases it)."""
        self._sets_before = self._sets.use(buffer_set)
        return Run(
            buffer_set.cache,
            state_dict,
            track_leaves=track_leaves,
            chunk_bytes=self._resolved.chunk_bytes,
            max_inflight_bytes=self._resolved.max_inflight_bytes,
        )

    def _finish(self, run: Run[Any]) -> StageStats:
        self._sets_before = None  # the call has its result: its set stays current
        plan = run.plan
        run.cache.written(plan.copies.buffers)
        stats = StageStats(
            tensors=plan.tensors,
            storages=len(plan.copies),
            nbytes=run.nbytes,
            new_nbytes=plan.new_nbytes,
            seconds=time.perf_counter() - run.started,
        )
        self._last_stats = stats
        return stats

    def _end_call(self) -> None:
        """The face's call ended (in its turn); one without a result gives the current set back
        to the last call that had one (:meth:`BufferSets.undo`)."""
        before, self._sets_before = self._sets_before, None
        if before is not None:
            self._sets.undo(before)

    def _release_everything(self) -> None:
        """The end of close: the caller waited for calls, holds and streams first."""
        self._closed = True
        if self._forked:
            return  # unpinning would call into the parent's CUDA state; the child's copy dies
        self._sets.clear()
        self._release_device_slabs()
