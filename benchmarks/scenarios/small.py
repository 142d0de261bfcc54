"""The ``small`` scenario: tens of thousands of tiny tensors; per-tensor overhead dominates."""

from __future__ import annotations

import collections
import operator
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

import astage
from astage._core._reuse import TwinCheck, check_of, reusable
from astage._core._structure import BULK_STEP
from astage._drivers._gc import gc_paused
from astage._torch import metadata_guard

from ..config import Config, Data
from ..contenders import (
    AstageAsync,
    AstageSync,
    Contender,
    DcpStateDictStager,
    PlainCopy,
    flat_tensors,
    restore_intraop_threads,
)
from ..record import Check, ScenarioResult, fmt_bytes, fmt_s
from ..runner import LoopRunner
from ..state_dicts import describe
from ..timing import level_heap, median, rotate, timed
from .first_and_cached import (
    Timings,
    after_reserve,
    first_and_cached,
    paired_ratio,
    paired_ratios,
    reserve_check,
    speed_check,
    with_timings,
)

# Issue #11's goals for 50k small tensors, for Stager and SyncStager alike.
CACHED_US_GOAL = 3.0
"""A cached call costs <= 3 us per tensor."""
CACHED_DCP_GOAL = 5.5
"""A cached call is >= 5.5x DCP's cached call."""
FLOOR_GOAL = 5.0
"""A cached call takes <= 5x the foreach copy floor measured in the same run."""
FIRST_GOAL = 2.0
"""The first call without ``reserve()`` is >= 2x DCP's first call."""
ISSUE_DCP_US = 16.8
"""DCP's cached call over these tensors, us per tensor, in the issue's table: the machine's
speed when the 3 us goal was set (astage then measured 5.6-6.5 us there)."""
DEFAULT_TURN_MS = astage.StagingOptions().max_loop_hold_s * 1e3
"""The async face's default turn (``max_loop_hold_s``), as the arguments below quote it."""
LONG_TURN_S = 0.05
"""The async face's ``max_loop_hold_s`` in the row that prices its turns: long enough that a
cached call over 50,000 small tensors hands the loop back only a few times."""


class AstageAsyncLongTurns(AstageAsync):
    """The async face with turns of :data:`LONG_TURN_S`: what the default 0.5 ms turns cost."""

    name = f"astage Stager (async), {LONG_TURN_S * 1e3:g} ms turns"

    def __init__(self, runner: LoopRunner) -> None:
        super().__init__(runner, max_loop_hold_s=LONG_TURN_S)


