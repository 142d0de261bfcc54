"""Walk and reconstruction semantics (DESIGN.md section 2), checked on every driver.

Every test here runs three times: SyncStager, Stager on asyncio and Stager on uvloop, through
the ``stager`` fixture from conftest.py.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import enum
import functools
import gc
import math
import re
import sys
import threading
import types
import weakref
from typing import Any, NamedTuple

import pytest
import torch
from conftest import (
    DTYPES,
    Driver,
    assert_staged,
    assert_tree_staged,
    model_state_dict,
    mutate_,
    storage_ptr,
    tensors_of,
)

import astage

# -- tensors ------------------------------------------------------------------------------------


def _sample(dtype: torch.dtype, *shape: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if dtype is torch.bool:
        return torch.rand(*shape, generator=g) > 0.5
    if dtype.is_complex:
        return torch.randn(*shape, dtype=dtype, generator=g)
    if dtype.is_floating_point:
        return torch.randn(*shape, generator=g).to(dtype)
    return torch.randint(0, 100, shape, generator=g).to(dtype)


def test_model_state_dict_round_trip(stager: Driver) -> None:
    source = model_state_dict()
    staged = stager.stage(source)
    assert_tree_staged(staged, source)
    assert staged is not source
    assert staged["model"] is not source["model"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype(stager: Driver, dtype: torch.dtype) -> None:
    x = _sample(dtype, 6, 5)
    source = {"x": x, "t": x.t(), "row": x[2], "scalar": x[1, 1]}
    staged = stager.stage(source)
    for key, value in source.items():
        assert_staged(staged[key], value)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.empty(0),
        lambda: torch.empty(3, 0, 2),
        lambda: torch.empty(0, dtype=torch.int64),
        lambda: torch.arange(10.0)[10:],  # empty view at the end of a non-empty storage
    ],
    ids=["empty", "empty-3d", "empty-int", "empty-view"],
)
def test_empty_tensors(stager: Driver, make: Any) -> None:
    x = make()
    staged = stager.stage({"x": x, "again": [x]})
    assert_staged(staged["x"], x)
    assert staged["again"][0] is staged["x"]


def test_zero_dim_tensors(stager: Driver) -> None:
    source = {"f": torch.tensor(3.5), "i": torch.tensor(7), "b": torch.tensor(True)}
    staged = stager.stage(source)
    for key, value in source.items():
        assert_staged(staged[key], value)
        assert staged[key].item() == value.item()


@pytest.mark.parametrize(
    "view",
    [
        lambda x: x.t(),
        lambda x: x[::2],
        lambda x: x[:, 1::3],
        lambda x: x[3:5],
        lambda x: x[0].expand(4, 12),
        lambda x: x.view(4, 6, 6).permute(2, 0, 1),
        lambda x: x.view(1, 4, 6, 6).contiguous(memory_format=torch.channels_last),
        lambda x: torch.as_strided(x, (3, 3), (5, 2), 7),
    ],
    ids=[
        "transpose",
        "row-step",
        "col-step",
        "offset",
        "expand",
        "permute",
        "channels-last",
        "as-strided",
    ],
)
def test_non_contiguous_tensors(stager: Driver, view: Any) -> None:
    x = torch.randn(12, 12)
    y = view(x)
    staged = stager.stage({"y": y})
    assert_staged(staged["y"], y)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.empty(3, 1).as_strided((3, 1), (1, 7)),
        lambda: torch.empty(1, 4).as_strided((1, 4), (100, 1)),
        lambda: torch.empty(2, 1, 3).as_strided((2, 1, 3), (3, 0, 1)),
        lambda: torch.empty(0, 3).as_strided((0, 3), (5, 1)),
        lambda: torch.empty(4, 0).as_strided((4, 0), (1, 9)),
        lambda: torch.empty(1).as_strided((1,), (3,)),
        lambda: torch.empty(1, 1).as_strided((1, 1), (0, 0)),
    ],
    ids=["size1-last", "size1-first", "size1-middle", "size0-first", "size0-last", "1d", "zeros"],
)
def test_strides_of_size_one_and_empty_dims_are_kept(stager: Driver, make: Any) -> None:
    # is_contiguous() ignores the stride of a size-1 or size-0 dimension, but copy.deepcopy and
    # DCP's StateDictStager keep it; a first call and a cached one both must.
    x = make().fill_(1.5)
    assert x.is_contiguous()
    for _ in range(2):
        staged = stager.stage({"x": x})["x"]
        assert (staged.shape, staged.stride(), staged.storage_offset()) == (
            x.shape,
            x.stride(),
            x.storage_offset(),
        )
        assert staged.device.type == "cpu"
        assert torch.equal(staged, x)
        if x.untyped_storage().nbytes():
            assert storage_ptr(staged) != storage_ptr(x)


def test_cached_call_keeps_strides_of_a_new_view_on_a_cached_storage(stager: Driver) -> None:
    # The cached fast path reuses the view staged last time when a tensor looks the same;
    # a tensor of the same shape on the same storage with another stride on a size-1
    # dimension does not look the same.
    base = torch.randn(3, 1)
    stager.stage({"t": base})
    odd = base.as_strided((3, 1), (1, 5))
    staged = stager.stage({"t": odd})["t"]
    assert staged.stride() == (1, 5)
    assert_staged(staged, odd)


@pytest.mark.parametrize("bool_first", [True, False], ids=["bool-first", "uint8-first"])
def test_bool_view_of_uint8_data_keeps_the_bytes(stager: Driver, bool_first: bool) -> None:
    # Copying a bool tensor as bool turns every nonzero byte into 1: a storage is copied as
    # bytes, whatever dtype the view that reaches it first has.
    data = torch.tensor([0, 2, 255, 7, 1, 128], dtype=torch.uint8)
    flags = data.view(torch.bool)
    source = {"b": flags, "u": data} if bool_first else {"u": data, "b": flags}
    for _ in range(2):  # the first call and a cached one
        staged = stager.stage(source)
        assert staged["u"].tolist() == data.tolist()
        assert torch.equal(staged["b"].view(torch.uint8), data)
        assert storage_ptr(staged["b"]) == storage_ptr(staged["u"])


def test_bool_tensor_alone_keeps_its_bytes(stager: Driver) -> None:
    flags = torch.tensor([3, 0, 1, 255], dtype=torch.uint8).view(torch.bool)
    for _ in range(2):
        assert torch.equal(
            stager.stage({"b": flags})["b"].view(torch.uint8), flags.view(torch.uint8)
        )


SUB_BYTE_DTYPES = [
    dtype
    for name in ("uint1", "uint4", "int1", "int7")
    if isinstance(dtype := getattr(torch, name, None), torch.dtype)
]


@pytest.mark.skipif(not SUB_BYTE_DTYPES, reason="this torch has no sub-byte shell dtypes")
@pytest.mark.parametrize("dtype", SUB_BYTE_DTYPES, ids=str)
def test_sub_byte_dtypes_are_staged_as_their_bytes(stager: Driver, dtype: torch.dtype) -> None:
    # torch has no copy kernel for the sub-byte shell dtypes (copy_ raises NotImplementedError):
    # their storages are copied as bytes, like a bool's, whole tensors and views alike.
    data = torch.arange(12, dtype=torch.uint8)
    source = {"whole": data.view(dtype), "part": data.view(dtype)[3:9:2]}
    for round_ in range(3):  # the first call, a cached one and a replay
        data.add_(1)
        staged = stager.stage(source)
        for key, value in source.items():
            assert staged[key].dtype is dtype, (round_, key)
            assert staged[key].shape == value.shape and staged[key].stride() == value.stride()
            assert staged[key].untyped_storage().data_ptr() != data.data_ptr()
        assert torch.equal(staged["whole"].view(torch.uint8), data)
        assert staged["part"].storage_offset() == 3
        assert storage_ptr(staged["part"]) == storage_ptr(staged["whole"])


def test_a_state_dict_nested_too_deep_is_refused_by_path(stager: Driver) -> None:
    # The walk recurses once per level: past the interpreter's recursion limit a state dict is
    # an UnstageableError naming the path's first keys and the depth, not a RecursionError;
    # and the stager stages the next state dict as if nothing had happened.
    deep: dict[str, Any] = {"t": torch.ones(2)}
    for _ in range(3 * sys.getrecursionlimit()):
        deep = {"n": deep}
    with pytest.raises(astage.UnstageableError, match=r"levels deep") as caught:
        stager.stage({"model": deep})
    assert caught.value.path == ("model", *["n"] * 7)
    assert f"{3 * sys.getrecursionlimit() + 2} levels deep" in str(caught.value)
    fine = {"a": [torch.arange(3)]}
    assert torch.equal(stager.stage(fine)["a"][0], fine["a"][0])


def test_conj_and_neg_views(stager: Driver) -> None:
    z = torch.randn(4, 3, dtype=torch.complex64)
    source = {"conj": z.conj(), "neg": z.conj().imag, "conj-t": z.conj().t()}
    assert source["conj"].is_conj() and source["neg"].is_neg()
    staged = stager.stage(source)
    for key, value in source.items():
        assert_staged(staged[key], value)
    assert torch.equal(staged["conj"], z.conj())


@pytest.mark.filterwarnings("ignore:Sparse")
def test_sparse_coo(stager: Driver) -> None:
    dense = torch.randn(5, 6).relu()
    coalesced = dense.to_sparse()
    uncoalesced = torch.sparse_coo_tensor(
        torch.tensor([[0, 0, 2], [1, 1, 3]]), torch.tensor([1.0, 2.0, 3.0]), (4, 4)
    )
    staged = stager.stage({"c": coalesced, "u": uncoalesced})
    for key, source in (("c", coalesced), ("u", uncoalesced)):
        assert staged[key].layout is torch.sparse_coo
        assert staged[key].device.type == "cpu"
        assert staged[key].is_coalesced() == source.is_coalesced()
        assert torch.equal(staged[key].to_dense(), source.to_dense())
    assert storage_ptr(staged["c"]._values()) != storage_ptr(coalesced._values())


_COMPRESSED = {
    "csr": lambda d: d.to_sparse_csr(),
    "csc": lambda d: d.to_sparse_csc(),
    "bsr": lambda d: d.to_sparse_bsr((2, 2)),
    "bsc": lambda d: d.to_sparse_bsc((2, 3)),
}


@pytest.mark.filterwarnings("ignore:Sparse")
@pytest.mark.parametrize("layout", list(_COMPRESSED))
def test_sparse_compressed(stager: Driver, layout: str) -> None:
    dense = torch.randn(4, 6).relu()
    source = _COMPRESSED[layout](dense)
    staged = stager.stage({"s": source})["s"]
    assert staged.layout is source.layout
    assert torch.equal(staged.to_dense(), dense)
    assert storage_ptr(staged.values()) != storage_ptr(source.values())


def test_meta_tensor_is_refused(stager: Driver) -> None:
    with pytest.raises(astage.UnstageableError, match=r"\['model'\]\['w'\]"):
        stager.stage({"model": {"w": torch.empty(3, device="meta")}})


@pytest.mark.filterwarnings("ignore:.*quantize")
def test_quantized_tensor_is_refused(stager: Driver) -> None:
    q = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)
    with pytest.raises(astage.UnstageableError, match=r"\['q'\]"):
        stager.stage({"q": q})


@pytest.mark.filterwarnings("ignore:.*nested")
def test_nested_tensor_is_refused(stager: Driver) -> None:
    nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
    with pytest.raises(astage.UnstageableError, match=r"\['nt'\]"):
        stager.stage({"nt": nested})


def test_a_nested_view_of_a_staged_storage_is_refused_by_name(stager: Driver) -> None:
    # Its storage already had a buffer (the dense tensor's, from an earlier call), and the
    # walk read its sizes, which a nested tensor refuses: a raw RuntimeError, no path.
    weight = torch.randn(4, 4)
    stager.stage({"w": weight})
    nested = torch.nested.as_nested_tensor(weight, layout=torch.strided)
    with pytest.raises(astage.UnstageableError, match=r"\['n'\]"):
        stager.stage({"n": nested})


def test_bare_tensor_as_root(stager: Driver) -> None:
    x = torch.randn(3, 2).t()
    assert_staged(stager.stage(x), x)


@pytest.mark.parametrize("root", [None, 5, "s", [], {}], ids=repr)
def test_trivial_roots(stager: Driver, root: Any) -> None:
    assert stager.stage(root) == root


def test_unstageable_root_is_named_root(stager: Driver) -> None:
    with pytest.raises(astage.UnstageableError, match="<root>") as info:
        stager.stage(threading.Lock())
    assert info.value.path == ()


# -- copies, not aliases ------------------------------------------------------------------------


def test_cpu_inputs_are_copied(stager: Driver) -> None:
    source = model_state_dict()
    staged = stager.stage(source)
    expected = model_state_dict()  # same seed: the values before the "training step"
    mutate_(source)
    assert_tree_staged(staged, expected)


def test_staged_tensors_never_alias_input_memory(stager: Driver) -> None:
    source = model_state_dict()
    staged = stager.stage(source)
    inputs = {storage_ptr(t) for t in tensors_of(source)}
    assert inputs.isdisjoint(storage_ptr(t) for t in tensors_of(staged))


def test_aliasing_is_preserved(stager: Driver) -> None:
    base = torch.randn(10, 4)
    source: dict[str, Any] = {
        "base": base,
        "slice": base[2:5],
        "transpose": base.t(),
        "flat": base.view(-1),
        "bytes": base.view(torch.uint8),
        "tied": {"a": base},
        "other": torch.randn(3),
    }
    staged = stager.stage(source)
    ptr = storage_ptr(staged["base"])
    for key in ("slice", "transpose", "flat", "bytes"):
        assert storage_ptr(staged[key]) == ptr, key
        assert_staged(staged[key], source[key])
    assert staged["tied"]["a"] is staged["base"]
    assert storage_ptr(staged["other"]) != ptr
    # Writing through one staged alias is visible through the others, as in the source.
    staged["slice"].fill_(42.0)
    assert torch.all(staged["base"][2:5] == 42.0)


def test_view_of_a_larger_storage_keeps_offset(stager: Driver) -> None:
    base = torch.arange(100.0)
    staged = stager.stage({"window": base[40:50]})["window"]
    assert staged.storage_offset() == 40
    assert staged.untyped_storage().nbytes() == base.untyped_storage().nbytes()
    assert torch.equal(staged, base[40:50])


def test_each_storage_is_copied_once(stager: Driver) -> None:
    base = torch.randn(64)
    source: dict[str, Any] = {
        "a": base,
        "b": base[8:],
        "c": [base[:4], base.view(8, 8)],
        "d": torch.randn(8),
    }
    stager.stage(source)
    stats = stager.last_stats
    assert stats is not None
    assert stats.storages == 2
    assert stats.nbytes == base.nbytes + source["d"].nbytes


def test_same_tensor_twice_is_staged_once(stager: Driver) -> None:
    x = torch.randn(3)
    staged = stager.stage({"a": x, "b": [x, (x,)]})
    assert staged["a"] is staged["b"][0] is staged["b"][1][0]


# -- containers and objects ---------------------------------------------------------------------


class Point(NamedTuple):
    x: Any
    y: Any


@dataclasses.dataclass
class Plain:
    weight: torch.Tensor
    step: int = 0


@dataclasses.dataclass(frozen=True)
class Frozen:
    weight: torch.Tensor
    name: str = "f"


@dataclasses.dataclass(frozen=True, slots=True)
class FrozenSlots:
    weight: torch.Tensor
    extra: Any = None


@dataclasses.dataclass(slots=True)
class Slots:
    weight: torch.Tensor
    step: int = 0


class WithDict:
    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.scale = 2.0

    def scaled(self) -> torch.Tensor:
        return self.weight * self.scale


class WithSlots:
    __slots__ = ("bias", "weight")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        self.weight = weight
        self.bias = bias


class WithState:
    """Custom __getstate__/__setstate__: the rebuilt object goes through __setstate__."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.cache = "not copied"

    def __getstate__(self) -> dict[str, Any]:
        return {"weight": self.weight}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.weight = state["weight"]
        self.cache = "rebuilt"


