"""A heartbeat that measures event-loop lag: how late a short sleep wakes up.

A task sleeps ``interval_s`` (1 ms) in a loop and records by how much each wake-up overshot.
Anything that holds the loop, or the GIL from another thread, for longer shows up as lateness.
The demo and the benchmarks both use it; it runs on every anyio backend (asyncio, asyncio with
uvloop, trio)::

    async with LagProbe() as probe:
        async with probe.window() as lag:
            await stager.stage(state_dict)
        print(lag.summary().p99_ms)

The probe sleeps through ``anyio.sleep``, which works on every backend and, measured on this
project's 2-core machine, is no slower where it counts: the call adds 0.2 to 2 us per beat over
the backend's own ``sleep``, against a 1 ms interval and an idle loop's typical lateness of 0.1
to 0.2 ms; loop CPU per beat, idle lateness and the slowdown of a worker thread's copies (about
1.02x, within noise) match the native heartbeat's. ``python -m benchmarks.lag_cost`` measures
these on each backend.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from types import TracebackType
from typing import NamedTuple

import anyio
from anyio.abc import TaskGroup, TaskStatus

__all__ = ["LagProbe", "LagSummary", "LagWindow", "percentile"]

Sleep = Callable[[float], Awaitable[object]]


class LagSummary(NamedTuple):
    """Lateness of the heartbeat's wake-ups, in milliseconds."""

    samples: int
    p50_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(cls, lateness_s: Sequence[float]) -> LagSummary:
        """Summarise lateness samples given in seconds (NaN figures when there are none)."""
        if not lateness_s:
            return cls(0, math.nan, math.nan, math.nan)
        ordered = sorted(lateness_s)
        return cls(
            samples=len(ordered),
            p50_ms=percentile(ordered, 50) * 1e3,
            p99_ms=percentile(ordered, 99) * 1e3,
            max_ms=ordered[-1] * 1e3,
        )


def percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q``-th percentile of sorted values, interpolating linearly between ranks."""
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


class LagWindow:
    """The heartbeat samples taken between entering and leaving :meth:`LagProbe.window`.

    Only lateness accrued while the window is open counts: the beat asleep when it opens may
    have been due before, and made late by work that ran before the window (the demo's own
    set-up before a timed call held the loop ~100 ms, which was charged to the call). Its
    sample is cut to the time from the window's opening to its wake-up.
    """

    def __init__(self, probe: LagProbe) -> None:
        self._probe = probe
        self._start = len(probe.lateness_s)
        self._stop: int | None = None
        self._opened_at = time.perf_counter()

    def close(self) -> None:
        """Stop taking samples: later beats belong to no window of this one."""
        self._stop = len(self._probe.lateness_s)

    @property
    def lateness_s(self) -> list[float]:
        """How late each beat of the window woke up, in seconds."""
        probe = self._probe
        stop = self._stop if self._stop is not None else len(probe.lateness_s)
        samples = probe.lateness_s[self._start : stop]
        if samples:  # only the first beat can have been due before the window opened
            since_opening = probe.woke_at[self._start] - self._opened_at
            samples[0] = max(0.0, min(samples[0], since_opening))
        return samples

    def summary(self) -> LagSummary:
        return LagSummary.of(self.lateness_s)


class LagProbe:
    """Runs the heartbeat in a task of its own while the ``async with`` block runs.

    ``sleep`` is there to measure the probe against a backend's own sleep (see
    :mod:`benchmarks.lag_cost`); leave it at ``anyio.sleep``, which works on every backend.
    """

    def __init__(self, interval_s: float = 0.001, *, sleep: Sleep = anyio.sleep) -> None:
        self.interval_s = interval_s
        self._sleep = sleep
        self.lateness_s: list[float] = []
        self.woke_at: list[float] = []
        """When each beat woke up (``time.perf_counter()``), for tracing what made it late."""
        self._stack: AsyncExitStack | None = None
        self._task_group: TaskGroup | None = None
        self._next_beat: anyio.Event | None = None

    async def _beat(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        interval = self.interval_s
        record = self.lateness_s.append
        clock = time.perf_counter
        sleep = self._sleep
        task_status.started()
        woke_at = self.woke_at.append
        while True:
            before = clock()
            await sleep(interval)
            now = clock()
            record(max(0.0, now - before - interval))
            woke_at(now)
            waiting, self._next_beat = self._next_beat, None
            if waiting is not None:
                waiting.set()

    async def __aenter__(self) -> LagProbe:
        async with AsyncExitStack() as stack:
            task_group = await stack.enter_async_context(anyio.create_task_group())
            # start() returns once the first beat is asleep: the caller's work comes after it.
            await task_group.start(self._beat)
            self._task_group, self._stack = task_group, stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, task_group = self._stack, self._task_group
        self._stack = self._task_group = None
        if task_group is not None:
            task_group.cancel_scope.cancel()
        if stack is not None:
            # The block's own exception is not the heartbeat's: it propagates as it is, not
            # wrapped in the task group's exception group.
            await stack.aclose()

    @asynccontextmanager
    async def window(self) -> AsyncIterator[LagWindow]:
        """Collect the samples of the beats that overlap the ``async with`` block.

        On the way out it waits for the beat still asleep to record: that beat is the one a
        final stretch of blocking work made late, so leaving it out would hide lag.
        """
        window = LagWindow(self)
        try:
            yield window
        finally:
            await self._settle()
            window.close()

    async def _settle(self) -> None:
        if self._task_group is None:  # not running: no beat to wait for
            return
        if self._next_beat is None:
            self._next_beat = anyio.Event()
        with anyio.CancelScope(shield=True):  # a cancelled caller still gets its last sample
            await self._next_beat.wait()