def small(config: Config, data: Data, runner: LoopRunner) -> ScenarioResult:
    """Tens of thousands of tiny tensors: per-tensor cost of astage vs DCP, and a foreach copy."""
    state_dict = data.small()
    shape = describe(state_dict)
    result = ScenarioResult(
        "small",
        f"{shape.tensors:,} small tensors (optimizer-state shaped): first and cached call",
        "`{'state': {i: {'step': 0-d, 'exp_avg': small, 'exp_avg_sq': small}}, 'param_groups': "
        f"[...]}}`: {shape.tensors:,} tensors, {fmt_bytes(shape.nbytes)}. Per-tensor overhead "
        "dominates. The plain row is one `torch._foreach_copy_` into preallocated tensors, with "
        "no structure rebuilt: the floor. Then, per face, a fresh stager runs `reserve(sd)` "
        "and its first call is set against its own cached calls; and a fresh stager's first "
        "call with `replay=False` is set against one with the default, and DCP's first call "
        "beside both, one stager at a time: what recording the structure for replay adds to "
        "a first call. The async face also "
        f"runs with turns of {LONG_TURN_S * 1e3:g} ms (`max_loop_hold_s`), in the same rounds: "
        "what handing the loop back every half millisecond costs its cached call.",
    )
    sync, stager, long_turns = AstageSync(), AstageAsync(runner), AstageAsyncLongTurns(runner)
    tensors = flat_tensors(state_dict)
    dcp, plain = DcpStateDictStager(), PlainCopy(tensors, foreach=True)
    timings = first_and_cached([sync, stager, long_turns, dcp, plain], state_dict, config)
    t_dcp = timings[dcp.name]
    turns = TurnCost(timings[stager.name], timings[long_turns.name], t_dcp)
    reserved = after_reserve([sync, stager], state_dict, config)
    recording = RecordingCost.measure(
        {sync.name: AstageSync, stager.name: partial(AstageAsync, runner)},
        DcpStateDictStager,
        state_dict,
        config,
    )
    floor = ReplayFloor.measure(tensors, config.repeats)
    t_plain = timings[plain.name]
    per_tensor = 1e6 / shape.tensors
    for contender in (stager, sync):
        t = timings[contender.name]
        us = t.cached_s * per_tensor
        result.checks += [
            Check(
                f"{contender.name}: cached us per tensor",
                f"{us:.2f} us",
                f"{t_dcp.cached_s * per_tensor:.2f} us",
                paired_ratio(t, t_dcp, "cached"),
                f"<= {CACHED_US_GOAL:g} us",
                us <= CACHED_US_GOAL,
                why=floor.why(us)
                or (turns.why_us(shape.tensors) if contender is stager else "")
                or _why_us_by_speed(paired_ratio(t, t_dcp, "cached"), t_dcp.cached_s * per_tensor)
                or (
                    turns.why_us_by_speed(t_dcp.cached_s * per_tensor)
                    if contender is stager
                    else ""
                ),
            ),
            speed_check(
                f"{contender.name}: cached call vs DCP cached",
                t,
                t_dcp,
                "cached",
                CACHED_DCP_GOAL,
                why=floor.why_dcp(t_dcp.cached_s / shape.tensors)
                or (turns.why_dcp() if contender is stager else ""),
            ),
            speed_check(
                f"{contender.name}: cached call vs foreach copy (floor)",
                t,
                t_plain,
                "cached",
                1 / FLOOR_GOAL,
                goal_label=f"<= {FLOOR_GOAL:g}x the floor (>= {1 / FLOOR_GOAL:.2f}x)",
            ),
            speed_check(
                f"{contender.name}: first call vs DCP first",
                t,
                t_dcp,
                "first",
                FIRST_GOAL,
                why=recording.why(contender.name, t, t_dcp)
                or (
                    _why_first(t, timings[sync.name], t_dcp)
                    or turns.why_first(median(recording.ratios(stager.name)))
                    if contender is stager
                    else ""
                ),
            ),
            recording.check(contender.name),
            reserve_check(contender.name, reserved[contender.name]),
        ]
    result.checks.append(turns.check())
    result.checks.append(floor.check(t_plain.cached_s / shape.tensors))
    result = with_timings(result, timings, shape, reserved)
    result.figures["replay_floor_us"] = floor.figures()
    result.figures["recording"] = recording.figures()
    return result


