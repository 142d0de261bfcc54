"""The lag floor of this machine: an idle loop beside busy copying threads, with no astage at all.

``python -m benchmarks.lag_floor`` runs a 1 ms asyncio heartbeat (nothing else on the loop)
while plain ``torch`` copies of 64 MiB run beside it, and prints the heartbeat's lateness for:

- the copies in another process (no GIL shared with the loop: only the CPU is), with torch's
  intra-op threads at 1 and at the machine's core count;
- the copies in a thread of this process (what astage does), likewise;
- the copies in a thread under astage's copy slice (what a Stager's copy threads do);
- an idle loop that a thread wakes every few ms with a no-op (what a copy's completion does);
- copies into fresh memory (a first call: every page faulted in) and into touched memory.

Whatever lateness the loop shows here, a stager copying with the same threads cannot beat: on
a machine with as many busy copying threads as cores, the loop thread has to wait for the OS
to give it a core back.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

from astage._drivers._slices import copy_slice

_CHILD = r"""
import sys, time, torch
threads, fresh, seconds = int(sys.argv[1]), sys.argv[2] == "fresh", float(sys.argv[3])
torch.set_num_threads(threads)
src = torch.ones(16 << 20)
dst = torch.empty_like(src); dst.zero_()
print("ready", flush=True)
sys.stdin.readline()
end = time.perf_counter() + seconds
copies = 0
while time.perf_counter() < end:
    if fresh:
        dst = torch.empty_like(src)
    dst.copy_(src)
    copies += 1
print(copies, flush=True)
"""


async def _beats(seconds: float) -> list[float]:
    lateness = []
    clock = time.perf_counter
    end = clock() + seconds
    while clock() < end:
        before = clock()
        await asyncio.sleep(0.001)
        lateness.append(clock() - before - 0.001)
    return lateness


def _summary(lateness: list[float]) -> str:
    ordered = sorted(lateness)
    p99 = ordered[int(0.99 * (len(ordered) - 1))]
    return (
        f"{len(ordered):5} beats  p50 {1e3 * statistics.median(ordered):6.3f}  "
        f"p99 {1e3 * p99:6.2f}  max {1e3 * ordered[-1]:6.2f} ms"
    )


def woken(seconds: float, every_s: float) -> list[float]:
    """The heartbeat while a thread wakes the loop every ``every_s`` with a no-op callback.

    What a worker thread's completion does (anyio's ``to_thread`` reports through
    ``call_soon_threadsafe``): the loop wakes, runs nothing of note, and goes back to
    ``select`` with the time left to the next beat, which ``epoll`` rounds up to a whole
    millisecond. No CPU is busy: this is the loop's timer resolution alone.
    """

    async def beats() -> list[float]:
        loop = asyncio.get_running_loop()
        stop = threading.Event()

        def wake() -> None:
            while not stop.wait(every_s):
                loop.call_soon_threadsafe(lambda: None)

        waker = threading.Thread(target=wake)
        waker.start()
        try:
            return await _beats(seconds)
        finally:
            stop.set()
            waker.join()

    return asyncio.run(beats())


def in_process(
    threads: int, fresh: bool, seconds: float, long_slice: bool = False
) -> tuple[list[float], int]:
    """The heartbeat while a thread of this process copies with ``threads`` intra-op threads.

    ``long_slice``: the thread copies under astage's copy slice (``_drivers._slices``), as a
    Stager's copy threads do; its intra-op threads, started by its first copy, inherit it.
    """
    src = torch.ones(16 << 20)
    dst = torch.empty_like(src)
    dst.zero_()
    stop = threading.Event()
    done = [0]

    def copy() -> None:
        with copy_slice() if long_slice else contextlib.nullcontext():
            torch.set_num_threads(threads)
            target = dst
            while not stop.is_set():
                if fresh:
                    target = torch.empty_like(src)
                target.copy_(src)
                done[0] += 1

    worker = threading.Thread(target=copy)
    worker.start()
    try:
        lateness = asyncio.run(_beats(seconds))
    finally:
        stop.set()
        worker.join()
    return lateness, done[0]


def in_child(threads: int, fresh: bool, seconds: float) -> tuple[list[float], int]:
    """The heartbeat while another process copies with ``threads`` intra-op threads."""
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(threads), "fresh" if fresh else "touched", str(seconds)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    child.stdout.readline()
    child.stdin.write("go\n")
    child.stdin.flush()
    lateness = asyncio.run(_beats(seconds))
    copies = int(child.stdout.readline())
    child.wait()
    return lateness, copies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lag_floor", description=__doc__)
    parser.add_argument("--seconds", type=float, default=1.5)
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    print(f"{cores} cores; idle loop: {_summary(asyncio.run(_beats(args.seconds)))}")
    for every_ms in (7.0, 3.0):
        lateness = woken(args.seconds, every_ms / 1e3)
        print(f"idle loop woken by a thread every {every_ms:g} ms: {_summary(lateness)}")
    for fresh in (False, True):
        for threads in sorted({1, max(1, cores - 1), cores}):
            for where, measure in (
                ("other process", in_child),
                ("thread", in_process),
                ("thread, slice", functools.partial(in_process, long_slice=True)),
            ):
                lateness, copies = measure(threads, fresh, args.seconds)
                gbps = copies * (64 << 20) / args.seconds / 1e9
                print(
                    f"{'fresh' if fresh else 'touched':7} copies, {threads} intra-op thread(s), "
                    f"{where:13}: {_summary(lateness)}  ({gbps:5.2f} GB/s copied)"
                )
    torch.set_num_threads(cores)
    return 0


if __name__ == "__main__":
    sys.exit(main())
