"""The safetensors file format as astage writes and reads it (sans-IO, apart from :func:`load`).

A safetensors file is an 8-byte little-endian header length, a JSON header, then the tensors'
bytes back to back. The header maps each key to ``dtype``, ``shape`` and ``data_offsets``
(relative to the end of the header), plus ``__metadata__``: a str -> str map.

How a nested state dict maps onto it:

* **Keys** are paths rendered by :func:`astage.format_path`: ``['model']['layers.0.weight']``,
  ``['optim']['state'][3]['exp_avg']``. Dict keys are printed with ``repr``, so a dot or a quote
  inside a key never makes two paths look alike. A tensor that is the whole state dict is
  ``<root>``.
* **One entry per storage.** safetensors forbids overlapping entries, so each storage is stored
  once. When a tensor spans its storage (offset 0, contiguous, a dtype safetensors knows), the
  entry *is* that tensor under its path. Otherwise the storage's bytes are stored as a ``U8``
  entry named ``<storage N>`` (a name no path can take).
* **The skeleton** (containers, plain values, and for each tensor the entry it lives in and, for
  views, its dtype, shape, stride and offset) is JSON in ``__metadata__["astage"]``; tied
  weights refer to the same entry twice, so :func:`load` gives them one storage again. An
  ``OrderedDict``'s ``_metadata`` attribute (``Module.state_dict()`` sets it, with each
  submodule's version, and ``load_state_dict`` reads it) is kept too, as plain JSON.

Only plain data goes in: dict (``OrderedDict`` too), list, tuple, str, int, float, bool, None
and strided CPU or device tensors. Anything else is an :class:`~astage.UnsavableError` naming
its path: a checkpoint holds no pickle, so opening one runs no code.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .._errors import (
    AstageError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    UnsavableError,
)
from .._paths import Path, format_path
from .._torch import neg_view, storage_key
from ._skeleton import TORCH_DTYPES, SkeletonDecoder, SkeletonEncoder

FORMAT_VERSION = 1
METADATA_KEY = "astage"
"""The ``__metadata__`` entry that holds the skeleton."""

_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
    torch.complex64: "C64",
}
"""Dtypes stored under their own safetensors name; others are stored as bytes plus a view."""
_DTYPES_BY_NAME = {name: dtype for dtype, name in _DTYPE_NAMES.items()}

if sys.byteorder != "little":  # pragma: no cover - safetensors is little-endian
    raise ImportError("astage writes safetensors files on little-endian machines only")


@dataclass
class Entry:
    """One stored storage: where its bytes go in the file."""

    key: str
    dtype: str
    shape: list[int]
    nbytes: int
    begin: int = 0
    """Offset of its first byte from the start of the data section."""
    paths: list[Path] = field(default_factory=list)
    """Every path whose tensor lives in this storage."""


@dataclass
class Layout:
    """Everything a writer needs before the first byte lands: entries, offsets, header."""

    entries: list[Entry]
    by_path: dict[Path, Entry]
    header: bytes
    """The length prefix and the JSON header, padded to a multiple of 8 bytes."""
    tensors: int
    """Paths at which a tensor sits (a tied tensor counts at each path)."""

    @property
    def data_start(self) -> int:
        return len(self.header)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data."""
        return sum(entry.nbytes for entry in self.entries)

    @property
    def file_size(self) -> int:
        return self.data_start + self.nbytes


def plan_layout(state_dict: Any, metadata: Mapping[str, str] | None = None) -> Layout:
    """The file layout for ``state_dict``: raises :class:`UnsavableError` for what cannot go in.

    ``state_dict`` may be the source or its staged copy: only the structure, the tensors'
    dtypes, shapes, strides, offsets and which of them share a storage are used.
    """
    builder = _LayoutBuilder()
    skeleton = builder.encode(state_dict, ())
    user = dict(metadata or {})
    for key, value in user.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise UnsavableError(f"metadata must map str to str, got {key!r}: {value!r}")
    if METADATA_KEY in user:
        raise UnsavableError(f"the metadata key {METADATA_KEY!r} is reserved for astage")
    header_meta = {"format": "pt", **user}
    header_meta[METADATA_KEY] = json.dumps(
        {"version": FORMAT_VERSION, "skeleton": skeleton}, separators=(",", ":")
    )
    header: dict[str, Any] = {"__metadata__": header_meta}
    offset = 0
    for entry in builder.entries:
        entry.begin = offset
        offset += entry.nbytes
        header[entry.key] = {
            "dtype": entry.dtype,
            "shape": entry.shape,
            "data_offsets": [entry.begin, offset],
        }
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    by_path = {path: entry for entry in builder.entries for path in entry.paths}
    return Layout(
        entries=builder.entries,
        by_path=by_path,
        header=struct.pack("<Q", len(text)) + text,
        tensors=builder.tensors,
    )


