"""A stager's saves plan the file from the last layout they planned, where nothing changed.

Each case plans a state dict through a :class:`LayoutMemo`, changes it, and plans it again:
the header must be, byte for byte, what a plan without the memo makes of the changed dict, and
a change the remembered plan cannot stand for must make the memo plan afresh.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from conftest import iter_tensors, same_values
from hypothesis import HealthCheck, given, settings

import astage
from astage._drivers._gil import GilSharing
from astage._files import _layout
from astage._files._layout import LayoutMemo, plan_layout


def model_state() -> dict[str, Any]:
    weight = torch.randn(4, 3)
    state: dict[str, Any] = {
        "model": OrderedDict(
            [
                ("embed.weight", weight),
                ("head.weight", weight),  # tied: one entry, two paths
                ("norm.weight", torch.ones(3)),
                ("norm.bias", torch.zeros(3)),
                ("block", torch.nn.Parameter(torch.randn(2, 2))),
            ]
        ),
        "optim": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(4, 3)}},
            "param_groups": [{"lr": 0.1, "params": [0]}],
        },
        "window": weight[1:3],  # a view inside another tensor's entry
        "step": 3,
        "ema": torch.zeros(2),
    }
    return state


def same_tree(loaded: Any, state: Any) -> bool:
    mine, theirs = list(iter_tensors(loaded)), list(iter_tensors(state))
    return [p for p, _ in mine] == [p for p, _ in theirs] and all(
        same_values(a, b) for (_, a), (_, b) in zip(mine, theirs, strict=True)
    )


def planned_twice(state: dict[str, Any], change: Callable[[dict[str, Any]], None]) -> LayoutMemo:
    """Plan through a memo, ``change`` the dict, plan again: as a fresh plan would."""
    memo = LayoutMemo()
    first = plan_layout(state, {"run": "a"}, memo)
    assert first.header == plan_layout(state, {"run": "a"}).header
    change(state)
    fresh = plan_layout(state, {"run": "b"})
    again = plan_layout(state, {"run": "b"}, memo)
    assert again.header == fresh.header
    assert [(e.key, e.begin, e.nbytes) for e in again.entries] == [
        (e.key, e.begin, e.nbytes) for e in fresh.entries
    ]
    assert again.by_path.keys() == fresh.by_path.keys()
    assert again.tensors == fresh.tensors
    return memo


def count_fresh_plans(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """One item per plan that made its entries afresh (rather than taking a memo's)."""
    fresh: list[object] = []
    real = _layout._entry_members

    def counted(ordered: list[_layout.Entry], sharing: GilSharing | None = None) -> str:
        fresh.append(ordered)
        return real(ordered, sharing)

    monkeypatch.setattr(_layout, "_entry_members", counted)
    return fresh


def test_an_unchanged_structure_takes_the_remembered_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    state = model_state()
    memo = LayoutMemo()
    plan_layout(state, None, memo)
    remembered = memo.last
    assert remembered is not None
    fresh_plans = count_fresh_plans(monkeypatch)
    state["step"] = 4  # plain values are encoded at every plan
    state["optim"]["param_groups"][0]["lr"] = 0.05
    again = plan_layout(state, None, memo)
    assert memo.last is remembered and fresh_plans == []
    monkeypatch.undo()
    assert again.header == plan_layout(state).header


CHANGES: dict[str, Callable[[dict[str, Any]], None]] = {
    "a key renamed": lambda s: s["model"].__setitem__("norm.gain", s["model"].pop("norm.weight")),
    "a key renamed in place": lambda s: s.__setitem__(
        "model", OrderedDict((k.replace("norm", "ln"), v) for k, v in s["model"].items())
    ),
    "the last tensor removed": lambda s: s.pop("ema"),
    "a key added": lambda s: s.__setitem__("extra", torch.ones(2)),
    "a tensor removed": lambda s: s["optim"]["state"][0].pop("exp_avg"),
    "a storage swapped through .data": lambda s: setattr(
        s["model"]["norm.bias"], "data", torch.zeros(3)
    ),
    "a dtype changed through .data": lambda s: setattr(
        s["model"]["norm.bias"], "data", torch.zeros(3, dtype=torch.float16)
    ),
    "transposed in place": lambda s: s["optim"]["state"][0]["exp_avg"].t_(),
    "resized in place": lambda s: s["model"]["norm.weight"].resize_(6),
    "restrided in place": lambda s: s["optim"]["state"][0]["exp_avg"].as_strided_((3, 4), (1, 3)),
    "set_ onto another storage": lambda s: s["model"]["norm.bias"].set_(
        s["model"]["norm.weight"].untyped_storage(), 0, (3,), (1,)
    ),
    "untied": lambda s: s["model"].__setitem__("head.weight", s["model"]["head.weight"].clone()),
    "tied": lambda s: s["model"].__setitem__("norm.bias", s["model"]["norm.weight"]),
    "a view moved": lambda s: s.__setitem__("window", s["model"]["embed.weight"][2:4]),
    "conjugated": lambda s: s.__setitem__("z", torch.ones(2, dtype=torch.complex64)),
    "a parameter made plain": lambda s: s["model"].__setitem__(
        "block", s["model"]["block"].detach()
    ),
    "an attribute set": lambda s: setattr(s["model"]["norm.weight"], "tag", "x"),
    "a numpy array added": lambda s: s.__setitem__("rng", np.arange(3)),
    "the storage freed": lambda s: s["model"]["norm.bias"].untyped_storage().resize_(0),
    "a container type changed": lambda s: s.__setitem__("model", dict(s["model"])),
    "tensors swapped": lambda s: s["model"].update(
        {"norm.weight": s["model"]["norm.bias"], "norm.bias": s["model"]["norm.weight"]}
    ),
}


@pytest.mark.parametrize("change", CHANGES.values(), ids=list(CHANGES))
def test_a_change_is_planned_afresh(change: Callable[[dict[str, Any]], None]) -> None:
    state = model_state()
    try:
        planned_twice(state, change)
    except astage.UnsavableError:
        # What cannot be saved is refused with the memo as without it.
        with pytest.raises(astage.UnsavableError):
            plan_layout(state)
        with pytest.raises(astage.UnsavableError):
            memo = LayoutMemo()
            plan_layout(model_state(), None, memo)
            plan_layout(state, None, memo)


def test_a_negative_view_is_told_from_its_base() -> None:
    state: dict[str, Any] = {"z": torch.ones(3, dtype=torch.complex64)}

    def to_neg(s: dict[str, Any]) -> None:
        s["z"] = s["z"]._neg_view()

    planned_twice(state, to_neg)


def test_what_is_not_remembered_is_planned_every_time() -> None:
    for state in ({"a": np.arange(3)}, {"t": torch.ones(2)}):
        if "t" in state:
            state["t"].tag = "kept"  # type: ignore[union-attr]
        memo = LayoutMemo()
        plan_layout(state, None, memo)
        assert memo.last is None


def test_one_memo_per_stager_gone_with_it() -> None:
    stager = astage.SyncStager()
    memo = _layout.layout_memo(stager)
    assert _layout.layout_memo(stager) is memo
    assert _layout.layout_memo(astage.SyncStager()) is not memo
    stager.close()
    del stager
    import gc

    gc.collect()
    assert memo not in _layout._MEMOS.values()


_LEAVES = st.sampled_from(["same", "value", "rename", "swap", "view", "tie", "dtype", "drop"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_LEAVES, min_size=1, max_size=6), st.integers(0, 2**16))
def test_random_changes_match_a_fresh_plan(changes: list[str], seed: int) -> None:
    """Random edits between plans: the memo's plan is always the fresh one, byte for byte."""
    generator = torch.Generator().manual_seed(seed)
    pool = [torch.randn(5, generator=generator) for _ in range(4)]
    state: dict[str, Any] = {f"t{i}": t for i, t in enumerate(pool)}
    state["n"] = 1
    memo = LayoutMemo()
    plan_layout(state, None, memo)
    for index, change in enumerate(changes):
        key = f"t{(seed + index) % 4}"
        if key not in state:
            state[key] = torch.ones(2)
        if change == "value":
            state["n"] = index
        elif change == "rename":
            state[f"r{index}"] = state.pop(key)
        elif change == "swap":
            state[key].data = torch.randn(5, generator=generator)
        elif change == "view":
            state[key] = pool[index % 4][1:]
        elif change == "tie":
            state[key] = pool[(index + 1) % 4]
        elif change == "dtype":
            state[key] = state[key].double()
        elif change == "drop":
            del state[key]
        assert plan_layout(state, None, memo).header == plan_layout(state).header


@pytest.mark.asyncio
async def test_saves_with_a_stager_reuse_the_layout_and_load_right(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fresh = count_fresh_plans(monkeypatch)
    state = model_state()
    async with astage.Stager() as stager:
        for step in range(3):
            state["step"] = step
            state["model"]["norm.weight"].add_(1.0)
            await astage.save(state, tmp_path / f"s{step}.safetensors", stager=stager)
            assert len(fresh) == 1  # planned once, then taken from the memo
            loaded = astage.load(tmp_path / f"s{step}.safetensors")
            assert loaded["step"] == step
            assert same_tree(loaded, state)
        state["model"]["extra"] = torch.ones(2)  # a new key: planned afresh, and right
        await astage.save(state, tmp_path / "changed.safetensors", stager=stager)
        assert len(fresh) == 2
        assert same_tree(astage.load(tmp_path / "changed.safetensors"), state)


def test_save_sync_with_a_stager_reuses_the_layout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fresh = count_fresh_plans(monkeypatch)
    state = model_state()
    with astage.SyncStager() as stager:
        for step in range(2):
            state["step"] = step
            astage.save_sync(state, tmp_path / f"s{step}.safetensors", stager=stager)
            assert same_tree(astage.load(tmp_path / f"s{step}.safetensors"), state)
    assert len(fresh) == 1
    with astage.SyncStager(replay=False) as stager:  # no recording wanted: no memo either
        for step in range(2):
            astage.save_sync(state, tmp_path / f"n{step}.safetensors", stager=stager)
    assert len(fresh) == 3
