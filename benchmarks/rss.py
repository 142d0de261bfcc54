"""Host memory figures from /proc/self/status: resident set now (VmRSS) and its peak (VmHWM).

The peak is reset before a measurement by writing 5 to /proc/self/clear_refs (Linux >= 4.0). If
that is not allowed, a sampler thread polls VmRSS every millisecond instead; its peak can miss a
spike shorter than that, which the report states.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def rss_bytes() -> int:
    """Resident set size of this process now."""
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """Highest resident set size since the process started or since :func:`reset_peak`."""
    return _status_kib("VmHWM") * 1024


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


class RssSampler:
    """A thread that polls VmRSS and keeps the highest value seen."""

    def __init__(self, interval_s: float = 0.001) -> None:
        self.interval_s = interval_s
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


@dataclass(frozen=True)
class MemoryUse:
    """What one call did to the resident set, relative to just before it."""

    peak_growth: int
    """Peak RSS during the call minus RSS before it."""
    retained_growth: int
    """RSS after the call (its result still alive) minus RSS before it."""
    method: str
    """"VmHWM" (exact) or "sampler" (1 ms polling)."""


def measure(call: Callable[[], T]) -> tuple[T, MemoryUse]:
    """Run ``call`` and report how much it raised the resident set, at peak and after."""
    exact = reset_peak()
    before = rss_bytes()
    if exact:
        result = call()
        peak = peak_rss_bytes()
    else:
        with RssSampler() as sampler:
            result = call()
        peak = sampler.peak
    after = rss_bytes()
    return result, MemoryUse(
        peak_growth=peak - before,
        retained_growth=after - before,
        method="VmHWM" if exact else "sampler",
    )
