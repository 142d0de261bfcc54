"""Values beyond dicts, lists and numbers go into a checkpoint without pickle, and come back.

numpy arrays (as entries of the file) and numpy numbers, ``torch.Size``, ``torch.dtype``, enums
of plain values, ``pathlib`` paths, ``argparse.Namespace`` (Lightning's hyperparameters), sets
and frozensets each load back as the same type with the same value.
"""

from __future__ import annotations

import argparse
import enum
import math
import pathlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from test_hostile_files import write_checkpoint

import astage
from astage._files._layout import plan_layout


class Color(enum.Enum):
    RED = 1
    GREEN = "g"
    BLUE = (1, 2)


class Mode(enum.IntEnum):
    TRAIN = 0
    EVAL = 1


class Perm(enum.Flag):
    READ = 1
    WRITE = 2


VALUES: dict[str, Any] = {
    "size": torch.Size([2, 3]),
    "empty-size": torch.Size([]),
    "dtype": torch.bfloat16,
    "enum": Color.GREEN,
    "enum-tuple": Color.BLUE,
    "int-enum": Mode.EVAL,
    "flags": Perm.READ | Perm.WRITE,
    "posix": pathlib.PurePosixPath("/data/run 1"),
    "windows": pathlib.PureWindowsPath(r"C:\runs\x"),
    "path": pathlib.Path("runs/x"),
    "namespace": argparse.Namespace(lr=0.1, layers=[1, 2], name="x", nested={"a": None}),
    "set": {1, "a", 2.5, (1, 2)},
    "frozenset": frozenset({"b", None}),
    "empty-set": set(),
    "np-f32": np.float32(1.5),
    "np-f16": np.float16(-0.25),
    "np-i64": np.int64(-(2**62)),
    "np-u64": np.uint64(2**64 - 1),
    "np-bool": np.bool_(True),
    "np-c128": np.complex128(1 + 2j),
    "np-longdouble": np.longdouble(1) / 3,
}


def same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=True)
    if isinstance(a, np.generic):
        return bool(a.dtype == b.dtype and a.tobytes() == b.tobytes())
    if isinstance(a, argparse.Namespace):
        return vars(a).keys() == vars(b).keys() and all(
            same(vars(a)[k], vars(b)[k]) for k in vars(a)
        )
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def round_trip(tmp_path: Path, state: Any) -> Any:
    path = tmp_path / "v.safetensors"
    write_checkpoint(path, state)
    return astage.load(path)


@pytest.mark.parametrize("name", list(VALUES))
def test_each_value_round_trips_to_its_type(tmp_path: Path, name: str) -> None:
    back = round_trip(tmp_path, {"x": VALUES[name]})
    assert same(back["x"], VALUES[name]), (back["x"], VALUES[name])


ARRAYS: dict[str, Any] = {
    "f32": np.arange(12, dtype=np.float32).reshape(3, 4),
    "big-endian": np.arange(6, dtype=">i4").reshape(2, 3),
    "strided": np.arange(20, dtype=np.int16)[::3],
    "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
    "c128": np.array([1 + 2j, math.nan], dtype=np.complex128),
    "f16": np.array([0.5, -1.0], dtype=np.float16),
    "bool": np.array([[True], [False]]),
    "u64": np.array([2**64 - 1], dtype=np.uint64),
    "0-d": np.array(3.5),
    "empty": np.zeros((0, 4), dtype=np.int8),
    "longdouble": np.array([1, 3], dtype=np.longdouble) / 3,
}


@pytest.mark.parametrize("name", list(ARRAYS))
def test_numpy_arrays_round_trip_as_arrays(tmp_path: Path, name: str) -> None:
    array = ARRAYS[name]
    back = round_trip(tmp_path, {"a": array, "w": torch.ones(2)})
    assert same(back["a"], array)
    assert back["a"].flags.writeable and back["a"].flags.owndata


def test_arrays_are_tensors_for_other_readers(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    write_checkpoint(path, {"a": np.arange(4, dtype=np.float32), "w": torch.ones(2)})
    plain = safetensors.torch.load_file(str(path))
    assert any(torch.equal(t, torch.arange(4, dtype=torch.float32)) for t in plain.values())


def test_an_array_is_captured_when_the_layout_is_planned() -> None:
    array = np.zeros(3, dtype=np.float32)
    layout = plan_layout({"a": array})
    array[:] = 1  # later changes do not reach the file: its bytes were taken
    assert layout.header.endswith(np.zeros(3, dtype=np.float32).tobytes())
    assert layout.entries == [] and len(layout.captured) == 1
    assert layout.file_size == len(layout.header)


def test_everything_together_and_loaded_on_a_device(tmp_path: Path) -> None:
    state = {"values": dict(VALUES), "arrays": dict(ARRAYS), "w": torch.ones(3)}
    path = tmp_path / "all.safetensors"
    write_checkpoint(path, state)
    back = astage.load(path, device="meta")
    assert same(back["values"], state["values"]) and same(back["arrays"], state["arrays"])
    assert back["w"].device.type == "meta"


@pytest.mark.asyncio
async def test_astage_save_round_trips_them(tmp_path: Path) -> None:
    state = {"hparams": argparse.Namespace(lr=1e-3, mode=Mode.TRAIN), "rng": ARRAYS["f32"]}
    state["w"] = torch.ones(2)
    await astage.save(state, tmp_path / "s.safetensors")
    back = astage.load(tmp_path / "s.safetensors")
    assert same(back["hparams"], state["hparams"]) and same(back["rng"], state["rng"])


LOCAL_ENUM: Any = getattr(enum.Enum("Local", "A"), "A")  # noqa: B009 - the functional API: not findable by its name


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (b"bytes", "builtins.bytes"),
        (np.array(["a"]), "numpy array of dtype <U1"),
        (np.array([object()]), "numpy array of dtype object"),
        (np.ma.masked_array([1]), "MaskedArray"),
        (np.datetime64("2020-01-01"), "datetime64"),
        ({torch.ones(1)}, "a set cannot hold tensors"),
        (argparse.Namespace(w=torch.ones(1)), "an argparse.Namespace cannot hold tensors"),
        (LOCAL_ENUM, "cannot save the enum"),
        (type("Sub", (pathlib.PurePosixPath,), {})("x"), "Sub"),
        (complex(1, 2), "builtins.complex"),
    ],
)
def test_what_stays_refused_is_named_by_path(value: Any, fragment: str) -> None:
    with pytest.raises(astage.UnsavableError, match=r"\['x'\]") as caught:
        plan_layout({"x": value})
    assert fragment in str(caught.value)


def test_an_enum_whose_module_is_not_imported_fails_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "e.safetensors"
    write_checkpoint(path, {"x": Color.RED})
    import sys

    monkeypatch.delitem(sys.modules, __name__)
    with pytest.raises(astage.CheckpointFormatError, match="not imported"):
        astage.load(path)