class Reduced:
    """Custom __reduce_ex__: rebuilt as ``Reduced(weight, tag)``."""

    def __init__(self, weight: torch.Tensor, tag: str) -> None:
        self.weight = weight
        self.tag = tag

    def __reduce_ex__(self, protocol: object) -> tuple[Any, ...]:
        return (Reduced, (self.weight, self.tag))


class Color(enum.Enum):
    RED = 1


class Level(enum.IntEnum):
    HIGH = 3


def test_dict_types_are_kept(stager: Driver) -> None:
    x = torch.randn(3)
    ordered = collections.OrderedDict([("b", x), ("a", 1)])
    default: collections.defaultdict[str, list[Any]] = collections.defaultdict(list)
    default["w"].append(x)
    counter = collections.Counter({"a": 2})
    staged = stager.stage({"o": ordered, "d": default, "c": counter})
    assert type(staged["o"]) is collections.OrderedDict
    assert list(staged["o"]) == ["b", "a"]
    assert_staged(staged["o"]["b"], x)
    assert type(staged["d"]) is collections.defaultdict
    assert staged["d"].default_factory is list
    assert staged["d"]["w"][0] is staged["o"]["b"]
    assert staged["d"]["new"] == []  # still a working defaultdict
    assert staged["c"] == counter and type(staged["c"]) is collections.Counter


