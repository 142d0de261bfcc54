"""Defects found in the device layer (astage/_devices), each with the test that failed before.

The device path runs on the fake asynchronous accelerator (``tests/fake_accelerator.py``) with a
backend that asks for its buffers pinned, as CUDA's does; the CUDA runtime's registration is
replaced by the fake's ledger.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch
from conftest import DRIVERS, Driver, collect
from fake_accelerator import FakeAccelerator, FakeBackend, FakeEvent, FakeStream
from torch.multiprocessing.reductions import StorageWeakRef

import astage
from astage import _torch
from astage._core._batches import Batch
from astage._devices import _cuda, _pinning
from astage._devices._backend import Mark, installed
from astage._devices._gather import SlabPool
from astage._devices._generic import GenericBackend

PINNING: dict[str, Any] = {"pin_memory": True, "pin_memory_min_bytes": 1}


class PinningFakeBackend(FakeBackend):
    """The fake backend answering ``pins_host_memory`` as CUDA's does."""

    def pins_host_memory(self, device: torch.device) -> bool:
        return True


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeAccelerator]:
    accelerator = FakeAccelerator(devices=2)
    ledger = accelerator.pins
    monkeypatch.setattr(_torch, "cuda_host_register", ledger.register)
    monkeypatch.setattr(_torch, "cuda_host_unregister", ledger.unregister)
    monkeypatch.setattr(_torch, "cuda_clear_last_error", ledger.clear_last_error)
    monkeypatch.setattr(_torch, "cuda_selected_device", lambda index: contextlib.nullcontext())
    monkeypatch.setattr(_pinning, "_released", collections.deque())
    monkeypatch.setattr(_pinning, "counters", _pinning.PinCounters())
    try:
        with installed(PinningFakeBackend(accelerator)):
            yield accelerator
    finally:
        collect()
        _pinning.unpin_released()
        accelerator.close()
    assert accelerator.errors == []


def _state(fake: FakeAccelerator) -> dict[str, torch.Tensor]:
    d0, d1 = fake.devices
    return {
        "a": d0.tensor(torch.full((1024,), 1.0)),
        "b": d1.tensor(torch.full((64,), 2.0)),
        "host": torch.full((8,), 3.0),
    }


# -- a registration that raises instead of answering ----------------------------------------------


@pytest.mark.parametrize("error", [RuntimeError, MemoryError])
@pytest.mark.parametrize("kind", DRIVERS)
def test_a_registration_that_raises_leaves_the_buffer_pageable_and_the_call_whole(
    fake: FakeAccelerator, monkeypatch: pytest.MonkeyPatch, kind: str, error: type[Exception]
) -> None:
    """``torch.cuda.cudart().cudaHostRegister`` raises rather than returning a code when torch
    cannot load or initialize the runtime (RuntimeError), or Python runs out of memory. Pinning
    only speeds copies up: such a failure must leave the buffer pageable with a warning, like a
    refused registration. Before, the raw error failed the call, and every later call, since
    the buffer still wanted a pin."""
    calls: list[int] = []

    def raising(ptr: int, nbytes: int, flags: int = 1) -> int:
        calls.append(ptr)
        raise error("CUDA driver initialization failed")

    monkeypatch.setattr(_torch, "cuda_host_register", raising)
    state = _state(fake)
    driver = Driver(kind, **PINNING)
    try:
        with pytest.warns(RuntimeWarning, match="CUDA driver initialization failed"):
            staged = driver.stage(state)
        assert torch.all(staged["a"] == 1.0) and torch.all(staged["b"] == 2.0)
        assert torch.all(staged["host"] == 3.0)
        tried = len(calls)
        assert tried == 2  # the two device buffers, once each
        fake.host(state["a"]).fill_(5.0)
        staged = driver.stage(state)  # usable, and the refused buffers are not tried again
        assert torch.all(staged["a"] == 5.0)
        assert len(calls) == tried
        assert _pinning.counters.register_failures == 2
        assert fake.pins.pinned == {}
    finally:
        driver.close()


# -- a gathered batch's slab that torch's host allocator cannot page-lock ------------------------


