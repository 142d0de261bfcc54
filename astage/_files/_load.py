"""Reading a checkpoint file, trusting nothing in it: :func:`load` and :func:`check_file`.

The header's length must match the file exactly, its entries must tile the data section without
gaps or overlaps (as safetensors requires), each entry's size must be its dtype times its shape,
every view must lie inside its entry, and a malformed field is a
:class:`~astage.CheckpointFormatError` naming the file and the field. So no allocation is larger
than the file, and no error is a raw torch or Python one. The format is in :mod:`._safetensors`.
"""

from __future__ import annotations

import json
import os
import stat
import struct
import sys
from dataclasses import dataclass
from typing import Any

import torch

from .._drivers._gc import gc_paused
from .._errors import (
    AcceleratorUnavailableError,
    AstageError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    InvalidOptionsError,
    MeshMismatchError,
)
from .._paths import format_path
from .._torch import (
    device_mesh_without_backend,
    make_dtensor,
    neg_view,
    view_end,
)
from ._safetensors import (
    DIGEST_KEY,
    DTYPE_NAMES,
    FORMAT_VERSION,
    MAX_HEADER_BYTES,
    METADATA_KEY,
    digest_matches,
    fs_path,
    read_exactly,
    tensor_memoryview,
)
from ._skeleton import (
    MAX_SIZE,
    VIEW_DTYPES,
    SkeletonDecoder,
    local_shape_problem,
    mesh_node,
    mesh_problem,
    mesh_shape,
    numpy_or_none,
    placement_from_node,
    shown,
    takes_conj_bit,
    takes_neg_bit,
    tensor_attribute_allowed,
)

_MAX_DIMS = 64
_DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}
"""The dtypes a view in a file may have (defined in :mod:`._skeleton`, for the planner too)."""


@dataclass
class Stored:
    """One entry of a file's header, checked."""

    key: str
    dtype: torch.dtype
    shape: list[int]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass
class Header:
    """A file's header, checked against the file: its entries tile the data section exactly."""

    entries: dict[str, Stored]
    metadata: dict[str, str]
    data_start: int


def check_file(path: str | os.PathLike[str]) -> None:
    """Raise :class:`CheckpointFormatError` unless ``path`` is a checkpoint :func:`load` reads.

    Cheap: it reads the header only (every field, the digest, the skeleton and each view
    against its entry's size), no tensor data. A missing file raises
    :class:`CheckpointNotFoundError`.
    """
    name = fs_path(path, "path")
    fd, size = open_checked(name)
    try:
        header = read_checked(fd, name, size)
    finally:
        os.close(fd)
    document = skeleton_document(header.metadata, name)
    if document is not None:
        Decoder(header.entries, None, name, None).decode(document)


# Collections paused: the objects a load makes (a tensor and a few dicts per entry) set off
# full-heap collections, 100-165 ms each over 20,000 tensors beside a large live heap, which
# hold the GIL: from load_async's worker thread they stalled the event loop as long.
@gc_paused()
def load(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    into: Any = None,
    strict: bool = True,
    device_mesh: Any = None,
) -> Any:
    """Read a checkpoint file written by :func:`astage.save` back into its nested state dict.

    Containers, plain values and tensors come back as they were saved; tensors that shared a
    storage (tied weights, views) share one again. A safetensors file that astage did not
    write loads as a flat ``{key: tensor}`` dict. Blocking: from async code, use
    :func:`astage.load_async`, which takes the same arguments and reads in worker threads.

    With ``into`` (a state dict whose tensors are already where they belong: a model's, an
    optimizer's that has taken a step), the file is **restored into it**: each tensor of
    ``into`` is filled in place (on its own device; ``device`` must stay "cpu"), only the
    entries ``into`` holds are read, plain values are replaced by the file's, and ``into`` is
    returned. Keys, shapes and dtypes must match, else :class:`InvalidOptionsError` naming
    the path and the file, before anything in ``into`` changes. ``strict=False`` lets ``into``
    hold a subset of the file's keys (the rest is not read); a key of ``into`` the file lacks
    is refused either way.

    A file of DTensors (each rank's file holds its local shards) loads only in the rank that
    saved it, in a world of the same size: each DTensor comes back on ``device_mesh`` (a
    ``DeviceMesh``, or a sequence of them for several meshes; each must equal the mesh it was
    saved on), or without it on a description of the saved mesh that compares equal to the
    job's own (no process group is created, so no collective runs: enough for
    ``load_state_dict``; pass ``device_mesh`` for collectives such as ``full_tensor()``).
    Another mesh, rank or world size raises :class:`MeshMismatchError`: resharding is
    ``torch.distributed.checkpoint``'s work (with :class:`astage.compat.FileSystemWriter`).

    A file that is truncated, corrupt or crafted raises :class:`CheckpointFormatError` naming
    the file and the field; nothing in a file runs code.
    """
    meshes = _meshes_option(device_mesh)
    target = load_device(device)
    if into is not None:
        from ._restore import restore  # the restore builds on this module

        if target.type != "cpu":
            raise InvalidOptionsError(
                "load(into=...) fills the tensors of `into` on their own devices: leave "
                f"device at 'cpu', not {device!r}"
            )
        return restore(path, into, strict=strict)
    name = fs_path(path, "path")
    fd, size = open_checked(name)
    try:
        header = read_checked(fd, name, size)
        document = skeleton_document(header.metadata, name)
        stored: dict[str, torch.Tensor] = {}
        for key, entry in header.entries.items():
            tensor = torch.empty(entry.shape, dtype=entry.dtype, device="cpu")
            _read_into(fd, tensor, header.data_start + entry.begin, name, key)
            stored[key] = tensor
    finally:
        os.close(fd)
    if METADATA_KEY not in header.metadata:  # not `document is None`: a None state dict
        if target.type != "cpu":
            stored = {key: tensor.to(target) for key, tensor in stored.items()}
        return stored
    return Decoder(header.entries, stored, name, target, meshes).decode(document)


