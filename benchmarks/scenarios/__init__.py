"""The scenarios, one family a module; each maps a run's inputs to a :class:`ScenarioResult`.

Every scenario runs astage and DCP in this one process on the same state dict, alternating the
order of the contenders from repeat to repeat and levelling the heap before each first call
(see :mod:`benchmarks.timing`). Figures are medians over repeats; nothing is hard-coded.

    bulk, small, model   first and cached call (:mod:`.first_and_cached`) on three kinds of dict
    lag                  event-loop lag while staging (:mod:`.loop_lag`)
    memory               peak host memory and growth over calls (:mod:`.host_memory`)
    gpu                  device-to-host staging on CUDA, and its loop lag (:mod:`.gpu`)
    dcp                  ``dcp.async_save``, DCP's stager vs ``astage.compat``'s (:mod:`.dcp_saves`)
    writers              time to a durable checkpoint (:mod:`.writer_saves`; a page of its own)
    restore              filling existing tensors: vs torch.load, dcp.load (:mod:`.restore`)
"""

from __future__ import annotations

from collections.abc import Callable

from ..config import Config, Data
from ..record import ScenarioResult
from ..runner import LoopRunner
from .bulk import bulk
from .dcp_saves import dcp_saves
from .gpu import gpu
from .host_memory import host_memory
from .loop_lag import lag
from .model import model
from .restore import restore
from .small import small
from .writer_saves import writer_saves

__all__ = ["SCENARIOS", "Scenario"]

Scenario = Callable[[Config, Data, LoopRunner], ScenarioResult]
"""A scenario: measures with the run's sizes, shared state dicts and event loop."""

SCENARIOS: dict[str, Scenario] = {
    "bulk": bulk,
    "small": small,
    "model": model,
    "lag": lag,
    "memory": host_memory,
    "gpu": gpu,
    "dcp": dcp_saves,
    "writers": writer_saves,
    "restore": restore,
}