def test_a_refused_pinned_slab_is_a_pageable_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA backend allocates its slabs for gathered batches page-locked, from torch's
    caching host allocator, which raises RuntimeError when ``cudaHostAlloc`` is refused. Like a
    buffer's pin, page-locking only speeds the transfer up: the slab is pageable then (a
    device-to-host copy into pageable memory has landed when it returns), with a warning.
    Before, the error failed the call, and every later call whose gathered batch needed a new
    slab (or a new kept layout)."""

    def refused(nbytes: int) -> torch.Tensor:
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(_cuda, "pinned_slab", refused)
    backend = _cuda.CudaBackend()  # nothing of it touches CUDA until a batch is enqueued
    pool = SlabPool(backend._allocate_slab)
    with pytest.warns(RuntimeWarning, match="out of memory"):
        slab = pool.acquire(1000)
    assert slab.device.type == "cpu" and slab.dtype is torch.uint8 and slab.numel() >= 1000
    assert not slab.is_pinned()
    pool.release(slab)
    assert pool.acquire(1000) is slab  # kept and reused like a pinned one


def test_a_registration_made_before_the_device_selection_failed_is_kept_and_undone(
    fake: FakeAccelerator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When ``cudaHostRegister`` succeeded but restoring the thread's device afterwards raised,
    the memory is registered: the buffer must keep its pin, so that it is unregistered once
    dropped, rather than be reported refused and left registered, unknown to astage."""

    @contextlib.contextmanager
    def failing_on_exit(index: int) -> Iterator[None]:
        yield
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(_torch, "cuda_selected_device", failing_on_exit)
    state = _state(fake)
    driver = Driver("sync", **PINNING)
    try:
        staged = driver.stage(state)
        assert torch.all(staged["a"] == 1.0)
        assert len(fake.pins.pinned) == 2  # both device buffers, known to astage
        assert _pinning.counters.register_failures == 0
        del staged
        driver.clear_cache()
        driver.stage(state)  # its thread unregisters the dropped buffers' queued pins
    finally:
        driver.close()
    collect()
    _pinning.unpin_released()
    assert fake.pins.pinned == {}
    assert len(fake.pins.unpins()) == len(fake.pins.pins()) == 4


# -- an after= event recorded again between the call and its copies -------------------------------


class FakeGenericBackend(GenericBackend):
    """The generic backend's own producer marks and ``after=`` handling, on the fake's streams
    and events; its batches go through the fake backend (the fake's tensors have no kernels)."""

    def __init__(self, accelerator: FakeAccelerator) -> None:
        super().__init__(accelerator.device_type)
        self.fake = accelerator
        self.inner = FakeBackend(accelerator)

    def _new_stream(self, device: torch.device) -> Any:
        return self.fake.device(device).new_stream("astage")

    def _current_stream(self, device: torch.device) -> Any:
        return self.fake.device(device).current_stream()

    def _record_done(self, stream: Any) -> Any:
        return stream.record_event()

    def _wait(self, stream: Any, event: Any) -> None:
        stream.wait_event(event)

    def _is_stream(self, item: object) -> bool:
        return isinstance(item, FakeStream)

    def _is_event(self, item: object) -> bool:
        return isinstance(item, FakeEvent)

    @contextlib.contextmanager
    def selected(self, device: torch.device) -> Iterator[None]:
        before = self.fake.current_device_index()
        self.fake.set_device(device)
        try:
            yield
        finally:
            self.fake.restore_device(before)

    def handles(self, device: torch.device) -> bool:
        return self.inner.handles(device)

    def current_device(self) -> torch.device | None:
        return self.inner.current_device()

    def is_capturing(self, device: torch.device) -> bool:
        return self.inner.is_capturing(device)

    def enqueue(self, batch: Batch, after: Sequence[Mark], *, non_blocking: bool) -> Any:
        return self.inner.enqueue(batch, after, non_blocking=non_blocking)

    def synchronize(self) -> None:
        self.inner.synchronize()


