"""The async face's GIL hand-over, length by length: ``python -m benchmarks.hand_over_ab``.

A replay's turn starts with a short sleep while a host copier is at work, so that the copier
takes the GIL (see ``astage._drivers._async._hand_over_gil``). This times cached ``Stager``
calls over the small scenario's 50,000 tensors with each hand-over length given (seconds;
``none`` for no hand-over at all), one stager per length, the lengths taking turns in a
rotating order, optionally beside a 1 ms heartbeat. It prints each length's median call, its
median paired ratio against the first length, and the heartbeat's p99 and worst lateness.
Differences of 2-3% are this VM's noise from one run to the next: run it more than once.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import anyio

import astage
from astage._drivers import _async

from .runner import LoopRunner
from .state_dicts import small_optimizer_state


def _lengths(text: str) -> list[float | None]:
    return [None if part == "none" else float(part) for part in text.split(",")]


def _no_hand_over(seconds: float) -> float:
    return 0.0


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _timed_call(
    stager: astage.Stager, state_dict: Any, lateness: list[float] | None
) -> float:
    """One cached call's seconds; with ``lateness``, a 1 ms heartbeat runs beside it."""
    stop = anyio.Event()

    async def beat() -> None:
        assert lateness is not None
        while not stop.is_set():
            before = time.perf_counter()
            await anyio.sleep(0.001)
            lateness.append(time.perf_counter() - before - 0.001)

    async with anyio.create_task_group() as group:
        if lateness is not None:
            group.start_soon(beat)
            await anyio.sleep(0.005)
        started = time.perf_counter()
        await stager.stage(state_dict)
        seconds = time.perf_counter() - started
        stop.set()
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hand_over_ab", description=__doc__)
    parser.add_argument("--lengths", default="1e-4,none", help="comma-separated, seconds or none")
    parser.add_argument("--pairs", type=int, default=40, help="calls per length")
    parser.add_argument("--backend", default="asyncio", choices=("asyncio", "uvloop", "trio"))
    parser.add_argument("--heartbeat", action="store_true", help="a 1 ms heartbeat beside")
    args = parser.parse_args(argv)
    lengths = _lengths(args.lengths)
    state_dict = small_optimizer_state()
    real: Callable[[float], float] = _async._hand_over_gil
    default = _async.GIL_HAND_OVER_S
    times: dict[int, list[float]] = {i: [] for i in range(len(lengths))}
    late: dict[int, list[float]] = {i: [] for i in range(len(lengths))}
    with LoopRunner(args.backend) as runner:
        stagers = [astage.Stager() for _ in lengths]

        def call(index: int, record: bool) -> None:
            length = lengths[index]
            _async.GIL_HAND_OVER_S = default if length is None else length
            _async._hand_over_gil = _no_hand_over if length is None else real  # type: ignore[assignment]
            gc.collect()
            lateness: list[float] | None = late[index] if args.heartbeat else None
            seconds = runner.run(_timed_call(stagers[index], state_dict, lateness))
            if record:
                times[index].append(seconds)

        try:
            for index in range(len(lengths)):
                for _ in range(3):  # the first call records; the next ones replay
                    call(index, record=False)
            late = {i: [] for i in range(len(lengths))}
            for pair in range(args.pairs):
                shift = pair % len(lengths)
                for index in [*range(shift, len(lengths)), *range(shift)]:
                    call(index, record=True)
        finally:
            _async.GIL_HAND_OVER_S = default
            _async._hand_over_gil = real  # type: ignore[assignment]
            for stager in stagers:
                runner.run(stager.aclose())
    base = times[0]
    for index, length in enumerate(lengths):
        ratio = statistics.median(y / x for x, y in zip(base, times[index], strict=True))
        line = (
            f"hand-over {'none' if length is None else f'{length:g} s':>9}: "
            f"{1e3 * statistics.median(times[index]):6.1f} ms a call, {ratio:.3f}x the first"
        )
        if args.heartbeat and late[index]:
            line += (
                f"; heartbeat p99 {1e3 * _p(late[index], 0.99):.2f} ms,"
                f" max {1e3 * max(late[index]):.2f} ms"
            )
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
