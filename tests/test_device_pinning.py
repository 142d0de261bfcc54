"""Pinned host buffers on the fake asynchronous accelerator: when, where and on which device.

The fake's copies land only when its staging stream reaches them (``tests/fake_accelerator.py``),
and its :class:`~fake_accelerator.PinLedger` stands in for the CUDA runtime (register,
unregister, clear the last error) and notes, for every pin and unpin, the calling thread, the
device selected there, and the copies into those bytes not landed yet. The backend here is the
fake one asking for its buffers pinned, as the CUDA backend does (``pins_host_memory``), so the
drivers' real path runs: pin and count before enqueueing, report landed after the wait, drain
queued unpins in astage's threads.

What each test guards, and what removing it does, is in its docstring; each was checked by hand
once against a tree with its mechanism removed.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import pytest
import torch
from conftest import DRIVERS, Driver, collect
from fake_accelerator import FakeAccelerator, FakeBackend, FakeEvent, PinRecord

import astage
from astage import _torch
from astage._devices import _pinning
from astage._devices._backend import installed

HOLD_S = 0.15
"""How long a held staging stream stays held while a call or a close waits on it."""

PINNING: dict[str, Any] = {"pin_memory": True, "pin_memory_min_bytes": 1}
"""Stager options that pin every buffer of a device source (this machine has no accelerator)."""

ASYNC_KINDS = [kind for kind in DRIVERS if kind != "sync"]


class DeviceLostError(RuntimeError):
    """What a completion's wait raises when the test makes the device fail."""


class PinningFakeBackend(FakeBackend):
    """The fake backend answering ``pins_host_memory`` as CUDA's does; its waits can fail."""

    def __init__(self, accelerator: FakeAccelerator) -> None:
        super().__init__(accelerator)
        self.fail_waits = False

    def pins_host_memory(self, device: torch.device) -> bool:
        return True

    def enqueue(self, batch: Any, after: Any, *, non_blocking: bool) -> Any:
        return _Completion(self, super().enqueue(batch, after, non_blocking=non_blocking))


class _Completion:
    """A fake event whose blocking wait raises while the backend's ``fail_waits`` is set."""

    def __init__(self, backend: PinningFakeBackend, event: FakeEvent) -> None:
        self._backend = backend
        self._event = event

    def query(self) -> bool:
        return self._event.query()

    def synchronize(self) -> None:
        if self._backend.fail_waits:
            raise DeviceLostError("the device was lost while waiting for the copies")
        self._event.synchronize()


@dataclass
class Rig:
    fake: FakeAccelerator
    backend: PinningFakeBackend

    @property
    def ledger(self) -> Any:
        return self.fake.pins

    def device_of(
        self, staged: dict[str, torch.Tensor], state: dict[str, torch.Tensor]
    ) -> dict[int, int]:
        """Buffer address -> device index of its source, for the staged tensors of ``state``."""
        return {staged[key].data_ptr(): state[key].device.index for key in state}


@contextlib.contextmanager
def _selected(fake: FakeAccelerator, index: int) -> Iterator[None]:
    """``torch.cuda.device(index)`` on the fake: select it in this thread for the block."""
    before = fake.current_device_index()
    fake.set_device(index)
    try:
        yield
    finally:
        fake._current_device.index = before


