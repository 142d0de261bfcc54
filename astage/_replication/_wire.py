"""The wire codec: a staged snapshot as a JSON header plus its storages' bytes; no pickle.

What one side sends, in three steps (the receiver runs no code of the sender's):

1. two int64 numbers: the length of the JSON header and the total tensor bytes (``-1`` when
   the sender refuses its snapshot: the header then only says why);
2. the JSON header: the skeleton (dicts, ``OrderedDict``, lists, tuples, str, int, float,
   bool, None; for each tensor its storage index, dtype, shape, stride and offset, so views
   and tied weights share one storage again), the storages' sizes, and for DTensors their
   placements, global shape and stride, and the device mesh (device type, rank grid, dim names);
3. the storages' bytes: a storage of at least ``BUCKET_BYTES`` goes alone, straight from the
   staged host buffer into the receiver's; smaller ones are packed into buckets of about
   ``BUCKET_BYTES`` (fewer messages: gloo pays per message). Both sides compute the same
   message plan from the sizes in the header, so nothing else needs agreeing on.

A DTensor is sent as its local shard plus its spec; the receiver rebuilds a DTensor around the
partner's shard, on this rank's own mesh object when an equal mesh occurs in its own state
dict (the usual SPMD case), otherwise on a mesh rebuilt from the sent description. Anything
else (dataclasses, custom objects, ShardedTensor) is refused with a
:class:`~astage.ReplicationError` naming its path.

Everything here is plain byte and metadata work: no process group, no thread, no event loop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch

from .._errors import AstageError, ReplicationError
from .._files._skeleton import TORCH_DTYPES, SkeletonDecoder, SkeletonEncoder
from .._paths import Attr, Path
from .._torch import (
    device_mesh_without_backend,
    dtensor_local,
    dtensor_spec,
    make_dtensor,
    neg_view,
    storage_key,
)

__all__ = [
    "BUCKET_BYTES",
    "WIRE_VERSION",
    "Encoded",
    "Incoming",
    "buckets",
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

WIRE_VERSION = 1
BUCKET_BYTES = 16 << 20
"""Storages smaller than this travel packed together in buckets of about this size."""


# -- DTensor placements and meshes ----------------------------------------------------------------


def mesh_key(mesh: Any) -> tuple[Any, ...]:
    """A JSON-able description of a device mesh: device type, rank grid, dim names."""
    names = getattr(mesh, "mesh_dim_names", None)
    return (mesh.device_type, mesh.mesh.tolist(), list(names) if names else None)


def placement_to_json(placement: Any, path: Path) -> list[Any]:
    """A DTensor placement as a JSON list; refuses kinds the receiver could not rebuild."""
    from torch.distributed.tensor.placement_types import Partial, Replicate, Shard

    kind = type(placement).__name__
    if isinstance(placement, Shard):
        split = getattr(placement, "split_factor", None)
        if kind == "_StridedShard":
            return ["strided_shard", placement.dim, split]
        if kind == "Shard":
            return ["shard", placement.dim]
    elif isinstance(placement, Replicate) and kind == "Replicate":
        return ["replicate"]
    elif isinstance(placement, Partial) and kind == "Partial":
        return ["partial", placement.reduce_op]
    raise ReplicationError(f"cannot replicate a DTensor placement {placement!r}", path)


def _placement_from_json(item: list[Any]) -> Any:
    from torch.distributed.tensor.placement_types import (
        Partial,
        Replicate,
        Shard,
        _StridedShard,
    )

    kind = item[0]
    if kind == "shard":
        return Shard(item[1])
    if kind == "strided_shard":
        return _StridedShard(item[1], split_factor=item[2])
    if kind == "replicate":
        return Replicate()
    if kind == "partial":
        return Partial(item[1])
    raise ReplicationError(f"unknown DTensor placement {item!r} in a replica header")


def _resolve_meshes(described: list[list[Any]], own: list[Any]) -> list[Any]:
    """Mesh objects for the partner's mesh descriptions: our own equal mesh, or a rebuilt one."""
    ours = {json.dumps(list(mesh_key(m))): m for m in own}
    meshes = []
    for item in described:
        mesh = ours.get(json.dumps(item))
        if mesh is None:
            device_type, grid, names = item
            mesh = device_mesh_without_backend(
                device_type, torch.tensor(grid), tuple(names) if names else None
            )
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
    refusal = (
        "cannot replicate a {type} object: the wire carries dicts, lists, tuples, str, int, "
        "float, bool, None, tensors and DTensors"
    )

    def __init__(self) -> None:
        super().__init__()
        self.storages: list[torch.Tensor] = []
        self.meshes: list[Any] = []
        self._mesh_index: dict[str, int] = {}
        self._storage_index: dict[int, int] = {}

    def encode_tensor(self, x: torch.Tensor, path: Path) -> Any:
        from torch.distributed.tensor import DTensor

        if isinstance(x, DTensor):
            return self._dtensor(x, path)
        if type(x) not in (torch.Tensor, torch.nn.Parameter):
            kind = type(x).__qualname__
            raise ReplicationError(f"cannot replicate a tensor subclass {kind}", path)
        if x.layout is not torch.strided or x.is_quantized or x.is_nested or x.is_meta:
            raise ReplicationError(f"cannot replicate a {x.layout} tensor; only strided ones", path)
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


