"""The safetensors file format as astage writes and reads it (sans-IO, apart from :func:`load`).

A safetensors file is an 8-byte little-endian header length, a JSON header, then the tensors'
bytes back to back. The header maps each key to ``dtype``, ``shape`` and ``data_offsets``
(relative to the end of the header), plus ``__metadata__``: a str -> str map.

How a nested state dict maps onto it:

* **Keys** are paths rendered by :func:`astage.format_path`: ``['model']['layers.0.weight']``,
  ``['optim']['state'][3]['exp_avg']``. Dict keys are printed with ``repr``, so a dot or a quote
  inside a key never makes two paths look alike. A tensor that is the whole state dict is
  ``<root>``. Where two paths still print alike (two NaN keys), the second tensor is stored
  under a ``<storage N>`` name instead: no tensor is lost.
* **One entry per storage.** safetensors forbids overlapping entries, so each storage is stored
  once. When a tensor spans its storage (offset 0, contiguous, a dtype safetensors knows), the
  entry *is* that tensor under its path. Otherwise the storage's bytes are stored as a ``U8``
  entry named ``<storage N>`` (a name no path can take). A numpy array is an entry too (its
  bytes, little-endian, captured when the layout is planned).
* **The skeleton** (containers, plain values, and for each tensor the entry it lives in and, for
  views, its dtype, shape, stride and offset) is JSON in ``__metadata__["astage"]``; tied
  weights refer to the same entry twice, so :func:`load` gives them one storage again. An
  ``OrderedDict``'s ``_metadata`` attribute (``Module.state_dict()`` sets it, with each
  submodule's version, and ``load_state_dict`` reads it) is kept too, as plain JSON, and so are
  Python attributes set on a tensor (plain values only).
* **A digest** of the header (``__metadata__["astage.sha256"]``: the SHA-256 of the header's
  JSON text, taken with the digest's own digits zeroed) makes any later edit of the header a
  :class:`CheckpointFormatError`.
  It guards against corruption, not against an attacker, who can recompute it: the loader
  checks every field regardless.

Only plain data goes in (see :mod:`._skeleton`): containers, plain values, numpy arrays and
numbers, ``torch.Size``, ``torch.dtype``, enums, paths, ``argparse.Namespace``, sets, and strided
CPU or device tensors. Anything else is an :class:`~astage.UnsavableError` naming its path: a
checkpoint holds no pickle, so opening one runs no code.

Reading trusts nothing (:func:`load`, :func:`check_file`): the header's length must match the
file exactly, its entries must tile the data section without gaps or overlaps (as safetensors
requires), each entry's size must be its dtype times its shape, every view must lie inside its
entry, and a malformed field is a :class:`CheckpointFormatError` naming the file and the field.
So no allocation is larger than the file, and no error is a raw torch or Python one.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
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
    InvalidOptionsError,
    MeshMismatchError,
    UnsavableError,
)
from .._paths import Attr, Path, format_path
from .._torch import (
    device_mesh_without_backend,
    dtensor_local,
    dtensor_spec,
    make_dtensor,
    neg_view,
    storage_key,
)
from ._skeleton import (
    TORCH_DTYPES,
    SkeletonDecoder,
    SkeletonEncoder,
    is_dtensor,
    mesh_node,
    mesh_problem,
    mesh_shape,
    numpy_or_none,
    placement_from_node,
    placement_node,
)

FORMAT_VERSION = 1
METADATA_KEY = "astage"
"""The ``__metadata__`` entry that holds the skeleton."""
DIGEST_KEY = "astage.sha256"
"""The ``__metadata__`` entry that holds the header's digest."""
MAX_HEADER_BYTES = 100_000_000
"""safetensors' limit on the JSON header: a longer one opens in no reader."""
DATA_ALIGN = 4096
"""The data section starts at a multiple of this (a page; what direct I/O asks on Linux)."""
_MAX_DIMS = 64
_MAX_SIZE = 1 << 62  # a dimension, stride or offset beyond this cannot index a real storage

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
_VIEW_DTYPES = {name: d for name, d in TORCH_DTYPES.items() if not name.startswith("q")}
"""The dtypes a view in a file may have: every torch dtype but the quantized ones."""
_NEG_KINDS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

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
    data: bytes | None = None
    """Its bytes, captured at plan time, for a value no staged tensor brings (a numpy array)."""


