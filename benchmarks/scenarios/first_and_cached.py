"""First call and cached call: the measurement behind the bulk, small, model and gpu scenarios.

Per repeat, each contender's first call runs on a levelled heap with an empty cache; then all
contenders stay alive and take turns for the cached calls. Figures are medians over repeats, and
a ratio is the median of the ratios within each repeat (the machine's speed drifts).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..config import Config
from ..contenders import Contender, restore_intraop_threads
from ..record import Check, ScenarioResult, Table, fmt_gbps, fmt_s
from ..state_dicts import Shape
from ..timing import level_heap, median, rotate

__all__ = [
    "Timings",
    "first_and_cached",
    "paired_ratio",
    "speed_check",
    "timing_table",
    "with_timings",
]


@dataclass
class Timings:
    """One contender's first and cached call times (and new bytes), over every repeat."""

    first: list[float]
    cached: list[float]
    first_new_nbytes: list[int | None]
    cached_new_nbytes: list[int | None]
    cached_per_repeat: int = 1

    @property
    def first_s(self) -> float:
        return median(self.first)

    @property
    def cached_s(self) -> float:
        return median(self.cached)

    def per_repeat(self, phase: str) -> list[float]:
        """The median of each repeat's calls of ``phase`` ("first" or "cached")."""
        if phase == "first":
            return list(self.first)
        k = self.cached_per_repeat
        return [median(self.cached[i : i + k]) for i in range(0, len(self.cached), k)]

    def figures(self) -> dict[str, Any]:
        return {
            "first_s": self.first,
            "cached_s": self.cached,
            "first_median_s": self.first_s,
            "cached_median_s": self.cached_s,
            "first_new_nbytes": self.first_new_nbytes,
            "cached_new_nbytes": self.cached_new_nbytes,
        }


def paired_ratio(mine: Timings, theirs: Timings, phase: str) -> float:
    """Median over repeats of theirs/mine, each repeat's figures measured side by side.

    Memory bandwidth on this kind of machine drifts by tens of percent over a minute; a ratio
    of two figures taken in the same repeat cancels most of that drift.
    """
    pairs = zip(theirs.per_repeat(phase), mine.per_repeat(phase), strict=True)
    return median([t / m for t, m in pairs])


def first_and_cached(
    contenders: Sequence[Contender], state_dict: Any, config: Config
) -> dict[str, Timings]:
    """Per repeat: each contender's first call on a levelled heap, then interleaved cached calls.

    The contenders' first calls run one after the other (in an order that rotates from repeat
    to repeat); all stagers then stay alive and take turns for the cached calls, so a drift of
    the machine's speed during the repeat touches every contender alike.
    """
    k = config.cached_calls
    results = {c.name: Timings([], [], [], [], k) for c in contenders}
    for repeat in range(config.repeats):
        order = rotate(contenders, repeat)
        started: list[Contender] = []
        try:
            for contender in order:
                timings = results[contender.name]
                level_heap()
                restore_intraop_threads()
                contender.start()
                started.append(contender)
                timings.first.append(contender.stage(state_dict))
                timings.first_new_nbytes.append(contender.new_nbytes())
            for _ in range(k):
                for contender in order:
                    timings = results[contender.name]
                    timings.cached.append(contender.stage(state_dict))
                    timings.cached_new_nbytes.append(contender.new_nbytes())
        finally:
            for contender in started:
                contender.stop()
        level_heap()
    return results


def speed_check(metric: str, mine: Timings, theirs: Timings, phase: str, goal: float) -> Check:
    """``theirs`` time over ``mine`` for one phase ("first" or "cached"), paired by repeat."""
    ratio = paired_ratio(mine, theirs, phase)
    mine_s, theirs_s = getattr(mine, f"{phase}_s"), getattr(theirs, f"{phase}_s")
    verdict = ratio >= goal if goal > 0 else None
    return Check(
        metric,
        fmt_s(mine_s),
        fmt_s(theirs_s),
        ratio,
        f">= {goal:g}x" if goal else "(context)",
        verdict,
    )


def timing_table(title: str, timings: dict[str, Timings], nbytes: int, tensors: int) -> Table:
    """Every contender's medians: time, GB/s and microseconds per tensor, first and cached."""
    rows = []
    for name, t in timings.items():
        rows.append(
            [
                name,
                fmt_s(t.first_s),
                fmt_gbps(nbytes, t.first_s),
                f"{t.first_s / tensors * 1e6:.2f}",
                fmt_s(t.cached_s),
                fmt_gbps(nbytes, t.cached_s),
                f"{t.cached_s / tensors * 1e6:.2f}",
                f"{len(t.first)} / {len(t.cached)}",
            ]
        )
    columns = [
        "contender",
        "first call",
        "first GB/s",
        "first us/tensor",
        "cached call",
        "cached GB/s",
        "cached us/tensor",
        "samples (first / cached)",
    ]
    return Table(title, columns, rows)


def with_timings(
    result: ScenarioResult, timings: dict[str, Timings], shape: Shape
) -> ScenarioResult:
    """Attach the table of every contender's medians and the raw figures to ``result``."""
    result.tables.append(
        timing_table("All contenders (medians)", timings, shape.nbytes, shape.tensors)
    )
    result.figures = {
        "shape": shape.figures(),
        "timings": {name: t.figures() for name, t in timings.items()},
    }
    return result
