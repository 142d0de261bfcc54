"""The ``small`` scenario: tens of thousands of tiny tensors; per-tensor overhead dominates."""

from __future__ import annotations

from ..config import Config, Data
from ..contenders import AstageAsync, AstageSync, DcpStateDictStager, PlainCopy, flat_tensors
from ..record import Check, ScenarioResult, fmt_bytes
from ..runner import LoopRunner
from ..state_dicts import describe
from .first_and_cached import first_and_cached, paired_ratio, speed_check, with_timings


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
        "no structure rebuilt.",
    )
    sync, stager = AstageSync(), AstageAsync(runner)
    dcp, plain = DcpStateDictStager(), PlainCopy(flat_tensors(state_dict), foreach=True)
    timings = first_and_cached([sync, stager, dcp, plain], state_dict, config)
    t_dcp = timings[dcp.name]
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
                "<= 4 us",
                us <= 4.0,
            ),
            speed_check(f"{contender.name}: cached call vs DCP cached", t, t_dcp, "cached", 9.0),
            speed_check(f"{contender.name}: first call vs DCP first", t, t_dcp, "first", 3.0),
        ]
    return with_timings(result, timings, shape)
