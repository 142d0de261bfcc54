"""The device path on the fake asynchronous accelerator: ordering after the producer, completion.

Every test here queues "kernels" on fake streams that run later (``tests/fake_accelerator.py``),
usually behind a held gate, so that a copy not ordered after them would read the old values for
certain, not by chance. What each test guards, and that it fails without it, is in its docstring.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest
import torch
from conftest import DRIVERS, Driver
from fake_accelerator import FakeAccelerator, FakeBackend, FakeStream

import astage
from astage._devices._backend import installed

HOLD_S = 0.15
"""How long a held producer stays held while a call waits on it."""


@contextlib.contextmanager
def _current(streams: list[FakeStream]) -> Iterator[None]:
    """Make each stream the current one of its device, in this thread, for the block."""
    with contextlib.ExitStack() as stack:
        for stream in streams:
            stack.enter_context(stream.owner.stream(stream))
        yield


def _two_device_state(fake: FakeAccelerator) -> dict[str, Any]:
    d0, d1 = fake.devices
    return {
        "w0": d0.zeros(1024),
        "b0": d0.zeros(8),
        "step": torch.tensor(3),  # a CPU tensor in between: the host path, unordered
        "w1": d1.zeros(256),
        "nested": {"b1": d1.zeros(4, dtype=torch.int64)},
    }


def _produce(fake: FakeAccelerator, state: dict[str, Any], value: float) -> None:
    """Queue on each fake tensor's current stream (this thread) a kernel writing ``value``."""
    for tensor in (state["w0"], state["b0"], state["w1"], state["nested"]["b1"]):
        owner = fake.device(tensor.device)
        owner.current_stream().enqueue(functools.partial(fake.host(tensor).fill_, value))


def _assert_all(staged: dict[str, Any], value: float) -> None:
    for key in ("w0", "b0", "w1"):
        assert staged[key].device.type == "cpu"
        assert torch.all(staged[key] == value), (key, staged[key][:4])
    assert torch.all(staged["nested"]["b1"] == int(value))
    assert int(staged["step"]) == 3


def _release_later(streams: list[FakeStream], fake: FakeAccelerator) -> dict[str, int]:
    """Release ``streams`` from a timer thread after :data:`HOLD_S`; notes how many copies had
    landed by then (none may have: they all wait on the held producers)."""
    seen: dict[str, int] = {}
    before = fake.copies.landed_count

    def release() -> None:
        seen["landed"] = fake.copies.landed_count - before
        for stream in streams:
            stream.gate.release()

    for stream in streams:
        stream.gate.hold()
    timer = threading.Timer(HOLD_S, release)
    timer.daemon = True
    timer.start()
    return seen


# -- a snapshot holds everything queued before the call, on every device, on every face --------


def test_every_face_orders_after_the_default_streams(
    fake: FakeAccelerator, make_stager: Callable[..., Driver]
) -> None:
    """Guards: producer marks at the call on every device the state dict touches (not only the
    current one), and the staging streams waiting on them. Without marks (or with device 1
    unmarked) the copies run at once and read 0.0."""
    stager = make_stager()
    state = _two_device_state(fake)
    for value in (7.0, 9.0):  # the first call meets the devices; the cached one reuses buffers
        held = [owner.default_stream for owner in fake.devices]
        seen = _release_later(held, fake)
        _produce(fake, state, value)  # on the default streams: every thread's current stream
        staged = stager.stage(state)
        assert seen == {"landed": 0}  # nothing landed while the producers were held
        _assert_all(staged, value)
    assert fake.copies.pending() == []


@pytest.mark.asyncio
async def test_async_stager_orders_after_side_streams(fake: FakeAccelerator) -> None:
    """Guards: the async face marks the caller's *current* stream (here a side stream on each
    device, set in the loop's thread) at the call. Marking the default stream, or marking after
    the walk's first await on another stream, reads 0.0."""
    state = _two_device_state(fake)
    producers = [owner.new_stream("training") for owner in fake.devices]
    async with astage.Stager() as stager:
        with _current(producers):
            for value in (5.0, 6.0):
                seen = _release_later(producers, fake)
                _produce(fake, state, value)
                staged = await stager.stage(state)
                assert seen == {"landed": 0}
                _assert_all(staged, value)