def test_lists_tuples_namedtuples(stager: Driver) -> None:
    x = torch.randn(2)
    source = {"l": [x, 1, "s"], "t": (x, 2.0), "p": Point(x, Point(1, x)), "atomic": (1, "a")}
    staged = stager.stage(source)
    assert type(staged["l"]) is list and staged["l"][1:] == [1, "s"]
    assert type(staged["t"]) is tuple and staged["t"][1] == 2.0
    assert type(staged["p"]) is Point and type(staged["p"].y) is Point
    assert_staged(staged["p"].x, x)
    assert staged["p"].y.y is staged["p"].x is staged["l"][0] is staged["t"][0]
    assert staged["atomic"] == (1, "a")


class Annotated(collections.namedtuple("Annotated", "a b")):
    """A namedtuple subclass without ``__slots__``: its instances carry a ``__dict__``."""

    note: list[str]


def test_namedtuples_are_new_objects_like_deepcopy(stager: Driver) -> None:
    # copy.deepcopy (and DCP's StateDictStager) rebuild a namedtuple even when nothing inside
    # is mutable; only plain tuples of atomic values are returned as they are.
    atomic = Point(1, "a")
    tagged = Annotated(1, 2)
    tagged.note = ["mutable"]
    staged = stager.stage({"p": atomic, "t": (1, "a"), "tagged": tagged})
    assert staged["p"] == atomic and staged["p"] is not atomic
    assert staged["tagged"] == tagged and type(staged["tagged"]) is Annotated
    assert staged["tagged"].note == ["mutable"]
    assert staged["tagged"].note is not tagged.note
    assert staged["t"] is copy.deepcopy(staged["t"])


