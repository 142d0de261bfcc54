"""The replay fast path against a fresh stager's full walk: what the other replay tests miss.

Each test records a structure with a first call, replays it with later ones, then changes the
state dict in a way a replay must either rebuild exactly or leave to the full walk. The result
must be what a fresh stager gives for the same state dict; a comment on each test says what went
wrong before its fix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import Driver, assert_staged

import astage
from astage import _torch as torch_wrappers
from astage._core import _recording as recording_module
from astage._core import _replay as replay_module

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


# -- tensors without a storage where a dense one was recorded ------------------------------------


def _dense(count: int) -> dict[str, torch.Tensor]:
    return {f"w{index}": torch.randn(4, 4) for index in range(count)}


_NO_STORAGE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sparse": torch.Tensor.to_sparse,
    "sparse_csr": torch.Tensor.to_sparse_csr,
    "mkldnn": torch.Tensor.to_mkldnn,
}


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.filterwarnings("ignore:Sparse invariant checks are implicitly disabled")
@pytest.mark.parametrize("count", [1, 300])  # one bulk step, and several
@pytest.mark.parametrize("kind", _NO_STORAGE)
def test_a_tensor_without_a_storage_makes_the_replay_walk(
    stager: Driver, kind: str, count: int
) -> None:
    # The bulk check asked every tensor of the right type for its storage: a sparse (or CSR,
    # or mkldnn) tensor where a dense one was recorded raised a raw NotImplementedError ("Cannot
    # access storage of SparseTensorImpl"), where a fresh stager stages it (or names it).
    recorded = _dense(count)
    for _ in range(3):  # the third call checks with the guards the second one made
        stager.stage(recorded)
    changed = {**recorded, "w0": _NO_STORAGE[kind](recorded["w0"])}
    with astage.SyncStager() as fresh:
        try:
            want = fresh.stage(changed)
        except astage.UnstageableError as error:
            with pytest.raises(astage.UnstageableError) as raised:
                stager.stage(changed)
            assert str(raised.value) == str(error)
        else:
            got = stager.stage(changed)
            assert got["w0"].layout is want["w0"].layout is changed["w0"].layout
            assert torch.equal(got["w0"].to_dense(), recorded["w0"])
            for key in list(recorded)[1:]:
                assert_staged(got[key], recorded[key])
    for key, staged in stager.stage(recorded).items():
        assert_staged(staged, recorded[key])


# -- a tensor met twice in one bulk step -------------------------------------------------------


def _tied(count: int) -> dict[str, Any]:
    """A tensor under two keys (tied weights of ``state_dict(keep_vars=True)``), among others;
    a third key holds it again a bulk step later."""
    weight = torch.nn.Parameter(torch.randn(4))
    state_dict: dict[str, Any] = {"embed": weight, "head": weight}
    state_dict.update({f"w{index}": torch.randn(3) for index in range(count)})
    state_dict["again"] = weight
    return state_dict


@pytest.mark.parametrize("ahead", [False, True])  # guards made by a first replay, or reserve()
@pytest.mark.parametrize("count", [10, 600])
def test_a_step_with_a_tensor_met_twice_keeps_its_guard(
    monkeypatch: pytest.MonkeyPatch, count: int, ahead: bool
) -> None:
    # The metadata guard (dynamo's TensorGuards) refuses a tensor it is given twice: the guard
    # of a bulk step that held the same tensor under two keys never passed, so every cached
    # call checked that step the long way and made its guard again (a cached call over 1,000
    # small tensors took 1.9-2.2 ms with a tie, 1.7-2.0 without, alternated in one process).
    # Now the guard leaves out the places that the recording knows hold the same object as an
    # earlier one, and checks that they do.
    made: list[int] = []

    def counted(tensors: Any) -> Any:
        made.append(len(tensors))
        return torch_wrappers.metadata_guard(tensors)

    monkeypatch.setattr(replay_module, "metadata_guard", counted)  # the replay's guards
    monkeypatch.setattr(recording_module, "metadata_guard", counted)  # a walk ahead's
    state_dict = _tied(count)
    with astage.SyncStager() as stager:
        if ahead:
            stager.reserve(state_dict)  # its walk makes the guards at once
        else:
            stager.stage(state_dict)
            stager.stage(state_dict)  # the first replay makes the guards
        assert made
        made.clear()
        for _ in range(3):
            staged = stager.stage(state_dict)
            assert staged["embed"] is staged["head"] is staged["again"]
            assert type(staged["embed"]) is torch.nn.Parameter
            for key, source in state_dict.items():
                assert_staged(staged[key], source)
        assert made == []


@pytest.mark.parametrize(
    "change",
    [
        "untie",
        "another object alike",
        "tie another",
        "untie the one a step later",
        "resize the tied one",
        "a float in its place",
        "a string in its place",
    ],
)
def test_a_guard_that_leaves_out_a_tied_place_still_sees_it_change(
    stager: Driver, change: str
) -> None:
    # What the guard of a step no longer gives the C++ check (the second place of a tied
    # tensor) must still be checked: untied, tied to another tensor or not a tensor at all, it
    # is staged as a fresh stager does. As first made (ee672bc), that guard passed a float or
    # a string there, which then reached the tensor checks: a raw AttributeError ("'float'
    # object has no attribute '__dict__'").
    state_dict = _tied(600)
    for _ in range(3):
        stager.stage(state_dict)
    if change == "untie":
        state_dict["head"] = torch.nn.Parameter(torch.randn(2, 2))
    elif change == "another object alike":  # the same storage and metadata: only its identity
        state_dict["head"] = torch.nn.Parameter(state_dict["embed"].detach())
    elif change == "tie another":
        state_dict["head"] = state_dict["w0"]
    elif change == "a float in its place":  # not a tensor: no storage, no attributes
        state_dict["head"] = 2.5
    elif change == "a string in its place":
        state_dict["head"] = "tied"
    elif change == "untie the one a step later":
        state_dict["again"] = state_dict["embed"].detach().clone().unsqueeze(0)
    else:
        with torch.no_grad():
            state_dict["embed"].unsqueeze_(0)
    staged = stager.stage(state_dict)
    with astage.SyncStager() as fresh:
        want = fresh.stage(state_dict)
    for key, source in state_dict.items():
        if isinstance(source, torch.Tensor):
            assert_staged(staged[key], source)
        else:
            assert staged[key] == want[key] == source
        assert type(staged[key]) is type(want[key])
    assert (staged["embed"] is staged["head"]) is (want["embed"] is want["head"])
    assert (staged["embed"] is staged["again"]) is (want["embed"] is want["again"])
