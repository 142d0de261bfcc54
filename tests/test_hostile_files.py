"""Files that astage did not write, or that were damaged: refused with a clear error, safely.

Every refusal is an ``astage.CheckpointFormatError`` naming the file and the field (never a
raw torch or Python error), no allocation is larger than the file, no recursion is unbounded,
and nothing in a file runs code. The save side refuses what could not be loaded back.
"""

from __future__ import annotations

import base64
import json
import math
import os
import struct
import sys
import threading
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from conftest import bytes_of

import astage
from astage._files._layout import plan_layout
from astage._files._load import check_file
from astage._files._safetensors import DIGEST_KEY, MAX_HEADER_BYTES, header_text
from astage._files._skeleton import MAX_DEPTH
from astage._paths import Attr
from astage._paths import Path as StatePath


def value_at(state: Any, path: StatePath) -> Any:
    for part in path:
        state = getattr(state, part) if isinstance(part, Attr) else state[part]
    return state


def write_checkpoint(path: Path, state: Any) -> None:
    """The file ``astage.save`` writes, written synchronously from the layout (no stager)."""
    layout = plan_layout(state)
    data = bytearray(layout.file_size)
    data[: len(layout.header)] = layout.header
    for entry in layout.entries:
        tensor = value_at(state, entry.paths[0]).detach().cpu()
        storage = tensor.untyped_storage()
        raw = bytes_of(storage).numpy().tobytes()
        start = layout.data_start + entry.begin
        data[start : start + entry.nbytes] = raw
    path.write_bytes(bytes(data))


def split(raw: bytes) -> tuple[dict[str, Any], bytes]:
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def join(header: dict[str, Any], data: bytes, *, digest: bool = True) -> bytes:
    """A file of ``header`` and ``data``; with ``digest``, the digest made to match (a crafted
    file, as an attacker would write it: the checks behind the digest must hold on their own)."""
    meta = header.get("__metadata__")
    if isinstance(meta, dict) and DIGEST_KEY in meta:
        if digest:
            text = header_text(header)
            return struct.pack("<Q", len(text)) + text + data
        del meta[DIGEST_KEY]
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def edit(path: Path, change: Callable[[dict[str, Any]], None], *, skeleton: bool = False) -> None:
    """Rewrite the header (or, with ``skeleton``, the astage document in it) of ``path``."""
    header, data = split(path.read_bytes())
    if skeleton:
        document = json.loads(header["__metadata__"]["astage"])
        change(document)
        header["__metadata__"]["astage"] = json.dumps(document)
    else:
        change(header)
    path.write_bytes(join(header, data))


