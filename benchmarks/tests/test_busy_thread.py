"""The busy-thread benchmark times both stagers' first and second calls, beside the thread and
without it."""

from __future__ import annotations

import threading

import pytest

from benchmarks.busy_thread import busy_thread, main, measure
from benchmarks.state_dicts import small_optimizer_state


def test_each_contender_is_timed_once_per_round_and_call() -> None:
    calls = measure(small_optimizer_state(5), rounds=2, busy=False)
    assert [c.name for c in calls] == ["astage SyncStager", "DCP StateDictStager"]
    assert all(len(c.first_s) == len(c.second_s) == 2 for c in calls)
    assert all(s > 0 for c in calls for s in c.first_s + c.second_s)


def test_the_busy_thread_runs_inside_the_block_only() -> None:
    with busy_thread():
        assert any(t.name == "busy" for t in threading.enumerate())
    assert not any(t.name == "busy" for t in threading.enumerate())


def test_the_report_has_a_line_per_contender_busy_and_quiet(
    capsys: pytest.CaptureFixture[str],
) -> None:
    main(["--params", "4", "--rounds", "1"])
    out = capsys.readouterr().out
    assert "13 tensors" in out
    assert out.count(" busy ") == 2 and out.count("quiet ") == 2
