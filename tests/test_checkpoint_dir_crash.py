"""Crash test: a process saving in a loop is killed with SIGKILL at random moments.

``benchmarks/crash_resume.py`` does the work (one process forks a saving worker per kill, and
a checker after it): after every kill a fresh :class:`astage.CheckpointDir` must load one of
the saved steps bit-exact, at least as new as the newest ``save()`` that returned, and leave
no temporary file behind once opened. The quick test kills 8 times, the slow one 50 (~25 s
on the busy 2-core VM); ``python -m benchmarks.crash_resume`` kills 60 times.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the crash test forks")


def crash_resume(kills: int, seed: int, root: Path) -> dict[str, Any]:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.crash_resume",
            "--json",
            "--kills",
            str(kills),
            "--seed",
            str(seed),
            "--root",
            str(root),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode in (0, 1), done.stderr[-4000:]
    figures: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return figures


def check(figures: dict[str, Any], kills: int) -> None:
    assert figures["failures"] == []
    assert figures["kills"] == kills
    assert figures["kills_leaving_temp_files"] > 0  # kills landed mid-write: tidying was tested


def test_killed_saves_always_resume_bit_exact(tmp_path: Path) -> None:
    check(crash_resume(8, seed=1, root=tmp_path), 8)


@pytest.mark.stress
def test_fifty_kills(tmp_path: Path) -> None:
    figures = crash_resume(50, seed=2, root=tmp_path)
    check(figures, 50)
    assert figures["saves"] > 0  # kills landed after saves too, not only during the first
