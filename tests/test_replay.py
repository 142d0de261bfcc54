"""The replay fast path: a state dict shaped like an earlier one is rebuilt from a recording.

Every test stages through the core (``walk_or_replay``, the copies run on the host) with a cache
that has history, and compares the result with what a fresh cache gives for the same state dict
(:func:`assert_same_staging`: container types and attributes, tensor types and metadata, bytes,
aliasing between tensors, one staged object per source object). ``plan.replayed`` says whether
the call was replayed; the tests check it both ways, so a fallback that silently walks in full
(slow but right) is caught as well as a replay that should not have happened.

The property test at the end mutates random structures between calls in every way the replay
must notice, and the faces' tests check that SyncStager, Stager and compat replay too.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import sys
import weakref
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import pytest
import torch
from conftest import (
    DRIVERS,
    Driver,
    bytes_of,
    derandomized,
    in_a_fresh_interpreter,
    model_state_dict,
    mutate_,
)

from astage import _torch as torch_wrappers
from astage import compat
from astage._core import _cache as cache_module
from astage._core import _recording as recording_module
from astage._core import _replay as replay_module
from astage._core import _reuse as reuse_module
from astage._core._batches import make_batches
from astage._core._cache import BufferCache, HostBuffer
from astage._core._plan import Plan
from astage._core._recording import Recording, ReplayRecorder
from astage._core._replay import Replay, walk_or_replay
from astage._core._reuse import DICT_STEP
from astage._core._structure import BULK_STEP, CHUNK
from astage._core._tables import EMPTY_STEP, LEAD_AFTER, empty_in_steps
from astage._core._walk import SMALL_CONTAINER
from astage._devices._host import run_host_batch
from astage._errors import BufferMismatchError
from astage._paths import Attr
from astage._torch import metadata_guard, neg_view


def new_cache() -> BufferCache:
    return BufferCache(pin_memory=False, share_memory=False, pin_memory_min_bytes=0)


def stage(cache: BufferCache, state_dict: Any, *, track_leaves: bool = False) -> Plan:
    """One call through the core: walk or replay, then every copy; returns the plan."""
    plan = Plan(track_leaves=track_leaves)
    walk = walk_or_replay(cache, state_dict, plan)
    steps = sum(1 for _ in walk)
    plan.steps = steps  # type: ignore[attr-defined]
    copies = plan.copies
    # What batches are cut from, kept beside the buffers by every path that adds a copy: each
    # copy's size, and (at least) every buffer's device, or batches could mix devices.
    assert copies.sizes == [buffer.nbytes for buffer in copies.buffers]
    assert {buffer.device for buffer in copies.buffers} <= copies.devices
    for batch in make_batches(plan.copies, 0, len(plan.copies), 1 << 20):
        run_host_batch(batch)
    return plan


def fresh(state_dict: Any) -> Any:
    return stage(new_cache(), state_dict).result


# -- comparing two staged results ---------------------------------------------------------------


class _Pairing:
    """Objects of one result paired with those of the other: a one-to-one map, both ways."""

    def __init__(self) -> None:
        self.forward: dict[int, int] = {}
        self.backward: dict[int, int] = {}
        self.keep: list[Any] = []

    def pair(self, a: Any, b: Any, what: str) -> bool:
        """Pair ``a`` with ``b``; True when they were paired before (nothing more to check)."""
        known = self.forward.get(id(a))
        if known is not None or id(b) in self.backward:
            assert known == id(b) and self.backward.get(id(b)) == id(a), f"{what} sharing differs"
            return True
        self.forward[id(a)] = id(b)
        self.backward[id(b)] = id(a)
        self.keep += [a, b]
        return False


def assert_same_staging(got: Any, want: Any, source: Any) -> None:
    """``got`` is staged exactly like ``want`` (both staged from ``source``)."""
    objects, storages = _Pairing(), _Pairing()
    _compare(got, want, source, objects, storages, ())


def _compare(  # noqa: PLR0917 - recursive helper
    got: Any, want: Any, source: Any, objects: _Pairing, storages: _Pairing, path: Any
) -> None:
    assert type(got) is type(want), (path, type(got), type(want))
    assert (got is source) == (want is source), f"{path}: the source itself in one result only"
    if isinstance(want, torch.Tensor):
        if objects.pair(got, want, f"tensor at {path}"):
            return
        assert got.dtype == want.dtype and got.shape == want.shape, path
        assert got.stride() == want.stride(), path
        assert got.storage_offset() == want.storage_offset(), path
        assert got.is_conj() == want.is_conj() and got.is_neg() == want.is_neg(), path
        assert got.requires_grad == want.requires_grad, path
        assert got.device.type == "cpu"
        assert got.untyped_storage().data_ptr() != source.untyped_storage().data_ptr() or (
            source.untyped_storage().nbytes() == 0
        )
        got_storage, want_storage = got.untyped_storage(), want.untyped_storage()
        if not storages.pair(got_storage, want_storage, f"storage at {path}"):
            assert torch.equal(bytes_of(got_storage), bytes_of(want_storage)), path
        assert got.__dict__.keys() == want.__dict__.keys(), path
        return
    container = isinstance(want, (dict, list, tuple)) and want is not source
    if container and objects.pair(got, want, f"container at {path}"):
        return
    if isinstance(want, dict):
        assert list(got) == list(want), path
        for key in want:
            _compare(got[key], want[key], source[key], objects, storages, (*path, key))
        got_attrs, want_attrs = getattr(got, "__dict__", {}), getattr(want, "__dict__", {})
        assert got_attrs.keys() == want_attrs.keys(), path
        for name in want_attrs:
            source_attr = getattr(source, name)
            assert got_attrs[name] is not source_attr or want_attrs[name] is source_attr
            _compare(got_attrs[name], want_attrs[name], source_attr, objects, storages, path)
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), path
        for index, (g, w, s) in enumerate(zip(got, want, source, strict=True)):
            _compare(g, w, s, objects, storages, (*path, index))
    else:
        assert got == want or (_is_nan(got) and _is_nan(want)), path


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and value != value  # noqa: PLR0124 - NaN test


def check_call(
    cache: BufferCache, state_dict: Any, *, replayed: bool, track_leaves: bool = False
) -> Plan:
    """Stage with ``cache`` (history) and with a fresh one: the same result; replayed or not."""
    plan = stage(cache, state_dict, track_leaves=track_leaves)
    assert plan.replayed is replayed
    assert_same_staging(plan.result, fresh(state_dict), state_dict)
    assert len(plan.copies) == len({id(b) for b in plan.copies.buffers}), "a storage copied twice"
    return plan


# -- what replays ---------------------------------------------------------------------------------


def test_a_second_call_of_the_same_structure_is_replayed() -> None:
    cache = new_cache()
    state_dict = model_state_dict()
    check_call(cache, state_dict, replayed=False)
    mutate_(state_dict)
    plan = check_call(cache, state_dict, replayed=True)
    assert plan.tensors == 9 and plan.new_buffers == 0
    mutate_(state_dict)
    check_call(cache, state_dict, replayed=True)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2)
    )


def test_module_state_dict_rebuilt_each_call_is_replayed() -> None:
    """New OrderedDicts, new tensor objects (``detach()``) and new ``_metadata`` every call."""
    model = _model()
    cache = new_cache()
    check_call(cache, model.state_dict(), replayed=False)
    for _ in range(2):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(1.0)
        state_dict = model.state_dict()
        plan = check_call(cache, state_dict, replayed=True)
        staged = plan.result
        assert type(staged) is collections.OrderedDict
        assert staged._metadata == state_dict._metadata  # type: ignore[attr-defined]
        assert staged._metadata is not state_dict._metadata  # type: ignore[attr-defined]


def test_parameters_keep_their_type_and_requires_grad() -> None:
    model = _model()
    first: Any = model.get_submodule("0")
    first.bias.requires_grad_(False)
    cache = new_cache()
    check_call(cache, model.state_dict(keep_vars=True), replayed=False)
    plan = check_call(cache, model.state_dict(keep_vars=True), replayed=True)
    assert type(plan.result["0.weight"]) is torch.nn.Parameter
    assert plan.result["0.weight"].requires_grad and not plan.result["0.bias"].requires_grad
    # requires_grad flipped in place: the walk decides again.
    first.weight.requires_grad_(False)
    check_call(cache, model.state_dict(keep_vars=True), replayed=False)


def _views() -> dict[str, Any]:
    base = torch.arange(24, dtype=torch.float32)
    grid = base.view(4, 6)
    return {
        "base": base,
        "rows": grid[1:3],  # a partial view, at an offset
        "columns": grid[:, 2:4].t(),  # strided, transposed
        "bytes": base.view(torch.uint8)[8:40],  # the same storage under another dtype
        "flags": base.view(torch.int32)[:4] != 0,  # a bool tensor of its own
        "complex": torch.randn(3, 2).view(torch.complex64).conj(),
        "negative": neg_view(torch.randn(5)),
        "empty": torch.empty(0),
        "scalar": torch.tensor(2.5),
        "unit": torch.randn(1, 3).t(),  # a size-1 dimension: no reusable view
    }


def test_views_partial_views_conj_and_neg_are_replayed() -> None:
    state_dict = _views()
    cache = new_cache()
    check_call(cache, state_dict, replayed=False)
    # The same tensors reached again through new views (objects differ, metadata does not).
    again = dict(state_dict)
    base = again["base"]
    again["rows"] = base.view(4, 6)[1:3]
    mutate_(state_dict)
    plan = check_call(cache, again, replayed=True)
    staged = plan.result
    rows, base = staged["rows"].untyped_storage(), staged["base"].untyped_storage()
    assert rows.data_ptr() == base.data_ptr()
    assert staged["complex"].is_conj() and staged["negative"].is_neg()


def test_the_same_tensor_twice_and_tied_storages() -> None:
    weight = torch.randn(4, 4)
    state_dict = {"a": weight, "b": weight, "c": weight.detach(), "d": [weight]}
    cache = new_cache()
    check_call(cache, state_dict, replayed=False)
    plan = check_call(cache, dict(state_dict), replayed=True)
    assert plan.result["a"] is plan.result["b"] and plan.result["c"] is not plan.result["a"]
    # Distinct objects where the same one was recorded, and the other way round.
    check_call(cache, {**state_dict, "b": weight.detach()}, replayed=False)
    check_call(cache, {**state_dict, "c": weight}, replayed=False)


def test_tensors_on_one_storage_checked_one_by_one() -> None:
    """The tensor-by-tensor replay (after a bulk miss: here a tensor swapped for a new one
    while the recorded one lives on) stages tensors on a shared storage as the walk does: the
    same object twice gives one staged tensor, also when two tensors use the storage."""
    weight = torch.randn(4, 4)
    recorded = torch.ones(3)
    for state_dict in (
        {"a": weight, "b": weight},
        {"a": weight, "b": weight, "c": weight[1:]},
        {"a": weight, "b": weight.detach()},
    ):
        cache = new_cache()
        check_call(cache, {**state_dict, "x": recorded}, replayed=False)
        swapped = {**state_dict, "x": torch.full((3,), 2.0)}
        plan = check_call(cache, swapped, replayed=True)
        assert (plan.result["a"] is plan.result["b"]) == (state_dict["a"] is state_dict["b"])


def test_module_state_dict_with_tied_weights() -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    cache = new_cache()
    check_call(cache, model.state_dict(), replayed=False)
    plan = check_call(cache, model.state_dict(), replayed=True)
    assert len(plan.copies) == 1
    check_call(cache, model.state_dict(keep_vars=True), replayed=False)
    check_call(cache, model.state_dict(keep_vars=True), replayed=True)


# -- what falls back to the full walk -------------------------------------------------------------


def _changes() -> Iterator[tuple[str, Callable[[dict[str, Any]], Any]]]:
    """(name, change): each takes the recorded state dict and returns the one to stage next."""

    def in_place(op: Callable[[torch.Tensor], Any]) -> Callable[[dict[str, Any]], Any]:
        def change(sd: dict[str, Any]) -> Any:
            op(sd["w"])
            return sd

        return change

    def data(make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict[str, Any]], Any]:
        def change(sd: dict[str, Any]) -> Any:
            sd["w"].data = make(sd["w"])
            return sd

        return change

    yield "t_", in_place(lambda w: w.t_())
    yield "unsqueeze_", in_place(lambda w: w.unsqueeze_(0))
    yield "resize_ smaller", in_place(lambda w: w.resize_(2, 3))
    yield "as_strided_", in_place(lambda w: w.as_strided_((3, 3), (1, 3), 2))
    yield "the storage offset alone", lambda sd: {**sd, "p": sd["p"].as_strided_((8,), (1,), 2)}
    yield "set_ another storage", in_place(lambda w: w.set_(torch.randn(4, 6).untyped_storage()))
    yield "set_ a recorded storage", lambda sd: {**sd, "w": sd["v"].view(4, 6)}
    yield ".data = a neg view", data(neg_view)
    yield ".data = a conj view", lambda sd: {**sd, "z": _set_data(sd["z"], sd["z"].conj())}
    yield ".data = another tensor", data(lambda w: torch.randn(4, 6))
    yield "a key renamed", lambda sd: {("x" if k == "w" else k): v for k, v in sd.items()}
    yield "a key added", lambda sd: {**sd, "extra": 1}
    yield "a key removed", lambda sd: {k: v for k, v in sd.items() if k != "n"}
    yield "keys reordered", lambda sd: dict(reversed(sd.items()))
    yield "a key's type", lambda sd: {**{k: v for k, v in sd.items() if k != "n"}, 1: sd["n"]}
    yield "dict -> OrderedDict", collections.OrderedDict
    yield "nested dict -> OrderedDict", lambda sd: {**sd, "n": collections.OrderedDict(sd["n"])}
    yield "tensor -> int", lambda sd: {**sd, "w": 3}
    yield "int -> tensor", lambda sd: {**sd, "i": torch.ones(2)}
    yield "Tensor -> Parameter", lambda sd: {**sd, "w": torch.nn.Parameter(sd["w"])}
    yield "list -> tuple", lambda sd: {**sd, "l": tuple(sd["l"])}
    yield "list longer", lambda sd: {**sd, "l": [*sd["l"], torch.ones(1)]}
    yield "atoms tuple gets a tensor", lambda sd: {**sd, "t": (1, torch.ones(1))}
    yield "a shared list", lambda sd: {**sd, "n": {"a": sd["l"], "b": sd["l"]}}
    yield "atoms lists become one", lambda sd: {**sd, "m2": sd["m"]}
    yield "a tensor in a list of atoms", lambda sd: {**sd, "m": ["x", torch.ones(1)]}
    yield "t_ on a square", lambda sd: {**sd, "q": sd["q"].t_()}
    yield "an attribute on a tensor", lambda sd: {**sd, "w": _with_attribute(sd["w"])}
    yield "an attribute on a dict", lambda sd: _with_attribute(collections.OrderedDict(sd))


def _set_data(x: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    x.data = new
    return x


def _with_attribute(x: Any) -> Any:
    x.note = "hello"
    return x


def _recorded() -> dict[str, Any]:
    return {
        "w": torch.randn(4, 6),
        "v": torch.randn(24),
        "z": torch.randn(3, dtype=torch.complex64),
        "n": {"a": torch.randn(3), "b": 2},
        "l": [torch.randn(2), "x"],
        "t": (1, 2.0),
        "i": 5,
        "q": torch.randn(3, 3),
        "p": torch.randn(10)[:8],  # a part of its storage: it can move
        "m": ["x"],
        "m2": ["x"],
    }


@pytest.mark.parametrize("name", [name for name, _ in _changes()])
def test_a_change_falls_back_to_the_full_walk(name: str) -> None:
    change = dict(_changes())[name]
    cache = new_cache()
    state_dict = _recorded()
    check_call(cache, state_dict, replayed=False)
    check_call(cache, state_dict, replayed=True)
    changed = change(state_dict)
    if name in NEW_STORAGES:
        # A storage never staged before is staged on its own, like a temporary; met again
        # (the swap outlived the call) it makes the walk record the new structure.
        check_call(cache, changed, replayed=True)
    check_call(cache, changed, replayed=False)
    # Recorded again: replayed from now on, unless the recording does not cover it.
    check_call(cache, changed, replayed=name not in UNRECORDABLE)


NEW_STORAGES = {"set_ another storage", ".data = another tensor"}
UNRECORDABLE = {"a shared list", "an attribute on a tensor", "atoms lists become one"}


def _optimizer_state(items: int, *, tied: bool = False) -> dict[str, Any]:
    """``{'state': {i: {'p': tensor, 'q': tensor}}}``: items replayed as a group, in bulk.

    ``tied``: every item holds the same two tensors (so only the items' identity tells a
    dict met twice from two dicts).
    """
    shared = (torch.randn(3), torch.randn(2))
    state = {
        i: {"p": shared[0], "q": shared[1]} if tied else {"p": torch.randn(3), "q": torch.randn(2)}
        for i in range(items)
    }
    return {"state": state, "param_groups": [{"lr": 0.1, "params": list(range(items))}]}


_GROUP_ITEM_CHANGES: dict[str, Callable[[dict[Any, Any]], Any]] = {
    "a key renamed": lambda item: {("r" if k == "p" else k): v for k, v in item.items()},
    "a key of another type": lambda item: {
        (_Key(k) if k == "p" else k): v for k, v in item.items()
    },
    "keys reordered": lambda item: dict(reversed(item.items())),
    "a key added": lambda item: {**item, "extra": 1},
    "dict -> OrderedDict": collections.OrderedDict,
    "a tensor -> an int": lambda item: {**item, "q": 3},
}


@pytest.mark.parametrize("items", [4, 3 * BULK_STEP])  # built in one go, and in steps
@pytest.mark.parametrize("name", [*_GROUP_ITEM_CHANGES, "one dict at two keys"])
def test_a_changed_group_item_falls_back(name: str, items: int) -> None:
    """Each check of a group's items, on the one item that changed; the others still match."""
    cache = new_cache()
    state_dict = _optimizer_state(items, tied=name == "one dict at two keys")
    check_call(cache, state_dict, replayed=False)
    root = _recording(cache).root
    assert root.children[0].group is not None
    check_call(cache, state_dict, replayed=True, track_leaves=True)
    state = dict(state_dict["state"])
    last = items - 1
    if name == "one dict at two keys":
        state[last] = state[last - 1]
    else:
        state[last] = _GROUP_ITEM_CHANGES[name](state[last])
    changed = {**state_dict, "state": state}
    plan = check_call(cache, changed, replayed=False, track_leaves=True)
    assert _typed_paths(plan) == _typed_paths(stage(new_cache(), changed, track_leaves=True))


