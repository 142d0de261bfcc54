"""What holds the loop when a heartbeat wakes up late: ``python -m benchmarks.lag_trace``.

Stages the lag scenario's dicts (1 GiB in 64 tensors, 50,000 small tensors; first and cached
calls) on asyncio with a 1 ms heartbeat, and timestamps everything the loop thread runs: every
callback and task step (``asyncio.events.Handle._run``), every ``select`` (the loop asleep, the
GIL released), every garbage collection, and every host batch copied in a worker thread. For each
beat later than ``--late`` ms it prints what ran on the loop thread between the beat's due time
and its wake-up, and how much of that gap nothing on the loop thread accounts for: time the
thread was runnable but not running (the OS scheduler), or waiting for the GIL.

A walk step longer than 0.4 ms is named by its generator chain and told apart by what the loop
thread got from the OS meanwhile (``getrusage(RUSAGE_THREAD)``, ``thread_time``): its own CPU
time (user, system), its page faults, its voluntary and involuntary context switches, and the
rest (off the CPU with no switch: the hypervisor's steal; ``LAG_TRACE_STEAL=1`` adds the
machine's steal ticks from ``/proc/stat``). ``LAG_TRACE_CLOCK=1`` prints each part's monotonic
clock span, to cut a ``perf record -k CLOCK_MONOTONIC`` profile to that step.
"""

from __future__ import annotations

import argparse
import asyncio
import asyncio.events
import gc
import os
import resource
import selectors
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

import astage
from astage._core._run import Run

from .config import Config, Data
from .runner import LoopRunner

Span = tuple[float, float, str]


