"""Awaiting device completion events from an asyncio event loop.

A CUDA event can be polled (``query()``) or waited on (``synchronize()``, which blocks and
releases the GIL). The bridge polls once, as a fast path, and otherwise hands the event to a
waiter thread (one per device, created on first use) that blocks in ``synchronize()`` and then
resolves the awaiting future with ``loop.call_soon_threadsafe``. The loop never blocks and never
spins, and no Python code ever runs on a CUDA driver thread (no ``cudaLaunchHostFunc``).

Anything with ``query()`` and ``synchronize()`` works, which is how the bridge is tested on CPU.
Cancelling the awaiting task cancels only its future: the waiter thread still waits for the
event and then skips the cancelled future.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from typing import Protocol


class DeviceEvent(Protocol):
    """What the bridge needs of an event: a non-blocking poll and a blocking wait."""

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


_Item = tuple[DeviceEvent, asyncio.AbstractEventLoop, "asyncio.Future[None]"]


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():  # cancelled while the thread waited
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


class _Waiter:
    """One thread that waits for events in the order they were handed over."""

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: _Item) -> None:
        self._queue.put(item)

    def stop(self) -> None:
        self._queue.put(None)
        if self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            event, loop, future = item
            error: BaseException | None = None
            try:
                event.synchronize()
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
                error = exc
            # A closed loop raises RuntimeError: nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, future, error)


class EventBridge:
    """Turns device events into awaitables; ``close()`` stops its threads."""

    def __init__(self) -> None:
        self._waiters: dict[object, _Waiter] = {}
        self._lock = threading.Lock()
        self._closed = False

    async def wait(self, event: DeviceEvent, device: object = None) -> None:
        """Return once ``event`` has completed; raise what its ``synchronize()`` raised."""
        if event.query():
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._waiter(device).submit((event, loop, future))
        await future

    def _waiter(self, device: object) -> _Waiter:
        with self._lock:
            if self._closed:
                raise RuntimeError("the event bridge is closed")
            waiter = self._waiters.get(device)
            if waiter is None:
                waiter = self._waiters[device] = _Waiter(f"astage-events-{device}")
            return waiter

    def close(self) -> None:
        """Stop the waiter threads once the events already handed over have been waited for."""
        with self._lock:
            self._closed = True
            waiters, self._waiters = list(self._waiters.values()), {}
        for waiter in waiters:
            waiter.stop()