@dataclass
class RecordingCost:
    """Per face, what recording the structure for replay adds to a first call: per repeat, a
    fresh stager's first call with the default options and one with ``replay=False``, and
    DCP's first call beside them, each on a levelled heap, one stager alive at a time (in an
    order that rotates)."""

    with_s: dict[str, list[float]]
    without_s: dict[str, list[float]]
    dcp_s: list[float]

    @classmethod
    def measure(
        cls,
        faces: dict[str, Callable[..., Contender]],
        dcp: Callable[[], Contender],
        state_dict: Any,
        config: Config,
    ) -> RecordingCost:
        runs: list[tuple[str | None, bool]] = [
            (name, replay) for name in faces for replay in (True, False)
        ]
        runs.append((None, False))  # DCP's, in the same rotation
        with_s: dict[str, list[float]] = {name: [] for name in faces}
        without_s: dict[str, list[float]] = {name: [] for name in faces}
        dcp_s: list[float] = []
        for repeat in range(config.repeats):
            for name, replay in rotate(runs, repeat):
                contender = dcp() if name is None else faces[name](replay=replay)
                level_heap()
                restore_intraop_threads()
                contender.start()
                try:
                    seconds = contender.stage(state_dict)
                finally:
                    contender.stop()
                if name is None:
                    dcp_s.append(seconds)
                else:
                    (with_s if replay else without_s)[name].append(seconds)
        level_heap()
        return cls(with_s, without_s, dcp_s)

    def ratios(self, name: str) -> list[float]:
        """Within each repeat: the first call with recording over the one without."""
        return [w / o for w, o in zip(self.with_s[name], self.without_s[name], strict=True)]

    def against_dcp(self, name: str, replay: bool) -> float:
        """DCP's first call over this face's, with the recording or without it, within each
        repeat (one stager alive at a time): the median."""
        mine = self.with_s[name] if replay else self.without_s[name]
        return median([d / m for d, m in zip(self.dcp_s, mine, strict=True)])

    def check(self, name: str) -> Check:
        """A row for context: the first call without recording against the one with it."""
        rounds = self.ratios(name)
        return Check(
            f"{name}: first call, replay=False vs the default (recording's cost)",
            fmt_s(median(self.without_s[name])),
            fmt_s(median(self.with_s[name])),
            median(rounds),
            "(context)",
            None,
            tuple(rounds),
        )

    def why(self, name: str, mine: Timings, dcp: Timings) -> str:
        """The first call's goal against DCP, where recording is what stands between: argued
        only if, measured beside DCP's first call one stager at a time, the first call
        without it meets the goal."""
        without = self.against_dcp(name, replay=False)
        if without < FIRST_GOAL:
            return ""
        cached = paired_ratio(mine, dcp, "cached")
        return (
            "A first call also records the state dict's structure, which every later call "
            "replays rather than walking it again. Measured one stager at a time on a levelled "
            f"heap (the same repeats), DCP's first call took {fmt_s(median(self.dcp_s))}, this "
            f"face's {fmt_s(median(self.with_s[name]))} with the recording "
            f"({self.against_dcp(name, replay=True):.2f}x DCP's) and "
            f"{fmt_s(median(self.without_s[name]))} with `StagingOptions(replay=False)` "
            f"({without:.2f}x DCP's, over the goal): the recording makes a first call "
            f"{median(self.ratios(name)):.2f}x longer (paired median), and it is what makes the "
            f"cached call {cached:.2f}x DCP's. A stager that stages once can turn it off, as "
            "astage.save does for the stager it makes."
        )

    def figures(self) -> dict[str, Any]:
        return {
            "first_with_recording_s": self.with_s,
            "first_replay_off_s": self.without_s,
            "dcp_first_s": self.dcp_s,
        }