class Trace:
    """Spans recorded on the loop thread and in the copy threads, with one clock."""

    def __init__(self) -> None:
        self.handles: list[Span] = []
        self.selects: list[tuple[float, float, float | None]] = []
        self.select_waits: list[float] = []
        """Per select: how long the loop's thread was runnable but not running meanwhile
        (woken, waiting for a core: the guest's scheduler; the rest of a late wake-up is the
        timer's, or the hypervisor's)."""
        self.gcs: list[tuple[float, float]] = []
        self.copies: list[tuple[float, float, int, int]] = []
        self.beats: list[tuple[float, float]] = []
        self.parts: list[Span] = []
        """Pieces of the driver's loop-thread steps longer than 0.4 ms."""
        self._gc_started = 0.0

    def install(self) -> Callable[[], None]:
        trace = self
        clock = time.perf_counter
        original_run = asyncio.events.Handle._run
        original_select = selectors.EpollSelector.select
        import astage._core._recording as recording
        import astage._core._structure as structure
        import astage._drivers._async as driver

        original_copy = driver.run_host_batch  # type: ignore[attr-defined]

        def run(handle: asyncio.events.Handle) -> None:
            started = clock()
            original_run(handle)
            ended = clock()
            if ended - started > 5e-5:
                trace.handles.append((started, ended, _name(handle)))

        schedstat: dict[int, int] = {}

        def run_delay() -> float:
            """The calling thread's time runnable but not running so far, in seconds (the
            second field of ``/proc/thread-self/schedstat``; 0 where there is none)."""
            ident = threading.get_ident()
            fd = schedstat.get(ident)
            if fd is None:
                try:
                    fd = schedstat[ident] = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
                except OSError:
                    fd = schedstat[ident] = -1
            if fd < 0:
                return 0.0
            return int(os.pread(fd, 128, 0).split()[1]) / 1e9

        def select(self: selectors.EpollSelector, timeout: float | None = None) -> Any:
            waited = run_delay()
            started = clock()
            ready = original_select(self, timeout)
            ended = clock()
            trace.selects.append((started, ended, timeout))
            trace.select_waits.append(run_delay() - waited)
            return ready

        intraop = int(os.environ.get("LAG_TRACE_INTRAOP", "0"))

        def copy(batch: Any) -> None:
            if intraop and torch.get_num_threads() != intraop:
                torch.set_num_threads(intraop)
            started = clock()
            original_copy(batch)
            trace.copies.append((started, clock(), len(batch.srcs), threading.get_ident()))

        def on_gc(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                trace._gc_started = clock()
            else:
                trace.gcs.append((trace._gc_started, clock()))

        asyncio.events.Handle._run = run  # type: ignore[method-assign,assignment]
        selectors.EpollSelector.select = select  # type: ignore[method-assign,assignment]
        driver.run_host_batch = copy  # type: ignore[attr-defined]
        original_walk_for = driver._walk_for

        def walk_for(walk: Any, seconds: float) -> bool:
            deadline = clock() + seconds
            started = clock()
            before = _ThreadUsage.now()
            for _ in walk:
                now = clock()
                if now - started > 4e-4:
                    spent = _ThreadUsage.now().since(before, now - started)
                    trace.parts.append(
                        (started, now, f"walk item ending at {_where(walk)} [{spent}]")
                    )
                if 2 * now - started >= deadline:  # as the driver's: no step past the slice
                    return False
                started = now
                before = _ThreadUsage.now()
            now = clock()
            if now - started > 4e-4:
                spent = _ThreadUsage.now().since(before, now - started)
                trace.parts.append((started, now, f"last walk item [{spent}]"))
            return True

        driver._walk_for = walk_for
        patched: list[tuple[Any, str, Any]] = []
        for owner, name in (
            (driver._Call, "_dispatch"),
            (driver._Call, "__aenter__"),
            (driver._Call, "__aexit__"),
            (driver.Stager, "_finish"),
            (Run, "reap"),
            (Run, "__init__"),
            # The recorder's sums over a container's children (in steps of _SUMMARY_STEP).
            (structure, "size_of"),
            (recording, "size_of"),
        ):
            original = getattr(owner, name)
            patched.append((owner, name, original))
            setattr(owner, name, _timed(trace, original, f"{owner.__name__}.{name}"))
        gc.callbacks.append(on_gc)

        def uninstall() -> None:
            asyncio.events.Handle._run = original_run  # type: ignore[method-assign]
            selectors.EpollSelector.select = original_select  # type: ignore[method-assign]
            driver.run_host_batch = original_copy  # type: ignore[attr-defined]
            driver._walk_for = original_walk_for
            for owner, name, original in patched:
                setattr(owner, name, original)
            gc.callbacks.remove(on_gc)

        return uninstall

    def clear(self) -> None:
        for spans in (self.handles, self.selects, self.gcs, self.copies, self.beats, self.parts):
            spans.clear()
        self.select_waits.clear()


class _ThreadUsage:
    """What the calling thread got from the OS so far: where a slow step's wall time went.

    A step's wall time splits into CPU time of its own (user and system), time off the CPU
    waiting for something (a voluntary switch: a lock, the GIL, a sleeping page fault),
    time taken by another thread (an involuntary switch), and, with neither switch, time
    the guest did not run at all (the hypervisor's steal, counted in ``/proc/stat`` in 10 ms
    ticks; read only with ``LAG_TRACE_STEAL=1``, as reading it each step costs a file read).
    """

    __slots__ = ("cpu", "faults", "involuntary", "steal", "system", "user", "voluntary")
    read_steal = bool(os.environ.get("LAG_TRACE_STEAL"))

    def __init__(self) -> None:
        usage = resource.getrusage(resource.RUSAGE_THREAD)
        self.cpu = time.thread_time()
        self.user, self.system = usage.ru_utime, usage.ru_stime
        self.faults = usage.ru_minflt + usage.ru_majflt
        self.voluntary, self.involuntary = usage.ru_nvcsw, usage.ru_nivcsw
        self.steal = _steal_seconds() if self.read_steal else 0.0

    @classmethod
    def now(cls) -> _ThreadUsage:
        return cls()

    def since(self, before: _ThreadUsage, wall: float) -> str:
        text = (
            f"cpu {_ms(self.cpu - before.cpu, 0)} (user {_ms(self.user - before.user, 0)} "
            f"sys {_ms(self.system - before.system, 0)}), off-cpu "
            f"{_ms(wall - (self.cpu - before.cpu), 0)} ms; {self.faults - before.faults} faults, "
            f"{self.voluntary - before.voluntary} voluntary + "
            f"{self.involuntary - before.involuntary} involuntary switches"
        )
        if self.read_steal:
            text += f", steal {_ms(self.steal - before.steal, 0)} ms (all cpus)"
        return text


def _steal_seconds() -> float:
    """The machine's stolen time, summed over CPUs (``/proc/stat``'s eighth column)."""
    with open("/proc/stat", "rb") as stat:
        fields = stat.readline().split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK")


def _ms(seconds: float, width: int = 6) -> str:
    return f"{seconds * 1e3:{width}.2f}"


def _timed(trace: Trace, function: Any, name: str) -> Any:
    clock = time.perf_counter
    if asyncio.iscoroutinefunction(function):

        async def timed_async(*args: Any, **kwargs: Any) -> Any:
            started = clock()
            try:
                return await function(*args, **kwargs)
            finally:
                if clock() - started > 4e-4:
                    trace.parts.append((started, clock(), name + " (with awaits)"))

        return timed_async

    def timed(*args: Any, **kwargs: Any) -> Any:
        started = clock()
        try:
            return function(*args, **kwargs)
        finally:
            if clock() - started > 4e-4:
                trace.parts.append((started, clock(), name))

    return timed


_SHOW_CLOCK = bool(os.environ.get("LAG_TRACE_CLOCK"))


def _where(generator: Any) -> str:
    """Where the innermost generator of a ``yield from`` chain stands, after its callers."""
    callers = []
    while getattr(generator, "gi_yieldfrom", None) is not None:
        frame = getattr(generator, "gi_frame", None)
        if frame is not None:
            callers.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
        generator = generator.gi_yieldfrom
    frame = getattr(generator, "gi_frame", None)
    if frame is None:
        return "?"
    code = frame.f_code
    where = f"{code.co_qualname} ({code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno})"
    container = frame.f_locals.get("container")
    if container is not None:  # empty_in_steps: what it is emptying
        where += f" [{type(container).__name__}, {len(container)} entries left]"
    return where + (f" via {' > '.join(callers[-3:])}" if callers else "")


def _name(handle: asyncio.events.Handle) -> str:
    callback = handle._callback  # type: ignore[attr-defined]
    owner = getattr(callback, "__self__", None)
    if isinstance(owner, asyncio.Task):
        coro = owner.get_coro()
        frame = getattr(coro, "cr_frame", None)
        where = f"{frame.f_code.co_qualname}:{frame.f_lineno}" if frame is not None else "?"
        return f"task {getattr(coro, '__qualname__', '?')} (now at {where})"
    return getattr(callback, "__qualname__", repr(callback))


async def _beat(trace: Trace, stop: asyncio.Event) -> None:
    clock = time.perf_counter
    while not stop.is_set():
        before = clock()
        await asyncio.sleep(0.001)
        trace.beats.append((before, clock()))


def _explain(trace: Trace, late_s: float, origin: float) -> list[str]:
    lines = []
    for before, woke in trace.beats:
        lateness = woke - before - 0.001
        if lateness < late_s:
            continue
        due = before + 0.001
        ran = [h for h in trace.handles if h[1] > due and h[0] < woke]
        held = sum(min(end, woke) - max(start, due) for start, end, _ in ran)
        gcs = sum(min(e, woke) - max(s, due) for s, e in trace.gcs if e > due and s < woke)
        slept = [
            (*s, wait)
            for s, wait in zip(trace.selects, trace.select_waits, strict=True)
            if s[1] > due and s[0] < woke
        ]
        asleep = sum(min(end, woke) - max(start, due) for start, end, _, _ in slept)
        copies = [c for c in trace.copies if c[1] > due and c[0] < woke]
        lines.append(
            f"  beat due {1e3 * (due - origin):8.2f} ms, {1e3 * lateness:6.2f} ms late: "
            f"loop ran {1e3 * held:5.2f} ms in {len(ran)} steps, selected {1e3 * asleep:5.2f} ms, "
            f"gc {1e3 * gcs:4.2f}, unaccounted {1e3 * (lateness - held - asleep):5.2f} ms; "
            f"{len(copies)} copies overlap"
        )
        for start, end, name in sorted(ran, key=lambda h: h[0] - h[1])[:3]:
            lines.append(
                f"      {1e3 * (end - start):6.2f} ms at {1e3 * (start - origin):8.2f}: {name}"
            )
        for start, end, name in trace.parts:
            if end > due and start < woke:
                # With LAG_TRACE_CLOCK=1, the monotonic clock's seconds too (perf_counter is
                # CLOCK_MONOTONIC on Linux): to cut a ``perf record -k CLOCK_MONOTONIC`` to it.
                clock = f" (clock {start:.6f}-{end:.6f})" if _SHOW_CLOCK else ""
                lines.append(
                    f"      part {_ms(end - start)} ms at {_ms(start - origin, 8)}{clock}: {name}"
                )
        for start, end, timeout, wait in slept:
            if end - start > 0.0015 or (timeout is not None and end - start > timeout + 0.0005):
                lines.append(
                    f"      select {1e3 * (end - start):6.2f} ms (timeout "
                    f"{'-' if timeout is None else f'{1e3 * timeout:.2f}'}) at "
                    f"{1e3 * (start - origin):8.2f}, of which runnable, waiting for a core, "
                    f"{1e3 * wait:.2f} ms"
                )
    return lines


async def _traced_calls(  # noqa: PLR0917 - a script's helper
    trace: Trace, state_dict: Any, phase: str, reps: int, late_s: float, verbose: bool
) -> list[float]:
    lateness_all: list[float] = []
    stager = astage.Stager()
    if phase == "cached":
        await stager.stage(state_dict)
    for _ in range(reps):
        if phase == "first":
            await stager.aclose()
            stager = astage.Stager()
        stop = asyncio.Event()
        task = asyncio.create_task(_beat(trace, stop))
        await asyncio.sleep(0.005)
        trace.clear()
        origin = time.perf_counter()
        staged = await stager.stage(state_dict)
        seconds = time.perf_counter() - origin
        stop.set()
        await task
        del staged
        lateness = [w - b - 0.001 for b, w in trace.beats]
        lateness_all += lateness
        ordered = sorted(lateness)
        held = sum(e - s for s, e, _ in trace.handles)
        print(
            f" call {1e3 * seconds:7.1f} ms, {len(lateness)} beats, p99 "
            f"{_ms(ordered[int(0.99 * (len(ordered) - 1))], 5)} max {_ms(ordered[-1], 5)} ms; "
            f"loop steps {1e3 * held:6.1f} ms; copies {len(trace.copies)} "
            f"({1e3 * sum(e - s for s, e, _, _ in trace.copies):6.1f} ms); gcs {len(trace.gcs)}"
        )
        if verbose:
            for line in _explain(trace, late_s, origin):
                print(line)
    await stager.aclose()
    return lateness_all


def _scenario(trace: Trace, workloads: list[str], late_s: float) -> None:
    """The lag scenario's calls, one repeat, with astage's late beats explained."""
    from .lag import LagProbe
    from .scenarios import loop_lag

    probes: list[LagProbe] = []
    original_init = LagProbe.__init__

    def init(probe: LagProbe, *args: Any, **kwargs: Any) -> None:
        original_init(probe, *args, **kwargs)
        probes.append(probe)

    LagProbe.__init__ = init  # type: ignore[method-assign,assignment]
    config = Config().with_repeats(1)
    data = Data(config)
    try:
        with LoopRunner("asyncio") as runner:
            for workload in workloads:
                state_dict = data.bulk() if workload == "bulk" else data.small()
                probes.clear()
                trace.clear()
                runs = loop_lag.lag_runs(state_dict, config, runner)
                for name, run in runs.items():
                    print(
                        f"{workload} {name}: first {LagSummary_of(run.first_lag_s)}, "
                        f"cached {LagSummary_of(run.cached_lag_s)}"
                    )
                astage_probe = next(p for p in probes if len(p.woke_at) == len(p.lateness_s))
                trace.beats[:] = [
                    (woke - lateness - 0.001, woke)
                    for woke, lateness in zip(
                        astage_probe.woke_at, astage_probe.lateness_s, strict=True
                    )
                ]
                origin = trace.beats[0][0] if trace.beats else 0.0
                for line in _explain(trace, late_s, origin):
                    print(line)
    finally:
        LagProbe.__init__ = original_init  # type: ignore[method-assign]


def LagSummary_of(lateness: list[float]) -> str:
    ordered = sorted(lateness)
    if not ordered:
        return "-"
    return (
        f"{len(ordered)} beats p99 {_ms(ordered[int(0.99 * (len(ordered) - 1))], 5)} "
        f"max {_ms(ordered[-1], 5)} ms"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lag_trace", description=__doc__)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--late", type=float, default=1.0, help="explain beats later (ms)")
    parser.add_argument("--only", choices=("bulk", "small"), action="append")
    parser.add_argument("--phase", choices=("first", "cached"), action="append")
    parser.add_argument("-q", "--quiet", action="store_true", help="no per-beat explanation")
    parser.add_argument(
        "--portal", action="store_true", help="the loop in a thread of its own (as the benchmarks)"
    )
    parser.add_argument("--bench-data", action="store_true", help="the benchmarks' state dicts")
    parser.add_argument(
        "--scenario",
        action="store_true",
        help="run the lag scenario's own calls (benchmarks.scenarios.loop_lag.lag_runs, DCP "
        "included) under the trace and explain astage's late beats",
    )
    args = parser.parse_args(argv)
    if os.environ.get("LAG_TRACE_NO_SLICE"):  # A/B: copy threads keep the default slice
        from astage._drivers import _slices

        _slices._scheduler = lambda: None  # type: ignore[assignment]
    trace = Trace()
    uninstall = trace.install()
    if args.scenario:
        try:
            _scenario(trace, args.only or ["bulk", "small"], args.late / 1e3)
        finally:
            uninstall()
        return 0
    try:
        for workload in args.only or ("bulk", "small"):
            if args.bench_data:
                config, data = Config(), Data(Config())
                state_dict: Any = data.bulk() if workload == "bulk" else data.small()
                del config, data
            elif workload == "bulk":
                state_dict = {f"t{i}": torch.full((4 << 20,), float(i)) for i in range(64)}
            else:
                state_dict = {"s": [torch.full((4,), float(i)) for i in range(50_000)]}
            for phase in args.phase or ("first", "cached"):
                print(f"{workload} {phase}:")
                lateness = asyncio.run(
                    _traced_calls(
                        trace, state_dict, phase, args.reps, args.late / 1e3, not args.quiet
                    )
                )
                ordered = sorted(lateness)
                print(
                    f" pooled: {len(ordered)} beats, p50 {1e3 * statistics.median(ordered):.3f} "
                    f"p99 {1e3 * ordered[int(0.99 * (len(ordered) - 1))]:.2f} "
                    f"max {1e3 * ordered[-1]:.2f} ms"
                )
            del state_dict
    finally:
        uninstall()
    return 0


if __name__ == "__main__":
    sys.exit(main())
