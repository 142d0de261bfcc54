"""The comparison with DCP: its ``DefaultStager`` on the same snapshot, and the final table."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, TextIO

from torch.distributed.checkpoint.staging import DefaultStager

from astage import Stager, StagingOptions

from ..contenders import dcp_default_options
from ..futures import wait_future
from ..lag import LagProbe, LagSummary
from ..state_dicts import describe
from .events import Event, mb

__all__ = ["Row", "astage_rows", "dcp_rows", "print_comparison", "render_table", "row_of"]


@dataclass(frozen=True)
class Row:
    """One staging call in the final table: its size, time, cache reuse and loop lag."""

    label: str
    nbytes: int
    tensors: int
    seconds: float
    reused: str
    new_nbytes: str
    lag_p99_ms: float
    lag_max_ms: float

    @property
    def gb_per_s(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else math.nan


def row_of(event: Event, first: bool) -> Row:
    """The table's row for a ``staged`` event of the training loop."""
    return Row(
        f"astage step {event['step']} ({'first' if first else 'cached'})",
        event["nbytes"],
        event["tensors"],
        event["seconds"],
        f"{event['reused'] * 100:.0f}%",
        mb(event["new_nbytes"]),
        event["lag_p99_ms"],
        event["lag_max_ms"],
    )


def render_table(rows: list[Row]) -> str:
    """The final table, one line per staging call."""
    header = (
        f"{'':<26} {'bytes':>10} {'tensors':>8} {'time':>9} {'GB/s':>7} "
        f"{'reused':>7} {'new bytes':>10} {'lag p99':>9} {'lag max':>9}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row.label:<26} {row.nbytes / 1e6:>7.1f} MB {row.tensors:>8} "
            f"{row.seconds * 1e3:>6.1f} ms {row.gb_per_s:>7.2f} {row.reused:>7} "
            f"{row.new_nbytes:>10} {row.lag_p99_ms:>6.2f} ms {row.lag_max_ms:>6.2f} ms"
        )
    return "\n".join(lines)


async def astage_rows(snapshot: Any, probe: LagProbe) -> list[Row]:
    """astage's Stager alone on the snapshot, as DCP's stager is: a first call, then a cached one.

    The training loop's saves also hand each tensor to the writer as it lands; these calls
    only stage, like DCP's, so the two are compared on the same work.
    """
    rows = []
    async with Stager(StagingOptions()) as stager:
        for label in ("astage Stager first", "astage Stager cached"):
            async with probe.window() as window:
                await stager.stage(snapshot)
            stats = stager.last_stats
            assert stats is not None
            lag = window.summary()
            rows.append(
                Row(
                    label,
                    stats.nbytes,
                    stats.tensors,
                    stats.seconds,
                    f"{stats.reused_fraction * 100:.0f}%",
                    mb(stats.new_nbytes),
                    lag.p99_ms,
                    lag.max_ms,
                )
            )
    return rows


async def dcp_rows(snapshot: Any, probe: LagProbe, cuda: bool) -> list[Row]:
    """DCP's DefaultStager on the same snapshot: a first call, then a cached one."""
    shape = describe(snapshot)
    stager = DefaultStager(dcp_default_options(cuda))
    rows = []
    try:
        for label in ("DCP DefaultStager first", "DCP DefaultStager cached"):
            async with probe.window() as window:
                started = time.perf_counter()
                future = stager.stage(snapshot)
                assert not isinstance(future, dict)
                await wait_future(future)
                seconds = time.perf_counter() - started
            lag: LagSummary = window.summary()
            rows.append(
                Row(
                    label,
                    shape.nbytes,
                    shape.tensors,
                    seconds,
                    "n/a",
                    "n/a",
                    lag.p99_ms,
                    lag.max_ms,
                )
            )
    finally:
        stager.close()
    return rows


def print_comparison(rows: list[Row], out: TextIO) -> None:
    """One line: astage's cached stage against DCP's, in time and loop lag."""
    by_label = {row.label: row for row in rows}
    ours = by_label.get("astage Stager cached")
    theirs = by_label.get("DCP DefaultStager cached")
    if ours is None or theirs is None:
        return
    out.write(
        f"\ncached snapshot: astage {ours.seconds * 1e3:.1f} ms vs DCP "
        f"{theirs.seconds * 1e3:.1f} ms = {theirs.seconds / ours.seconds:.2f}x; loop lag p99 "
        f"{ours.lag_p99_ms:.2f} ms vs {theirs.lag_p99_ms:.2f} ms, "
        f"max {ours.lag_max_ms:.2f} ms vs {theirs.lag_max_ms:.2f} ms\n"
    )