def test_large_containers_of_tensors_are_replayed_in_steps() -> None:
    """A Module.state_dict() (an OrderedDict with ``_metadata``), a list and an optimizer's
    state, each too large to build in one go: replayed in bulk, in steps, like the walk."""
    count = 3 * BULK_STEP
    model: Any = collections.OrderedDict((f"w{i}", torch.randn(2)) for i in range(count))
    model._metadata = {"": {"version": 1}}
    state_dict = {
        "model": model,
        "tensors": [torch.randn(3) for _ in range(count)],
        "optim": _optimizer_state(count),
    }
    cache = new_cache()
    check_call(cache, state_dict, replayed=False)
    plan = check_call(cache, state_dict, replayed=True, track_leaves=True)
    assert plan.steps >= 4 * count // BULK_STEP  # type: ignore[attr-defined]
    assert _typed_paths(plan) == _typed_paths(stage(new_cache(), state_dict, track_leaves=True))
    changed = {**state_dict, "tensors": [*state_dict["tensors"][:-1], 5]}
    check_call(cache, changed, replayed=False)


def test_a_storage_resized_in_place_is_still_refused() -> None:
    cache = new_cache()
    state_dict = {"w": torch.randn(8), "v": torch.randn(3)}
    stage(cache, state_dict)
    stage(cache, state_dict)
    state_dict["w"].resize_(100)
    with pytest.raises(BufferMismatchError):
        stage(cache, state_dict)


def test_a_storage_resized_under_an_unchanged_tensor_is_refused() -> None:
    """The tensor's own metadata still matches: only the storage's size tells."""
    cache = new_cache()
    state_dict = {"w": torch.randn(8), "v": torch.randn(3)}
    stage(cache, state_dict)
    assert stage(cache, state_dict).replayed
    state_dict["w"].untyped_storage().resize_(64)
    with pytest.raises(BufferMismatchError):
        stage(cache, state_dict)


def test_a_mismatch_midway_copies_no_storage_twice() -> None:
    """Copies found before the mismatch are handed to the walk, which does not copy them again."""
    count = 4 * CHUNK
    state_dict: dict[str, Any] = {f"t{i}": torch.full((4,), float(i)) for i in range(count)}
    cache = new_cache()
    stage(cache, state_dict)
    late = f"t{count - 3}"
    state_dict[late] = state_dict[late].t_() if False else state_dict[late].unsqueeze_(0)
    mutate_(state_dict)
    plan = check_call(cache, state_dict, replayed=False)
    assert len(plan.copies) == count
    # The walk reached the tensors the replay had copied through the alias path, and shares
    # their copies; every staged tensor is on the buffer of its own source.
    assert plan.tensors == count


@pytest.mark.parametrize("change", ["temporary", "unsqueeze_", "Parameter"])
def test_a_miss_after_checked_copies_were_handed_out(change: str) -> None:
    """Many small tensors of their own storages: each checked step's copies reach the plan at
    once; a tensor that differs in a later step leaves them there, each copied exactly once."""
    count = 3 * BULK_STEP
    state_dict: dict[str, Any] = {f"t{i}": torch.full((2,), float(i)) for i in range(count)}
    cache = new_cache()
    stage(cache, state_dict)
    assert _recording(cache).one_to_one
    late = f"t{count - 5}"
    if change == "temporary":
        state_dict[late] = torch.randn(3)  # a new storage: staged on its own
    elif change == "unsqueeze_":
        state_dict[late].unsqueeze_(0)  # in place over a recorded storage: walked in full
    else:
        state_dict[late] = torch.nn.Parameter(state_dict[late])
    mutate_(state_dict)
    plan = check_call(cache, state_dict, replayed=change == "temporary", track_leaves=True)
    assert len(plan.copies) == count
    assert plan.tensors == count == len(plan.leaves)


def test_a_large_replay_yields_to_the_driver() -> None:
    state_dict = {"state": {i: {"a": torch.ones(2), "b": torch.ones(2)} for i in range(500)}}
    cache = new_cache()
    first = stage(cache, state_dict)
    again = stage(cache, state_dict)
    assert again.replayed
    assert again.steps >= 1000 // CHUNK - 1  # type: ignore[attr-defined]
    assert first.steps >= 1  # type: ignore[attr-defined]


def test_no_step_reads_every_buffer_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Recording and replaying work in steps: a step that read every buffer's view or size held
    the loop 5-30 ms over 50,000 tensors, and one that put every buffer's device in a set
    11.7 ms. Counted by wrapping the buffers' slots, and their devices' hashes, per step."""
    reads = [0]

    class CountedDevice:
        """A buffer's device, counting the hashes taken of it (a set's work per item)."""

        def __init__(self, device: torch.device) -> None:
            self.device = device

        def __hash__(self) -> int:
            reads[0] += 1
            return hash(self.device)

        def __eq__(self, other: object) -> bool:
            return isinstance(other, CountedDevice) and other.device == self.device

        def __getattr__(self, name: str) -> Any:
            return getattr(self.device, name)

    def counted(name: str) -> property:
        slot = HostBuffer.__dict__[name]

        def get(buffer: HostBuffer) -> Any:
            reads[0] += 1
            value = slot.__get__(buffer, HostBuffer)
            return CountedDevice(value) if name == "device" else value

        return property(get, slot.__set__)

    monkeypatch.setattr(HostBuffer, "view", counted("view"))
    monkeypatch.setattr(HostBuffer, "nbytes", counted("nbytes"))
    monkeypatch.setattr(HostBuffer, "device", counted("device"))
    tensors = 3000
    state_dict = {"state": {i: {"a": torch.ones(2)} for i in range(tensors)}}
    cache = new_cache()
    for call in range(2):
        plan = Plan()
        most = reads[0] = 0
        for _ in walk_or_replay(cache, state_dict, plan):
            most, reads[0] = max(most, reads[0]), 0
        most = max(most, reads[0])
        assert plan.replayed == (call == 1)
        assert most <= 2 * BULK_STEP, (call, most)
        for batch in make_batches(plan.copies, 0, len(plan.copies), 1 << 20):
            run_host_batch(batch)
    assert torch.equal(plan.result["state"][5]["a"], torch.ones(2))


def test_recording_a_long_list_of_atoms_yields() -> None:
    """An optimizer's 25,000 param ids were recorded in one step (50-170 ms of loop), and a
    second pass over a long dict's keys or a long tuple's items made a long step of its own:
    the first call, which records as it walks, yields every few dozen atoms."""
    for atoms in (list(range(3000)), tuple(range(3000)), dict.fromkeys(range(3000), 1.0)):
        state_dict = {"params": atoms, "t": torch.ones(1)}
        cache = new_cache()
        first = stage(cache, state_dict)
        assert first.steps >= 3000 // CHUNK  # type: ignore[attr-defined]
        assert cache.replays  # recorded on the way
        replayed = stage(cache, state_dict)
        assert replayed.replayed
        assert replayed.result["params"] == atoms
    # Replayed, a long list of atoms is checked in steps too.
    replay_steps: list[int] = []
    for length in (0, 20_000):
        state_dict = {"params": list(range(length)), "t": torch.ones(1)}
        cache = new_cache()
        stage(cache, state_dict)
        replay_steps.append(stage(cache, state_dict).steps)  # type: ignore[attr-defined]
    assert replay_steps[1] - replay_steps[0] >= 20_000 // EMPTY_STEP


def _node_fields(node: Any) -> Any:
    """A recorded node as plain values, its children's nodes included."""
    if node is None or type(node) is int:
        return node
    fields = {name: getattr(node, name) for name in type(node).__slots__ if name != "children"}
    if fields.get("group") is not None:  # where its kept dicts go: each group its own place
        fields["group"] = fields["group"]._replace(items_at=None)
    return type(node).__name__, fields, [_node_fields(child) for child in node.children]


