"""PNG plots of scenario results for docs/benchmarks.md (matplotlib, when installed)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from .record import ScenarioResult

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
    except ImportError:
        return {}
    os.makedirs(img_dir, exist_ok=True)
    by_key = {r.key: r for r in results if not r.skipped}
    images: dict[str, str] = {}

    def save(fig: Any, key: str, filename: str) -> None:
        path = os.path.join(img_dir, filename)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        images[key] = os.path.relpath(path, link_dir)

    speed = [
        (r.key, c)
        for r in results
        for c in r.checks
        if r.key in SPEED_SCENARIOS and c.ratio is not None and "per tensor" not in c.metric
    ]
    if speed:
        fig, ax = plt.subplots(figsize=(9, 0.32 * len(speed) + 1.2))
        labels = [f"{key}: {c.metric}" for key, c in speed]
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
        ax.set_xlabel("ratio, higher is better for astage (log); black tick: goal")
        ax.set_title("astage vs DCP / ceiling (green: goal met, red: not met, grey: context)")
        save(fig, "ratios", "ratios.png")

    for key in ("bulk", "small", "model"):
        r = by_key.get(key)
        if r is None:
            continue
        timings = r.figures["timings"]
        nbytes = r.figures["shape"]["nbytes"]
        tensors = r.figures["shape"]["tensors"]
        names = list(timings)
        fig, ax = plt.subplots(figsize=(8, 3.6))
        width = 0.38
        per_tensor = key == "small"
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
        ax.set_xticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=7)
        ax.set_ylabel(
            "us per tensor (lower is better)" if per_tensor else "GB/s (higher is better)"
        )
        ax.set_title(f"{r.title.split(':')[0]}: pale = first call, solid = cached call")
        save(fig, f"{key}.speed", f"{key}_speed.png")

    r = by_key.get("lag")
    if r is not None:
        dicts = [k for k in ("bulk", "small") if k in r.figures]
        fig, axes = plt.subplots(1, len(dicts), figsize=(5 * len(dicts), 3.8), squeeze=False)
        for ax, dict_key in zip(axes[0], dicts, strict=True):
            runs = r.figures[dict_key]["runs"]
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
            ax.axhline(2.0, color="black", lw=0.8, ls="--")
            ax.axhline(10.0, color="black", lw=0.8, ls=":")
            ax.set_yscale("log")
            ax.set_xticks(list(xs), labels, fontsize=7)
            ax.set_ylabel("heartbeat lateness, ms (log)")
            ax.set_title(
                f"{r.figures[dict_key]['label']}\n"
                "solid: p99, pale: max; goals: 2 ms (--), 10 ms (..)",
                fontsize=8,
            )
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
            ax.axvline(2.0, color="black", lw=0.8, ls="--")
            ax.set_xscale("log")
            ax.set_xlabel("heartbeat lateness, ms (log)")
            ax.set_ylabel("fraction of beats")
            ax.set_title(f"Lag CDF: {r.figures[dict_key]['label']}", fontsize=9)
            ax.legend(fontsize=7)
        save(fig, "lag.cdf", "lag_cdf.png")
    return images


def _goal_value(goal: str) -> float | None:
    digits = "".join(ch for ch in goal if ch.isdigit() or ch == ".")
    try:
        return float(digits)
    except ValueError:
        return None
