"""State dicts shaped like the ones people checkpoint, built directly from tensors.

Sizes follow the safetensors benchmarks in spirit: a GPT-2-like model with its AdamW state, a
bulk dict of large float tensors, and an optimizer state with tens of thousands of tiny tensors.
Values come from a seeded generator; every page is written, so the source is resident in RAM.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

GiB = 1 << 30
MiB = 1 << 20


@dataclass(frozen=True)
class Shape:
    """What a state dict holds: tensors reached, distinct storages, and their bytes."""

    tensors: int
    storages: int
    nbytes: int

    def figures(self) -> dict[str, int]:
        """The counts, for a scenario's raw figures."""
        return {"tensors": self.tensors, "storages": self.storages, "nbytes": self.nbytes}


def describe(state_dict: Any) -> Shape:
    """Count the tensors of a (nested) state dict, and the bytes of their distinct storages."""
    tensors = 0
    storages: dict[int, int] = {}
    stack = [state_dict]
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            tensors += 1
            storage = obj.untyped_storage()
            storages[storage.data_ptr() or id(storage)] = storage.nbytes()
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
    return Shape(tensors, len(storages), sum(storages.values()))


def map_tensors(tree: Any, function: Callable[[torch.Tensor], Any]) -> Any:
    """The same dicts, lists and tuples with ``function(t)`` in place of each tensor ``t``."""
    if isinstance(tree, torch.Tensor):
        return function(tree)
    if isinstance(tree, dict):
        return {key: map_tensors(value, function) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(map_tensors(value, function) for value in tree)
    return tree


def tensor_leaves(obj: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, torch.Tensor]]:
    """``(path, tensor)`` for every tensor of a nested dict/list/tuple, the way astage paths it."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from tensor_leaves(value, (*path, key))
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            yield from tensor_leaves(value, (*path, index))


def _filled(
    shape: tuple[int, ...], generator: torch.Generator, device: str = "cpu"
) -> torch.Tensor:
    tensor = torch.empty(shape, dtype=torch.float32, device=device)
    if device == "cpu":
        return tensor.uniform_(-1.0, 1.0, generator=generator)
    return tensor.uniform_(-1.0, 1.0)


def bulk_floats(
    total_bytes: int = GiB, count: int = 64, device: str = "cpu", seed: int = 0
) -> dict[str, torch.Tensor]:
    """``count`` float32 tensors of equal size, ``total_bytes`` in all ("1 GiB in 64 tensors")."""
    generator = torch.Generator().manual_seed(seed)
    numel = total_bytes // count // 4
    side = 1024 if numel % 1024 == 0 else 1
    return {
        f"layers.{index}.weight": _filled((numel // side, side), generator, device)
        for index in range(count)
    }


def small_optimizer_state(tensors: int = 50_000, seed: int = 0) -> dict[str, Any]:
    """An optimizer state dict of tiny tensors: ``{'state': {i: {step, exp_avg, exp_avg_sq}}}``.

    Each parameter contributes a 0-d ``step`` and two moments of a small shape (biases,
    LayerNorm weights, small projections), the shape that makes per-tensor overhead dominate.
    """
    generator = torch.Generator().manual_seed(seed)
    shapes = [(64,), (128,), (256,), (16, 16), (768,), (32,)]
    params = -(-tensors // 3)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for index in range(params):
        shape = shapes[index % len(shapes)]
        state[index] = {
            "step": torch.tensor(float(index % 1000)),
            "exp_avg": _filled(shape, generator),
            "exp_avg_sq": _filled(shape, generator).abs_(),
        }
    param_groups = [
        {
            "lr": 3e-4,
            "betas": (0.9, 0.999),
            "eps": 1e-8,
            "weight_decay": 0.01,
            "amsgrad": False,
            "params": list(range(params)),
        }
    ]
    return {"state": state, "param_groups": param_groups}


def gpt2_with_adamw(
    layers: int = 12, width: int = 768, vocab: int = 50257, context: int = 1024, seed: int = 0
) -> dict[str, Any]:
    """A GPT-2-like model state dict (lm_head tied to wte) and its AdamW state after one step.

    ``{'model': {...}, 'optim': {'state': ..., 'param_groups': ...}, 'step': 1}``; the defaults
    are GPT-2 small (124M parameters: 0.5 GB of weights, 1.5 GB with the two moments).
    """
    generator = torch.Generator().manual_seed(seed)
    model: dict[str, torch.Tensor] = {
        "wte.weight": _filled((vocab, width), generator),
        "wpe.weight": _filled((context, width), generator),
    }
    for index in range(layers):
        prefix = f"h.{index}."
        for name, shape in (
            ("ln_1.weight", (width,)),
            ("ln_1.bias", (width,)),
            ("attn.c_attn.weight", (width, 3 * width)),
            ("attn.c_attn.bias", (3 * width,)),
            ("attn.c_proj.weight", (width, width)),
            ("attn.c_proj.bias", (width,)),
            ("ln_2.weight", (width,)),
            ("ln_2.bias", (width,)),
            ("mlp.c_fc.weight", (width, 4 * width)),
            ("mlp.c_fc.bias", (4 * width,)),
            ("mlp.c_proj.weight", (4 * width, width)),
            ("mlp.c_proj.bias", (width,)),
        ):
            model[prefix + name] = _filled(shape, generator)
    model["ln_f.weight"] = _filled((width,), generator)
    model["ln_f.bias"] = _filled((width,), generator)
    model["lm_head.weight"] = model["wte.weight"]  # tied, as in GPT-2: one storage, two keys

    params = [tensor for name, tensor in model.items() if name != "lm_head.weight"]
    state = {
        index: {
            "step": torch.tensor(1.0),
            "exp_avg": _filled(tuple(param.shape), generator).mul_(1e-3),
            "exp_avg_sq": _filled(tuple(param.shape), generator).square_().mul_(1e-6),
        }
        for index, param in enumerate(params)
    }
    param_groups = [
        {
            "lr": 6e-4,
            "betas": (0.9, 0.95),
            "eps": 1e-8,
            "weight_decay": 0.1,
            "amsgrad": False,
            "foreach": None,
            "maximize": False,
            "capturable": False,
            "differentiable": False,
            "fused": None,
            "params": list(range(len(params))),
        }
    ]
    return {"model": model, "optim": {"state": state, "param_groups": param_groups}, "step": 1}