@pytest.fixture
def rig(monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    fake = FakeAccelerator(devices=2)
    ledger = fake.pins
    monkeypatch.setattr(_torch, "cuda_host_register", ledger.register)
    monkeypatch.setattr(_torch, "cuda_host_unregister", ledger.unregister)
    monkeypatch.setattr(_torch, "cuda_clear_last_error", ledger.clear_last_error)
    monkeypatch.setattr(_torch, "cuda_selected_device", lambda index: _selected(fake, index))
    monkeypatch.setattr(_pinning, "_released", collections.deque())
    monkeypatch.setattr(_pinning, "counters", _pinning.PinCounters())
    backend = PinningFakeBackend(fake)
    try:
        with installed(backend):
            yield Rig(fake, backend)
    finally:
        for owner in fake.devices:
            owner.staging.gate.release()
        collect()  # buffers dropped by the test queue their pins while the fake is in place
        _pinning.unpin_released()
        fake.close()
    assert fake.errors == []


@pytest.fixture
def make_driver(rig: Rig) -> Iterator[Callable[[str], Driver]]:
    """Build pinning stagers of a driver kind; all are closed after the test, even a failed one."""
    made: list[Driver] = []

    def make(kind: str) -> Driver:
        driver = Driver(kind, **PINNING)
        made.append(driver)
        return driver

    yield make
    for owner in rig.fake.devices:
        owner.staging.gate.release()  # a failed test may have left one held
    for driver in made:
        driver.close()


def _state(rig: Rig) -> dict[str, torch.Tensor]:
    d0, d1 = rig.fake.devices
    return {
        "a": d1.tensor(torch.full((1024,), 1.0)),
        "b": d0.tensor(torch.full((256,), 2.0)),
        "c": d1.tensor(torch.full((64,), 3.0)),
        "d": d0.tensor(torch.full((2048,), 4.0)),
    }


def _thread_id(driver: Driver) -> int:
    async def ident() -> int:
        return threading.get_ident()

    return int(driver.run(ident))


TRAINING = "training"
"""The name of the thread that drops the sources (names, not ids: an ended thread's id is reused
by the next thread started, often one of anyio's workers)."""


def _in_training_thread(action: Callable[[], object]) -> None:
    thread = threading.Thread(target=action, name=TRAINING)
    thread.start()
    thread.join(10)


def _on_training_thread(rig: Rig) -> list[PinRecord]:
    return [record for record in rig.ledger.records if record.thread == TRAINING]


def _stage_drop_restage(rig: Rig, driver: Driver) -> dict[int, int]:
    """Stage, drop the sources in a training thread, stage others, close.

    Returns each buffer's source device, by address.
    """
    state = _state(rig)
    staged = driver.stage(state)
    devices = rig.device_of(staged, state)
    for key, tensor in staged.items():
        assert torch.all(tensor == rig.fake.host(state[key])), key
    box = [state]
    del state
    _in_training_thread(box.clear)  # the last references: the buffers are evicted there
    assert rig.ledger.unpins() == []  # the eviction only queued the unpins
    again = _state(rig)
    restaged = driver.stage(again)  # its copies' thread unregisters what was queued
    devices.update(rig.device_of(restaged, again))
    del again
    driver.close()
    return devices


def _assert_clean(rig: Rig) -> None:
    ledger = rig.ledger
    assert ledger.pins() and ledger.unpins()
    assert ledger.unpinned_under_copies() == []
    assert ledger.pinned == {}  # every pin was undone, once its copies had landed


# -- (b) and (c): in astage's threads, with the buffer's device selected -------------------------


@pytest.mark.parametrize("kind", ASYNC_KINDS)
def test_the_async_face_pins_and_unpins_only_in_worker_threads(
    rig: Rig, make_driver: Callable[[str], Driver], kind: str
) -> None:
    """Guards: pins (enqueue_batch in the worker thread), the drain of evicted buffers (the next
    batch's worker) and aclose's drain (a worker thread) never run on the event loop's thread,
    the caller's or the training thread that dropped the sources. Enqueueing on the loop, or
    draining inline in aclose, puts records on the loop's thread; unpinning at eviction puts
    them on the training thread."""
    driver = make_driver(kind)
    loop = _thread_id(driver)
    _stage_drop_restage(rig, driver)
    _assert_clean(rig)
    assert rig.ledger.on_threads({loop, threading.get_ident()}) == []  # both alive throughout
    assert _on_training_thread(rig) == []


@pytest.mark.parametrize("kind", DRIVERS)
def test_pins_and_unpins_select_the_buffers_device(
    rig: Rig, make_driver: Callable[[str], Driver], kind: str
) -> None:
    """Guards: every register and unregister runs with its buffer's device selected, whatever the
    thread had selected before (the fake backend selects the batch's device only later, inside
    its enqueue). Without the selection a fresh worker is on no device, a reused one on the
    device of its last batch, and the records show it."""
    driver = make_driver(kind)
    devices = _stage_drop_restage(rig, driver)
    _assert_clean(rig)
    records: list[PinRecord] = rig.ledger.records
    assert {devices[record.ptr] for record in records} == {0, 1}
    assert [(r.op, r.device) for r in records if r.device != devices[r.ptr]] == []


def test_the_blocking_face_pins_in_its_callers_thread_never_in_the_training_thread(
    rig: Rig, make_driver: Callable[[str], Driver]
) -> None:
    """The blocking face does its work in its caller's thread, pinning included (see
    ``astage._drivers._sync``); a source dropped in the training thread only queues its unpin,
    which the next call (or close) undoes. Guards the queue: an eviction that unregistered at
    once would record on the training thread."""
    driver = make_driver("sync")
    _stage_drop_restage(rig, driver)
    _assert_clean(rig)
    assert _on_training_thread(rig) == []
    assert {r.thread_id for r in rig.ledger.records} == {threading.get_ident()}


def test_a_failed_registration_leaves_the_callers_thread_no_error(rig: Rig) -> None:
    """The blocking face registers in its caller's thread: a refusal must not leave CUDA's last
    error there, where the caller's next kernel launch would report it."""
    rig.ledger.register_code = 2  # cudaErrorMemoryAllocation
    state = _state(rig)
    with astage.SyncStager(**PINNING) as stager, pytest.warns(RuntimeWarning, match="error 2"):
        staged = stager.stage(state)
    assert torch.all(staged["a"] == 1.0)
    assert rig.ledger.last_error == {}
    assert rig.ledger.pinned == {}


# -- (a): never unpinned under a copy ------------------------------------------------------------


def _fail_a_call_with_copies_pending(rig: Rig, driver: Driver, state: dict[str, Any]) -> None:
    """A call whose device wait fails while its copies still wait on the held staging stream."""
    driver.stage(state)  # pins the buffers; their copies landed
    rig.fake.devices[0].staging.gate.hold()
    rig.backend.fail_waits = True
    with pytest.raises(DeviceLostError):
        driver.stage(state)
    rig.backend.fail_waits = False
    assert rig.fake.copies.pending()  # enqueued, not landed


def _drop_by_clear_cache(driver: Driver, state: dict[str, Any]) -> None:
    driver.clear_cache()


def _drop_by_eviction(driver: Driver, state: dict[str, Any]) -> None:
    state.clear()
    collect()


@pytest.mark.parametrize("drop", [_drop_by_clear_cache, _drop_by_eviction], ids=["clear", "evict"])
@pytest.mark.parametrize("kind", DRIVERS)
def test_a_buffer_whose_wait_failed_is_not_unpinned_under_its_copy(
    rig: Rig,
    make_driver: Callable[[str], Driver],
    kind: str,
    drop: Callable[[Driver, dict[str, Any]], None],
) -> None:
    """Guards: the count of copies in flight (``begin_copies`` before the enqueue) and reporting
    them landed only after a wait that returned. After a failed wait the copies may still be
    writing: the dropped buffer must stay pinned through the next call's drain. Reporting
    landed on the failure path (in a ``finally``), or not counting, unpins it under the copy."""
    driver = make_driver(kind)
    state = {"w": rig.fake.devices[0].zeros(1024)}
    _fail_a_call_with_copies_pending(rig, driver, state)
    drop(driver, state)
    driver.stage({"step": torch.tensor(1)})  # a host batch: its thread drains the queue
    assert rig.ledger.unpinned_under_copies() == []
    assert len(rig.ledger.pinned) == 1  # kept: a leak, never a corruption
    rig.fake.devices[0].staging.gate.release()
    driver.close()
    assert rig.ledger.unpinned_under_copies() == []


@pytest.mark.parametrize("kind", DRIVERS)
def test_close_unpins_nothing_under_a_copy(
    rig: Rig, make_driver: Callable[[str], Driver], kind: str
) -> None:
    """Guards, together: close() waits for the staging streams before it releases the buffers,
    and a buffer whose copies were never reported landed stays pinned. Close is called while a
    failed call's copies wait on the held stream, which is released later."""
    driver = make_driver(kind)
    state = {"w": rig.fake.devices[0].zeros(1024)}
    _fail_a_call_with_copies_pending(rig, driver, state)
    staging = rig.fake.devices[0].staging
    timer = threading.Timer(HOLD_S, staging.gate.release)
    timer.start()
    driver.close()
    timer.join()
    assert rig.ledger.unpinned_under_copies() == []
    assert rig.fake.copies.pending() == []


@pytest.mark.asyncio
async def test_a_cancelled_stage_unpins_only_after_its_copies_landed(rig: Rig) -> None:
    """Guards: the cancelled call's shielded wait, then ``landed()``. The cancellation reaches the
    call with copies on the held staging stream; clear_cache() and aclose() follow. The pins
    go, and only once the copies landed: without the shield the call returns early and never
    reports them landed (the pins leak); reporting them landed without waiting unpins them
    under the copies."""
    fake, backend = rig.fake, rig.backend
    state = {"w": fake.devices[0].zeros(1024), "v": fake.devices[0].zeros(512)}
    staging = fake.devices[0].staging
    async with astage.Stager(**PINNING) as stager:
        await stager.stage(state)
        staging.gate.hold()
        backend.enqueue_gate.hold()
        async with anyio.create_task_group() as group:
            group.start_soon(stager.stage, state)
            while not backend.enqueue_gate.waiting.is_set():  # copies enqueued, not returned
                await anyio.sleep(0.001)
            group.cancel_scope.cancel()
            backend.enqueue_gate.release()
            timer = threading.Timer(HOLD_S, staging.gate.release)
            timer.start()
        timer.join()
        stager.clear_cache()
    assert fake.copies.pending() == []
    _assert_clean(rig)
    assert rig.ledger.on_threads({threading.get_ident()}) == []  # none on the loop's thread
