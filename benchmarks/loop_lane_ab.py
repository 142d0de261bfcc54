"""The async face's loop lane against its worker lane, in one process: ``python -m
benchmarks.loop_lane_ab [--rounds 24] [--busy] [--heartbeat]``.

Cached calls over 50,000 small tensors (``small_optimizer_state``) on two stagers that take
turns, one with the loop lane (``_async._LoopLane``: a cached call's small host copies made on
the loop's thread, in pieces within its turns), one with it switched off (those copies then go
to the worker thread, as they did before the lane), and the blocking face beside them. The
order alternates from round to round; ratios are medians of the ratios within each round.
``--busy`` runs a thread that keeps running Python meanwhile (the GIL convoy of a training
thread); ``--heartbeat`` times the calls beside a 1 ms asyncio heartbeat and reports its
lateness (p50, p99, max) per lane.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
from typing import Any

import astage
from astage._drivers import _async
from benchmarks.state_dicts import small_optimizer_state

_takes = _async._LoopLane.takes
_use_lane = [True]


def _switchable(batch: Any, plan: Any, cache: Any) -> bool:
    return _use_lane[0] and _takes(batch, plan, cache)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _beat(lateness: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        before = time.perf_counter()
        await asyncio.sleep(0.001)
        lateness.append(time.perf_counter() - before - 0.001)


async def _compare(rounds: int, heartbeat: bool) -> None:
    state_dict = await asyncio.to_thread(small_optimizer_state)
    tensors = 50_001
    stagers = {True: astage.Stager(), False: astage.Stager()}
    blocking = astage.SyncStager()
    for lane, stager in stagers.items():
        _use_lane[0] = lane
        for _ in range(3):
            await stager.stage(state_dict)
    blocking.stage(state_dict)
    seconds: dict[str, list[float]] = {"loop lane": [], "worker": [], "blocking": []}
    lateness: dict[str, list[float]] = {"loop lane": [], "worker": []}
    for index in range(rounds):
        order = (True, False) if index % 2 else (False, True)
        for lane in order:
            name = "loop lane" if lane else "worker"
            _use_lane[0] = lane
            beats: list[float] = []
            stop = asyncio.Event()
            task = asyncio.create_task(_beat(beats, stop)) if heartbeat else None
            if task is not None:
                await asyncio.sleep(0.005)
            started = time.perf_counter()
            await stagers[lane].stage(state_dict)
            seconds[name].append(time.perf_counter() - started)
            stop.set()
            if task is not None:
                await task
            lateness[name] += beats
        started = time.perf_counter()
        blocking.stage(state_dict)
        seconds["blocking"].append(time.perf_counter() - started)
    for name, values in seconds.items():
        print(f"{name:10} {statistics.median(values) / tensors * 1e6:.2f} us per tensor")

    def paired(mine: str, theirs: str) -> float:
        pairs = zip(seconds[theirs], seconds[mine], strict=True)
        return statistics.median(a / b for b, a in pairs)

    print(
        f"loop lane / worker {paired('worker', 'loop lane'):.3f}, "
        f"loop lane / blocking {paired('blocking', 'loop lane'):.3f}, "
        f"worker / blocking {paired('blocking', 'worker'):.3f}"
    )
    if heartbeat:
        for name, beats in lateness.items():
            print(
                f"{name:10} heartbeat: {len(beats)} beats, p50 {_percentile(beats, 0.5) * 1e3:.3f} "
                f"ms, p99 {_percentile(beats, 0.99) * 1e3:.3f} ms, max {max(beats) * 1e3:.2f} ms"
            )
    for stager in stagers.values():
        await stager.aclose()
    blocking.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=24)
    parser.add_argument("--busy", action="store_true", help="a thread running Python beside")
    parser.add_argument("--heartbeat", action="store_true", help="a 1 ms heartbeat beside")
    args = parser.parse_args()
    _async._LoopLane.takes = staticmethod(_switchable)  # type: ignore[method-assign]
    stop = threading.Event()

    def spin() -> None:
        count = 0
        while not stop.is_set():
            count += 1

    if args.busy:
        threading.Thread(target=spin, daemon=True).start()
    try:
        asyncio.run(_compare(args.rounds, args.heartbeat))
    finally:
        stop.set()


if __name__ == "__main__":
    main()
