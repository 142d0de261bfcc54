"""Property: a damaged or crafted checkpoint loads equal to the original, or is refused cleanly.

Valid files are mutated at random: bytes flipped, cut, inserted; the header length changed;
header fields (offsets, shapes, dtypes, skeleton nodes) replaced with arbitrary JSON, the
digest then recomputed as an attacker would. ``astage.load`` must then return a value equal to
the original or raise ``astage.CheckpointFormatError``, never another error, and never a
storage larger than the file; ``check_file`` must agree with ``load``. Damage confined to the
tensor bytes cannot be told from data (the format keeps no checksum of the data): there the
loaded value keeps the original's structure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import struct
import tempfile
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from conftest import derandomized, iter_tensors
from test_hostile_files import join, split, write_checkpoint

import astage
from astage._files._load import check_file

pytest.importorskip("hypothesis")  # not on the GPU machines

from hypothesis import HealthCheck, given
from hypothesis import strategies as st

SETTINGS = derandomized("ASTAGE_LOAD_EXAMPLES", 120, HealthCheck.data_too_large)


def _states() -> list[Any]:
    base = torch.arange(24, dtype=torch.float32)
    weight = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    weight.tag = "w"  # type: ignore[attr-defined]
    model = OrderedDict(weight=weight, head=weight, bias=torch.zeros(4, dtype=torch.bfloat16))
    model._metadata = OrderedDict({"": {"version": 2}})  # type: ignore[attr-defined]
    return [
        {
            "model": model,
            "views": [base[2:8], base.view(4, 6).t(), base[::5]],
            "c128": torch.tensor([1 + 2j], dtype=torch.complex128),
            "step": 7,
            "lr": [0.1, math.inf, None, True, "text"],
            float("nan"): (1, 2),
        },
        {
            "rng": np.arange(6, dtype=">i4").reshape(2, 3),
            "hparams": argparse.Namespace(lr=0.5, tags={"a", "b"}),
            "size": torch.Size([2, 3]),
            "dtype": torch.float16,
            "flag": np.float32(2.5),
            "t": torch.ones(2, 2, dtype=torch.int64),
        },
        torch.arange(5, dtype=torch.int16),  # a tensor that is the whole state dict
    ]


_FILES: list[bytes] = []


def valid_files() -> list[bytes]:
    if not _FILES:
        with tempfile.TemporaryDirectory() as folder:
            for i, state in enumerate(_states()):
                path = pathlib.Path(folder, f"{i}.safetensors")
                write_checkpoint(path, state)
                with open(path, "rb") as file:
                    _FILES.append(file.read())
    return _FILES


def equal(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return (
            a.dtype == b.dtype
            and a.shape == b.shape
            and a.stride() == b.stride()
            and a.storage_offset() == b.storage_offset()
            and torch.equal(_bytes(a), _bytes(b))
            and vars(a) == vars(b)
        )
    if isinstance(a, np.ndarray | np.generic):
        return bool(a.dtype == b.dtype and a.tobytes() == b.tobytes())
    if isinstance(a, argparse.Namespace):
        return equal(vars(a), vars(b))
    if isinstance(a, dict):
        keys_a, keys_b = list(a), list(b)
        return (
            len(a) == len(b)
            and all(repr(x) == repr(y) for x, y in zip(keys_a, keys_b, strict=True))
            and all(equal(a[x], b[y]) for x, y in zip(keys_a, keys_b, strict=True))
            and equal(getattr(a, "_metadata", None), getattr(b, "_metadata", None))
        )
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return bool(a == b)


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)


def same_structure(a: Any, b: Any) -> bool:
    """Equal but for the values inside tensors and arrays."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and (a.dtype, a.shape) == (b.dtype, b.shape)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and (a.dtype, a.shape) == (b.dtype, b.shape)
    if isinstance(a, dict):
        return len(a) == len(b) and all(
            same_structure(x, y) for x, y in zip(a.values(), b.values(), strict=True)
        )
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same_structure(x, y) for x, y in zip(a, b, strict=True))
    return equal(a, b)


