"""Waiting for device events (``_drivers/_events.py``), on CPU, with fake events completed from
other threads. Replaces the tests of the hand-written event bridge, re-targeted at anyio."""

from __future__ import annotations

import threading
import time
from typing import ClassVar

import anyio
import anyio.to_thread
import pytest
from conftest import heartbeat

from astage._drivers._events import DeviceLimiters, wait_for_event

pytestmark = pytest.mark.asyncio


class FakeEvent:
    """A device event stand-in: ``query()`` polls, ``synchronize()`` blocks until completion."""

    waiting: ClassVar[dict[str, int]] = {}  # synchronize() calls running now, per device
    most_waiting: ClassVar[dict[str, int]] = {}
    _count_lock = threading.Lock()

    def __init__(
        self, delay: float | None = None, error: BaseException | None = None, device: str = ""
    ) -> None:
        self._done = threading.Event()
        self._error = error
        self._device = device
        self.sync_threads: list[threading.Thread] = []
        self.sync_returned = threading.Event()
        if delay is not None:
            timer = threading.Timer(delay, self._done.set)
            timer.daemon = True
            timer.start()

    def complete(self) -> None:
        self._done.set()

    def query(self) -> bool:
        return self._done.is_set()

    def synchronize(self) -> None:
        self.sync_threads.append(threading.current_thread())
        with self._count_lock:
            now = self.waiting[self._device] = self.waiting.get(self._device, 0) + 1
            self.most_waiting[self._device] = max(self.most_waiting.get(self._device, 0), now)
        try:
            if not self._done.wait(timeout=10):
                raise TimeoutError("fake event never completed")
            if self._error is not None:
                raise self._error
        finally:
            with self._count_lock:
                self.waiting[self._device] -= 1
            self.sync_returned.set()


async def test_wait_returns_only_after_completion() -> None:
    event = FakeEvent(delay=0.05)
    started = time.perf_counter()
    await wait_for_event(event, anyio.CapacityLimiter(1))
    assert event.query()
    assert time.perf_counter() - started >= 0.04
    assert event.sync_threads and event.sync_threads[0] is not threading.current_thread()


async def test_completed_event_takes_the_fast_path() -> None:
    event = FakeEvent()
    event.complete()
    await wait_for_event(event, anyio.CapacityLimiter(1))
    assert event.sync_threads == []  # never handed to a thread


async def test_many_concurrent_waits_one_thread_per_device_at_a_time() -> None:
    limiters = DeviceLimiters()
    devices = [f"dev{i}-{id(limiters)}" for i in range(3)]
    events = [FakeEvent(device=devices[i % 3]) for i in range(60)]
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tasks:
            for event, device in zip(events, [devices[i % 3] for i in range(60)], strict=True):
                tasks.start_soon(wait_for_event, event, limiters[device])
            await anyio.sleep(0.05)
            assert not any(event.query() for event in events)

            def complete_backwards() -> None:
                for event in reversed(events):
                    event.complete()
                    time.sleep(0.0005)

            threading.Thread(target=complete_backwards).start()
    assert all(event.query() for event in events)
    # Each device's limiter lets one synchronize() run at a time, whatever the backlog.
    assert {FakeEvent.most_waiting[device] for device in devices} == {1}
    assert limiters[devices[0]] is limiters[devices[0]]


async def test_synchronize_error_reaches_the_awaiting_task() -> None:
    limiter = anyio.CapacityLimiter(1)
    with pytest.raises(ValueError, match="device fault"):
        await wait_for_event(FakeEvent(delay=0.01, error=ValueError("device fault")), limiter)
    # The limiter's slot was given back: the next event is waited for.
    with anyio.fail_after(5):
        await wait_for_event(FakeEvent(delay=0.01), limiter)


async def test_cancelled_wait_returns_once_the_event_completed() -> None:
    # Not abandoned: a caller cancelled while its copies land returns only after they did, so
    # nothing it started is still writing when it has returned.
    limiter = anyio.CapacityLimiter(1)
    event = FakeEvent(delay=0.1)
    started = time.perf_counter()
    with anyio.move_on_after(0.01) as scope:
        await wait_for_event(event, limiter)
    assert scope.cancel_called
    assert event.query() and event.sync_returned.is_set()
    assert time.perf_counter() - started >= 0.09
    with anyio.fail_after(5):  # the same limiter keeps working
        await wait_for_event(FakeEvent(delay=0.01), limiter)


async def test_waiting_does_not_block_the_loop() -> None:
    async with heartbeat() as beat:
        await wait_for_event(FakeEvent(delay=0.2), anyio.CapacityLimiter(1))
    assert len(beat.lateness) >= 20  # the loop kept running while the event was pending
    assert beat.max_lag < 0.1


@pytest.mark.filterwarnings("ignore:The test <Function:pytest.PytestWarning")
def test_waiting_serves_event_loops_of_each_backend_in_turn() -> None:
    # Loops created one after the other in one thread (a caller using anyio.run each time).
    async def wait_one() -> None:
        with anyio.fail_after(5):
            await wait_for_event(FakeEvent(delay=0.01), DeviceLimiters()["dev"])

    for backend, options in (("asyncio", {}), ("asyncio", {"use_uvloop": True}), ("trio", {})):
        anyio.run(wait_one, backend=backend, backend_options=options)