def load_device(device: Any) -> torch.device:
    """``load``'s ``device=`` as a torch device that is there, or :class:`InvalidOptionsError`.

    Checked before the file is read: torch would refuse a bad name with a raw RuntimeError,
    and a device this process lacks (``"cuda"`` without CUDA) with a raw AssertionError or
    RuntimeError once every tensor was read; :meth:`CheckpointDir.load_latest` must see
    neither as a bad file to pass over.
    """
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InvalidOptionsError(
            f"device {abridged(device)} is not a torch device: {reason}"
        ) from None
    if target.type in ("cpu", "meta"):
        return target
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    count = torch.accelerator.device_count() if accelerator is not None else 0
    if accelerator is None or accelerator.type != target.type or (target.index or 0) >= count:
        present = f"{count} {accelerator.type} device(s)" if accelerator is not None else "none"
        raise AcceleratorUnavailableError(
            f"cannot load onto device {str(target)!r}: this process has no such device "
            f"(accelerators: {present})"
        )
    return target


def _meshes_option(device_mesh: Any) -> tuple[Any, ...] | None:
    """``load``'s ``device_mesh=`` as a tuple of device meshes (None: none given)."""
    if device_mesh is None:
        return None
    module = sys.modules.get("torch.distributed.device_mesh")
    mesh_type = getattr(module, "DeviceMesh", None) if module is not None else None
    meshes = (
        (device_mesh,)
        if mesh_type is not None and isinstance(device_mesh, mesh_type)
        else tuple(device_mesh)
        if isinstance(device_mesh, (list, tuple))
        else None
    )
    if meshes is None or mesh_type is None or not all(isinstance(m, mesh_type) for m in meshes):
        raise InvalidOptionsError(
            "device_mesh must be a DeviceMesh or a list of them, not "
            f"{type(device_mesh).__qualname__}"
        )
    return meshes


