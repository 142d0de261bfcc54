"""Hunting the layout memo, the header made in pieces and landed leaves handed out in parts.

A memo plan must be, byte for byte, what a fresh plan makes of the same state dict; a header
made in pieces must be ``json.dumps``' text and load; a skeleton freed in pieces must not take
what a later save still uses; ``stage_iter`` and the DCP landing stager must hand out every
tensor once however small ``LEAF_STEP`` is.
"""

from __future__ import annotations

import json
import random
import threading
from collections import OrderedDict
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from conftest import iter_tensors, same_values
from safetensors.torch import load_file

import astage
from astage._core import _run
from astage._drivers._gil import GilSharing
from astage._files import _safetensors
from astage._files._layout import LayoutMemo, plan_layout
from astage.compat._storage_writer import _LandingStager


def same_tree(loaded: Any, state: Any) -> bool:
    mine, theirs = list(iter_tensors(loaded)), list(iter_tensors(state))
    return [p for p, _ in mine] == [p for p, _ in theirs] and all(
        same_values(a, b) for (_, a), (_, b) in zip(mine, theirs, strict=True)
    )


def check_file(path: Path, state: Any) -> None:
    """astage loads the file as ``state``; safetensors reads every entry of it."""
    loaded = astage.load(path)
    assert same_tree(loaded, state)
    load_file(str(path))


# -- the layout memo ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("before", "after"),
    [(1, True), (1, 1.0), (0.0, -0.0)],
    ids=["int-to-bool", "int-to-float", "zero-to-minus-zero"],
)
def test_a_key_equal_to_the_last_but_printed_otherwise_is_planned_afresh(
    before: Any, after: Any
) -> None:
    # BUG: _ReusingBuilder.encode_tensor compares paths with ==, and 1 == True == 1.0,
    # 0.0 == -0.0: the memo's entry keeps the name "[1]" where a fresh plan names it
    # "[True]" (the safetensors key every other reader sees).
    t = torch.arange(3.0)
    memo = LayoutMemo()
    plan_layout({before: t, "x": t[1:]}, None, memo)
    state = {after: t, "x": t[1:]}
    assert plan_layout(state, None, memo).header == plan_layout(state).header


@pytest.mark.asyncio
async def test_a_bare_tensor_saved_twice_with_a_stager_loads(tmp_path: Path) -> None:
    # BUG: the skeleton of a bare tensor is its memo node; plan_layout's drop_in_pieces
    # clears the root it is handed, so the memo keeps {} and the next save's header says
    # "skeleton": {} (astage.load refuses the file).
    x = torch.arange(4.0)
    async with astage.Stager() as stager:
        for step in range(2):
            x.add_(1)
            await astage.save(x, tmp_path / f"{step}.safetensors", stager=stager)
            assert torch.equal(astage.load(tmp_path / f"{step}.safetensors"), x)


@pytest.mark.asyncio
@pytest.mark.parametrize("root", [5, "abc", None, "x" * 1000], ids=["int", "str", "none", "long"])
async def test_a_plain_root_saves_on_the_async_face_as_on_the_blocking_one(
    tmp_path: Path, root: Any
) -> None:
    # BUG: drop_in_pieces takes any root for a container: len(5), "abc".pop() -> a raw
    # TypeError / AttributeError after the plan, where save_sync saves the same value.
    astage.save_sync(root, tmp_path / "sync.safetensors")
    assert astage.load(tmp_path / "sync.safetensors") == root
    await astage.save(root, tmp_path / "async.safetensors")
    assert astage.load(tmp_path / "async.safetensors") == root


def _changes() -> list[tuple[str, Any]]:
    def untie(s: dict[str, Any]) -> None:
        # a and b tied, then a and b on storages of their own (the old one freed between)
        s["b"] = s["a"].clone()

    def parameter(s: dict[str, Any]) -> None:
        s["a"] = torch.nn.Parameter(s["a"])

    def to_tuple(s: dict[str, Any]) -> None:
        s["l"] = tuple(s["l"])

    def odict_metadata(s: dict[str, Any]) -> None:
        s["o"]._metadata = OrderedDict([("", {"version": 2})])

    def plain_to_tensor(s: dict[str, Any]) -> None:
        s["n"] = torch.ones(1)

    def tensor_to_plain(s: dict[str, Any]) -> None:
        s["l"] = [0, *s["l"][1:]]

    def rebase_view(s: dict[str, Any]) -> None:
        s["v"] = s["c"][1:]

    def realloc(s: dict[str, Any]) -> None:
        old = s.pop("c")
        del old
        s["c"] = torch.zeros(5)  # freed, then maybe the same address, another size
        s["v"] = s["c"][2:]

    def key_order(s: dict[str, Any]) -> None:
        s["o"].move_to_end("p")

    return [
        ("untie", untie),
        ("parameter", parameter),
        ("to_tuple", to_tuple),
        ("odict_metadata", odict_metadata),
        ("plain_to_tensor", plain_to_tensor),
        ("tensor_to_plain", tensor_to_plain),
        ("rebase_view", rebase_view),
        ("realloc", realloc),
        ("key_order", key_order),
    ]


