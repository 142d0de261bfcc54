"""A fake asynchronous accelerator, so that the device path can be proven on a CPU-only machine.

Real accelerators run work *later*: a kernel or a copy launched on a stream is queued, and runs
when the device reaches it, in stream order; an event recorded on a stream completes when the
stream reaches it; another stream may wait on that event. A bug in ordering (a copy not ordered
after the kernel that writes its source), in completion (a call that returns before its copies
landed) or in pinning (a buffer unpinned while a copy still writes into it) is invisible when
work runs at once, which is what every CPU path does. This fake keeps the "later":

* :class:`FakeStream`: a queue of work run by one thread of its own, in order. Work runs when
  that thread reaches it, never when it is enqueued. Each stream has a :class:`Gate`: a test
  holds the stream (its thread stops before the next item) and releases it when it wants, so a
  race becomes a fixed order.
* :class:`FakeEvent`: recorded on a stream, it completes when the stream's thread reaches it;
  ``query()``, ``synchronize()``, and ``FakeStream.wait_event`` (a stream that waits on an
  event of another stream, or another device) behave like CUDA's.
* "Kernels" are Python callables: ``producer.enqueue(lambda: x.fill_(7.0))`` changes ``x``
  when the producer stream reaches it. Copies enqueued through :meth:`FakeStream.enqueue_copies`
  are entered in a :class:`CopyLedger` and land only when the stream reaches them.
* :class:`FakeDevice`: an index, a default stream, a "current stream" per thread (like CUDA's),
  and the tensors it owns. The fake's tensors are plain CPU tensors that the accelerator
  *claims* (by storage), since no Python code can make tensors of a new device type; a backend
  adapter tells astage which device a claimed tensor is on, so staging them must go through the
  backend and never through the host path.
* :class:`PinLedger`: every pin and unpin, with the thread, the device selected in it, and the
  copies into the memory still pending at that moment. A test asserts from it that nothing was
  pinned or unpinned on a caller's thread and nothing was unpinned under a pending copy.

A :class:`FakeAccelerator` holds the devices and ledgers, and its :meth:`~FakeAccelerator.close`
stops every stream thread (a test fixture calls it). Errors raised by work on a stream are kept
in :attr:`FakeAccelerator.errors` (and the stream goes on), so a test can assert there were none.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import threading
import time
import types
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils.dlpack

TIMEOUT = 10.0
"""Seconds any wait in the fake may take before it fails the test instead of hanging it."""


class FakeTimeoutError(AssertionError):
    """A wait in the fake took longer than :data:`TIMEOUT`: a deadlock or a lost wake-up."""


def _wait(event: threading.Event, what: str, timeout: float = TIMEOUT) -> None:
    if not event.wait(timeout):
        raise FakeTimeoutError(f"timed out after {timeout} s waiting for {what}")


# -- pacing ---------------------------------------------------------------------------------------


class Gate:
    """Lets a stream's thread through, or holds it before its next item of work.

    Open by default. ``hold()`` closes it: the thread finishes the item it is running, then
    waits. ``release()`` opens it again. ``with gate.held():`` holds for a block.
    """

    def __init__(self) -> None:
        self._open = threading.Event()
        self._open.set()
        self.waiting = threading.Event()
        """Set while the stream's thread waits at the closed gate with work queued behind it."""

    @property
    def is_held(self) -> bool:
        return not self._open.is_set()

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.hold()
        try:
            yield
        finally:
            self.release()

    def pass_through(self, stopping: threading.Event) -> None:
        """Called by the stream's thread before each item: wait while the gate is held."""
        if self._open.is_set():
            return
        self.waiting.set()
        try:
            while not self._open.wait(0.05):
                if stopping.is_set():
                    return
        finally:
            self.waiting.clear()


# -- events ---------------------------------------------------------------------------------------