def test_sets_and_frozensets(stager: Driver) -> None:
    source = {"s": {1, 2, "a"}, "f": frozenset({(1, 2), 3})}
    staged = stager.stage(source)
    assert staged == source
    assert type(staged["f"]) is frozenset


@pytest.mark.parametrize("cls", [Plain, Frozen, FrozenSlots, Slots], ids=lambda c: c.__name__)
def test_dataclasses(stager: Driver, cls: Any) -> None:
    x = torch.randn(4)
    obj = cls(x)
    staged = stager.stage({"obj": obj, "x": x})
    assert type(staged["obj"]) is cls
    assert staged["obj"] is not obj
    assert_staged(staged["obj"].weight, x)
    assert staged["obj"].weight is staged["x"]
    assert dataclasses.asdict(staged["obj"]).keys() == dataclasses.asdict(obj).keys()


def test_frozen_dataclass_stays_frozen(stager: Driver) -> None:
    staged = stager.stage([Frozen(torch.randn(2)), FrozenSlots(torch.randn(2))])
    for obj in staged:
        with pytest.raises(dataclasses.FrozenInstanceError):
            obj.weight = None


def test_plain_objects_and_slots(stager: Driver) -> None:
    w, b = torch.randn(3), torch.randn(3)
    source = {"d": WithDict(w), "s": WithSlots(w, b)}
    staged = stager.stage(source)
    assert type(staged["d"]) is WithDict and staged["d"].scale == 2.0
    assert type(staged["s"]) is WithSlots
    assert_staged(staged["d"].weight, w)
    assert_staged(staged["s"].bias, b)
    assert staged["s"].weight is staged["d"].weight
    assert torch.equal(staged["d"].scaled(), w * 2.0)


