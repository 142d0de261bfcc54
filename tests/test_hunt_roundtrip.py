"""Round trips found by hunting: what ``astage.save`` accepts, ``astage.load`` gives back equal.

Equal means the same container types (an OrderedDict's ``_metadata`` too), the same plain
values (NaN, -0.0, huge ints, surrogates), and tensors of the same dtype, shape, strides,
storage offset, conj/neg bits and Python attributes, sharing storages as the originals did;
``safetensors.torch.load_file`` reads every entry, and ``load(path, into=...)`` fills ``into``
as ``load(path)`` returns it. What cannot round-trip is refused at save time by an
``UnsavableError`` naming its path. One focused test per defect (each failed before its fix),
then a property test over generated state dicts.
"""

from __future__ import annotations

import argparse
import enum
import math
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import derandomized, tensor_bytes
from safetensors.torch import load_file

import astage


def _save_load(state: Any, path: Path) -> Any:
    astage.save_sync(state, path)
    return astage.load(path)


# -- the defects, one test each -------------------------------------------------------------------


@pytest.mark.parametrize("sign", [1, -1])
def test_an_int_too_long_for_json_is_refused_naming_its_path(tmp_path: Path, sign: int) -> None:
    # Before: json.dumps raised a raw ValueError ("Exceeds the limit (4300 digits) ...").
    state = {"ok": 10**4299, "rng": [0, sign * 10**4300]}
    with pytest.raises(astage.UnsavableError, match=r"4300 decimal digits") as caught:
        astage.save_sync(state, tmp_path / "a.safetensors")
    assert caught.value.path == ("rng", 1)
    assert not (tmp_path / "a.safetensors").exists()
    # Just under the limit round-trips.
    assert _save_load({"ok": sign * (10**4300 - 1)}, tmp_path / "b.safetensors") == {
        "ok": sign * (10**4300 - 1)
    }


def test_an_int_key_too_long_for_json_is_refused(tmp_path: Path) -> None:
    with pytest.raises(astage.UnsavableError, match=r"decimal digits"):
        astage.save_sync({10**5000: 1}, tmp_path / "a.safetensors")


def test_a_lower_digit_limit_of_this_process_is_respected(tmp_path: Path) -> None:
    old = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(1000)
    try:
        with pytest.raises(astage.UnsavableError, match=r"1000 decimal digits"):
            astage.save_sync({"x": 10**2000}, tmp_path / "a.safetensors")
    finally:
        sys.set_int_max_str_digits(old)


@pytest.mark.parametrize("name", ["my-attr", "__private", "name", "T", "data"])
def test_a_tensor_attribute_the_loader_refuses_is_refused_at_save(
    tmp_path: Path, name: str
) -> None:
    # Before: the file was written and then never loaded (CheckpointFormatError "a tensor
    # attribute may not be named ..."), or staging failed with a raw AttributeError.
    tensor = torch.ones(2)
    tensor.__dict__[name] = 1
    with pytest.raises(astage.UnsavableError, match="tensor attribute named") as caught:
        astage.save_sync({"w": tensor}, tmp_path / "a.safetensors")
    assert caught.value.path == ("w", name)
    assert not (tmp_path / "a.safetensors").exists()


def test_attributes_set_on_a_tensor_still_round_trip(tmp_path: Path) -> None:
    tensor = torch.ones(2)
    tensor._is_hf_initialized = True  # type: ignore[attr-defined]
    tensor.tag = "x"  # type: ignore[attr-defined]
    back = _save_load({"w": tensor}, tmp_path / "a.safetensors")
    assert back["w"]._is_hf_initialized is True and back["w"].tag == "x"


def test_two_tensors_of_one_storage_keep_their_own_attributes(tmp_path: Path) -> None:
    # Before: the second path referred to the first's entry as a whole, so both loaded as one
    # object, which took the last path's attributes: a.tag came back as "b", and c gained d's.
    a = torch.arange(4.0)
    a.tag = "a"  # type: ignore[attr-defined]
    b = a.detach()
    b.tag = "b"  # type: ignore[attr-defined]
    c = torch.arange(3.0)
    d = c.detach()
    d.tag = "d"  # type: ignore[attr-defined]
    back = _save_load({"a": a, "b": b, "c": c, "d": d, "a2": a}, tmp_path / "a.safetensors")
    assert back["a"].tag == "a" and back["b"].tag == "b" and back["d"].tag == "d"
    assert not hasattr(back["c"], "tag")
    assert back["a2"] is back["a"]  # the same object at two paths stays one object
    for x, y in (("a", "b"), ("c", "d")):
        assert back[x].untyped_storage().data_ptr() == back[y].untyped_storage().data_ptr()
        assert torch.equal(back[x], back[y])