@dataclass
class TurnCost:
    """The async face's cached calls with the default ``max_loop_hold_s`` and with turns of
    :data:`LONG_TURN_S`, timed in the same rounds (:func:`first_and_cached`): what handing
    the loop back every half millisecond costs a call over many small tensors."""

    default: Timings
    long: Timings
    dcp: Timings

    def check(self) -> Check:
        """A row for context: the long turns' cached call against the default's (the
        default's time over the long turns', within each repeat)."""
        rounds = paired_ratios(self.long, self.default, "cached")
        return Check(
            f"astage Stager (async): cached call, max_loop_hold_s={LONG_TURN_S:g} vs the "
            "default (the turns' cost)",
            fmt_s(self.long.cached_s),
            fmt_s(self.default.cached_s),
            median(rounds),
            "(context)",
            None,
            tuple(rounds),
        )

    def _because(self, outcome: str) -> str:
        return (
            f"The async face walks in turns of at most {DEFAULT_TURN_MS:g} ms "
            "(max_loop_hold_s) and hands the loop back between them, a few hundred times a "
            "cached call, and copies a cached call's small tensors on the loop in pieces "
            "within those turns (the loop lane), so walk and copies take turns with the "
            f"loop's other tasks. The same stager with turns of {LONG_TURN_S * 1e3:g} ms, "
            f"timed in the same rounds: {outcome}. The goal is within reach of this face at "
            "the price of the loop-lag goals, whose p99 of 1 ms asks for turns well under a "
            "millisecond."
        )

    def why_us(self, tensors: int) -> str:
        """The <= 3 us goal, argued where the long turns meet it."""
        us = self.long.cached_s * 1e6 / tensors
        if us > CACHED_US_GOAL:
            return ""
        return self._because(f"{us:.2f} us per tensor ({fmt_s(self.long.cached_s)})")

    def why_first(self, recording: float) -> str:
        """The first call's >= 2x DCP goal, argued where the long turns' first call, without
        the ``recording`` share (the first call with the recording over one without, measured
        beside it), would meet it: the shortfall is then the two choices', each measured."""
        ratio = paired_ratio(self.long, self.dcp, "first")
        if ratio * recording < FIRST_GOAL:
            return ""
        return (
            f"This face's first call walks in turns of at most {DEFAULT_TURN_MS:g} ms and "
            "records the structure for replay; both are measured in this run. With turns of "
            f"{LONG_TURN_S * 1e3:g} ms (the same rounds) its first call took "
            f"{fmt_s(self.long.first_s)}, {ratio:.2f}x DCP's, and the recording made a first "
            f"call {recording:.2f}x longer (replay=False beside it): without either, about "
            f"{ratio * recording:.2f}x DCP's, over the goal. The turns are what the loop-lag "
            "goals ask for; the recording is what makes the cached call "
            f"{paired_ratio(self.default, self.dcp, 'cached'):.2f}x DCP's."
        )

    def why_us_by_speed(self, dcp_us: float) -> str:
        """The <= 3 us goal, argued where this run's machine is slower than the issue's (DCP's
        per-tensor time tells, ``dcp_us``), this face meets the ratio goal, and with long turns
        (the same rounds) it would be under 3 us at the issue's speed: the two costs, each
        measured here, are the whole shortfall."""
        ratio = paired_ratio(self.default, self.dcp, "cached")
        long_ratio = paired_ratio(self.long, self.dcp, "cached")
        at_issue_speed = ISSUE_DCP_US / long_ratio
        if not _speed_carries(dcp_us, ratio, at_issue_speed):
            return ""
        return (
            f"{_slower_machine(dcp_us)} This face's call is {ratio:.2f}x DCP's in the same "
            f"rounds (goal >= {CACHED_DCP_GOAL:g}x: met), "
            f"{ISSUE_DCP_US / ratio:.2f} us per tensor at the issue's speed. It walks in turns "
            f"of at most {DEFAULT_TURN_MS:g} ms (max_loop_hold_s), which the loop-lag goals ask "
            f"for; with turns of {LONG_TURN_S * 1e3:g} ms, in the same rounds, it is "
            f"{long_ratio:.2f}x DCP's: {at_issue_speed:.2f} us per tensor at the issue's speed."
        )

    def why_dcp(self) -> str:
        """The >= 5.5x DCP goal, argued where the long turns meet it."""
        ratio = paired_ratio(self.long, self.dcp, "cached")
        if ratio < CACHED_DCP_GOAL:
            return ""
        return self._because(f"{ratio:.2f}x DCP's cached call ({fmt_s(self.long.cached_s)})")