class _LayoutBuilder(SkeletonEncoder):
    error = UnsavableError
    verb = "saved"
    refusal = (
        "cannot save a {type} object: a checkpoint file holds only tensors, dicts, lists, "
        "tuples, str, int, float, bool and None"
    )

    def __init__(self) -> None:
        super().__init__()
        self.entries: list[Entry] = []
        self.tensors = 0
        self._groups: dict[int, tuple[Entry, torch.Tensor | None]] = {}

    def encode_tensor(self, x: torch.Tensor, path: Path) -> Any:
        return self._tensor(x, path)

    def _tensor(self, x: torch.Tensor, path: Path) -> Any:
        if type(x) not in (torch.Tensor, torch.nn.Parameter):
            raise UnsavableError(
                f"cannot save a tensor subclass {type(x).__qualname__}; save its plain tensors",
                path,
            )
        if x.layout is not torch.strided or x.is_quantized or x.is_nested:
            raise UnsavableError(f"cannot save a {x.layout} tensor; only strided ones", path)
        if x.device.type == "meta":
            raise UnsavableError("a meta tensor has no data to save", path)
        self.tensors += 1
        storage = x.untyped_storage()
        key = storage_key(storage)
        spans = (
            x.dtype in _DTYPE_NAMES
            and x.storage_offset() == 0
            and x.is_contiguous()
            and x.nbytes == storage.nbytes()
            and not x.is_conj()
            and not x.is_neg()
        )
        group = self._groups.get(key)
        if group is None:
            if spans:
                entry = Entry(format_path(path), _DTYPE_NAMES[x.dtype], list(x.shape), x.nbytes)
                group = (entry, x)
            else:
                name = f"<storage {len(self.entries)}>"
                entry = Entry(name, "U8", [storage.nbytes()], storage.nbytes())
                group = (entry, None)
            self._groups[key] = group
            self.entries.append(entry)
        entry, base = group
        entry.paths.append(path)
        if base is not None and (
            x is base
            or (
                x.dtype is base.dtype
                and x.shape == base.shape
                and x.stride() == base.stride()
                and x.storage_offset() == 0
                and not x.is_conj()
                and not x.is_neg()
            )
        ):
            return {"tensor": entry.key}
        node: dict[str, Any] = {
            "tensor": entry.key,
            "dtype": str(x.dtype).removeprefix("torch."),
            "shape": list(x.shape),
            "stride": list(x.stride()),
            "offset": x.storage_offset(),
        }
        if x.is_conj():
            node["conj"] = True
        if x.is_neg():
            node["neg"] = True
        return node


# -- reading ------------------------------------------------------------------------------------


def read_header(fd: int, path: str) -> tuple[dict[str, Any], int]:
    """The parsed JSON header and the offset where the data section starts."""
    prefix = os.pread(fd, 8, 0)
    if len(prefix) != 8:
        raise CheckpointFormatError(f"{path}: too short for a safetensors file")
    (length,) = struct.unpack("<Q", prefix)
    if length > 100_000_000 or length < 2:
        raise CheckpointFormatError(f"{path}: implausible safetensors header length {length}")
    text = _pread_exact(fd, length, 8, path)
    try:
        header = json.loads(text)
    except ValueError as error:
        raise CheckpointFormatError(
            f"{path}: the safetensors header is not JSON: {error}"
        ) from error
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{path}: the safetensors header is not a JSON object")
    return header, 8 + length


def _pread_exact(fd: int, nbytes: int, offset: int, path: str) -> bytes:
    chunks = []
    while nbytes:
        chunk = os.pread(fd, nbytes, offset)
        if not chunk:
            raise CheckpointFormatError(f"{path}: the file ends before its data does")
        chunks.append(chunk)
        nbytes -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _read_into(fd: int, tensor: torch.Tensor, offset: int, path: str) -> None:
    view = tensor_memoryview(tensor)
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise CheckpointFormatError(f"{path}: the file ends before its data does")
        done += got