def test_tied_tensors_without_attributes_still_share_one_entry(tmp_path: Path) -> None:
    weight = torch.randn(4, 3)
    path = tmp_path / "a.safetensors"
    back = _save_load({"emb": weight.detach(), "head": weight.detach()}, path)
    assert back["emb"] is back["head"]
    assert list(load_file(path)) == ["['emb']"]


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.ones(4, 1, 2).transpose(0, 1),  # stride (2, 2, 1): a size-1 dim's
        lambda: torch.empty(0, 3).t(),  # shape (3, 0), stride (1, 3)
        lambda: torch.ones(3).as_strided((3, 1), (1, 7)),  # spans its storage
        lambda: torch.ones(3, 1).t(),  # shape (1, 3), stride (1, 1)
    ],
)
def test_the_strides_of_size_0_and_1_dimensions_come_back(tmp_path: Path, make: Any) -> None:
    # Before: a contiguous tensor that spans its storage was stored as its entry, and loaded
    # with the strides of a new tensor: (8, 2, 1) for shape (1, 4, 2), where it had (2, 2, 1).
    tensor = make()
    path = tmp_path / "a.safetensors"
    back = _save_load({"t": tensor, "u": torch.empty(tensor.shape).copy_(tensor)}, path)
    assert back["t"].stride() == tensor.stride()
    assert back["t"].shape == tensor.shape and torch.equal(back["t"], tensor)
    assert back["u"].stride() == torch.empty(tensor.shape).stride()
    stored = load_file(path)  # still stored under its own name, for other readers
    assert torch.equal(stored["['t']"], tensor)


def test_restore_takes_the_files_ordered_dict_metadata(tmp_path: Path) -> None:
    # Before: load(into=) left `into`'s _metadata alone, where load() returns the file's.
    saved = OrderedDict(w=torch.ones(2))
    saved._metadata = OrderedDict({"": {"version": 1}})  # type: ignore[attr-defined]
    path = tmp_path / "a.safetensors"
    astage.save_sync({"model": saved}, path)
    into_model = OrderedDict(w=torch.zeros(2))
    into_model._metadata = OrderedDict({"": {"version": 2}})  # type: ignore[attr-defined]
    restored = astage.load(path, into={"model": into_model})
    assert restored["model"] is into_model
    assert into_model._metadata == astage.load(path)["model"]._metadata == saved._metadata  # type: ignore[attr-defined]
    assert torch.equal(into_model["w"], torch.ones(2))


def test_restore_into_a_plain_dict_where_the_file_has_metadata(tmp_path: Path) -> None:
    saved = OrderedDict(w=torch.ones(2))
    saved._metadata = OrderedDict({"": {"version": 1}})  # type: ignore[attr-defined]
    path = tmp_path / "a.safetensors"
    astage.save_sync(saved, path)
    into = {"w": torch.zeros(2)}  # a plain dict takes no attribute: kept as it is
    assert astage.load(path, into=into) is into and torch.equal(into["w"], torch.ones(2))


@pytest.mark.parametrize("state", [None, {}, 0, "", []])
def test_a_root_none_loads_as_none(tmp_path: Path, state: Any) -> None:
    # Before: a skeleton of None read as "not an astage file", so None loaded as {}.
    path = tmp_path / "a.safetensors"
    back = _save_load(state, path)
    assert type(back) is type(state) and back == state
    astage.save_sync({"w": torch.ones(1)}, tmp_path / "b.safetensors")
    assert astage.load(path, into=state) == state


def test_restore_matches_nan_keys(tmp_path: Path) -> None:
    # Before: `into`'s NaN key is not the file's NaN (two NaNs are never equal), so every
    # restore of a dict with a NaN key failed ("the file has no key nan").
    path = tmp_path / "a.safetensors"
    astage.save_sync({math.nan: torch.ones(2), "x": 1, -math.nan: torch.full((3,), 2.0)}, path)
    into = {math.nan: torch.zeros(2), "x": 0, float("nan"): torch.zeros(3)}
    assert astage.load(path, into=into) is into
    first, _, last = into.values()
    assert torch.equal(first, torch.ones(2)) and torch.equal(last, torch.full((3,), 2.0))
    assert into["x"] == 1
    with pytest.raises(astage.InvalidOptionsError, match="the file has no key nan"):
        three = {math.nan: torch.zeros(2), "x": 0, float("nan"): torch.zeros(3)}
        astage.load(path, into=three | {-math.nan: torch.zeros(1)})  # the file has two
    with pytest.raises(astage.InvalidOptionsError, match="the file holds key nan"):
        astage.load(path, into={math.nan: torch.zeros(2), "x": 0})
    partial = {math.nan: torch.zeros(2)}
    astage.load(path, into=partial, strict=False)
    assert torch.equal(next(iter(partial.values())), torch.ones(2))