def open_checked(name: str, missing: str | None = None) -> tuple[int, int]:
    """A descriptor on the regular file ``name`` and its size; :class:`CheckpointNotFoundError`
    saying ``missing`` (by default, that there is no checkpoint file there) if it is absent.

    O_NONBLOCK: a FIFO planted under the name must not block the open (it is then refused as
    not a regular file, as are a folder and a device such as /dev/zero, read without end).
    """
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError as error:
        raise CheckpointNotFoundError(missing or f"no checkpoint file at {name}") from error
    except OSError as error:
        raise CheckpointError(f"cannot open {name}: {error.strerror or error}") from error
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointFormatError(f"{name}: not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, info.st_size


def read_header(fd: int, path: str) -> tuple[dict[str, Any], int]:
    """The parsed JSON header of the file open at ``fd`` (every field checked against the
    file) and the offset where the data section starts."""
    raw = read_raw(fd, path, os.fstat(fd).st_size)[0]
    return raw, 8 + struct.unpack("<Q", _pread_exact(fd, 8, 0, path))[0]


def read_checked(fd: int, path: str, size: int) -> Header:
    return read_raw(fd, path, size)[1]


def read_raw(fd: int, path: str, size: int) -> tuple[dict[str, Any], Header]:
    """The header as parsed, and as checked against the file's ``size``."""
    if size < 8:
        raise CheckpointFormatError(f"{path}: {size} bytes, too short for a safetensors file")
    (length,) = struct.unpack("<Q", _pread_exact(fd, 8, 0, path))
    if length > MAX_HEADER_BYTES:
        raise CheckpointFormatError(
            f"{path}: header length {length} is over safetensors' limit of {MAX_HEADER_BYTES}"
        )
    if length > size - 8:
        raise CheckpointFormatError(
            f"{path}: header length {length}, but the file has {size - 8} bytes after it"
        )
    raw = _pread_exact(fd, length, 8, path)
    if not raw.startswith(b"{"):
        raise CheckpointFormatError(
            f"{path}: the safetensors header is not JSON: it does not start with '{{'"
        )
    header = parse_json(raw, f"{path}: the safetensors header", in_pieces=True)
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{path}: the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(
        isinstance(value, str) for value in metadata.values()
    ):
        raise CheckpointFormatError(f"{path}: '__metadata__' is not a map of str to str")
    data_start = 8 + length
    entries = {key: _entry(key, info, path) for key, info in header.items()}
    _check_tiling(entries, size - data_start, path)
    digest = metadata.get(DIGEST_KEY)
    if digest is not None and not digest_matches(raw, digest):
        raise CheckpointFormatError(
            f"{path}: __metadata__[{DIGEST_KEY!r}] does not match the header: the header was "
            "changed or damaged after astage wrote it"
        )
    return {"__metadata__": metadata, **header}, Header(entries, metadata, data_start)


def parse_json(raw: bytes | str, what: str, *, in_pieces: bool = False) -> Any:
    """Strict JSON (UTF-8, no NaN or Infinity); any problem a CheckpointFormatError.

    ``in_pieces``: an object whose top level the writer cut into runs is parsed a run at a
    time (:func:`object_in_pieces`), to the same value.
    """
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        if in_pieces:
            parsed = object_in_pieces(text)
            if parsed is not None:
                return parsed
        # No object_pairs_hook for duplicate keys: it costs as much as the parse. A repeated
        # entry key leaves a gap in the data that the tiling check refuses; a repeated field
        # is read as Python reads it (the last one), and is checked like any other.
        return json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError too
        reason = "nested too deep" if isinstance(error, RecursionError) else str(error)
        raise CheckpointFormatError(f"{what} is not valid JSON: {reason}") from None


PIECES_FROM = 1 << 16
"""Texts shorter than this are parsed whole (:func:`object_in_pieces`)."""
PIECE_LEAST = 1 << 12
"""A text cut into more than :data:`FEW_RUNS` runs shorter than this on average is parsed
whole (:func:`object_in_pieces`)."""
FEW_RUNS = 64
_JSON_SPACE = " \t\n\r"


def object_in_pieces(text: str) -> dict[str, Any] | None:
    """The JSON object ``text``, parsed a run of members at a time where its top level is cut
    by ``",\n"``; None where it is not, or a run does not parse (the caller then parses it
    whole, which gives the same value or says what is wrong).

    Why: ``json.loads`` holds the GIL for all of its call, and a header over 20,000 tensors
    is 3 MB, 15-25 ms of C in load_async's worker thread with the caller's event loop
    stalled meanwhile. astage's writer puts a newline after the comma between the top-level
    runs of its header (``_safetensors.json_text``), and a newline is never raw inside a JSON
    string. The value is the whole's: each run, put between braces, must parse as an object
    with at least one member, so the runs joined by their commas are the whole's members in
    order, and a key met twice keeps its first place and its last value, as ``json.loads``
    keeps it. A cut anywhere else (a deeper level, a hostile file) leaves some run unbalanced,
    and the text is parsed whole.
    """
    if len(text) < PIECES_FROM:
        return None
    body = text.strip(_JSON_SPACE)  # only JSON's whitespace: str.strip() takes more
    if not (body.startswith("{") and body.endswith("}")):
        return None
    cuts = body.count(",\n")
    if cuts > max(FEW_RUNS, len(body) // PIECE_LEAST):
        # A run costs a call (2.6 us) whatever its length: a hostile header of tiny runs
        # ('"a":0,\n' again and again) took 2.6 s for 7 MB (40 times json.loads of the
        # whole, 0.06 s), 40 s for the 100 MB allowed, and a str per run. astage's runs are
        # JSON_PIECE entries (15-25 KB): so few cuts are read in pieces, and others whole.
        return None
    runs = body[1:-1].split(",\n")
    if len(runs) < 2:
        return None
    parsed: dict[str, Any] = {}
    for run in runs:
        try:
            part = json.loads("{" + run + "}", parse_constant=_no_constant)
        except (ValueError, RecursionError):
            return None
        if type(part) is not dict or not part:
            return None
        parsed.update(part)
    return parsed


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _entry(key: str, info: Any, path: str) -> Stored:
    def where() -> str:  # only for a message: the key's repr cost 2 us per entry
        return f"{path}: header entry {abridged(key)}"

    if not isinstance(info, dict):
        raise CheckpointFormatError(f"{where()} is not a JSON object")
    for part in ("dtype", "shape", "data_offsets"):
        if part not in info:
            raise CheckpointFormatError(f"{where()}: missing {part!r}")
    dtype = _DTYPES_BY_NAME.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    if dtype is None:
        raise CheckpointFormatError(f"{where()}: unsupported dtype {abridged(info['dtype'])}")
    shape = info["shape"]
    if not _sizes(shape):
        raise CheckpointFormatError(
            f"{where()}: 'shape' must be a list of at most {_MAX_DIMS} sizes (ints >= 0), "
            f"not {abridged(shape)}"
        )
    offsets = info["data_offsets"]
    if not (_sizes(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]):
        raise CheckpointFormatError(
            f"{where()}: 'data_offsets' must be [begin, end] with 0 <= begin <= end, "
            f"not {abridged(offsets)}"
        )
    begin, end = offsets
    nbytes = _numel(shape) * dtype.itemsize
    if nbytes != end - begin:
        raise CheckpointFormatError(
            f"{where()}: 'data_offsets' span {end - begin} bytes, its dtype and shape need {nbytes}"
        )
    refused = _empty_shape_refused(shape, dtype)
    if refused is not None:
        raise CheckpointFormatError(
            f"{where()}: torch refuses 'shape' {abridged(shape)}: {refused}"
        )
    return Stored(key, dtype, shape, begin, end)


def _empty_shape_refused(shape: list[int], dtype: torch.dtype) -> str | None:
    """Why torch refuses a tensor of ``shape`` with no elements, or None.

    A shape without a 0 is bounded by its entry's bytes, and so by the file; beside a 0 the
    other sizes may be anything, and torch refuses some (its strides or storage size would
    overflow int64) with a raw RuntimeError. Asked on the meta device: nothing is allocated.
    """
    if 0 not in shape or len(shape) < 2:
        return None
    try:
        torch.empty(shape, dtype=dtype, device="meta")
    except RuntimeError as error:
        return str(error)
    return None


def _check_tiling(entries: dict[str, Stored], data_bytes: int, path: str) -> None:
    """The entries cover the data section exactly, each byte once (safetensors' own rule)."""
    position = 0
    for entry in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if entry.begin != position:
            problem = "overlaps the one before" if entry.begin < position else "leaves a gap"
            raise CheckpointFormatError(
                f"{path}: header entry {abridged(entry.key)}: 'data_offsets' "
                f"{[entry.begin, entry.end]} {problem} (entries must tile the data section)"
            )
        position = entry.end
    if position != data_bytes:
        raise CheckpointFormatError(
            f"{path}: the header's entries end at {position} bytes of data, but the file has "
            f"{data_bytes} after the header (truncated, extended, or a wrong header length)"
        )


def _sizes(value: Any) -> bool:
    return (
        type(value) is list
        and len(value) <= _MAX_DIMS
        and all(type(n) is int and 0 <= n < MAX_SIZE for n in value)
    )


def _numel(shape: list[int]) -> int:
    numel = 1
    for size in shape:
        numel *= size
    return numel


def abridged(value: Any, limit: int = 60) -> str:
    """A short repr of a value from the file (never a raw RecursionError: see ``shown``)."""
    return shown(value, limit)


def skeleton_document(metadata: dict[str, str], path: str) -> Any:
    """The skeleton in ``__metadata__``, or None for a file that astage did not write (or
    one whose state dict is None: tell them apart by ``METADATA_KEY in metadata``)."""
    text = metadata.get(METADATA_KEY)
    if text is None:
        return None
    where = f"{path}: __metadata__[{METADATA_KEY!r}]"
    document = parse_json(text, where)
    if not isinstance(document, dict) or "version" not in document or "skeleton" not in document:
        raise CheckpointFormatError(f"{where}: not an object with 'version' and 'skeleton'")
    version = document["version"]
    if type(version) is not int or version != FORMAT_VERSION:
        raise CheckpointFormatError(f"{where}: format version {abridged(version)} is not supported")
    if document.get("sealed") is True and DIGEST_KEY not in metadata:
        # Files written before the digest existed have neither; a damaged key must not make
        # a sealed header read as one of those, whose every other edit then goes unnoticed.
        raise CheckpointFormatError(
            f"{path}: __metadata__[{DIGEST_KEY!r}] is missing, but astage sealed this header "
            "with it: the header was changed or damaged after astage wrote it"
        )
    return document["skeleton"]


def _pread_exact(fd: int, nbytes: int, offset: int, path: str) -> bytes:
    chunks = []
    while nbytes:
        chunk = _pread(fd, nbytes, offset, path)
        if not chunk:
            raise CheckpointFormatError(f"{path}: the file ends before its data does")
        chunks.append(chunk)
        nbytes -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _pread(fd: int, nbytes: int, offset: int, path: str) -> bytes:
    try:
        return os.pread(fd, nbytes, offset)
    except OSError as error:
        raise CheckpointError(f"cannot read {path}: {error.strerror or error}") from error


def _read_into(fd: int, tensor: torch.Tensor, offset: int, path: str, key: str) -> None:
    read_exactly(fd, tensor_memoryview(tensor), offset, path, key)


_DTENSOR_KEYS = frozenset(
    {
        "local",
        "mesh",
        "placements",
        "shape",
        "stride",
        "requires_grad",
        "rank",
        "world",
        "coordinate",
    }
)


def _coordinate_in(mesh: list[Any], rank: int) -> list[int] | None:
    """Where ``rank`` sits in a checked mesh node's rank grid, or None if it is not in it."""
    ranks = torch.tensor(mesh[1], dtype=torch.int64)
    found = (ranks == rank).nonzero()
    return [int(i) for i in found[0]] if len(found) else None


def _mesh_text(node: list[Any]) -> str:
    device_type, grid, names = node
    shape = "x".join(map(str, mesh_shape(node)))
    named = f" named {tuple(names)}" if names else ""
    text = f"a {device_type} mesh of shape {shape}{named}, ranks {grid}"
    return text if len(text) <= 300 else text[:297] + "..."


_TENSOR_KEYS = frozenset({"tensor", "dtype", "shape", "stride", "offset", "conj", "neg", "attrs"})
_VIEW_KEYS = ("dtype", "offset", "shape", "stride")


class Decoder(SkeletonDecoder):
    """Rebuilds a state dict from a skeleton; with ``stored`` None, only checks it."""

    def __init__(
        self,
        entries: dict[str, Stored],
        stored: dict[str, torch.Tensor] | None,
        name: str,
        device: torch.device | None,
        meshes: tuple[Any, ...] | None = None,
    ) -> None:
        self._entries = entries
        self._stored = stored
        self._name = name
        self._device = device
        self._on_device: dict[str, torch.Tensor] = {}
        self._meshes = meshes
        self._mesh_of: dict[str, Any] = {}  # the mesh object of each mesh node, by its JSON
        self._dtensors: dict[str, torch.Tensor] = {}  # each DTensor built, by its node's JSON
        self._views: dict[str, torch.Tensor] = {}  # each view built, by its node's JSON
        self._meshes_checked: set[str] = set()  # mesh nodes found well-formed, as JSON
        self._coordinates: dict[tuple[str, int], list[int] | None] = {}  # (mesh, rank): where

    def decode_other(self, node: dict[str, Any]) -> Any:
        if "tensor" in node:
            return self._tensor(node)
        if "dtensor" in node and len(node) == 1:
            return self._dtensor(node["dtensor"])
        if "numpy" in node:
            return self._array(node)
        raise self.bad(node)

    def bad(self, node: Any) -> AstageError:
        shown = sorted(node) if isinstance(node, dict) else type(node).__name__
        return self.invalid(f"not a skeleton node: {shown}")

    def invalid(self, problem: str) -> AstageError:
        where = format_path(self.path)
        if len(where) > 200:  # keys come from the file: do not echo megabytes of them
            where = where[:197] + "..."
        return CheckpointFormatError(
            f"{self._name}: __metadata__[{METADATA_KEY!r}]: the skeleton node at {where}: {problem}"
        )

    def _entry_of(self, node: dict[str, Any], tag: str) -> Stored:
        key = node[tag]
        entry = self._entries.get(key) if isinstance(key, str) else None
        if entry is None:
            raise self.invalid(f"{tag!r} names no header entry: {abridged(key)}")
        return entry

    def _base(self, key: str) -> torch.Tensor:
        assert self._stored is not None
        base = self._on_device.get(key)
        if base is None:
            base = self._stored[key]
            if self._device is not None and self._device.type != "cpu":
                base = base.to(self._device)
            self._on_device[key] = base
        return base

    def _tensor(self, node: dict[str, Any]) -> torch.Tensor | None:
        if len(node) == 1 and self._stored is not None:  # the common node: a whole entry
            key = node["tensor"]
            if type(key) is str and key in self._entries:
                return self._base(key)
        unknown = set(node) - _TENSOR_KEYS
        if unknown:
            raise self.invalid(f"unknown tensor fields {sorted(unknown)}")
        entry = self._entry_of(node, "tensor")
        attributes = self._attributes(node.get("attrs", []))
        if "dtype" not in node:
            extra = [part for part in (*_VIEW_KEYS[1:], "conj", "neg") if part in node]
            if extra:
                raise self.invalid(f"{extra[0]!r} without 'dtype'")
            tensor = None if self._stored is None else self._base(entry.key)
        else:
            # One view object at several paths comes back as one object, as a whole entry
            # does: the same node (attributes included) gives the same view.
            same = json.dumps(node, sort_keys=True) if self._stored is not None else None
            tensor = self._views.get(same) if same is not None else None
            if tensor is not None:
                return tensor
            tensor = self._view(node, entry)
            if same is not None and tensor is not None:
                self._views[same] = tensor
        if tensor is not None:
            for attribute, value in attributes:
                setattr(tensor, attribute, value)
        return tensor

    def _view(self, node: dict[str, Any], entry: Stored) -> torch.Tensor | None:
        for part in _VIEW_KEYS:
            if part not in node:
                raise self.invalid(f"a view of {abridged(entry.key)}: missing {part!r}")
        name = node["dtype"]
        dtype = VIEW_DTYPES.get(name) if isinstance(name, str) else None
        if dtype is None:
            raise self.invalid(f"unsupported 'dtype' {abridged(name)}")
        shape, stride, offset = node["shape"], node["stride"], node["offset"]
        if not (_sizes(shape) and _sizes(stride) and len(shape) == len(stride)):
            raise self.invalid(
                f"'shape' {abridged(shape)} and 'stride' {abridged(stride)} must be lists of as "
                f"many ints >= 0 (at most {_MAX_DIMS})"
            )
        if type(offset) is not int or not 0 <= offset < MAX_SIZE:
            raise self.invalid(f"'offset' must be an int >= 0, not {abridged(offset)}")
        conj, neg = node.get("conj", False), node.get("neg", False)
        if conj is not False and not (conj is True and takes_conj_bit(dtype)):
            raise self.invalid(f"'conj' {abridged(conj)} on a view of dtype {name}")
        if neg is not False and not (neg is True and takes_neg_bit(dtype)):
            raise self.invalid(f"'neg' {abridged(neg)} on a view of dtype {name}")
        # The view must lie inside its entry: torch would otherwise grow the storage with
        # uninitialised bytes (set_ resizes a storage that is too small).
        if 0 in shape:
            needed = offset * dtype.itemsize
        else:
            needed = view_end(shape, stride, offset) * dtype.itemsize
        if needed > entry.nbytes:
            raise self.invalid(
                f"a {name} view (shape {shape}, stride {stride}, offset {offset}) reaches "
                f"byte {needed}, past the end of entry {abridged(entry.key)} ({entry.nbytes} bytes)"
            )
        if self._stored is None:
            if 0 in shape:  # sizes beside a 0 are bounded by nothing: as load's set_ would
                try:
                    torch.empty((0,), dtype=dtype, device="meta").set_(
                        torch.empty((0,), dtype=torch.uint8, device="meta").untyped_storage(),
                        offset,
                        shape,
                        stride,
                    )
                except RuntimeError as error:
                    raise self.invalid(f"torch refuses this view: {error}") from None
            return None
        base = self._base(entry.key)
        try:
            view = torch.empty((0,), dtype=dtype, device=base.device).set_(
                base.untyped_storage(), offset, shape, stride
            )
            if conj:
                view = view.conj()
            if neg:
                view = neg_view(view)
        except RuntimeError as error:  # anything torch refuses that the checks above let by
            raise self.invalid(f"torch refuses this view: {error}") from None
        return view

    def _dtensor(self, value: Any) -> Any:
        """A DTensor: its local shard from the file, on the mesh it was saved on."""
        if type(value) is not dict or set(value) != _DTENSOR_KEYS:
            shown = sorted(value) if type(value) is dict else type(value).__name__
            raise self.invalid(f"a 'dtensor' node must hold {sorted(_DTENSOR_KEYS)}, not {shown}")
        local_node = value["local"]
        if type(local_node) is not dict or "tensor" not in local_node:
            raise self.invalid("a DTensor's 'local' must be a tensor node")
        local = self._tensor(local_node)
        if "attrs" in local_node:
            raise self.invalid("a DTensor's local shard may not carry attributes")
        mesh = value["mesh"]
        # Every DTensor of a state dict names the same mesh or two: check each one once.
        try:
            mesh_text = json.dumps(mesh)
        except (RecursionError, ValueError):  # unchecked yet: it may nest past the stack
            raise self.invalid("the DTensor's 'mesh' is nested too deep") from None
        if mesh_text not in self._meshes_checked:
            problem = mesh_problem(mesh)
            if problem is not None:
                raise self.invalid(f"the DTensor's 'mesh' {problem}")
            self._meshes_checked.add(mesh_text)
        shape, stride = value["shape"], value["stride"]
        if not (_sizes(shape) and _sizes(stride) and len(shape) == len(stride)):
            raise self.invalid(
                f"the DTensor's 'shape' {abridged(shape)} and 'stride' {abridged(stride)} must be "
                f"lists of as many ints >= 0 (at most {_MAX_DIMS})"
            )
        placements_node = value["placements"]
        grid_shape = mesh_shape(mesh)
        if type(placements_node) is not list or len(placements_node) != len(grid_shape):
            raise self.invalid(
                f"the DTensor's 'placements' must be a list of {len(grid_shape)} (one per mesh "
                f"dimension), not {abridged(placements_node)}"
            )
        placements = []
        for item in placements_node:
            placement = placement_from_node(item, len(shape))
            if placement is None:
                raise self.invalid(
                    f"the DTensor placement {abridged(item)} is not one astage reads"
                )
            placements.append(placement)
        requires_grad, rank, world = value["requires_grad"], value["rank"], value["world"]
        coordinate = value["coordinate"]
        if type(requires_grad) is not bool:
            raise self.invalid(f"'requires_grad' must be a bool, not {abridged(requires_grad)}")
        if not (type(rank) is int and type(world) is int and 0 <= rank < world < MAX_SIZE):
            raise self.invalid(
                f"'rank' {abridged(rank)} must be an int in [0, 'world' {abridged(world)})"
            )
        where_rank = (mesh_text, rank)
        if where_rank not in self._coordinates:
            self._coordinates[where_rank] = _coordinate_in(mesh, rank)
        if coordinate != self._coordinates[where_rank]:
            raise self.invalid(
                f"'coordinate' {abridged(coordinate)} is not where rank {rank} sits in the mesh"
            )
        where = self._local_problem(local_node, shape, placements)
        if where is not None:
            raise self.invalid(where)
        if self._stored is None:
            return None
        assert local is not None
        device = self._device.type if self._device is not None else "cpu"
        if mesh[0] != device:
            raise MeshMismatchError(
                f"{self._name}: the DTensor at {format_path(self.path)} lives on a {mesh[0]!r} "
                f"mesh; load it with device={mesh[0]!r} (asked: {device!r})"
            )
        # A DTensor at two paths (tied weights) comes back as one object, like a plain tensor.
        key = json.dumps(value, sort_keys=True)
        dtensor = self._dtensors.get(key)
        if dtensor is None:
            dtensor = self._dtensors[key] = make_dtensor(
                local,
                self._mesh(mesh, rank, world),
                placements,
                shape,
                stride,
                requires_grad=requires_grad,
            )
        return dtensor

    def _local_problem(
        self, node: dict[str, Any], shape: list[int], placements: list[Any]
    ) -> str | None:
        """What is wrong with the local shard's shape against the global one, or None."""
        local_shape = node["shape"] if "shape" in node else self._entry_of(node, "tensor").shape
        return local_shape_problem(list(local_shape), shape, placements)

    def _mesh(self, node: list[Any], rank: int, world: int) -> Any:
        """This process's mesh object for a mesh node, checked: same mesh, rank and world."""
        key = json.dumps(node)
        mesh = self._mesh_of.get(key)
        if mesh is not None:
            return mesh
        described = _mesh_text(node)
        reshard = (
            "astage.save writes each rank's shards for the same mesh only; to load on "
            "another mesh or world size, save with torch.distributed.checkpoint (dcp.save or "
            "dcp.async_save with astage.compat.FileSystemWriter) and load with dcp.load, "
            "which reshards"
        )
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise MeshMismatchError(
                f"{self._name}: holds DTensors saved by rank {rank} of a world of {world} on "
                f"{described}: load it in that rank's process, after init_process_group"
            )
        here, size = dist.get_rank(), dist.get_world_size()
        if size != world or here != rank:
            raise MeshMismatchError(
                f"{self._name}: holds DTensors saved by rank {rank} of a world of {world} on "
                f"{described}; this process is rank {here} of {size}. Each rank loads the "
                f"file it saved; {reshard}"
            )
        if self._meshes is None:
            # A description of the saved mesh, equal (DeviceMesh.__eq__) to the job's own:
            # creating its process groups would be a collective inside load().
            device_type, grid, names = node
            mesh = device_mesh_without_backend(
                device_type, torch.tensor(grid), tuple(names) if names else None
            )
        else:
            found = [m for m in self._meshes if mesh_node(m) == node]
            if not found:
                given = "; ".join(_mesh_text(mesh_node(m)) for m in self._meshes)
                raise MeshMismatchError(
                    f"{self._name}: the DTensor at {format_path(self.path)} was saved on "
                    f"{described}, and device_mesh= gives {given}; {reshard}"
                )
            mesh = found[0]
        self._mesh_of[key] = mesh
        return mesh

    def _attributes(self, value: Any) -> list[tuple[str, Any]]:
        if type(value) is not list:
            raise self.invalid("'attrs' must be a list of [name, value] pairs")
        attributes = []
        for pair in value:
            if type(pair) is not list or len(pair) != 2 or type(pair[0]) is not str:
                raise self.invalid(f"'attrs' must hold [name, value] pairs, not {abridged(pair)}")
            name = pair[0]
            if not tensor_attribute_allowed(name):
                raise self.invalid(f"a tensor attribute may not be named {name!r}")
            attributes.append((name, self.decode_plain(pair[1], "a tensor's attribute")))
        return attributes

    def _array(self, node: dict[str, Any]) -> Any:
        if set(node) != {"numpy", "dtype", "shape"}:
            raise self.invalid(f"a numpy node has the fields {sorted(node)}")
        entry = self._entry_of(node, "numpy")
        numpy = numpy_or_none()
        if numpy is None:
            raise self.invalid("a numpy array needs numpy, which is not installed")
        dtype_text, shape = node["dtype"], node["shape"]
        dtype = None
        if isinstance(dtype_text, str) and len(dtype_text) <= 4:
            try:
                dtype = numpy.dtype(dtype_text)
            except (TypeError, ValueError):
                dtype = None
        if dtype is None or dtype.kind not in "biufc" or dtype.str != dtype_text:
            raise self.invalid(f"unsupported numpy 'dtype' {abridged(dtype_text)}")
        if not _sizes(shape) or _numel(shape) * dtype.itemsize != entry.nbytes:
            raise self.invalid(
                f"numpy 'shape' {abridged(shape)} of {dtype_text} does not fill entry "
                f"{abridged(entry.key)} ({entry.nbytes} bytes)"
            )
        if 0 in shape:  # sizes beside a 0 are bounded by nothing: numpy refuses some
            try:
                numpy.empty((0,), dtype=dtype).reshape(shape)
            except ValueError as error:
                raise self.invalid(f"numpy refuses 'shape' {abridged(shape)}: {error}") from None
        if self._stored is None:
            return None
        storage = self._stored[entry.key].untyped_storage()
        data = torch.empty((0,), dtype=torch.uint8, device="cpu").set_(storage).numpy()
        little = data.view(dtype.newbyteorder("<")).reshape(shape)
        return little.astype(dtype)  # the array's own byte order, and its own memory