class FakeEvent:
    """A device event: completes when the stream it was recorded on reaches it.

    Like CUDA's: an event never recorded counts as complete; recording it again makes it mark
    the new point (earlier waits keep the point they were given).
    """

    _ids = itertools.count(1)

    def __init__(self, owner: FakeDevice | None = None, *, blocking: bool = False) -> None:
        self.owner = owner
        self.device = owner.torch_device if owner is not None else None
        """The ``torch.device`` (so that astage's ``after=`` takes a fake event)."""
        self.blocking = blocking
        self.id = next(self._ids)
        self._reached = threading.Event()
        self._reached.set()  # never recorded: complete
        self.stream: FakeStream | None = None
        """The stream this event was last recorded on."""
        self.recorded_by: str | None = None
        """Name of the thread that last recorded it."""
        self.synchronized_by: list[str] = []
        """Names of the threads that blocked in ``synchronize()`` on it."""

    def record(self, stream: FakeStream | None = None) -> None:
        """Mark the current end of ``stream`` (default: the device's current stream)."""
        if stream is None:
            if self.owner is None:
                raise ValueError("a FakeEvent without a device needs a stream to record on")
            stream = self.owner.current_stream()
        reached = threading.Event()
        self._reached = reached
        self.stream = stream
        if self.owner is None:
            self.owner, self.device = stream.owner, stream.device
        self.recorded_by = threading.current_thread().name
        stream._put(_Item("event", reached.set, label=f"event {self.id}"))
        stream.accelerator._note_record(self, stream)

    def query(self) -> bool:
        return self._reached.is_set()

    def synchronize(self) -> None:
        self.synchronized_by.append(threading.current_thread().name)
        if self.owner is not None:  # like a CUDA wait: select the device, create no other context
            self.owner.accelerator.set_device(self.owner)
        _wait(self._reached, f"event {self.id} on {self.stream}")

    def wait(self, stream: FakeStream | None = None) -> None:
        """Make ``stream`` (default: the current one) wait for this event: CUDA's event.wait."""
        if stream is None:
            if self.owner is None:
                raise ValueError("a FakeEvent without a device needs a stream to wait on it")
            stream = self.owner.current_stream()
        stream.wait_event(self)

    def _point(self) -> threading.Event:
        return self._reached

    def __repr__(self) -> str:
        return f"FakeEvent({self.id}, on={self.stream}, done={self.query()})"


# -- streams --------------------------------------------------------------------------------------


@dataclass
class _Item:
    kind: str  # "kernel", "copy", "event", "wait"
    run: Callable[[], object]
    label: str = ""
    done: threading.Event = field(default_factory=threading.Event)