def encode(staged: Any) -> Encoded:
    """The header and the storages to send for ``staged`` (a snapshot of host tensors)."""
    encoder = _Encoder()
    skeleton = encoder.encode(staged, ())
    header = {
        "version": WIRE_VERSION,
        "storages": [s.numel() for s in encoder.storages],
        "meshes": [list(mesh_key(m)) for m in encoder.meshes],
        "skeleton": skeleton,
    }
    return Encoded(header, encoder.storages, encoder.meshes)


def header_bytes(encoded: Encoded) -> bytes:
    """The header as sent (compact JSON)."""
    return json.dumps(encoded.header, separators=(",", ":")).encode()


def refusal_bytes(reason: str) -> bytes:
    """The header a side sends instead of its snapshot when it cannot send it."""
    return json.dumps({"refused": reason}).encode()


def parse_header(raw: bytes, total: int) -> tuple[dict[str, Any], list[int]]:
    """The partner's header and its storages' sizes (none when ``total`` says it refused).

    Raises ``ValueError``, ``KeyError`` or ``TypeError`` for a header it cannot read; the
    caller names the ranks.
    """
    header = json.loads(raw)
    if total < 0:
        return header, []
    if header["version"] != WIRE_VERSION:
        raise ValueError(f"wire version {header['version']}")
    return header, [int(n) for n in header["storages"]]


# -- decoding: JSON header + storages -> replica -----------------------------------------------


class _Decoder(SkeletonDecoder):
    def __init__(self, storages: list[torch.Tensor], meshes: list[Any], source: int) -> None:
        self._storages = storages
        self._meshes = meshes
        self._source = source

    def decode_other(self, node: dict[str, Any]) -> Any:
        if len(node) == 1 and "dtensor" in node:
            return self._dtensor(node["dtensor"])
        if "storage" in node:
            return self._tensor(node)
        raise self.bad(node)

    def bad(self, node: Any) -> AstageError:
        shown = sorted(node) if isinstance(node, dict) else type(node).__name__
        return ReplicationError(f"bad node {shown} in the header from rank {self._source}")

    def _tensor(self, node: dict[str, Any]) -> torch.Tensor:
        dtype = TORCH_DTYPES.get(node["dtype"])
        if dtype is None:
            raise ReplicationError(f"unknown dtype {node['dtype']!r} from rank {self._source}")
        storage = self._storages[node["storage"]].untyped_storage()
        view = torch.empty((0,), dtype=dtype).set_(
            storage, node["offset"], node["shape"], node["stride"]
        )
        if node.get("conj"):
            view = view.conj()
        if node.get("neg"):
            view = neg_view(view)
        if "param" in node:
            return torch.nn.Parameter(view, requires_grad=node["param"])
        return view

    def _dtensor(self, node: dict[str, Any]) -> torch.Tensor:
        local = self._tensor(node["local"])
        if isinstance(local, torch.nn.Parameter):
            local = local.data
        return make_dtensor(
            local,
            self._meshes[node["mesh"]],
            [_placement_from_json(p) for p in node["placements"]],
            node["shape"],
            node["stride"],
            requires_grad=node["requires_grad"],
        )


def decode(
    header: dict[str, Any], storages: list[torch.Tensor], own_meshes: list[Any], source: int
) -> Any:
    """The partner's snapshot: tensors are views on ``storages`` (filled now or later).

    ``own_meshes``: this rank's meshes, reused for equal ones in the header; ``source``:
    the partner's rank, for error messages.
    """
    meshes = _resolve_meshes(header["meshes"], own_meshes)
    return _Decoder(storages, meshes, source).decode(header["skeleton"])


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
            fresh = torch.empty(max(total, BUCKET_BYTES * 2), dtype=torch.uint8)
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
            bucket = torch.empty(sum(sizes[i] for i in group), dtype=torch.uint8)
            plan.append(Incoming(bucket, group, packed=True))
    return plan