def refused(path: Path, *fragments: str) -> str:
    """Both ``load`` and ``check_file`` refuse ``path``, naming it and ``fragments``."""
    with pytest.raises(astage.CheckpointFormatError) as caught:
        astage.load(path)
    message = str(caught.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    with pytest.raises(astage.CheckpointFormatError):
        check_file(path)
    return message


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "c.safetensors"
    base = torch.arange(16, dtype=torch.float32)
    write_checkpoint(path, {"w": torch.ones(4), "view": base[2:6], "n": 3})
    return path


@pytest.fixture
def allocations(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Bytes of every ``torch.empty`` that loading makes."""
    sizes: list[int] = []
    real = torch.empty

    def empty(*args: Any, **kwargs: Any) -> torch.Tensor:
        tensor = real(*args, **kwargs)
        sizes.append(tensor.untyped_storage().nbytes())
        return tensor

    monkeypatch.setattr(torch, "empty", empty)
    yield sizes


def test_a_valid_file_passes_the_check(ckpt: Path) -> None:
    check_file(ckpt)
    back = astage.load(ckpt)
    assert back["n"] == 3 and back["view"].tolist() == [2.0, 3.0, 4.0, 5.0]


def test_overlapping_offsets_allocate_nothing_beyond_the_file(
    tmp_path: Path, allocations: list[int]
) -> None:
    # One MiB of data, and a second entry claiming 1 GiB of it: the old loader allocated the
    # 1 GiB before it noticed the file was short.
    path = tmp_path / "o.safetensors"
    header = {
        "a": {"dtype": "U8", "shape": [1 << 20], "data_offsets": [0, 1 << 20]},
        "b": {"dtype": "F32", "shape": [1 << 28], "data_offsets": [0, 1 << 30]},
    }
    path.write_bytes(join(header, b"\0" * (1 << 20)))
    refused(path, "'b'", "data_offsets")
    header = {
        "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
        "b": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
    }
    path.write_bytes(join(header, b"\0" * 4))
    refused(path, "overlaps")
    assert max(allocations, default=0) <= 1 << 20


def test_a_gap_between_entries_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "g.safetensors"
    header = {"a": {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]}}
    path.write_bytes(join(header, b"\0" * 8))
    refused(path, "'a'", "gap")


def test_a_view_larger_than_its_entry_is_refused(ckpt: Path) -> None:
    # torch's set_ would have grown the 64-byte storage with uninitialised heap bytes.
    def grow(document: dict[str, Any]) -> None:
        for key, node in document["skeleton"]["dict"]:
            if key == "view":
                node["shape"] = [1000]

    edit(ckpt, grow, skeleton=True)
    refused(ckpt, "['view']", "past the end of entry")


def test_a_view_beyond_its_entry_by_offset_or_stride(ckpt: Path) -> None:
    for part, value in (("offset", 13), ("stride", [5]), ("offset", 1 << 70)):

        def change(document: dict[str, Any], part: str = part, value: Any = value) -> None:
            for key, node in document["skeleton"]["dict"]:
                if key == "view":
                    node[part] = value

        saved = ckpt.read_bytes()
        edit(ckpt, change, skeleton=True)
        refused(ckpt, "['view']")
        ckpt.write_bytes(saved)


def test_a_header_length_one_byte_short_is_refused(ckpt: Path) -> None:
    raw = ckpt.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    ckpt.write_bytes(struct.pack("<Q", length - 1) + raw[8:])
    with pytest.raises(Exception):  # noqa: B017 - the reference reader refuses it too
        safetensors.torch.load_file(str(ckpt))
    refused(ckpt)


@pytest.mark.parametrize("delta", [1, 8, 1 << 40])
def test_a_header_length_past_the_file_is_refused(ckpt: Path, delta: int) -> None:
    raw = ckpt.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    ckpt.write_bytes(struct.pack("<Q", length + delta) + raw[8:])
    refused(ckpt)


def test_truncated_and_extended_files_are_refused(ckpt: Path) -> None:
    raw = ckpt.read_bytes()
    for damaged in (raw[:-1], raw + b"\0", raw[:7], b""):
        ckpt.write_bytes(damaged)
        refused(ckpt)


def test_deep_nesting_is_refused_without_recursion_error(ckpt: Path) -> None:
    deep: Any = 1
    for _ in range(MAX_DEPTH + 1):
        deep = {"list": [deep]}
    edit(ckpt, lambda document: document.update(skeleton=deep), skeleton=True)
    refused(ckpt, "nested more than")
    # Deeper than the JSON parser goes: its RecursionError becomes a format error.
    header, data = split(ckpt.read_bytes())
    text = '{"version":1,"skeleton":' + "[" * 100_000 + "]" * 100_000 + "}"
    header["__metadata__"]["astage"] = text
    ckpt.write_bytes(join(header, data))
    refused(ckpt, "nested too deep")


def test_deep_nesting_is_refused_on_save_too() -> None:
    deep: Any = 1
    for _ in range(MAX_DEPTH + 1):
        deep = [deep]
    with pytest.raises(astage.UnsavableError, match="nested more than"):
        plan_layout({"x": deep})


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, "'shape'"),
        ({"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}, "'shape'"),
        ({"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}, "'shape'"),
        ({"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}, "'shape'"),
        ({"dtype": "F32", "shape": [0, 1 << 70], "data_offsets": [0, 4]}, "'shape'"),
        ({"dtype": "F32", "shape": [1] * 65, "data_offsets": [0, 4]}, "'shape'"),
        ({"dtype": "F32", "shape": [1 << 31, 1 << 31], "data_offsets": [0, 4]}, "span"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}, "'data_offsets'"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}, "'data_offsets'"),
        ({"dtype": "F32", "shape": [1], "data_offsets": None}, "'data_offsets'"),
        ({"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}, "dtype"),
        ({"dtype": "object", "shape": [1], "data_offsets": [0, 4]}, "dtype"),
        ([1, 2], "not a JSON object"),
    ],
)
def test_bad_header_fields(tmp_path: Path, entry: Any, fragment: str) -> None:
    path = tmp_path / "f.safetensors"
    path.write_bytes(join({"w": entry}, b"\0" * 4))
    refused(path, "'w'", fragment)


@pytest.mark.parametrize(
    "text",
    [
        b'{"a": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}, "a": 1}',  # duplicate
        b'{"__metadata__": {"x": 1}}',  # metadata must be str -> str
        b'{"__metadata__": "x"}',
        b'{"a": NaN}',
        b'{"\xff": 1}',  # not UTF-8
        b"[]",
        b"{",
    ],
)
def test_bad_header_json(tmp_path: Path, text: bytes) -> None:
    path = tmp_path / "j.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text)
    refused(path)


def test_header_length_over_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    path.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}")
    refused(path, "over safetensors' limit")


VIEW = {"tensor": "['w']", "dtype": "float32", "shape": [1], "stride": [1], "offset": 0}


@pytest.mark.parametrize(
    ("node", "fragment"),
    [
        ({"tensor": "['w']", "dtype": "qint8", "shape": [1], "stride": [1], "offset": 0}, "qint8"),
        ({"tensor": "['w']", "dtype": 5, "shape": [1], "stride": [1], "offset": 0}, "dtype"),
        ({"tensor": "['w']", "dtype": "float32", "shape": [1], "stride": [-1], "offset": 0}, ""),
        ({"tensor": "['w']", "dtype": "float32", "shape": [2], "stride": [1], "offset": -1}, ""),
        ({"tensor": "['w']", "dtype": "float32", "shape": [1], "stride": [1, 1], "offset": 0}, ""),
        (
            {
                "tensor": "['w']",
                "dtype": "float32",
                "shape": [1],
                "stride": [1],
                "offset": 0,
                "neg": 1,
            },
            "neg",
        ),
        (
            {
                "tensor": "['w']",
                "dtype": "float32",
                "shape": [1],
                "stride": [1],
                "offset": 0,
                "conj": True,
            },
            "conj",
        ),
        ({"tensor": "['w']", "offset": 0}, "without 'dtype'"),
        ({"tensor": "nope"}, "names no header entry"),
        ({"tensor": ["['w']"]}, "names no header entry"),
        ({"tensor": "['w']", "mystery": 1}, "unknown tensor fields"),
        ({"tensor": "['w']", "attrs": [["data", 1]]}, "'data'"),
        ({"tensor": "['w']", "attrs": [["__class__", 1]]}, "'__class__'"),
        ({"tensor": "['w']", "attrs": "x"}, "'attrs'"),
        ({"numpy": "['w']", "dtype": "|O", "shape": [1]}, "numpy 'dtype'"),
        ({"numpy": "['w']", "dtype": "<f4", "shape": [9]}, "does not fill"),
        ({"float": [1]}, "'float'"),
        ({"float": "1e5"}, "'float'"),
        ({"list": 5}, "'list'"),
        ({"dict": [[1]]}, "pairs"),
        ({"dict": [[{"list": []}, 1]]}, "dict key"),
        ({"dict": [["k", 1], ["k", 2]]}, "appears twice"),
        ({"set": [{"list": []}]}, "hashable"),
        ({"namespace": [[1, 2]]}, "'namespace'"),
        ({"torch.Size": [-1]}, "'torch.Size'"),
        ({"torch.dtype": "os.system"}, "'torch.dtype'"),
        ({"path": ["os.system", "x"]}, "'path'"),
        ({"numpy.scalar": ["|O", "00"]}, "'numpy.scalar'"),
        ({"numpy.scalar": ["<f4", "00"]}, "'numpy.scalar'"),
        ({"numpy.scalar": ["<f4", "zzzzzzzz"]}, "'numpy.scalar'"),
        ([1, 2], "not a skeleton node"),
        ({"a": 1, "b": 2}, "not a skeleton node"),
    ],
)
def test_bad_skeleton_nodes(ckpt: Path, node: Any, fragment: str) -> None:
    edit(ckpt, lambda document: document.update(skeleton={"dict": [["x", node]]}), skeleton=True)
    message = refused(ckpt, "__metadata__['astage']", fragment)
    assert "['x']" in message or "<root>" in message


@pytest.mark.parametrize("version", [2, True, "1", None])
def test_unknown_versions(ckpt: Path, version: Any) -> None:
    edit(ckpt, lambda document: document.update(version=version), skeleton=True)
    refused(ckpt, "version")


def test_an_edited_header_fails_its_digest(ckpt: Path) -> None:
    raw = ckpt.read_bytes()
    # n: 3 -> 4, in place (same length); every other field still checks out.
    edited = raw.replace(b'[\\"n\\",3]', b'[\\"n\\",4]')
    assert edited != raw
    ckpt.write_bytes(edited)
    refused(ckpt, DIGEST_KEY)


def test_a_file_without_digest_still_loads(ckpt: Path) -> None:
    # Files written before the digest existed: their document says nothing of a seal.
    header, data = split(ckpt.read_bytes())
    document = json.loads(header["__metadata__"]["astage"])
    del document["sealed"]
    header["__metadata__"]["astage"] = json.dumps(document)
    ckpt.write_bytes(join(header, data, digest=False))
    assert astage.load(ckpt)["n"] == 3


def test_damage_that_renames_the_digest_entry_is_caught(ckpt: Path) -> None:
    # One flipped bit in the digest's key ('astage.sha256' -> '`stage.sha256') made the file
    # read as one written before the digest existed, and a second damage elsewhere in the
    # header (here n: 3 -> 4) then went unnoticed (found by test_load_property's flips).
    raw = ckpt.read_bytes()
    damaged = raw.replace(DIGEST_KEY.encode(), b"`" + DIGEST_KEY[1:].encode())
    damaged = damaged.replace(b'[\\"n\\",3]', b'[\\"n\\",4]')
    assert damaged.count(b"`stage") == 1 and b'[\\"n\\",4]' in damaged
    ckpt.write_bytes(damaged)
    refused(ckpt, DIGEST_KEY, "missing")


def test_an_enum_is_never_imported_nor_called(ckpt: Path) -> None:
    assert "antigravity" not in sys.modules
    node = {"enum": ["antigravity", "Color", 1]}
    edit(ckpt, lambda document: document.update(skeleton=node), skeleton=True)
    refused(ckpt, "not imported")
    assert "antigravity" not in sys.modules
    # A module that is imported, and a name in it that is not an enum class: not called.
    calls: list[Any] = []
    module = types.ModuleType("astage_test_hostile_module")
    module.boom = lambda *args: calls.append(args)  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    try:
        node = {"enum": [module.__name__, "boom", 1]}
        edit(ckpt, lambda document: document.update(skeleton=node), skeleton=True)
        refused(ckpt, "is not an enum class")
    finally:
        del sys.modules[module.__name__]
    assert calls == []


def test_no_raw_error_from_special_files(tmp_path: Path) -> None:
    with pytest.raises(astage.CheckpointFormatError, match="not a regular file"):
        astage.load(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    done: list[BaseException] = []

    def load() -> None:
        try:
            check_file(fifo)
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            done.append(error)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(10)
    assert done and isinstance(done[0], astage.CheckpointFormatError), "a FIFO hung the loader"
    with pytest.raises(astage.CheckpointNotFoundError):
        check_file(tmp_path / "missing")


# -- the save side: what could not be loaded is never written ------------------------------------


def test_a_header_over_the_limit_is_refused_at_plan_time_naming_the_biggest_part() -> None:
    state = {"model": {"w": torch.ones(2)}, "logs": {"small": "x", "big": "y" * MAX_HEADER_BYTES}}
    with pytest.raises(astage.UnsavableError, match=r"\['logs'\]\['big'\]") as caught:
        plan_layout(state)
    assert "100000000" in str(caught.value)


@pytest.fixture
def big_text() -> str:
    return "y" * MAX_HEADER_BYTES  # made outside the event loop: 100 MB takes a while


@pytest.mark.asyncio
async def test_save_of_an_unloadable_header_writes_nothing(tmp_path: Path, big_text: str) -> None:
    path = tmp_path / "c.safetensors"
    with pytest.raises(astage.UnsavableError, match=r"\['big'\]"):
        await astage.save({"w": torch.ones(2), "big": big_text}, path)
    assert os.listdir(tmp_path) == []


def test_attributes_set_on_tensors_are_stored(tmp_path: Path) -> None:
    weight = torch.ones(2)
    weight.tag = "frozen"  # type: ignore[attr-defined]
    weight.scale = [1, 2.5]  # type: ignore[attr-defined]
    param = torch.nn.Parameter(torch.zeros(3))
    param._is_hf_initialized = True  # type: ignore[attr-defined]  # transformers sets this
    path = tmp_path / "a.safetensors"
    write_checkpoint(path, {"w": weight, "p": param, "v": param[1:]})
    back = astage.load(path)
    assert back["w"].tag == "frozen" and back["w"].scale == [1, 2.5]
    assert back["p"]._is_hf_initialized is True
    assert vars(back["v"]) == {}


def test_a_tensor_inside_a_tensor_attribute_is_refused() -> None:
    weight = torch.ones(2)
    weight.extra = torch.zeros(1)  # type: ignore[attr-defined]
    with pytest.raises(astage.UnsavableError, match=r"\['w'\]\.extra"):
        plan_layout({"w": weight})


def test_two_nan_keys_keep_both_tensors(tmp_path: Path) -> None:
    state = {float("nan"): torch.zeros(2), float("nan"): torch.ones(2)}
    path = tmp_path / "n.safetensors"
    write_checkpoint(path, state)
    back = astage.load(path)
    assert len(back) == 2
    assert sorted(tensor.sum().item() for tensor in back.values()) == [0.0, 2.0]
    assert len(safetensors.torch.load_file(str(path))) == 2


# Written by astage before this change (commit 8587da1): no digest, the same format version.
OLD_FILE = (
    "uAIAAAAAAAB7Il9fbWV0YWRhdGFfXyI6eyJmb3JtYXQiOiJwdCIsImFzdGFnZSI6IntcInZlcnNpb25cIjoxLFwi"
    "c2tlbGV0b25cIjp7XCJkaWN0XCI6W1tcIm1vZGVsXCIse1wib2RpY3RcIjpbW1wid1wiLHtcInRlbnNvclwiOlwi"
    "Wydtb2RlbCddWyd3J11cIn1dLFtcInRpZWRcIix7XCJ0ZW5zb3JcIjpcIlsnbW9kZWwnXVsndyddXCJ9XV19XSxb"
    "XCJ2aWV3XCIse1widGVuc29yXCI6XCI8c3RvcmFnZSAxPlwiLFwiZHR5cGVcIjpcImZsb2F0MzJcIixcInNoYXBl"
    "XCI6WzNdLFwic3RyaWRlXCI6WzFdLFwib2Zmc2V0XCI6MX1dLFtcImNcIix7XCJ0ZW5zb3JcIjpcIjxzdG9yYWdl"
    "IDI+XCIsXCJkdHlwZVwiOlwiY29tcGxleDEyOFwiLFwic2hhcGVcIjpbMV0sXCJzdHJpZGVcIjpbMV0sXCJvZmZz"
    "ZXRcIjowfV0sW1wic3RlcFwiLDNdLFtcImxyXCIse1wibGlzdFwiOlswLjUse1wiZmxvYXRcIjpcImluZlwifV19"
    "XSxbXCJrXCIse1widHVwbGVcIjpbbnVsbCx0cnVlXX1dXX19In0sIlsnbW9kZWwnXVsndyddIjp7ImR0eXBlIjoi"
    "RjMyIiwic2hhcGUiOlsyLDJdLCJkYXRhX29mZnNldHMiOlswLDE2XX0sIjxzdG9yYWdlIDE+Ijp7ImR0eXBlIjoi"
    "VTgiLCJzaGFwZSI6WzI0XSwiZGF0YV9vZmZzZXRzIjpbMTYsNDBdfSwiPHN0b3JhZ2UgMj4iOnsiZHR5cGUiOiJV"
    "OCIsInNoYXBlIjpbMTZdLCJkYXRhX29mZnNldHMiOls0MCw1Nl19fSAgICAAAIA/AAAAQAAAQEAAAIBAAAAAAAAA"
    "gD8AAABAAABAQAAAgEAAAKBAAAAAAAAA8D8AAAAAAAAAQA=="
)


def test_a_file_written_by_the_previous_code_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "old.safetensors"
    path.write_bytes(base64.b64decode(OLD_FILE))
    check_file(path)
    back = astage.load(path)
    assert back["model"]["w"].tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert back["model"]["tied"] is back["model"]["w"]
    assert back["view"].tolist() == [1.0, 2.0, 3.0]
    assert back["c"].tolist() == [1 + 2j] and back["c"].dtype == torch.complex128
    assert (back["step"], back["lr"], back["k"]) == (3, [0.5, math.inf], (None, True))