def storages(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from storages(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from storages(item)


def outcome(raw: bytes) -> Any:
    """What loading ``raw`` gives: the value, or the CheckpointFormatError; check_file agrees."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "m.safetensors")
        with open(path, "wb") as file:
            file.write(raw)
        try:
            loaded = astage.load(path)
        except astage.CheckpointFormatError as error:
            assert path in str(error)
            with pytest.raises(astage.CheckpointFormatError):
                check_file(path)
            return error
        check_file(path)
    for tensor in storages(loaded):
        assert tensor.untyped_storage().nbytes() <= len(raw), "a storage larger than the file"
    return loaded


def data_start(raw: bytes) -> int:
    return 8 + int(struct.unpack("<Q", raw[:8])[0])


files = st.integers(0, len(_states()) - 1)


@SETTINGS
@given(files, st.data())
def test_flipped_bytes(index: int, data: st.DataObject) -> None:
    raw = bytearray(valid_files()[index])
    positions = data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=4))
    for position in positions:
        raw[position] ^= data.draw(st.integers(1, 255))
    result = outcome(bytes(raw))
    expected = reference(index)
    if isinstance(result, astage.CheckpointFormatError):
        return
    if max(positions) >= data_start(valid_files()[index]):
        # Some tensor bytes changed (flips in the header too may cancel out or be harmless).
        assert same_structure(result, expected)
    else:
        assert equal(result, expected)


@SETTINGS
@given(files, st.data())
def test_cut_and_inserted_bytes(index: int, data: st.DataObject) -> None:
    raw = valid_files()[index]
    at = data.draw(st.integers(0, len(raw)))
    if data.draw(st.booleans()):
        mutated = raw[:at] + data.draw(st.binary(min_size=1, max_size=16)) + raw[at:]
    else:
        mutated = raw[:at] + raw[at + data.draw(st.integers(1, 64)) :]
    result = outcome(mutated)
    assert isinstance(result, astage.CheckpointFormatError) or equal(result, reference(index))


@SETTINGS
@given(files, st.integers(-(2**63), 2**64 - 1))
def test_header_length(index: int, length: int) -> None:
    raw = valid_files()[index]
    mutated = struct.pack("<Q", length % 2**64) + raw[8:]
    result = outcome(mutated)
    assert isinstance(result, astage.CheckpointFormatError) or equal(result, reference(index))


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.sampled_from(["F32", "U8", "I64", "BF16", "float32", "uint8", "['w']", "<storage 0>"])
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


def nodes(value: Any) -> Iterator[tuple[Any, Any]]:
    """Every (container, key) of a JSON value: the places an edit can go."""
    if isinstance(value, dict):
        for key in list(value):
            yield value, key
            yield from nodes(value[key])
    elif isinstance(value, list):
        for i in range(len(value)):
            yield value, i
            yield from nodes(value[i])


def crafted(index: int, data: st.DataObject) -> bytes:
    """File ``index`` with one to three header fields replaced by arbitrary JSON, the digest
    recomputed (join), so that every check behind it is exercised on its own."""
    header, tensors = split(valid_files()[index])
    document = json.loads(header["__metadata__"]["astage"])
    target = header if data.draw(st.booleans()) else document
    places = [place for place in nodes(target) if place != (header, "__metadata__")]
    for _ in range(data.draw(st.integers(1, 3))):
        container, key = data.draw(st.sampled_from(places))
        container[key] = data.draw(json_values)
    header["__metadata__"]["astage"] = json.dumps(document)
    return join(header, tensors)


@SETTINGS
@given(files, st.data())
def test_crafted_header_fields(index: int, data: st.DataObject) -> None:
    # Refused, or loaded (the edits were harmless or changed values): nothing else escapes,
    # and no storage outgrows the file (outcome checks both).
    outcome(crafted(index, data))


def _zeroed(value: Any) -> Any:
    """A state dict shaped like ``value`` whose tensors are new zeros: what load(into=) fills
    (but for NaN keys, which no lookup finds: restored with ``strict=False``)."""
    if isinstance(value, torch.Tensor):
        return torch.zeros(value.shape, dtype=value.dtype)
    if isinstance(value, dict):
        out = type(value)(
            (key, _zeroed(item))
            for key, item in value.items()
            if not (isinstance(key, float) and math.isnan(key))
        )
        if hasattr(value, "_metadata"):
            out._metadata = value._metadata  # type: ignore[attr-defined]
        return out
    if isinstance(value, list):
        return [_zeroed(item) for item in value]
    return value


@SETTINGS
@given(st.sampled_from([0, 1]), st.data())  # the lone tensor's file has no state dict to fill
def test_crafted_header_fields_restore_into_a_state_dict_or_are_refused(
    index: int, data: st.DataObject
) -> None:
    # load(into=) takes its own path (it reads straight into the caller's tensors): a crafted
    # header is refused there too with an astage error, never another exception.
    raw = crafted(index, data)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "m.safetensors")
        with open(path, "wb") as file:
            file.write(raw)
        into = _zeroed(_states()[index])
        try:
            astage.load(path, into=into, strict=False)
        except astage.AstageError as error:
            assert str(error)


def test_the_valid_files_restore_into_their_state_dicts() -> None:
    # What the property above damages: undamaged, each file fills its template.
    for index in (0, 1):
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "m.safetensors")
            with open(path, "wb") as file:
                file.write(valid_files()[index])
            state = _states()[index]
            into = _zeroed(state)
            astage.load(path, into=into, strict=False)
            for (_, filled), (_, source) in zip(
                iter_tensors(into), iter_tensors(state), strict=True
            ):
                assert torch.equal(filled, source)


_REFERENCES: dict[int, Any] = {}


def reference(index: int) -> Any:
    if index not in _REFERENCES:
        result = outcome(valid_files()[index])
        assert not isinstance(result, Exception)
        _REFERENCES[index] = result
    return _REFERENCES[index]


def test_the_valid_files_load_equal_to_their_state() -> None:
    for index, state in enumerate(_states()):
        back = reference(index)
        if isinstance(state, dict):
            assert same_structure(back, state)