@pytest.mark.asyncio
async def test_stage_iter_orders_after_side_streams(fake: FakeAccelerator) -> None:
    state = _two_device_state(fake)
    producers = [owner.new_stream("training") for owner in fake.devices]
    async with astage.Stager() as stager:
        with _current(producers):
            seen = _release_later(producers, fake)
            _produce(fake, state, 4.0)
            async with stager.stage_iter(state) as landed:
                items = {path: tensor async for path, tensor in landed}
    assert seen == {"landed": 0}
    assert torch.all(items[("w0",)] == 4.0)
    assert torch.all(items[("nested", "b1")] == 4)


def test_sync_stager_orders_after_side_streams(fake: FakeAccelerator) -> None:
    state = _two_device_state(fake)
    producers = [owner.new_stream("training") for owner in fake.devices]
    with astage.SyncStager() as stager, _current(producers):
        seen = _release_later(producers, fake)
        _produce(fake, state, 2.0)
        staged = stager.stage(state)
    assert seen == {"landed": 0}
    _assert_all(staged, 2.0)


@pytest.mark.parametrize("async_staging", [False, True])
def test_compat_default_stager_orders_after_side_streams(
    fake: FakeAccelerator, async_staging: bool
) -> None:
    """Guards: compat's DefaultStager marks, at the call and in the caller's thread, every device
    of the state dict (its worker thread has other current streams). Without it: 0.0."""
    from torch.distributed.checkpoint.staging import StagingOptions

    from astage.compat import DefaultStager

    state = _two_device_state(fake)
    producers = [owner.new_stream("training") for owner in fake.devices]
    options = StagingOptions(False, False, async_staging, False)
    with DefaultStager(options) as stager, _current(producers):
        seen = _release_later(producers, fake)
        _produce(fake, state, 3.0)
        result: Any = stager.stage(state)
        if async_staging:
            result = result.result(timeout=10)
    assert seen == {"landed": 0}
    _assert_all(result, 3.0)


@pytest.mark.parametrize("kind", [k for k in DRIVERS if k != "sync"])
def test_a_coroutine_made_here_and_run_by_another_loop_is_ordered_here(
    fake: FakeAccelerator, kind: str
) -> None:
    """Guards: the async face takes its marks when ``stage()`` is *called*, in the calling thread,
    not when the coroutine first runs. The training thread makes the coroutine with its side
    streams current, and another thread's event loop runs it (``run_coroutine_threadsafe``'s
    pattern); marks taken inside the coroutine would land on that thread's idle default streams
    and the copies would read 0.0."""
    state = _two_device_state(fake)
    producers = [owner.new_stream("training") for owner in fake.devices]
    driver = Driver(kind)
    try:
        driver.stage(state)  # the devices are known: a cached call marks them all at the call
        with _current(producers):
            seen = _release_later(producers, fake)
            _produce(fake, state, 6.0)
            coroutine = driver.stager.stage(state)

        async def run_it() -> Any:
            return await coroutine

        staged = driver.run(run_it)
        assert seen == {"landed": 0}
        _assert_all(staged, 6.0)
    finally:
        driver.close()


# -- after=: staging scheduled from another thread ----------------------------------------------


@pytest.mark.parametrize("kind", [k for k in ("asyncio", "trio", "sync") if k in DRIVERS])
def test_after_orders_a_call_made_from_another_thread(fake: FakeAccelerator, kind: str) -> None:
    """Guards: ``after=`` (a stream, and an event). The call runs in another thread (an event
    loop's, or a thread of a pool) whose current streams are the default ones, which are idle:
    without ``after=`` the copies run at once and read 0.0 (the last assertion shows it)."""
    state = _two_device_state(fake)
    producers = [owner.new_stream("training") for owner in fake.devices]
    driver = Driver(kind)
    try:

        def stage_elsewhere(after: object) -> Any:
            if kind == "sync":
                out: list[Any] = []
                thread = threading.Thread(
                    target=lambda: out.append(driver.stager.stage(state, after=after))
                )
                thread.start()
                thread.join(10)
                return out[0]
            return driver.run(functools.partial(driver.stager.stage, state, after=after))

        # In the training thread: kernels on side streams, then staging handed to another thread.
        with _current(producers):
            seen = _release_later(producers, fake)
            _produce(fake, state, 7.0)
            staged = stage_elsewhere(producers)  # streams: marked now, in this thread
        assert seen == {"landed": 0}
        _assert_all(staged, 7.0)

        with _current(producers):
            seen = _release_later(producers, fake)
            _produce(fake, state, 8.0)
            events = [stream.record_event() for stream in producers]
            staged = stage_elsewhere(events)
        assert seen == {"landed": 0}
        _assert_all(staged, 8.0)

        # The same call without after=: the other thread's streams know nothing of the kernels,
        # so this setup does tell ordered from unordered (the copy reads the old 8.0).
        with producers[0].held():
            producers[0].enqueue(functools.partial(fake.host(state["w0"]).fill_, 9.0))
            stale = stage_elsewhere(None)
        assert torch.all(stale["w0"] == 8.0)
    finally:
        driver.close()