def _driven(walk: Any) -> Any:
    """The value a recorder's generator returns, driven to its end."""
    while True:
        try:
            next(walk)
        except StopIteration as stop:
            return stop.value


@pytest.mark.parametrize("count", [0, 1, 2, 3, SMALL_CONTAINER - 1, SMALL_CONTAINER])
def test_small_containers_are_recorded_as_in_steps(count: int) -> None:
    """A container of at most SMALL_CONTAINER items is recorded at once (the common dict of a
    parameter's optimizer state, 16,000 of them in a first call): it must give the very node
    the stepped recording gives, for every kind of children."""
    recorder = ReplayRecorder(new_cache())
    item = recorder.small_mapping(dict, {"a": 0, "b": 0}, [7, 8], None)
    children_kinds: dict[str, list[Any]] = {
        "leaves in a row": list(range(10, 10 + count)),
        "leaves out of order": list(range(10 + count, 10, -1)),
        "atoms": [None] * count,
        "atoms and leaves": [None if i % 2 else 10 + i for i in range(count)],
        "nodes": [item] * count,
        "a group": [
            recorder.small_mapping(dict, {"a": 0, "b": 0}, [2 * i, 2 * i + 1], None)
            for i in range(count)
        ],
    }
    for kind, children in children_kinds.items():
        x = {f"k{i}": None for i in range(len(children))}
        at_once = recorder.small_mapping(dict, x, children, None)
        stepped = _driven(recorder.mapping(dict, x, children, None))
        assert _node_fields(at_once) == _node_fields(stepped), kind
        listed = recorder.small_sequence(children)
        assert _node_fields(listed) == _node_fields(_driven(recorder.sequence(children))), kind
    assert recorder.small_mapping(dict, {}, [], None).span is None


def test_containers_on_both_sides_of_the_small_size_are_replayed() -> None:
    """Optimizer states whose per-parameter dicts, and lists, hold just under, at and just over
    SMALL_CONTAINER tensors: recorded by either path, replayed, equal to a fresh stage."""
    for width in (SMALL_CONTAINER - 1, SMALL_CONTAINER, SMALL_CONTAINER + 1):
        state_dict = {
            "state": {p: {f"m{j}": torch.randn(2) for j in range(width)} for p in range(3)},
            "lists": [[torch.randn(1) for _ in range(width)] for _ in range(2)],
        }
        cache = new_cache()
        check_call(cache, state_dict, replayed=False)
        plan = check_call(cache, state_dict, replayed=True, track_leaves=True)
        assert _typed_paths(plan) == _typed_paths(stage(new_cache(), state_dict, track_leaves=True))


def test_empty_in_steps_frees_a_few_thousand_entries_a_step() -> None:
    table = {i: object() for i in range(10_000)}
    items = list(range(5000))
    ids = set(range(1000, 7000))
    sizes = [(len(table), len(items) + len(ids)) for _ in empty_in_steps(table, items, ids)]
    assert not table
    assert not items
    assert not ids
    assert len(sizes) >= 10_000 // EMPTY_STEP + 11_000 // EMPTY_STEP - 1
    totals = [a + b for a, b in sizes]
    assert all(b - a <= EMPTY_STEP for a, b in zip(totals[1:], totals, strict=False))


@pytest.mark.parametrize("views", [False, True])
def test_a_replay_is_dropped_with_its_per_tensor_lists_already_emptied(
    monkeypatch: pytest.MonkeyPatch, views: bool
) -> None:
    """The replay's per-tensor lists (copy indices, views, the ids of the containers met) were
    freed when the replay was dropped, in the call's last step: 2.4-3.2 ms of loop over 50,000
    tensors. They are emptied in steps before (:meth:`Replay.release`)."""
    left: list[dict[str, int]] = []
    close = Replay.close

    def measured(replay: Replay) -> None:
        # Not the replay's own: the recording's lists (kept for later calls), and the plan's
        # copies (the driver empties those in steps).
        shared = {id(value) for value in vars(replay._rec).values()}
        copies = replay._plan.copies
        shared |= {id(value) for value in (*copies.lists(), copies.devices)}
        left.append(
            {
                name: len(value)
                for name, value in vars(replay).items()
                if isinstance(value, (list, dict, set)) and id(value) not in shared
            }
        )
        close(replay)

    monkeypatch.setattr(Replay, "close", measured)
    state_dict: dict[str, Any] = {"state": {}}
    for i in range(3000):
        a = torch.ones(2)
        # With views, storages are shared: the copies are listed apart from the leaves.
        state_dict["state"][i] = {"a": a, "b": a[1:] if views else torch.ones(2)}
    cache = new_cache()
    stage(cache, state_dict)
    for track_leaves in (False, True):
        assert stage(cache, state_dict, track_leaves=track_leaves).replayed
        (sizes,) = left
        assert {name: size for name, size in sizes.items() if size > 1} == {}, sizes
        left.clear()


# -- temporaries ---------------------------------------------------------------------------------


def test_a_temporary_tensor_does_not_stop_the_replay() -> None:
    """An RNG state made fresh each call is staged on its own; the rest is replayed."""
    model = _model()
    cache = new_cache()

    def checkpoint() -> dict[str, Any]:
        return {"model": model.state_dict(), "rng": torch.get_rng_state(), "step": 3}

    check_call(cache, checkpoint(), replayed=False)
    for _ in range(3):
        torch.randn(3)  # moves the RNG state
        state_dict = checkpoint()
        plan = check_call(cache, state_dict, replayed=True, track_leaves=True)
        assert torch.equal(plan.result["rng"], state_dict["rng"])
        assert plan.new_buffers == 1
        assert len(plan.leaves) == plan.tensors == len(model.state_dict()) + 1
        del plan, state_dict
        gc.collect()
    # The temporaries' buffers went with their sources: the cache and the recording hold none.
    assert cache.info().storages == len(model.state_dict())


def test_a_temporary_shared_by_two_keys_is_copied_once() -> None:
    cache = new_cache()
    recorded = torch.randn(6)
    state_dict = {"a": torch.randn(4), "tmp": recorded, "tmp_view": recorded[2:]}
    check_call(cache, state_dict, replayed=False)
    temporary = torch.randn(6)
    changed = {**state_dict, "tmp": temporary, "tmp_view": temporary[2:]}
    plan = check_call(cache, changed, replayed=True)
    assert len(plan.copies) == 2


def _replay_with_a_death(step: int, *, one_dead: bool) -> tuple[Plan, dict[str, Any], int]:
    """A replay during which, after ``step`` of its steps, a recorded temporary dies; with
    ``one_dead``, another one died before the call began (its tensor staged on its own)."""
    cache = new_cache()
    weights = [torch.randn(3) for _ in range(BULK_STEP + 1)]  # two bulk steps
    doomed = [torch.randn(5)]  # the only reference: dropped mid-call
    doomed_ref = weakref.ref(doomed[0])
    others = {"seed": torch.randn(2)} if one_dead else {}
    stage(cache, {"w": weights, "rng": doomed[0], **others})
    others = {"seed": torch.randn(2)} if one_dead else {}  # the first "seed" dies here
    state_dict = {"w": weights, "rng": torch.randn(5), **others}
    assert _recording(cache).dead == one_dead
    plan = Plan(track_leaves=False)
    steps = 0
    for _ in walk_or_replay(cache, state_dict, plan):
        steps += 1
        if steps == step:
            doomed.clear()  # reference counts free it: no full collection at every step
            assert doomed_ref() is None, "something else holds the temporary"
    assert not doomed or step == 0, "the temporary outlived the call"
    for batch in make_batches(plan.copies, 0, len(plan.copies), 1 << 20):
        run_host_batch(batch)
    return plan, state_dict, steps


@pytest.mark.parametrize("one_dead", [False, True])
def test_a_recorded_temporary_that_dies_during_a_replay(one_dead: bool) -> None:
    """Whichever step it dies at: the call stages like a fresh cache (it was counted as alive
    when the replay began, then its slot emptied under the replay)."""
    _, _, steps = _replay_with_a_death(0, one_dead=one_dead)
    for step in range(1, steps + 1):
        plan, state_dict, _ = _replay_with_a_death(step, one_dead=one_dead)
        assert_same_staging(plan.result, fresh(state_dict), state_dict)


# -- the cache and the recording ---------------------------------------------------------------


def _recording(cache: BufferCache) -> Recording:
    (recording,) = cache.replays
    return recording  # type: ignore[no-any-return]


def test_a_dead_source_leaves_no_buffer_in_the_recording() -> None:
    cache = new_cache()
    state_dict = {"keep": torch.randn(4), "drop": torch.randn(1000)}
    stage(cache, state_dict)
    recording = _recording(cache)
    buffer = cache.get(state_dict["drop"].untyped_storage())
    assert buffer is not None and any(slot is buffer for slot in recording.slots)
    del state_dict["drop"], buffer
    gc.collect()
    assert sum(slot is not None for slot in recording.slots) == 1
    check_call(cache, {"keep": state_dict["keep"], "drop": torch.randn(1000)}, replayed=True)


def test_clear_drops_the_recordings() -> None:
    cache = new_cache()
    state_dict = {"w": torch.randn(4)}
    stage(cache, state_dict)
    assert cache.replays
    cache.clear()
    assert not cache.replays
    check_call(cache, state_dict, replayed=False)


def test_a_few_state_dicts_alternating_are_each_replayed() -> None:
    cache = new_cache()
    model, optim = {"w": torch.randn(4)}, {"state": {0: {"m": torch.randn(4)}}}
    check_call(cache, model, replayed=False)
    check_call(cache, optim, replayed=False)
    for _ in range(2):
        check_call(cache, model, replayed=True)
        check_call(cache, optim, replayed=True)


def test_unrecordable_structures_back_off() -> None:
    """A structure the recording does not cover is not recorded again on every call."""
    cache = new_cache()
    state_dict = {"w": torch.randn(4), "s": {1, 2}}
    check_call(cache, state_dict, replayed=False)
    assert not cache.replays and cache.record_backoff > 0
    check_call(cache, state_dict, replayed=False)


@dataclasses.dataclass
class _Holder:
    tensor: torch.Tensor


class _Pair(NamedTuple):
    a: torch.Tensor
    b: int


class _Tagged(torch.Tensor):
    pass


class _Owner:
    def method(self) -> None:
        pass


def _unrecordable(kind: str) -> Any:
    """A state dict holding one thing a recording does not cover, beside what it does."""
    shared = [torch.randn(2)]
    tagged = torch.randn(2)
    tagged.tag = "x"  # type: ignore[attr-defined]
    kinds: dict[str, dict[Any, Any]] = {
        "a set": {"s": {1, 2}},
        "an object": {"o": _Holder(torch.randn(2))},
        "a namedtuple": {"p": _Pair(torch.randn(2), 1)},
        "a list met twice": {"x": shared, "y": shared},
        "a dict met twice": {"x": {"t": shared[0]}, "y": [1]},
        "a key that is not atomic": {(1, 2): torch.randn(2)},
        "a tensor subclass": {"t": torch.randn(2).as_subclass(_Tagged)},
        "a tensor with attributes": {"t": tagged},
        "a bound method": {"m": _Owner().method},
    }
    return kinds[kind] | {"w": torch.randn(4)}


@pytest.mark.parametrize(
    "kind",
    [
        "a set",
        "an object",
        "a namedtuple",
        "a list met twice",
        "a dict met twice",
        "a key that is not atomic",
        "a tensor subclass",
        "a tensor with attributes",
        "a bound method",
    ],
)
def test_a_walk_that_meets_what_a_recording_cannot_hold_records_nothing(kind: str) -> None:
    """The walk records as it goes and stops at the first thing a recording does not cover
    (a recording that covered it wrongly would fail its check and walk in full every call)."""
    state_dict = _unrecordable(kind)
    if kind == "a dict met twice":
        state_dict["y"] = state_dict["x"]
    cache = new_cache()
    assert not stage(cache, state_dict).replayed
    assert not cache.replays and cache.record_backoff > 0


def test_leaves_under_instance_attributes_are_replayed_at_their_attribute_paths() -> None:
    """A tensor in a dict's instance attributes: the replay's leaf has the walk's path."""
    state_dict: Any = collections.OrderedDict(w=torch.randn(3))
    state_dict.extra = {"t": torch.randn(2)}
    cache = new_cache()
    walked = stage(cache, state_dict, track_leaves=True)
    replayed = stage(cache, state_dict, track_leaves=True)
    assert replayed.replayed
    assert [leaf.path for leaf in replayed.leaves] == [leaf.path for leaf in walked.leaves]
    assert any(isinstance(part, Attr) for leaf in walked.leaves for part in leaf.path)


def test_leaves_of_a_replay_match_the_walk() -> None:
    """What ``stage_iter`` reads: every tensor's path, staged tensor and last copy."""
    cache = new_cache()
    state_dict = model_state_dict()
    walked = stage(cache, state_dict, track_leaves=True)
    replayed = check_call(cache, state_dict, replayed=True, track_leaves=True)
    assert sorted(leaf.path for leaf in replayed.leaves) == sorted(
        leaf.path for leaf in walked.leaves
    )
    for leaf in replayed.leaves:
        assert leaf.last_copy < len(replayed.copies)
        buffer = replayed.copies.buffers[leaf.last_copy]
        assert leaf.tensor.untyped_storage().data_ptr() == buffer.storage.data_ptr()


