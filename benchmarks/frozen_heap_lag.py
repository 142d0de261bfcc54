"""Loop lag of cached calls in an application that froze its heap, against one that did not.

``python -m benchmarks.frozen_heap_lag [--tensors 50000] [--calls 20]``

Runs twice, each in a fresh interpreter: once as an application that calls ``gc.freeze()``
after building its state dict (as before forking workers), once as one that does not. Each
run makes cached ``Stager.stage`` calls beside a 1 ms ``asyncio.sleep`` heartbeat and prints the
most the loop was late during each call.

Why: astage files a call's new objects into the oldest generation (``gc.freeze()`` then
``gc.unfreeze()``) so that no young collection traverses them afterwards; where the
application froze objects of its own, that would thaw them, so it is skipped, and the next
young collection traverses the call's objects on the loop (see ``astage/_drivers/_gc.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import subprocess
import sys
import time

import torch

import astage


async def lag_per_call(source: dict[str, dict[str, torch.Tensor]], calls: int) -> list[float]:
    """The most the loop was late (seconds) during each of ``calls`` cached calls."""
    late: list[float] = []

    async def heartbeat() -> None:
        while True:
            asleep = time.perf_counter()
            await asyncio.sleep(0.001)
            late.append(time.perf_counter() - asleep - 0.001)

    worst = []
    async with astage.Stager() as stager:
        await stager.stage(source)
        beat = asyncio.create_task(heartbeat())
        await asyncio.sleep(0.01)
        for _ in range(calls):
            late.clear()
            staged = await stager.stage(source)
            del staged  # the next call may reuse its buffers
            worst.append(max(late, default=0.0))
        beat.cancel()
    return worst


def run_one(tensors: int, calls: int, freeze: bool) -> None:
    source = {f"layer{i}": {"w": torch.randn(4), "b": torch.randn(2)} for i in range(tensors // 2)}
    if freeze:
        gc.collect()
        gc.freeze()
    worst = asyncio.run(lag_per_call(source, calls))
    ms = [round(x * 1e3, 1) for x in worst]
    print(
        f"{'frozen heap' if freeze else 'heap not frozen'} ({gc.get_freeze_count()} frozen "
        f"objects): max loop lag per cached call of {tensors} tensors, ms: {ms}; median "
        f"{statistics.median(ms):.1f} ms, max {max(ms):.1f} ms",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=50_000)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--one", choices=["frozen", "not-frozen"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        run_one(args.tensors, args.calls, args.one == "frozen")
        return
    for kind in ("frozen", "not-frozen"):
        command = [sys.executable, "-m", "benchmarks.frozen_heap_lag", "--one", kind]
        command += ["--tensors", str(args.tensors), "--calls", str(args.calls)]
        subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
