"""What holds the loop while a device is staged from: ``python -m benchmarks.gpu_lag_probe``.

The GPU run of ``test_loop_stays_responsive_while_staging_from_the_device`` found beats 6-9 ms
late (p99 over a first call and two cached ones, 1 GiB from an H200). This probe repeats that
staging on asyncio beside a 1 ms heartbeat (:class:`~benchmarks.lag.LagProbe`) and a second
one in a plain thread, and timestamps what could hold the loop thread: every loop callback and
task step, every event poll and wait, every page-lock (``cudaHostRegister``) and every batch
enqueued (in worker threads); it also samples the loop thread's stack every 0.2 ms from another
thread. For each beat later than ``--late`` ms it prints what overlapped the gap, in any thread,
and where the loop thread was; a gap that the thread's heartbeat shares points at the GIL (or
the CPU), one that only the loop shows points at the loop thread itself.

Runs on CPU tensors where no CUDA device exists (the instrumented calls then mostly do not run).
"""

from __future__ import annotations

import argparse
import asyncio
import asyncio.events
import functools
import json
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

import astage
from astage._devices import _generic, _pinning

from .lag import LagProbe, LagSummary

MiB = 1 << 20

# (thread name, what, start, end): spans of instrumented calls, from every thread.
SPANS: list[tuple[str, str, float, float]] = []
SPAN_MIN_S = 0.0003


def _record(what: str, started: float) -> None:
    ended = time.perf_counter()
    if ended - started >= SPAN_MIN_S:
        SPANS.append((threading.current_thread().name, what, started, ended))


