"""Where a cached call's time goes with many small device tensors: ``python -m
benchmarks.gpu_small_profile``.

The first GPU run of the ``gpu`` scenario measured 10,002 small CUDA tensors at 88 us a tensor
for a cached call of the async face and 24 us for the blocking one (DCP: 44 us, one raw
``copy_`` per tensor: 6.8 us). This profiles one cached call of each face (``cProfile``, the
25 costliest functions by own time and by cumulative time) and times a few more.
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time
from statistics import median
from typing import Any

import anyio
import torch

import astage

from .contenders import DcpDefaultStager
from .runner import LoopRunner
from .scenarios.gpu import GPU_SMALL_TENSORS, _to_device
from .state_dicts import small_optimizer_state
from .timing import timed

INTERLEAVED_CALLS = 7


def main() -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    state_dict = _to_device(small_optimizer_state(GPU_SMALL_TENSORS), device)
    if device.type == "cuda":
        torch.cuda.synchronize()

    def report(name: str, profile: cProfile.Profile, times: list[float]) -> None:
        print(f"== {name}: cached calls {[round(1e3 * t, 1) for t in times]} ms")
        stats = pstats.Stats(profile).strip_dirs()
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(25)

    with astage.SyncStager() as sync:
        sync.stage(state_dict)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            sync.stage(state_dict)
            times.append(time.perf_counter() - t0)
        profile = cProfile.Profile()
        profile.enable()
        sync.stage(state_dict)
        profile.disable()
    report("SyncStager", profile, times)

    async def on_loop() -> tuple[cProfile.Profile, list[float]]:
        async with astage.Stager() as stager:
            await stager.stage(state_dict)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                await stager.stage(state_dict)
                times.append(time.perf_counter() - t0)
            profile = cProfile.Profile()  # the loop thread only
            profile.enable()
            await stager.stage(state_dict)
            profile.disable()
        return profile, times

    profile, times = anyio.run(on_loop)
    report("Stager (async)", profile, times)
    interleaved(state_dict, device)
    return 0


def interleaved(state_dict: Any, device: torch.device, calls: int = INTERLEAVED_CALLS) -> None:
    """The blocking face's cached calls back to back, then each after one of DCP's cached calls
    (as the ``gpu`` scenario takes turns): what another stager's call in between costs."""
    with LoopRunner() as runner, astage.SyncStager() as sync:
        dcp = DcpDefaultStager(runner, cuda=device.type == "cuda")
        dcp.start()
        try:
            sync.stage(state_dict)
            dcp.stage(state_dict)
            alone = [timed(lambda: sync.stage(state_dict)) for _ in range(calls)]
            after_dcp = []
            for _ in range(calls):
                dcp.stage(state_dict)
                after_dcp.append(timed(lambda: sync.stage(state_dict)))
        finally:
            dcp.stop()
    print(
        f"== SyncStager cached, median of {calls}: back to back {1e3 * median(alone):.1f} ms, "
        f"each after a DCP cached call {1e3 * median(after_dcp):.1f} ms"
    )


if __name__ == "__main__":
    sys.exit(main())
