"""The device interface: what astage asks of an accelerator, and which backend serves a device.

Every batch whose sources are not on the CPU goes through a :class:`DeviceBackend`; there is no
other path for device memory. A backend owns one staging stream per device and does four things
(each method's docstring states its obligation):

``mark(device)``
    In the *caller's* thread, at the call: record an event on the caller's current stream of
    ``device`` (a producer :class:`Mark`). Everything the caller queued on that stream before
    the mark is what the snapshot is ordered after.
``enqueue(batch, after, non_blocking=...)``
    In one of astage's worker threads (or the caller's, for ``SyncStager``): select the batch's
    device, make the staging stream wait on every mark in ``after``, enqueue the batch's copies
    on it, and return a :class:`Completion` recorded after them.
``is_capturing(device)``
    Whether the caller's current stream of ``device`` is capturing a graph (staging then is
    refused, before anything is enqueued).
``synchronize()``
    Wait for everything enqueued on the backend's staging streams (used by ``close``).
``pins_host_memory(device)`` (optional; absent means False)
    Whether copies from ``device`` gain from host buffers page-locked with CUDA's
    ``cudaHostRegister``: True for CUDA, False for the generic backend.

The drivers do not call ``enqueue`` directly but :func:`enqueue_batch`, which wraps it in the
host buffers' accounting: it pins what the backend wants pinned and counts the batch's copies
in flight (:func:`~astage._devices._pinning.begin_copies`) before the copies are enqueued, and
hands back :class:`DeviceCopies`, whose :meth:`~DeviceCopies.landed` the driver calls once it
has seen the completion complete. A buffer is unpinned only when no copy into it is counted, so
a backend needs to know nothing of pinning beyond its answer to ``pins_host_memory``.

Backends in the process: :class:`~astage._devices._cuda.CudaBackend` for ``cuda`` and
:class:`~astage._devices._generic.GenericBackend` (``torch.Stream``, ``torch.Event``,
``torch.accelerator``) for the current accelerator of any other type. :func:`backend_for` picks
one for a device.

Injection point (tests): :func:`installed` (or :func:`install`) puts a backend in front of the
built-in ones; :func:`backend_for` asks installed backends first, by their ``handles(device)``.
A fake asynchronous accelerator in the tests plugs in there, and both stagers, and compat's
stagers, then route that device's batches, producer marks and capture checks through it.
Stagers resolve a device's backend when they first meet the device and keep it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .._core._batches import Batch
from .._errors import InvalidOptionsError, StagingError
from ._gather import should_gather
from ._pinning import CopiesInFlight, begin_copies


@dataclass(frozen=True, slots=True)
class Mark:
    """A point on a device stream that staging must come after: an event, recorded already.

    ``event`` is whatever the backend that made the mark knows how to wait on.
    """

    device: torch.device
    event: Any


class Completion(Protocol):
    """The end of a batch's copies on a staging stream: a poll and a blocking wait.

    ``synchronize()`` may be called from a worker thread: it must select its device first, so
    that the wait creates no context on another device.
    """

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


class DeviceBackend(Protocol):
    """One kind of accelerator, as astage uses it: producer marks, staging streams, completion."""

    def handles(self, device: torch.device) -> bool:
        """Whether this backend serves tensors on ``device``."""
        ...

    def current_device(self) -> torch.device | None:
        """The device the calling thread has selected, if this backend's runtime is initialized.

        Must not initialize anything: None when no tensor can exist on the device yet.
        """
        ...

    def mark(self, device: torch.device) -> Mark:
        """A mark on the caller's current stream of ``device``; runs in the caller's thread."""
        ...

    def mark_after(self, source: object) -> Mark:
        """A mark from a user's ``after=`` item: a stream (marked now) or an event (as it is).

        Raises :class:`~astage.InvalidOptionsError` for anything else.
        """
        ...

    def is_capturing(self, device: torch.device) -> bool:
        """Whether the caller's current stream of ``device`` is capturing a graph."""
        ...

    def enqueue(self, batch: Batch, after: Sequence[Mark], *, non_blocking: bool) -> Completion:
        """Enqueue ``batch``'s copies on the staging stream of its device, after ``after``.

        Runs in a worker thread (async face) or the caller's thread (sync face), with no device
        selected: it selects ``batch.device`` itself. The staging stream waits on every mark
        in ``after`` before the copies (waiting twice on one mark is harmless). The sources
        stay alive until the completion has been seen complete (the caller keeps the batch).
        """
        ...

    def synchronize(self) -> None:
        """Block until every copy enqueued on this backend's staging streams has completed."""
        ...


def pins_host_memory(backend: DeviceBackend, device: torch.device) -> bool:
    """Whether ``backend``'s copies from ``device`` want page-locked host buffers.

    Asked through the backend's optional ``pins_host_memory(device)`` method (a backend without
    one pins nothing). Optional so that a backend written against the four calls above keeps
    working; the built-in ones define it.
    """
    answer = getattr(backend, "pins_host_memory", None)
    return bool(answer(device)) if answer is not None else False