# -- what a snapshot does not include --------------------------------------------------------------


@pytest.mark.parametrize("kind", [k for k in ("sync", "asyncio", "trio") if k in DRIVERS])
def test_staging_waits_for_the_mark_not_for_later_work(fake: FakeAccelerator, kind: str) -> None:
    """Work the producer queues after the mark is not waited for, and once stage() returned it
    cannot reach the snapshot.

    The producer stream runs: a fill to 7.0, the mark, a kernel that blocks until the test lets
    it go, then a fill to 9.0. stage() must return 7.0 while that kernel still blocks: a staging
    stream that waited for the whole producer stream (or synchronized the device) would hang.
    Later work is excluded only *while it has not run*: a copy ordered after a mark may run
    concurrently with kernels queued after it (a write-after-read race no stream order rules
    out), which is why the fill to 9.0 waits behind the blocking kernel here.
    """
    d0 = fake.devices[0]
    x = d0.zeros(64)
    producer = d0.new_stream("training")
    let_go = threading.Event()
    driver = Driver(kind)
    try:
        with producer.held():
            producer.enqueue(functools.partial(fake.host(x).fill_, 7.0))
            mark = producer.record_event()
            producer.enqueue(lambda: let_go.wait(10), label="blocking kernel")
            producer.enqueue(functools.partial(fake.host(x).fill_, 9.0))
        if kind == "sync":
            staged = driver.stager.stage({"x": x}, after=mark)
        else:
            staged = driver.run(functools.partial(driver.stager.stage, {"x": x}, after=mark))
        assert torch.all(staged["x"] == 7.0)
        assert not let_go.is_set() and not producer.query()  # the later work is still queued
    finally:
        let_go.set()
        producer.synchronize()
        driver.close()
    assert torch.all(fake.host(x) == 9.0)
    assert torch.all(staged["x"] == 7.0)  # host memory: the later work never reaches it


# -- completion: a call returns only once its copies landed -------------------------------------


@pytest.mark.asyncio
async def test_a_cancelled_call_returns_only_once_its_copies_landed(fake: FakeAccelerator) -> None:
    """Guards: the async face's shielded wait for device completions. The cancellation reaches
    the call while a worker thread is inside the backend's enqueue, with copies already on the
    (held) staging stream; the call may only return once the stream was released and every copy
    landed. Without the shield it returns at once, with copies still pending."""
    backend = FakeBackend(fake)
    state = {"w": fake.devices[0].zeros(1024)}
    staging = fake.devices[0].staging
    with installed(backend):
        async with astage.Stager() as stager:
            await stager.stage(state)  # meet the device once
            released_at: list[float] = []

            def release() -> None:
                released_at.append(time.perf_counter())
                staging.gate.release()

            staging.gate.hold()
            backend.enqueue_gate.hold()
            async with anyio.create_task_group() as group:
                group.start_soon(stager.stage, state)
                while not backend.enqueue_gate.waiting.is_set():  # copies enqueued, not returned
                    await anyio.sleep(0.001)
                group.cancel_scope.cancel()
                backend.enqueue_gate.release()
                timer = threading.Timer(HOLD_S, release)
                timer.start()
            returned_at = time.perf_counter()
            timer.join()
            assert released_at and returned_at >= released_at[0]
            assert fake.copies.pending() == []
            # The stager is usable at once, and the next call copies the current values.
            staging.owner.default_stream.enqueue(lambda: fake.host(state["w"]).fill_(1.0))
            assert torch.all((await stager.stage(state))["w"] == 1.0)


def test_sync_stage_returns_only_once_its_copies_landed(fake: FakeAccelerator) -> None:
    state = _two_device_state(fake)
    staging = [owner.staging for owner in fake.devices]
    seen = _release_later(staging, fake)
    with astage.SyncStager() as stager:
        staged = stager.stage(state)
        assert seen == {"landed": 0}
        assert fake.copies.pending() == []
    _assert_all(staged, 0.0)
