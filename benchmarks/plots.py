"""PNG plots of scenario results for docs/benchmarks.md (matplotlib, when installed).

``python -m benchmarks.plots RESULTS.json --img-dir DIR`` draws them again from a run's raw
figures (``--json``), e.g. those of a GPU machine that has no matplotlib: the GPU page's
plots come from ``benchmarks/results/gpu.json`` that way.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

from .record import ScenarioResult
from .scenarios.loop_lag import LAG_MAX_GOAL_MS, LAG_P99_GOAL_MS

__all__ = ["render_plots"]

SPEED_SCENARIOS = ("bulk", "small", "model", "gpu")
COLOURS = {"astage": "#1f77b4", "DCP": "#d62728", "plain": "#7f7f7f"}


def family(name: str) -> str:
    """How a contender's name groups it: "astage", "DCP" or "plain"."""
    if name.startswith("astage"):
        return "astage"
    if name.startswith("DCP"):
        return "DCP"
    return "plain"


def render_plots(results: Sequence[ScenarioResult], img_dir: str, link_dir: str) -> dict[str, str]:
    """Write the PNGs; returns plot key -> path relative to the markdown file's folder."""
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
        from matplotlib.ticker import (  # type: ignore[import-not-found, unused-ignore]
            FuncFormatter,
            LogLocator,
            NullFormatter,
        )
    except ImportError:
        return {}
    os.makedirs(img_dir, exist_ok=True)
    by_key = {r.key: r for r in results if not r.skipped}
    images: dict[str, str] = {}

    def save(fig: Any, key: str, filename: str) -> None:
        path = os.path.join(img_dir, filename)
        fig.tight_layout()
        fig.savefig(path, dpi=110, bbox_inches="tight")  # long tick labels stay whole
        plt.close(fig)
        images[key] = os.path.relpath(path, link_dir)

    speed = [
        (r.key, c)
        for r in results
        for c in r.checks
        if r.key in SPEED_SCENARIOS and c.ratio is not None and "per tensor" not in c.metric
    ]
    if speed:
        fig, ax = plt.subplots(figsize=(12, 0.32 * len(speed) + 1.4))
        labels = [textwrap.fill(f"{key}: {c.metric}", 64) for key, c in speed]
        ratios = [c.ratio or 0.0 for _, c in speed]
        colours = [
            "#2ca02c" if c.met else ("#d62728" if c.met is False else "#7f7f7f") for _, c in speed
        ]
        ax.barh(range(len(speed)), ratios, color=colours)
        for index, (_, c) in enumerate(speed):
            goal = _goal_value(c.goal)
            if goal is not None and c.goal.startswith(">="):
                ax.plot([goal, goal], [index - 0.4, index + 0.4], color="black", lw=2)
        ax.axvline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_yticks(range(len(speed)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        # Plain ratios at the major ticks only: log-scale minor labels ran into each other.
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("ratio, higher is better for astage (log); black tick: goal")
        ax.set_title(
            "astage vs DCP / ceiling (green: goal met, red: not met, grey: context)", fontsize=9
        )
        save(fig, "ratios", "ratios.png")

    for key in ("bulk", "small", "model"):
        r = by_key.get(key)
        if r is None:
            continue
        fig, ax = plt.subplots(figsize=(8, 3.6))
        _speed_bars(ax, r.figures, per_tensor=key == "small")
        ax.set_title(f"{r.title.split(':')[0]}: pale = first call, solid = cached call")
        save(fig, f"{key}.speed", f"{key}_speed.png")

    r = by_key.get("lag")
    if r is not None:
        dicts = [k for k in ("bulk", "small") if k in r.figures]
        fig, axes = plt.subplots(1, len(dicts), figsize=(5 * len(dicts), 3.8), squeeze=False)
        for ax, dict_key in zip(axes[0], dicts, strict=True):
            _lag_bars(ax, r.figures[dict_key]["runs"], r.figures[dict_key]["label"])
        save(fig, "lag", "lag.png")

        fig, axes = plt.subplots(1, len(dicts), figsize=(5 * len(dicts), 3.6), squeeze=False)
        for ax, dict_key in zip(axes[0], dicts, strict=True):
            for name, run in r.figures[dict_key]["runs"].items():
                samples = sorted(run["cached_lateness_ms"] + run["first_lateness_ms"])
                if not samples:
                    continue
                floor = 1e-3
                lateness = [max(s, floor) for s in samples]
                fraction = [(i + 1) / len(samples) for i in range(len(samples))]
                ax.step(lateness, fraction, where="post", label=name, color=COLOURS[family(name)])
            ax.axvline(LAG_P99_GOAL_MS, color="black", lw=0.8, ls="--")
            ax.set_xscale("log")
            ax.set_xlabel("heartbeat lateness, ms (log)")
            ax.set_ylabel("fraction of beats")
            ax.set_title(f"Lag CDF: {r.figures[dict_key]['label']}", fontsize=9)
            ax.legend(fontsize=7)
        save(fig, "lag.cdf", "lag_cdf.png")

    r = by_key.get("gpu")
    if r is not None:
        for part, per_tensor in (("bulk", False), ("small", True)):
            figures = r.figures.get(part)
            if figures is None:
                continue
            fig, ax = plt.subplots(figsize=(8, 3.6))
            _speed_bars(ax, figures, per_tensor)
            ax.set_title(
                f"GPU, {part}: {_shape_label(figures['shape'])}; pale = first call, solid = cached",
                fontsize=9,
            )
            save(fig, f"gpu.{part}", f"gpu_{part}_speed.png")
        if "lag" in r.figures:
            fig, ax = plt.subplots(figsize=(6, 3.8))
            _lag_bars(ax, r.figures["lag"], "device-to-host, loop lag while staging")
            save(fig, "gpu.lag", "gpu_lag.png")
    return images


def _shape_label(shape: dict[str, Any]) -> str:
    return f"{shape['tensors']:,} tensors, {shape['nbytes'] / 2**20:,.1f} MiB"


def _speed_bars(ax: Any, figures: dict[str, Any], per_tensor: bool) -> None:
    """First and cached call per contender: us per tensor (lower is better) or GB/s."""
    timings = figures["timings"]
    nbytes, tensors = figures["shape"]["nbytes"], figures["shape"]["tensors"]
    names = list(timings)
    width = 0.38
    for offset, phase in ((-width / 2, "first"), (width / 2, "cached")):
        values = []
        for name in names:
            seconds = timings[name][f"{phase}_median_s"]
            values.append(seconds / tensors * 1e6 if per_tensor else nbytes / seconds / 1e9)
        bars = ax.bar(
            [i + offset for i in range(len(names))],
            values,
            width,
            label=f"{phase} call",
            color=[COLOURS[family(n)] for n in names],
            alpha=0.55 if phase == "first" else 1.0,
            edgecolor="black",
        )
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(names)), [textwrap.fill(n, 20) for n in names], fontsize=7)
    ax.set_ylabel("us per tensor (lower is better)" if per_tensor else "GB/s (higher is better)")