class FakeStream:
    """A queue of work that one thread of its own runs, in order, later.

    ``enqueue(fn)`` queues a kernel; ``enqueue_copies`` queues copies (recorded in the copy
    ledger); ``record_event``/``wait_event``/``wait_stream`` order work as CUDA's do;
    ``query()``/``synchronize()`` ask about or wait for everything queued so far.
    """

    _ids = itertools.count(1)

    def __init__(self, owner: FakeDevice, name: str = "") -> None:
        self.owner = owner
        self.device = owner.torch_device
        """The ``torch.device`` (so that astage's ``after=`` takes a fake stream)."""
        self.accelerator = owner.accelerator
        self.capturing = False
        """Set by a test to pretend a graph capture is in progress on this stream."""
        self.id = next(self._ids)
        self.name = name or f"stream{self.id}"
        self.gate = Gate()
        self.ran: list[str] = []
        """Labels of the items run so far, in order (for assertions and failure messages)."""
        self._queue: deque[_Item] = deque()
        self._wake = threading.Condition()
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(
            target=self._work, name=f"fake-{owner.index}-{self.name}", daemon=True
        )
        self._thread.start()

    def __repr__(self) -> str:
        return f"<FakeStream {self.owner.index}:{self.name}>"

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    # -- what code on the "host" does with a stream -------------------------------------------

    def enqueue(self, kernel: Callable[[], object], label: str = "kernel") -> None:
        """Queue ``kernel``: it runs when this stream's thread reaches it."""
        self._put(_Item("kernel", kernel, label=label))

    def enqueue_copies(
        self,
        dsts: Sequence[torch.Tensor],
        srcs: Sequence[torch.Tensor],
        label: str = "copy",
    ) -> None:
        """Queue ``dst.copy_(src)`` for each pair; they land when this stream reaches them."""
        host = self.accelerator.host  # fake tensors are read through their CPU twins
        dsts, srcs = [host(dst) for dst in dsts], [host(src) for src in srcs]
        pending = self.accelerator.copies.enqueued(self, dsts)

        def land() -> None:
            with torch.no_grad():
                for dst, src in zip(dsts, srcs, strict=True):
                    dst.copy_(src)
            self.accelerator.copies.landed(pending)

        self._put(_Item("copy", land, label=label))

    def record_event(self, event: FakeEvent | None = None) -> FakeEvent:
        event = event if event is not None else FakeEvent(self.owner)
        event.record(self)
        return event

    def wait_event(self, event: FakeEvent) -> None:
        """Work queued on this stream from now on runs only after ``event`` completed."""
        point = event._point()  # the point recorded now: a later re-record does not move it
        self._put(_Item("wait", lambda: _wait(point, f"{event}"), label=f"wait {event.id}"))

    def wait_stream(self, other: FakeStream) -> None:
        self.wait_event(other.record_event())

    def query(self) -> bool:
        """Whether every item queued so far has run."""
        with self._wake:
            return not self._queue and self._idle.is_set()

    def synchronize(self) -> None:
        """Block until every item queued so far has run."""
        self.record_event().synchronize()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hold this stream's thread for the block (see :class:`Gate`)."""
        with self.gate.held():
            yield

    def pending(self) -> list[str]:
        """Labels of the items queued and not run yet."""
        with self._wake:
            return [item.label for item in self._queue]

    # -- the stream's thread ---------------------------------------------------------------------

    def _put(self, item: _Item) -> None:
        if self.accelerator.stopping.is_set():
            raise RuntimeError(f"{self} was closed")
        with self._wake:
            self._queue.append(item)
            self._idle.clear()
            self._wake.notify()

    def _work(self) -> None:
        stopping = self.accelerator.stopping
        while True:
            with self._wake:
                while not self._queue:
                    self._idle.set()
                    if stopping.is_set():
                        return
                    self._wake.wait(0.05)
            self.gate.pass_through(stopping)
            with self._wake:
                item = self._queue.popleft()
            try:
                if stopping.is_set() and item.kind in ("wait", "copy", "kernel"):
                    pass  # shutting down: only events are still completed, to free waiters
                else:
                    item.run()
            except BaseException as error:  # noqa: BLE001 - kept for the test to see
                self.accelerator.errors.append((self, item.label, error))
                if item.kind == "wait":  # a wait that failed must not let later work run early
                    pass
            finally:
                self.ran.append(item.label)
                item.done.set()

    def _stop(self) -> None:
        self.gate.release()
        with self._wake:
            self._wake.notify()
        self._thread.join(TIMEOUT)


# -- devices --------------------------------------------------------------------------------------


