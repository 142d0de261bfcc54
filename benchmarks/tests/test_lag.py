"""The lag probe on every anyio backend: it beats, it sees a blocked loop, it costs little."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import pytest

from benchmarks.lag import LagProbe, LagSummary, percentile
from benchmarks.lag_cost import measure_cost
from benchmarks.runner import BACKENDS, anyio_backend

T = TypeVar("T")


def run(backend: str, func: Callable[[], Awaitable[T]]) -> T:
    name, options = anyio_backend(backend)
    return anyio.run(func, backend=name, backend_options=options)


@pytest.mark.parametrize("backend", BACKENDS)
def test_beats_while_the_block_runs(backend: str) -> None:
    async def beat() -> list[float]:
        async with LagProbe() as probe:
            await anyio.sleep(0.05)
        return probe.lateness_s

    lateness = run(backend, beat)
    assert 3 <= len(lateness) <= 60  # about one beat a millisecond, fewer on a busy machine
    assert all(late >= 0 for late in lateness)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_window_keeps_the_beat_that_blocking_work_made_late(backend: str) -> None:
    """The last stretch of blocking work before the window closes must show up in it."""

    async def blocked() -> LagSummary:
        async with LagProbe() as probe:
            await anyio.sleep(0.005)
            async with probe.window() as window:
                time.sleep(0.03)  # holds the loop: the beat asleep now wakes up ~30 ms late
            return window.summary()

    summary = run(backend, blocked)
    assert summary.max_ms >= 20


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_window_leaves_out_what_held_the_loop_before_it_opened(backend: str) -> None:
    """The beat asleep when a window opens was made late by work before it: the demo charged
    ~100 ms of its own set-up to the timed call that followed."""

    async def blocked_before() -> tuple[LagSummary, float]:
        async with LagProbe() as probe:
            await anyio.sleep(0.005)
            time.sleep(0.03)  # holds the loop before the window: the beat asleep wakes ~30 ms late
            async with probe.window() as window:
                await anyio.sleep(0.005)
            return window.summary(), max(probe.lateness_s)

    summary, every = run(backend, blocked_before)
    assert every >= 0.02  # the probe saw the hold
    assert summary.max_ms < 10  # the window did not take it


@pytest.mark.parametrize("backend", BACKENDS)
def test_windows_split_the_samples(backend: str) -> None:
    async def two_windows() -> tuple[list[float], list[float], list[float]]:
        async with LagProbe() as probe:
            async with probe.window() as first:
                await anyio.sleep(0.02)
            async with probe.window() as second:
                await anyio.sleep(0.02)
            await anyio.sleep(0.01)
        return first.lateness_s, second.lateness_s, probe.lateness_s

    first, second, every = run(backend, two_windows)
    assert first and second
    # Back to back, the windows hold consecutive runs of the probe's samples: the first from
    # the probe's start, the second from the beat the first one waited for on its way out.
    # Each window's first sample may be cut to the time since the window opened (that beat
    # went to sleep before it), so it is at most the probe's own; the rest are the probe's.
    own_first = every[: len(first)]
    own_second = every[len(first) : len(first) + len(second)]
    assert first[1:] == own_first[1:] and second[1:] == own_second[1:]
    assert first[0] <= own_first[0] and second[0] <= own_second[0]


def test_a_window_outside_a_running_probe_does_not_wait() -> None:
    async def idle() -> int:
        probe = LagProbe()
        async with probe.window() as window:
            pass
        return len(window.lateness_s)

    assert run("asyncio", idle) == 0


def test_the_heartbeat_stops_with_the_block_even_when_it_raises() -> None:
    async def failing() -> None:
        async with LagProbe():
            raise KeyError("boom")

    with pytest.raises(KeyError):
        run("asyncio", failing)


def test_summary_and_percentile() -> None:
    assert percentile([0.0, 1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert percentile([0.0, 10.0], 99) == pytest.approx(9.9)
    summary = LagSummary.of([0.003, 0.001, 0.002])
    assert summary.samples == 3
    assert summary.p50_ms == pytest.approx(2.0)
    assert summary.max_ms == pytest.approx(3.0)
    assert LagSummary.of([]).samples == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_measure_cost(backend: str) -> None:
    native, probe = measure_cost(backend, seconds=0.05, copy_bytes=1 << 20)
    assert (native.heartbeat, probe.heartbeat) == ("native sleep", "LagProbe")
    for cost in (native, probe):
        assert cost.backend == backend
        assert cost.beats > 0
        assert cost.loop_cpu_us_per_beat > 0
        assert cost.copy_slowdown > 0


def test_the_lag_tracer_hooks_what_the_library_still_has() -> None:
    """``benchmarks.lag_trace`` patches functions of astage by name: a rename in the library
    must fail here, not when someone next needs the trace."""
    import astage._drivers._async as driver
    from benchmarks.lag_trace import Trace

    walk_for = driver._walk_for
    uninstall = Trace().install()
    try:
        assert driver._walk_for is not walk_for
    finally:
        uninstall()
    assert driver._walk_for is walk_for
