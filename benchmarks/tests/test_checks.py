"""The goal checks: ratios paired by repeat, oriented so that higher is better, and verdicts."""

from __future__ import annotations

import pytest

from benchmarks.scenarios.first_and_cached import AfterReserve, Timings, reserve_check, speed_check


def timings(first: list[float], cached: list[float], per_repeat: int) -> Timings:
    return Timings(first, cached, [None] * len(first), [None] * len(cached), per_repeat)


def test_speed_check_pairs_repeats_and_says_the_goal_its_way() -> None:
    mine = timings([1.0, 2.0, 1.0], [1.0, 1.0, 4.0, 4.0, 1.0, 3.0], 2)
    ceiling = timings([1.0, 1.0, 1.0], [0.9, 0.9, 4.0, 4.0, 1.0, 1.0], 2)
    # cached, per repeat: mine 1, 4, 2 against 0.9, 4, 1: ratios 0.9, 1.0, 0.5 -> median 0.9
    check = speed_check("m", mine, ceiling, "cached", 1 / 1.05, goal_label="<= 1.05x the copy")
    assert check.ratio == pytest.approx(0.9)
    assert check.goal == "<= 1.05x the copy"
    assert check.met is False
    assert speed_check("m", mine, ceiling, "first", 0).met is None  # context: no verdict


@pytest.mark.parametrize(("first", "met"), [(1.1, True), (1.2, False)])
def test_reserve_check_holds_the_first_call_to_1_1x_its_cached_calls(
    first: float, met: bool
) -> None:
    t = AfterReserve([5.0, 5.0], [first, 3.0], [1.0, 1.0, 1.0, 3.0, 3.0, 3.0], [0, 0], 3)
    check = reserve_check("astage", t)
    # per repeat: cached / first = 1 / first and 3 / 3 -> the median of the two
    assert check.ratio == pytest.approx((1 / first + 1.0) / 2)
    t_one = AfterReserve([5.0], [first], [1.0, 1.0, 1.0], [0], 3)
    assert reserve_check("astage", t_one).met is met