def _timed(what: str, function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            _record(what, started)

    return timed


def _describe(handle: asyncio.events.Handle) -> str:
    callback = handle._callback  # type: ignore[attr-defined]
    task = getattr(callback, "__self__", None)
    if isinstance(task, asyncio.Task):
        frame = task.get_coro().cr_frame  # type: ignore[union-attr]
        where = f"{frame.f_code.co_name}:{frame.f_lineno}" if frame is not None else "done"
        return f"task step {task.get_coro().__qualname__} at {where}"  # type: ignore[union-attr]
    return f"callback {getattr(callback, '__qualname__', repr(callback))}"


def instrument() -> None:
    """Wrap the calls that may hold the loop thread or the GIL."""
    run = asyncio.events.Handle._run

    def timed_run(self: asyncio.events.Handle) -> None:
        what = _describe(self)
        started = time.perf_counter()
        try:
            run(self)
        finally:
            _record(what, started)

    asyncio.events.Handle._run = timed_run  # type: ignore[method-assign]
    completion = _generic.DeviceCompletion
    completion.query = _timed("event query", completion.query)  # type: ignore[method-assign]
    completion.synchronize = _timed(  # type: ignore[method-assign]
        "event synchronize", completion.synchronize
    )
    backend = _generic.GenericBackend
    backend.enqueue = _timed("enqueue batch", backend.enqueue)  # type: ignore[method-assign]
    _pinning.register = _timed("cudaHostRegister", _pinning.register)
    _pinning.unregister = _timed("cudaHostUnregister", _pinning.unregister)


# (time, the loop thread's innermost frames): sampled from another thread every SAMPLE_S. A loop
# thread blocked in C with the GIL released is caught where it called in.
SAMPLES: list[tuple[float, str]] = []
SAMPLE_S = 0.0002


def _where(frame: Any) -> str:
    parts: list[str] = []
    while frame is not None and len(parts) < 4:
        code = frame.f_code
        parts.append(f"{code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno}({code.co_name})")
        frame = frame.f_back
    return " < ".join(parts)


def sample_loop(thread_id: int, stop: threading.Event) -> None:
    while not stop.is_set():
        frame = sys._current_frames().get(thread_id)
        SAMPLES.append((time.perf_counter(), _where(frame)))
        time.sleep(SAMPLE_S)


Beats = list[tuple[float, float]]
"""A heartbeat's beats: when each was due, and how late it woke up (seconds)."""


def thread_heartbeat(beats: Beats, stop: threading.Event, interval: float) -> None:
    """:class:`~benchmarks.lag.LagProbe`'s beat in a plain thread: it needs only the GIL."""
    due = time.perf_counter() + interval
    while not stop.is_set():
        time.sleep(max(0.0, due - time.perf_counter()))
        now = time.perf_counter()
        beats.append((due, now - due))
        due = max(due + interval, now)


def _summary(beats: Beats, start: float, end: float) -> dict[str, float]:
    lag = LagSummary.of([late for due, late in beats if start <= due < end])
    return {"beats": lag.samples, "p50_ms": lag.p50_ms, "p99_ms": lag.p99_ms, "max_ms": lag.max_ms}


def _common_samples(start: float, end: float) -> list[str]:
    counts: dict[str, int] = {}
    for at, where in SAMPLES:
        if start <= at < end:
            counts[where] = counts.get(where, 0) + 1
    ranked = sorted(counts.items(), key=lambda item: -item[1])
    return [f"{n} x {where}" for where, n in ranked[:3]]


def _overlapping(start: float, end: float) -> list[tuple[str, str, float, float]]:
    return [span for span in SPANS if span[3] > start and span[2] < end]


async def probe(device: str, nbytes: int, calls: int, late_ms: float) -> dict[str, Any]:
    count = 64
    source = {f"w{i}": torch.randn(nbytes // 4 // count, device=device) for i in range(count)}
    if device == "cuda":
        torch.cuda.synchronize()
    thread_beats: Beats = []
    thread_stop = threading.Event()
    ticker = threading.Thread(
        target=thread_heartbeat, args=(thread_beats, thread_stop, 0.001), name="thread-beat"
    )
    ticker.start()
    sampler = threading.Thread(
        target=sample_loop, args=(threading.get_ident(), thread_stop), name="sampler"
    )
    sampler.start()
    windows: list[tuple[str, float, float]] = []
    try:
        async with LagProbe(0.001) as beat, astage.Stager() as stager:
            await asyncio.sleep(0.05)
            for call in range(calls):
                started = time.perf_counter()
                staged = await stager.stage(source)
                windows.append(
                    ("first" if call == 0 else f"cached {call}", started, time.perf_counter())
                )
                await asyncio.sleep(0.02)
            assert torch.equal(staged["w63"], source["w63"].cpu())
    finally:
        thread_stop.set()
        ticker.join()
        sampler.join()
    # A beat that woke ``late`` after its due time was due at its wake-up less that.
    loop_beats = [
        (woke - late, late) for woke, late in zip(beat.woke_at, beat.lateness_s, strict=True)
    ]
    report: dict[str, Any] = {"calls": []}
    for name, start, end in windows:
        entry: dict[str, Any] = {
            "call": name,
            "seconds": end - start,
            "loop": _summary(loop_beats, start, end),
            "thread": _summary(thread_beats, start, end),
            "late": [],
        }
        for due, late in loop_beats:
            if start <= due < end and late * 1e3 > late_ms:
                gap = (due, due + late)
                thread_late = max((x for d, x in thread_beats if gap[0] <= d < gap[1]), default=0.0)
                entry["late"].append(
                    {
                        "at_ms": 1e3 * (due - start),
                        "late_ms": 1e3 * late,
                        "thread_beat_late_ms": 1e3 * thread_late,
                        "loop_thread_at": _common_samples(*gap),
                        "spans": [
                            f"{who}: {what} {1e3 * (s - due):+.2f}..{1e3 * (e - due):+.2f} ms"
                            for who, what, s, e in _overlapping(*gap)
                        ],
                    }
                )
        report["calls"].append(entry)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--late", type=float, default=2.0, help="report beats later than this (ms)")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    instrument()
    report = asyncio.run(probe(device, args.mib * MiB, args.calls, args.late))
    report["device"] = device
    report["switch_interval_s"] = sys.getswitchinterval()
    for entry in report["calls"]:
        seconds = 1e3 * entry["seconds"]
        print(f"{entry['call']}: {seconds:.1f} ms; loop {entry['loop']}; thread {entry['thread']}")
        for late in entry["late"][:25]:
            print(
                f"  beat at {late['at_ms']:.1f} ms, {late['late_ms']:.2f} ms late "
                f"(thread beat {late['thread_beat_late_ms']:.2f} ms)"
            )
            for span in late["spans"][:12]:
                print(f"      {span}")
            for where in late["loop_thread_at"]:
                print(f"      loop thread sampled at: {where}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