def test_restore_into_an_empty_tensor_with_a_zero_stride(tmp_path: Path) -> None:
    # Before: a tensor with no element but a 0 stride (an expanded empty one, as load()
    # returns it) was refused as "expanded", though no two elements share memory.
    empty = torch.empty(0).unsqueeze(0).expand(2, 0)
    path = tmp_path / "a.safetensors"
    back = _save_load({"e": empty, "x": torch.ones(2)}, path)
    assert back["e"].stride() == empty.stride()
    assert astage.load(path, into=back)["e"] is back["e"]
    with pytest.raises(astage.InvalidOptionsError, match="expanded") as caught:
        astage.load(path, into={"e": back["e"], "x": torch.ones(1).expand(2)})
    assert caught.value.path == ("x",)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.arange(2.0)[::2],  # shape (1,), stride (2,)
        lambda: torch.arange(12.0).view(3, 4)[:, :1].transpose(0, 1),  # not contiguous: a guard
        lambda: torch.arange(8.0).view(2, 4)[1:, 1:5:4],  # shape (1, 1), offset 5
    ],
)
def test_restore_into_a_contiguous_tensor_with_an_odd_stride(tmp_path: Path, make: Any) -> None:
    # Before: a raw RuntimeError ("self.stride(-1) must be 1 to view Float as Byte"): the
    # destination was flattened with reshape(-1), which keeps a size-1 dimension's stride.
    into = make()
    path = tmp_path / "a.safetensors"
    saved = torch.full(into.shape, 7.0)
    astage.save_sync({"t": saved}, path)
    before = into._base.clone() if into._base is not None else None
    astage.load(path, into={"t": into})
    assert torch.equal(into, saved)
    if before is not None:  # nothing else of the base changed
        changed = (into._base != before).sum().item()
        assert changed == into.numel()


def test_one_view_at_two_paths_loads_as_one_object(tmp_path: Path) -> None:
    # Before: each path of a view got its own view object; a whole tensor at two paths
    # came back as one object, a view (a slice, an expanded tensor) as two.
    base = torch.arange(6.0)
    part = base[1:4]
    wide = torch.ones(1).expand(3)
    wide.tag = "w"  # type: ignore[attr-defined]
    other = base[1:4]  # another object: equal views without attributes may merge too
    back = _save_load({"a": part, "b": [part, wide], "c": wide, "base": base}, tmp_path / "a")
    assert back["a"] is back["b"][0] and back["c"] is back["b"][1]
    assert back["c"].tag == "w" and back["c"].stride() == (0,)
    tagged = base[2:4]
    tagged.tag = "t"  # type: ignore[attr-defined]
    back = _save_load({"x": base[2:4], "y": tagged, "o": other}, tmp_path / "b")
    assert not hasattr(back["x"], "tag") and back["y"].tag == "t"


class WithNaN(enum.Enum):
    NAN = math.nan
    PAIR = (1.5, math.nan)
    ZERO = 0.0


def test_an_enum_member_whose_value_holds_a_nan_loads(tmp_path: Path) -> None:
    # Before: saved, then never loaded ("has no member of value nan": NaN != NaN).
    state = {"a": WithNaN.NAN, "b": [WithNaN.PAIR, WithNaN.ZERO]}
    assert _save_load(state, tmp_path / "a.safetensors") == state


def test_metadata_with_a_lone_surrogate_is_refused(tmp_path: Path) -> None:
    # Before: written, and then safetensors' own reader refused the header ("unexpected end
    # of hex escape"): the file is no longer safetensors-compatible.
    path = tmp_path / "a.safetensors"
    with pytest.raises(astage.UnsavableError, match="lone surrogates"):
        astage.save_sync({"w": torch.ones(1)}, path, metadata={"note": "\ud800"})
    with pytest.raises(astage.UnsavableError, match="lone surrogates"):
        astage.save_sync({"w": torch.ones(1)}, path, metadata={"\udfff": "x"})
    assert not path.exists()
    # A state dict's strings may hold them: they travel escaped inside the skeleton.
    state = {"\ud800": torch.ones(2), "text": "a\udfffb\0", "meta": "é"}
    astage.save_sync(state, path, metadata={"note": "é ✓"})
    back = astage.load(path)
    assert list(back) == list(state) and back["text"] == state["text"]
    assert sorted(load_file(path)) == ["['\\ud800']"]