def test_getstate_setstate_and_reduce_ex(stager: Driver) -> None:
    w = torch.randn(3)
    staged = stager.stage({"state": WithState(w), "reduced": Reduced(w, "t")})
    assert type(staged["state"]) is WithState
    assert staged["state"].cache == "rebuilt"
    assert_staged(staged["state"].weight, w)
    assert type(staged["reduced"]) is Reduced and staged["reduced"].tag == "t"
    assert staged["reduced"].weight is staged["state"].weight


def test_functools_partial(stager: Driver) -> None:
    w = torch.randn(3)
    source = functools.partial(torch.add, w, alpha=2)
    staged = stager.stage(source)
    assert type(staged) is functools.partial
    assert_staged(staged.args[0], w)
    assert staged.keywords == {"alpha": 2}


def test_shared_references(stager: Driver) -> None:
    inner = {"w": torch.randn(2)}
    obj = WithDict(torch.randn(2))
    source = {"a": inner, "b": inner, "c": [obj, obj], "d": obj}
    staged = stager.stage(source)
    assert staged["a"] is staged["b"]
    assert staged["a"] is not inner
    assert staged["c"][0] is staged["c"][1] is staged["d"]


def test_cycles(stager: Driver) -> None:
    looped: list[Any] = [torch.randn(2)]
    looped.append(looped)
    selfish: dict[str, Any] = {"w": torch.randn(2)}
    selfish["me"] = selfish
    obj = WithDict(torch.randn(2))
    obj.me = obj  # type: ignore[attr-defined]
    through_tuple: list[Any] = []
    through_tuple.append((through_tuple, torch.randn(1)))
    staged = stager.stage({"l": looped, "d": selfish, "o": obj, "t": through_tuple})
    assert staged["l"][1] is staged["l"] and staged["l"] is not looped
    assert_staged(staged["l"][0], looped[0])
    assert staged["d"]["me"] is staged["d"] and staged["d"] is not selfish
    assert staged["o"].me is staged["o"]
    assert staged["t"][0][0] is staged["t"]
    assert_staged(staged["t"][0][1], through_tuple[0][1])


