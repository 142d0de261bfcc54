"""Plots drawn again from a run's raw figures: the GPU page's come from a machine without
matplotlib, through ``python -m benchmarks.plots``."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import plots, report
from benchmarks.config import Config
from benchmarks.record import Check, ScenarioResult, Table
from benchmarks.tests import MACHINE

GPU_RESULTS = Path(__file__).parents[1] / "results" / "gpu.json"


def test_raw_figures_read_back_as_the_results_that_wrote_them(tmp_path: Path) -> None:
    written = ScenarioResult(
        "gpu",
        "GPU: device-to-host staging",
        "about",
        checks=[Check("m", "1 ms", "2 ms", 2.0, ">= 1.2x", True, (1.9, 2.1), "why")],
        tables=[Table("t", ["a", "b"], [["1", "2"]])],
        notes=["a note"],
        figures={"small": {"shape": {"tensors": 3, "nbytes": 12}}},
        seconds=1.5,
        steal_cores=0.01,
    )
    path = tmp_path / "run.json"
    report.write_json(str(path), MACHINE, Config(quick=True), [written])
    assert report.read_json(str(path)) == [written]


def test_the_gpu_page_s_plots_come_from_its_committed_figures(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    assert plots.main([str(GPU_RESULTS), "--img-dir", str(tmp_path)]) == 0
    drawn = sorted(p.name for p in tmp_path.iterdir())
    assert drawn == ["gpu_bulk_speed.png", "gpu_lag.png", "gpu_small_speed.png", "ratios.png"]
    assert all((tmp_path / name).stat().st_size > 10_000 for name in drawn)
