"""Pinning host buffers (astage._devices._pinning), on CPU with a fake CUDA runtime.

The fake replaces the runtime calls in ``astage._torch`` (register, unregister, clear the last
error, select a device) and records, for each call, the thread that made it and the device that
thread had selected. Sources are stand-ins for CUDA storages (a CPU build has none): the cache
needs of a source only its size, its device and a weak reference.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple, cast

import pytest
import torch
from conftest import collect

import astage
from astage import _torch
from astage._core._batches import Batch
from astage._core._cache import BufferCache, HostBuffer
from astage._devices import _pinning
from astage._devices._host import run_host_batch


class FakeCudaStorage:
    """Stands in for an ``UntypedStorage`` on CUDA device ``index``."""

    def __init__(self, nbytes: int, index: int = 0) -> None:
        self.device = torch.device("cuda", index)
        self._nbytes = nbytes

    def nbytes(self) -> int:
        return self._nbytes


def _source(nbytes: int = 256, index: int = 0) -> torch.UntypedStorage:
    return cast(torch.UntypedStorage, FakeCudaStorage(nbytes, index))


def _cache(*, pin_memory: bool = True, pin_memory_min_bytes: int = 0) -> BufferCache:
    return BufferCache(
        pin_memory=pin_memory, share_memory=False, pin_memory_min_bytes=pin_memory_min_bytes
    )


def _batch(*buffers: HostBuffer) -> Batch:
    """A batch into ``buffers`` whose sources are CPU tensors of the same bytes."""
    return Batch(
        torch.device("cpu"),
        srcs=[torch.ones(b.nbytes, dtype=torch.uint8) for b in buffers],
        dsts=[b.as_bytes() for b in buffers],
        buffers=list(buffers),
        nbytes=sum(b.nbytes for b in buffers),
        end=len(buffers),
    )


class Call(NamedTuple):
    """A runtime call: its name, the pointer, the calling thread, the device it had selected."""

    name: str
    ptr: int
    thread: threading.Thread
    device: int | None


class FakeCudaRuntime:
    """Host registration and device selection, recorded in place of the CUDA runtime."""

    def __init__(self) -> None:
        self.pinned: dict[int, int] = {}  # ptr -> nbytes
        self.calls: list[Call] = []
        self.register_code = 0
        self.unregister_code = 0
        self.last_error = 0
        self.during_register: Callable[[], None] | None = None
        self._selected = threading.local()  # the device each thread has selected

    @property
    def registers(self) -> int:
        return sum(call.name == "register" for call in self.calls)

    @property
    def unregisters(self) -> list[Call]:
        return [call for call in self.calls if call.name == "unregister"]

    def current_device(self) -> int | None:
        return getattr(self._selected, "index", None)

    @contextlib.contextmanager
    def selected_device(self, index: int) -> Iterator[None]:
        before = self.current_device()
        self._selected.index = index
        try:
            yield
        finally:
            self._selected.index = before

    def _record(self, name: str, ptr: int) -> None:
        self.calls.append(Call(name, ptr, threading.current_thread(), self.current_device()))

    def register(self, ptr: int, nbytes: int, flags: int = 1) -> int:
        self._record("register", ptr)
        if self.during_register is not None:
            self.during_register()
        if self.register_code:
            self.last_error = self.register_code
            return self.register_code
        assert ptr not in self.pinned, "registered twice"
        self.pinned[ptr] = nbytes
        return 0

    def unregister(self, ptr: int) -> int:
        self._record("unregister", ptr)
        if self.unregister_code:
            self.last_error = self.unregister_code
            return self.unregister_code
        assert self.pinned.pop(ptr, None) is not None, "unregistered memory that is not pinned"
        return 0

    def clear_last_error(self) -> int:
        code, self.last_error = self.last_error, 0
        return code


@pytest.fixture
def cuda_runtime(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeCudaRuntime]:
    fake = FakeCudaRuntime()
    monkeypatch.setattr(_torch, "cuda_host_register", fake.register)
    monkeypatch.setattr(_torch, "cuda_host_unregister", fake.unregister)
    monkeypatch.setattr(_torch, "cuda_clear_last_error", fake.clear_last_error)
    monkeypatch.setattr(_torch, "cuda_selected_device", fake.selected_device)
    monkeypatch.setattr(_pinning, "counters", _pinning.PinCounters())
    monkeypatch.setattr(_pinning, "_released", collections.deque())
    yield fake
    collect()  # buffers dropped by the test queue their pins now, while the fake is in place
    _pinning.unpin_released()


# -- pinning -------------------------------------------------------------------------------------


def test_pin_registers_the_buffer_exactly_once(cuda_runtime: FakeCudaRuntime) -> None:
    cache = _cache()
    source = _source(256)
    buffer = cache.allocate(source)
    assert not buffer.pinned
    _pinning.pin(buffer)
    _pinning.pin(buffer)
    assert cuda_runtime.registers == 1
    assert cuda_runtime.pinned == {buffer.whole.data_ptr(): 256}
    assert cache.info() == astage.CacheInfo(storages=1, nbytes=256, pinned_nbytes=256)


def test_a_buffer_that_does_not_want_pinning_is_left_alone(cuda_runtime: FakeCudaRuntime) -> None:
    source = _source(256)
    buffer = _cache(pin_memory=False).allocate(source)
    _pinning.pin(buffer)
    assert cuda_runtime.registers == 0
    assert not buffer.pinned


def test_another_accelerators_buffer_is_not_registered_with_cuda(
    cuda_runtime: FakeCudaRuntime,
) -> None:
    # A CUDA pin speeds up CUDA's copies only: a backend that does not pin host memory (the
    # generic one) enqueues with pin_buffers=False, and the buffer is never tried again.
    source = torch.empty(256, dtype=torch.uint8, device="meta").untyped_storage()
    buffer = _cache().allocate(source)
    assert buffer.wants_pin  # the cache's policy: an accelerator source
    copies = _pinning.begin_copies(_batch(buffer), pin_buffers=False)
    copies.landed()
    assert cuda_runtime.registers == 0
    assert not buffer.pinned and not buffer.wants_pin
    assert buffer.copies == []


def test_pin_and_unpin_select_the_buffers_device(cuda_runtime: FakeCudaRuntime) -> None:
    # A worker thread starts on device 0: a runtime call there would create a CUDA context on
    # a GPU that may belong to another rank. Both calls run with the source's device selected.
    cache = _cache()
    source = _source(256, index=3)
    buffer = cache.allocate(source)
    worker = threading.Thread(target=_pinning.pin, args=(buffer,))
    worker.start()
    worker.join()
    cache.clear()
    drainer = threading.Thread(target=_pinning.unpin_released)
    drainer.start()
    drainer.join()
    assert [(call.name, call.device) for call in cuda_runtime.calls] == [
        ("register", 3),
        ("unregister", 3),
    ]
    assert cuda_runtime.current_device() is None  # this thread's selection is untouched


def test_concurrent_pins_register_once(cuda_runtime: FakeCudaRuntime) -> None:
    cache = _cache()
    source = _source(256)  # kept alive: its death would evict the buffer
    buffer = cache.allocate(source)
    cuda_runtime.during_register = lambda: time.sleep(0.01)  # a slow registration
    threads = [threading.Thread(target=_pinning.pin, args=(buffer,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert cuda_runtime.registers == 1
    assert buffer.pinned


def test_device_batches_pin_their_buffers_first(cuda_runtime: FakeCudaRuntime) -> None:
    sources = _source(256), _source(8)
    wants, small = _cache().allocate(sources[0]), _cache(pin_memory=False).allocate(sources[1])
    copies = _pinning.begin_copies(_batch(wants, small), pin_buffers=True)
    assert wants.pinned and not small.pinned
    assert wants.copies == [None]  # counted in flight until the batch is reported landed
    copies.landed()
    assert wants.copies == []


def test_host_batches_pin_nothing_and_unpin_what_is_queued(cuda_runtime: FakeCudaRuntime) -> None:
    # A CPU-to-CPU copy gains nothing from a pin; the worker that runs it drains the queue.
    cache = _cache()
    source = _source(256)  # kept alive: its death would evict the buffer
    dropped = cache.allocate(source)
    _pinning.pin(dropped)
    cache.clear()
    host = _cache(pin_memory=False).allocate(torch.empty(64, dtype=torch.uint8).untyped_storage())
    run_host_batch(_batch(host))
    assert cuda_runtime.registers == 1 and len(cuda_runtime.unregisters) == 1
    assert not dropped.pinned and not host.pinned
    assert bool(host.whole.eq(1).all())


def test_a_failed_registration_leaves_the_buffer_pageable_and_no_cuda_error(
    cuda_runtime: FakeCudaRuntime,
) -> None:
    cuda_runtime.register_code = 2  # cudaErrorMemoryAllocation
    cache = _cache()
    source = _source(256)  # kept alive: its death would evict the buffer
    buffer = cache.allocate(source)
    with pytest.warns(RuntimeWarning, match="CUDA error 2"):
        _pinning.pin(buffer)
    assert cuda_runtime.last_error == 0  # cleared: the thread's next kernel launch is not hit
    assert not buffer.pinned
    assert cache.info().pinned_nbytes == 0
    assert _pinning.counters.register_failures == 1
    _pinning.pin(buffer)  # not tried again: a retry costs as much as a success
    assert cuda_runtime.registers == 1


def test_clearing_the_cuda_error_is_harmless_without_cuda() -> None:
    # Only a CUDA runtime that torch loaded is used, never another one found on the system.
    code = _torch.cuda_clear_last_error()
    assert code is None if not torch.cuda.is_available() else code == 0


# -- unpinning: queued by whoever drops a buffer, done by astage's threads ------------------------


def test_clear_queues_the_unpin_and_astage_unpins_once(cuda_runtime: FakeCudaRuntime) -> None:
    cache = _cache()
    source = _source(256)  # kept alive: its death would evict the buffer
    buffer = cache.allocate(source)
    _pinning.pin(buffer)
    cache.clear()  # the caller's thread: it only queues
    assert cuda_runtime.unregisters == []
    buffer.release()  # a second release (an eviction racing with clear) queues again, harmlessly
    assert _pinning.unpin_released() == 1
    assert _pinning.unpin_released() == 0
    assert cuda_runtime.pinned == {}
    assert len(cuda_runtime.unregisters) == 1
    assert not buffer.pinned
    assert buffer.whole.untyped_storage().nbytes() == 256  # memory still valid
    _pinning.pin(buffer)  # a buffer the cache let go of is not pinned again
    assert cuda_runtime.registers == 1


def test_eviction_in_a_training_thread_only_queues(cuda_runtime: FakeCudaRuntime) -> None:
    cache = _cache()
    sources = [_source(256)]
    _pinning.pin(cache.allocate(sources[0]))

    def training() -> None:
        sources.clear()  # the last reference: the eviction runs here

    thread = threading.Thread(target=training)
    thread.start()
    thread.join()
    assert cache.info() == astage.CacheInfo(0, 0, 0)
    assert cuda_runtime.unregisters == []
    assert len(_pinning.pending_unpins()) == 1
    _pinning.unpin_released()
    assert cuda_runtime.pinned == {}


@pytest.mark.asyncio
async def test_an_evicted_buffer_is_unpinned_by_a_worker_of_the_next_call(
    cuda_runtime: FakeCudaRuntime,
) -> None:
    # The eviction runs in the thread that drops the source (training); the unregistration
    # waits for astage's next copy, in an anyio worker thread, never on the event loop.
    loop_thread = threading.current_thread()
    cache = _cache()
    sources = [_source(256)]
    _pinning.pin(cache.allocate(sources[0]))
    training = threading.Thread(target=sources.clear)
    training.start()
    training.join()
    assert cuda_runtime.unregisters == []
    async with astage.Stager() as stager:
        await stager.stage({"w": torch.randn(16)})
    (unregister,) = cuda_runtime.unregisters
    assert unregister.thread not in (loop_thread, training)  # objects: idents are reused
    assert cuda_runtime.pinned == {}


def test_a_buffer_garbage_collected_unreleased_is_unpinned(cuda_runtime: FakeCudaRuntime) -> None:
    cache = _cache()
    source = _source(256)
    buffer = cache.allocate(source)
    _pinning.pin(buffer)
    ptr = buffer.whole.data_ptr()
    del cache, buffer  # a stager dropped without close(): only the buffer's finalizer runs
    collect()
    assert cuda_runtime.unregisters == []
    # The queued pin keeps the memory alive: freed while registered, CUDA would keep a range
    # that a later allocation may reuse.
    (queued,) = _pinning.pending_unpins()
    assert queued.memory is not None and queued.memory.data_ptr() == ptr
    _pinning.unpin_released()
    assert cuda_runtime.pinned == {}
    assert queued.memory is None


def test_dropped_while_registering_leaves_no_pin(cuda_runtime: FakeCudaRuntime) -> None:
    # clear_cache() (or an eviction) in another thread while a worker registers the buffer:
    # the pin that lands after the release must be undone, not leaked.
    cache = _cache()
    source = _source(256)  # kept alive: its death would evict the buffer
    buffer = cache.allocate(source)
    cuda_runtime.during_register = cache.clear
    _pinning.pin(buffer)
    assert cuda_runtime.registers == 1
    _pinning.unpin_released()
    assert cuda_runtime.pinned == {}
    assert not buffer.pinned


def test_a_failed_unregistration_is_logged_and_counted(
    cuda_runtime: FakeCudaRuntime, caplog: pytest.LogCaptureFixture
) -> None:
    cache = _cache()
    source = _source(256)  # kept alive: its death would evict the buffer
    buffer = cache.allocate(source)
    _pinning.pin(buffer)
    cuda_runtime.unregister_code = 1  # cudaErrorInvalidValue
    cache.clear()
    with caplog.at_level(logging.WARNING, logger="astage"):
        _pinning.unpin_released()
    assert _pinning.counters.unregister_failures == 1
    assert "cudaHostUnregister" in caplog.text and "CUDA error 1" in caplog.text
    assert cuda_runtime.last_error == 0
    cuda_runtime.unregister_code = 0
    cuda_runtime.pinned.clear()


def test_a_forked_child_leaves_its_parents_pins_alone(
    cuda_runtime: FakeCudaRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = _cache()
    source = _source(256)
    buffer = cache.allocate(source)
    _pinning.pin(buffer)
    cache.clear()
    child = os.getpid() + 1
    monkeypatch.setattr(os, "getpid", lambda: child)  # as in a forked child
    assert _pinning.unpin_released() == 0
    assert cuda_runtime.unregisters == []
    assert _pinning.pending_unpins() == ()
    cuda_runtime.pinned.clear()


# -- never under a copy in flight ----------------------------------------------------------------


def _drop_by_clear(cache: BufferCache, sources: list[torch.UntypedStorage]) -> None:
    cache.clear()


def _drop_by_eviction(cache: BufferCache, sources: list[torch.UntypedStorage]) -> None:
    sources.clear()
    collect()


def _drop_by_closing_a_stager(cache: BufferCache, sources: list[torch.UntypedStorage]) -> None:
    stager = astage.SyncStager()
    stager._sets.current.cache = cache  # the buffer belongs to this stager: close() lets go of it
    stager.close()


@pytest.mark.parametrize(
    "drop",
    [_drop_by_clear, _drop_by_eviction, _drop_by_closing_a_stager],
    ids=["clear_cache", "eviction", "close"],
)
def test_a_buffer_is_not_unpinned_while_a_copy_into_it_is_in_flight(
    cuda_runtime: FakeCudaRuntime,
    drop: Callable[[BufferCache, list[torch.UntypedStorage]], None],
) -> None:
    cache = _cache()
    sources = [_source(256)]
    buffer = cache.allocate(sources[0])
    copies = _pinning.begin_copies(
        _batch(buffer), pin_buffers=True
    )  # a device copy enqueued, not landed
    assert buffer.pinned
    drop(cache, sources)
    assert cache.info().storages == 0
    _pinning.unpin_released()  # astage's next batch, or its close
    assert buffer.pinned and cuda_runtime.unregisters == []
    copies.landed()  # the completion event has completed
    assert cuda_runtime.unregisters == []  # landing only queues: it may run on the loop
    _pinning.unpin_released()
    assert cuda_runtime.pinned == {} and not buffer.pinned


def test_every_copy_in_flight_must_land_first(cuda_runtime: FakeCudaRuntime) -> None:
    # Two slices of one large copy, in two batches: the pin stays until both have landed.
    cache = _cache()
    source = _source(256)
    buffer = cache.allocate(source)
    first = _pinning.begin_copies(_batch(buffer), pin_buffers=True)
    second = _pinning.begin_copies(_batch(buffer), pin_buffers=True)
    cache.clear()
    first.landed()
    first.landed()  # idempotent: a second report of the same batch does not count twice
    _pinning.unpin_released()
    assert buffer.pinned
    second.landed()
    _pinning.unpin_released()
    assert not buffer.pinned


def test_a_copy_counted_after_the_unpin_was_queued_keeps_the_pin(
    cuda_runtime: FakeCudaRuntime,
) -> None:
    # The pin is queued with no copy in flight; a copy starts before astage drains the queue.
    # The drain checks the count again, under the lock that counting takes, and skips it.
    cache = _cache()
    source = _source(256)
    buffer = cache.allocate(source)
    _pinning.pin(buffer)
    cache.clear()
    buffer.copy_started()
    _pinning.unpin_released()
    assert buffer.pinned
    buffer.copy_finished()
    _pinning.unpin_released()
    assert not buffer.pinned
