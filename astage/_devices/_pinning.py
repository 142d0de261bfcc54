"""Page-locking host buffers with CUDA: when a buffer is pinned, and when and where it is unpinned.

Pinning. The cache decides which buffers want it (``HostBuffer.wants_pin``: accelerator
sources, at least ``pin_memory_min_bytes``); :func:`begin_copies` pins them, in the thread that
enqueues their copies, just before the first copy into them, because ``cudaHostRegister`` costs
about 0.1 s per GB and must not run on an event loop or a training thread. It registers exactly
the buffer's bytes (``torch.empty(pin_memory=True)`` would round each request up to a power of
two) and hangs a :class:`Pin` on the buffer. Only buffers of devices whose backend asks for it
are registered (``pin_buffers``: the CUDA backend's ``pins_host_memory``): the registration is
CUDA's, and helps no other accelerator's copies.

Unpinning. Three rules, each against a real failure:

- *Never under a copy.* Unregistering memory that a device copy is still writing into is
  undefined behaviour. :func:`begin_copies` counts a copy in flight into every buffer of a
  batch (``HostBuffer.copy_started``), and :meth:`CopiesInFlight.landed` takes the count back
  once the batch's copies have completed; the cache lets go of a dropped buffer's pin only when
  its count is zero, and the last copy to land lets go of it otherwise.
- *Never in a training thread.* A buffer is evicted in a weak-reference callback, in whatever
  thread drops the last reference to its source: usually the training thread, which must not
  pay for an unregistration, nor be left with a CUDA error, nor create a CUDA context. Letting go
  of a pin therefore only queues it (:meth:`Pin.release`, one atomic ``deque.append``); astage's
  threads unregister what is queued (:func:`unpin_released`): each batch, before it pins, and
  the stagers' close (the async face in a worker thread; the blocking face in its caller's
  thread, like all of its work). A process that exits drains nothing: CUDA may already be torn
  down, and the kernel unpins a dead process's memory anyway.
- *On the buffer's device.* Every runtime call acts on the calling thread's current device, and a
  worker thread that never chose one is on device 0, where the call would create a context on a
  GPU that may belong to another rank. Registering and unregistering select the source's device
  first (``_torch.cuda_selected_device``).

A failed registration is not fatal: pinning only speeds copies up, so the buffer stays pageable,
is not tried again, and a warning says why. Either way the failure leaves no CUDA error behind:
the runtime also records a failed call as the thread's "last error", which torch reads after
every kernel launch, so the next, unrelated kernel in that thread would fail with it. A failed
unregistration is logged and counted (:data:`counters`), never silently dropped.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .. import _torch
from .._core._batches import Batch
from .._core._cache import HostBuffer

_log = logging.getLogger("astage")

# Held while registering a buffer (two threads must not register the same memory: CUDA refuses
# the second), while counting copies into a batch's buffers, and while unregistering a queued
# pin. The last two under one lock is what makes "no copy in flight" and "unregister" one step:
# a copy counted after the check would write into memory being unregistered. Only astage's
# worker threads take it; the threads that drop buffers never do.
_pin_lock = threading.Lock()
# Counters are incremented from several threads: ``+=`` is not atomic.
_counter_lock = threading.Lock()

_released: collections.deque[Pin] = collections.deque()
"""Pins let go of by the cache, waiting for one of astage's threads to unregister them.

A deque because ``append`` (any thread) and ``popleft`` (the drainers) are atomic under the GIL.
A pin may be queued more than once; it is unregistered once."""

_registered: set[Pin] = set()
"""Every pin registered and not yet unregistered (changed under ``_pin_lock``).

