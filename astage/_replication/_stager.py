"""ReplicationStager: stage a snapshot, swap it with a partner rank over torch.distributed.

Each rank stages its state dict with its own :class:`~astage.Stager` (cached host buffers),
sends the staged snapshot to a partner rank and receives the partner's in return: a copy of
every rank's snapshot then lives in another rank's memory (and, with ``storage_dir``, on its
disk), so a lost node can be restored from its partner.

**Pairing.** In a group of ``world`` ranks, rank ``r`` swaps with ``(r + world // 2) % world``
when ``world`` is even (``0<->2, 1<->3`` for four ranks). When ``world`` is odd the ranks form a
ring: ``r`` sends to ``r + 1`` and receives from ``r - 1``. ``partner=`` pins a symmetric
partner instead. Every rank posts its send and its receive at once (non-blocking
``isend``/``irecv``), so no ordering between the two sides is needed and no pair deadlocks.

**Wire format** (no pickle: the receiver runs no code of the sender's):

1. two int64 numbers: the length of the JSON header and the total tensor bytes;
2. the JSON header: the skeleton (dicts, ``OrderedDict``, lists, tuples, str, int, float,
   bool, None; for each tensor its storage index, dtype, shape, stride and offset, so views
   and tied weights share one storage again), the storages' sizes, and for DTensors their
   placements, global shape and stride, and the device mesh (device type, rank grid, dim names);
3. the storages' bytes: a storage of at least ``BUCKET_BYTES`` goes alone, straight from the
   staged host buffer into the receiver's; smaller ones are packed into buckets of about
   ``BUCKET_BYTES`` (fewer messages: gloo pays per message).

A DTensor is sent as its local shard plus its spec; the receiver rebuilds a DTensor around the
partner's shard, on this rank's own mesh object when an equal mesh occurs in its own state
dict (the usual SPMD case), otherwise on a mesh rebuilt from the sent description. Anything
else (dataclasses, custom objects, ShardedTensor) is refused with a :class:`ReplicationError`
naming its path; the header announces the refusal, so the partner raises at once too and the
pair stays in step.

**Timeouts.** The exchange runs in a worker thread (torch.distributed calls block), and each
wait has a deadline: a partner that does not take part within ``timeout`` raises
:class:`ReplicationTimeoutError` naming it. A receive that timed out is still posted in the
process group and would swallow the partner's next message, so the stager is then unusable:
later calls raise, and a fresh process group is needed.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from types import TracebackType
from typing import Any

import torch
import torch.distributed as dist

from .._drivers._async import Stager
from .._errors import (
    AstageError,
    ReplicationError,
    ReplicationTimeoutError,
    StagerClosedError,
)
from .._files._skeleton import TORCH_DTYPES, SkeletonDecoder, SkeletonEncoder
from .._files._writer import SafetensorsWriter
from .._options import StagingOptions
from .._paths import Attr, Path, format_path

WIRE_VERSION = 1
BUCKET_BYTES = 16 << 20
"""Storages smaller than this travel packed together in buckets of about this size."""
DEFAULT_TIMEOUT = timedelta(minutes=5)


def pairing(rank: int, world: int, partner: int | None = None) -> tuple[int, int]:
    """``(send_to, receive_from)`` for ``rank`` in a group of ``world`` ranks.

    Even ``world``: the symmetric pair ``(r + world // 2) % world``. Odd ``world``: a ring,
    send to ``r + 1``, receive from ``r - 1``. ``partner`` pins a symmetric partner.
    """
    if world < 2:
        raise ReplicationError(
            f"replication needs at least 2 ranks; this process group has {world}"
        )
    if partner is not None:
        if not 0 <= partner < world or partner == rank:
            raise ReplicationError(
                f"rank {rank}: partner={partner} is not another rank of this {world}-rank group"
            )
        return partner, partner
    if world % 2 == 0:
        other = (rank + world // 2) % world
        return other, other
    return (rank + 1) % world, (rank - 1) % world


# -- encoding: staged snapshot -> JSON header + storages ------------------------------------------


@dataclass
class _Encoded:
    header: dict[str, Any]
    storages: list[torch.Tensor]
    """One flat uint8 tensor per storage, in header order."""
    meshes: list[Any] = field(default_factory=list)


def _mesh_key(mesh: Any) -> tuple[Any, ...]:
    names = getattr(mesh, "mesh_dim_names", None)
    return (mesh.device_type, mesh.mesh.tolist(), list(names) if names else None)


def _placement(placement: Any, path: Path) -> list[Any]:
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


def _make_placement(item: list[Any]) -> Any:
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
        return self._tensor(x, path)

    def _tensor(self, x: torch.Tensor, path: Path) -> Any:
        from torch.distributed.tensor import DTensor

        if isinstance(x, DTensor):
            spec = x._spec
            key = json.dumps(_mesh_key(spec.mesh))
            index = self._mesh_index.get(key)
            if index is None:
                index = self._mesh_index[key] = len(self.meshes)
                self.meshes.append(spec.mesh)
            return {
                "dtensor": {
                    "local": self._tensor(x._local_tensor, (*path, Attr("_local_tensor"))),
                    "mesh": index,
                    "placements": [_placement(p, path) for p in spec.placements],
                    "shape": list(x.shape),
                    "stride": list(x.stride()),
                    "requires_grad": x.requires_grad,
                }
            }
        if type(x) not in (torch.Tensor, torch.nn.Parameter):
            kind = type(x).__qualname__
            raise ReplicationError(f"cannot replicate a tensor subclass {kind}", path)
        if x.layout is not torch.strided or x.is_quantized or x.is_nested or x.is_meta:
            raise ReplicationError(f"cannot replicate a {x.layout} tensor; only strided ones", path)
        storage = x.untyped_storage()
        index = self._storage_index.get(storage._cdata)
        if index is None:
            index = self._storage_index[storage._cdata] = len(self.storages)
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


def encode(staged: Any) -> _Encoded:
    """The header and the storages to send for ``staged`` (a snapshot of host tensors)."""
    encoder = _Encoder()
    skeleton = encoder.encode(staged, ())
    header = {
        "version": WIRE_VERSION,
        "storages": [s.numel() for s in encoder.storages],
        "meshes": [list(_mesh_key(m)) for m in encoder.meshes],
        "skeleton": skeleton,
    }
    return _Encoded(header, encoder.storages, encoder.meshes)


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
            view = view._neg_view()
        if "param" in node:
            return torch.nn.Parameter(view, requires_grad=node["param"])
        return view

    def _dtensor(self, node: dict[str, Any]) -> torch.Tensor:
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

        local = self._tensor(node["local"])
        if isinstance(local, torch.nn.Parameter):
            local = local.data
        spec = DTensorSpec(
            self._meshes[node["mesh"]],
            tuple(_make_placement(p) for p in node["placements"]),
            tensor_meta=TensorMeta(torch.Size(node["shape"]), tuple(node["stride"]), local.dtype),
        )
        return DTensor(local, spec, requires_grad=node["requires_grad"])  # type: ignore[call-arg]


def _resolve_meshes(described: list[list[Any]], own: list[Any]) -> list[Any]:
    """Mesh objects for the partner's mesh descriptions: our own equal mesh, or a rebuilt one."""
    ours = {json.dumps(list(_mesh_key(m))): m for m in own}
    meshes = []
    for item in described:
        mesh = ours.get(json.dumps(item))
        if mesh is None:
            from torch.distributed.device_mesh import DeviceMesh

            device_type, grid, names = item
            mesh = DeviceMesh(
                device_type,
                torch.tensor(grid),
                mesh_dim_names=tuple(names) if names else None,
                _init_backend=False,
            )
        meshes.append(mesh)
    return meshes


# -- the stager -----------------------------------------------------------------------------------


class ReplicationStager:
    """Stages a state dict and swaps the snapshot with a partner rank; returns the partner's.

    ``process_group``: the group to exchange over (the default group when None); gloo moves
    CPU tensors, so the snapshot travels from astage's host buffers. ``storage_dir``: where
    each received replica is persisted (one file per rank and partner, replaced atomically).
    ``timeout``: seconds (or a ``timedelta``) the partner may take to join an exchange.
    ``partner``: a fixed, symmetric partner rank instead of the default pairing.
    ``options``: the :class:`~astage.StagingOptions` of the local :class:`~astage.Stager`.

    The returned replica lives in buffers this stager reuses: the next ``stage`` call
    overwrites it (as :meth:`Stager.stage` does with its snapshot).
    """

    def __init__(
        self,
        process_group: Any = None,
        *,
        storage_dir: str | os.PathLike[str] | None = None,
        timeout: float | timedelta = DEFAULT_TIMEOUT,
        partner: int | None = None,
        options: StagingOptions | None = None,
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ReplicationError(
                "ReplicationStager needs an initialized torch.distributed process group "
                "(call torch.distributed.init_process_group first, e.g. under torchrun)"
            )
        self._group = process_group if process_group is not None else dist.group.WORLD
        backend = str(dist.get_backend(self._group))
        if backend == "nccl":
            raise ReplicationError(
                "ReplicationStager sends the staged snapshot from host memory, which NCCL "
                "cannot move: pass a gloo group, e.g. "
                "process_group=torch.distributed.new_group(backend='gloo')"
            )
        self.rank: int = dist.get_rank(self._group)
        self.world_size: int = dist.get_world_size(self._group)
        self.send_to, self.receive_from = pairing(self.rank, self.world_size, partner)
        seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)
        if not seconds > 0:
            raise ReplicationError(f"timeout must be positive, got {timeout!r}")
        self.timeout = seconds
        self.storage_dir = os.path.abspath(os.fspath(storage_dir)) if storage_dir else None
        if self.storage_dir is not None:
            os.makedirs(self.storage_dir, exist_ok=True)
        self._stager = Stager(options)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="astage-replicate")
        self._lock = asyncio.Lock()
        self._closed = False
        self._broken: str | None = None
        self._recv_buffers: list[torch.Tensor] = []
        self._send_buckets: list[torch.Tensor] = []
        self.last_seconds: float | None = None
        """Seconds the last exchange took on the wire (header and bytes, both directions)."""

    @property
    def replica_path(self) -> str | None:
        """The file the replica received from ``receive_from`` is persisted to."""
        if self.storage_dir is None:
            return None
        name = f"replica-rank{self.rank}-from-rank{self.receive_from}.safetensors"
        return os.path.join(self.storage_dir, name)

    async def stage(self, state_dict: Any) -> Any:
        """Stage ``state_dict``, send it to the partner, return the partner's replica."""
        async with self._lock:
            if self._closed:
                raise StagerClosedError("this ReplicationStager was closed")
            if self._broken is not None:
                raise ReplicationError(self._broken)
            staged = await self._stager.stage(state_dict)
            loop = asyncio.get_running_loop()
            events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
            notify = None
            if self.storage_dir is not None:

                def notify(kind: str, value: Any) -> None:
                    loop.call_soon_threadsafe(events.put_nowait, (kind, value))

            future = loop.run_in_executor(self._executor, self._exchange, staged, notify)
            future.add_done_callback(lambda _: events.put_nowait(("end", None)))
            try:
                if self.storage_dir is not None:
                    await self._persist(events, future)
                return await asyncio.shield(future)
            except asyncio.CancelledError:
                if not future.done():
                    self._broken = (
                        f"rank {self.rank}: an exchange with rank {self.send_to} was cancelled "
                        "midway; the pair is out of step (make a new process group and stager)"
                    )
                raise
            except ReplicationTimeoutError as error:
                self._broken = f"{error} (a receive is still posted: this stager is unusable)"
                raise

    # -- the exchange (worker thread) ------------------------------------------------------

    def _where(self) -> str:
        if self.send_to == self.receive_from:
            return f"rank {self.rank} <-> partner rank {self.send_to}"
        return f"rank {self.rank} (sending to rank {self.send_to}, receiving from rank " + (
            f"{self.receive_from})"
        )

    def _wait(self, works: list[Any], deadline: float, doing: str) -> None:
        for work in works:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError("deadline passed")
                work.wait(timedelta(seconds=left))
            except Exception as error:
                text = str(error)
                timed_out = (
                    isinstance(error, TimeoutError)
                    or "imed out" in text
                    or "imeout" in text
                    or time.monotonic() >= deadline
                )
                if timed_out:
                    raise ReplicationTimeoutError(
                        f"{self._where()}: the partner did not complete {doing} within "
                        f"{self.timeout:g} s; is rank {self.receive_from} gone or not calling "
                        "stage()?"
                    ) from error
                self._broken = f"{self._where()}: {doing} failed: {text.splitlines()[0]}"
                raise ReplicationError(self._broken) from error

    def _swap(
        self,
        send: list[torch.Tensor],
        recv: list[torch.Tensor],
        deadline: float,
        doing: str,
        first_tag: int,
    ) -> None:
        """Post every send and receive at once (message ``i`` on tag ``first_tag + i``), wait.

        Distinct tags let gloo move the messages side by side (one tag serializes them:
        about 1.5x slower on loopback).
        """
        group, dst, src = self._group, self.send_to, self.receive_from
        works = [
            dist.isend(tensor, group=group, group_dst=dst, tag=first_tag + i)
            for i, tensor in enumerate(send)
        ]
        works += [
            dist.irecv(tensor, group=group, group_src=src, tag=first_tag + i)
            for i, tensor in enumerate(recv)
        ]
        self._wait([w for w in works if w is not None], deadline, doing)

    def _exchange(self, staged: Any, notify: Callable[[str, Any], None] | None = None) -> Any:
        """The whole exchange, in the worker thread; returns the replica.

        With ``notify``, it reports ``("replica", (replica, buffers))`` as soon as the header
        is read (the tensors are views on buffers still being filled), then
        ``("landed", storage_indices)`` as each message's bytes are in place: the file writer
        runs while the bytes are still arriving.
        """
        started = time.monotonic()
        deadline = started + self.timeout
        # A snapshot this rank cannot send is announced in the header (total bytes -1), so
        # the partner raises at once instead of timing out, and the pair stays in step.
        refused: ReplicationError | None = None
        try:
            encoded = encode(staged)
            text = json.dumps(encoded.header, separators=(",", ":")).encode()
            sizes: list[int] = encoded.header["storages"]
            total = sum(sizes)
        except ReplicationError as error:
            refused = error
            encoded = _Encoded({}, [])
            text = json.dumps({"refused": str(error)}).encode()
            sizes, total = [], -1
        # 1. sizes
        mine = torch.tensor([len(text), total], dtype=torch.int64)
        theirs = torch.zeros(2, dtype=torch.int64)
        self._swap([mine], [theirs], deadline, "the header-size exchange", 0)
        # 2. header
        out = torch.frombuffer(bytearray(text), dtype=torch.uint8)
        into = torch.empty(int(theirs[0]), dtype=torch.uint8)
        self._swap([out], [into], deadline, "the header exchange", 1)
        their_total = int(theirs[1])
        try:
            header = json.loads(into.numpy().tobytes())
            if their_total >= 0:
                if header["version"] != WIRE_VERSION:
                    raise ValueError(f"wire version {header['version']}")
                their_sizes = [int(n) for n in header["storages"]]
            else:
                their_sizes = []
        except (ValueError, KeyError, TypeError) as error:
            self._broken = (
                f"{self._where()}: unreadable header from rank {self.receive_from}: {error}"
            )
            raise ReplicationError(self._broken) from error
        # 3. bytes (each side sends unless it refused, receives unless its sender refused)
        send = self._pack(encoded.storages, sizes) if refused is None else []
        recv_storages = self._receive_buffers(their_sizes)
        plan = self._unpack_plan(recv_storages, their_sizes)
        group, dst, src = self._group, self.send_to, self.receive_from
        send_works = [
            dist.isend(tensor, group=group, group_dst=dst, tag=2 + i)
            for i, tensor in enumerate(send)
        ]
        recv_works = [
            dist.irecv(message, group=group, group_src=src, tag=2 + i)
            for i, (message, _, _) in enumerate(plan)
        ]
        replica = None
        if refused is None and their_total >= 0:
            try:
                meshes = _resolve_meshes(header["meshes"], encoded.meshes)
                replica = _Decoder(recv_storages, meshes, src).decode(header["skeleton"])
            except Exception as error:
                # the receives are posted: the pair cannot be brought back in step
                self._broken = (
                    f"{self._where()}: cannot rebuild the snapshot of rank {src}: {error}"
                )
                raise ReplicationError(self._broken) from error
            if notify is not None:
                notify("replica", (replica, recv_storages))
        for work, (message, indices, packed) in zip(recv_works, plan, strict=True):
            self._wait([work], deadline, "the tensor exchange")
            if packed:
                offset = 0
                for i in indices:
                    recv_storages[i].copy_(message[offset : offset + their_sizes[i]])
                    offset += their_sizes[i]
            if notify is not None and replica is not None:
                notify("landed", indices)
        self._wait([w for w in send_works if w is not None], deadline, "the tensor exchange")
        if refused is not None:
            raise refused
        if their_total < 0:
            raise ReplicationError(
                f"{self._where()}: rank {self.receive_from} could not send its snapshot: "
                f"{header.get('refused')}"
            )
        self.last_seconds = time.monotonic() - started
        return replica

    def _pack(self, storages: list[torch.Tensor], sizes: list[int]) -> list[torch.Tensor]:
        messages = []
        bucket_no = 0
        for group in buckets(sizes):
            if len(group) == 1 and sizes[group[0]] >= BUCKET_BYTES:
                messages.append(storages[group[0]])
                continue
            total = sum(sizes[i] for i in group)
            if bucket_no < len(self._send_buckets) and self._send_buckets[bucket_no].numel() >= (
                total
            ):
                bucket = self._send_buckets[bucket_no][:total]
            else:
                fresh = torch.empty(max(total, BUCKET_BYTES * 2), dtype=torch.uint8)
                if bucket_no < len(self._send_buckets):
                    self._send_buckets[bucket_no] = fresh
                else:
                    self._send_buckets.append(fresh)
                bucket = fresh[:total]
            offset = 0
            for i in group:
                bucket[offset : offset + sizes[i]].copy_(storages[i])
                offset += sizes[i]
            messages.append(bucket)
            bucket_no += 1
        return messages

    def _receive_buffers(self, sizes: list[int]) -> list[torch.Tensor]:
        """One host buffer per partner storage, reused from the last call when sizes match."""
        old = self._recv_buffers
        if [b.numel() for b in old] != sizes:
            old = [torch.empty(n, dtype=torch.uint8) for n in sizes]
            self._recv_buffers = old
        return old

    def _unpack_plan(
        self, storages: list[torch.Tensor], sizes: list[int]
    ) -> list[tuple[torch.Tensor, list[int], bool]]:
        """``(message buffer, storage indices, packed)`` per message, in sending order."""
        plan: list[tuple[torch.Tensor, list[int], bool]] = []
        for group in buckets(sizes):
            if len(group) == 1 and sizes[group[0]] >= BUCKET_BYTES:
                plan.append((storages[group[0]], group, False))
            else:
                bucket = torch.empty(sum(sizes[i] for i in group), dtype=torch.uint8)
                plan.append((bucket, group, True))
        return plan

    # -- persistence -------------------------------------------------------------------------

    async def _persist(self, events: asyncio.Queue[tuple[str, Any]], exchange: Any) -> None:
        """Write the replica as its bytes arrive; commit once the exchange has succeeded.

        The exchange's own errors propagate as they are (after the writer aborted); a failure
        of the file raises :class:`ReplicationError` naming both ranks and the file, once the
        exchange is over (the pair stays in step).
        """
        path = self.replica_path
        assert path is not None
        writer: SafetensorsWriter | None = None
        failure: BaseException | None = None
        by_storage: dict[int, list[tuple[Path, torch.Tensor]]] = {}
        try:
            while True:
                kind, value = await events.get()
                if kind == "end":
                    break
                if failure is not None:
                    continue  # drain the events until the exchange is over
                try:
                    if kind == "replica":
                        replica, storages = value
                        writer, by_storage = await self._begin_file(path, replica, storages)
                    elif writer is not None:
                        for index in value:
                            for where, tensor in by_storage.pop(index, ()):
                                await writer.write(where, tensor)
                except Exception as error:  # noqa: BLE001 - raised after the exchange
                    failure = error
            exchange.result()  # the exchange's error, if any, wins
            if failure is None and writer is not None:
                try:
                    await writer.commit()
                except Exception as error:  # noqa: BLE001 - raised below, named
                    failure = error
            if failure is not None:
                raise ReplicationError(
                    f"rank {self.rank}: persisting the replica from partner rank "
                    f"{self.receive_from} to {path} failed: {failure}"
                ) from failure
        except BaseException:
            if writer is not None:
                await writer.abort()
            raise

    async def _begin_file(
        self, path: str, replica: Any, storages: list[torch.Tensor]
    ) -> tuple[SafetensorsWriter, dict[int, list[tuple[Path, torch.Tensor]]]]:
        tensors: list[tuple[Path, torch.Tensor]] = []
        dtensors: dict[str, Any] = {}
        plain = _plain(replica, (), tensors, dtensors)
        info = {"rank": self.rank, "partner": self.receive_from, "dtensors": dtensors}
        writer = SafetensorsWriter(path, metadata={"astage.replica": json.dumps(info)})
        await writer.begin(plain)
        index = {storage.untyped_storage().data_ptr(): i for i, storage in enumerate(storages)}
        by_storage: dict[int, list[tuple[Path, torch.Tensor]]] = {}
        for where, tensor in tensors:
            ptr = tensor.untyped_storage().data_ptr()
            if tensor.untyped_storage().nbytes() == 0 or ptr not in index:
                await writer.write(where, tensor)  # no bytes to wait for
            else:
                by_storage.setdefault(index[ptr], []).append((where, tensor))
        return writer, by_storage

    # -- closing -----------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Wait for the exchange in progress, then release the buffers and the worker thread."""
        if self._closed:
            return
        async with self._lock:
            if self._closed:
                return
            self._closed = True
            await self._stager.aclose()
            self._executor.shutdown(wait=False)
            self._recv_buffers = []
            self._send_buckets = []

    async def __aenter__(self) -> ReplicationStager:
        if self._closed:
            raise StagerClosedError("this ReplicationStager was closed")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _plain(
    x: Any, path: Path, tensors: list[tuple[Path, torch.Tensor]], dtensors: dict[str, Any]
) -> Any:
    """``x`` with every DTensor replaced by its local shard (what a checkpoint file can hold)."""
    from torch.distributed.tensor import DTensor

    if isinstance(x, DTensor):
        spec = x._spec
        dtensors[format_path(path)] = {
            "placements": [_placement(p, path) for p in spec.placements],
            "shape": list(x.shape),
            "stride": list(x.stride()),
            "mesh": list(_mesh_key(spec.mesh)),
        }
        local = x._local_tensor
        tensors.append((path, local))
        return local
    if isinstance(x, torch.Tensor):
        plain = x.detach() if type(x) is torch.nn.Parameter else x
        tensors.append((path, plain))
        return plain
    cls = type(x)
    if cls is list or cls is tuple:
        return cls(_plain(v, (*path, i), tensors, dtensors) for i, v in enumerate(x))
    if cls is dict or cls is OrderedDict:
        return cls((k, _plain(v, (*path, k), tensors, dtensors)) for k, v in x.items())
    return x
