"""Loop lag and time of two astage checkouts, interleaved: ``python -m benchmarks.lag_ab OTHER``.

The full benchmark run measures one checkout; on a noisy virtual machine its loop-lag figures
move by 2x from one run to the next, which hides a small regression as well as it invents one.
This compares two checkouts the only fair way there is here: the same small harness, in fresh
processes that take turns (this checkout, then ``OTHER``, then this one again, ...), each
staging a 1 GiB dict (64 float32 tensors) and 50,000 small tensors with a 1 ms asyncio heartbeat,
first calls (a new Stager each) and cached calls. Make ``OTHER`` with ``git worktree add
/tmp/astage-base <rev>``. Both checkouts must accept ``await Stager().stage(sd)``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

# Runs in each child, with only the checkout under test on sys.path.
_CHILD = r"""
import asyncio, json, statistics, sys, time
import torch
import astage

async def beat(lateness, stop):
    while not stop.is_set():
        before = time.perf_counter()
        await asyncio.sleep(0.001)
        lateness.append(time.perf_counter() - before - 0.001)

def p99(values):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]

async def measure(state_dict, reps):
    out = {}
    for phase in ("first", "cached"):
        stager = astage.Stager()
        if phase == "cached":
            await stager.stage(state_dict)
        seconds, p99s, worst = [], [], 0.0
        for _ in range(reps):
            if phase == "first":
                await stager.aclose()
                stager = astage.Stager()
            lateness, stop = [], asyncio.Event()
            task = asyncio.create_task(beat(lateness, stop))
            await asyncio.sleep(0.005)
            lateness.clear()
            started = time.perf_counter()
            staged = await stager.stage(state_dict)
            seconds.append(time.perf_counter() - started)
            stop.set()
            await task
            del staged
            p99s.append(p99(lateness))
            worst = max(worst, max(lateness))
        await stager.aclose()
        out[phase] = {
            "ms": statistics.median(seconds) * 1e3,
            "lag_p99_ms": statistics.median(p99s) * 1e3,
            "lag_max_ms": worst * 1e3,
        }
    return out

reps = int(sys.argv[1])
bulk = {f"t{i}": torch.full((4 << 20,), float(i)) for i in range(64)}
small = {"s": [torch.full((4,), float(i)) for i in range(50_000)]}
print(json.dumps({
    "bulk 1 GiB": asyncio.run(measure(bulk, reps)),
    "50k small": asyncio.run(measure(small, reps)),
}))
"""


def run_child(checkout: str, reps: int) -> dict[str, dict[str, dict[str, float]]]:
    """One child process staging with the astage found in ``checkout``."""
    env = dict(os.environ, PYTHONPATH=os.path.abspath(checkout))
    # Started in an empty folder: ``python -c`` puts the working folder first on sys.path,
    # which must not be a checkout.
    with tempfile.TemporaryDirectory() as empty:
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, str(reps)],
            env=env,
            cwd=empty,
            capture_output=True,
            text=True,
            check=True,
        )
    result: dict[str, dict[str, dict[str, float]]] = json.loads(done.stdout)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lag_ab", description=__doc__)
    parser.add_argument("other", help="the other checkout's root (e.g. a git worktree)")
    parser.add_argument("--rounds", type=int, default=2, help="turns per checkout (2)")
    parser.add_argument("--reps", type=int, default=4, help="calls per phase in a turn (4)")
    args = parser.parse_args(argv)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    checkouts = {"this": here, "other": os.path.abspath(args.other)}
    for round_ in range(args.rounds):
        for name, checkout in checkouts.items():
            for workload, phases in run_child(checkout, args.reps).items():
                cells = "  ".join(
                    f"{phase}: {f['ms']:7.1f} ms, lag p99 {f['lag_p99_ms']:5.2f} ms, "
                    f"max {f['lag_max_ms']:6.1f} ms"
                    for phase, f in phases.items()
                )
                print(f"round {round_ + 1}  {name:5}  {workload:10}  {cells}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