class DeviceCopies:
    """A batch's copies enqueued on a staging stream: their completion, and their accounting.

    Wait on :attr:`completion` (``query()``/``synchronize()``), then call :meth:`landed`. Never
    call :meth:`landed` when the wait was abandoned or raised: the buffers then stay pinned (a
    leak) rather than being unpinned while the device may still write into them.
    """

    __slots__ = ("_copies", "completion")

    def __init__(self, completion: Completion, copies: CopiesInFlight) -> None:
        self.completion = completion
        self._copies = copies

    def landed(self) -> None:
        """The completion was seen complete: the batch's buffers may be unpinned. Idempotent;
        never blocks, never calls the device runtime (safe on an event loop)."""
        self._copies.landed()
        # Its event goes back to the backend rather than being destroyed in this thread,
        # which may be an event loop (see _generic.DeviceCompletion).
        recycle = getattr(self.completion, "recycle", None)
        if recycle is not None:
            recycle()


def enqueue_batch(
    backend: DeviceBackend, batch: Batch, after: Sequence[Mark], *, non_blocking: bool
) -> DeviceCopies:
    """Pin and count ``batch``'s buffers, then enqueue its copies on ``backend``, after ``after``.

    Call it in the thread that may pin (an astage worker thread on the async face; the caller's
    thread on the blocking face): registering host memory costs about 0.1 s per GB.
    """
    # A gathered batch crosses the link through one pinned slab: pinning each small buffer
    # would cost a registration apiece and speed nothing up.
    pin = pins_host_memory(backend, batch.device) and not should_gather(batch)
    copies = begin_copies(batch, pin_buffers=pin)
    try:
        completion = backend.enqueue(batch, after, non_blocking=non_blocking)
    except BaseException:
        # Some of the batch's copies may be on a staging stream already. Once the streams have
        # drained they have landed and the count may go; if even that fails, the pins stay.
        try:
            backend.synchronize()
        except Exception:  # noqa: BLE001 - the enqueue's error is the one to raise
            pass
        else:
            copies.landed()
        raise
    return DeviceCopies(completion, copies)


_installed: list[DeviceBackend] = []
_builtin: dict[str, DeviceBackend] = {}
_lock = threading.Lock()


def install(backend: DeviceBackend) -> Callable[[], None]:
    """Put ``backend`` in front of the built-in ones; returns the function that removes it."""
    with _lock:
        _installed.insert(0, backend)

    def uninstall() -> None:
        with _lock, contextlib.suppress(ValueError):
            _installed.remove(backend)

    return uninstall


@contextlib.contextmanager
def installed(backend: DeviceBackend) -> Iterator[DeviceBackend]:
    """``with installed(fake):`` route the devices ``fake`` handles through it (tests)."""
    uninstall = install(backend)
    try:
        yield backend
    finally:
        uninstall()


def backend_for(device: torch.device) -> DeviceBackend | None:
    """The backend for ``device``; None for the CPU (host copies need no stream).

    Raises :class:`~astage.StagingError` for a device no backend can order copies on (not the
    CPU, not CUDA, not the current ``torch.accelerator``): copying it from a worker thread
    would read whatever the device's streams had not yet written.
    """
    for backend in list(_installed):
        if backend.handles(device):
            return backend
    if device.type == "cpu":
        return None
    builtin = _builtin_backend(device.type)
    if builtin is None or not builtin.handles(device):
        raise StagingError(
            f"cannot stage tensors on {device}: astage copies from devices through their "
            "streams, and torch.accelerator does not serve this device type "
            f"(current accelerator: {torch.accelerator.current_accelerator()})"
        )
    return builtin


def current_backends() -> list[DeviceBackend]:
    """The backends whose current device a call marks at its start: installed ones first."""
    backends = list(_installed)
    accelerator = torch.accelerator.current_accelerator()
    builtin = _builtin_backend(accelerator.type) if accelerator is not None else None
    if builtin is not None and builtin not in backends:
        backends.append(builtin)
    return backends


def mark_after(after: object) -> list[Mark]:
    """The marks of a user's ``after=``: a stream, an event, or a list or tuple of them."""
    if after is None:
        return []
    items = list(after) if isinstance(after, (list, tuple)) else [after]
    marks = []
    for item in items:
        device = getattr(item, "device", None)
        if not isinstance(device, torch.device) or device.type == "cpu":
            raise InvalidOptionsError(
                "after= takes a device stream or event (torch.Stream, torch.Event, "
                f"torch.cuda.Stream, torch.cuda.Event, a recorded one), or a list of them; got "
                f"{type(item).__name__}"
            )
        backend = backend_for(device)
        assert backend is not None
        marks.append(backend.mark_after(item))
    return marks


def _builtin_backend(device_type: str) -> DeviceBackend | None:
    with _lock:
        backend = _builtin.get(device_type)
        if backend is None:
            backend = _make_builtin(device_type)
            if backend is not None:
                _builtin[device_type] = backend
        return backend


def _make_builtin(device_type: str) -> DeviceBackend | None:
    # Imported here: the CUDA and generic modules import this one for Mark.
    if device_type == "cuda":
        from ._cuda import CudaBackend

        return CudaBackend()
    accelerator = torch.accelerator.current_accelerator()
    if accelerator is not None and accelerator.type == device_type:
        from ._generic import GenericBackend

        return GenericBackend(device_type)
    return None