@dataclass
class Layout:
    """Everything a writer needs before the first byte lands: entries, offsets, header."""

    entries: list[Entry]
    """The entries whose bytes come from staged tensors (``write(path, tensor)``)."""
    by_path: dict[Path, Entry]
    header: bytes
    """What goes at offset 0: the length prefix, the JSON header, then the bytes of the
    :attr:`captured` entries (none without numpy arrays); the JSON is padded with spaces so
    that this ends at a multiple of :data:`DATA_ALIGN`, where the staged entries start (so that
    direct I/O can write them)."""
    tensors: int
    """Paths at which a tensor sits (a tied tensor counts at each path)."""
    data_start: int = -1
    """Where the data section starts: the end of the padded JSON header."""
    captured: list[Entry] = field(default_factory=list)
    """Entries whose bytes were captured at plan time; they lie at the start of the data."""

    def __post_init__(self) -> None:
        if self.data_start < 0:
            self.data_start = len(self.header)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor (and array) data."""
        return self.file_size - self.data_start

    @property
    def file_size(self) -> int:
        return len(self.header) + sum(entry.nbytes for entry in self.entries)


def plan_layout(state_dict: Any, metadata: Mapping[str, str] | None = None) -> Layout:
    """The file layout for ``state_dict``: raises :class:`UnsavableError` for what cannot go in.

    ``state_dict`` may be the source or its staged copy: only the structure, the tensors'
    dtypes, shapes, strides, offsets and which of them share a storage are used (and the
    bytes of numpy arrays, which are captured now). A header that no reader could open (over
    safetensors' 100 MB) is refused here, naming its biggest part, before anything is written.
    """
    builder = _LayoutBuilder()
    skeleton = builder.encode(state_dict, ())
    if builder.text_chars > MAX_HEADER_BYTES:  # known before the (slow) JSON encoding
        size, path = builder.longest_text
        raise UnsavableError(
            f"the checkpoint header would be over {MAX_HEADER_BYTES} bytes (safetensors' "
            f"limit, which no reader would open): its strings alone take {builder.text_chars} "
            f"characters, the longest {size} at {format_path(path)}; keep large values out "
            "of the state dict or store them as tensors or numpy arrays (not in the header)",
            path,
        )
    user = dict(metadata or {})
    for key, value in user.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise UnsavableError(f"metadata must map str to str, got {key!r}: {value!r}")
    for reserved in (METADATA_KEY, DIGEST_KEY):
        if reserved in user:
            raise UnsavableError(f"the metadata key {reserved!r} is reserved for astage")
    header_meta = {"format": "pt", **user}
    header_meta[METADATA_KEY] = json.dumps(
        {"version": FORMAT_VERSION, "skeleton": skeleton}, separators=(",", ":")
    )
    entries: dict[str, Any] = {}
    offset = 0
    for entry in _file_order(builder.entries, builder.captured):
        entry.begin = offset
        offset += entry.nbytes
        entries[entry.key] = {
            "dtype": entry.dtype,
            "shape": entry.shape,
            "data_offsets": [entry.begin, offset],
        }
    captured_bytes = sum(entry.nbytes for entry in builder.captured)
    text = header_text({"__metadata__": header_meta, **entries}, DATA_ALIGN, captured_bytes)
    if len(text) > MAX_HEADER_BYTES:
        raise _header_too_big(len(text), state_dict, skeleton, header_meta)
    prefix = struct.pack("<Q", len(text)) + text
    by_path = {path: entry for entry in builder.entries for path in entry.paths}
    return Layout(
        entries=builder.entries,
        by_path=by_path,
        header=prefix + b"".join(entry.data or b"" for entry in builder.captured),
        tensors=builder.tensors,
        data_start=len(prefix),
        captured=builder.captured,
    )


def _file_order(staged: list[Entry], captured: list[Entry]) -> list[Entry]:
    """The order of the entries in the data section (safetensors lets it be any, gap-free).

    Staged entries whose sizes are whole multiples of :data:`DATA_ALIGN` come first, so each
    of them starts at an aligned file offset and can be written with direct I/O straight from
    an aligned buffer; then the biggest of the others (it still starts aligned), then the rest
    in the state dict's order. The bytes captured at plan time come before all of them, as part
    of :attr:`Layout.header` (whose JSON padding makes it end aligned).
    """
    aligned = [entry for entry in staged if entry.nbytes % DATA_ALIGN == 0]
    others = [entry for entry in staged if entry.nbytes % DATA_ALIGN]
    if others:
        biggest = max(range(len(others)), key=lambda index: others[index].nbytes)
        others.insert(0, others.pop(biggest))
    return [*captured, *aligned, *others]


_UNSEALED = f'"{DIGEST_KEY}":"{"0" * 64}"'.encode()


def header_text(header: dict[str, Any], align: int = 8, then: int = 0) -> bytes:
    """The JSON text of ``header``, padded with spaces (which safetensors allows after the
    JSON) so that the 8-byte length prefix, the text and ``then`` bytes after it end at a
    multiple of ``align``, with
    its digest: the SHA-256 of the very text, taken while the digest's 64 hex digits are
    zeros (cheap: one hash, no canonical form)."""
    header["__metadata__"][DIGEST_KEY] = "0" * 64
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text) + then) % align)
    assert text.count(_UNSEALED) == 1  # inside a JSON string a quote is escaped: no lookalike
    digest = hashlib.sha256(text).hexdigest()
    header["__metadata__"][DIGEST_KEY] = digest
    return text.replace(_UNSEALED, f'"{DIGEST_KEY}":"{digest}"'.encode())


def _digest_matches(raw: bytes, digest: str) -> bool:
    sealed = f'"{DIGEST_KEY}":"{digest}"'.encode()
    if len(digest) != 64 or raw.count(sealed) != 1:
        return False
    return hashlib.sha256(raw.replace(sealed, _UNSEALED)).hexdigest() == digest


def _header_too_big(size: int, state_dict: Any, skeleton: Any, meta: dict[str, str]) -> Exception:
    limit = f"over safetensors' limit of {MAX_HEADER_BYTES} bytes, which no reader would open"
    skeleton_bytes = len(meta[METADATA_KEY])
    if skeleton_bytes < size // 2:
        biggest = max(meta, key=lambda key: len(meta[key]))
        if len(meta[biggest]) > size // 2:
            return UnsavableError(
                f"the checkpoint header would be {size} bytes, {limit}: the metadata entry "
                f"{biggest!r} takes {len(meta[biggest])}"
            )
        return UnsavableError(
            f"the checkpoint header would be {size} bytes, {limit}: its entries (one per "
            "stored tensor) take most of it; save fewer, larger tensors"
        )
    path, part = _biggest_part(state_dict, skeleton)
    return UnsavableError(
        f"the checkpoint header would be {size} bytes, {limit}; the biggest part is the value "
        f"at {format_path(path)} ({part} bytes of JSON): keep large values out of the state "
        "dict or store them as tensors (a numpy array or a tensor is not in the header)",
        path,
    )


def _biggest_part(value: Any, node: Any) -> tuple[Path, int]:
    """The path of the smallest subtree that holds most of the skeleton, and its JSON size."""
    path: Path = ()
    size = len(json.dumps(node))
    while isinstance(node, dict) and len(node) >= 1:
        tag = next(iter(node))
        children: list[tuple[Any, Any, Any]]
        if tag in ("dict", "odict") and isinstance(value, dict):
            children = [
                (k, v, pair[1]) for (k, v), pair in zip(value.items(), node[tag], strict=True)
            ]
        elif tag in ("list", "tuple") and isinstance(value, (list, tuple)):
            children = [(i, v, n) for i, (v, n) in enumerate(zip(value, node[tag], strict=True))]
        else:
            break
        if not children:
            break
        sized = [(len(json.dumps(n)), k, v, n) for k, v, n in children]
        best = max(sized, key=lambda item: item[0])
        if best[0] < size // 2:
            break
        size, key, value, node = best
        path = (*path, key)
    return path, size


class _LayoutBuilder(SkeletonEncoder):
    error = UnsavableError
    verb = "saved"
    refusal = (
        "cannot save a {type} object: a checkpoint file holds only tensors, numpy arrays and "
        "numbers, dicts, lists, tuples, sets, str, int, float, bool, None, torch.Size, "
        "torch.dtype, enums, pathlib paths and argparse.Namespace"
    )

    def __init__(self) -> None:
        super().__init__()
        self.entries: list[Entry] = []
        self.captured: list[Entry] = []
        self.tensors = 0
        self._groups: dict[int, tuple[Entry, torch.Tensor | None]] = {}
        self._meshes: dict[int, tuple[Any, dict[str, Any]]] = {}  # id -> (mesh, its fields)
        self._names: set[str] = set()

    def _new_name(self) -> str:
        name = f"<storage {len(self.entries) + len(self.captured)}>"
        self._names.add(name)
        return name

    def encode_tensor(self, x: torch.Tensor, path: Path) -> Any:
        if is_dtensor(x):
            return self._dtensor(x, path)
        node = self._tensor(x, path)
        attributes = vars(x)
        if attributes:
            outer, self._no_tensors = self._no_tensors, "a tensor's attribute"
            try:
                node["attrs"] = [
                    [name, self.encode(value, (*path, Attr(name)))]
                    for name, value in attributes.items()
                ]
            finally:
                self._no_tensors = outer
        return node

    def _dtensor(self, x: Any, path: Path) -> dict[str, Any]:
        """A DTensor: its local shard is stored (under the DTensor's path) like any tensor,
        and the node records where it belongs: mesh, placements, global shape and stride,
        and which rank of which world saved it (a load elsewhere is refused)."""
        import torch.distributed as dist

        spec = dtensor_spec(x)
        mesh = spec.mesh
        placements = []
        for placement in spec.placements:
            node = placement_node(placement)
            if node is None:
                raise UnsavableError(f"cannot save a DTensor placement {placement!r}", path)
            placements.append(node)
        if vars(x):
            raise UnsavableError("cannot save attributes set on a DTensor", path)
        described = self._meshes.get(id(mesh))
        if described is None or described[0] is not mesh:
            # Once per mesh: its rank grid (``mesh.mesh``) is recomputed at every access.
            coordinate = mesh.get_coordinate()
            where = {
                "mesh": mesh_node(mesh),
                "rank": dist.get_rank() if dist.is_initialized() else mesh.get_rank(),
                "world": dist.get_world_size() if dist.is_initialized() else mesh.size(),
                "coordinate": list(coordinate) if coordinate is not None else None,
            }
            described = self._meshes[id(mesh)] = (mesh, where)
        return {
            "dtensor": {
                # The local shard's entry is found by the DTensor's path: the stager hands
                # the writer the staged DTensor there (storage_memoryview unwraps it).
                "local": self._tensor(dtensor_local(x), path),
                "placements": placements,
                "shape": list(x.shape),
                "stride": list(x.stride()),
                "requires_grad": x.requires_grad,
                **described[1],
            }
        }

    def _tensor(self, x: torch.Tensor, path: Path) -> dict[str, Any]:
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
            name = format_path(path)
            if spans and name not in self._names:  # two NaN keys print alike: the 2nd is bytes
                self._names.add(name)
                entry = Entry(name, _DTYPE_NAMES[x.dtype], list(x.shape), x.nbytes)
                group = (entry, x)
            else:
                entry = Entry(self._new_name(), "U8", [storage.nbytes()], storage.nbytes())
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

    def encode_array(self, x: Any, path: Path) -> Any:
        numpy = numpy_or_none()
        assert numpy is not None  # x is a numpy array
        dtype = x.dtype
        if dtype.kind not in "biufc" or dtype.fields is not None:
            raise UnsavableError(
                f"cannot save a numpy array of dtype {dtype}: only arrays of numbers "
                "(bool, int, uint, float, complex) go into a checkpoint",
                path,
            )
        # Captured now, little-endian (safetensors' byte order); the dtype string keeps the
        # array's own byte order, restored on load.
        data = numpy.ascontiguousarray(x, dtype=dtype.newbyteorder("<")).tobytes()
        torch_dtype = _torch_dtype_of(numpy, dtype)
        if torch_dtype in _DTYPE_NAMES:
            entry = Entry(self._new_name(), _DTYPE_NAMES[torch_dtype], list(x.shape), len(data))
        else:
            entry = Entry(self._new_name(), "U8", [len(data)], len(data))
        entry.data = data
        entry.paths.append(path)
        self.captured.append(entry)
        return {"numpy": entry.key, "dtype": dtype.str, "shape": list(x.shape)}


def _torch_dtype_of(numpy: Any, dtype: Any) -> torch.dtype | None:
    try:
        return torch.from_numpy(numpy.empty(0, dtype=dtype.newbyteorder("="))).dtype
    except TypeError:  # no torch dtype for it (float128, ...): stored as bytes
        return None


# -- reading ------------------------------------------------------------------------------------


@dataclass
class _Stored:
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
class _Header:
    """A file's header, checked against the file: its entries tile the data section exactly."""

    entries: dict[str, _Stored]
    metadata: dict[str, str]
    data_start: int


def check_file(path: str | os.PathLike[str]) -> None:
    """Raise :class:`CheckpointFormatError` unless ``path`` is a checkpoint :func:`load` reads.

    Cheap: it reads the header only (every field, the digest, the skeleton and each view
    against its entry's size), no tensor data. A missing file raises
    :class:`CheckpointNotFoundError`.
    """
    name = os.fspath(path)
    fd, size = _open(name)
    try:
        header = _read_checked(fd, name, size)
    finally:
        os.close(fd)
    document = _skeleton_document(header.metadata, name)
    if document is not None:
        _Decoder(header.entries, None, name, None).decode(document)


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
    if into is not None:
        from ._restore import restore  # the restore builds on this module

        if torch.device(device).type != "cpu":
            raise InvalidOptionsError(
                "load(into=...) fills the tensors of `into` on their own devices: leave "
                f"device at 'cpu', not {device!r}"
            )
        return restore(path, into, strict=strict)
    name = os.fspath(path)
    target = torch.device(device)
    fd, size = _open(name)
    try:
        header = _read_checked(fd, name, size)
        document = _skeleton_document(header.metadata, name)
        stored: dict[str, torch.Tensor] = {}
        for key, entry in header.entries.items():
            tensor = torch.empty(entry.shape, dtype=entry.dtype, device="cpu")
            _read_into(fd, tensor, header.data_start + entry.begin, name)
            stored[key] = tensor
    finally:
        os.close(fd)
    if document is None:
        if target.type != "cpu":
            stored = {key: tensor.to(target) for key, tensor in stored.items()}
        return stored
    return _Decoder(header.entries, stored, name, target, meshes).decode(document)


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


def _open(name: str) -> tuple[int, int]:
    """A descriptor on the regular file ``name`` and its size."""
    try:
        # O_NONBLOCK: a FIFO planted under the name must not block the open.
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError as error:
        raise CheckpointNotFoundError(f"no checkpoint file at {name}") from error
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
    raw = _read_raw(fd, path, os.fstat(fd).st_size)[0]
    return raw, 8 + struct.unpack("<Q", _pread_exact(fd, 8, 0, path))[0]


def _read_checked(fd: int, path: str, size: int) -> _Header:
    return _read_raw(fd, path, size)[1]


def _read_raw(fd: int, path: str, size: int) -> tuple[dict[str, Any], _Header]:
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
    header = parse_json(raw, f"{path}: the safetensors header")
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
    if digest is not None and not _digest_matches(raw, digest):
        raise CheckpointFormatError(
            f"{path}: __metadata__[{DIGEST_KEY!r}] does not match the header: the header was "
            "changed or damaged after astage wrote it"
        )
    return {"__metadata__": metadata, **header}, _Header(entries, metadata, data_start)


def parse_json(raw: bytes | str, what: str) -> Any:
    """Strict JSON (UTF-8, no NaN or Infinity); any problem a CheckpointFormatError."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        # No object_pairs_hook for duplicate keys: it costs as much as the parse. A repeated
        # entry key leaves a gap in the data that the tiling check refuses; a repeated field
        # is read as Python reads it (the last one), and is checked like any other.
        return json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError too
        reason = "nested too deep" if isinstance(error, RecursionError) else str(error)
        raise CheckpointFormatError(f"{what} is not valid JSON: {reason}") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _entry(key: str, info: Any, path: str) -> _Stored:
    where = f"{path}: header entry {_shown(key)}"
    if not isinstance(info, dict):
        raise CheckpointFormatError(f"{where} is not a JSON object")
    for part in ("dtype", "shape", "data_offsets"):
        if part not in info:
            raise CheckpointFormatError(f"{where}: missing {part!r}")
    dtype = _DTYPES_BY_NAME.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    if dtype is None:
        raise CheckpointFormatError(f"{where}: unsupported dtype {_shown(info['dtype'])}")
    shape = info["shape"]
    if not _sizes(shape):
        raise CheckpointFormatError(
            f"{where}: 'shape' must be a list of at most {_MAX_DIMS} sizes (ints >= 0), "
            f"not {_shown(shape)}"
        )
    offsets = info["data_offsets"]
    if not (_sizes(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]):
        raise CheckpointFormatError(
            f"{where}: 'data_offsets' must be [begin, end] with 0 <= begin <= end, "
            f"not {_shown(offsets)}"
        )
    begin, end = offsets
    nbytes = _numel(shape) * dtype.itemsize
    if nbytes != end - begin:
        raise CheckpointFormatError(
            f"{where}: 'data_offsets' span {end - begin} bytes, its dtype and shape need {nbytes}"
        )
    return _Stored(key, dtype, shape, begin, end)


def _check_tiling(entries: dict[str, _Stored], data_bytes: int, path: str) -> None:
    """The entries cover the data section exactly, each byte once (safetensors' own rule)."""
    position = 0
    for entry in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if entry.begin != position:
            problem = "overlaps the one before" if entry.begin < position else "leaves a gap"
            raise CheckpointFormatError(
                f"{path}: header entry {_shown(entry.key)}: 'data_offsets' "
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
        and all(type(n) is int and 0 <= n < _MAX_SIZE for n in value)
    )


def _numel(shape: list[int]) -> int:
    numel = 1
    for size in shape:
        numel *= size
    return numel


def _shown(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _skeleton_document(metadata: dict[str, str], path: str) -> Any:
    """The skeleton in ``__metadata__``, or None for a file that astage did not write."""
    text = metadata.get(METADATA_KEY)
    if text is None:
        return None
    where = f"{path}: __metadata__[{METADATA_KEY!r}]"
    document = parse_json(text, where)
    if not isinstance(document, dict) or "version" not in document or "skeleton" not in document:
        raise CheckpointFormatError(f"{where}: not an object with 'version' and 'skeleton'")
    version = document["version"]
    if type(version) is not int or version != FORMAT_VERSION:
        raise CheckpointFormatError(f"{where}: format version {_shown(version)} is not supported")
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


def _read_into(fd: int, tensor: torch.Tensor, offset: int, path: str) -> None:
    read_exactly(fd, tensor_memoryview(tensor), offset, path)


def read_exactly(fd: int, view: memoryview, offset: int, path: str) -> None:
    """Fill ``view`` from ``fd`` at ``offset``; a file that ends first is a format error."""
    done = 0
    while done < len(view):
        try:
            got = os.preadv(fd, [view[done:]], offset + done)
        except OSError as error:
            raise CheckpointError(f"cannot read {path}: {error.strerror or error}") from error
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
    """All bytes of a CPU tensor's storage, without a copy (keep ``tensor`` alive meanwhile).

    A DTensor's are its local shard's: that is what its entry in the file holds.
    """
    if is_dtensor(tensor):
        tensor = dtensor_local(tensor)
    storage = tensor.untyped_storage()
    nbytes = storage.nbytes()
    if nbytes == 0:
        return memoryview(b"")
    import ctypes

    array = (ctypes.c_ubyte * nbytes).from_address(storage.data_ptr())
    return memoryview(array).cast("B")


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


class _Decoder(SkeletonDecoder):
    """Rebuilds a state dict from a skeleton; with ``stored`` None, only checks it."""

    def __init__(
        self,
        entries: dict[str, _Stored],
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

    def _entry_of(self, node: dict[str, Any], tag: str) -> _Stored:
        key = node[tag]
        entry = self._entries.get(key) if isinstance(key, str) else None
        if entry is None:
            raise self.invalid(f"{tag!r} names no header entry: {_shown(key)}")
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
            tensor = self._view(node, entry)
        if tensor is not None:
            for attribute, value in attributes:
                setattr(tensor, attribute, value)
        return tensor

    def _view(self, node: dict[str, Any], entry: _Stored) -> torch.Tensor | None:
        for part in _VIEW_KEYS:
            if part not in node:
                raise self.invalid(f"a view of {_shown(entry.key)}: missing {part!r}")
        name = node["dtype"]
        dtype = _VIEW_DTYPES.get(name) if isinstance(name, str) else None
        if dtype is None:
            raise self.invalid(f"unsupported 'dtype' {_shown(name)}")
        shape, stride, offset = node["shape"], node["stride"], node["offset"]
        if not (_sizes(shape) and _sizes(stride) and len(shape) == len(stride)):
            raise self.invalid(
                f"'shape' {_shown(shape)} and 'stride' {_shown(stride)} must be lists of as "
                f"many ints >= 0 (at most {_MAX_DIMS})"
            )
        if type(offset) is not int or not 0 <= offset < _MAX_SIZE:
            raise self.invalid(f"'offset' must be an int >= 0, not {_shown(offset)}")
        conj, neg = node.get("conj", False), node.get("neg", False)
        if conj is not False and not (conj is True and dtype.is_complex):
            raise self.invalid(f"'conj' {_shown(conj)} on a view of dtype {name}")
        if neg is not False and not (neg is True and (dtype.is_complex or dtype in _NEG_KINDS)):
            raise self.invalid(f"'neg' {_shown(neg)} on a view of dtype {name}")
        # The view must lie inside its entry: torch would otherwise grow the storage with
        # uninitialised bytes (set_ resizes a storage that is too small).
        if 0 in shape:
            needed = offset * dtype.itemsize
        else:
            last = offset + sum((size - 1) * step for size, step in zip(shape, stride, strict=True))
            needed = (last + 1) * dtype.itemsize
        if needed > entry.nbytes:
            raise self.invalid(
                f"a {name} view (shape {shape}, stride {stride}, offset {offset}) reaches "
                f"byte {needed}, past the end of entry {_shown(entry.key)} ({entry.nbytes} bytes)"
            )
        if self._stored is None:
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
        mesh_text = json.dumps(mesh)
        if mesh_text not in self._meshes_checked:
            problem = mesh_problem(mesh)
            if problem is not None:
                raise self.invalid(f"the DTensor's 'mesh' {problem}")
            self._meshes_checked.add(mesh_text)
        shape, stride = value["shape"], value["stride"]
        if not (_sizes(shape) and _sizes(stride) and len(shape) == len(stride)):
            raise self.invalid(
                f"the DTensor's 'shape' {_shown(shape)} and 'stride' {_shown(stride)} must be "
                f"lists of as many ints >= 0 (at most {_MAX_DIMS})"
            )
        placements_node = value["placements"]
        grid_shape = mesh_shape(mesh)
        if type(placements_node) is not list or len(placements_node) != len(grid_shape):
            raise self.invalid(
                f"the DTensor's 'placements' must be a list of {len(grid_shape)} (one per mesh "
                f"dimension), not {_shown(placements_node)}"
            )
        placements = []
        for item in placements_node:
            placement = placement_from_node(item, len(shape))
            if placement is None:
                raise self.invalid(f"the DTensor placement {_shown(item)} is not one astage reads")
            placements.append(placement)
        requires_grad, rank, world = value["requires_grad"], value["rank"], value["world"]
        coordinate = value["coordinate"]
        if type(requires_grad) is not bool:
            raise self.invalid(f"'requires_grad' must be a bool, not {_shown(requires_grad)}")
        if not (type(rank) is int and type(world) is int and 0 <= rank < world < _MAX_SIZE):
            raise self.invalid(f"'rank' {_shown(rank)} must be an int in [0, 'world' {world!r})")
        where_rank = (mesh_text, rank)
        if where_rank not in self._coordinates:
            self._coordinates[where_rank] = _coordinate_in(mesh, rank)
        if coordinate != self._coordinates[where_rank]:
            raise self.invalid(
                f"'coordinate' {_shown(coordinate)} is not where rank {rank} sits in the mesh"
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
        if len(local_shape) != len(shape):
            return f"the local shard has {len(local_shape)} dims, the DTensor {len(shape)}"
        sharded = {getattr(p, "dim", None) for p in placements if hasattr(p, "dim")}
        for dim, (mine, whole) in enumerate(zip(local_shape, shape, strict=True)):
            if mine > whole or (dim not in sharded and mine != whole):
                return (
                    f"the local shard's shape {local_shape} does not fit the DTensor's {shape} "
                    "and placements"
                )
        return None

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
                raise self.invalid(f"'attrs' must hold [name, value] pairs, not {_shown(pair)}")
            name = pair[0]
            if (
                not name.isidentifier()
                or name.startswith("__")
                or hasattr(torch.nn.Parameter, name)
            ):
                raise self.invalid(f"a tensor attribute may not be named {name!r}")
            attributes.append((name, self.decode(pair[1])))
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
            raise self.invalid(f"unsupported numpy 'dtype' {_shown(dtype_text)}")
        if not _sizes(shape) or _numel(shape) * dtype.itemsize != entry.nbytes:
            raise self.invalid(
                f"numpy 'shape' {_shown(shape)} of {dtype_text} does not fill entry "
                f"{_shown(entry.key)} ({entry.nbytes} bytes)"
            )
        if self._stored is None:
            return None
        storage = self._stored[entry.key].untyped_storage()
        data = torch.empty((0,), dtype=torch.uint8, device="cpu").set_(storage).numpy()
        little = data.view(dtype.newbyteorder("<")).reshape(shape)
        return little.astype(dtype)  # the array's own byte order, and its own memory