def _lag_bars(ax: Any, runs: dict[str, Any], label: str) -> None:
    """p99 and max of the heartbeat's lateness per contender and phase, with the goals."""
    labels, p99s, maxes, colours = [], [], [], []
    for name, run in runs.items():
        for phase in ("first", "cached"):
            summary = run[f"{phase}_lag"]
            labels.append(f"{name.split(' (')[0]}\n{phase}")
            p99s.append(summary["p99_ms"])
            maxes.append(summary["max_ms"])
            colours.append(COLOURS[family(name)])
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], p99s, 0.4, color=colours, label="p99")
    ax.bar([x + 0.2 for x in xs], maxes, 0.4, color=colours, alpha=0.45, label="max")
    ax.axhline(LAG_P99_GOAL_MS, color="black", lw=0.8, ls="--")
    ax.axhline(LAG_MAX_GOAL_MS, color="black", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("heartbeat lateness, ms (log)")
    ax.set_title(
        f"{label}\nsolid: p99, pale: max; goals: p99 {LAG_P99_GOAL_MS:g} ms (--), "
        f"max {LAG_MAX_GOAL_MS:g} ms (..)",
        fontsize=8,
    )


def _goal_value(goal: str) -> float | None:
    digits = "".join(ch for ch in goal if ch.isdigit() or ch == ".")
    try:
        return float(digits)
    except ValueError:
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """Draw the plots of a run's raw figures (the JSON ``python -m benchmarks`` writes)."""
    from .report import read_json

    parser = argparse.ArgumentParser(prog="python -m benchmarks.plots", description=main.__doc__)
    parser.add_argument("results", help="a run's raw figures (--json of python -m benchmarks)")
    parser.add_argument("--img-dir", required=True, help="folder for the PNG plots")
    args = parser.parse_args(argv)
    images = render_plots(read_json(args.results), args.img_dir, os.getcwd())
    if not images:
        print("no plot drawn (no matplotlib, or no scenario with figures to plot)")
        return 1
    for key, path in sorted(images.items()):
        print(f"{key}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
