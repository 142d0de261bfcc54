"""The ``small`` scenario: tens of thousands of tiny tensors; per-tensor overhead dominates."""

from __future__ import annotations

from ..config import Config, Data
from ..contenders import AstageAsync, AstageSync, DcpStateDictStager, PlainCopy, flat_tensors
from ..record import Check, ScenarioResult, fmt_bytes
from ..runner import LoopRunner
from ..state_dicts import describe
from .first_and_cached import (
    after_reserve,
    first_and_cached,
    paired_ratio,
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
        "and its first call is set against its own cached calls.",
    )
    sync, stager = AstageSync(), AstageAsync(runner)
    dcp, plain = DcpStateDictStager(), PlainCopy(flat_tensors(state_dict), foreach=True)
    timings = first_and_cached([sync, stager, dcp, plain], state_dict, config)
    reserved = after_reserve([sync, stager], state_dict, config)
    t_dcp, t_plain = timings[dcp.name], timings[plain.name]
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
            ),
            speed_check(
                f"{contender.name}: cached call vs DCP cached", t, t_dcp, "cached", CACHED_DCP_GOAL
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
                f"{contender.name}: first call vs DCP first", t, t_dcp, "first", FIRST_GOAL
            ),
            reserve_check(contender.name, reserved[contender.name]),
        ]
    return with_timings(result, timings, shape, reserved)