# -- the property: anything save accepts loads back equal -----------------------------------------


class Color(enum.Enum):
    RED = 1
    BLUE = "blue"


def assert_same(a: Any, b: Any, where: str = "<root>") -> None:
    """``b`` (loaded) equals ``a`` (saved) exactly: types, float bits, tensor layouts."""
    if isinstance(a, torch.Tensor):
        assert type(b) is torch.Tensor, where
        assert (a.dtype, a.shape, a.stride()) == (b.dtype, b.shape, b.stride()), where
        assert (a.is_conj(), a.is_neg()) == (b.is_conj(), b.is_neg()), where
        assert torch.equal(tensor_bytes(a), tensor_bytes(b)), where
        assert vars(a) == vars(b), where
        return
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, np.ndarray):
        assert (a.dtype, a.shape, a.tobytes()) == (b.dtype, b.shape, b.tobytes()), where
    elif isinstance(a, np.generic):
        assert (a.dtype, a.tobytes()) == (b.dtype, b.tobytes()), where
    elif isinstance(a, float):
        assert (math.isnan(a) and math.isnan(b)) or (
            a == b and math.copysign(1, a) == math.copysign(1, b)
        ), where
    elif isinstance(a, dict):
        assert len(a) == len(b), where
        for (ka, va), (kb, vb) in zip(a.items(), b.items(), strict=True):
            assert_same(ka, kb, f"{where} key")
            assert_same(va, vb, f"{where}[{ka!r}]")
        assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None), where
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, (set, frozenset)):
        assert sorted(map(_canon, a)) == sorted(map(_canon, b)), where
    else:
        assert a == b, where


def _canon(x: Any) -> str:
    """A text that tells set items apart as exactly as assert_same does (types, -0.0, NaN),
    whatever the iteration order of nested sets."""
    if isinstance(x, (set, frozenset)):
        return f"{type(x).__name__}({sorted(map(_canon, x))})"
    if isinstance(x, tuple):
        return f"tuple({[_canon(item) for item in x]})"
    return f"{type(x).__name__}:{x!r}"


def _tensors(tree: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            found.append(x)
        elif isinstance(x, dict):
            for value in x.values():
                walk(value)
        elif isinstance(x, (list, tuple)):
            for value in x:
                walk(value)

    walk(tree)
    return found


def assert_same_sharing(a: Any, b: Any) -> None:
    """Tensors that shared a storage do so again, and only those; one object stays one."""
    ta, tb = _tensors(a), _tensors(b)
    assert len(ta) == len(tb)
    for i in range(len(ta)):
        for j in range(i):
            shared_a = ta[i].untyped_storage().data_ptr() == ta[j].untyped_storage().data_ptr()
            shared_b = tb[i].untyped_storage().data_ptr() == tb[j].untyped_storage().data_ptr()
            if ta[i].untyped_storage().nbytes() and ta[j].untyped_storage().nbytes():
                assert shared_a == shared_b, (i, j)
            # One object stays one; two objects of one whole storage may come back as one
            # (tied weights: state_dict() detaches each), unless attributes tell them apart.
            if ta[i] is ta[j]:
                assert tb[i] is tb[j], (i, j)


pytest.importorskip("hypothesis")  # not on the GPU machines

from hypothesis import HealthCheck, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SETTINGS = derandomized("ASTAGE_ROUNDTRIP_EXAMPLES", 60, HealthCheck.data_too_large)

DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.bool,
    torch.complex64,
    torch.complex128,
]

floats = st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True) | st.sampled_from(
    [-0.0, math.nan, math.inf, -math.inf]
)
ints = st.integers() | st.sampled_from([2**63, -(2**63) - 1, 2**64, 10**4299])
texts = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=8)
keys = st.none() | st.booleans() | ints | floats | texts
hashables = st.recursive(
    keys, lambda inner: st.frozensets(inner, max_size=3) | st.tuples(inner, inner), max_leaves=4
)


