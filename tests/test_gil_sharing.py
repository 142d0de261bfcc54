"""A save's plan, in a worker thread beside an event loop, lets the loop take the GIL.

The plan (skeleton, header JSON, digest, freeing the skeleton) is a long stretch of Python; a
loop that wakes meanwhile waited for the GIL until CPython's forced switch (5 ms) at every
chance. These tests check the mechanisms: hand-overs while the plan runs, JSON, header text
and freeing made in pieces, and the pieces' result the same as the whole's.
"""

from __future__ import annotations

import json
import random
import sys
import time
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch

import astage
from astage._drivers import _gil
from astage._drivers._gil import GilSharing, drop_in_pieces
from astage._files import _layout, _safetensors
from astage._files._layout import LayoutMemo, plan_layout


def many_tensors(count: int) -> dict[str, Any]:
    return {
        "state": {i: {"step": torch.tensor(1.0), "m": torch.ones(4)} for i in range(count // 2)},
        "groups": [{"lr": 0.1, "params": list(range(count // 2))}],
    }


def test_a_tick_hands_over_once_its_interval_has_passed(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr("astage._drivers._gil.time.sleep", slept.append)
    sharing = GilSharing()
    sharing.tick()
    assert slept == []  # not yet due
    time_now = time.perf_counter()
    monkeypatch.setattr("astage._drivers._gil.time.perf_counter", lambda: time_now + 1.0)
    sharing.tick()
    assert slept == [_gil.HAND_OVER_S] and sharing.handed_over == 1
    sharing.tick()  # due again only an interval later
    assert sharing.handed_over == 1


def test_a_plan_hands_the_gil_over_and_plans_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_gil, "HAND_OVER_EVERY_S", 0.0)  # due at every tick
    state = many_tensors(4000)
    sharing = GilSharing()
    for memo in (None, LayoutMemo()):
        handed = sharing.handed_over
        layout = plan_layout(state, {"k": "v"}, memo, sharing)
        assert sharing.handed_over - handed > 4000  # at each tensor and container at least
        assert layout.header == plan_layout(state, {"k": "v"}).header
    assert memo is not None
    handed = sharing.handed_over
    plan_layout(state, {"k": "v"}, memo, sharing)  # through the memo
    assert sharing.handed_over - handed > 4000


@pytest.mark.asyncio
async def test_the_async_face_plans_sharing_the_gil_the_blocking_one_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[GilSharing | None] = []
    real = _layout.plan_layout

    def spied(state: Any, metadata: Any, memo: Any, sharing: GilSharing | None) -> Any:
        seen.append(sharing)
        return real(state, metadata, memo, sharing)

    monkeypatch.setattr("astage._files._writer.plan_layout", spied)
    state = many_tensors(8)
    await astage.save(state, tmp_path / "a.safetensors")
    astage.save_sync(state, tmp_path / "b.safetensors")
    assert isinstance(seen[0], GilSharing) and seen[1] is None


def _random_text(rng: random.Random) -> str:
    alphabet = ['"', "\\", "\n", "a", "é", "\U0001f600", "\ud800", "\x00", "/", "\u2028", " "]
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))


def test_a_long_str_is_escaped_in_pieces_as_json_dumps_escapes_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_safetensors, "JSON_STR_PIECE", 3)
    longest: list[int] = []
    dumps = _safetensors._dumps

    def recorded(value: Any) -> str:
        if isinstance(value, str):
            longest.append(len(value))
        return dumps(value)

    monkeypatch.setattr(_safetensors, "_dumps", recorded)
    rng = random.Random(0)
    for _ in range(500):
        value = {"s": _random_text(rng), "l": [_random_text(rng), 1]}
        text = _safetensors.json_text(value)
        assert text.replace(",\n", ",") == json.dumps(value, separators=(",", ":"))
    assert max(longest) <= 3


def test_header_pieces_join_to_the_sealed_text(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_safetensors, "HEADER_PIECE", 1000)
    state = many_tensors(400)
    layout = plan_layout(state)
    assert len(layout.header_pieces) >= 4  # the prefix, the skeleton, the entries, the end
    assert layout.header_size == len(layout.header) == layout.data_start
    text = layout.header[8 : layout.data_start]
    header = json.loads(text)
    digest = header["__metadata__"][_safetensors.DIGEST_KEY]
    assert _safetensors.digest_matches(text, digest)
    monkeypatch.undo()
    assert plan_layout(state).header == layout.header


class CountingSharing(GilSharing):
    ticks = 0

    def tick(self) -> None:
        self.ticks += 1


class Leaf:
    """A leaf whose freeing a weak reference sees (lists and dicts take none)."""


def test_drop_in_pieces_frees_the_tree_but_not_what_others_hold(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_gil, "DROP_PIECE", 4)
    monkeypatch.setattr(_gil, "DROP_OPEN_DEPTH", 5)
    leaves = [Leaf() for _ in range(200)]
    refs = [weakref.ref(leaf) for leaf in leaves]
    shared = {"tensor": "kept", "leaf": leaves[0]}
    big_inner = [[leaf, {"x": leaf}] for leaf in leaves[1:]]
    tree: Any = {"dict": [["a", shared], ["b", {"list": big_inner}], ["c", [shared, big_inner]]]}
    del big_inner, leaves
    sharing = CountingSharing()
    pile = [tree]
    del tree
    drop_in_pieces(pile, sharing)
    assert pile == [] and sharing.ticks > 10
    assert shared == {"tensor": "kept", "leaf": refs[0]()}  # held by us: left whole
    assert all(ref() is None for ref in refs[1:])


def test_a_plan_beside_a_loop_frees_its_skeleton_in_pieces(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dropped: list[int] = []
    real = _gil.drop_in_pieces

    def spied(pile: list[Any], sharing: GilSharing) -> None:
        dropped.append(sys.getrefcount(pile[0]))
        real(pile, sharing)

    monkeypatch.setattr("astage._files._layout.drop_in_pieces", spied)
    memo = LayoutMemo()
    state = many_tensors(100)
    for _ in range(2):
        plan_layout(state, None, memo, GilSharing())
    # The pile held the skeleton alone (the pile and getrefcount's argument): freed there.
    assert dropped == [2, 2]
    plan_layout(state, None, memo)  # without sharing: freed at once, as before
    assert len(dropped) == 2


def test_a_lease_taken_on_the_loop_makes_no_torch_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch call lets go of the GIL, and the loop then waited for worker threads to give it
    back (a save takes its buffer lease on the loop as the first tensor lands: 3-5 ms)."""
    from astage._drivers._leases import Lease

    def refused(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a torch call on the loop")

    monkeypatch.setattr(torch, "zeros", refused)
    lease = Lease()
    assert not lease.released and not lease.shared
    lease.release()
    assert lease.released
    monkeypatch.undo()
    shared = Lease(shared=True)  # one that may go to another process is shared memory
    assert shared.shared and not shared.released
    shared.release()
    assert shared.released


def test_no_hand_over_where_there_is_no_gil(monkeypatch: pytest.MonkeyPatch) -> None:
    """A free-threaded build (sys._is_gil_enabled() False) has no GIL to hand over."""
    monkeypatch.setattr(_gil, "_GIL", False)
    monkeypatch.setattr(_gil, "HAND_OVER_EVERY_S", 0.0)
    sharing = GilSharing()
    for _ in range(100):
        sharing.tick()
    assert sharing.handed_over == 0


def _object_or_error(text: str) -> Any:
    try:
        return ("value", json.loads(text, parse_constant=_reject))
    except (ValueError, RecursionError):
        return ("error", None)


def _reject(name: str) -> Any:
    raise ValueError(name)


def test_an_object_parsed_in_pieces_is_the_whole_or_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where the top-level runs all parse, the pieces' value is json.loads's; any other text
    (cuts at a deeper level, inside a string, empty runs, non-JSON whitespace) is left to the
    whole parse (None)."""
    from astage._files import _load

    monkeypatch.setattr(_load, "PIECES_FROM", 0)
    rng = random.Random(1)
    atoms = ['"a"', '"b"', "1", "[1,2]", '{"x":{"y":3}}', '"q,\\n"', "null", "[]", "{}"]
    checked = 0
    for _ in range(3000):
        members = [
            f'"{rng.choice("abcab")}":{rng.choice(atoms)}' for _ in range(rng.randrange(1, 6))
        ]
        text = "{" + ",".join(members) + "}"
        # Cut at random commas, some of them inside values or strings.
        cuts = [i for i, c in enumerate(text) if c == ","]
        chosen = set(rng.sample(cuts, k=min(len(cuts), rng.randrange(0, 3))))
        text = "".join(c + ("\n" if i in chosen else "") for i, c in enumerate(text))
        text += rng.choice(["", "  ", "\n", "\xa0", ",\n"])
        pieces = _load.object_in_pieces(text)
        kind, whole = _object_or_error(text)
        if pieces is not None:
            checked += 1
            assert kind == "value" and pieces == whole and list(pieces) == list(whole), text
    assert checked > 300


def test_a_saved_header_is_parsed_a_run_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The header of 20,000 tensors was one json.loads of 3 MB (15-25 ms holding the GIL)."""
    calls: list[int] = []
    real = json.loads

    def counted(text: Any, **kwargs: Any) -> Any:
        calls.append(len(text))
        return real(text, **kwargs)

    state = many_tensors(2000)
    astage.save_sync(state, tmp_path / "a.safetensors")
    monkeypatch.setattr("astage._files._load.json.loads", counted)
    loaded = astage.load(tmp_path / "a.safetensors")
    assert loaded["state"][7]["m"].tolist() == [1.0] * 4
    # The header (over 200 kB whole) in runs of 256 entries; the skeleton, smaller, whole.
    assert len(calls) > 4 and max(calls) < 120_000, calls
