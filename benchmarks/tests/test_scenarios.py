"""Every scenario runs end to end on tiny state dicts, and the report and JSON come out of it."""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks import report
from benchmarks.config import Config, Data
from benchmarks.record import ScenarioResult
from benchmarks.runner import LoopRunner
from benchmarks.scenarios import SCENARIOS
from benchmarks.state_dicts import MiB
from benchmarks.tests import MACHINE

TINY = Config(
    quick=True,
    repeats=1,
    cached_calls=1,
    bulk_bytes=4 * MiB,
    bulk_tensors=8,
    small_tensors=300,
    gpt_layers=1,
    gpt_width=64,
    gpt_vocab=256,
    gpu_bytes=4 * MiB,
    dcp_layers=1,
    dcp_width=64,
    dcp_vocab=256,
    writer_repeats=1,
)


@pytest.fixture(scope="module")
def runner() -> Iterator[LoopRunner]:
    # The scenarios collect garbage before every first call; with torch's and the test
    # suite's objects frozen, each collection scans only what the scenarios made.
    gc.freeze()
    try:
        with LoopRunner() as runner:
            yield runner
    finally:
        gc.unfreeze()


@pytest.fixture(scope="module")
def results(runner: LoopRunner) -> dict[str, ScenarioResult]:
    data = Data(TINY)
    return {name: scenario(TINY, data, runner) for name, scenario in SCENARIOS.items()}


EXPECTED = {
    "bulk": 8,
    "small": 14,
    "model": 4,
    "lag": 12,
    "memory": 10,
    "dcp": 6,
    "writers": 18,
    "gpu": 19,
    "restore": 20,
}
"""Checks each scenario computes: a split that loses a figure shows here."""


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenario_runs(results: dict[str, ScenarioResult], name: str) -> None:
    result = results[name]
    assert result.key == name
    if result.skipped:
        assert name == "gpu"
        return
    assert len(result.checks) == EXPECTED[name]
    assert result.tables
    assert result.figures
    for check in result.checks:
        assert check.metric and check.astage and check.reference


@pytest.mark.slow
def test_report_and_json(results: dict[str, ScenarioResult], tmp_path: Path) -> None:
    ordered = list(results.values())
    markdown = report.render_markdown(MACHINE, ordered, {}, 1.0)
    for result in ordered:
        assert result.title in markdown
    path = tmp_path / "latest.json"
    report.write_json(str(path), MACHINE, TINY, ordered)
    payload = json.loads(path.read_text(encoding="utf-8"))
    assert set(payload["scenarios"]) == set(SCENARIOS)
    assert payload["config"]["bulk_bytes"] == TINY.bulk_bytes
