"""Persistence: the replica received from a partner, written to a file while its bytes arrive.

The file is a safetensors file written by :class:`~astage.SafetensorsWriter`, with every
DTensor replaced by its local shard and its spec (placements, global shape and stride, mesh)
in the file's metadata, under ``"astage.replica"`` with this rank and the partner's; every
ShardedTensor is replaced by the list of its local shards, their offsets and sizes and the
global size under ``"sharded"`` there. Each
message's tensors go to the writer as soon as the message has landed, so the disk works while
later bytes are still on the wire; the file is committed (fsync, atomic rename) only once the
whole exchange has succeeded, and aborted (no temporary left) otherwise.

Used as ``async with ReplicaFile(...) as file:`` around the whole exchange, the writer is
entered for that time: its own worker tasks write in the background, so :meth:`ReplicaFile.follow`
only queues the bytes and returns, and the writes of several messages overlap. The writer's task
group must be entered before, and left after, the task group that reads the exchange's progress
(task groups nest), which is why the block spans the exchange rather than begin..commit alone.
Without the block, each message's tensors are written before :meth:`ReplicaFile.follow` returns.
Either way the exchange thread never waits for the file: it only puts progress in a mailbox.

A failure of the file does not stop the exchange (the pair must stay in step): it is kept
and raised, naming both ranks and the file, once the exchange is over.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import torch

from .._drivers._gc import gc_paused
from .._errors import ReplicationError, UsageError
from .._files._skeleton import is_dtensor
from .._files._writer import SafetensorsWriter
from .._options import StagingOptions
from .._paths import Path, format_path
from .._torch import dtensor_local, dtensor_spec, is_sharded_tensor
from ._transport import Landed, Progress, ReplicaReady
from ._wire import mesh_key, placement_to_json

__all__ = ["ReplicaFile", "replica_file_name"]


def replica_file_name(rank: int, partner: int) -> str:
    """The file name of the replica that ``rank`` receives from ``partner``."""
    return f"replica-rank{rank}-from-rank{partner}.safetensors"


class ReplicaFile:
    """The replica that ``rank`` receives from ``partner``, persisted to ``path``.

    Feed it the exchange's progress with :meth:`follow`, then :meth:`commit` once the
    exchange succeeded, or :meth:`abort` (always safe, also when nothing was begun). Entered
    with ``async with`` around all of that, the file is written in the background (see the
    module docstring); leaving the block without a commit aborts it.
    """

    def __init__(self, path: str, rank: int, partner: int) -> None:
        self.path = path
        self.rank = rank
        self.partner = partner
        self._writer: SafetensorsWriter | None = None
        self._waiting: dict[int, list[tuple[Path, torch.Tensor]]] = {}
        """The tensors still waiting for their bytes, by the storage they view."""
        self._failure: BaseException | None = None
        self._stack: AsyncExitStack | None = None
        """Inside ``async with``: holds the entered writer, which ``_begin`` then uses."""
        self._entered: SafetensorsWriter | None = None

    async def __aenter__(self) -> ReplicaFile:
        if self._stack is not None or self._writer is not None:
            raise UsageError(f"{self.path}: this replica file was already entered or begun")
        stack = AsyncExitStack()
        # Made before the header is known: _begin gives it its metadata.
        self._entered = await stack.enter_async_context(SafetensorsWriter(self.path))
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack = self._stack, None
        self._entered = None
        self._waiting = {}
        if stack is not None:
            # The writer aborts unless committed (shielded), then its task group ends.
            await stack.__aexit__(exc_type, exc, tb)

    async def follow(self, progress: Progress) -> None:
        """Write what ``progress`` says has arrived; a failure is kept for :meth:`commit`."""
        if self._failure is not None:
            return  # the file is lost: let the exchange run to its end
        try:
            if isinstance(progress, ReplicaReady):
                await self._begin(progress.replica, progress.storages)
            elif isinstance(progress, Landed) and self._writer is not None:
                for index in progress.indices:
                    await self._write(self._waiting.pop(index, []))
        except Exception as error:  # noqa: BLE001 - raised by commit(), after the exchange
            self._failure = error

    async def commit(self) -> None:
        """Make the file durable and visible; raises :class:`~astage.ReplicationError`."""
        if self._failure is None and self._writer is not None:
            try:
                await self._writer.commit()
            except Exception as error:  # noqa: BLE001 - raised below, named
                self._failure = error
        if self._failure is not None:
            raise ReplicationError(
                f"rank {self.rank}: persisting the replica from partner rank "
                f"{self.partner} to {self.path} failed: {self._failure}"
            ) from self._failure

    async def abort(self) -> None:
        """Remove the temporary file, if one was begun; the last replica file stays."""
        writer, self._writer = self._writer, None
        self._waiting = {}
        if writer is not None:
            await writer.abort()

    async def _begin(self, replica: Any, storages: list[torch.Tensor]) -> None:
        # In a worker thread: over 20,000 small tensors this walk of the replica and the
        # sorting of its tensors by storage held the event loop for 330-550 ms, every call.
        plain, metadata, now, waiting = await anyio.to_thread.run_sync(
            self._plan, replica, storages
        )
        if self._entered is not None:
            self._writer = self._entered
            self._writer.metadata = metadata
        else:
            self._writer = SafetensorsWriter(self.path, metadata=metadata)
        await self._writer.begin(plain)
        self._waiting = waiting
        await self._write(now)

    def _plan(
        self, replica: Any, storages: list[torch.Tensor]
    ) -> tuple[Any, dict[str, str], list[tuple[Path, torch.Tensor]], dict[int, Any]]:
        """The file's state dict and metadata, the tensors with no bytes to wait for, and the
        others by the storage they view."""
        tensors: list[tuple[Path, torch.Tensor]] = []
        dtensors: dict[str, Any] = {}
        with gc_paused():  # as the exchange's decoding (see _transport)
            plain = _plain(replica, (), tensors, dtensors)
        sharded = dtensors.pop(_SHARDED, {})
        info = {"rank": self.rank, "partner": self.partner, "dtensors": dtensors}
        if sharded:
            info["sharded"] = sharded
        metadata = {"astage.replica": json.dumps(info)}
        index = {storage.untyped_storage().data_ptr(): i for i, storage in enumerate(storages)}
        now: list[tuple[Path, torch.Tensor]] = []
        waiting: dict[int, list[tuple[Path, torch.Tensor]]] = {}
        for where, tensor in tensors:
            ptr = tensor.untyped_storage().data_ptr()
            if tensor.untyped_storage().nbytes() == 0 or ptr not in index:
                now.append((where, tensor))  # no bytes to wait for
            else:
                waiting.setdefault(index[ptr], []).append((where, tensor))
        return plain, metadata, now, waiting

    async def _write(self, items: list[tuple[Path, torch.Tensor]]) -> None:
        """Write (or queue) ``items``, handing the event loop back every turn: a write queued
        for the writer's threads awaits nothing, and one message may bring thousands."""
        assert self._writer is not None
        turn_ends = time.perf_counter() + _TURN_S
        for where, tensor in items:
            if time.perf_counter() > turn_ends:
                await anyio.lowlevel.checkpoint()
                turn_ends = time.perf_counter() + _TURN_S
            await self._writer.write(where, tensor)