# -- the faces ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", DRIVERS)
def test_the_faces_replay(kind: str) -> None:
    driver = Driver(kind)
    try:
        stager: Any = driver.stager
        model = _model()
        driver.stage(model.state_dict())
        replays = stager._cache.replays
        assert len(replays) == 1
        state_dict = model.state_dict()
        mutate_(state_dict)
        staged = driver.stage(state_dict)
        assert_same_staging(staged, fresh(state_dict), state_dict)
        assert stager._cache.replays[0] is replays[0]  # the recording was used, not replaced
    finally:
        driver.close()


@pytest.mark.parametrize("kind", DRIVERS)
def test_with_replay_off_every_call_walks_and_records_nothing(kind: str) -> None:
    driver = Driver(kind, replay=False)
    try:
        stager: Any = driver.stager
        model = _model()
        for _ in range(3):
            state_dict = model.state_dict()
            staged = driver.stage(state_dict)
            assert_same_staging(staged, fresh(state_dict), state_dict)
            assert stager._cache.replays == ()
            mutate_(state_dict)
    finally:
        driver.close()


def test_a_cache_that_records_nothing_walks_every_call() -> None:
    cache = BufferCache(pin_memory=False, share_memory=False, pin_memory_min_bytes=0, record=False)
    state_dict = model_state_dict()
    for _ in range(3):
        check_call(cache, state_dict, replayed=False)
        assert cache.replays == ()
        mutate_(state_dict)


def test_compat_replays() -> None:
    stager = compat.StateDictStager()
    try:
        model = _model()
        stager.stage(model.state_dict())
        state_dict = model.state_dict()
        mutate_(state_dict)
        staged = stager.stage(state_dict)
        assert_same_staging(staged, fresh(state_dict), state_dict)
    finally:
        stager.close()


# -- the property: any change between calls, replayed or walked, stages what a fresh cache does --

hypothesis = pytest.importorskip("hypothesis")  # not on the GPU machines
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_DTYPES = [torch.float32, torch.complex64, torch.int16, torch.float64]
_KINDS = ["whole", "same", "slice", "strided", "bytes", "conj", "neg", "param"]
_CHANGES = [
    "rebuild",
    "swap storage",
    "set_",
    "resize_",
    "unsqueeze_",
    ".data = conj",
    ".data = neg",
    "rename",
    "add",
    "remove",
    "ordered",
    "to int",
    "share list",
    "same object",
    "temporary",
    "t_",
    "tensor among atoms",
    "group item",
]


class _Key(str):
    """A key equal to a recorded ``str`` key, of another type."""

    __slots__ = ()