def test_bound_methods(stager: Driver) -> None:
    obj = WithDict(torch.randn(3))
    staged = stager.stage({"obj": obj, "fn": obj.scaled})
    assert isinstance(staged["fn"], types.MethodType)
    assert staged["fn"].__self__ is staged["obj"]
    assert staged["fn"].__func__ is WithDict.scaled
    assert torch.equal(staged["fn"](), obj.scaled())


def _module_function() -> None:
    pass


@pytest.mark.parametrize(
    "value",
    [
        0,
        2**100,
        1.5,
        math.inf,
        1j,
        True,
        None,
        "text",
        b"bytes",
        int,
        WithDict,
        _module_function,
        lambda: 1,
        len,
        torch.float32,
        torch.device("cpu"),
        torch.Size([2, 3]),
        torch.strided,
        Color.RED,
        Level.HIGH,
        range(3),
        Ellipsis,
        math,  # a module
        (1, "a", None, (2.0, torch.float16)),  # a tuple of atomic values is its own copy
    ],
    # Stable across processes (pytest-xdist compares the workers' ids): no addresses in them.
    ids=lambda value: re.sub(r" at 0x[0-9a-f]+", "", repr(value)),
)
def test_atomic_values_are_returned_as_is(stager: Driver, value: Any) -> None:
    staged = stager.stage({"v": value, "in_list": [value]})
    assert staged["v"] is value
    assert staged["in_list"][0] is value


