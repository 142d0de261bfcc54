"""Staging from any accelerator torch supports, on ``torch.Stream``, ``torch.Event`` and
``torch.accelerator`` (XPU, HPU, MPS, PrivateUse1 devices, and the base of the CUDA backend).

A batch of many small copies is gathered on the device and sent to the host in one transfer
(:mod:`astage._devices._gather`); any other batch is one ``copy_`` per copy.

Ran on CUDA only (an H200, as the base of the CUDA backend): written against torch 2.11-2.13
and tested on CPU through a fake backend that implements the same interface (see
:mod:`astage._devices._backend`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .._core._batches import Batch
from .._errors import InvalidOptionsError
from ._backend import Completion, Mark
from ._gather import (
    GatheredCompletion,
    GatheredCopies,
    SlabPools,
    enqueue_gather,
    pageable_slab,
    should_gather,
)

SPARE_EVENTS = 64
"""Completed events a backend keeps per device for later batches (about the batches in flight)."""


class DeviceCompletion:
    """An event recorded after a batch's copies; ``synchronize()`` selects its device first.

    Once the batch has landed (:meth:`recycle`), the event goes back to its backend for a later
    batch instead of being dropped. Why: destroying a CUDA event waits for the driver's lock,
    which a page-lock (``cudaHostRegister``) in another thread holds for as long as it runs;
    an event dropped on an event loop held the loop for 6-9 ms per 16 MiB buffer pinned
    meanwhile (H200, first call over 1 GiB from the device: ``benchmarks/gpu_lag_probe.py``).
    """

    __slots__ = ("_backend", "_device", "event")

    def __init__(self, backend: GenericBackend, device: torch.device, event: Any) -> None:
        self._backend = backend
        self._device = device
        self.event: Any = event
        """The event; None once recycled (it had completed)."""

    def query(self) -> bool:
        event = self.event
        return event is None or bool(event.query())

    def synchronize(self) -> None:
        event = self.event
        if event is None:
            return
        # A worker thread has device 0 selected: waiting there would create a context on it.
        with self._backend.selected(self._device):
            event.synchronize()

    def recycle(self) -> None:
        """Hand the event back to the backend; call only once it was seen complete.

        Never blocks and never calls the device runtime (safe on an event loop). A later
        ``query()`` is True; a caller that still held the event may see it recorded again for
        a later batch, and then waits longer, never less.
        """
        event, self.event = self.event, None
        if event is not None:
            self._backend.keep_event(self._device, event)


class GenericBackend:
    """One staging stream per device of ``device_type``, the current ``torch.accelerator``."""

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type
        self._streams: dict[int, Any] = {}
        self._mark_streams: dict[int, Any] = {}
        """Per device, where an ``after=`` event's present point is taken (``_mark_event``)."""
        self._lock = threading.Lock()
        self._slabs = SlabPools(self._allocate_slab)
        """Host slabs of gathered batches, per device (:mod:`astage._devices._gather`)."""
        self._spare_events: dict[torch.device, list[Any]] = {}
        """Completed events of landed batches, per device, for later batches."""

    # -- what subclasses specialise --------------------------------------------------------

    def _new_stream(self, device: torch.device) -> Any:
        return torch.Stream(device)

    def _current_stream(self, device: torch.device) -> Any:
        return torch.accelerator.current_stream(device)

    def _record_done(self, stream: Any) -> Any:
        """A new event, recorded on ``stream``."""
        return stream.record_event()

    def _record_again(self, event: Any, stream: Any) -> None:
        """Record a spare event (one that completed) on ``stream`` again."""
        event.record(stream)

    def _wait(self, stream: Any, event: Any) -> None:
        stream.wait_event(event)

    def _use_stream(self, stream: Any) -> contextlib.AbstractContextManager[Any]:
        return stream  # type: ignore[no-any-return]  # torch.Stream is its own context

    def _allocate_slab(self, nbytes: int) -> torch.Tensor:
        """A host slab for gathered transfers: pageable here (CUDA's are page-locked)."""
        return pageable_slab(nbytes)

    def _is_stream(self, item: object) -> bool:
        return isinstance(item, torch.Stream)

    def _is_event(self, item: object) -> bool:
        return isinstance(item, torch.Event)

    @contextlib.contextmanager
    def selected(self, device: torch.device) -> Iterator[None]:
        """Select ``device`` in this thread for the block."""
        with torch.accelerator.device_index(device.index):
            yield

    # -- the interface ---------------------------------------------------------------------

    def handles(self, device: torch.device) -> bool:
        return device.type == self.device_type

    def pins_host_memory(self, device: torch.device) -> bool:
        """False: astage pins with ``cudaHostRegister``, which helps CUDA's copies only."""
        return False

    def current_device(self) -> torch.device | None:
        module = getattr(torch, self.device_type, None)
        is_initialized = getattr(module, "is_initialized", None)
        if callable(is_initialized) and not is_initialized():
            return None  # no tensor on it yet; asking for the index could initialize it
        return torch.device(self.device_type, torch.accelerator.current_device_index())

    def mark(self, device: torch.device) -> Mark:
        return Mark(device, self._current_stream(device).record_event())

    def mark_after(self, source: object) -> Mark:
        device = getattr(source, "device", None)
        if not isinstance(device, torch.device) or not self.handles(device):
            raise InvalidOptionsError(f"after=: {source!r} is not on a {self.device_type} device")
        if self._is_event(source):
            return self._mark_event(device, source)
        if self._is_stream(source):
            return Mark(device, source.record_event())  # type: ignore[attr-defined]
        raise InvalidOptionsError(
            f"after= takes a {self.device_type} stream or event, got {type(source).__name__}"
        )

    def _mark_event(self, device: torch.device, event: Any) -> Mark:
        """A mark of the point ``event`` marks now, at the call.

        Why not ``event`` itself: a stream waits on the point an event was *last* recorded at
        when the wait is enqueued (``cudaStreamWaitEvent``), and the staging stream waits in a
        worker thread, after the call has returned its coroutine. A caller that records the
        same event again meanwhile (one event reused every step, or recorded on another
        stream) would move the copies' order to the new point: after unrelated work, or no
        longer after the producer. A stream of the backend's own waits on the event now and
        records a mark of its own, which completes once the event's present point has.
        """
        with self.selected(device):
            stream = self._stream(self._mark_streams, device)
            self._wait(stream, event)
            return Mark(device, self._record_done(stream))

    def is_capturing(self, device: torch.device) -> bool:
        return bool(self._current_stream(device).is_capturing())

    def stream(self, device: torch.device) -> Any:
        """This backend's staging stream for ``device`` (made on first use)."""
        return self._stream(self._streams, device)

    def _stream(self, streams: dict[int, Any], device: torch.device) -> Any:
        index = device.index if device.index is not None else -1
        with self._lock:
            stream = streams.get(index)
            if stream is None:
                stream = streams[index] = self._new_stream(device)
            return stream

    def enqueue(self, batch: Batch, after: Sequence[Mark], *, non_blocking: bool) -> Completion:
        device = batch.device
        with self.selected(device):
            stream = self.stream(device)
            for mark in after:
                self._wait(stream, mark.event)
            gathered: GatheredCopies | None = None
            with torch.no_grad(), self._use_stream(stream):
                if should_gather(batch):  # many small copies: one transfer, not one launch each
                    slabs = self._slabs[device]
                    gathered = enqueue_gather(batch, slabs, non_blocking=non_blocking)
                else:
                    # One launch per copy; a plain loop keeps to copy_'s documented
                    # cross-device semantics rather than relying on foreach's fallback.
                    for dst, src in zip(batch.dsts, batch.srcs, strict=True):
                        dst.copy_(src, non_blocking=non_blocking)
                done = self._done_event(device, stream)
        completion = DeviceCompletion(self, device, done)
        if gathered is None:
            return completion
        # Complete once the host scatter ran, after the event: see GatheredCompletion.
        return GatheredCompletion(completion, gathered)

    def keep_event(self, device: torch.device, event: Any) -> None:
        """Take back a completed event for a later batch (see :meth:`DeviceCompletion.recycle`)."""
        with self._lock:
            spare = self._spare_events.setdefault(device, [])
            if len(spare) < SPARE_EVENTS:
                spare.append(event)
                return
        # Past the bound (more batches in flight at once than ever before): dropped here.

    def _done_event(self, device: torch.device, stream: Any) -> Any:
        """An event recorded on ``stream`` after the batch: a spare one, or a new one."""
        with self._lock:
            spare = self._spare_events.get(device)
            event = spare.pop() if spare else None
        if event is None:
            return self._record_done(stream)
        self._record_again(event, stream)
        return event

    def synchronize(self) -> None:
        with self._lock:
            streams = list(self._streams.values())
        for stream in streams:
            stream.synchronize()

    def release_slabs(self) -> None:
        """Drop the free host slabs of gathered transfers (those in use stay theirs)."""
        self._slabs.clear()
