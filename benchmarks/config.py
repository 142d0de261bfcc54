"""A run's inputs: sizes (:class:`Config`) and the state dicts built from them (:class:`Data`).

Every scenario takes these two and a :class:`~benchmarks.runner.LoopRunner`; they live here, apart
from the scenarios, so that no scenario module needs another one to know its own inputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch

from .record import fmt_bytes
from .state_dicts import GiB, MiB, bulk_floats, gpt2_with_adamw, small_optimizer_state
from .timing import level_heap

__all__ = ["Config", "Data"]

T = TypeVar("T")


@dataclass(frozen=True)
class Config:
    """Sizes and repeats of a run; :meth:`smoke` is the quick run's."""

    quick: bool = False
    repeats: int = 5  # a median of 5 paired ratios: one stalled repeat (this VM) moves it less
    cached_calls: int = 5  # rounds per repeat; a stager's first replay is one in five
    bulk_bytes: int = GiB
    bulk_tensors: int = 64
    small_tensors: int = 50_000
    gpt_layers: int = 12
    gpt_width: int = 768
    gpt_vocab: int = 50257
    gpu_bytes: int = 4 * GiB
    dcp_layers: int = 6  # the dcp scenario's GPT-2-like model: about 430 MB with AdamW
    dcp_width: int = 512
    dcp_vocab: int = 32000
    writer_repeats: int = 5  # the writers page: a disk whose speed swings needs more pairs

    @classmethod
    def smoke(cls) -> Config:
        """Small sizes and one repeat: every scenario runs, in a minute or two."""
        return cls(
            quick=True,
            repeats=1,
            cached_calls=2,
            bulk_bytes=64 * MiB,
            small_tensors=3_000,
            gpt_layers=2,
            gpt_width=256,
            gpt_vocab=8192,
            gpu_bytes=256 * MiB,
            dcp_layers=2,
            dcp_width=128,
            dcp_vocab=4096,
            writer_repeats=1,
        )

    @property
    def bulk_label(self) -> str:
        """How the report names the bulk dict: "1.00 GiB in 64 float32 tensors"."""
        return f"{fmt_bytes(self.bulk_bytes)} in {self.bulk_tensors} float32 tensors"

    def with_repeats(self, repeats: int) -> Config:
        """``repeats`` for every scenario (``--repeats``), the writers' included."""
        return dataclasses.replace(self, repeats=repeats, writer_repeats=repeats)


class Data:
    """The state dicts, built once per run and shared by the scenarios that use them."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._built: dict[str, Any] = {}

    def _get(self, name: str, build: Callable[[], T]) -> T:
        if name not in self._built:
            level_heap()  # the dict's pages come from the same allocator state every run
            self._built[name] = build()
        return cast(T, self._built[name])

    def bulk(self) -> dict[str, torch.Tensor]:
        """``bulk_bytes`` of float32 in ``bulk_tensors`` equal tensors."""
        config = self.config
        return self._get("bulk", lambda: bulk_floats(config.bulk_bytes, config.bulk_tensors))

    def small(self) -> dict[str, Any]:
        """An optimizer state of ``small_tensors`` tiny tensors."""
        tensors = self.config.small_tensors
        return self._get("small", lambda: small_optimizer_state(tensors))

    def gpt(self) -> dict[str, Any]:
        """A GPT-2-like model with its AdamW state."""
        config = self.config
        return self._get(
            "gpt", lambda: gpt2_with_adamw(config.gpt_layers, config.gpt_width, config.gpt_vocab)
        )

    def drop(self, name: str) -> None:
        """Free a dict no later scenario needs (it is rebuilt if one asks after all)."""
        self._built.pop(name, None)
        level_heap()
