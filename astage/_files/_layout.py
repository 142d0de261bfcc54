"""Planning a checkpoint file: where each tensor, numpy array and storage goes, and its header.

:func:`plan_layout` walks a state dict once (the skeleton encoder of :mod:`._skeleton`) and
returns a :class:`Layout`: one entry per storage, page-aligned ones first so that the writer can
send them with direct I/O, and the header text (format: :mod:`._safetensors`). It reads no
tensor data and does no I/O.

A :class:`LayoutMemo` (one per stager, :func:`layout_memo`) keeps the last layout a stager's saves
planned; the next plan checks the state dict against it tensor by tensor and, where nothing
changed, takes its entries and their header text instead of planning them again.
"""

from __future__ import annotations

import json
import math
import operator
import struct
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from .._drivers._gil import GilSharing, drop_in_pieces
from .._errors import (
    UnsavableError,
)
from .._paths import Attr, Path, format_path
from .._torch import (
    dense_strides,
    dtensor_local,
    dtensor_spec,
    storage_key,
    storage_shortfall,
)
from ._safetensors import (
    DATA_ALIGN,
    DIGEST_KEY,
    DTYPE_NAMES,
    FORMAT_VERSION,
    MAX_HEADER_BYTES,
    METADATA_KEY,
    header_pieces,
    json_text,
)
from ._skeleton import (
    SkeletonEncoder,
    TensorWeigher,
    is_dtensor,
    mesh_node,
    numpy_or_none,
    placement_node,
    tensor_attribute_allowed,
    unreadable_view,
)


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
    header_pieces: list[bytes]
    """What goes at offset 0, in pieces to write one after the other: the length prefix, the
    JSON header, then the bytes of the :attr:`captured` entries (none without numpy arrays);
    the JSON is padded with spaces so that this ends at a multiple of :data:`DATA_ALIGN`,
    where the staged entries start (so that direct I/O can write them)."""
    tensors: int
    """Paths at which a tensor sits (a tied tensor counts at each path)."""
    data_start: int = -1
    """Where the data section starts: the end of the padded JSON header."""
    captured: list[Entry] = field(default_factory=list)
    """Entries whose bytes were captured at plan time; they lie at the start of the data."""

    def __post_init__(self) -> None:
        self.header_size = sum(map(len, self.header_pieces))
        if self.data_start < 0:
            self.data_start = self.header_size

    @property
    def header(self) -> bytes:
        """:attr:`header_pieces` joined."""
        return b"".join(self.header_pieces)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor (and array) data."""
        return self.file_size - self.data_start

    @property
    def file_size(self) -> int:
        return self.header_size + sum(entry.nbytes for entry in self.entries)


def plan_layout(
    state_dict: Any,
    metadata: Mapping[str, str] | None = None,
    memo: LayoutMemo | None = None,
    sharing: GilSharing | None = None,
) -> Layout:
    """The file layout for ``state_dict``: raises :class:`UnsavableError` for what cannot go in.

    ``state_dict`` may be the source or its staged copy: only the structure, the tensors'
    dtypes, shapes, strides, offsets and which of them share a storage are used (and the
    bytes of numpy arrays, which are captured now). A header that no reader could open (over
    safetensors' 100 MB) is refused here, naming its biggest part, before anything is written.

    With ``memo``, the entries of the last layout planned through it are taken as they are
    when every tensor is met at the same path with the same metadata over the same storage
    (:class:`LayoutMemo`); the rest of the header (plain values, metadata) is made afresh.
    ``sharing``: in a worker thread beside an event loop, lets the loop take the GIL.
    """
    last = memo.last if memo is not None else None
    builder: _LayoutBuilder | None = None
    if last is not None:
        reusing = _ReusingBuilder(last)
        reusing.sharing = sharing
        try:
            skeleton = reusing.encode(state_dict, ())
            reusing.check_complete()
            builder = reusing
        except _Changed:
            pass
    if builder is None:
        last = None
        builder = _LayoutBuilder(remember=memo is not None)
        builder.sharing = sharing
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
    header_meta = _header_metadata(metadata)
    header_meta[METADATA_KEY] = json_text(
        # "sealed": the header carries its digest; a loader then refuses one without it.
        {"version": FORMAT_VERSION, "sealed": True, "skeleton": skeleton},
        sharing,
    )
    if last is not None:
        members, by_path = last.members, last.by_path
    else:
        ordered = _file_order(builder.entries, builder.captured, sharing)
        members = _entry_members(ordered, sharing)
        by_path = _by_path(builder.entries, sharing)
    captured_bytes = sum(entry.nbytes for entry in builder.captured)
    text = header_pieces(
        {"__metadata__": header_meta}, DATA_ALIGN, captured_bytes, members, sharing
    )
    size = sum(map(len, text))
    if size > MAX_HEADER_BYTES:
        raise _header_too_big(size, state_dict, skeleton, header_meta)
    if memo is not None and last is None:
        memo.last = builder.remembered(members, by_path)
    layout = Layout(
        entries=builder.entries,
        by_path=by_path,
        header_pieces=[
            struct.pack("<Q", size),
            *text,
            *(entry.data for entry in builder.captured if entry.data),
        ],
        tensors=builder.tensors,
        data_start=8 + size,
        captured=builder.captured,
    )
    if sharing is not None:
        # Written into the header now: freed a piece at a time (5 ms at once over 20,000
        # tensors), the containers it shares with the memo and the builder let go of first;
        # a fresh plan's own tables (a group, a node list and a name per storage) likewise.
        builder.forget()
        pile = [skeleton, *builder.tables()]
        del skeleton
        drop_in_pieces(pile, sharing)
    return layout


def _by_path(entries: list[Entry], sharing: GilSharing | None) -> dict[Path, Entry]:
    """Each path's entry (ticking ``sharing``: 20,000 of them are a few ms of Python)."""
    if sharing is None:
        return {path: entry for entry in entries for path in entry.paths}
    by_path: dict[Path, Entry] = {}
    for entry in entries:
        for path in entry.paths:
            by_path[path] = entry
        sharing.tick()
    return by_path


def _header_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """The header's ``__metadata__`` but astage's own key: the user's, checked, and the format."""
    user = dict(metadata or {})
    for key, value in user.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise UnsavableError(f"metadata must map str to str, got {key!r}: {value!r}")
        if not (_utf8(key) and _utf8(value)):
            # json.dumps writes a lone surrogate as a \ud800 escape, which safetensors'
            # own reader (serde_json) refuses: no other reader would open the file.
            raise UnsavableError(
                f"metadata must be valid Unicode (no lone surrogates), got {key!r}: {value!r}"
            )
    for reserved in (METADATA_KEY, DIGEST_KEY):
        if reserved in user:
            raise UnsavableError(f"the metadata key {reserved!r} is reserved for astage")
    return {"format": "pt", **user}


def _entry_members(ordered: list[Entry], sharing: GilSharing | None = None) -> str:
    """Place ``ordered`` gap-free from offset 0 and return their header members' JSON text."""
    entries: dict[str, Any] = {}
    offset = 0
    for entry in ordered:
        entry.begin = offset
        offset += entry.nbytes
        entries[entry.key] = {
            "dtype": entry.dtype,
            "shape": entry.shape,
            "data_offsets": [entry.begin, offset],
        }
        if sharing is not None:
            sharing.tick()
    return json_text(entries, sharing)[1:-1]


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _file_order(
    staged: list[Entry], captured: list[Entry], sharing: GilSharing | None = None
) -> list[Entry]:
    """The order of the entries in the data section (safetensors lets it be any, gap-free).

    Staged entries whose sizes are whole multiples of :data:`DATA_ALIGN` come first, so each
    of them starts at an aligned file offset and can be written with direct I/O straight from
    an aligned buffer; then the biggest of the others (it still starts aligned), then the rest
    in the state dict's order. The bytes captured at plan time come before all of them, as part
    of :attr:`Layout.header` (whose JSON padding makes it end aligned).
    """
    aligned: list[Entry] = []
    others: list[Entry] = []
    for entry in staged:
        (others if entry.nbytes % DATA_ALIGN else aligned).append(entry)
        if sharing is not None:
            sharing.tick()
    if others:
        sizes = list(map(_nbytes, others))  # the biggest found in C: a key per entry was 5 ms
        others.insert(0, others.pop(sizes.index(max(sizes))))
    return [*captured, *aligned, *others]


_nbytes = operator.attrgetter("nbytes")


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


_SHORT_NODE = len('{"tensor":""}')
"""The characters of a tensor's short node but its entry's name (:meth:`_LayoutBuilder._tensor`)."""
_LONG_NODE = len('{"tensor":"","dtype":"bool","shape":[],"stride":[],"offset":0}')
"""The least characters of a tensor's long node, whatever its entry's name."""


def _spans(x: torch.Tensor, storage: torch.UntypedStorage) -> bool:
    """Whether ``x`` is its whole storage, contiguous, in a dtype safetensors names: its entry
    can be the tensor itself, under its path."""
    return (
        x.dtype in DTYPE_NAMES
        and x.storage_offset() == 0
        and x.is_contiguous()
        and x.nbytes == storage.nbytes()
        and not x.is_conj()
        and not x.is_neg()
    )


class _LayoutBuilder(SkeletonEncoder):
    error = UnsavableError
    verb = "saved"
    refusal = (
        "cannot save a {type} object: a checkpoint file holds only tensors, numpy arrays and "
        "numbers, dicts, lists, tuples, sets, str, int, float, bool, None, torch.Size, "
        "torch.dtype, enums, pathlib paths and argparse.Namespace"
    )

    def __init__(self, remember: bool = False) -> None:
        super().__init__()
        self.entries: list[Entry] = []
        self.captured: list[Entry] = []
        self.tensors = 0
        self._memorable = remember  # until a DTensor, tensor attributes or an array is met
        self._signatures: list[tuple[Any, ...]] = []  # per tensor met, with remember
        self._paths: list[Path] = []
        self._kinds: list[tuple[Any, ...]] = []
        self._tensor_nodes: list[dict[str, Any]] = []
        self._groups: dict[int, tuple[Entry, torch.Tensor | None]] = {}
        self._nodes: dict[int, list[dict[str, Any]]] = {}  # id(entry) -> nodes naming it
        self._meshes: dict[int, tuple[Any, dict[str, Any]]] = {}  # id -> (mesh, its fields)
        self._names: set[str] = set()

    def _new_name(self) -> str:
        name = f"<storage {len(self.entries) + len(self.captured)}>"
        self._names.add(name)
        return name

    def tables(self) -> list[Any]:
        """Its per-storage tables, handed over (emptied here) to be freed by the caller."""
        tables: list[Any] = [self._groups, self._nodes, list(self._names)]
        self._groups, self._nodes, self._names = {}, {}, set()
        return tables

    def remembered(self, members: str, by_path: dict[Path, Entry]) -> _Remembered | None:
        """What a :class:`LayoutMemo` keeps of this plan (None: nothing a next plan could take)."""
        if not self._memorable or self.captured:
            return None
        return _Remembered(
            self._signatures,
            self._paths,
            self._kinds,
            self._tensor_nodes,
            self.entries,
            members,
            by_path,
        )

    def encode_tensor(self, x: torch.Tensor, path: Path) -> Any:
        if is_dtensor(x):
            self._memorable = False  # its node holds the mesh and placements, not remembered
            return self._dtensor(x, path)
        node = self._tensor(x, path)
        attributes = vars(x)
        if attributes:
            self._memorable = False
            for name in attributes:
                if not tensor_attribute_allowed(name):
                    # A loader would refuse the file (it sets attributes with setattr).
                    raise UnsavableError(
                        f"cannot save a tensor attribute named {name!r}: a loader sets it "
                        "with setattr, so it must be an identifier, not a dunder, and not a "
                        "name torch.Tensor has",
                        (*path, Attr(name)),
                    )
            outer, self._no_tensors = self._no_tensors, "a tensor's attribute"
            try:
                node["attrs"] = [
                    [name, self.encode(value, (*path, Attr(name)))]
                    for name, value in attributes.items()
                ]
            finally:
                self._no_tensors = outer
        return node

    def tensor_weigher(self) -> TensorWeigher:
        """A tensor's node names its storage's entry: the path of the first tensor met that
        spans the storage, the node ``{"tensor": name}`` (13 characters more), or, for a view
        or a name taken, the long node with its dtype, shape, stride and offset (62 or more).
        Weighed by the first tensor of each storage met: where it does not span the storage,
        its entry may take a shorter name later, so it and the rest weigh 13 only.

        Why: weighed at 10 whatever its path, a tensor shared through 21 levels of
        ``x = [x, x]`` (2**21 nodes naming a 71-character path: a 190 MB header) passed the
        projection and was encoded for a minute before the header limit refused it."""
        weights: dict[int, int] = {}

        def weigh(x: torch.Tensor, path_chars: int) -> int:
            if type(x) not in (torch.Tensor, torch.nn.Parameter):
                return 10  # a DTensor's node, or a subclass the encoder refuses
            try:
                storage = x.untyped_storage()
                key = storage_key(storage)
                spans = _spans(x, storage)
            except (RuntimeError, NotImplementedError, TypeError):  # sparse, say: refused later
                return 10
            weight = weights.get(key)
            if weight is None:
                weight = min(_SHORT_NODE + path_chars, _LONG_NODE) if spans else _SHORT_NODE
                weights[key] = weight
            return weight

        return weigh

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
        unreadable = unreadable_view(x)
        if unreadable is not None:  # a file that astage writes must load
            raise UnsavableError(f"cannot save {unreadable}", path)
        self.tensors += 1
        storage = x.untyped_storage()
        shortfall = storage_shortfall(x)
        if shortfall is not None:
            # A storage freed under its tensor (untyped_storage().resize_(0)): a file planned
            # from it would name bytes its entry lacks, and no loader would take it.
            raise UnsavableError(f"the tensor {shortfall}", path)
        key = storage_key(storage)
        spans = _spans(x, storage)
        group = self._groups.get(key)
        if group is None:
            name = format_path(path)
            if spans and name not in self._names:  # two NaN keys print alike: the 2nd is bytes
                self._names.add(name)
                entry = Entry(name, DTYPE_NAMES[x.dtype], list(x.shape), x.nbytes)
                group = (entry, x)
            else:
                entry = Entry(self._new_name(), "U8", [storage.nbytes()], storage.nbytes())
                group = (entry, None)
            self._groups[key] = group
            self.entries.append(entry)
            self._nodes[id(entry)] = []
        elif group[1] is None and spans and (name := format_path(path)) not in self._names:
            # Only views of this storage came before (a slice, a transpose): the entry becomes
            # this tensor, under its own name, as if it had come first, so that any
            # safetensors reader finds it by its key rather than as bytes of a <storage N>.
            self._names.add(name)
            entry = group[0]
            entry.key, entry.dtype, entry.shape = name, DTYPE_NAMES[x.dtype], list(x.shape)
            for earlier in self._nodes[id(entry)]:
                earlier["tensor"] = name
            group = self._groups[key] = (entry, x)
        entry, base = group
        entry.paths.append(path)
        # The short node is the entry itself, as a loader builds it: one object for every
        # path that has it, with the entry's (contiguous) strides. Else a view node keeps
        # what the short one would lose: the strides a size-0 or size-1 dimension may have
        # (a contiguous tensor's, say (2, 2, 1) for shape (1, 4, 2)), and which object is
        # which when two tensors of the entry carry Python attributes of their own.
        if (
            base is not None
            and x.dtype is base.dtype
            and x.shape == base.shape
            and x.stride() == dense_strides(x.shape)
            and x.storage_offset() == 0
            and not x.is_conj()
            and not x.is_neg()
            and (x is base or not (vars(x) or vars(base)))
        ):
            node: dict[str, Any] = {"tensor": entry.key}
        else:
            node = {
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
        self._nodes[id(entry)].append(node)
        if self._memorable:
            signature = _signature(x)
            if signature is None:
                self._memorable = False
            else:
                self._signatures.append(signature)
                self._paths.append(path)
                self._kinds.append(_key_kinds(path))  # here, where the encoder ticks
                self._tensor_nodes.append(node)
        return node

    def encode_array(self, x: Any, path: Path) -> Any:
        self._memorable = False  # its bytes are captured at every plan
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
        if torch_dtype in DTYPE_NAMES:
            entry = Entry(self._new_name(), DTYPE_NAMES[torch_dtype], list(x.shape), len(data))
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


class _Remembered(NamedTuple):
    """A plan's entries, and what each tensor it met was: enough to tell that one is the same."""

    signatures: list[tuple[Any, ...]]
    paths: list[Path]
    kinds: list[tuple[Any, ...]]
    """Per path, what equality misses of its keys (``_key_kinds``)."""
    nodes: list[dict[str, Any]]
    entries: list[Entry]
    members: str
    by_path: dict[Path, Entry]


class LayoutMemo:
    """The last layout planned for one stager's saves, to plan the next one from it.

    Why: planning reads a dozen attributes of each tensor and makes its entry, its node and
    its header JSON: about 15 us a tensor, 0.3 s of Python over 20,000 small tensors, before
    the first byte is staged and holding the GIL against the event loop (heartbeat p99 6-11 ms
    during it). A training loop saves the same structure over the same storages every time;
    a save then only has to tell that nothing changed.

    The check is conservative: every tensor must be met in the same order, at the same path,
    of the same exact type, without attributes, with the same dtype, shape, strides, offset,
    conjugate and negative bits, over the same storage (its address while it lives) of the
    same size. Those are everything a plan reads of a tensor, so the entries, their offsets
    and the tensors' nodes are what a plan would make again. Anything else (a DTensor, a
    numpy array, a tensor with attributes) is planned afresh every time. Plain values and the
    header's metadata are encoded at every plan, as they change (a step count).
    """

    def __init__(self) -> None:
        self.last: _Remembered | None = None
        """Replaced whole (one assignment) by each plan that did not take it: a plan running
        meanwhile in another thread keeps the one it read."""


_MEMOS: weakref.WeakKeyDictionary[Any, LayoutMemo] = weakref.WeakKeyDictionary()
_MEMOS_LOCK = threading.Lock()


def layout_memo(owner: Any) -> LayoutMemo:
    """The :class:`LayoutMemo` of ``owner`` (a stager), made at first use, gone with it."""
    with _MEMOS_LOCK:
        memo = _MEMOS.get(owner)
        if memo is None:
            memo = _MEMOS[owner] = LayoutMemo()
        return memo


class _Changed(Exception):
    """The state dict is not what the remembered plan met: plan it afresh."""


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _signature(x: Any) -> tuple[Any, ...] | None:
    """What a plan reads of strided ``x`` (None for any other tensor: never remembered)."""
    if (
        type(x) not in _PLAIN_TENSORS
        or x.layout is not torch.strided
        or x.is_quantized
        or x.is_nested
        or x.is_meta
    ):
        return None
    storage = x.untyped_storage()
    return (
        type(x),
        x.dtype,
        x.shape,
        x.stride(),
        x.storage_offset(),
        x.is_conj(),
        x.is_neg(),
        storage_key(storage),
        storage.nbytes(),
    )


def _key_kinds(path: Path) -> tuple[Any, ...]:
    """What ``==`` misses of a path's keys that its printed form (an entry's name) shows:
    their types (``1 == True == 1.0``) and the signs of float keys (``0.0 == -0.0``)."""
    kinds: tuple[Any, ...] = tuple(map(type, path))
    if float in kinds:
        kinds += tuple(math.copysign(1.0, key) for key in path if type(key) is float)
    return kinds


class _ReusingBuilder(_LayoutBuilder):
    """Encodes the skeleton, taking each tensor's node from a remembered plan that met it."""

    def __init__(self, last: _Remembered) -> None:
        super().__init__()
        self._last = last
        self.entries = last.entries
        self._met = 0

    def encode_tensor(self, x: torch.Tensor, path: Path) -> Any:
        index, last = self._met, self._last
        if (
            index == len(last.nodes)
            or path != last.paths[index]
            or _key_kinds(path) != last.kinds[index]
            or _signature(x) != last.signatures[index]
            or vars(x)
        ):
            raise _Changed
        self._met = index + 1
        self.tensors += 1
        return last.nodes[index]

    def encode_array(self, x: Any, path: Path) -> Any:
        raise _Changed  # a remembered plan met no array

    def check_complete(self) -> None:
        if self._met != len(self._last.nodes):
            raise _Changed
