"""Awaiting device completion events without blocking or spinning the event loop.

A CUDA event can be polled (``query()``) or waited on (``synchronize()``, which blocks and drops
the GIL). An event that has completed already is taken on the fast path, with no thread; any
other is waited on in an anyio worker thread. Each device has its own
:class:`anyio.CapacityLimiter` of one token, so waits on one device queue behind each other
(its events complete in stream order anyway) and never take the host copies' threads. No
Python code runs on a CUDA driver thread (no ``cudaLaunchHostFunc``).

Anything with ``query()`` and ``synchronize()`` works, which is how the waiting is tested on
CPU. The wait is not abandoned when the caller is cancelled: the caller returns only once the
event completed, so no copy it started can still be landing after it returned.
"""

from __future__ import annotations

from typing import Protocol

import anyio
import anyio.to_thread


class DeviceEvent(Protocol):
    """What waiting needs of an event: a non-blocking poll and a blocking wait."""

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


async def wait_for_event(event: DeviceEvent, limiter: anyio.CapacityLimiter) -> None:
    """Return once ``event`` has completed; raise what its ``synchronize()`` raised."""
    if event.query():
        return
    await anyio.to_thread.run_sync(event.synchronize, limiter=limiter)


class DeviceLimiters:
    """One waiting slot per device, made on first use."""

    def __init__(self) -> None:
        self._limiters: dict[object, anyio.CapacityLimiter] = {}

    def __getitem__(self, device: object) -> anyio.CapacityLimiter:
        limiter = self._limiters.get(device)
        if limiter is None:
            limiter = self._limiters[device] = anyio.CapacityLimiter(1)
        return limiter
