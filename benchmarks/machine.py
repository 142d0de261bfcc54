"""A description of the machine and software a run was measured on."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _git_revision() -> str:
    """The checkout's revision, or ``ASTAGE_REVISION`` where set: a machine that got the tree
    without its history (the GPU machine's copy carried an older ``.git``) is told it."""
    told = os.environ.get("ASTAGE_REVISION")
    if told:
        return told
    try:
        revision = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "astage"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return revision + (" (astage/ modified)" if dirty else "")


def describe_machine(argv: list[str]) -> dict[str, Any]:
    """The machine, the software and the command of this run, for the report's header."""
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = f"{props.name} ({props.total_memory / (1 << 30):.0f} GiB)"
    mem = _mem_total_bytes()
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks" + ("" if not argv else " " + shlex.join(argv)),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": round(mem / (1 << 30), 1) if mem else None,
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "git": _git_revision(),
        "executable": sys.executable,
    }


# --- other processes' CPU use ------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _system_ticks() -> tuple[int, int]:
    """Busy and steal clock ticks of all CPUs since boot."""
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    steal = fields[7] if len(fields) > 7 else 0
    guest = sum(fields[8:10])  # counted inside user and nice already
    return sum(fields) - guest - idle - steal, steal


def steal_seconds() -> float:
    """CPU time the hypervisor has taken from this VM since boot, all CPUs (10 ms ticks)."""
    return _system_ticks()[1] / _TICK


def _own_ticks() -> int:
    with open("/proc/self/stat", encoding="ascii") as stat:
        after_name = stat.read().rsplit(")", 1)[1].split()
    return int(after_name[11]) + int(after_name[12])  # utime + stime, all threads


class CpuShare:
    """How many cores other processes kept busy (and the hypervisor stole) while it ran.

    A 2-core machine shared with other work gives noisy figures; the report states this
    number next to every scenario so a reader can tell a clean run from a disturbed one.
    """

    def __init__(self) -> None:
        self.others_cores = 0.0
        self.steal_cores = 0.0
        self._start = (0.0, 0, 0, 0)

    def __enter__(self) -> CpuShare:
        busy, steal = _system_ticks()
        self._start = (time.perf_counter(), busy, steal, _own_ticks())
        return self

    def __exit__(self, *exc: object) -> None:
        started, busy0, steal0, own0 = self._start
        busy, steal = _system_ticks()
        elapsed_ticks = (time.perf_counter() - started) * _TICK
        if elapsed_ticks < 10:  # ticks are coarse: too short a span to say anything
            return
        others = (busy - busy0) - (_own_ticks() - own0)
        self.others_cores = max(0.0, others / elapsed_ticks)
        self.steal_cores = (steal - steal0) / elapsed_ticks


def others_load(sample_s: float = 0.5) -> float:
    """Cores other processes kept busy over the next ``sample_s`` seconds."""
    with CpuShare() as share:
        time.sleep(sample_s)
    return share.others_cores


def wait_for_quiet(
    max_wait_s: float, threshold_cores: float = 0.25, log: Callable[[str], None] = print
) -> float:
    """Wait (up to ``max_wait_s``) until other processes use less than ``threshold_cores``."""
    deadline = time.perf_counter() + max_wait_s
    load = others_load()
    if load >= threshold_cores:
        log(f"  other processes use {load:.2f} cores; waiting up to {max_wait_s:.0f} s for quiet")
    while load >= threshold_cores and time.perf_counter() < deadline:
        load = others_load(1.0)
    return load