def _state() -> dict[str, Any]:
    a = torch.randn(2, 3)
    c = torch.randn(4)
    return {
        "a": a,
        "b": a,
        "c": c,
        "v": c[2:],
        "l": [torch.ones(2), torch.zeros(0)],
        "o": OrderedDict([("p", torch.ones(1)), ("q", 1)]),
        "n": 3,
    }


@pytest.mark.parametrize(("name", "change"), _changes(), ids=[n for n, _ in _changes()])
@pytest.mark.parametrize("sharing", [False, True], ids=["plain", "sharing"])
def test_a_memo_plan_matches_a_fresh_one_after_each_change(
    name: str, change: Any, sharing: bool
) -> None:
    state = _state()
    memo = LayoutMemo()
    for _ in range(2):
        share = GilSharing() if sharing else None
        assert plan_layout(state, None, memo, share).header == plan_layout(state).header
    change(state)
    for _ in range(3):  # after the change: planned afresh, then taken from the memo
        share = GilSharing() if sharing else None
        assert plan_layout(state, None, memo, share).header == plan_layout(state).header


@pytest.mark.asyncio
async def test_saves_whose_header_crosses_a_page_with_a_stager_load(tmp_path: Path) -> None:
    state = _state()
    async with astage.Stager() as stager:
        for step, size in enumerate([10, 4000, 10, 9000, 3500]):
            metadata = {"note": "é" * size, "\u2603": "\U0001f600"}
            state["n"] = step
            state["c"].add_(1)
            path = tmp_path / f"{step}.safetensors"
            await astage.save(state, path, stager=stager, metadata=metadata)
            check_file(path, state)
            with open(path, "rb") as file:
                size_prefix = int.from_bytes(file.read(8), "little")
            assert (8 + size_prefix) % 4096 == 0


@pytest.mark.asyncio
async def test_concurrent_saves_of_two_structures_on_one_stager_load(tmp_path: Path) -> None:
    one, two = _state(), _state()
    two["extra"] = torch.arange(6.0).reshape(2, 3).t()
    async with astage.Stager() as stager:
        for step in range(3):
            paths = [tmp_path / f"{step}-{i}.safetensors" for i in range(2)]
            async with anyio.create_task_group() as group:
                group.start_soon(partial(astage.save, one, paths[0], stager=stager))
                group.start_soon(partial(astage.save, two, paths[1], stager=stager))
            check_file(paths[0], one)
            check_file(paths[1], two)
            one["c"].add_(1)
            two["a"].add_(2)


