"""The deep-copy walk against ``copy.deepcopy``: objects the other walk tests do not draw.

Each test runs on every driver (the ``stager`` fixture) and stages twice, a first call and a
cached one, which must agree.
"""

from __future__ import annotations

import collections
import copy
import sys
import weakref
from typing import Any

import pytest
import torch
from conftest import Driver, assert_staged, collect

import astage
from astage import Attr


class Holder:
    """A plain object with a tensor in an attribute (weakly referable)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight


# -- torch.Generator ----------------------------------------------------------------------------


def test_a_generator_is_copied_with_its_state_at_the_call(stager: Driver) -> None:
    # Its state was staged as a tensor that __setstate__ read before the bytes landed: the
    # first call raised a raw RuntimeError ("Invalid mt19937 state"), never a copy.
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(3)
    for _ in range(2):
        state = generator.get_state()
        expected = copy.deepcopy(generator)
        staged = stager.stage({"rng": generator, "w": weight})
        assert type(staged["rng"]) is torch.Generator and staged["rng"] is not generator
        assert torch.equal(staged["rng"].get_state(), state)
        assert staged["rng"].initial_seed() == expected.initial_seed() == 7
        drawn = torch.rand(4, generator=staged["rng"])
        assert torch.equal(drawn, torch.rand(4, generator=expected))
        assert torch.equal(generator.get_state(), state)  # the source is left as it was
        assert_staged(staged["w"], weight)
        torch.rand(5, generator=generator)  # the next call meets another state


# -- errors of an object's own rebuilding code --------------------------------------------------


class RefusesState:
    def __init__(self) -> None:
        self.weight = torch.ones(2)

    def __setstate__(self, state: Any) -> None:
        raise ValueError("this state is not accepted")


class RefusesItems(list[Any]):
    def append(self, item: Any) -> None:
        raise KeyError("no items")


class RefusesKeys(dict[Any, Any]):
    def __setitem__(self, key: Any, value: Any) -> None:
        raise RuntimeError("no keys")


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        (RefusesState(), "this state is not accepted"),
        (RefusesItems([1]), "no items"),
        (RefusesKeys({"a": 1}), "no keys"),
    ],
    ids=["__setstate__", "append", "__setitem__"],
)
def test_an_error_rebuilding_an_object_is_unstageable_by_path(
    stager: Driver, bad: Any, fragment: str
) -> None:
    # It came out raw (ValueError, KeyError, RuntimeError), naming no path.
    for _ in range(2):
        with pytest.raises(astage.UnstageableError, match=fragment) as raised:
            stager.stage({"ok": torch.ones(1), "deep": [{"bad": bad}]})
        assert raised.value.path == ("deep", 0, "bad")
        assert str(raised.value).startswith("at ['deep'][0]['bad']: ")
    weight = torch.randn(2)
    assert_staged(stager.stage({"w": weight})["w"], weight)  # the stager is still usable


# -- weakref mappings ---------------------------------------------------------------------------


def test_weak_value_dictionary_is_copied_like_deepcopy(stager: Driver) -> None:
    # Its weak references cannot be rebuilt through __reduce_ex__: it was refused, where
    # copy.deepcopy (its __deepcopy__) keeps the values and copies the keys.
    held = Holder(torch.randn(3))
    key = (1, "k")
    source: weakref.WeakValueDictionary[Any, Holder] = weakref.WeakValueDictionary()
    source[key] = held
    expected = copy.deepcopy({"map": source, "held": held})
    for _ in range(2):
        staged = stager.stage({"map": source, "held": held})
        assert type(staged["map"]) is type(expected["map"]) is weakref.WeakValueDictionary
        assert staged["map"] is not source
        assert dict(staged["map"]) == dict(expected["map"]) == {key: held}
        assert staged["map"][key] is held  # weakly held: the same object, as deepcopy keeps it
        assert staged["held"] is not held
        assert_staged(staged["held"].weight, held.weight)
    assert dict(source) == {key: held}


def test_weak_key_dictionary_is_copied_like_deepcopy(stager: Driver) -> None:
    held = Holder(torch.randn(3))
    value = {"t": torch.randn(2)}
    source: weakref.WeakKeyDictionary[Holder, Any] = weakref.WeakKeyDictionary()
    source[held] = value
    expected = copy.deepcopy(source)
    for _ in range(2):
        staged = stager.stage({"map": source, "value": value})
        assert type(staged["map"]) is weakref.WeakKeyDictionary and staged["map"] is not source
        assert list(staged["map"].keys()) == list(expected.keys()) == [held]
        assert staged["map"][held] is staged["value"]  # deep-copied, shared with its other path
        assert_staged(staged["map"][held]["t"], value["t"])
    assert source[held] is value


def test_a_weak_key_dictionary_copy_forgets_a_dead_key(stager: Driver) -> None:
    # Rebuilt through __reduce_ex__, the copy got the source's removal callback: a key that
    # died was removed from the source only, and the copy kept counting it.
    for _ in range(2):
        key = Holder(torch.ones(1))
        source: weakref.WeakKeyDictionary[Holder, Any] = weakref.WeakKeyDictionary()
        source[key] = torch.randn(2)
        staged = stager.stage({"map": source})
        assert len(staged["map"]) == 1
        del key
        collect()
        assert len(source) == 0
        assert len(staged["map"]) == 0
        assert dict(staged["map"]) == {}


# -- what __reduce_ex__ gives -------------------------------------------------------------------


class Reduces:
    """An object whose ``__reduce_ex__`` gives what it was made with."""

    def __init__(self, reduced: Any) -> None:
        self.reduced = reduced

    def __reduce_ex__(self, protocol: object) -> Any:
        return self.reduced


class ListState:
    """A state that is not a dict of attributes, and no ``__setstate__`` to take it."""

    def __init__(self) -> None:
        self.weight = torch.ones(2)

    def __getstate__(self) -> Any:
        return [self.weight]


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        (Reduces(None), "__reduce_ex__ gave a NoneType"),
        (Reduces((dict,)), "__reduce_ex__ gave a tuple"),
        (Reduces((dict, [()])), "__reduce_ex__ gave a tuple"),  # arguments not a tuple
        (Reduces((dict, (), None, None, None, None, None)), "__reduce_ex__ gave a tuple"),
        (ListState(), "its state is a list"),
    ],
    ids=["none", "one-item", "list-arguments", "seven-items", "list-state"],
)
def test_a_reduction_pickle_refuses_is_unstageable_by_path(
    stager: Driver, bad: Any, fragment: str
) -> None:
    # They came out raw (TypeError, ValueError, AttributeError), naming no path.
    for _ in range(2):
        with pytest.raises(astage.UnstageableError, match=fragment) as raised:
            stager.stage({"w": torch.ones(1), "cfg": {"bad": bad}})
        assert raised.value.path == ("cfg", "bad")


def _set_by_setter(obj: Any, state: Any) -> None:
    obj.__dict__["set_by"] = state


def test_a_reductions_state_setter_sets_the_state(stager: Driver) -> None:
    # pickle's sixth item (protocol 5) sets the state in place of __setstate__; the walk
    # ignored it and put the state into __dict__ as it was.
    weight = torch.randn(3)
    source = Reduces(None)
    source.reduced = (Holder.__new__, (Holder,), {"weight": weight}, None, None, _set_by_setter)
    for _ in range(2):
        staged = stager.stage({"obj": source, "w": weight})
        assert type(staged["obj"]) is Holder
        assert list(staged["obj"].__dict__) == ["set_by"]
        assert staged["obj"].__dict__["set_by"]["weight"] is staged["w"]
        assert_staged(staged["w"], weight)


# -- Parameters of the rare tensor kinds --------------------------------------------------------


def test_a_parameter_of_a_wrapper_subclass_stays_a_parameter(stager: Driver) -> None:
    # FSDP2's parameters are DTensors made Parameters (a flag isinstance() reads): unflattened,
    # the staged one was a plain wrapper, no Parameter, requires_grad lost; a dense Parameter
    # keeps both.
    two_tensor = pytest.importorskip("torch.testing._internal.two_tensor")
    a, b = torch.randn(3), torch.randn(3)
    source: Any = torch.nn.Parameter(two_tensor.TwoTensor(a, b))
    frozen: Any = torch.nn.Parameter(
        two_tensor.TwoTensor(a.clone(), b.clone()), requires_grad=False
    )
    expected = copy.deepcopy(source)
    for _ in range(2):
        staged = stager.stage({"p": source, "frozen": frozen})
        for key, param in (("p", source), ("frozen", frozen)):
            assert type(staged[key]) is two_tensor.TwoTensor
            assert isinstance(staged[key], torch.nn.Parameter)
            assert staged[key].requires_grad is param.requires_grad
            assert_staged(staged[key].a, param.a)
            assert_staged(staged[key].b, param.b)
        assert isinstance(expected, torch.nn.Parameter) and expected.requires_grad


@pytest.mark.filterwarnings("ignore:Sparse")
@pytest.mark.parametrize("requires_grad", [True, False])
@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_a_sparse_parameter_stays_a_parameter(
    stager: Driver, layout: str, requires_grad: bool
) -> None:
    # It came back a plain sparse tensor, requires_grad lost.
    dense = torch.randn(4, 5).relu()
    sparse = dense.to_sparse() if layout == "coo" else dense.to_sparse_csr()
    source = torch.nn.Parameter(sparse, requires_grad=requires_grad)
    for _ in range(2):
        staged = stager.stage({"p": source})["p"]
        assert type(staged) is torch.nn.Parameter
        assert staged.layout is source.layout
        assert staged.requires_grad is requires_grad
        assert torch.equal(staged.detach().to_dense(), dense)


# -- nesting past the recursion limit through objects the depth count did not follow ------------


class Link:
    __slots__ = ("next",)

    def __init__(self, next: Any) -> None:
        self.next = next


def _chain(make: Any) -> Any:
    link: Any = torch.ones(1)
    for _ in range(3 * sys.getrecursionlimit()):
        link = make(link)
    return link


@pytest.mark.parametrize(
    ("make", "step"),
    [(Link, Attr("next")), (lambda link: collections.deque([link]), 0)],
    ids=["slots", "deque"],
)
def test_a_chain_of_slotted_objects_or_deques_too_deep_is_refused_by_path(
    stager: Driver, make: Any, step: Any
) -> None:
    # The depth count followed dicts, lists, tuples and __dict__ only: past the recursion
    # limit through __slots__ (or deques, or frozensets) the walk's RecursionError came out raw.
    deep = _chain(make)
    for _ in range(2):
        with pytest.raises(astage.UnstageableError, match=r"levels deep") as caught:
            stager.stage({"model": deep})
        assert caught.value.path == ("model", *[step] * 7)
    fine = {"a": [torch.arange(3)]}
    assert torch.equal(stager.stage(fine)["a"][0], fine["a"][0])


def test_a_chain_of_frozensets_too_deep_is_refused(stager: Driver) -> None:
    deep = _chain(lambda link: frozenset([link]))
    with pytest.raises(astage.UnstageableError, match=r"levels deep") as caught:
        stager.stage({"model": deep})
    assert caught.value.path is not None and caught.value.path[0] == "model"
    assert len(caught.value.path) == 8


# -- copies that cannot be hashed where their sources could ---------------------------------------


class HashedByName:
    """Hashed by an attribute: a copy met again through a cycle does not have it yet."""

    name: str

    def __hash__(self) -> int:
        return hash(self.name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HashedByName) and other.name == self.name


@pytest.mark.parametrize("container", ["set", "frozenset", "dict key"])
def test_a_copy_that_cannot_be_hashed_is_unstageable_by_path(
    stager: Driver, container: str
) -> None:
    # copy.deepcopy fails the same way (AttributeError); the walk raised that raw error.
    key = HashedByName()
    key.name = "k"
    owner: Any = {"set": set, "frozenset": frozenset}.get(container)
    key.owner = owner([key]) if owner else {key: torch.ones(1)}  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        copy.deepcopy({"key": key})
    for _ in range(2):
        with pytest.raises(astage.UnstageableError, match="name") as caught:
            stager.stage({"w": torch.ones(1), "key": key})
        assert caught.value.path == ("key", Attr("owner"))


def test_a_sparse_tensors_python_attributes_are_staged_with_it(stager: Driver) -> None:
    # A strided tensor's attributes were staged (t.tag = "x"), a sparse tensor's were dropped;
    # copy.deepcopy keeps them. A tensor in one is staged too.
    sparse = torch.sparse_coo_tensor(torch.tensor([[0, 2]]), torch.tensor([1.0, 2.0]), (4,))
    sparse.tag = "x"  # type: ignore[attr-defined]
    sparse.scale = torch.tensor([3.0])  # type: ignore[attr-defined]
    for _ in range(2):
        staged = stager.stage({"s": sparse})["s"]
        assert staged.layout is torch.sparse_coo
        assert torch.equal(staged.to_dense(), sparse.to_dense())
        assert getattr(staged, "tag") == "x"  # noqa: B009 - a tensor's own attribute
        scale, source_scale = getattr(staged, "scale"), getattr(sparse, "scale")  # noqa: B009
        assert torch.equal(scale, source_scale)
        assert scale.data_ptr() != source_scale.data_ptr()