@dataclass
class ReplayFloor:
    """Per tensor, what any replay that checks each tensor must do: copy it, read the
    metadata it checks, and hand out a staged tensor: the last call's, once checked that
    nobody holds it and nothing changed it (astage's check, ``astage._core._reuse``), which
    is cheaper than making a new one. Each part is timed over all the tensors in bulk C-level
    passes (``map``), with the garbage collector paused as astage's calls pause it; the
    median over repeats, in seconds per tensor."""

    copy_s: float
    metadata_s: float
    reuse_s: float

    @property
    def total_s(self) -> float:
        return self.copy_s + self.metadata_s + self.reuse_s

    @classmethod
    def measure(cls, tensors: list[torch.Tensor], repeats: int) -> ReplayFloor:
        twins = [torch.empty_like(t) for t in tensors]
        steps = [tensors[start : start + BULK_STEP] for start in range(0, len(tensors), BULK_STEP)]
        guards = [metadata_guard(step) for step in steps]
        staged = [twin.detach() for twin in twins]
        starts = range(0, len(staged), BULK_STEP)
        checks = [check_of(staged[start : start + BULK_STEP]) for start in starts]
        parts: dict[str, list[float]] = {"copy": [], "metadata": [], "reuse": []}
        with gc_paused():
            for _ in range(repeats):
                parts["copy"].append(timed(partial(torch._foreach_copy_, twins, tensors)))
                rest = sum(timed(partial(_read_all, read, tensors)) for read in _GUARDED)
                if None not in guards:  # this torch has the guard: the cheaper of the two
                    rest = min(rest, timed(partial(_guard_all, guards, steps)))
                parts["metadata"].append(
                    sum(timed(partial(_read_all, read, tensors)) for read in _STORAGE) + rest
                )
                parts["reuse"].append(timed(partial(_all_reusable, staged, checks)))
        n = len(tensors)
        return cls(*(median(parts[k]) / n for k in ("copy", "metadata", "reuse")))

    def figures(self) -> dict[str, float]:
        return {
            "copy": self.copy_s * 1e6,
            "metadata": self.metadata_s * 1e6,
            "reuse": self.reuse_s * 1e6,
        }

    def check(self, foreach_s: float) -> Check:
        """A row for context: the floor of a checked replay against the copy alone."""
        return Check(
            "floor of a checked replay (copy + metadata reads + reuse check), us per tensor",
            f"{self.total_s * 1e6:.2f} us",
            f"{foreach_s * 1e6:.2f} us (the foreach copy, above)",
            None,
            "(context)",
            None,
        )

    def why_dcp(self, dcp_s: float) -> str:
        """The >= 5.5x DCP goal against the floor: argued where DCP's cached call, per
        tensor, is within 5.5x of the floor (no replay could then reach the goal)."""
        if dcp_s >= CACHED_DCP_GOAL * self.total_s:
            return ""
        return (
            f"DCP's cached call took {dcp_s * 1e6:.2f} us per tensor in this run, "
            f"{dcp_s / self.total_s:.2f}x the floor of a checked replay measured beside it "
            f"({self.total_s * 1e6:.2f} us: the copy, the metadata reads and the reuse check, see "
            f"the per-tensor row): even a replay at that floor would be short of "
            f"{CACHED_DCP_GOAL:g}x DCP."
        )

    def why(self, us: float) -> str:
        """The <= 3 us goal against the floor (argued only where the floor is above it)."""
        if self.total_s * 1e6 <= CACHED_US_GOAL:
            return ""
        return (
            "A cached call replays the recorded structure; it must still check every tensor "
            "(storage and offset one by one; shape, stride, dtype, neg bit in one C++ guard "
            "per 256 tensors where torch has one) and hand out a staged tensor for each: the "
            "last call's, checked that nobody holds it and that nothing changed it in place. "
            "On these tensors, in this run, with the collector paused and each part done in "
            "C-level passes, the foreach copy alone took "
            f"{self.copy_s * 1e6:.2f} us per tensor, the metadata reads "
            f"{self.metadata_s * 1e6:.2f} us and the reuse check {self.reuse_s * 1e6:.2f} us: "
            f"{self.total_s * 1e6:.2f} us before any structure is rebuilt, over the goal; "
            f"astage's {us:.2f} us is {us / (self.total_s * 1e6):.2f}x that floor."
        )