Why: a pin keeps its memory alive, and the cache keeps the pin only on its buffer. A buffer
whose copy was never reported landed (its driver's wait failed) keeps its pin when dropped, by
design a leak rather than an unpin under a copy; but once the buffer was collected, the pin
went with it and so did the memory, freed while still registered: CUDA kept the stale range,
and a later buffer allocated over it was refused its registration (``cudaHostRegister`` of
memory already registered). Held here, a leaked pin keeps its memory, as a queued one does."""


@dataclass
class PinCounters:
    """How often pinning failed in this process (for diagnostics and tests)."""

    register_failures: int = 0
    """Buffers left pageable because ``cudaHostRegister`` refused them."""
    unregister_failures: int = 0
    """Pins whose ``cudaHostUnregister`` failed (logged as warnings too)."""


counters = PinCounters()


class Pin:
    """A buffer's registration with CUDA: the memory, kept alive until it is unregistered."""

    __slots__ = ("copies", "device", "memory", "nbytes", "pid", "ptr")

    def __init__(self, buffer: HostBuffer, device: int | None) -> None:
        self.memory: torch.Tensor | None = buffer.whole
        """The registered bytes: freeing them while registered would leave CUDA a stale range."""
        self.ptr = buffer.whole.data_ptr()
        """0 once unregistered."""
        self.nbytes = buffer.nbytes
        self.device = device
        """The CUDA device selected around the runtime calls (None: the thread's current one)."""
        self.copies = buffer.copies
        """The buffer's copies in flight (the same list): checked again just before unpinning."""
        self.pid = os.getpid()
        """The registering process: a forked child must not unregister its parent's pins."""

    @property
    def active(self) -> bool:
        """Whether the memory is still registered."""
        return self.ptr != 0

    def release(self) -> None:
        """Queue the pin for unregistration by astage; any thread, never blocks, never CUDA."""
        _released.append(self)


class CopiesInFlight:
    """The copies of one batch, counted into its buffers until :meth:`landed` is called."""

    __slots__ = ("_buffers",)

    def __init__(self, buffers: list[HostBuffer]) -> None:
        # A one-item list: ``pop`` hands the buffers to exactly one caller of landed().
        self._buffers = [buffers]

    def landed(self) -> None:
        """The batch's copies have all completed; idempotent, any thread.

        For device copies: call it only once their completion event has completed, never
        when waiting for it was abandoned (the pins then stay: a leak, never a corruption).
        """
        try:
            buffers = self._buffers.pop()
        except IndexError:
            return
        for buffer in buffers:
            buffer.copy_finished()


def begin_copies(batch: Batch, *, pin_buffers: bool) -> CopiesInFlight:
    """Get the batch's buffers ready for its copies; call in astage's thread, before enqueueing.

    Unregisters the pins queued so far, pins the buffers that want it when ``pin_buffers``
    (the batch's backend says its copies gain from page-locked memory; first copy only), and
    counts a copy in flight into each buffer that may be pinned. Call
    :meth:`CopiesInFlight.landed` on the result once every copy of the batch has completed.
    """
    unpin_released()
    counted = [buffer for buffer in batch.buffers if buffer.copies is not None]
    for buffer in counted:
        if buffer.wants_pin and buffer.registration is None:
            if pin_buffers:
                pin(buffer)
            else:  # this device's copies gain nothing from a CUDA pin: never ask again
                buffer.wants_pin = False
    with _pin_lock:
        for buffer in counted:
            buffer.copy_started()
    return CopiesInFlight(counted)


def pin(buffer: HostBuffer) -> None:
    """Register ``buffer`` with CUDA if it wants that and is not yet; call from astage's thread.

    The caller decided that the buffer's device gains from it (:func:`begin_copies`).
    """
    if not buffer.wants_pin or buffer.registration is not None:
        return
    device = buffer.device
    with _pin_lock:
        if not buffer.wants_pin or buffer.registration is not None or buffer.dropped:
            return
        registration = Pin(buffer, device.index)
        if not register(registration.ptr, buffer.nbytes, device.index):
            buffer.wants_pin = False  # a retry would cost as much as a success, and fail again
            return
        buffer.registration = registration
        _registered.add(registration)
    # The cache may have dropped the buffer while we registered it: see HostBuffer.release
    # for why reading ``dropped`` after setting ``registration`` leaves no pin behind.
    if buffer.dropped:
        buffer.release()


def unpin_released() -> int:
    """Unregister every queued pin that no copy is writing into; returns how many it unpinned.

    Call only from astage's own threads (a copy worker, a close). Cheap when nothing is queued.
    A pin skipped because a copy into it is in flight is queued again when that copy lands.
    """
    unpinned = 0
    while _released:
        try:
            pin = _released.popleft()
        except IndexError:  # another thread took the last one
            break
        if pin.pid != os.getpid():
            pin.ptr = 0  # the parent process's pin (we are a forked child): not ours to undo
            pin.memory = None
            _registered.discard(pin)
            continue
        with _pin_lock:
            if pin.copies or not pin.ptr:
                continue
            unregister(pin.ptr, pin.device)
            pin.ptr = 0
            pin.memory = None
            _registered.discard(pin)
        unpinned += 1
    return unpinned


def pending_unpins() -> Sequence[Pin]:
    """The pins queued for unregistration (a snapshot, for diagnostics and tests)."""
    return tuple(_released)


@contextlib.contextmanager
def _on_device(device: int | None) -> Iterator[None]:
    if device is None:
        yield
        return
    with _torch.cuda_selected_device(device):
        yield


def register(ptr: int, nbytes: int, device: int | None = None) -> bool:
    """Page-lock ``nbytes`` at ``ptr`` with ``device`` selected; False, with a warning and no
    CUDA error left, if refused."""
    code: int | None = None
    try:
        with _on_device(device):
            code = _torch.cuda_host_register(ptr, nbytes)
            if code != 0:
                _torch.cuda_clear_last_error()
    # The runtime raised instead of answering (torch's bindings failing to load or initialize
    # CUDA: RuntimeError; MemoryError): no registration was made, and pinning only speeds
    # copies up, so the buffer stays pageable like after a refusal. Letting it out failed the
    # call with a raw error, and every later call again, since the buffer still wanted a pin.
    except (RuntimeError, MemoryError) as error:
        if code == 0:
            # Registered, and then leaving the device selection failed: the memory is pinned,
            # so the pin must be kept to be undone (reported as a failure, it would stay
            # registered, unknown to astage, after its memory was freed).
            return True
        reason = f"{type(error).__name__}: {error}"
    else:
        if code == 0:
            return True
        reason = f"CUDA error {code}"
    with _counter_lock:
        counters.register_failures += 1
    warnings.warn(
        f"cudaHostRegister of a {nbytes}-byte host buffer failed with {reason}; the "
        "buffer stays pageable (device-to-host copies into it are slower). Raise the "
        "locked-memory limit (ulimit -l), or set pin_memory=False to stop trying.",
        RuntimeWarning,
        stacklevel=3,
    )
    return False


def unregister(ptr: int, device: int | None = None) -> None:
    """Unpin memory pinned by :func:`register`, ``device`` selected; a failure is logged and
    counted."""
    try:
        with _on_device(device):
            code = _torch.cuda_host_unregister(ptr)
            if code != 0:
                _torch.cuda_clear_last_error()  # leave this thread no error for its next launch
    # Any error: the CUDA runtime is unusable (torn down at exit, a broken context); the
    # memory stays pinned, which only the process's exit undoes.
    except Exception as error:  # noqa: BLE001
        if sys.is_finalizing():
            return  # at interpreter exit the process is going anyway
        reason = f"{type(error).__name__}: {error}"
    else:
        if code == 0:
            return
        reason = f"CUDA error {code}"
    with _counter_lock:
        counters.unregister_failures += 1
    _log.warning("cudaHostUnregister of the host buffer at %#x failed (%s)", ptr, reason)
