"""The replay fast path against a fresh stager's full walk: what the other replay tests miss.

Each test records a structure with a first call, replays it with later ones, then changes the
state dict in a way a replay must either rebuild exactly or leave to the full walk. The result
must be what a fresh stager gives for the same state dict; a comment on each test says what went
wrong before its fix.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import Driver, assert_staged

import astage

# -- keys compared with user code ----------------------------------------------------------------


class _Touchy:
    """A hashable key whose equality cannot be asked (as a tensor's is, or a numpy array's)."""

    def __init__(self, number: int) -> None:
        self.number = number

    def __hash__(self) -> int:
        return hash(("touchy", self.number))  # no int key of the state collides

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("this key cannot be compared")


def _item(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"exp_avg": torch.randn(3, generator=generator), "step": torch.tensor(float(seed))}


def _int_keyed(items: int = 2) -> dict[str, Any]:
    """An optimizer's state as ``state_dict()`` gives it: keyed by parameter index."""
    return {"state": {index: _item(index) for index in range(items)}, "lr": 0.1}


def _tensor_keyed(recorded: dict[str, Any]) -> dict[str, Any]:
    """The same items keyed by parameters (``dict(optimizer.state)``): a key that is a tensor of
    several elements answers ``==`` with a tensor that has no truth value."""
    items = recorded["state"].values()
    return {"state": {torch.randn(2, 2 + i): item for i, item in enumerate(items)}, "lr": 0.1}


def _touchy_at_the_root(recorded: dict[str, Any]) -> dict[Any, Any]:
    return {_Touchy(1): recorded["state"], "lr": 0.1}


def _touchy_in_an_item(recorded: dict[str, Any]) -> dict[str, Any]:
    state = dict(recorded["state"])
    state[1] = {_Touchy(2): state[1]["exp_avg"], "step": state[1]["step"]}
    return {"state": state, "lr": 0.1}


def _touchy_among_the_items(recorded: dict[str, Any]) -> dict[str, Any]:
    state = dict(recorded["state"])
    state[_Touchy(3)] = state.pop(len(state) - 1)
    return {"state": state, "lr": 0.1}


def _assert_alike(got: Any, want: Any, source: Any) -> None:
    """``got`` is staged like ``want`` (a fresh stager's), from ``source``: keys that are not
    atoms compared as staged objects, never with ``==``."""
    assert type(got) is type(want)
    if isinstance(source, torch.Tensor):
        assert_staged(got, source)
        assert_staged(want, source)
    elif isinstance(source, dict):
        assert len(got) == len(want) == len(source)
        for (got_key, got_value), (want_key, want_value), (key, value) in zip(
            got.items(), want.items(), source.items(), strict=True
        ):
            _assert_alike(got_key, want_key, key)
            _assert_alike(got_value, want_value, value)
    elif isinstance(source, _Touchy):
        assert got.number == want.number == source.number
    else:
        assert got == want == source


@pytest.mark.parametrize("items", [2, 100])  # replayed in one go, and in steps
@pytest.mark.parametrize(
    "change", [_tensor_keyed, _touchy_at_the_root, _touchy_in_an_item, _touchy_among_the_items]
)
def test_keys_whose_equality_fails_make_the_replay_walk(
    stager: Driver, change: Any, items: int
) -> None:
    # The replay compared the keys with the recorded ones (==) before their types: a dict keyed
    # by parameters where the recording had parameter indices raised "Boolean value of Tensor
    # with more than one value is ambiguous", raw, where a fresh stager stages it.
    recorded = _int_keyed(items)
    for _ in range(2):
        stager.stage(recorded)
    changed = change(recorded)
    got = stager.stage(changed)
    with astage.SyncStager() as fresh:
        _assert_alike(got, fresh.stage(changed), changed)
    _assert_alike(stager.stage(recorded), _int_keyed(items), recorded)