class FakeDevice:
    """One fake accelerator device: a default stream, a current stream per thread, its tensors."""

    def __init__(self, accelerator: FakeAccelerator, index: int) -> None:
        self.accelerator = accelerator
        self.index = index
        self.default_stream = FakeStream(self, "default")
        self.streams: list[FakeStream] = [self.default_stream]
        self._current = threading.local()
        self._staging: FakeStream | None = None

    def __repr__(self) -> str:
        return f"<FakeDevice {self.index}>"

    @property
    def torch_device(self) -> torch.device:
        """The ``torch.device`` a backend adapter reports for this device's tensors."""
        return torch.device(self.accelerator.device_type, self.index)

    def new_stream(self, name: str = "") -> FakeStream:
        stream = FakeStream(self, name)
        self.streams.append(stream)
        return stream

    def current_stream(self) -> FakeStream:
        """This thread's current stream on this device (the default stream unless set)."""
        stream: FakeStream | None = getattr(self._current, "stream", None)
        return stream if stream is not None else self.default_stream

    @contextlib.contextmanager
    def stream(self, stream: FakeStream) -> Iterator[FakeStream]:
        """Make ``stream`` this thread's current stream for the block (``torch.cuda.stream``)."""
        if stream.owner is not self:
            raise ValueError(f"{stream} is not a stream of {self}")
        previous = getattr(self._current, "stream", None)
        self._current.stream = stream
        try:
            yield stream
        finally:
            self._current.stream = previous

    def tensor(self, data: torch.Tensor | Sequence[float] | float) -> torch.Tensor:
        """A tensor on this device (``privateuseone:<index>``) holding a copy of ``data``."""
        return self.accelerator.adopt(torch.as_tensor(data).clone(), self)

    def zeros(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.accelerator.adopt(torch.zeros(*shape, dtype=dtype), self)

    @property
    def staging(self) -> FakeStream:
        """The stream the fake backend enqueues astage's copies on (made on first use)."""
        with self.accelerator._records_lock:
            if self._staging is None:
                self._staging = self.new_stream("staging")
            return self._staging

    def synchronize(self) -> None:
        for stream in list(self.streams):
            stream.synchronize()


# -- ledgers --------------------------------------------------------------------------------------


@dataclass
class PendingCopies:
    """Copies enqueued on a stream together, not landed yet: the bytes they will write."""

    stream: FakeStream
    ranges: list[tuple[int, int]]  # [start, end) host addresses written
    enqueued_by: str
    landed: bool = False


class CopyLedger:
    """Every copy enqueued on a fake stream, and whether it has landed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[PendingCopies] = []
        self.enqueued_count = 0
        self.landed_count = 0
        self.some_enqueued = threading.Event()

    def enqueued(self, stream: FakeStream, dsts: Sequence[torch.Tensor]) -> PendingCopies:
        ranges = [_byte_range(dst) for dst in dsts]
        pending = PendingCopies(stream, ranges, threading.current_thread().name)
        with self._lock:
            self._pending.append(pending)
            self.enqueued_count += 1
        self.some_enqueued.set()
        return pending

    def landed(self, pending: PendingCopies) -> None:
        with self._lock:
            pending.landed = True
            self._pending.remove(pending)
            self.landed_count += 1

    def pending(self) -> list[PendingCopies]:
        with self._lock:
            return list(self._pending)

    def pending_into(self, start: int, nbytes: int) -> list[PendingCopies]:
        """Copies not landed yet that write any byte of ``[start, start + nbytes)``."""
        end = start + max(nbytes, 1)
        with self._lock:
            return [p for p in self._pending if any(s < end and start < e for s, e in p.ranges)]


def _byte_range(tensor: torch.Tensor) -> tuple[int, int]:
    start = tensor.data_ptr()
    if tensor.numel() == 0:
        return start, start
    span = sum(
        (size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True)
    )
    return start, start + (span + 1) * tensor.element_size()


@dataclass(frozen=True)
class PinRecord:
    """One pin or unpin: of what, in which thread, with which device selected there."""

    op: str  # "pin" or "unpin"
    ptr: int
    nbytes: int
    thread: str
    thread_id: int
    device: int | None
    pending_copies: int
    """Copies into these bytes that had not landed when this happened (must be 0 for unpin)."""


class PinLedger:
    """A fake ``cudaHostRegister``/``cudaHostUnregister``, and a log of who called them when.

    ``register``/``unregister``/``clear_last_error`` have the signatures of astage's wrappers
    in ``astage._torch``, so the fixture can put them in place of the CUDA runtime.
    """

    def __init__(self, accelerator: FakeAccelerator) -> None:
        self._accelerator = accelerator
        self._lock = threading.Lock()
        self.records: list[PinRecord] = []
        self.pinned: dict[int, int] = {}  # ptr -> nbytes
        self.register_code = 0
        """Set non-zero to make every registration fail with this CUDA error code."""
        self.last_error: dict[int, int] = {}  # thread id -> CUDA "last error" left there

    def _log(self, op: str, ptr: int, nbytes: int) -> PinRecord:
        pending = len(self._accelerator.copies.pending_into(ptr, nbytes))
        thread = threading.current_thread()
        record = PinRecord(
            op,
            ptr,
            nbytes,
            thread.name,
            thread.ident or 0,
            self._accelerator.current_device_index(),
            pending,
        )
        with self._lock:
            self.records.append(record)
        return record

    def register(self, ptr: int, nbytes: int, flags: int = 1) -> int:
        self._log("pin", ptr, nbytes)
        if self.register_code:
            self.last_error[threading.get_ident()] = self.register_code
            return self.register_code
        with self._lock:
            if ptr in self.pinned:
                raise AssertionError(f"{ptr:#x} registered twice")
            self.pinned[ptr] = nbytes
        return 0

    def unregister(self, ptr: int) -> int:
        with self._lock:
            nbytes = self.pinned.pop(ptr, None)
        if nbytes is None:
            raise AssertionError(f"unregistered {ptr:#x}, which is not pinned")
        self._log("unpin", ptr, nbytes)
        return 0

    def clear_last_error(self) -> int:
        return self.last_error.pop(threading.get_ident(), 0)

    def pins(self) -> list[PinRecord]:
        with self._lock:
            return [r for r in self.records if r.op == "pin"]

    def unpins(self) -> list[PinRecord]:
        with self._lock:
            return [r for r in self.records if r.op == "unpin"]

    def unpinned_under_copies(self) -> list[PinRecord]:
        """Unpins that happened while a copy into the memory was still pending."""
        return [r for r in self.unpins() if r.pending_copies]

    def on_threads(self, thread_ids: set[int | None]) -> list[PinRecord]:
        """Pins and unpins made on any of the given threads."""
        with self._lock:
            return [r for r in self.records if r.thread_id in thread_ids]


# -- the accelerator ------------------------------------------------------------------------------


class FakeAccelerator:
    """Fake devices, their tensors, a current device per thread, and the copy and pin ledgers."""

    def __init__(self, devices: int = 2) -> None:
        self.device_type = "privateuseone"
        _register_device_module()
        self.stopping = threading.Event()
        self.errors: list[tuple[FakeStream, str, BaseException]] = []
        self.copies = CopyLedger()
        self.pins = PinLedger(self)
        self.records: list[tuple[FakeEvent, FakeStream, str]] = []
        """Every event recorded: the event, the stream, the recording thread's name."""
        self._records_lock = threading.Lock()
        # storage key of a fake tensor -> its device and the CPU storage over the same memory
        self._twins: dict[int, tuple[FakeDevice, torch.UntypedStorage]] = {}
        self._current_device = threading.local()
        self.devices = [FakeDevice(self, index) for index in range(devices)]

    # -- devices --------------------------------------------------------------------------------

    def device(self, which: int | torch.device | FakeDevice | None = None) -> FakeDevice:
        """The fake device for an index, a ``torch.device``, or None (this thread's current)."""
        if isinstance(which, FakeDevice):
            return which
        if isinstance(which, torch.device):
            which = which.index
        if which is None:
            which = self.current_device_index() or 0
        return self.devices[which]

    def current_device_index(self) -> int | None:
        """The device selected in this thread (None: never selected, like CUDA's lazy 0)."""
        index: int | None = getattr(self._current_device, "index", None)
        return index

    def set_device(self, which: int | torch.device | FakeDevice) -> None:
        self._current_device.index = self.device(which).index

    def restore_device(self, index: int | None) -> None:
        """Put back what :meth:`current_device_index` returned (None: never selected)."""
        self._current_device.index = index

    def synchronize(self) -> None:
        for device in self.devices:
            device.synchronize()

    # -- tensors --------------------------------------------------------------------------------

    def adopt(self, host: torch.Tensor, device: FakeDevice) -> torch.Tensor:
        """A ``privateuseone:<index>`` tensor over ``host``'s memory (which it keeps alive).

        torch dispatches no operator of such a tensor (no kernels are registered for the
        device): astage can only read its metadata and hand it to a backend, which is the point.
        Kernels of a test change it through :meth:`host`.
        """
        tensor = _on_fake_device(host.contiguous(), device.index)
        storage = tensor.untyped_storage()
        key = _storage_key(storage)
        self._twins[key] = (device, host.untyped_storage())
        # A later storage at the same address must not inherit the twin.
        weakref.finalize(storage, self._twins.pop, key, None)
        return tensor

    def owner(self, storage: torch.UntypedStorage) -> FakeDevice | None:
        """The fake device whose memory ``storage`` is, or None for host memory."""
        twin = self._twins.get(_storage_key(storage))
        return twin[0] if twin is not None else None

    def owns(self, tensor: torch.Tensor) -> bool:
        return self.owner(tensor.untyped_storage()) is not None

    def host(self, tensor: torch.Tensor) -> torch.Tensor:
        """A CPU tensor over the same memory as fake ``tensor`` (same offset, shape, strides).

        What kernels and copies on fake streams read and write: ``host(x).fill_(7.0)``.
        """
        twin = self._twins.get(_storage_key(tensor.untyped_storage()))
        if twin is None:
            if tensor.device.type == "cpu":
                return tensor
            raise ValueError(f"a tensor on {tensor.device} that this fake accelerator did not make")
        return torch.empty((0,), dtype=tensor.dtype).set_(
            twin[1], tensor.storage_offset(), tensor.shape, tensor.stride()
        )

    # -- bookkeeping ----------------------------------------------------------------------------

    def _note_record(self, event: FakeEvent, stream: FakeStream) -> None:
        with self._records_lock:
            self.records.append((event, stream, threading.current_thread().name))

    def records_on(self, stream: FakeStream) -> list[FakeEvent]:
        """Events recorded so far on ``stream``, oldest first."""
        with self._records_lock:
            return [event for event, on, _ in self.records if on is stream]

    def wait_until(self, condition: Callable[[], bool], what: str) -> None:
        """Poll ``condition`` from a plain thread until true (fails after :data:`TIMEOUT`)."""
        deadline = time.monotonic() + TIMEOUT
        while not condition():
            if time.monotonic() > deadline:
                raise FakeTimeoutError(f"timed out waiting until {what}")
            time.sleep(0.001)

    def close(self) -> None:
        """Stop every stream thread; work still queued is dropped, events are completed."""
        self.stopping.set()
        for device in self.devices:
            for stream in device.streams:
                stream._stop()


def _storage_key(storage: torch.UntypedStorage) -> int:
    return int(storage._cdata)


# -- tensors on a device that has no kernels ------------------------------------------------------
#
# No Python code can add a device type with memory of its own, but DLPack can label memory with
# a device: ``kDLExtDev`` is torch's PrivateUse1. A CPU tensor exported to DLPack, relabelled,
# and imported again is a real ``privateuseone:<index>`` tensor (its storage on that device too)
# over the CPU memory, which it keeps alive. torch needs a ``torch.privateuseone`` module to
# import one, and nothing else: no hooks are registered, so ``torch.accelerator`` still reports
# no accelerator and the rest of the process is unaffected.

_KDL_EXT_DEV = 12  # DLDeviceType kDLExtDev, which torch maps to PrivateUse1


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int), ("device_id", ctypes.c_int)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [
        ("dl_tensor", _DLTensor),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", ctypes.c_void_p),
    ]