def test_tensor_attributes(stager: Driver) -> None:
    x, other = torch.randn(3), torch.randn(2)
    x.scale = 0.5  # type: ignore[attr-defined]
    x.buddy = other  # type: ignore[attr-defined]
    x.meta = {"name": "w", "t": other}  # type: ignore[attr-defined]
    staged = stager.stage({"x": x, "other": other})
    assert_staged(staged["x"], x)
    assert staged["x"].scale == 0.5
    assert staged["x"].buddy is staged["other"]
    assert staged["x"].meta["t"] is staged["other"]
    assert staged["x"].meta is not x.__dict__["meta"]  # __dict__ contents are deep-copied too
    assert_staged(staged["x"].buddy, other)


def test_tensor_attribute_only_reachable_through_the_tensor(stager: Driver) -> None:
    x, hidden = torch.randn(3), torch.randn(5)
    x.hidden = hidden  # type: ignore[attr-defined]
    staged = stager.stage({"x": x})
    assert_staged(staged["x"].hidden, hidden)


def test_tensor_attribute_referring_to_itself(stager: Driver) -> None:
    x = torch.randn(3)
    x.me = x  # type: ignore[attr-defined]
    staged = stager.stage({"x": x})
    assert staged["x"].me is staged["x"]


class Tagged(torch.Tensor):
    """A plain Python tensor subclass (not a wrapper subclass) that carries attributes."""

    tag: str
    offsets: torch.Tensor


def test_tensor_subclass_keeps_type_and_attributes(stager: Driver) -> None:
    base = torch.randn(4)
    t = torch.Tensor._make_subclass(Tagged, base)
    t.tag = "shard-0"
    t.offsets = torch.tensor([0, 4])
    staged = stager.stage({"t": t})["t"]
    assert type(staged) is Tagged
    assert staged.tag == "shard-0"
    assert staged.device.type == "cpu"
    assert torch.equal(staged.as_subclass(torch.Tensor), base)
    assert storage_ptr(staged) != storage_ptr(base)
    assert_staged(staged.offsets, t.offsets)


@pytest.mark.parametrize("requires_grad", [True, False])
def test_parameters_keep_type_and_requires_grad(stager: Driver, requires_grad: bool) -> None:
    p = torch.nn.Parameter(torch.randn(3, 2), requires_grad=requires_grad)
    staged = stager.stage({"p": p, "view": p.detach()[1]})
    assert type(staged["p"]) is torch.nn.Parameter
    assert staged["p"].requires_grad is requires_grad
    assert torch.equal(staged["p"].detach(), p.detach())
    assert storage_ptr(staged["p"]) != storage_ptr(p)
    assert storage_ptr(staged["view"]) == storage_ptr(staged["p"])


def test_module_state_dict(stager: Driver) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    source = model.state_dict()
    staged = stager.stage(source)
    assert type(staged) is type(source)
    assert list(staged) == list(source)
    for key, value in source.items():
        assert_staged(staged[key], value)


def test_module_state_dict_keeps_metadata(stager: Driver) -> None:
    # load_state_dict reads _metadata (module versions); copy.deepcopy keeps it, so must we.
    source = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).state_dict()
    staged = stager.stage(source)
    assert staged._metadata == source._metadata  # type: ignore[attr-defined]


def test_optimizer_state_dict(stager: Driver) -> None:
    model = torch.nn.Linear(4, 3)
    optim = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optim.step()
    source = {"model": model.state_dict(), "optim": optim.state_dict()}
    staged = stager.stage(source)
    assert_tree_staged(staged, source)


# -- errors -------------------------------------------------------------------------------------


def _generator() -> Any:
    yield 1


@pytest.mark.parametrize(
    "bad", [threading.Lock(), _generator(), threading.Event()], ids=["lock", "generator", "event"]
)
def test_unstageable_object_deep_inside_names_its_path(stager: Driver, bad: Any) -> None:
    source = model_state_dict()
    source["optim"]["state"][3] = {"exp_avg": torch.randn(2), "lock": bad}
    with pytest.raises(astage.AstageError) as info:
        stager.stage(source)
    assert "['optim']['state'][3]['lock']" in str(info.value)
    assert isinstance(info.value, astage.UnstageableError)


def test_unstageable_attribute_path_uses_attribute_syntax(stager: Driver) -> None:
    obj = WithDict(torch.randn(2))
    obj.lock = threading.Lock()  # type: ignore[attr-defined]
    with pytest.raises(astage.UnstageableError) as info:
        stager.stage({"holder": [obj]})
    assert "['holder'][0].lock" in str(info.value)
    assert info.value.path == ("holder", 0, astage.Attr("lock"))