_TURN_S = StagingOptions.max_loop_hold_s
"""How long :meth:`ReplicaFile._write` keeps the loop: a stager's default turn."""

_SHARDED = "\0sharded"
"""The key under which :func:`_plain` collects ShardedTensors' specs (no path looks like it)."""


def _plain(
    x: Any, path: Path, tensors: list[tuple[Path, torch.Tensor]], dtensors: dict[str, Any]
) -> Any:
    """``x`` with every DTensor replaced by its local shard and every ShardedTensor by the
    list of its local shards (what a checkpoint file can hold); their specs go to
    ``dtensors`` (ShardedTensors' under ``_SHARDED``).
    """
    if is_dtensor(x):  # never imports torch.distributed.tensor: ~1 s, on the event loop
        spec = dtensor_spec(x)
        dtensors[format_path(path)] = {
            "placements": [placement_to_json(p, path) for p in spec.placements],
            "shape": list(x.shape),
            "stride": list(x.stride()),
            "mesh": list(mesh_key(spec.mesh)),
        }
        local = dtensor_local(x)
        tensors.append((path, local))
        return local
    if is_sharded_tensor(x):
        metadata = x.metadata()  # type: ignore[attr-defined]
        dtensors.setdefault(_SHARDED, {})[format_path(path)] = {
            "size": list(metadata.size),
            "shards": [
                {
                    "offsets": list(shard.metadata.shard_offsets),
                    "sizes": list(shard.metadata.shard_sizes),
                }
                for shard in x.local_shards()  # type: ignore[attr-defined]
            ],
        }
        shards = [shard.tensor for shard in x.local_shards()]  # type: ignore[attr-defined]
        for i, tensor in enumerate(shards):
            tensors.append(((*path, i), tensor))
        return shards
    if isinstance(x, torch.Tensor):
        plain = x.detach() if type(x) is torch.nn.Parameter else x
        tensors.append((path, plain))
        return plain
    cls = type(x)
    if cls is list or cls is tuple:
        return cls(_plain(v, (*path, i), tensors, dtensors) for i, v in enumerate(x))
    if cls is dict or cls is OrderedDict:
        mapping = cls((k, _plain(v, (*path, k), tensors, dtensors)) for k, v in x.items())
        metadata = getattr(x, "_metadata", None)
        if cls is OrderedDict and metadata is not None:
            # A module state dict's version info: the replica carries it (the wire does), and
            # the file keeps it as astage.save's files do.
            mapping._metadata = metadata  # type: ignore[attr-defined]
        return mapping
    return x
