"""The ``bulk`` scenario: large float tensors, first and cached call, vs DCP and a plain copy."""

from __future__ import annotations

from ..config import Config, Data
from ..contenders import AstageAsync, AstageSync, DcpStateDictStager, PlainCopy, flat_tensors
from ..record import ScenarioResult
from ..runner import LoopRunner
from ..state_dicts import describe
from .first_and_cached import (
    after_reserve,
    first_and_cached,
    reserve_check,
    speed_check,
    with_timings,
)

COPY_GOAL = 1.05
"""Issue #11: a cached call takes <= 1.05x a plain copy of the same bytes (both faces)."""
FIRST_GOAL = 1.5
"""Issue #11: the first call without ``reserve()`` is >= 1.5x DCP's first call."""


def bulk(config: Config, data: Data, runner: LoopRunner) -> ScenarioResult:
    """Large float tensors: astage's two faces vs DCP's StateDictStager and a plain copy."""
    result = ScenarioResult(
        "bulk",
        f"{config.bulk_label}: first and cached call",
        "Each contender starts with an empty cache on a levelled heap (first call: allocate and "
        "copy), then stages the same dict again into its cached buffers (cached call). The plain "
        "copy moves the same bytes tensor by tensor (`dst.copy_(src)`) into preallocated "
        "tensors: the memory-bandwidth ceiling. Then, per face, a fresh stager runs "
        "`reserve(sd)` and its first call is set against its own cached calls.",
    )
    state_dict = data.bulk()
    shape = describe(state_dict)
    sync, stager = AstageSync(), AstageAsync(runner)
    dcp, plain = DcpStateDictStager(), PlainCopy(flat_tensors(state_dict))
    timings = first_and_cached([sync, stager, dcp, plain], state_dict, config)
    reserved = after_reserve([sync, stager], state_dict, config)
    t_dcp, t_plain = timings[dcp.name], timings[plain.name]
    for contender in (stager, sync):
        t = timings[contender.name]
        result.checks += [
            speed_check(f"{contender.name}: cached call vs DCP cached", t, t_dcp, "cached", 0),
            speed_check(
                f"{contender.name}: cached call vs plain copy (ceiling)",
                t,
                t_plain,
                "cached",
                1 / COPY_GOAL,
                goal_label=f"<= {COPY_GOAL:g}x the copy (>= {1 / COPY_GOAL:.3f}x)",
            ),
            speed_check(
                f"{contender.name}: first call vs DCP first", t, t_dcp, "first", FIRST_GOAL
            ),
            reserve_check(contender.name, reserved[contender.name]),
        ]
    return with_timings(result, timings, shape, reserved)
