"""The ``gpu`` scenario: device-to-host staging on CUDA against DCP and one raw pinned copy."""

from __future__ import annotations

import time
from typing import Any

import torch

from ..config import Config, Data
from ..contenders import AstageAsync, AstageSync, Contender, DcpDefaultStager
from ..record import ScenarioResult, fmt_bytes
from ..runner import LoopRunner
from ..state_dicts import bulk_floats, describe
from .first_and_cached import first_and_cached, speed_check, timing_table
from .loop_lag import lag_checks, lag_runs


class RawPinnedCopy(Contender):
    """All bytes in one device-to-host copy into one pinned tensor: the link's practical limit."""

    name = "raw pinned copy (one tensor)"
    family = "plain"

    def __init__(self, flat: torch.Tensor) -> None:
        self._flat = flat
        self._host: torch.Tensor | None = None

    def start(self) -> None:
        self._host = None

    def _copy(self) -> None:
        if self._host is None:
            self._host = torch.empty(self._flat.shape, dtype=self._flat.dtype, pin_memory=True)
        self._host.copy_(self._flat, non_blocking=True)
        torch.cuda.synchronize()

    def stage(self, state_dict: Any) -> float:
        start = time.perf_counter()
        self._copy()
        return time.perf_counter() - start

    def stop(self) -> None:
        self._host = None


def gpu(config: Config, data: Data, runner: LoopRunner) -> ScenarioResult:
    """CUDA to host: astage vs DCP's DefaultStager vs one raw pinned copy; then loop lag."""
    result = ScenarioResult(
        "gpu",
        f"GPU: device-to-host staging of {fmt_bytes(config.gpu_bytes)} on CUDA",
        "First and cached GB/s of astage (defaults: pinned buffers, non-blocking copies on a "
        "staging stream) vs DCP's DefaultStager with pinned memory and non-blocking copies, vs "
        "one raw non-blocking copy of the same bytes into one pinned tensor; then loop lag.",
    )
    if not torch.cuda.is_available():
        result.skipped = (
            "skipped: no CUDA device on this machine (`torch.cuda.is_available()` is False). "
            "Run `python -m benchmarks --only gpu` on a GPU machine to fill this in."
        )
        return result
    state_dict = bulk_floats(config.gpu_bytes, 64, device="cuda")
    flat = torch.empty(config.gpu_bytes // 4, dtype=torch.float32, device="cuda").uniform_()
    torch.cuda.synchronize()
    shape = describe(state_dict)
    stager, sync = AstageAsync(runner), AstageSync()
    dcp, raw = DcpDefaultStager(runner, cuda=True), RawPinnedCopy(flat)
    timings = first_and_cached([stager, sync, dcp, raw], state_dict, config)
    del flat
    t_raw, t_dcp = timings[raw.name], timings[dcp.name]
    for contender in (stager, sync):
        t = timings[contender.name]
        result.checks += [
            speed_check(f"{contender.name}: cached vs raw pinned copy", t, t_raw, "cached", 0.9),
            speed_check(
                f"{contender.name}: cached vs DCP DefaultStager cached", t, t_dcp, "cached", 1.2
            ),
            speed_check(
                f"{contender.name}: first vs DCP DefaultStager first", t, t_dcp, "first", 0
            ),
        ]
    result.tables.append(
        timing_table("All contenders (medians)", timings, shape.nbytes, shape.tensors)
    )
    runs = lag_runs(state_dict, config, runner, cuda=True)
    checks, table = lag_checks(f"{fmt_bytes(config.gpu_bytes)} on CUDA", runs, shape.nbytes)
    result.checks += checks
    result.tables.append(table)
    result.figures = {
        "device": torch.cuda.get_device_name(0),
        "shape": shape.figures(),
        "timings": {name: t.figures() for name, t in timings.items()},
        "lag": {name: run.figures() for name, run in runs.items()},
    }
    del state_dict
    torch.cuda.empty_cache()
    return result