@st.composite
def tensors(draw: st.DrawFn, pool: list[torch.Tensor]) -> torch.Tensor:
    if pool and draw(st.integers(0, 3)) == 0:  # another view of a storage already drawn
        base = draw(st.sampled_from(pool))
        flat = base.detach().reshape(-1) if base.is_contiguous() else base
        choice = draw(st.integers(0, 6))
        if base.is_complex() and choice == 4:  # a conjugate's part: the neg bit
            return base.conj().imag
        if choice == 5 and not (base.is_conj() or base.is_neg()) and base.dtype.itemsize == 4:
            other = torch.int32 if base.dtype is not torch.int32 else torch.float32
            return base.detach().view(other)  # the same bytes as another dtype
        if choice == 6:
            view = base.detach()[None]
            view.tag = "view"  # type: ignore[attr-defined]
            return view
        if choice == 0 or flat.dim() != 1 or flat.is_conj() or flat.is_neg():
            return base if choice == 0 else base.detach()
        if choice == 1 and flat.numel() > 1:
            return flat[1:]
        return flat[::2]
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 3), max_size=3))
    raw = torch.randint(0, 256, (max(1, math.prod(shape)) * dtype.itemsize,), dtype=torch.uint8)
    tensor = raw.view(dtype)[: math.prod(shape)].reshape(shape)
    if dtype.is_floating_point:
        tensor = torch.nan_to_num(tensor.float()).to(dtype) if dtype.itemsize > 1 else tensor
    kind = draw(st.integers(0, 6))
    if kind == 1 and tensor.dim() >= 2:
        tensor = tensor.transpose(0, 1)
    elif kind == 2 and tensor.dim() >= 1:
        tensor = tensor[::2]
    elif kind == 3:
        tensor = tensor.unsqueeze(0).expand(2, *tensor.shape)
    elif kind == 4 and tensor.is_complex():
        tensor = tensor.conj()
    elif kind == 5 and tensor.dim() >= 1:
        tensor = tensor.unsqueeze(-1).transpose(0, -1)
    elif kind == 6 and dtype.is_floating_point:
        tensor = torch.nn.Parameter(tensor, requires_grad=dtype.itemsize > 1)
    if draw(st.booleans()) and type(tensor) is torch.Tensor:
        tensor.tag = draw(st.integers(0, 9) | texts)  # type: ignore[attr-defined]
    pool.append(tensor)
    return tensor


@st.composite
def states(draw: st.DrawFn) -> Any:
    pool: list[torch.Tensor] = []
    leaves = (
        st.none()
        | st.booleans()
        | ints
        | floats
        | texts
        | tensors(pool)
        | st.sets(hashables, max_size=3)
        | st.frozensets(hashables, max_size=3)
        | st.sampled_from(
            [torch.Size([2, 0]), torch.bfloat16, torch.float8_e5m2, Color.BLUE, WithNaN.PAIR]
        )
        | st.sampled_from(
            [
                np.arange(6, dtype=">i4").reshape(2, 3).T,
                np.float32(-0.0),
                np.uint64(2**64 - 1),
                np.zeros((0, 2), dtype=np.complex64),
                argparse.Namespace(lr=0.5, seen={1, 2}),
            ]
        )
    )

    def odict(items: list[tuple[Any, Any]]) -> OrderedDict[Any, Any]:
        result = OrderedDict(items)
        if items and isinstance(items[0][0], str):
            result._metadata = OrderedDict({"": {"version": len(items)}})  # type: ignore[attr-defined]
        return result

    return draw(
        st.recursive(
            leaves,
            lambda inner: (
                st.dictionaries(keys, inner, max_size=3)
                | st.lists(st.tuples(keys, inner), max_size=3).map(odict)
                | st.lists(inner, max_size=3)
                | st.lists(inner, max_size=3).map(tuple)
            ),
            max_leaves=8,
        )
    )


@SETTINGS
@given(state=states())
def test_what_save_accepts_loads_back_equal(state: Any) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "a.safetensors"
        try:
            astage.save_sync(state, path)
        except astage.UnsavableError as error:
            # Only what the docs refuse: keys that collide are impossible, so this is none.
            raise AssertionError(f"refused: {error}") from error
        back = astage.load(path)
        assert_same(state, back)
        assert_same_sharing(state, back)
        # Any safetensors reader reads every entry, with the header's dtype and shape.
        other = load_file(path)
        for tensor in _tensors(back):
            assert tensor.device.type == "cpu"
        assert all(isinstance(value, torch.Tensor) for value in other.values())
        # load(into=) fills `into` as load() returns it (expanded tensors are refused there).
        into = astage.load(path)
        if any(0 in t.stride() and t.numel() > 1 for t in _tensors(into)):
            return  # restore refuses to fill an expanded tensor (its elements share memory)
        for tensor in _tensors(into):
            tensor.detach().zero_()
        restored = astage.load(path, into=into)
        assert_same(back, restored)
