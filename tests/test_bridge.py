"""The event-loop bridge, on CPU, with fake device events completed from other threads."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvloop
from conftest import heartbeat

from astage._drivers._bridge import EventBridge

PREFIX = "astage-events"


class FakeEvent:
    """A device event stand-in: ``query()`` polls, ``synchronize()`` blocks until completion."""

    def __init__(self, delay: float | None = None, error: BaseException | None = None) -> None:
        self._done = threading.Event()
        self._error = error
        self.sync_threads: list[str] = []
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
        self.sync_threads.append(threading.current_thread().name)
        try:
            if not self._done.wait(timeout=10):
                raise TimeoutError("fake event never completed")
            if self._error is not None:
                raise self._error
        finally:
            self.sync_returned.set()


def _bridge_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith(PREFIX)}


@pytest.fixture
def bridge() -> Iterator[EventBridge]:
    before = _bridge_threads()
    bridge = EventBridge()
    yield bridge
    bridge.close()
    leaked = {t for t in _bridge_threads() - before if t.is_alive()}
    assert not leaked, f"bridge threads still running after close(): {leaked}"


@pytest.mark.asyncio
async def test_async_tests_run_on_both_loops(request: pytest.FixtureRequest) -> None:
    # conftest's pytest_asyncio_loop_factories hook parametrizes every async test.
    factory = request.node.callspec.params["_asyncio_loop_factory"]
    loop = asyncio.get_running_loop()
    assert isinstance(loop, uvloop.Loop) == (factory is uvloop.new_event_loop)
    assert factory in (asyncio.new_event_loop, uvloop.new_event_loop)


@pytest.mark.asyncio
async def test_wait_returns_only_after_completion(bridge: EventBridge) -> None:
    event = FakeEvent(delay=0.05)
    started = time.perf_counter()
    await bridge.wait(event, "dev0")
    assert event.query()
    assert time.perf_counter() - started >= 0.04
    assert event.sync_threads == [f"{PREFIX}-dev0"]


@pytest.mark.asyncio
async def test_completed_event_takes_the_fast_path(bridge: EventBridge) -> None:
    before = _bridge_threads()
    event = FakeEvent()
    event.complete()
    await bridge.wait(event, "fast")
    assert event.sync_threads == []  # never handed to a thread
    assert _bridge_threads() == before  # and no thread was started for it


@pytest.mark.asyncio
async def test_many_concurrent_waits(bridge: EventBridge) -> None:
    events = [FakeEvent() for _ in range(200)]
    waits = [
        asyncio.ensure_future(bridge.wait(event, f"dev{i % 3}")) for i, event in enumerate(events)
    ]
    await asyncio.sleep(0.01)
    assert not any(w.done() for w in waits)

    def complete_backwards() -> None:
        for event in reversed(events):
            event.complete()

    threading.Thread(target=complete_backwards).start()
    await asyncio.wait_for(asyncio.gather(*waits), timeout=5)
    assert all(event.query() for event in events)
    names = {name for event in events for name in event.sync_threads}
    assert names == {f"{PREFIX}-dev0", f"{PREFIX}-dev1", f"{PREFIX}-dev2"}  # one per device


@pytest.mark.asyncio
async def test_synchronize_error_reaches_the_awaiting_task(bridge: EventBridge) -> None:
    event = FakeEvent(delay=0.01, error=ValueError("device fault"))
    with pytest.raises(ValueError, match="device fault"):
        await bridge.wait(event)
    # The waiter thread survives the error and serves the next event.
    await asyncio.wait_for(bridge.wait(FakeEvent(delay=0.01)), timeout=5)


@pytest.mark.asyncio
async def test_cancelling_a_pending_wait_is_safe(bridge: EventBridge) -> None:
    loop = asyncio.get_running_loop()
    problems: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: problems.append(context))
    try:
        event = FakeEvent()
        task = asyncio.create_task(bridge.wait(event, "dev"))
        await asyncio.sleep(0.01)
        assert event.sync_threads  # the waiter thread is blocked in synchronize()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        event.complete()
        await asyncio.to_thread(event.sync_returned.wait, 5)
        await asyncio.sleep(0.01)  # let the thread's callback on the cancelled future run
        # The same bridge (and the same waiter thread) keeps working.
        again = FakeEvent(delay=0.01)
        await asyncio.wait_for(bridge.wait(again, "dev"), timeout=5)
        assert again.sync_threads == [f"{PREFIX}-dev"]
    finally:
        loop.set_exception_handler(None)
    assert problems == []


@pytest.mark.asyncio
async def test_waiting_does_not_block_the_loop(bridge: EventBridge) -> None:
    async with heartbeat() as beat:
        await bridge.wait(FakeEvent(delay=0.2), "slow")
    assert len(beat.lateness) >= 20  # the loop kept running while the event was pending
    assert beat.max_lag < 0.1


@pytest.mark.asyncio
async def test_close_stops_threads() -> None:
    before = _bridge_threads()
    bridge = EventBridge()
    await bridge.wait(FakeEvent(delay=0.01), "a")
    await bridge.wait(FakeEvent(delay=0.01), "b")
    started = _bridge_threads() - before
    assert {t.name for t in started} == {f"{PREFIX}-a", f"{PREFIX}-b"}
    bridge.close()
    assert not any(t.is_alive() for t in started)
    bridge.close()  # twice is fine


@pytest.mark.asyncio
async def test_wait_after_close_is_refused_unless_complete() -> None:
    bridge = EventBridge()
    bridge.close()
    done = FakeEvent()
    done.complete()
    await bridge.wait(done)  # the fast path needs no thread
    with pytest.raises(RuntimeError):
        await bridge.wait(FakeEvent(delay=0.01))


def test_bridge_serves_two_event_loops_in_turn(bridge: EventBridge) -> None:
    # One bridge, loops created one after the other (a SyncStager-style caller using asyncio.run).
    for factory in (asyncio.new_event_loop, uvloop.new_event_loop):
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(bridge.wait(FakeEvent(delay=0.01), "dev"))


def test_event_completing_after_its_loop_closed(bridge: EventBridge) -> None:
    # The awaiting loop is gone by the time the waiter thread settles the future: the thread
    # must shrug that off and keep serving other loops.
    async def start_and_cancel(event: FakeEvent) -> None:
        task = asyncio.create_task(bridge.wait(event, "dev"))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    for factory in (asyncio.new_event_loop, uvloop.new_event_loop):
        event = FakeEvent()
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(start_and_cancel(event))
        event.complete()  # the loop is closed now
        assert event.sync_returned.wait(5)
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(asyncio.wait_for(bridge.wait(FakeEvent(delay=0.01), "dev"), timeout=5))
