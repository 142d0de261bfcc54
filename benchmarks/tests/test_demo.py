"""``python -m benchmarks.demo`` end to end on a tiny model, on every event loop."""

from __future__ import annotations

import pytest

from benchmarks import demo
from benchmarks.runner import BACKENDS

TINY = ["--layers", "1", "--width", "64", "--vocab", "100", "--steps", "2"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_demo_runs_and_checks_its_snapshot(
    backend: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert demo.main([*TINY, "--backend", backend]) == 0
    out = capsys.readouterr().out
    assert f"{backend} loop" in out
    assert out.count(": OK") == 2  # tied weights aliased; every staged tensor equal
    for row in ("astage step 1 (first)", "astage step 2 (cached)", "DCP DefaultStager cached"):
        assert row in out
    assert "cached snapshot: astage" in out


def test_demo_without_dcp(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main([*TINY, "--no-dcp"]) == 0
    assert "DCP" not in capsys.readouterr().out


def test_demo_rejects_bad_sizes() -> None:
    with pytest.raises(SystemExit, match="multiple"):
        demo.main(["--width", "100", "--heads", "3"])
    with pytest.raises(SystemExit, match="positive"):
        demo.main(["--steps", "0"])
