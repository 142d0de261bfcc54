"""The wire codec: a staged snapshot as a JSON header plus its storages' bytes; no pickle.

What one side sends, in three steps (the receiver runs no code of the sender's):

1. two int64 numbers: the length of the JSON header and the total tensor bytes (``-1`` when
   the sender refuses its snapshot: the header then only says why);
2. the JSON header: the call number (both sides count their calls: a header of another call
   means the pair is out of step), the skeleton (dicts, ``OrderedDict``, lists, tuples, str,
   int, float, bool, None; for each tensor its storage index, dtype, shape, stride and offset,
   so views and tied weights share one storage again), the storages' sizes, for DTensors their
   placements, global shape and stride, and the device mesh (device type, rank grid, dim
   names), for ShardedTensors their local shards and global shard metadata;
3. a verdict (one int64): whether the receiver accepts the header it got. Bytes flow only
   into a receiver that accepted, so a refused header leaves the pair in step;
4. the storages' bytes: a storage of at least ``BUCKET_BYTES`` goes alone, straight from the
   staged host buffer into the receiver's; smaller ones are packed into buckets of about
   ``BUCKET_BYTES`` (fewer messages: gloo pays per message). Both sides compute the same
   message plan from the sizes in the header, so nothing else needs agreeing on.

A DTensor is sent as its local shard plus its spec; the receiver rebuilds a DTensor around the
partner's shard, on this rank's own mesh object when an equal mesh occurs in its own state
dict (the usual SPMD case), otherwise on a mesh rebuilt from the sent description. A
ShardedTensor is sent as its local shards plus its global metadata; the receiver rebuilds it
around the partner's shards, placed on the receiving rank (as DCP's replication does: the
shards' placements and the partner's entries of the global metadata name this rank). Anything
else (dataclasses, custom objects) is refused with a :class:`~astage.ReplicationError` naming
its path.

**The header is untrusted.** The partner is another process: :func:`parse_header` and the
decoder check every field (lengths and sizes, the call number, storage indices, dtypes,
shapes, strides and offsets against their storage's size, meshes and placements; the
skeleton's own nodes and depth are checked by :class:`~astage._files._skeleton.SkeletonDecoder`)
and raise a :class:`~astage.ReplicationError` naming the field. The transport decodes the
replica before it posts a single receive, so a bad header never leaves a receive posted into a
buffer that is then freed.

Everything here is plain byte and metadata work: no process group, no thread, no event loop.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .._errors import AstageError, ReplicationError
from .._files._safetensors import json_text
from .._files._skeleton import (
    MAX_SIZE,
    VIEW_DTYPES,
    SkeletonDecoder,
    SkeletonEncoder,
    is_dtensor,
    local_shape_problem,
    mesh_problem,
    placement_from_node,
    placement_node,
    takes_conj_bit,
    takes_neg_bit,
    unreadable_view,
)
from .._paths import Attr, Path, format_path
from .._torch import (
    device_mesh_without_backend,
    dtensor_local,
    dtensor_spec,
    is_sharded_tensor,
    make_dtensor,
    make_sharded_tensor,
    neg_view,
    storage_key,
    view_end,
)

__all__ = [
    "BUCKET_BYTES",
    "MAX_HEADER_BYTES",
    "WIRE_VERSION",
    "Encoded",
    "Header",
    "Incoming",
    "Storages",
    "buckets",
    "check_lengths",
    "decode",
    "encode",
    "header_bytes",
    "mesh_key",
    "pack",
    "parse_header",
    "placement_to_json",
    "refusal_bytes",
    "unpack_plan",
]

WIRE_VERSION = 2
MAX_HEADER_BYTES = 1 << 30
"""The longest header a partner may announce (about 7 million tensors' worth)."""
MAX_NDIM = 64
"""The most dimensions a tensor, a mesh or a placement list may have on the wire."""
BUCKET_BYTES = 16 << 20
"""Storages smaller than this travel packed together in buckets of about this size."""


# -- DTensor placements and meshes ----------------------------------------------------------------


def mesh_key(mesh: Any) -> tuple[Any, ...]:
    """A JSON-able description of a device mesh: device type, rank grid, dim names."""
    names = getattr(mesh, "mesh_dim_names", None)
    return (mesh.device_type, mesh.mesh.tolist(), list(names) if names else None)


def placement_to_json(placement: Any, path: Path) -> list[Any]:
    """A DTensor placement as a JSON list; refuses kinds the receiver could not rebuild."""
    node = placement_node(placement)
    if node is None:
        raise ReplicationError(f"cannot replicate a DTensor placement {placement!r}", path)
    return node


def _is_count(value: Any) -> bool:
    """A JSON integer from 0 below ``MAX_SIZE`` (``bool`` is an ``int`` in Python: refused)."""
    return type(value) is int and 0 <= value < MAX_SIZE


_INT_ONLY = {int}


def _counts(value: Any, *, most: int = MAX_NDIM) -> bool:
    """A list of at most ``most`` counts (C-level checks: this runs for every tensor)."""
    if type(value) is not list or len(value) > most:
        return False
    return not value or (
        set(map(type, value)) == _INT_ONLY and min(value) >= 0 and max(value) < MAX_SIZE
    )


def _resolve_meshes(described: list[list[Any]], own: list[Any]) -> list[Any]:
    """Mesh objects for the partner's mesh descriptions: our own equal mesh, or a rebuilt one."""
    ours = {json.dumps(list(mesh_key(m))): m for m in own}
    meshes = []
    for index, item in enumerate(described):
        mesh = ours.get(json.dumps(item))
        if mesh is None:
            device_type, grid, names = item
            try:
                mesh = device_mesh_without_backend(
                    device_type, torch.tensor(grid), tuple(names) if names else None
                )
            except (ValueError, RuntimeError, TypeError, AssertionError, NotImplementedError) as e:
                # Well-formed (parse_header checked it) but not one this process can build: a
                # device type it lacks, ranks outside its world, no process group.
                raise ReplicationError(
                    f"header field 'meshes'[{index}] {_shown(item)} cannot be rebuilt here: "
                    f"{type(e).__name__}: {e}"
                ) from e
        meshes.append(mesh)
    return meshes


# -- encoding: staged snapshot -> JSON header + storages ------------------------------------------


@dataclass
class Encoded:
    """What one side sends: the header and, in header order, its storages' bytes."""

    header: dict[str, Any]
    storages: list[torch.Tensor]
    """One flat uint8 tensor per storage, in header order."""
    meshes: list[Any] = field(default_factory=list)
    """The device meshes of the sent DTensors (the receiver reuses equal ones of its own)."""


class _Encoder(SkeletonEncoder):
    error = ReplicationError
    verb = "sent"
    max_header_bytes = MAX_HEADER_BYTES
    refusal = (
        "cannot replicate a {type} object: the wire carries dicts, lists, tuples, str, int, "
        "float, bool, None, tensors, DTensors and ShardedTensors"
    )

    def __init__(self) -> None:
        super().__init__()
        self.storages: list[torch.Tensor] = []
        self.meshes: list[Any] = []
        self._mesh_index: dict[str, int] = {}
        self._storage_index: dict[int, int] = {}

    def encode_tensor(self, x: torch.Tensor, path: Path) -> Any:
        # Not imported to ask: the first import of torch.distributed.tensor took 0.3-0.5 s
        # (sympy with it), on the event loop in the exchange's first call, and a DTensor
        # exists only once someone else has imported it.
        if is_dtensor(x):
            return self._dtensor(x, path)
        if is_sharded_tensor(x):
            return self._sharded(x, path)
        if type(x) not in (torch.Tensor, torch.nn.Parameter):
            kind = type(x).__qualname__
            raise ReplicationError(f"cannot replicate a tensor subclass {kind}", path)
        if x.layout is not torch.strided or x.is_quantized or x.is_nested or x.is_meta:
            raise ReplicationError(f"cannot replicate a {x.layout} tensor; only strided ones", path)
        # Sent, what the partner's decoder refuses came back as its complaint about a field
        # of this rank's header.
        unreadable = unreadable_view(x)
        if unreadable is not None:
            raise ReplicationError(f"cannot replicate {unreadable}", path)
        storage = x.untyped_storage()
        key = storage_key(storage)
        index = self._storage_index.get(key)
        if index is None:
            index = self._storage_index[key] = len(self.storages)
            flat = torch.empty((0,), dtype=torch.uint8, device=x.device).set_(storage)
            self.storages.append(flat)
        node: dict[str, Any] = {
            "storage": index,
            "dtype": str(x.dtype).removeprefix("torch."),
            "shape": list(x.shape),
            "stride": list(x.stride()),
            "offset": x.storage_offset(),
        }
        if type(x) is torch.nn.Parameter:
            node["param"] = x.requires_grad
        if x.is_conj():
            node["conj"] = True
        if x.is_neg():
            node["neg"] = True
        return node

    def _dtensor(self, x: Any, path: Path) -> dict[str, Any]:
        spec = dtensor_spec(x)
        key = json.dumps(mesh_key(spec.mesh))
        index = self._mesh_index.get(key)
        if index is None:
            index = self._mesh_index[key] = len(self.meshes)
            self.meshes.append(spec.mesh)
        return {
            "dtensor": {
                "local": self.encode_tensor(dtensor_local(x), (*path, Attr("_local_tensor"))),
                "mesh": index,
                "placements": [placement_to_json(p, path) for p in spec.placements],
                "shape": list(x.shape),
                "stride": list(x.stride()),
                "requires_grad": x.requires_grad,
            }
        }

    def _sharded(self, x: Any, path: Path) -> dict[str, Any]:
        metadata = x.metadata()
        properties = metadata.tensor_properties
        shards = []
        for i, shard in enumerate(x.local_shards()):
            where = (*path, Attr("local_shards"), i)
            tensor = self.encode_tensor(shard.tensor, where)
            shards.append({"tensor": tensor, **_shard_metadata_to_json(shard.metadata)})
        return {
            "sharded": {
                "shards": shards,
                "metadata": [_shard_metadata_to_json(m) for m in metadata.shards_metadata],
                "size": list(metadata.size),
                "dtype": str(properties.dtype).removeprefix("torch."),
                "requires_grad": bool(properties.requires_grad),
            }
        }


def _shard_metadata_to_json(metadata: Any) -> dict[str, Any]:
    placement = metadata.placement
    return {
        "offsets": list(metadata.shard_offsets),
        "sizes": list(metadata.shard_sizes),
        "rank": placement.rank() if placement is not None else None,
    }


def encode(staged: Any, call: int = 0) -> Encoded:
    """The header and the storages to send for ``staged`` (a snapshot of host tensors).

    ``call``: this side's call number, which the receiver compares with its own.
    """
    encoder = _Encoder()
    skeleton = encoder.encode(staged, ())
    header = {
        "version": WIRE_VERSION,
        "call": call,
        "storages": [s.numel() for s in encoder.storages],
        "meshes": [list(mesh_key(m)) for m in encoder.meshes],
        "skeleton": skeleton,
    }
    return Encoded(header, encoder.storages, encoder.meshes)


def header_bytes(encoded: Encoded) -> bytes:
    """The header as sent (compact JSON), made in pieces: ``json.dumps`` holds the GIL for
    all of a call, and a header over 20,000 tensors is a few MB (see ``json_text``)."""
    return json_text(encoded.header).encode()


def refusal_bytes(reason: str, call: int = 0, *, broken: bool = False) -> bytes:
    """The header a side sends instead of its snapshot when it cannot send it.

    ``broken``: the sender will not exchange again (its call was cancelled, say), so the
    receiver must not either: its next exchange would never be met.
    """
    header = {"version": WIRE_VERSION, "call": call, "refused": reason, "broken": broken}
    return json.dumps(header).encode()


# -- the partner's header: checked before anything is received ---------------------------------


def check_lengths(header_length: int, total: int) -> str | None:
    """What is wrong with the partner's first message (header length, total bytes), or None."""
    if not 2 <= header_length <= MAX_HEADER_BYTES:
        return f"header length {header_length} is not between 2 and {MAX_HEADER_BYTES}"
    if total < -1:
        return f"total bytes {total} is negative"
    return None


@dataclass(frozen=True)
class Header:
    """The partner's header, checked: what it sends, or why it refused to send."""

    raw: dict[str, Any]
    call: int
    """The partner's call number."""
    sizes: list[int]
    """The partner's storages' sizes in bytes (none when it refused)."""
    refused: str | None = None
    broken: bool = False


def parse_header(raw: bytes, total: int) -> Header:
    """The partner's header, checked against its first message (``total`` bytes).

    Raises :class:`~astage.ReplicationError` naming the field that is wrong; the caller adds
    the ranks. The skeleton itself is checked as it is decoded (:func:`decode`).
    """
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
        raise ReplicationError(f"the header is not JSON: {type(error).__name__}") from None
    if type(header) is not dict:
        raise ReplicationError(f"the header is a JSON {type(header).__name__}, not an object")
    if header.get("version") != WIRE_VERSION:
        raise ReplicationError(
            f"header field 'version' is {_shown(header.get('version'))}, not {WIRE_VERSION} "
            "(both ranks must run the same astage)"
        )
    their_call = header.get("call")
    if not _is_count(their_call):
        raise ReplicationError(f"header field 'call' is {_shown(their_call)}, not a call number")
    assert isinstance(their_call, int)
    if total < 0:
        reason, broken = header.get("refused"), header.get("broken", False)
        if type(reason) is not str or type(broken) is not bool:
            raise ReplicationError("a refusal header needs 'refused' (str) and 'broken' (bool)")
        return Header(header, their_call, [], reason[:2000], broken)
    if set(header) != {"version", "call", "storages", "meshes", "skeleton"}:
        raise ReplicationError(f"header fields {sorted(header)} are not the expected ones")
    sizes = header["storages"]
    if not _counts(sizes, most=MAX_HEADER_BYTES):
        raise ReplicationError("header field 'storages' must be a list of sizes (integers >= 0)")
    if sum(sizes) != total:
        raise ReplicationError(
            f"header field 'storages' adds up to {sum(sizes)} bytes, the partner announced {total}"
        )
    meshes = header["meshes"]
    if type(meshes) is not list:
        raise ReplicationError("header field 'meshes' must be a list")
    for i, item in enumerate(meshes):
        problem = mesh_problem(item)
        if problem is not None:
            raise ReplicationError(f"header field 'meshes'[{i}]: {problem}")
    return Header(header, their_call, sizes)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- decoding: JSON header + storages -> replica -----------------------------------------------

_TENSOR_KEYS = frozenset({"storage", "dtype", "shape", "stride", "offset"})
_TENSOR_FLAGS = frozenset({"param", "conj", "neg"})
_DTENSOR_KEYS = frozenset({"local", "mesh", "placements", "shape", "stride", "requires_grad"})
_SHARDED_KEYS = frozenset({"shards", "metadata", "size", "dtype", "requires_grad"})


class Storages(Protocol):
    """What :func:`decode` views: the receive buffers by index (a list, or one that makes each
    buffer when the decoder first reaches it)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> torch.Tensor: ...


class _Decoder(SkeletonDecoder):
    """Rebuilds the partner's snapshot on ``storages``; every tensor field is checked first."""

    def __init__(  # noqa: PLR0917 - private, built in one place
        self,
        storages: Storages,
        sizes: list[int],
        meshes: list[Any],
        source: int,
        rank: int,
        group: Any,
    ) -> None:
        self._storages = storages
        self._sizes = sizes
        self.viewed: set[int] = set()
        """The storage indices some tensor views (all of them, in what an encoder sends)."""
        self._meshes = meshes
        self._source = source
        self._rank = rank
        self._group = group

    def decode_other(self, node: dict[str, Any]) -> Any:
        if len(node) == 1 and "dtensor" in node:
            return self._dtensor(node["dtensor"])
        if len(node) == 1 and "sharded" in node:
            return self._sharded(node["sharded"])
        if "storage" in node:
            return self._tensor(node)
        raise self.bad(node)

    def bad(self, node: Any) -> AstageError:
        shown = sorted(node) if isinstance(node, dict) else type(node).__name__
        return self.invalid(f"bad node {shown}")

    def invalid(self, problem: str) -> AstageError:
        path = tuple(vars(self).get("_path", ()))
        where = f" at {format_path(path)}" if path else ""
        return ReplicationError(f"the skeleton{where}: {problem}")

    def _tensor(self, node: Any) -> torch.Tensor:
        flags = node.keys() - _TENSOR_KEYS if type(node) is dict else None
        if flags is None or len(node) - len(flags) != len(_TENSOR_KEYS) or flags - _TENSOR_FLAGS:
            raise self.invalid(f"a tensor node needs exactly the fields {sorted(_TENSOR_KEYS)}")
        index, shape, stride, offset = (
            node["storage"],
            node["shape"],
            node["stride"],
            node["offset"],
        )
        if not _is_count(index) or index >= len(self._storages):
            raise self.invalid(
                f"field 'storage' is {_shown(index)}, not a storage index "
                f"(0 to {len(self._storages) - 1})"
            )
        # Never a quantized dtype: the encoder refuses quantized tensors, and a view of one
        # made here is a tensor torch can neither read nor clone.
        dtype = VIEW_DTYPES.get(node["dtype"]) if type(node["dtype"]) is str else None
        if dtype is None:
            raise self.invalid(f"field 'dtype' is {_shown(node['dtype'])}, not a torch dtype")
        if not _counts(shape) or not _counts(stride) or len(shape) != len(stride):
            raise self.invalid(
                "fields 'shape' and 'stride' must be equal-length lists of sizes "
                f"(integers from 0 below {MAX_SIZE})"
            )
        if math.prod(shape) >= MAX_SIZE:  # torch's numel would overflow int64
            raise self.invalid(f"field 'shape' {_shown(shape)} has too many elements")
        if not _is_count(offset):
            raise self.invalid(f"field 'offset' is {_shown(offset)}, not an offset")
        for flag in flags:
            if type(node[flag]) is not bool:
                raise self.invalid(f"field {flag!r} must be true or false")
        if node.get("conj") and not takes_conj_bit(dtype):
            raise self.invalid(f"field 'conj' is set on a view of dtype {node['dtype']}")
        if node.get("neg") and not takes_neg_bit(dtype):
            raise self.invalid(f"field 'neg' is set on a view of dtype {node['dtype']}")
        if node.get("param") and not (dtype.is_floating_point or dtype.is_complex):
            raise self.invalid(
                f"field 'param' asks for gradients on a view of dtype {node['dtype']}, "
                "which only floating point and complex tensors can require"
            )
        if 0 in shape:
            # No element, but its offset still lies inside its storage (as in a file): a view
            # past the end is no view of what was received.
            needed = offset * dtype.itemsize
        else:
            needed = view_end(shape, stride, offset) * dtype.itemsize
        if needed > self._sizes[index]:
            raise self.invalid(
                f"a view of {needed} bytes (shape {shape}, stride {stride}, field 'offset' "
                f"{offset}, {node['dtype']}) is larger than its storage {index} of "
                f"{self._sizes[index]} bytes"
            )
        self.viewed.add(index)
        storage = self._storages[index].untyped_storage()
        try:
            view = torch.empty((0,), dtype=dtype, device="cpu").set_(storage, offset, shape, stride)
        except RuntimeError as error:  # anything torch refuses that the checks above let by
            raise self.invalid(f"torch refuses this view: {error}") from None
        if node.get("conj"):
            view = view.conj()
        if node.get("neg"):
            view = neg_view(view)
        if "param" in node:
            return torch.nn.Parameter(view, requires_grad=node["param"])
        return view

    def _dtensor(self, node: Any) -> torch.Tensor:
        if type(node) is not dict or set(node) != _DTENSOR_KEYS:
            raise self.invalid(f"a DTensor node needs exactly the fields {sorted(_DTENSOR_KEYS)}")
        mesh_index, shape, stride = node["mesh"], node["shape"], node["stride"]
        if not _is_count(mesh_index) or mesh_index >= len(self._meshes):
            raise self.invalid(f"field 'mesh' is {_shown(mesh_index)}, not a mesh index")
        if not _counts(shape) or not _counts(stride) or len(shape) != len(stride):
            raise self.invalid("DTensor fields 'shape' and 'stride' must be equal-length sizes")
        mesh = self._meshes[mesh_index]
        raw = node["placements"]
        if type(raw) is not list or len(raw) != mesh.ndim:
            raise self.invalid("field 'placements' must list one placement per mesh dimension")
        placements = [placement_from_node(item, len(shape)) for item in raw]
        if any(p is None for p in placements):
            raise self.invalid(f"field 'placements' holds an unknown placement: {_shown(raw)}")
        if type(node["requires_grad"]) is not bool:
            raise self.invalid("field 'requires_grad' must be true or false")
        local = self._tensor(node["local"])
        if isinstance(local, torch.nn.Parameter):
            local = local.data
        problem = local_shape_problem(list(local.shape), shape, placements)
        if problem is not None:
            raise self.invalid(problem)
        try:
            return make_dtensor(
                local, mesh, placements, shape, stride, requires_grad=node["requires_grad"]
            )
        except (ValueError, RuntimeError, AssertionError, TypeError) as error:
            raise self.invalid(f"the DTensor cannot be rebuilt: {error}") from None

    def _sharded(self, node: Any) -> torch.Tensor:
        if type(node) is not dict or set(node) != _SHARDED_KEYS:
            raise self.invalid(
                f"a ShardedTensor node needs exactly the fields {sorted(_SHARDED_KEYS)}"
            )
        size, shards, entries = node["size"], node["shards"], node["metadata"]
        dtype = VIEW_DTYPES.get(node["dtype"]) if type(node["dtype"]) is str else None
        if not _counts(size) or dtype is None or type(node["requires_grad"]) is not bool:
            raise self.invalid("ShardedTensor fields 'size', 'dtype', 'requires_grad' are bad")
        if type(shards) is not list or type(entries) is not list or not entries:
            raise self.invalid("ShardedTensor fields 'shards' and 'metadata' must be lists")

        def placed(entry: Any) -> tuple[list[int], list[int], str | None]:
            if (
                type(entry) is not dict
                or not _counts(entry.get("offsets"))
                or not _counts(entry.get("sizes"))
                or len(entry["offsets"]) != len(size)
                or len(entry["sizes"]) != len(size)
                or not (_is_count(entry.get("rank")) or entry.get("rank") is None)
            ):
                raise self.invalid(f"bad shard metadata {_shown(entry)}")
            # The partner's shards now live here, on this rank's CPU (as in DCP's replication);
            # in the global metadata this rank's entries and the partner's trade places.
            rank = entry["rank"]
            if rank == self._source:
                rank = self._rank
            elif rank == self._rank:
                rank = self._source
            where = None if rank is None else f"rank:{rank}/cpu"
            return list(entry["offsets"]), list(entry["sizes"]), where

        local = []
        for shard in shards:
            if type(shard) is not dict or "tensor" not in shard:
                raise self.invalid(f"bad local shard {_shown(shard)}")
            tensor = self._tensor(shard["tensor"])
            if isinstance(tensor, torch.nn.Parameter):
                tensor = tensor.data
            local.append((tensor, *placed({**shard, "rank": self._source})))
        try:
            return make_sharded_tensor(
                local,
                [placed(entry) for entry in entries],
                size,
                dtype,
                requires_grad=node["requires_grad"],
                process_group=self._group,
            )
        except (ValueError, RuntimeError, AssertionError, TypeError) as error:
            raise self.invalid(f"the ShardedTensor cannot be rebuilt: {error}") from None


def decode(
    header: dict[str, Any],
    storages: Storages,
    own_meshes: list[Any],
    source: int,
    *,
    sizes: list[int] | None = None,
    rank: int = 0,
    group: Any = None,
) -> Any:
    """The partner's snapshot: tensors are views on ``storages`` (filled now or later).

    ``own_meshes``: this rank's meshes, reused for equal ones in the header; ``source``:
    the partner's rank; ``rank`` and ``group``: this rank and its process group, for the
    ShardedTensors rebuilt here. Every tensor is checked against ``sizes`` (the storages'
    sizes, by default those of ``storages``) before a view is made: a
    :class:`~astage.ReplicationError` names the field and its path. A storage that no tensor
    views is refused too: an encoder sends none, and each costs the receiver a buffer (a
    header of a million ``0,`` entries asked for a million).
    """
    if sizes is None:
        sizes = [storages[i].numel() for i in range(len(storages))]
    meshes = _resolve_meshes(header["meshes"], own_meshes)
    decoder = _Decoder(storages, sizes, meshes, source, rank, group)
    try:
        replica = decoder.decode(header["skeleton"])
    except RecursionError:
        raise ReplicationError("the skeleton nests too deep") from None
    if len(decoder.viewed) != len(sizes):
        unused = next(i for i in range(len(sizes)) if i not in decoder.viewed)
        raise ReplicationError(
            f"header field 'storages'[{unused}] ({sizes[unused]} bytes) is viewed by no tensor "
            f"of the skeleton ({len(sizes) - len(decoder.viewed)} of {len(sizes)} storages are not)"
        )
    return replica


# -- the byte messages -----------------------------------------------------------------------


def buckets(sizes: list[int], bucket_bytes: int = BUCKET_BYTES) -> list[list[int]]:
    """Group storage indices into messages: big storages alone, small ones packed in order."""
    messages: list[list[int]] = []
    current: list[int] = []
    filled = 0
    for index, size in enumerate(sizes):
        if size == 0:
            continue
        if size >= bucket_bytes:
            messages.append([index])
            continue
        current.append(index)
        filled += size
        if filled >= bucket_bytes:
            messages.append(current)
            current, filled = [], 0
    if current:
        messages.append(current)
    return messages


def _travels_alone(group: list[int], sizes: list[int]) -> bool:
    return len(group) == 1 and sizes[group[0]] >= BUCKET_BYTES


def pack(
    storages: list[torch.Tensor], sizes: list[int], spare: list[torch.Tensor]
) -> list[torch.Tensor]:
    """The messages to send, in order: big storages as they are, small ones copied into buckets.

    ``spare`` holds the bucket buffers of earlier calls; they are reused when big enough and
    replaced (or added) otherwise, so a steady state dict packs without allocating.
    """
    messages = []
    bucket_no = 0
    for group in buckets(sizes):
        if _travels_alone(group, sizes):
            messages.append(storages[group[0]])
            continue
        total = sum(sizes[i] for i in group)
        if bucket_no < len(spare) and spare[bucket_no].numel() >= total:
            bucket = spare[bucket_no][:total]
        else:
            fresh = torch.empty(max(total, BUCKET_BYTES * 2), dtype=torch.uint8, device="cpu")
            if bucket_no < len(spare):
                spare[bucket_no] = fresh
            else:
                spare.append(fresh)
            bucket = fresh[:total]
        offset = 0
        for i in group:
            bucket[offset : offset + sizes[i]].copy_(storages[i])
            offset += sizes[i]
        messages.append(bucket)
        bucket_no += 1
    return messages


@dataclass
class Incoming:
    """One message to receive: the buffer it lands in and the storages it carries."""

    buffer: torch.Tensor
    indices: list[int]
    packed: bool
    """True when ``buffer`` is a bucket whose slices still go to their storages."""

    def unpack(self, storages: list[torch.Tensor], sizes: list[int]) -> None:
        """Copy a landed bucket's slices into their storages (nothing to do otherwise)."""
        if not self.packed:
            return
        offset = 0
        for i in self.indices:
            storages[i].copy_(self.buffer[offset : offset + sizes[i]])
            offset += sizes[i]


def unpack_plan(storages: list[torch.Tensor], sizes: list[int]) -> list[Incoming]:
    """The messages the partner sends for storages of ``sizes``, in its sending order.

    A big storage is received straight into its buffer in ``storages``; small ones land in a
    fresh bucket first.
    """
    plan: list[Incoming] = []
    for group in buckets(sizes):
        if _travels_alone(group, sizes):
            plan.append(Incoming(storages[group[0]], group, packed=False))
        else:
            bucket = torch.empty(sum(sizes[i] for i in group), dtype=torch.uint8, device="cpu")
            plan.append(Incoming(bucket, group, packed=True))
    return plan