@pytest.mark.asyncio
async def test_an_after_event_recorded_again_after_the_call_still_orders_the_copies() -> None:
    """A stream waits on the point an event was last recorded at when the wait is enqueued
    (``cudaStreamWaitEvent``, and the fake's ``wait_event``). ``Stager.stage()`` takes its
    marks at the call, but its copies are enqueued when the coroutine runs, in a worker thread:
    an ``after=`` event that the caller records again in between (one event reused every step,
    here on another, idle stream) moved the order to the new point, and the copies read the
    tensor before the producer's kernel had written it. The event's point is taken at the
    call now."""
    accelerator = FakeAccelerator(devices=1)
    device = accelerator.devices[0]
    try:
        with installed(FakeGenericBackend(accelerator)):
            x = device.tensor(torch.zeros(16))
            producer, other = device.new_stream("producer"), device.new_stream("other")
            stager = astage.Stager()
            try:
                producer.gate.hold()
                producer.enqueue(lambda: accelerator.host(x).fill_(7.0), "fill")
                done = producer.record_event()
                call = stager.stage({"x": x}, after=done)
                done.record(other)  # reused: now marks other's (empty) end
                # The producer runs on later; the copies must wait for its fill.
                threading.Timer(0.2, producer.gate.release).start()
                staged = await call
                assert torch.all(staged["x"] == 7.0), staged["x"]
            finally:
                producer.gate.release()
                await stager.aclose()
    finally:
        accelerator.close()
    assert accelerator.errors == []


# -- a pin leaked by a failed wait keeps its memory --------------------------------------------


class DeviceLostError(RuntimeError):
    """What a completion's wait raises when the test makes the device fail."""


class FailingWaitsBackend(PinningFakeBackend):
    """Pins like CUDA's backend; its completions' waits raise while ``fail_waits`` is set."""

    def __init__(self, accelerator: FakeAccelerator) -> None:
        super().__init__(accelerator)
        self.fail_waits = False

    def enqueue(self, batch: Any, after: Any, *, non_blocking: bool) -> Any:
        event = super().enqueue(batch, after, non_blocking=non_blocking)
        backend = self

        class Completion:
            def query(self) -> bool:
                return bool(event.query())

            def synchronize(self) -> None:
                if backend.fail_waits:
                    raise DeviceLostError("the device was lost while waiting for the copies")
                event.synchronize()

        return Completion()


@pytest.mark.parametrize("kind", DRIVERS)
def test_a_pin_left_by_a_failed_wait_keeps_its_memory_once_the_buffer_is_gone(
    monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """A buffer whose copy was never reported landed (the wait for it raised) keeps its pin
    when dropped: unregistering under a copy is undefined, so the pin leaks by design. The
    memory must leak with it: freed while registered, it leaves CUDA a stale registered range,
    and a later buffer allocated over it is refused its registration. Before, the pin lived
    only on its buffer, and went, with the memory, once the buffer was collected."""
    accelerator = FakeAccelerator(devices=1)
    ledger = accelerator.pins
    monkeypatch.setattr(_torch, "cuda_host_register", ledger.register)
    monkeypatch.setattr(_torch, "cuda_host_unregister", ledger.unregister)
    monkeypatch.setattr(_torch, "cuda_clear_last_error", ledger.clear_last_error)
    monkeypatch.setattr(_torch, "cuda_selected_device", lambda index: contextlib.nullcontext())
    monkeypatch.setattr(_pinning, "_released", collections.deque())
    monkeypatch.setattr(_pinning, "_registered", set(), raising=False)
    backend = FailingWaitsBackend(accelerator)
    staging = accelerator.devices[0].staging
    try:
        with installed(backend):
            state = {"a": accelerator.devices[0].tensor(torch.full((4096,), 1.0))}
            driver = Driver(kind, **PINNING)
            try:
                staged = driver.stage(state)
                memory = StorageWeakRef(staged["a"].untyped_storage())
                del staged
                staging.gate.hold()  # the next call's copies stay in flight
                backend.fail_waits = True
                with pytest.raises(DeviceLostError):
                    driver.stage(state)
            finally:
                backend.fail_waits = False
                staging.gate.release()  # the copies land, and are never reported landed
                staging.synchronize()
                driver.close()
            del driver, state
            collect()
            _pinning.unpin_released()
            (ptr,) = ledger.pinned  # leaked: its copy was never reported landed
            assert not memory.expired(), "registered memory was freed"
    finally:
        staging.gate.release()
        collect()
        accelerator.close()
    assert ptr
