"""Saves of many small tensors, on the writers page: the file's layout kept, and the event loop.

Over 20,000 optimizer-shaped tensors (``SAVE_SHARE`` of the small scenario's) a save's cost is
per tensor, and before the first byte is staged the file is planned (an entry, an offset and a
header node per tensor). A stager's saves
keep the last layout and take it where nothing changed (``LayoutMemo``). Contenders, each on the
same state dict in this one process, each repeat in a rotated order, every file durable:

- ``astage.save`` with a ``Stager`` kept across saves (its layout kept too);
- the same save with the stager's kept layout dropped first (the plan made afresh: what every
  save cost before layouts were kept);
- ``dcp.async_save`` with a ``DefaultStager`` kept across saves (as on the rest of the page).

A 1 ms heartbeat runs beside each astage save (``benchmarks.lag.LagProbe``): its lateness says
how long the save kept the event loop from running. DCP's save blocks the calling thread, so it
has no such figure.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

import astage
from astage._files._layout import layout_memo

from ..config import Config
from ..contenders import dcp_default_options, dcp_default_stager
from ..lag import LagProbe
from ..record import Check, Table, fmt_s
from ..runner import LoopRunner
from ..state_dicts import small_optimizer_state
from ..timing import level_heap, median, rotate

SAVE_SHARE = 0.4
"""The small saves' dict has this share of the small scenario's tensors (20,000 of 50,000)."""

KEPT = "astage.save, layout kept (cached Stager)"
FRESH = "astage.save, layout planned afresh (kept layout dropped first)"
DCP = "dcp.async_save (DefaultStager, FileSystemWriter, fsync)"
NAMES = [KEPT, FRESH, DCP]


class SmallSaves:
    """The three contenders' times, and the heartbeat's p99 and max (ms) beside astage's."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {name: [] for name in NAMES}
        self.p99_ms: dict[str, list[float]] = {KEPT: [], FRESH: []}
        self.max_ms: dict[str, list[float]] = {KEPT: [], FRESH: []}

    def checks(self, label: str) -> list[Check]:
        times = self.times
        repeats = range(len(times[KEPT]))

        def paired(num: str, den: str) -> float:
            return median([times[num][i] / times[den][i] for i in repeats])

        def against(other: str, metric: str) -> Check:
            """The kept-layout save against ``other``, paired by repeat (a context row)."""
            each = ", ".join(f"{times[other][i] / times[KEPT][i]:.2f}x" for i in repeats)
            return Check(
                f"{label}: {metric}",
                _spread(times[KEPT]),
                _spread(times[other]),
                paired(other, KEPT),
                f"(context); per repeat {each}",
                None,
            )

        checks = [
            against(DCP, "astage.save (layout kept) vs dcp.async_save, durable"),
            against(FRESH, "astage.save, layout kept vs planned afresh"),
        ]
        for name in (KEPT, FRESH):
            checks.append(
                Check(
                    f"{label}: 1 ms heartbeat beside {name}: p99 / max lateness",
                    f"{median(self.p99_ms[name]):.2f} / {median(self.max_ms[name]):.2f} ms",
                    "none (dcp.async_save blocks the calling thread)",
                    None,
                    "(context); per repeat "
                    + ", ".join(
                        f"{p:.1f}/{m:.1f}"
                        for p, m in zip(self.p99_ms[name], self.max_ms[name], strict=True)
                    ),
                    None,
                )
            )
        return checks

    def table(self, label: str) -> Table:
        kept = median(self.times[KEPT])
        return Table(
            f"{label}: seconds to a durable checkpoint (medians over "
            f"{len(self.times[KEPT])} repeats)",
            ["contender", "median", "vs layout kept", "each repeat"],
            [
                [
                    name,
                    fmt_s(median(values)),
                    f"{median(values) / kept:.2f}x",
                    ", ".join(fmt_s(v) for v in values),
                ]
                for name, values in self.times.items()
            ],
        )


def _spread(values: list[float]) -> str:
    return f"{fmt_s(median(values))} [{fmt_s(min(values))}-{fmt_s(max(values))}]"


def small_saves(
    config: Config, runner: LoopRunner, dcp_save_durable: Callable[[Any, str, Any], None]
) -> tuple[str, SmallSaves]:
    """Measure the three contenders over ``config.writer_repeats`` repeats (one untimed round
    first; ``dcp_save_durable`` is the writers page's durable ``dcp.async_save``); returns the
    state dict's label and the figures."""
    level_heap()
    tensors = int(config.small_tensors * SAVE_SHARE)
    state = small_optimizer_state(tensors)
    label = f"{tensors:,} small tensors (optimizer-shaped)"
    root = tempfile.mkdtemp(prefix="astage-bench-small-saves-")
    stager = astage.Stager()
    dcp_stager = dcp_default_stager(dcp_default_options(torch.cuda.is_available()))
    figures = SmallSaves()
    count = 0

    async def astage_save(path: str, fresh: bool) -> tuple[float, float, float]:
        if fresh:
            layout_memo(stager).last = None
        async with LagProbe() as probe, probe.window() as window:
            started = time.perf_counter()
            await astage.save(state, path, stager=stager)
            seconds = time.perf_counter() - started
        lag = window.summary()
        return seconds, lag.p99_ms, lag.max_ms

    def run(name: str, record: bool) -> None:
        nonlocal count
        count += 1
        path = os.path.join(root, f"ckpt-{count}")
        if name == DCP:
            started = time.perf_counter()
            dcp_save_durable(state, path, dcp_stager)
            seconds = time.perf_counter() - started
            shutil.rmtree(path, ignore_errors=True)
        else:
            seconds, p99, most = runner.run(astage_save(path, name == FRESH))
            os.unlink(path)
            if record:
                figures.p99_ms[name].append(p99)
                figures.max_ms[name].append(most)
        os.sync()  # the freed blocks' discard off the next contender's clock
        if record:
            figures.times[name].append(seconds)

    try:
        runner.run(stager.stage(state))
        for name in NAMES:  # untimed: first use of the files, the caches, the memo
            run(name, record=False)
        for repeat in range(config.writer_repeats):
            for name in rotate(NAMES, repeat):
                run(name, record=True)
    finally:
        runner.run(stager.aclose())
        dcp_stager.close()
        shutil.rmtree(root, ignore_errors=True)
        level_heap()
    return label, figures


def small_saves_figures(label: str, figures: SmallSaves) -> dict[str, Any]:
    """The raw figures for the JSON dump."""
    return {
        "state_dict": label,
        "times_s": figures.times,
        "lag_p99_ms": figures.p99_ms,
        "lag_max_ms": figures.max_ms,
    }