def tensor_memoryview(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory, without a copy."""
    nbytes = tensor.nbytes
    if nbytes == 0:
        return memoryview(bytearray())
    import ctypes

    array = (ctypes.c_ubyte * nbytes).from_address(tensor.data_ptr())
    return memoryview(array).cast("B")


def storage_memoryview(tensor: torch.Tensor) -> memoryview:
    """All bytes of a CPU tensor's storage, without a copy (keep ``tensor`` alive meanwhile)."""
    storage = tensor.untyped_storage()
    nbytes = storage.nbytes()
    if nbytes == 0:
        return memoryview(b"")
    import ctypes

    array = (ctypes.c_ubyte * nbytes).from_address(storage.data_ptr())
    return memoryview(array).cast("B")


def load(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> Any:
    """Read a checkpoint file written by :func:`astage.save` back into its nested state dict.

    Containers, plain values and tensors come back as they were saved; tensors that shared a
    storage (tied weights, views) share one again. A safetensors file that astage did not
    write loads as a flat ``{key: tensor}`` dict. Blocking: from async code, run it in a
    thread (``await anyio.to_thread.run_sync(astage.load, path)``).
    """
    name = os.fspath(path)
    try:
        fd = os.open(name, os.O_RDONLY)
    except FileNotFoundError as error:
        raise CheckpointNotFoundError(f"no checkpoint file at {name}") from error
    except OSError as error:
        raise CheckpointError(f"cannot open {name}: {error.strerror or error}") from error
    try:
        header, data_start = read_header(fd, name)
        meta = header.pop("__metadata__", None) or {}
        stored: dict[str, torch.Tensor] = {}
        for key, info in header.items():
            stored[key] = _read_entry(fd, key, info, data_start, name)
    finally:
        os.close(fd)
    target = torch.device(device)
    if target.type != "cpu":
        stored = {key: tensor.to(target) for key, tensor in stored.items()}
    text = meta.get(METADATA_KEY) if isinstance(meta, dict) else None
    if text is None:
        return stored
    try:
        document = json.loads(text)
        version = document["version"]
        skeleton = document["skeleton"]
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointFormatError(
            f"{name}: unreadable __metadata__[{METADATA_KEY!r}]: {error}"
        ) from error
    if version != FORMAT_VERSION:
        raise CheckpointFormatError(f"{name}: astage format version {version} is not supported")
    return _Decoder(stored, name).decode(skeleton)


def _read_entry(fd: int, key: str, info: Any, data_start: int, name: str) -> torch.Tensor:
    if not isinstance(info, dict):
        raise CheckpointFormatError(f"{name}: header entry {key!r} is not a JSON object")
    part = "dtype"
    try:
        dtype = _DTYPES_BY_NAME.get(info[part])
        if dtype is None:
            raise CheckpointFormatError(
                f"{name}: header entry {key!r}: unsupported dtype {info[part]!r}"
            )
        part = "shape"
        shape = [int(size) for size in info[part]]
        part = "data_offsets"
        begin, end = (int(offset) for offset in info[part])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointFormatError(
            f"{name}: header entry {key!r}: missing or bad {part!r}"
        ) from error
    tensor = torch.empty(shape, dtype=dtype)
    if tensor.nbytes != end - begin:
        raise CheckpointFormatError(
            f"{name}: header entry {key!r}: 'data_offsets' span {end - begin} bytes, its "
            f"dtype and shape need {tensor.nbytes}"
        )
    _read_into(fd, tensor, data_start + begin, name)
    return tensor


class _Decoder(SkeletonDecoder):
    def __init__(self, stored: dict[str, torch.Tensor], name: str) -> None:
        self._stored = stored
        self._name = name

    def decode_other(self, node: dict[str, Any]) -> Any:
        if "tensor" in node:
            return self._tensor(node)
        raise self.bad(node)

    def bad(self, node: Any) -> AstageError:
        shown = sorted(node) if isinstance(node, dict) else type(node).__name__
        return CheckpointFormatError(f"{self._name}: bad skeleton node {shown}")

    def _tensor(self, node: dict[str, Any]) -> torch.Tensor:
        key = node["tensor"]
        base = self._stored.get(key) if isinstance(key, str) else None
        if base is None:
            raise CheckpointFormatError(f"{self._name}: skeleton names no header entry {key!r}")
        if "dtype" not in node:
            return base
        dtype = TORCH_DTYPES.get(node["dtype"])
        if dtype is None:
            raise CheckpointFormatError(
                f"{self._name}: skeleton view of {key!r}: unknown 'dtype' {node['dtype']!r}"
            )
        for part in ("offset", "shape", "stride"):
            if part not in node:
                raise CheckpointFormatError(
                    f"{self._name}: skeleton view of {key!r}: missing {part!r}"
                )
        view = torch.empty((0,), dtype=dtype, device=base.device).set_(
            base.untyped_storage(), node["offset"], node["shape"], node["stride"]
        )
        if node.get("conj"):
            view = view.conj()
        if node.get("neg"):
            view = neg_view(view)
        return view