def test_save_sync_from_two_threads_on_one_stager_load(tmp_path: Path) -> None:
    states = [_state(), {**_state(), "more": [torch.ones(3)] * 3}]
    errors: list[BaseException] = []
    with astage.SyncStager() as stager:

        def saves(i: int) -> None:
            try:
                for step in range(4):
                    path = tmp_path / f"{i}-{step}.safetensors"
                    astage.save_sync(states[i], path, stager=stager)
                    check_file(path, states[i])
            except BaseException as error:  # noqa: BLE001 - reported below
                errors.append(error)

        threads = [threading.Thread(target=saves, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []


@pytest.mark.asyncio
async def test_a_checkpoint_dir_over_changing_structures_loads_every_step(
    tmp_path: Path,
) -> None:
    state = _state()
    changes = [change for _, change in _changes()]
    async with astage.CheckpointDir(tmp_path, keep=None) as folder:
        for step in range(12):
            if step % 2:
                changes[(step // 2) % len(changes)](state)
            state["n"] = step
            await folder.save(step, state, metadata={"step": str(step)})
            check_file(Path(folder.path_for(step)), state)


# -- JSON and the header in pieces ----------------------------------------------------------


def _value(rng: random.Random, depth: int) -> Any:
    kind = rng.randrange(8 if depth < 4 else 4)
    if kind == 0:
        return rng.choice([0, -1, 2**60, 1.5, -0.0, 1e300, True, False, None])
    if kind in (1, 2, 3):
        alphabet = 'a"\\\n\x00é\u2603\U0001f600\ud800\udc00 '
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
    if kind in (4, 5):
        return [_value(rng, depth + 1) for _ in range(rng.randrange(9))]
    keys = ["k", "", "é", "\ud800", "\"'", "x" * 9]
    return {rng.choice(keys) + str(i): _value(rng, depth + 1) for i in range(rng.randrange(9))}


def test_json_text_in_tiny_pieces_is_json_dumps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_safetensors, "JSON_PIECE", 2)
    monkeypatch.setattr(_safetensors, "JSON_STR_PIECE", 3)
    monkeypatch.setattr(_safetensors, "JSON_OPEN_DEPTH", 2)
    rng = random.Random(7)
    for _ in range(400):
        value = _value(rng, 0)
        expected = json.dumps(value, separators=(",", ":"))
        # The same text, but for a newline after the commas between top-level runs.
        assert _safetensors.json_text(value, GilSharing()).replace(",\n", ",") == expected


@pytest.mark.asyncio
async def test_unicode_keys_many_entries_and_empty_dicts_load_and_read(tmp_path: Path) -> None:
    state: dict[Any, Any] = {
        "\u2603": torch.ones(2),
        "\ud800": [torch.zeros(1)],  # a lone surrogate key: repr'd in the entry's name
        3: {},
        "many": [torch.full((2,), float(i)) for i in range(300)],  # members in pieces
        "s": "\ud800\U0001f600" * 40000,  # a skeleton str escaped in pieces
    }
    metadata = {"ключ": "значение" * 300}
    async with astage.Stager() as stager:
        for i, tree in enumerate([state, {}, {"only": {}}, state, state]):
            path = tmp_path / f"{i}.safetensors"
            await astage.save(tree, path, stager=stager, metadata=metadata)
            check_file(path, tree)
            if tree is state:
                assert astage.load(path)["s"] == state["s"]


# -- landed leaves handed out in parts ------------------------------------------------------


def _leafy() -> dict[str, Any]:
    base = torch.arange(12.0).reshape(3, 4)
    tied = torch.randn(5)
    return {
        "empty": [torch.empty(0), torch.zeros(0, 3)],
        "base": base,
        "view": base[1],
        "t": base.t(),
        "tied": tied,
        "tied2": tied,
        "many": [torch.full((2,), float(i)) for i in range(23)],
        "tail_view": base[2:],
        "empty2": torch.empty(0),
    }


def _expected(state: dict[str, Any]) -> dict[tuple[Any, ...], torch.Tensor]:
    return dict(iter_tensors(state))


@pytest.mark.asyncio
@pytest.mark.parametrize("step", [1, 2, 3, 5])
async def test_stage_iter_hands_each_tensor_once_with_a_small_leaf_step(
    monkeypatch: pytest.MonkeyPatch, step: int
) -> None:
    monkeypatch.setattr(_run, "LEAF_STEP", step)
    state = _leafy()
    expected = _expected(state)
    async with astage.Stager() as stager:
        for call in range(3):  # the first call walks, the next ones replay
            state["base"].add_(1)
            seen: list[tuple[Any, ...]] = []
            async with stager.stage_iter(state) as landed:
                async for path, tensor in landed:
                    seen.append(path)
                    assert same_values(tensor, expected[path]), (call, path)
            assert sorted(seen, key=repr) == sorted(expected, key=repr)


@pytest.mark.asyncio
async def test_stage_iter_left_early_then_again_hands_every_tensor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_run, "LEAF_STEP", 2)
    state = _leafy()
    expected = _expected(state)
    async with astage.Stager() as stager:
        for stop in (0, 3, 17):
            async with stager.stage_iter(state) as landed:
                count = 0
                async for _ in landed:
                    if count == stop:
                        break
                    count += 1
            seen: dict[tuple[Any, ...], torch.Tensor] = {}
            async with stager.stage_iter(state) as landed:
                async for path, tensor in landed:
                    assert path not in seen
                    seen[path] = tensor.clone()
            assert seen.keys() == expected.keys()
            assert all(same_values(seen[p], expected[p]) for p in expected)


@pytest.mark.parametrize("step", [1, 4])
def test_the_landing_stager_hands_each_tensor_once(
    monkeypatch: pytest.MonkeyPatch, step: int
) -> None:
    monkeypatch.setattr(_run, "LEAF_STEP", step)
    state = _leafy()
    count = len(list(iter_tensors(state)))
    stager = _LandingStager()
    try:
        for _ in range(2):
            handed: list[torch.Tensor] = []
            staged = stager.stage_and_hand_out(state, handed.append)
            staged_tensors = [t for _, t in iter_tensors(staged)]
            assert len(handed) == count
            assert sorted(map(id, handed)) == sorted(map(id, staged_tensors))
    finally:
        stager.close()