class Scenario:
    """Base tensors, and leaves over them placed in containers: rebuilt on every ``make()``."""

    def __init__(self, bases: list[torch.Tensor], leaves: list[tuple[int, str, str]]) -> None:
        self.bases = bases
        self.leaves = leaves  # (base, kind, container)
        self.keys = [f"k{i}" for i in range(len(leaves))]
        self.extra: dict[str, Any] = {}
        self.ordered = False
        self.same: Any = None
        self.atoms: tuple[list[Any], list[Any]] = (["a"], ["a"])
        self.item_change: tuple[int, int] | None = None  # (variant, which item)

    def leaf(self, base: int, kind: str) -> torch.Tensor:
        x = self.bases[base]
        flat = x.detach().reshape(-1) if x.is_contiguous() else x.detach()
        if kind == "same":
            return x
        if kind == "slice" and x.dim() == 1 and x.numel() > 1:
            return x.detach()[1:]
        if kind == "strided" and x.dim() == 1 and x.numel() >= 4:
            return x.detach().as_strided((2, x.numel() // 2), (1, 2))
        bytes_ok = x.is_contiguous() and not x.is_neg() and not x.is_conj()
        if kind == "bytes" and x.dtype.itemsize >= 2 and bytes_ok:
            return flat.view(torch.uint8)[1:]
        if kind == "conj" and x.is_complex():
            return x.detach().conj()
        if kind == "neg":
            return neg_view(x.detach())
        if kind == "param" and x.is_floating_point():
            return torch.nn.Parameter(x.detach(), requires_grad=x.numel() % 2 == 0)
        return x.detach()

    def make(self) -> Any:
        top: dict[Any, Any] = collections.OrderedDict() if self.ordered else {}
        for key, (base, kind, container) in zip(self.keys, self.leaves, strict=True):
            if key is None:
                continue
            x: Any = self.leaf(base, kind)
            if container == "dict":
                x = {"x": x, "a": 1}
            elif container == "list":
                x = [x, 2]
            elif container == "tuple":
                x = (x, "s")
            elif container == "group":  # like dicts of tensors only: an optimizer's state
                partner = self.bases[(base + 1) % len(self.bases)].detach()
                top.setdefault("state", {})[key] = {"p": x, "q": partner}
                continue
            top[key] = x
        if self.item_change is not None and len(top.get("state", ())) >= 2:
            self._change_item(top["state"], *self.item_change)
        top["n"] = 7
        top["t"] = (1, 2.0)
        top.update(self.extra)
        if self.same is not None:
            top["same1"] = top["same2"] = self.same
        top["atoms1"], top["atoms2"] = self.atoms
        return top

    def _change_item(self, state: dict[str, Any], variant: int, pick: int) -> None:
        """One item of the group changed in a way only a look at that item can tell."""
        keys = list(state)
        key = keys[pick % len(keys)]
        item = state[key]
        if variant == 0:
            state[key] = {"r" if k == "p" else k: v for k, v in item.items()}
        elif variant == 1:
            state[key] = collections.OrderedDict(item)
        elif variant == 2:
            item["extra"] = 1
        elif variant == 3:
            state[keys[(pick + 1) % len(keys)]] = item  # one dict at two keys
        elif variant == 4:
            state[key] = {(_Key(k) if k == "p" else k): v for k, v in item.items()}
        else:
            state[key] = dict(reversed(item.items()))

    def change(self, change: str, pick: int) -> None:
        bases = self.bases
        i = pick % len(bases)
        x = bases[i]
        if change == "swap storage":
            bases[i] = x.clone()
        elif change == "set_":
            other = next((b for b in bases if b is not x and b.dtype == x.dtype), None)
            if other is not None:
                x.set_(other.untyped_storage(), other.storage_offset(), other.shape, other.stride())
        elif change == "resize_" and x.dim() == 1 and x.numel() > 1:
            x.resize_(x.numel() - 1)
        elif change == "unsqueeze_":
            x.unsqueeze_(0)
        elif change == ".data = conj" and x.is_complex():
            x.data = x.detach().conj()
        elif change == ".data = neg":
            x.data = neg_view(x.detach())
        elif change == "rename":
            self.keys[pick % len(self.keys)] = f"renamed{pick}"
        elif change == "add":
            self.extra[f"added{pick}"] = torch.ones(2) if pick % 2 else "value"
        elif change == "remove":
            self.keys[pick % len(self.keys)] = None  # type: ignore[call-overload]
        elif change == "ordered":
            self.ordered = not self.ordered
        elif change == "to int":
            self.extra[self.keys[pick % len(self.keys)] or "n"] = 3
        elif change == "share list":
            self.atoms = (self.atoms[0], self.atoms[0])
        elif change == "tensor among atoms":
            self.atoms[1].append(x)
        elif change == "t_" and x.dim() == 2:
            x.t_()
        elif change == "same object":
            self.same = x
        elif change == "group item":
            self.item_change = (pick % 6, pick // 6)
        elif change == "temporary":
            self.extra["rng"] = torch.randint(0, 255, (pick % 7 + 1,), dtype=torch.uint8)

    def scramble(self) -> None:
        """New bytes in every source storage: each call must copy again."""
        for base in self.bases:
            storage = base.untyped_storage()
            if storage.nbytes():
                bytes_of(storage).random_(0, 256)


_PROPERTY = derandomized("ASTAGE_REPLAY_EXAMPLES", 150)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Scenario, list[tuple[str, int]]]:
    shapes = st.one_of(st.tuples(st.integers(1, 12)), st.integers(2, 3).map(lambda n: (n, n)))
    bases = [
        torch.empty(draw(shapes), dtype=draw(st.sampled_from(_DTYPES)))
        for _ in range(draw(st.integers(1, 4)))
    ]
    leaves = draw(
        st.lists(
            st.tuples(
                st.integers(0, len(bases) - 1),
                st.sampled_from(_KINDS),
                st.sampled_from(["none", "dict", "list", "tuple", "group"]),
            ),
            min_size=1,
            max_size=8,
        )
    )
    changes = draw(
        st.lists(st.tuples(st.sampled_from(_CHANGES), st.integers(0, 20)), min_size=0, max_size=3)
    )
    scenario = Scenario(bases, leaves)
    scenario.scramble()
    return scenario, changes


@_PROPERTY
@given(scenarios())
def test_any_change_between_calls_stages_like_a_fresh_cache(
    case: tuple[Scenario, list[tuple[str, int]]],
) -> None:
    scenario, changes = case
    cache = new_cache()
    check_call(cache, scenario.make(), replayed=False)
    state_dict = scenario.make()
    scenario.scramble()
    plan = check_call(cache, state_dict, replayed=True, track_leaves=True)
    for change, pick in changes:
        scenario.change(change, pick)
    for _ in range(2):  # the changed call, then the one after it (recorded again)
        scenario.scramble()
        state_dict = scenario.make()
        plan = stage(cache, state_dict, track_leaves=True)
        walked = stage(new_cache(), state_dict, track_leaves=True)
        assert_same_staging(plan.result, walked.result, state_dict)
        assert _typed_paths(plan) == _typed_paths(walked)
        assert len(plan.copies) == len({id(b) for b in plan.copies.buffers})
        assert plan.tensors == len(plan.leaves)
    if not changes:
        assert plan.replayed


def _staged_tensors(result: Any) -> list[torch.Tensor]:
    """Every tensor in a staged result (as many as the scenario's containers hold)."""
    found: list[torch.Tensor] = []
    stack = [result]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            found.append(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return found


def _requires_grad(t: torch.Tensor) -> None:
    if t.is_floating_point() or t.is_complex():
        t.requires_grad_()


def _give_a_grad(t: torch.Tensor) -> None:
    if t.is_floating_point() or t.is_complex():
        t.grad = torch.zeros_like(t)


def _set_elsewhere(t: torch.Tensor) -> None:
    elsewhere = t.detach().clone()
    t.set_(elsewhere.untyped_storage(), 0, elsewhere.shape, elsewhere.stride())


_KEPT_WEAKLY: list[Any] = []

CHANGES_BY_A_HOLDER: dict[str, Callable[[torch.Tensor], Any]] = {
    "none": lambda t: None,
    "requires_grad_": _requires_grad,
    "t_": lambda t: t.t_() if t.dim() <= 2 else None,
    "unsqueeze_": lambda t: t.unsqueeze_(0),
    "set_": _set_elsewhere,
    "data": lambda t: setattr(t, "data", t.detach().clone()),
    "grad": _give_a_grad,
    "attribute": lambda t: setattr(t, "note", "mine"),
    "weak reference": lambda t: _KEPT_WEAKLY.append(weakref.ref(t)),
}


def _add_a_key(item: dict[str, Any]) -> None:
    item["extra"] = torch.ones(1)


def _drop_a_key(item: dict[str, Any]) -> None:
    item.pop("p", None)


def _reorder(item: dict[str, Any]) -> None:
    for key in list(item)[:1]:
        item[key] = item.pop(key)


DICT_CHANGES_BY_A_HOLDER: dict[str, Callable[[dict[str, Any]], None]] = {
    "none": lambda item: None,
    "add a key": _add_a_key,
    "drop a key": _drop_a_key,
    "reorder": _reorder,
    "clear": dict.clear,
}


def _change_each(items: list[Any], change: Callable[[Any], None]) -> None:
    """In a frame of its own: no loop variable left holding the last one."""
    for item in items:
        change(item)


def _check_handed_out(cache: BufferCache, tensors: list[torch.Tensor]) -> None:
    for t in tensors:
        assert t.grad is None and not t.__dict__ and not weakref.getweakrefcount(t)
        buffer = cache.get(t.untyped_storage())
        assert buffer is None or buffer.storage.data_ptr() == t.untyped_storage().data_ptr()


def _structure(x: Any) -> Any:
    """A result's containers and tensors by identity, with the keys and values they hold."""
    if isinstance(x, torch.Tensor):
        return id(x)
    if isinstance(x, dict):
        return id(x), [(key, _structure(value)) for key, value in x.items()]
    if isinstance(x, (list, tuple)):
        return id(x), [_structure(value) for value in x]
    return x


def _containers(result: Any) -> list[Any]:
    found: list[Any] = []
    stack = [result]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            found.append(x)
            stack.extend(x.values())
        elif isinstance(x, list):
            found.append(x)
            stack.extend(x)
        elif isinstance(x, tuple):
            stack.extend(x)
    return found


@_PROPERTY
@given(
    scenarios(),
    st.lists(
        st.tuples(
            st.sampled_from(["drop", "hold", "hold an item"]),
            st.sampled_from(list(CHANGES_BY_A_HOLDER)),
            st.integers(0, 50),
            st.sampled_from(list(DICT_CHANGES_BY_A_HOLDER)),
        ),
        min_size=4,
        max_size=8,
    ),
)
def test_results_held_dropped_or_changed_by_their_holders_stay_apart(
    case: tuple[Scenario, list[tuple[str, int]]], calls: list[tuple[str, str, int, str]]
) -> None:
    """Staged tensors and dicts handed out again (see ``_reuse``) never show: whatever the
    caller did with earlier results (kept some, or one item dict of them, dropped others,
    changed a staged tensor in place, gave it a ``.grad``, an attribute or a weak reference,
    added, dropped or reordered the keys of item dicts, then dropped them), and whatever
    changed in the source on the way, every call stages what a fresh cache does, shares no
    tensor or container with what is still held, and leaves what is held as it was."""
    scenario, changes = case
    cache = new_cache()
    held: list[Any] = []
    held_as_it_was: list[Any] = []
    for call, (keep, change, pick, dict_change) in enumerate(calls):
        if call == 4:  # after a few calls that may hand out tensors again
            for source_change, where in changes:
                scenario.change(source_change, where)
        scenario.scramble()
        state_dict = scenario.make()
        result = stage(cache, state_dict).result
        assert_same_staging(result, fresh(state_dict), state_dict)
        tensors = _staged_tensors(result)
        ids = set(map(id, tensors))
        assert not any(ids & set(map(id, _staged_tensors(earlier))) for earlier in held)
        containers = set(map(id, _containers(result)))
        assert not any(containers & set(map(id, _containers(earlier))) for earlier in held)
        assert [_structure(earlier) for earlier in held] == held_as_it_was
        _check_handed_out(cache, tensors)
        with torch.no_grad():  # a staged Parameter may require grad
            _change_each(tensors[pick % 2 :: 2], CHANGES_BY_A_HOLDER[change])  # half, or the one
        del tensors
        items = list(result.get("state", {}).values())
        _change_each(items[pick % 2 :: 2], DICT_CHANGES_BY_A_HOLDER[dict_change])
        if keep == "hold":
            held.append(result)
        elif keep == "hold an item" and items:
            held.append(items[pick % len(items)])
        held_as_it_was = [_structure(earlier) for earlier in held]
        del result, items
        if pick % 3 == 0:  # as the compat pool asks before it stages into a set
            assert cache.in_use() == _on_a_buffer(cache, held)
        _KEPT_WEAKLY[:] = [ref for ref in _KEPT_WEAKLY if ref() is not None]
    _KEPT_WEAKLY.clear()


def _on_a_buffer(cache: BufferCache, held: list[Any]) -> bool:
    """Whether a tensor in ``held`` still reaches one of the cache's buffers: on its storage,
    or through the base it is a view of (``_base``), which a view keeps even once ``set_()``
    moved it onto other memory."""
    storages = {buffer.whole.untyped_storage()._cdata for buffer in cache._buffers()}
    return any(
        t.untyped_storage()._cdata in storages
        for earlier in held
        for staged in _staged_tensors(earlier)
        for t in _with_bases(staged)
    )


def _with_bases(t: torch.Tensor) -> list[torch.Tensor]:
    """``t`` and the chain of tensors it is a view of."""
    chain = [t]
    while chain[-1]._base is not None:
        chain.append(chain[-1]._base)
    return chain


def _typed_paths(plan: Plan) -> list[str]:
    """The paths ``stage_iter`` hands out, with the type of every key (1, 1.0 and True differ)."""
    return sorted(repr([(type(key).__name__, key) for key in leaf.path]) for leaf in plan.leaves)


def test_a_mismatch_keeps_no_source_alive() -> None:
    """A replay that gives up holds nothing of the call (no traceback kept with the sources)."""
    cache = new_cache()
    state_dict = {"w": torch.randn(4, 2), "v": torch.randn(3)}
    stage(cache, state_dict)
    state_dict["w"].unsqueeze_(0)  # in place over a recorded storage: the walk takes over
    plan = stage(cache, state_dict)
    assert not plan.replayed
    del plan, state_dict  # no gc.collect(): reference counts alone must free the sources
    assert cache.info().storages == 0


def _facts_by_a_pass(recording: Recording) -> dict[str, Any]:
    """What Recording.prepare_bulk and Recorder._list_plain_and_shared hold, found the slow
    way: one pass over the finished recording's lists."""
    slots, leaves = recording.slots, recording.leaves
    copy_slots = [k for k, slot in enumerate(slots) if slot is not None and slot.nbytes]
    copy_src = [recording.src_leaf[k] for k in copy_slots]
    count = len(leaves)
    users = collections.Counter(leaf[1] for leaf in leaves)
    plain = [
        j
        for j, leaf in enumerate(leaves)
        if users[leaf[1]] == 1 and leaf[0] is torch.Tensor and leaf[10]
    ]
    return {
        "copy_slots": copy_slots,
        "copy_src": copy_src,
        "copy_nbytes": [slots[k].nbytes for k in copy_slots],  # type: ignore[union-attr]
        "devices": {slots[k].device for k in copy_slots},  # type: ignore[union-attr]
        "one_to_one": min(copy_src, default=0) >= 0
        and len(copy_slots) == len(slots) == count
        and copy_slots == list(range(count)) == copy_src,
        "plain": plain,
        "plain_slots": [leaves[j][1] for j in plain],
        "shared_leaves": [(j, leaf[11]) for j, leaf in enumerate(leaves) if users[leaf[1]] > 1],
        "columns": [[leaf[c] for leaf in leaves] for c in range(7)],
    }


def _one_to_one_breakers() -> dict[str, dict[str, Any]]:
    base = {str(i): torch.randn(3 + i) for i in range(4)}
    weight = torch.randn(4, 4)
    return {
        "own storages": base,
        "tied": {**base, "tied": base["1"]},
        "views": {**base, "row": weight[1], "whole": weight},
        "empty": {**base, "empty": torch.empty(0)},
        "parameter": {**base, "p": torch.nn.Parameter(torch.randn(5))},
        "bool": {**base, "mask": torch.ones(4, dtype=torch.bool)},
        "module": torch.nn.Linear(3, 2).state_dict(),
        "model": model_state_dict(),
    }


@pytest.mark.parametrize("name", list(_one_to_one_breakers()))
def test_what_the_recorder_keeps_as_it_goes_matches_a_pass_over_the_recording(name: str) -> None:
    """The recorder keeps the one-to-one flag, the slot sizes and the devices as it goes,
    and prepare_bulk derives the copy lists and columns from them where every tensor has a
    storage of its own: each must equal what a pass over the finished lists finds."""
    cache = new_cache()
    state_dict = _one_to_one_breakers()[name]  # alive: a dead source empties its slot
    stage(cache, state_dict)
    recording = _recording(cache)
    want = _facts_by_a_pass(recording)
    assert recording.one_to_one is want["one_to_one"]
    assert recording.copy_slots == want["copy_slots"]
    assert recording.copy_src == want["copy_src"]
    assert recording.copy_nbytes == want["copy_nbytes"]
    assert recording.devices == want["devices"]
    assert recording.plain == want["plain"]
    assert recording.plain_slots == want["plain_slots"]
    assert recording.shared_leaves == want["shared_leaves"]
    columns = [
        recording.types,
        recording.slot_of,
        recording.offsets,
        recording.shapes,
        recording.strides,
        recording.dtypes,
        recording.negs,
    ]
    assert columns == want["columns"]
    assert recording.one_to_one is (name in ("own storages", "parameter", "module"))


def _runs_of_new_buffers() -> dict[str, dict[str, Any]]:
    """State dicts whose first call meets runs of tensors that get new buffers, broken up by
    tensors that do not (the recorder records such a run at once, see _record_fresh)."""
    base = {str(i): torch.randn(3 + i) for i in range(4)}
    weight = torch.randn(4, 4)
    many = {f"t{i}": torch.randn(2) for i in range(recording_module.FRESH_RUN * 3 + 5)}
    return {
        "twice in a row": {**base, "again": base["3"], "after": torch.randn(6)},
        "a view between": {**base, "row": weight[1], "whole": weight, "after": torch.randn(2)},
        "complex in a run": {
            **base,
            "z": torch.randn(3, dtype=torch.complex64),
            "zz": torch.randn(2, 2, dtype=torch.complex128),
        },
        "parameter between": {**base, "p": torch.nn.Parameter(torch.randn(5)), **many},
        "runs of the longest length": many,
        "past the tables' leads": {f"t{i}": torch.randn(2) for i in range(LEAD_AFTER + 10)},
    }


@pytest.mark.parametrize("name", list(_runs_of_new_buffers()))
def test_a_first_call_records_each_tensor_as_it_is(name: str) -> None:
    """Each recorded tensor, against the source at its path: its buffer (the cache's for its
    storage), offset, shape, stride, dtype, bits and the earlier tensor that is the same
    object; one slot per storage, counted by its users."""
    cache = new_cache()
    state_dict = _runs_of_new_buffers()[name]
    stage(cache, state_dict)
    recording = _recording(cache)
    assert list(recording.paths) == [(key,) for key in state_dict]
    first_of: dict[int, int] = {}
    users: collections.Counter[int] = collections.Counter()
    for j, (path, leaf) in enumerate(zip(recording.paths, recording.leaves, strict=True)):
        x = state_dict[path[0]]
        storage = x.untyped_storage()
        same = first_of.setdefault(id(x), j)
        slot = leaf[1]
        users[slot] += 1
        assert recording.slots[slot] is cache.get(storage)
        assert recording.slot_by_key[id(storage)] == slot
        assert leaf == (
            type(x),
            slot,
            x.storage_offset(),
            x.shape,
            x.stride(),
            x.dtype,
            x.is_neg(),
            x.dtype.is_complex,
            x.is_conj(),
            isinstance(x, torch.nn.Parameter) and x.requires_grad,
            leaf[10],
            same if same != j else -1,
        ), (j, path)
    assert recording.slot_users == [users[slot] for slot in range(len(recording.slots))]
    assert recording.conj_leaves == [
        (j, False) for j, leaf in enumerate(recording.leaves) if leaf[5].is_complex
    ]
    assert recording.first_leaf == [
        min(j for j, leaf in enumerate(recording.leaves) if leaf[1] == slot)
        for slot in range(len(recording.slots))
    ]
    want = _facts_by_a_pass(recording)
    assert recording.one_to_one is want["one_to_one"]
    assert recording.plain == want["plain"]
    assert recording.shared_leaves == want["shared_leaves"]
    assert recording.devices == want["devices"]
    replayed = check_call(cache, dict(state_dict), replayed=True)
    if name == "twice in a row":
        assert replayed.result["again"] is replayed.result["3"]


# -- the last call's staged tensors (Recording.twins) --------------------------------------------


def _tensors_of(count: int) -> dict[str, Any]:
    return {"t": [torch.randn(2) for _ in range(count)], "step": 3}


def _alive(refs: list[weakref.ref[torch.Tensor]]) -> int:
    return sum(ref() is not None for ref in refs)


def _ids(result: Any) -> list[int]:
    return [id(t) for t in result["t"]]


@pytest.fixture
def detaches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many staged tensors replays made fresh (``detach()``), per call to ``stage``."""
    made = [0]
    detach = replay_module._detach

    def counted(view: torch.Tensor) -> torch.Tensor:
        made[0] += 1
        return detach(view)  # type: ignore[no-any-return]

    monkeypatch.setattr(replay_module, "_detach", counted)
    return made


def _made_fresh(
    detaches: list[int], cache: BufferCache, state_dict: Any, *, replayed: bool
) -> tuple[int, Any]:
    """How many tensors a checked call made fresh, and its result."""
    before = detaches[0]
    result = check_call(cache, state_dict, replayed=replayed).result
    return detaches[0] - before, result


def test_a_dropped_result_s_tensors_are_handed_out_again(detaches: list[int]) -> None:
    """Dropping a result frees its containers only: the recording keeps its tensors, and a
    later replay hands them out again instead of making (and freeing) as many (1.3 us per
    tensor, and new objects for the cyclic collector)."""
    state_dict = _tensors_of(2 * BULK_STEP + 5)
    count = len(state_dict["t"])
    cache = new_cache()
    for call in range(6):
        fresh_ones, result = _made_fresh(detaches, cache, state_dict, replayed=call > 0)
        # The walk's own; then the first replay's, which notes what they are when made.
        assert fresh_ones == (count if call == 1 else 0)
        kept = _recording(cache).twins
        assert kept is not None and all(a is b for a, b in zip(result["t"], kept, strict=True))
        del kept, result


def test_a_result_held_until_the_next_call_returns_lends_the_one_before(
    detaches: list[int],
) -> None:
    """``staged = stage(sd)`` in a loop holds the last result while the next call runs: that
    call hands out the tensors of the result before it, which nobody holds any more."""
    state_dict = _tensors_of(2 * BULK_STEP + 5)
    count = len(state_dict["t"])
    cache = new_cache()
    result = stage(cache, state_dict).result
    for call in range(1, 7):
        held = result
        fresh_ones, result = _made_fresh(detaches, cache, state_dict, replayed=True)
        assert not set(_ids(held)) & set(_ids(result)), "a held tensor was handed out again"
        assert fresh_ones == (count if call == 1 else 0)
        del held


def test_results_all_held_get_tensors_of_their_own(detaches: list[int]) -> None:
    state_dict = _tensors_of(BULK_STEP + 3)
    cache = new_cache()
    results = [stage(cache, state_dict).result for _ in range(5)]
    assert len({id(t) for result in results for t in result["t"]}) == 5 * len(state_dict["t"])
    assert detaches[0] == 4 * len(state_dict["t"])


@pytest.mark.parametrize("kind", ["weakly referenced", "Parameters"])
def test_kept_tensors_not_handed_out_again_are_let_go_of_a_step_at_a_time(kind: str) -> None:
    """Kept tensors that cannot be handed out again are let go a step at a time between the
    new ones: freed at once, 50,000 held the loop 19-28 ms and left glibc's unsorted bin full
    for the next call. Here: plain ones that each have a weak reference (which would see them
    come back), taken from the spare after three calls; and staged Parameters
    (``state_dict(keep_vars=True)``), never handed out again, taken after the walk."""
    count = 4 * BULK_STEP
    parameters = kind == "Parameters"
    state_dict = (
        {"t": [torch.nn.Parameter(torch.randn(2)) for _ in range(count)]}
        if parameters
        else _tensors_of(count)
    )
    cache = new_cache()
    for _ in range(1 if parameters else 3):
        stage(cache, state_dict)
    recording = _recording(cache)
    kept = recording.twins if parameters else recording.spare
    assert kept is not None
    refs = [weakref.ref(t) for t in kept]
    del kept, recording
    plan = Plan(track_leaves=False)
    alive_after_each_step = [_alive(refs) for _ in walk_or_replay(cache, state_dict, plan)]
    assert plan.replayed
    assert _alive(refs) == 0
    assert len(set(alive_after_each_step)) >= count // BULK_STEP, "let go of all at once"


def _grad(t: torch.Tensor) -> None:
    t.grad = torch.zeros_like(t)


def _attribute(t: torch.Tensor) -> None:
    t.note = "mine"  # type: ignore[attr-defined]


_WEAK_REFS: list[Any] = []


def _weak_ref(t: torch.Tensor) -> None:
    _WEAK_REFS.append(weakref.ref(t))


CHANGES_TO_A_STAGED_TENSOR: dict[str, Callable[[torch.Tensor], Any]] = {
    "requires_grad_": lambda t: t.requires_grad_(),
    "t_": torch.Tensor.t_,
    "unsqueeze_": lambda t: t.unsqueeze_(0),
    "set_": lambda t: t.set_(torch.zeros(2, 3).untyped_storage(), 0, (2, 3), (3, 1)),
    "data": lambda t: setattr(t, "data", torch.zeros(2, 3)),
    "grad": _grad,
    "attribute": _attribute,
    "weak reference": _weak_ref,
}


@pytest.mark.parametrize("change", CHANGES_TO_A_STAGED_TENSOR)
def test_a_staged_tensor_changed_by_its_holder_is_not_handed_out_again(change: str) -> None:
    """A dropped staged tensor is handed out again only as it was made: one its holder
    changed (metadata in place, its memory, ``.grad``, an attribute, a weak reference to it)
    is let go, and a fresh one takes its place; the others are still handed out again."""
    state_dict = {"t": [torch.randn(2, 3) for _ in range(2 * BULK_STEP)]}
    cache = new_cache()
    made: set[int] = set()
    for _ in range(2):
        made |= set(_ids(stage(cache, state_dict).result))
    target, untouched = BULK_STEP + 7, 3
    result = stage(cache, state_dict).result
    CHANGES_TO_A_STAGED_TENSOR[change](result["t"][target])
    changed = id(result["t"][target])
    del result
    for _ in range(3):  # through both kept generations
        result = check_call(cache, state_dict, replayed=True).result
        staged = result["t"][target]
        buffer = cache.get(state_dict["t"][target].untyped_storage())
        assert buffer is not None
        assert staged.data_ptr() == buffer.storage.data_ptr()
        assert staged.grad is None and not staged.__dict__
        assert not weakref.getweakrefcount(staged)
        assert torch.equal(staged, state_dict["t"][target])
        assert id(staged) != changed or (change == "weak reference" and not _WEAK_REFS[0]())
        assert id(result["t"][untouched]) in made, "nothing was handed out again"
        del result, staged, buffer
    _WEAK_REFS.clear()


def test_noting_what_tensors_are_never_compares_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """``None in twins`` would ask each tensor ``== None`` through torch's Python operator
    (~30 us apiece: 1.6 s over 50,000 tensors, on the first replay)."""

    def compared(self: torch.Tensor, other: Any) -> Any:
        raise AssertionError("a tensor was compared")

    monkeypatch.setattr(torch.Tensor, "__eq__", compared)
    assert reuse_module.check_of([torch.ones(2), torch.ones(3)]) is not None
    assert reuse_module.check_of([torch.ones(2), None]) is None


def test_no_tensor_is_handed_out_again_where_reference_counts_say_nothing(
    monkeypatch: pytest.MonkeyPatch, detaches: list[int]
) -> None:
    """Where reference counts cannot tell a holder apart (a build without the GIL), every
    replay makes its tensors fresh."""
    monkeypatch.setattr(reuse_module, "REFS_WHEN_UNHELD", None)
    state_dict = _tensors_of(BULK_STEP + 3)
    cache = new_cache()
    for _ in range(4):
        check_call(cache, state_dict, replayed=detaches[0] > 0 or _ > 0)
    assert detaches[0] == 3 * len(state_dict["t"])


def test_a_result_still_held_keeps_its_own_tensors() -> None:
    """The twins kept are never handed out again: a result the caller holds keeps its own
    tensor objects, and the next call's are new ones (on the same buffers)."""
    state_dict = _tensors_of(BULK_STEP + 1)
    cache = new_cache()
    first = stage(cache, state_dict).result
    second = check_call(cache, state_dict, replayed=True).result
    assert all(a is not b for a, b in zip(first["t"], second["t"], strict=True))
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(first["t"], second["t"], strict=True))
    kept = _recording(cache).twins
    assert kept is not None and all(a is b for a, b in zip(second["t"], kept, strict=True))


def test_an_evicted_buffer_lets_go_of_the_kept_tensor_on_it() -> None:
    """A recording keeps no host memory alive: a buffer that leaves the cache (its source
    died) takes the kept tensor on it along, and only that one where it was alone on its
    storage (this runs in whatever thread dropped the source: a training step's temporary)."""
    state_dict = {"keep": torch.randn(4), "drop": torch.randn(1000)}
    cache = new_cache()
    on_the_evicted_buffer, on_a_kept_buffer = [], []
    for _ in range(2):  # the walk's, kept as the spare by the replay after it; the replay's
        result = stage(cache, state_dict).result
        on_the_evicted_buffer.append(weakref.ref(result["drop"]))
        on_a_kept_buffer.append(weakref.ref(result["keep"]))
        del result
    assert _recording(cache).spare is not None
    assert _alive(on_the_evicted_buffer) == 2
    del state_dict["drop"]
    gc.collect()
    assert _alive(on_the_evicted_buffer) == 0
    assert _alive(on_a_kept_buffer) == 2
    assert _recording(cache).twins is not None


def test_an_evicted_shared_storage_lets_go_of_every_kept_tensor() -> None:
    shared = torch.randn(10)
    state_dict = {"keep": torch.randn(4), "a": shared[:5], "b": shared[5:]}
    cache = new_cache()
    result = stage(cache, state_dict).result
    on_the_evicted_buffer = weakref.ref(result["a"])
    del result, shared
    del state_dict["a"], state_dict["b"]
    gc.collect()
    assert on_the_evicted_buffer() is None
    assert _recording(cache).twins is None and _recording(cache).spare is None


def test_kept_tensors_do_not_count_as_a_buffer_in_use(detaches: list[int]) -> None:
    """``in_use()`` (the compat pool's) sees a holder of a staged tensor, not the recording's
    own copy of the last result: each kept tensor nobody else holds is discounted, and stays
    kept, so the call after hands it out again rather than make a new one (1.3 us per tensor
    on every save of a DCP user, and new objects for the cyclic collector)."""
    state_dict = _tensors_of(BULK_STEP + 3)
    cache = new_cache()
    stage(cache, state_dict)
    result = stage(cache, state_dict).result  # the walk's tensors are now the spare ones
    assert _recording(cache).spare is not None
    assert cache.in_use()
    assert _recording(cache).spare is None, "the call before last's are let go of"
    del result
    assert not cache.in_use()
    kept = _recording(cache).twins
    assert kept is not None
    handed_out = _ids({"t": kept})
    del kept
    made, result = _made_fresh(detaches, cache, state_dict, replayed=True)
    assert made == 0 and _ids(result) == handed_out
    assert cache.in_use()
    del result
    assert not cache.in_use()


def test_a_kept_tensor_someone_still_holds_keeps_its_buffer_in_use() -> None:
    """A kept tensor is discounted only where nothing but the recording holds it: one that
    its holder kept (or kept a view of, whose link to its base holds it in C++) is a use."""
    state_dict = _tensors_of(BULK_STEP + 3)
    cache = new_cache()
    for _ in range(2):
        stage(cache, state_dict)
    holds: list[Callable[[torch.Tensor], torch.Tensor]] = [
        lambda t: t,
        lambda t: t[1:],
        lambda t: t.view(1, 2),
    ]
    for hold in holds:
        result = stage(cache, state_dict).result
        held = hold(result["t"][BULK_STEP + 1])
        del result
        assert cache.in_use()
        del held
        assert not cache.in_use()


def test_a_kept_dict_someone_still_holds_keeps_its_tensors_buffers_in_use() -> None:
    state_dict = _optimizer_state(DICT_STEP + 5)
    cache = new_cache()
    for _ in range(2):
        stage(cache, state_dict)
    result = stage(cache, state_dict).result
    item = result["state"][DICT_STEP + 2]
    del result
    assert cache.in_use()
    assert list(item) == ["p", "q"], "a held dict was emptied"
    del item
    assert not cache.in_use()


def test_a_kept_tensor_moved_to_another_buffer_is_counted_where_it_is() -> None:
    """A dropped staged tensor whose holder pointed it at another buffer (``set_``) is a use of
    that buffer, not of its own: its own buffer's other holder is still seen."""
    state_dict = {"t": [torch.randn(2) for _ in range(BULK_STEP)]}
    cache = new_cache()
    for _ in range(2):
        stage(cache, state_dict)
    result = stage(cache, state_dict).result
    moved, other = result["t"][3], result["t"][4]
    holder = torch.empty(0).set_(moved.untyped_storage())  # a use of the first buffer
    moved.set_(other.untyped_storage(), 0, other.shape)
    del result, moved, other
    assert cache.in_use()
    del holder
    assert not cache.in_use()
    check_call(cache, state_dict, replayed=True)


def test_in_use_answers_alike_in_one_sum_and_buffer_by_buffer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``in_use()`` adds the uses over all buffers up when every buffer has at least a free
    one's, and compares buffer by buffer otherwise: the two agree, holder or none."""
    state_dict = {"t": [torch.randn(2) for _ in range(BULK_STEP)]}
    cache = new_cache()
    for _ in range(2):
        stage(cache, state_dict)

    def both() -> bool:
        in_sum = cache.in_use()
        monkeypatch.setattr(cache_module, "min", lambda counts: -1, raising=False)
        by_buffer = cache.in_use()
        monkeypatch.undo()
        assert in_sum == by_buffer
        return in_sum

    result = stage(cache, state_dict).result
    assert both()
    moved, other = result["t"][3], result["t"][4]
    holder = torch.empty(0).set_(moved.untyped_storage())
    moved.set_(other.untyped_storage(), 0, other.shape)
    del result, moved, other
    assert both()
    del holder
    assert not both()


def test_a_kept_tensor_with_a_weak_reference_is_let_go_of() -> None:
    """A weak reference could hand a kept tensor back after its buffer was written again; kept,
    it would keep the buffer in use for good (the pool would make a set per save)."""
    state_dict = _tensors_of(BULK_STEP + 3)
    cache = new_cache()
    for _ in range(2):
        stage(cache, state_dict)
    result = stage(cache, state_dict).result
    ref = weakref.ref(result["t"][5])
    del result
    assert not cache.in_use()
    assert ref() is None
    check_call(cache, state_dict, replayed=True)


def test_a_tensor_kept_twice_and_held_by_nobody_is_one_use_of_its_buffer() -> None:
    """A tensor tied to itself in the state dict (the same object under two keys: lm_head
    and wte) is one staged tensor kept twice: discounted once, and only when nobody else
    holds it."""
    tied = torch.randn(4)
    state_dict = {"t": [torch.randn(2) for _ in range(BULK_STEP)], "a": tied, "b": tied}
    cache = new_cache()
    for _ in range(2):
        stage(cache, state_dict)
    result = stage(cache, state_dict).result
    held = result["a"]
    del result
    assert cache.in_use()
    del held
    assert not cache.in_use()
    result = check_call(cache, state_dict, replayed=True).result
    assert result["a"] is result["b"]


def test_reference_counts_are_trusted_only_where_they_count_c_plus_plus_holders(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where a tensor's Python reference count does not count its C++ holders (a torch
    before PyObject preservation was reworked: a view's link to its base), a kept tensor
    reachable through ``view._base`` would read as unheld: reuse is then off."""
    assert reuse_module._refs_when_unheld() is not None  # this torch counts them

    class OlderTorch:
        """sys, with reference counts that leave out a tensor's C++ holders."""

        def __getattr__(self, name: str) -> Any:
            return getattr(sys, name)

        @staticmethod
        def getrefcount(x: Any) -> int:
            count = sys.getrefcount(x) - 1  # this frame's own
            if isinstance(x, torch.Tensor):
                count -= x._use_count() - 1  # type: ignore[attr-defined]
            return count

    monkeypatch.setattr(reuse_module, "sys", OlderTorch())
    assert reuse_module._refs_when_unheld() is None


@pytest.mark.parametrize("kind", ["neg", "conj", "slice"])
@pytest.mark.parametrize("container", ["dict", "group"])
def test_a_dropped_result_of_views_leaves_no_buffer_in_use(kind: str, container: str) -> None:
    """A staged negative or conjugate view keeps, in C++, the base it was made from: a second
    use of its buffer that no count tells from a reader's. Such tensors are never handed out
    again, so ``in_use()`` lets go of them (and empties the kept dicts that hold them) before
    it counts: otherwise the compat pool would find the set in use after every save."""
    scenario = Scenario([torch.randn(6, dtype=torch.complex64)], [(0, kind, container)] * 3)
    cache = new_cache()
    for _ in range(4):
        result = stage(cache, scenario.make()).result
        del result
        assert not cache.in_use()


def test_in_use_lets_go_where_reference_counts_say_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(reuse_module, "REFS_WHEN_UNHELD", None)
    state_dict = _tensors_of(3)
    cache = new_cache()
    for _ in range(3):
        stage(cache, state_dict)
    assert _recording(cache).twins is not None
    assert not cache.in_use()
    assert _recording(cache).twins is None


@pytest.mark.parametrize("hold", ["dropped", "held until the next call returns"])
def test_kept_lists_are_the_recording_s_own_and_grow_old(hold: str) -> None:
    """A cached call that hands out its tensors and dicts again leaves too few new objects to
    be filed into the oldest generation (``_drivers/_gc.py``): a list of every kept tensor or
    dict made anew each call stayed young, and each young collection visited all its entries
    (0.3-2 ms each; 20 DCP saves over 50,000 tensors in a frozen heap: 590-680 ms of
    collections). The lists are the recording's own, emptied and filled again."""
    state_dict = _optimizer_state(DICT_STEP + 5)
    cache = new_cache()
    result = None
    for _ in range(4):
        result = stage(cache, state_dict).result if hold != "dropped" else None
        stage(cache, state_dict)
    gc.collect()  # everything alive now is in the oldest generation
    enabled = gc.isenabled()
    gc.disable()  # nothing promoted meanwhile: what the calls made stays young
    try:
        for _ in range(3):
            held = stage(cache, state_dict).result
            result = held if hold != "dropped" else None
            del held
        young = {id(o) for o in gc.get_objects(generation=0)}
    finally:
        if enabled:
            gc.enable()
    recording = _recording(cache)
    kept = [recording.twins, recording.items, recording.spare, recording.items_spare]
    assert recording.twins is not None and recording.items is not None
    assert all(id(lst) not in young for lst in kept if lst is not None)
    del result


def test_the_kept_tensors_are_copied_into_the_recording_s_list_a_step_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At once, copying 50,000 twins into the kept list took 0.2-0.9 ms of one loop step."""

    class Counted(list[Any]):
        extended = 0

        def __iadd__(self, more: Any) -> Any:  # type: ignore[misc]
            Counted.extended += 1
            return super().__iadd__(more)

    state_dict = _tensors_of(4 * EMPTY_STEP)
    cache = new_cache()
    for _ in range(2):
        stage(cache, state_dict)
    monkeypatch.setattr(Recording, "shell", lambda self: Counted())
    stage(cache, state_dict)
    assert isinstance(_recording(cache).twins, Counted)
    assert Counted.extended >= 4


def test_a_source_dropped_while_its_kept_list_is_emptied_for_reuse_lets_go_quietly() -> None:
    """A thread that drops a source reads the kept lists, then writes None into them; a replay
    in another thread may have emptied one for reuse in between (``give_shell``)."""
    recording = Recording()
    recording.slot_users = [1]
    recording.first_leaf = [0]
    recording.twins = [torch.ones(1)]
    recording.give_shell(recording.twins)  # emptied, and still read by the dropping thread
    recording.items = []
    recording.group_spans = [(0, 1, 0, 1)]
    recording._forget_twins(0)
    assert recording.twins == [] and recording.shell() == []


def test_twins_are_not_kept_across_an_eviction_during_the_call() -> None:
    """A buffer forgotten while the call ran (counted before its slot is emptied) may be under
    one of the call's twins: those are not kept."""
    recording = Recording()
    twins = [torch.ones(1)]
    recording.keep(twins, 0)
    assert recording.twins is twins
    recording.forgotten.append(0)
    recording.keep(twins, 0)
    assert recording.twins is None
    recording.keep(twins, 1)
    assert recording.twins is twins


# -- the last call's item dicts (Recording.items) -------------------------------------------------


def _item_ids(result: Any) -> set[int]:
    return {id(item) for item in result["state"].values()}


@pytest.fixture
def new_dicts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many item dicts replays made (rather than filled a kept one), per call to ``stage``;
    counted, since an ``id()`` may come back on a new dict once the old one is freed."""
    made = [0]

    def counted(pairs: Any) -> dict[Any, Any]:
        made[0] += 1
        return dict(pairs)

    monkeypatch.setattr(replay_module, "_new_dict", counted)
    return made


def _dicts_made(new_dicts: list[int], cache: BufferCache, state_dict: Any) -> tuple[int, Any]:
    before = new_dicts[0]
    result = check_call(cache, state_dict, replayed=True).result
    return new_dicts[0] - before, result


def _contents(result: Any) -> dict[Any, list[tuple[str, int]]]:
    """Each item dict's keys and the tensor objects under them, by identity."""
    return {key: [(k, id(t)) for k, t in item.items()] for key, item in result["state"].items()}


def test_a_dropped_result_s_item_dicts_are_filled_again(
    new_dicts: list[int], detaches: list[int]
) -> None:
    """A group's item dicts (an optimizer's per-parameter state) that nobody holds any more
    are emptied and filled with the next call's twins, rather than made again: a cached call
    then leaves no new objects for the cyclic collector (the young collections that traversed
    16,667 new dicts per call held a frozen-heap application's loop ~20 ms per call)."""
    state_dict = _optimizer_state(3 * DICT_STEP // 2)
    count = len(state_dict["state"])
    cache = new_cache()
    stage(cache, state_dict)
    for call in range(5):
        fresh_twins = detaches[0]
        made, result = _dicts_made(new_dicts, cache, state_dict)
        assert made == (count if call == 0 else 0)  # the walk's are not kept
        # Their tensors too: emptied before the twins are checked, a kept dict is no holder.
        assert detaches[0] - fresh_twins == (2 * count if call == 0 else 0)
        kept = _recording(cache).items
        assert kept is not None and all(
            a is b for a, b in zip(result["state"].values(), kept, strict=True)
        )
        del kept, result


def test_a_result_held_until_the_next_call_returns_lends_the_dicts_before(
    new_dicts: list[int], detaches: list[int]
) -> None:
    state_dict = _optimizer_state(3 * DICT_STEP // 2)
    count = len(state_dict["state"])
    cache = new_cache()
    result = stage(cache, state_dict).result
    for call in range(6):
        held, held_contents = result, _contents(result)
        fresh_twins = detaches[0]
        made, result = _dicts_made(new_dicts, cache, state_dict)
        # Those dicts' tensors too: emptied before the twins are checked, they hold none (the
        # walk's are kept apart from its dicts: the second replay hands those out again).
        assert detaches[0] - fresh_twins == (2 * count if call == 0 else 0)
        assert not _item_ids(held) & _item_ids(result), "a held dict was handed out again"
        assert _contents(held) == held_contents, "a held dict was emptied or filled again"
        # The first two replays make theirs; each later one fills those of the call before last.
        assert made == (count if call < 2 else 0)
        del held


def test_an_item_dict_still_held_is_left_as_it_is(new_dicts: list[int]) -> None:
    """The caller keeps one item of a result and drops the rest: that dict keeps its tensors
    and is never handed out again; its neighbours are."""
    state_dict = _optimizer_state(2 * DICT_STEP + 3)
    cache = new_cache()
    stage(cache, state_dict)
    check_call(cache, state_dict, replayed=True)
    kept = check_call(cache, state_dict, replayed=True).result["state"][5]
    kept_contents = [(k, id(t)) for k, t in kept.items()]
    for call in range(5):
        made, result = _dicts_made(new_dicts, cache, state_dict)
        assert all(item is not kept for item in result["state"].values())
        # The rest are handed out again: a new dict in the held one's place only (the first
        # call after: the one in its place in the other kept result too).
        assert made <= (2 if call == 0 else 1)
        del result
    assert [(k, id(t)) for k, t in kept.items()] == kept_contents


def test_item_dicts_of_several_groups_each_go_back_to_their_own_place(
    new_dicts: list[int],
) -> None:
    """Two optimizers' states and a list of like dicts: each group's kept dicts sit after the
    others' (``Group.items_at``), so each is filled again in its own place, and an eviction in
    the last group drops the dict that holds its tensor, not another group's."""
    state_dict: dict[str, Any] = {
        "first": _optimizer_state(70),
        "second": _optimizer_state(5),
        "list": [{"p": torch.randn(3), "q": torch.randn(2)} for _ in range(3)],
    }
    cache = new_cache()
    stage(cache, state_dict)
    check_call(cache, state_dict, replayed=True)
    for _ in range(3):
        made, result = _dicts_made(new_dicts, cache, state_dict)
        assert made == 0
        kept = _recording(cache).items
        assert kept is not None and len(kept) == 78
        in_order = [
            *result["first"]["state"].values(),
            *result["second"]["state"].values(),
            *result["list"],
        ]
        assert sorted(map(id, kept)) == sorted(map(id, in_order))
        del kept, result, in_order
    recording = _recording(cache)
    assert recording.items is not None
    on_the_evicted_buffer = weakref.ref(recording.items[recording.item_count - 2]["q"])
    del state_dict["list"][1]["q"]
    gc.collect()
    assert on_the_evicted_buffer() is None
    assert [i for i, item in enumerate(recording.items) if item is None] == [76]


def test_an_item_dict_changed_then_dropped_is_filled_as_recorded() -> None:
    """A dict nobody holds is emptied whatever its holder did to it before letting go: the next
    result's items have the recorded keys, in order, and this call's tensors."""
    state_dict = _optimizer_state(40)
    cache = new_cache()
    stage(cache, state_dict)
    result = check_call(cache, state_dict, replayed=True).result
    items = result["state"]
    items[0]["extra"] = torch.ones(1)
    del items[1]["p"]
    items[2]["p"] = items[3]["q"]
    items[4].clear()
    items[5]["q"], items[5]["p"] = items[5].pop("p"), items[5].pop("q")  # the order swapped
    del items, result
    for _ in range(3):
        result = check_call(cache, state_dict, replayed=True).result
        assert all(list(item) == ["p", "q"] for item in result["state"].values())
        del result


def test_an_evicted_buffer_lets_go_of_the_kept_dict_that_holds_its_tensor() -> None:
    """A kept item dict holds its twins: where one of its storages leaves the cache, the dict
    goes with it, so that no host memory of the evicted buffer stays alive."""
    state_dict = _optimizer_state(8)
    cache = new_cache()
    stage(cache, state_dict)
    on_the_evicted_buffer = []
    for _ in range(3):
        result = check_call(cache, state_dict, replayed=True).result
        on_the_evicted_buffer.append(weakref.ref(result["state"][3]["p"]))
        del result
    recording = _recording(cache)
    assert recording.items is not None
    held_by_kept_dicts = {id(t) for item in recording.items for t in item.values()}
    assert {id(ref()) for ref in on_the_evicted_buffer} & held_by_kept_dicts
    del state_dict["state"][3]["p"]
    gc.collect()
    assert _alive(on_the_evicted_buffer) == 0
    assert recording.items is not None and recording.items[3] is None
    assert recording.items[2] is not None


def test_kept_dicts_do_not_count_as_a_buffer_in_use(new_dicts: list[int]) -> None:
    """Kept dicts that nobody else holds are emptied (as the next replay would), so their
    tensors read as the recording's own; the call after fills them again."""
    state_dict = _optimizer_state(4)
    cache = new_cache()
    stage(cache, state_dict)
    check_call(cache, state_dict, replayed=True)
    check_call(cache, state_dict, replayed=True)
    kept = _recording(cache).items
    assert kept is not None
    ids = list(map(id, kept))
    del kept
    assert not cache.in_use()
    kept = _recording(cache).items
    assert kept is not None and list(map(id, kept)) == ids and not any(kept)
    del kept
    made, result = _dicts_made(new_dicts, cache, state_dict)
    assert made == 0 and list(map(id, result["state"].values())) == ids


def test_kept_dicts_are_emptied_a_step_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checking and emptying 16,667 kept dicts is a loop hold of its own: a step of
    DICT_STEP at a time."""
    state_dict = _optimizer_state(4 * DICT_STEP)
    cache = new_cache()
    stage(cache, state_dict)
    check_call(cache, state_dict, replayed=True)
    steps_in_parts = stage(cache, state_dict).steps  # type: ignore[attr-defined]
    monkeypatch.setattr(reuse_module, "DICT_STEP", 10 * DICT_STEP)
    steps_in_one_go = stage(cache, state_dict).steps  # type: ignore[attr-defined]
    assert steps_in_parts - steps_in_one_go >= 3


def test_no_dict_is_handed_out_again_where_reference_counts_say_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(reuse_module, "REFS_WHEN_UNHELD", None)
    made = [0]

    def counted(pairs: Any) -> dict[Any, Any]:
        made[0] += 1
        return dict(pairs)

    monkeypatch.setattr(replay_module, "_new_dict", counted)
    state_dict = _optimizer_state(10)
    cache = new_cache()
    for _ in range(5):
        stage(cache, state_dict)  # dropped: still never handed out again without the counts
    assert made[0] == 4 * len(state_dict["state"])


def test_a_large_dict_has_its_keys_checked_in_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """A large container's keys are compared a few thousand at a time (16,667 in one go held
    the loop ~0.9 ms), and a key of another type far into it still falls back."""
    items = 600
    state_dict = _optimizer_state(items)
    cache = new_cache()
    stage(cache, state_dict)
    stage(cache, state_dict)  # the first replay builds its checks, in steps of their own
    steps_in_one_go = stage(cache, state_dict).steps  # type: ignore[attr-defined]
    monkeypatch.setattr(replay_module, "EMPTY_STEP", 16)
    steps_in_parts = check_call(cache, state_dict, replayed=True).steps  # type: ignore[attr-defined]
    assert steps_in_parts - steps_in_one_go >= items // 16 - 1
    state = dict(state_dict["state"])
    state[float(items - 1)] = state.pop(items - 1)  # equal to the int key, of another type
    changed = {**state_dict, "state": state}
    plan = check_call(cache, changed, replayed=False)
    assert type(list(plan.result["state"])[-1]) is float


# -- the C++ metadata check (metadata_guard) ------------------------------------------------------


def _unlike(base: torch.Tensor) -> dict[str, torch.Tensor]:
    """A tensor per fact the guard reads, each unlike ``base`` in that fact alone."""
    return {
        "strides": base.t().contiguous().t(),
        "shape": base.reshape(3, 4),
        "dtype": base.double(),
        "neg bit": neg_view(base),
        "exact type": torch.nn.Parameter(base, requires_grad=False),
        "requires_grad": base.clone().requires_grad_(),
        "device": torch.zeros(4, 3, device="meta"),
    }


@pytest.mark.parametrize("fact", list(_unlike(torch.zeros(4, 3))))
def test_the_metadata_guard_tells_each_fact_apart(fact: str) -> None:
    base = torch.zeros(4, 3)
    guard = metadata_guard([base, torch.ones(2)])
    assert guard is not None, "this torch has TensorGuards: the probe should accept it"
    assert guard(torch.ones(4, 3), torch.zeros(2)) is True  # values and storages are not read
    assert guard(_unlike(base)[fact], torch.zeros(2)) is False
    assert guard(torch.ones(4, 3), 2) is False


def test_the_conj_bit_is_told_apart() -> None:
    z = torch.zeros(3, dtype=torch.complex64)
    guard = metadata_guard([z])
    assert guard is not None
    assert guard(z.clone()) is True
    assert guard(z.conj()) is False


@pytest.mark.parametrize("default", ["dtype float64", "device meta"])
def test_the_guard_probe_ignores_the_caller_s_defaults(default: str) -> None:
    """The probe runs once per process, wherever the first replay runs: under a caller's
    ``torch.set_default_dtype(torch.float64)`` its "other dtype" example (``double()``) was
    no other dtype, and the guard was off for the whole process."""
    previous_dtype = torch.get_default_dtype()
    if default == "dtype float64":
        torch.set_default_dtype(torch.float64)
    else:
        torch.set_default_device("meta")
    try:
        assert torch_wrappers._tensor_guards.__wrapped__() is not None
    finally:
        torch.set_default_dtype(previous_dtype)
        torch.set_default_device(None)


def test_no_guard_where_the_probe_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch_wrappers, "_tensor_guards", lambda: None)
    assert metadata_guard([torch.zeros(1)]) is None


def test_replays_check_the_long_way_without_a_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where torch has no guard, every replay reads each fact itself: the same fallbacks."""
    monkeypatch.setattr(replay_module, "metadata_guard", lambda tensors: None)
    monkeypatch.setattr(recording_module, "metadata_guard", lambda tensors: None)
    changes = dict(_changes())
    for name in ("t_", ".data = a neg view", "the storage offset alone", "Tensor -> Parameter"):
        cache = new_cache()
        state_dict = _recorded()
        check_call(cache, state_dict, replayed=False)
        check_call(cache, state_dict, replayed=True)
        assert _recording(cache).guards == [None]
        check_call(cache, changes[name](state_dict), replayed=False)


def test_a_step_checked_the_long_way_gets_its_guard() -> None:
    """A replay builds a step's guard once the step passed the long checks; the next replay
    checks that step with it."""
    state_dict = _tensors_of(2 * BULK_STEP + 1)
    cache = new_cache()
    stage(cache, state_dict)
    recording = _recording(cache)
    assert recording.guards == [None, None, None]
    check_call(cache, state_dict, replayed=True)
    assert all(guard is not None for guard in recording.guards)
    check_call(cache, state_dict, replayed=True)
    state_dict["t"][-1].unsqueeze_(0)  # in the last step, which has its guard now
    check_call(cache, state_dict, replayed=False)


def test_a_walk_ahead_of_the_calls_makes_the_guards_at_once() -> None:
    """``reserve()``'s walk (``Plan(ahead=True)``) leaves the first call nothing a replay would
    make on its first run: the steps' guards are there; a call's walk leaves them to it."""
    state_dict = _tensors_of(2 * BULK_STEP + 1)
    cache = new_cache()
    for _ in walk_or_replay(cache, state_dict, Plan(track_leaves=False, ahead=True)):
        pass
    assert all(guard is not None for guard in _recording(cache).guards)
    check_call(cache, state_dict, replayed=True)
    state_dict["t"][0].unsqueeze_(0)  # in the first step, checked by its guard
    check_call(cache, state_dict, replayed=False)
    assert _recording(cache).guards == [None, None, None]


def test_the_first_replay_after_a_walk_ahead_hands_out_that_walk_s_tensors(
    detaches: list[int],
) -> None:
    """``reserve()``'s walk also notes what its plain staged tensors are, so the first call
    after it hands them out again, as a cached call does, instead of making its own; a call's
    walk leaves that to the first replay (its cost would fall on the first checkpoint)."""
    state_dict = _tensors_of(2 * BULK_STEP + 1)
    for ahead in (True, False):
        cache = new_cache()
        for _ in walk_or_replay(cache, state_dict, Plan(track_leaves=False, ahead=ahead)):
            pass
        checks = _recording(cache).twin_checks
        assert all(check is not None for check in checks) if ahead else not any(checks)
        fresh_ones, _ = _made_fresh(detaches, cache, state_dict, replayed=True)
        assert fresh_ones == (0 if ahead else len(state_dict["t"]))


def test_reserve_makes_the_guards(stager: Driver) -> None:
    state_dict = _tensors_of(BULK_STEP + 1)
    if stager.kind == "sync":
        stager.stager.reserve(state_dict)
    else:
        stager.run(stager.stager.reserve, state_dict)
    recording = stager.stager._sets.current.cache.replays[0]
    assert len(recording.guards) == 2
    assert all(guard is not None for guard in recording.guards)
    stager.stage(state_dict)


# -- the GIL ----------------------------------------------------------------------------------


def test_staged_twins_are_made_without_a_torch_operator_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``detach()`` is a torch operator, and torch's bindings drop the GIL around each call:
    beside a thread that keeps running Python, each one cost 4-9 ms there (the GIL convoy,
    ``benchmarks.busy_thread``). First calls, replays that make twins (a result still held)
    and the tensor-by-tensor replay make their twins without it (``_torch.detached``)."""
    calls = [0]
    detach = torch.Tensor.detach

    def counted(self: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return detach(self)

    weight = torch.randn(4, 4)
    state_dict = {
        "state": {i: {"a": torch.randn(3), "b": torch.randn(2, 2)} for i in range(40)},
        "w": weight,
        "tied": weight,
        "p": torch.nn.Parameter(torch.randn(5)),
    }
    cache = new_cache()
    monkeypatch.setattr(torch.Tensor, "detach", counted)
    held = [stage(cache, state_dict).result]  # a first call
    for _ in range(2):  # replays that make fresh twins: every earlier result is still held
        plan = stage(cache, state_dict)
        assert plan.replayed
        held.append(plan.result)
    # A per-call temporary (an RNG state), recorded with it. Replayed while the recorded one
    # is still alive: the bulk check misses, and the call is replayed tensor by tensor. Then
    # after it died: in bulk, the new one staged on its own.
    recorded = [torch.randn(3)]
    held.append(stage(cache, {**state_dict, "rng": recorded[0]}).result)
    for _ in range(2):
        with_rng = {**state_dict, "rng": torch.randn(3)}
        plan = stage(cache, with_rng)
        assert plan.replayed
        held.append(plan.result)
        recorded.clear()  # the second time round, the recorded one has died
    assert calls[0] == 0
    # The module's own name for it: a test that counts twins patches it.
    assert replay_module._detach is torch_wrappers.detached
    monkeypatch.undo()
    assert_same_staging(held[-1], fresh(with_rng), with_rng)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(3, 4),
        lambda: torch.randn(5, 4)[1:3, ::2],
        lambda: torch.randn(3, dtype=torch.complex64).conj(),
        lambda: neg_view(torch.randn(3, dtype=torch.complex64).conj().imag),
        lambda: torch.nn.Parameter(torch.randn(3)),
    ],
    ids=["plain", "view", "conj", "neg", "parameter"],
)
def test_detached_is_detach(make: Callable[[], torch.Tensor]) -> None:
    x = make()
    want, got = x.detach(), torch_wrappers.detached(x)
    assert type(got) is torch.Tensor and got is not x
    for fact in ("shape", "dtype", "device", "requires_grad", "is_leaf", "grad_fn"):
        assert getattr(got, fact) == getattr(want, fact), fact
    assert got.stride() == want.stride() and got.storage_offset() == want.storage_offset()
    assert (
        got.data_ptr() == x.data_ptr()
        and got.untyped_storage()._cdata == x.untyped_storage()._cdata
    )
    assert (got.is_conj(), got.is_neg()) == (want.is_conj(), want.is_neg())
    assert not got._is_view() and got._base is None
    with torch.no_grad():
        x.mul_(2)
    assert got._version == x._version == want._version  # one version counter


@pytest.mark.parametrize(
    ("key", "nested"),
    [
        # On a storage of its own: caught by the storage check, before the guard.
        ("7.bias", "torch.nested.nested_tensor([torch.randn(2), torch.randn(3)], **strided)"),
        # Over the recorded tensor's own storage: passes the storage check, so each bulk
        # step asks is_nested too; the one-by-one checks read its sizes (a raw RuntimeError).
        ("7.weight", "torch.nested.as_nested_tensor(state['7.weight'], **strided)"),
    ],
    ids=["own-storage", "recorded-storage"],
)
def test_a_nested_tensor_in_place_of_a_recorded_one_is_refused_not_fatal(
    key: str, nested: str
) -> None:
    # Dynamo's metadata guard reads a nested tensor's strides, which throws in C++ and ended
    # the process (std::terminate). Run in a process of its own: a failure, not a dead suite.
    child = in_a_fresh_interpreter(
        f"""
        import torch, astage
        strided = dict(layout=torch.strided)
        model = torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(40)))
        with astage.SyncStager() as stager:
            for _ in range(3):
                stager.stage(model.state_dict())
            state = model.state_dict()
            state["{key}"] = {nested}
            try:
                stager.stage(state)
            except astage.UnstageableError as error:
                assert "['{key}']" in str(error), error
            else:
                raise SystemExit("staged")
            for _ in range(2):  # the stager goes on: walked again, then replayed
                staged = stager.stage(model.state_dict())
                assert torch.equal(staged["{key}"], model.state_dict()["{key}"])
        """
    )
    assert child.returncode == 0, child.stderr[-2000:]
