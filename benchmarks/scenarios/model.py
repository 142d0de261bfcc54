"""The ``model`` scenario: a GPT-2-like model with its AdamW state, a realistic mix of sizes."""

from __future__ import annotations

from ..config import Config, Data
from ..contenders import AstageAsync, AstageSync, DcpStateDictStager
from ..record import ScenarioResult, fmt_bytes
from ..runner import LoopRunner
from ..state_dicts import describe
from .first_and_cached import first_and_cached, speed_check, with_timings


def model(config: Config, data: Data, runner: LoopRunner) -> ScenarioResult:
    """A GPT-2-like model with AdamW: astage's two faces vs DCP's StateDictStager."""
    state_dict = data.gpt()
    shape = describe(state_dict)
    result = ScenarioResult(
        "model",
        f"GPT-2-like model + AdamW state ({config.gpt_layers} layers, width {config.gpt_width}, "
        f"vocab {config.gpt_vocab}): first and cached call",
        f"`{{'model': ..., 'optim': ..., 'step': 1}}` with lm_head tied to wte: {shape.tensors} "
        f"tensors, {shape.storages} storages, {fmt_bytes(shape.nbytes)}. Context for the two "
        "scenarios above on a realistic mix of sizes; the issue sets no goal of its own here.",
    )
    sync, stager, dcp = AstageSync(), AstageAsync(runner), DcpStateDictStager()
    timings = first_and_cached([sync, stager, dcp], state_dict, config)
    t_dcp = timings[dcp.name]
    for contender in (stager, sync):
        t = timings[contender.name]
        for phase in ("cached", "first"):
            result.checks.append(
                speed_check(f"{contender.name}: {phase} call vs DCP {phase}", t, t_dcp, phase, 0)
            )
    return with_timings(result, timings, shape)
