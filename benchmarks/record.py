"""What a scenario hands to the report: goal checks, tables, raw figures, notes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Check:
    """One goal of the issue, measured: astage's figure, the reference's, their ratio, the verdict.

    ``ratio`` is always oriented so that larger is better for astage (a speed-up, or a fraction
    of a ceiling); ``met`` is None where the row is shown for context and has no goal.
    """

    metric: str
    astage: str
    reference: str
    ratio: float | None
    goal: str
    met: bool | None
    rounds: tuple[float, ...] = ()
    """The ratio within each repeat, where ``ratio`` is their median (paired figures)."""
    why: str = ""
    """What bounds the figure on this machine, argued from figures of the same run: the
    report shows it when the goal is not met."""


@dataclass
class Table:
    """A table of the report: a title, its columns, its rows of formatted cells."""

    title: str
    columns: list[str]
    rows: list[list[str]]


@dataclass
class ScenarioResult:
    """What one scenario measured, ready for the report and the JSON dump."""

    key: str
    title: str
    about: str
    checks: list[Check] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    """Raw numbers for the JSON dump and the plots."""
    skipped: str | None = None
    seconds: float = 0.0
    others_cores: float = 0.0
    """Cores that other processes kept busy while the scenario ran (noise indicator)."""
    steal_cores: float = 0.0
    """Cores the hypervisor took from this VM meanwhile (steal): stalls no process can see."""


def fmt_ratio(ratio: float | None) -> str:
    """A ratio as ``1.23x`` (a dash where there is none)."""
    return "—" if ratio is None else f"{ratio:.2f}x"


def fmt_s(seconds: float) -> str:
    """Seconds as milliseconds below one second, as seconds above."""
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def fmt_bytes(nbytes: float) -> str:
    """Bytes in binary units (GiB, MiB, KiB)."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(nbytes) >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{nbytes:.0f} B"


def fmt_gbps(nbytes: int, seconds: float) -> str:
    """Throughput in decimal GB/s (a dash for a zero time)."""
    return f"{nbytes / seconds / 1e9:.2f} GB/s" if seconds > 0 else "—"
