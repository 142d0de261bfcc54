"""What the lag probe costs, on each anyio backend, next to a heartbeat on the backend's own sleep.

``python -m benchmarks.lag_cost`` prints, for :class:`~benchmarks.lag.LagProbe` (``anyio.sleep``)
and for the same heartbeat sleeping through ``asyncio.sleep`` or ``trio.sleep``:

- the sleep call itself (``await sleep(0)``, averaged over 20,000 calls);
- the loop thread's CPU time per beat while the loop is otherwise idle (the beat and the
  loop's own wake-up), and the idle loop's lateness: the floor under any lag figure;
- how much slower a copy running in a worker thread gets while the heartbeat beats (each beat
  takes the GIL): 1.00x is no cost.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

import anyio

from .lag import LagProbe, LagSummary, Sleep
from .runner import BACKENDS, anyio_backend

__all__ = ["ProbeCost", "measure_cost"]


class ProbeCost(NamedTuple):
    """One heartbeat's cost on one backend, from :func:`measure_cost`."""

    backend: str
    heartbeat: str
    sleep_call_ns: float
    """One ``await sleep(0)``: what the heartbeat's sleep call itself costs."""
    beats: int
    loop_cpu_us_per_beat: float
    """CPU time of the loop's thread per beat while idle: the beat and the loop's wake-up."""
    idle: LagSummary
    copy_slowdown: float
    """A worker thread's copies with the heartbeat beating, over the same without (1 = none)."""


def native_sleep() -> Sleep:
    """The running backend's own ``sleep``, without anyio in between."""
    try:
        import asyncio

        asyncio.get_running_loop()
    except RuntimeError:  # anyio's other backend
        import trio

        return trio.sleep
    return asyncio.sleep


def _copies(nbytes: int, rounds: int) -> Callable[[], float]:
    """A worker thread's job that takes the GIL now and then: ``rounds`` copies of ``nbytes``."""
    source, target = bytearray(nbytes), bytearray(nbytes)

    def run() -> float:
        started = time.perf_counter()
        for _ in range(rounds):
            target[:] = source
        return time.perf_counter() - started

    return run


PAIRS = 7


async def _sleep_call_ns(sleep: Sleep, calls: int = 20_000) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        await sleep(0)
    return (time.perf_counter() - started) / calls * 1e9


async def _cost(sleep: Sleep, seconds: float, copies: Callable[[], float]) -> ProbeCost:
    sleep_call_ns = await _sleep_call_ns(sleep)
    async with LagProbe(sleep=sleep) as probe:
        cpu_before = time.thread_time()
        await anyio.sleep(seconds)
        cpu_s = time.thread_time() - cpu_before
        idle = probe.lateness_s[:]
    # Pairs of copies, without and with the heartbeat, back to back: the machine's speed
    # drifts, so each pair gives a ratio and the figure is their median.
    ratios = []
    for _ in range(PAIRS):
        alone = await anyio.to_thread.run_sync(copies)
        async with LagProbe(sleep=sleep):
            beaten = await anyio.to_thread.run_sync(copies)
        ratios.append(beaten / alone)
    return ProbeCost(
        backend="",
        heartbeat="LagProbe" if sleep is anyio.sleep else "native sleep",
        sleep_call_ns=sleep_call_ns,
        beats=len(idle),
        loop_cpu_us_per_beat=cpu_s / max(len(idle), 1) * 1e6,
        idle=LagSummary.of(idle),
        copy_slowdown=statistics.median(ratios),
    )


def measure_cost(backend: str, seconds: float = 1.0, copy_bytes: int = 64 << 20) -> list[ProbeCost]:
    """The probe and a native heartbeat on one backend ("asyncio", "uvloop" or "trio")."""
    name, options = anyio_backend(backend)
    copies = _copies(copy_bytes, 4)

    async def both() -> list[ProbeCost]:
        native = await _cost(native_sleep(), seconds, copies)
        probe = await _cost(anyio.sleep, seconds, copies)
        return [cost._replace(backend=backend) for cost in (native, probe)]

    return anyio.run(both, backend=name, backend_options=options)


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.lag``: print what the probe costs on each backend."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.lag_cost",
        description="What the lag probe costs on each anyio backend, next to a native heartbeat.",
    )
    parser.add_argument("--seconds", type=float, default=1.0, help="idle beating per row (1)")
    parser.add_argument("--backend", action="append", choices=BACKENDS, help="(all)")
    args = parser.parse_args(argv)
    header = (
        f"{'backend':<8} {'heartbeat':<13} {'sleep call':>11} {'beats':>6} {'loop CPU/beat':>14} "
        f"{'idle p50':>9} {'idle p99':>9} {'idle max':>9} {'copy slowdown':>14}"
    )
    print(header)
    print("-" * len(header))
    for backend in args.backend or BACKENDS:
        for cost in measure_cost(backend, args.seconds):
            print(
                f"{cost.backend:<8} {cost.heartbeat:<13} {cost.sleep_call_ns:>8.0f} ns "
                f"{cost.beats:>6} "
                f"{cost.loop_cpu_us_per_beat:>11.1f} us {cost.idle.p50_ms:>6.3f} ms "
                f"{cost.idle.p99_ms:>6.3f} ms {cost.idle.max_ms:>6.3f} ms "
                f"{cost.copy_slowdown:>13.3f}x"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