_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


def _on_fake_device(host: torch.Tensor, index: int) -> torch.Tensor:
    capsule = host.__dlpack__()
    managed = _DLManagedTensor.from_address(_capsule_pointer(capsule, b"dltensor"))
    managed.dl_tensor.device.device_type = _KDL_EXT_DEV
    managed.dl_tensor.device.device_id = index
    tensor: torch.Tensor = torch.utils.dlpack.from_dlpack(capsule)
    assert tensor.device == torch.device("privateuseone", index), tensor.device
    return tensor


def _register_device_module() -> None:
    """Give torch the ``torch.privateuseone`` module it needs to accept such tensors.

    It stays registered for the rest of the process (torch has no way to unregister one), so it
    says what is true for everyone else: no such device is available. Code that asks (DCP's
    file writer does, and so does ``torch.manual_seed``) then leaves it alone.
    """
    if hasattr(torch, "privateuseone"):
        return
    module: Any = types.ModuleType("fake_accelerator_device")
    module.is_available = lambda: False
    module.device_count = lambda: 0
    module._is_in_bad_fork = lambda: False
    module.manual_seed_all = lambda seed: None
    torch._register_device_module("privateuseone", module)


# -- the backend astage sees ----------------------------------------------------------------------


class FakeBackend:
    """astage's ``DeviceBackend`` for the fake devices (``astage._devices._backend``).

    Install it with ``astage._devices._backend.installed(FakeBackend(acc))``: every batch of a
    fake tensor then goes through :meth:`enqueue` (there is no other way to copy one: torch has
    no kernel that reads it), and every producer mark through :meth:`mark`. Records who did what,
    in which thread, for the tests.
    """

    def __init__(self, accelerator: FakeAccelerator) -> None:
        self.accelerator = accelerator
        self.marks: list[tuple[torch.device, FakeStream, str]] = []
        """Producer marks: device, the stream marked, the marking thread's name."""
        self.enqueues: list[tuple[torch.device, int, str]] = []
        """Batches enqueued: device, number of copies, the enqueuing thread's name."""
        self.enqueue_gate = Gate()
        """Held by a test: :meth:`enqueue` stops after enqueuing its copies, before it returns
        (so that a cancellation can reach the caller while copies are already in flight)."""
        self._lock = threading.Lock()

    def handles(self, device: torch.device) -> bool:
        return device.type == self.accelerator.device_type and (device.index or 0) < len(
            self.accelerator.devices
        )

    def current_device(self) -> torch.device | None:
        index = self.accelerator.current_device_index()
        return torch.device(self.accelerator.device_type, index or 0)

    def mark(self, device: torch.device) -> Any:
        owner = self.accelerator.device(device)
        stream = owner.current_stream()
        event = stream.record_event()
        with self._lock:
            self.marks.append((device, stream, threading.current_thread().name))
        return _mark(device, event)

    def mark_after(self, source: object) -> Any:
        if isinstance(source, FakeStream):
            return _mark(source.device, source.record_event())
        if isinstance(source, FakeEvent) and source.device is not None:
            return _mark(source.device, source)
        from astage._errors import InvalidOptionsError

        raise InvalidOptionsError(f"after= takes a fake stream or event, not {source!r}")

    def is_capturing(self, device: torch.device) -> bool:
        return self.accelerator.device(device).current_stream().capturing

    def enqueue(self, batch: Any, after: Sequence[Any], *, non_blocking: bool) -> FakeEvent:
        owner = self.accelerator.device(batch.device)
        # The backend selects the batch's device itself, and gives the thread back as it found
        # it: on the blocking face this is the caller's thread, whose current device is its own.
        previous = self.accelerator.current_device_index()
        self.accelerator.set_device(owner)
        try:
            stream = owner.staging
            for mark in after:
                stream.wait_event(mark.event)
            stream.enqueue_copies(batch.dsts, batch.srcs)
        finally:
            self.accelerator.restore_device(previous)
        with self._lock:
            self.enqueues.append((batch.device, len(batch.srcs), threading.current_thread().name))
        done = stream.record_event(FakeEvent(owner, blocking=True))
        self.enqueue_gate.pass_through(self.accelerator.stopping)
        return done

    def synchronize(self) -> None:
        for owner in self.accelerator.devices:
            if owner._staging is not None:
                owner._staging.synchronize()


def _mark(device: torch.device, event: FakeEvent) -> Any:
    from astage._devices._backend import Mark

    return Mark(device, event)
