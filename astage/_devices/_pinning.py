"""Page-locking host buffers with CUDA: when a buffer is pinned, and how the pin is undone.

The cache decides which buffers want pinning (``HostBuffer.wants_pin``); :func:`pin` does it, in
astage's own worker threads, just before the first copy into the buffer, because
``cudaHostRegister`` costs about 0.1 s per GB and must not run on an event loop or a training
thread. It registers exactly the buffer's bytes (``torch.empty(pin_memory=True)`` would round
each request up to a power of two) and hangs a :class:`Pin` on the buffer, which the cache
releases when it drops the buffer.

A failed registration is not fatal: pinning only speeds copies up, so the buffer stays pageable,
is not tried again, and a warning says why. Either way the failure leaves no CUDA error behind:
the runtime also records a failed call as the thread's "last error", which torch reads after
every kernel launch, so the next, unrelated kernel in that thread would fail with it.
A failed unregistration is logged and counted (:data:`counters`), never silently dropped.
"""

from __future__ import annotations

import logging
import sys
import threading
import warnings
from dataclasses import dataclass

from .. import _torch
from .._core._cache import HostBuffer

_log = logging.getLogger("astage")

# Registering is rare and slow; one lock for all buffers keeps two threads from registering
# the same buffer twice (CUDA refuses the second) and costs nothing that matters.
_pin_lock = threading.Lock()
# Releasing takes a lock of its own: eviction runs in training threads, which must not wait
# for a registration of some other buffer in progress.
_release_lock = threading.Lock()


@dataclass
class PinCounters:
    """How often pinning failed in this process (for diagnostics and tests)."""

    register_failures: int = 0
    """Buffers left pageable because ``cudaHostRegister`` refused them."""
    unregister_failures: int = 0
    """Pins whose ``cudaHostUnregister`` failed (logged as warnings too)."""


counters = PinCounters()


class Pin:
    """A buffer's registration with CUDA; :meth:`release` unregisters it once."""

    __slots__ = ("nbytes", "ptr")

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.ptr = ptr
        self.nbytes = nbytes

    def release(self) -> None:
        """Unregister the memory (it stays valid); idempotent and safe from any thread."""
        with _release_lock:
            ptr, self.ptr = self.ptr, 0
        if ptr:
            unregister(ptr)


def pin(buffer: HostBuffer) -> None:
    """Register ``buffer`` with CUDA if it wants that and is not yet; call from a worker thread."""
    if not buffer.wants_pin or buffer.registration is not None:
        return
    with _pin_lock:
        if not buffer.wants_pin or buffer.registration is not None or buffer.dropped:
            return
        ptr = buffer.whole.data_ptr()
        if not register(ptr, buffer.nbytes):
            buffer.wants_pin = False  # a retry would cost as much as a success, and fail again
            return
        buffer.registration = Pin(ptr, buffer.nbytes)
    # The cache may have dropped the buffer while we registered it: see HostBuffer.release
    # for why reading ``dropped`` after setting ``registration`` leaves no pin behind.
    if buffer.dropped:
        buffer.release()


def register(ptr: int, nbytes: int) -> bool:
    """Page-lock ``nbytes`` at ``ptr``; False, with a warning and no CUDA error left, if refused."""
    code = _torch.cuda_host_register(ptr, nbytes)
    if code == 0:
        return True
    _torch.cuda_clear_last_error()
    with _release_lock:
        counters.register_failures += 1
    warnings.warn(
        f"cudaHostRegister of a {nbytes}-byte host buffer failed with CUDA error {code}; the "
        "buffer stays pageable (device-to-host copies into it are slower). Raise the "
        "locked-memory limit (ulimit -l), or set pin_memory=False to stop trying.",
        RuntimeWarning,
        stacklevel=2,
    )
    return False


def unregister(ptr: int) -> None:
    """Unpin memory pinned by :func:`register`; a failure is logged and counted."""
    try:
        code = _torch.cuda_host_unregister(ptr)
    # Any error: the CUDA runtime is unusable (torn down at exit, a broken context), and this
    # may run in a finalizer, where an exception could only be printed and lost.
    except Exception as error:  # noqa: BLE001
        if sys.is_finalizing():
            return  # at interpreter exit the process is going anyway
        reason = f"{type(error).__name__}: {error}"
    else:
        if code == 0:
            return
        _torch.cuda_clear_last_error()  # this may be a training thread: leave it no error
        reason = f"CUDA error {code}"
    with _release_lock:
        counters.unregister_failures += 1
    _log.warning("cudaHostUnregister of the host buffer at %#x failed (%s)", ptr, reason)
