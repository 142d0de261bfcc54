"""A heartbeat that measures event-loop lag: how late a 1 ms sleep wakes up.

A task sleeps ``interval`` seconds in a loop and records by how much each wake-up overshot. Any
code that holds the loop (or the GIL, from another thread) for longer shows up as lateness. The
demo and the benchmarks both use it; it is not part of the public API.

    async with LagProbe() as probe:
        async with probe.window() as lag:
            await stager.stage(state_dict)
        print(lag.summary().p99_ms)
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import NamedTuple


class LagSummary(NamedTuple):
    """Lateness of the heartbeat's wake-ups, in milliseconds."""

    samples: int
    p50_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(cls, lateness_s: Sequence[float]) -> LagSummary:
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
    """The heartbeat samples taken between entering and leaving :meth:`LagProbe.window`."""

    def __init__(self, probe: LagProbe) -> None:
        self._probe = probe
        self._start = len(probe.lateness_s)
        self._stop: int | None = None

    def close(self) -> None:
        self._stop = len(self._probe.lateness_s)

    @property
    def lateness_s(self) -> list[float]:
        stop = self._stop if self._stop is not None else len(self._probe.lateness_s)
        return self._probe.lateness_s[self._start : stop]

    def summary(self) -> LagSummary:
        return LagSummary.of(self.lateness_s)


class LagProbe:
    """Runs the heartbeat task on the current event loop while the ``async with`` block runs."""

    def __init__(self, interval_s: float = 0.001) -> None:
        self.interval_s = interval_s
        self.lateness_s: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _beat(self) -> None:
        interval = self.interval_s
        record = self.lateness_s.append
        clock = time.perf_counter
        while True:
            before = clock()
            await asyncio.sleep(interval)
            record(max(0.0, clock() - before - interval))

    async def __aenter__(self) -> LagProbe:
        self._task = asyncio.create_task(self._beat(), name="astage-heartbeat")
        await asyncio.sleep(0)  # let the first beat start before the caller's work does
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @contextlib.asynccontextmanager
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
        if self._task is None or self._task.done():
            return
        seen = len(self.lateness_s)
        while len(self.lateness_s) == seen and not self._task.done():
            await asyncio.sleep(0)