_STORAGE: tuple[Callable[[torch.Tensor], object], ...] = (
    torch.Tensor.untyped_storage,
    torch.Tensor.storage_offset,
)
"""The reads a replay makes of each tensor to check it against the recording: its storage
and offset one by one, and the rest (:data:`_GUARDED`) either one by one too or, the cheaper
of the two, by one C++ guard per step of tensors where torch has one (as astage does)."""
_GUARDED: tuple[Callable[[torch.Tensor], object], ...] = (
    operator.attrgetter("shape"),
    torch.Tensor.stride,
    operator.attrgetter("dtype"),
    torch.Tensor.is_neg,
)


def _read_all(read: Callable[[torch.Tensor], object], tensors: list[torch.Tensor]) -> None:
    collections.deque(map(read, tensors), maxlen=0)


def _all_reusable(staged: list[torch.Tensor], checks: list[TwinCheck | None]) -> None:
    for index, check in enumerate(checks):
        start = index * BULK_STEP
        if check is None or not reusable(staged[start : start + BULK_STEP], check):
            raise AssertionError("the floor's staged tensors are not all reusable")


def _guard_all(guards: list[Any], steps: list[list[torch.Tensor]]) -> None:
    for guard, step in zip(guards, steps, strict=True):
        guard(*step)


def _why_us_by_speed(ratio: float, dcp_us: float) -> str:
    """The <= 3 us goal, argued where this run's machine is slower than the one the goal was
    set on (DCP's own per-tensor time tells) and astage's ``ratio`` to DCP (paired, the goal
    that does not depend on the machine's speed) would put it under 3 us there."""
    at_issue_speed = ISSUE_DCP_US / ratio
    if not _speed_carries(dcp_us, ratio, at_issue_speed):
        return ""
    return (
        f"{_slower_machine(dcp_us)} astage's call is {ratio:.2f}x DCP's in the same rounds "
        f"(goal >= {CACHED_DCP_GOAL:g}x: met), which at the issue's speed is "
        f"{at_issue_speed:.2f} us per tensor."
    )


def _speed_carries(dcp_us: float, ratio: float, at_issue_speed: float) -> bool:
    """Whether the machine is slower than the issue's (DCP's per-tensor time, ``dcp_us``), the
    ratio goal is met, and the call would take <= 3 us at the issue's speed."""
    return dcp_us > ISSUE_DCP_US and ratio >= CACHED_DCP_GOAL and at_issue_speed <= CACHED_US_GOAL


def _slower_machine(dcp_us: float) -> str:
    """How much slower than the issue's this run's machine is, by DCP's per-tensor time."""
    return (
        f"Microseconds move with this VM's speed: DCP's cached call took {dcp_us:.2f} us per "
        f"tensor in this run, against the {ISSUE_DCP_US:g} us the issue measured when it set "
        f"the {CACHED_US_GOAL:g} us goal ({dcp_us / ISSUE_DCP_US:.2f}x slower)."
    )


def _why_first(mine: Timings, sync: Timings, dcp: Timings) -> str:
    """The async face's first call against DCP's: the price of handing the loop back."""
    sync_ratio = paired_ratio(sync, dcp, "first")
    if sync_ratio < FIRST_GOAL:
        return ""
    return (
        f"The blocking face walks the same plan in one go and reached {sync_ratio:.2f}x DCP "
        f"here ({fmt_s(sync.first_s)}); the async face walks it in turns of at most "
        f"{DEFAULT_TURN_MS:g} ms (max_loop_hold_s) and hands the loop back between them, some "
        "thousands of times over a first call of 50,000 tensors, with its copies running in a "
        f"worker thread meanwhile: {fmt_s(mine.first_s)}. Longer turns would buy this goal "
        "with the loop-lag ones, whose p99 of 1 ms asks for turns well under a millisecond."
    )