def test_unstageable_field_of_a_frozen_slots_dataclass_names_the_field(stager: Driver) -> None:
    # A frozen slots=True dataclass pickles its fields as a list of values; the path still
    # names the field, not its position.
    with pytest.raises(astage.UnstageableError) as info:
        stager.stage({"cfg": FrozenSlots(torch.randn(2), extra=threading.Lock())})
    assert "['cfg'].extra" in str(info.value)
    assert info.value.path == ("cfg", astage.Attr("extra"))


@pytest.mark.parametrize("cls", [Plain, Frozen, FrozenSlots, Slots], ids=lambda c: c.__name__)
def test_unstageable_field_of_any_dataclass_names_the_field(stager: Driver, cls: type) -> None:
    bad = cls(torch.randn(2))
    object.__setattr__(bad, "weight", threading.Lock())
    with pytest.raises(astage.UnstageableError) as info:
        stager.stage({"cfg": bad})
    assert info.value.path == ("cfg", astage.Attr("weight"))


def test_failed_call_leaves_stager_usable(stager: Driver) -> None:
    source = model_state_dict()
    with pytest.raises(astage.AstageError):
        stager.stage({"ok": source, "bad": threading.Lock()})
    assert stager.last_stats is None  # nothing half-staged is reported as done
    assert_tree_staged(stager.stage(source), source)


def test_non_tensor_values_compare_equal(stager: Driver) -> None:
    source: dict[str, Any] = {
        "cfg": {"lr": 0.1, "betas": (0.9, 0.999), "names": ["a", "b"]},
        "n": None,
    }
    staged = stager.stage(source)
    assert staged == source
    assert staged["cfg"]["names"] is not source["cfg"]["names"]  # mutable: copied


# -- tensor wrapper subclasses (how DTensor rides along) ----------------------------------------


def test_traceable_wrapper_subclass(stager: Driver) -> None:
    two_tensor = pytest.importorskip("torch.testing._internal.two_tensor")
    a, b = torch.randn(3), torch.randn(3)
    wrapped = two_tensor.TwoTensor(a, b)
    staged = stager.stage({"t": wrapped, "a": a})
    assert type(staged["t"]) is two_tensor.TwoTensor
    assert_staged(staged["t"].a, a)
    assert_staged(staged["t"].b, b)
    assert staged["t"].a is staged["a"]  # the inner tensor is shared with the outer one


@pytest.fixture(scope="module")
def single_rank_group() -> Any:
    """A one-process gloo group, enough to build DTensors on CPU."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from torch.distributed.device_mesh import DeviceMesh

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        yield DeviceMesh("cpu", [0])
    finally:
        dist.destroy_process_group()


def test_dtensor(stager: Driver, single_rank_group: Any) -> None:
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    full = torch.randn(4, 3)
    dtensor = distribute_tensor(full, single_rank_group, [Shard(0)])
    staged = stager.stage({"w": dtensor})["w"]
    assert type(staged) is DTensor
    assert staged.placements == dtensor.placements
    assert staged.device_mesh is dtensor.device_mesh  # process-global: kept as it is
    assert_staged(staged.to_local(), dtensor.to_local())


def test_the_walk_leaves_no_reference_cycle(stager: Driver) -> None:
    """The staged result dies without waiting for the cyclic GC: its containers with its last
    reference, its tensors (which the stager keeps for later calls' replays) when
    ``clear_cache()`` lets go of them."""
    sd = model_state_dict()
    sd["model"] = collections.OrderedDict(sd["model"])  # weakly referable, unlike a dict
    enabled = gc.isenabled()
    gc.disable()
    try:
        tensors = []
        for _ in range(3):  # first and cached calls
            staged = stager.stage(sd)
            tensors.append(weakref.ref(staged["model"]["proj.bias"]))
            container = weakref.ref(staged["model"])
            del staged
            assert container() is None
        stager.clear_cache()
        assert all(tensor() is None for tensor in tensors)
    finally:
        if enabled:
            gc.enable()
