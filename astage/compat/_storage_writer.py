"""astage as DCP's ``StorageWriter``: :class:`FileSystemWriter` (the format: :mod:`._storage`).

Each rank's items go into its data file(s) with positioned vectored writes from a small thread
pool, under temporary names, fsynced and renamed; the ``.metadata`` file is committed last. When
``dcp.async_save`` stages through the writer, staged tensors are written as they land
(:class:`_Prewrite`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import functools
import io
import math
import os
import pickle
import secrets
import threading
from bisect import bisect_right
from collections.abc import Callable, Sequence
from concurrent.futures import Future as _PoolFuture
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import (
    FileSystemReader as _DcpFileSystemReader,
)
from torch.distributed.checkpoint.filesystem import (
    SerializationFormat,
    _StorageInfo,
    _StoragePrefix,
)
from torch.distributed.checkpoint.metadata import (
    Metadata,
    StorageMeta,
)
from torch.distributed.checkpoint.planner import (
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.distributed.tensor import DTensor
from torch.futures import Future

from .. import _torch
from .._core._run import Run
from .._drivers._sync import SyncStager, _Enqueued
from .._errors import (
    CheckpointWriteError,
    InvalidOptionsError,
)
from .._files._writer import (
    _IOV_MAX,
    fsync_folder,
    positive_int,
    pwritev_all,
    start_writeback,
    temp_name,
)
from ._blocking import BlockingAsyncStager
from ._saves import COMMIT_LOCK, Save, ThreadSaves, remove_unreferenced
from ._storage import (
    DATA_SUFFIX,
    DEFAULT_CHUNK_BYTES,
    DEFAULT_THREADS,
    MAX_OPEN_FILES,
    METADATA_NAME,
    RAW_DESCRIPTOR,
    boolean,
    bytes_of,
    folder_path,
    holds_plain_bytes,
    run_all,
    wait_all,
)


class FileSystemWriter(StorageWriter, AsyncStager):
    """Drop-in for ``torch.distributed.checkpoint.FileSystemWriter`` (see the module docstring).

    Like DCP's, it is also the stager ``dcp.async_save`` uses when given no ``async_stager``:
    :meth:`stage` copies the state dict to host memory with astage's blocking stager and,
    as each tensor lands, starts writing it into this rank's data file, so that writing
    overlaps staging; ``write_data`` then writes only what is not there yet. With
    ``cache_staged_state_dict=True`` the buffers are kept across saves
    (:class:`astage.compat.BlockingAsyncStager`) and writing starts in ``write_data``. Call
    :meth:`close` after the last save (it also removes the early file of a save that failed
    before ``write_data``).

    ``path``, ``single_file_per_rank``, ``sync_files`` and ``overwrite`` mean what they mean in
    DCP. ``thread_count`` is the number of threads that write this rank's bytes (DCP's means
    files per rank; here one file per rank is written by all threads at once).
    ``per_thread_copy_ahead`` means what it means in DCP: ``write_data`` resolves items (for
    ``dcp.save`` of device tensors, copies them to the host) one at a time while the earlier
    ones are written, at most ``thread_count * per_thread_copy_ahead`` bytes ahead (and one
    item, whatever its size). ``_extensions`` and a
    ``serialization_format`` other than DCP's default are refused: items are raw bytes.
    ``sync_files=False`` skips every fsync: faster, and not durable.
    ``write_while_staging=False`` writes nothing before ``write_data`` (see :meth:`stage`).
    """

    def __init__(  # noqa: PLR0917 - DCP's constructor, positional arguments included
        self,
        path: str | os.PathLike[str],
        single_file_per_rank: bool = True,
        sync_files: bool = True,
        thread_count: int = DEFAULT_THREADS,
        per_thread_copy_ahead: int = 10_000_000,
        cache_staged_state_dict: bool = False,
        overwrite: bool = True,
        _extensions: Sequence[Any] | None = None,
        serialization_format: SerializationFormat = SerializationFormat.TORCH_SAVE,
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        write_while_staging: bool = True,
    ) -> None:
        super().__init__()
        if _extensions:
            raise InvalidOptionsError(
                "astage.compat.FileSystemWriter does not take _extensions: items are raw bytes"
            )
        if serialization_format != SerializationFormat.TORCH_SAVE:
            raise InvalidOptionsError(
                f"astage.compat.FileSystemWriter writes raw tensor bytes; serialization_format="
                f"{serialization_format} is not supported"
            )
        self.path = folder_path("path", path)
        self.single_file_per_rank = boolean("single_file_per_rank", single_file_per_rank)
        self.sync_files = boolean("sync_files", sync_files)
        self.thread_count = positive_int("thread_count", thread_count)
        self.chunk_bytes = positive_int("chunk_bytes", chunk_bytes)
        if (
            isinstance(per_thread_copy_ahead, bool)
            or not isinstance(per_thread_copy_ahead, int)
            or per_thread_copy_ahead < 0
        ):
            raise InvalidOptionsError(
                f"per_thread_copy_ahead must be an integer of at least 0, got "
                f"{per_thread_copy_ahead!r}"
            )
        self.per_thread_copy_ahead = per_thread_copy_ahead
        self.overwrite = boolean("overwrite", overwrite)
        self.save_id = secrets.token_hex(8)
        self.rank: int | None = None
        self.is_coordinator = False
        self.use_collectives = True
        self.cache_staged_state_dict = boolean("cache_staged_state_dict", cache_staged_state_dict)
        self.write_while_staging = boolean("write_while_staging", write_while_staging)
        self._stager: BlockingAsyncStager | None = None  # cached staging, made on first use
        self._landing: _LandingStager | None = None  # uncached staging, made on first use
        self._prewrite: _Prewrite | None = None  # the data file stage() started writing
        self._prewrite_lock = threading.Lock()  # stage() and write_data() run in two threads
        self._thread = ThreadSaves()  # each save's own state (see Save)

    # -- DCP's AsyncStager protocol -------------------------------------------------------------

    _synchronize_after_execute: bool = False

    def stage(self, state_dict: Any) -> Any:
        """A host copy of ``state_dict``, complete when it returns (``dcp.async_save`` calls it).

        Without ``cache_staged_state_dict`` (and with ``single_file_per_rank``), writing starts
        here: each tensor's bytes go to this rank's data file (under a temporary name) from the
        writer's threads as soon as they have landed, and go on after this returns;
        :meth:`write_data` then maps the plan onto them (see :class:`_Prewrite`).
        """
        if self.cache_staged_state_dict:
            # The snapshot pool guards buffers an earlier upload still reads; a pre-write
            # would need the same guard, so cached staging writes in write_data, as before.
            if self._stager is None:
                self._stager = BlockingAsyncStager(cache_staged_state_dict=True)
            return self._stager.stage(state_dict)
        self._drop_prewrite()  # an earlier save's that never reached write_data (it failed)
        prewrite = self._start_prewrite()
        if self._landing is None:
            self._landing = _LandingStager()
        try:
            staged = self._landing.stage_and_hand_out(
                state_dict, None if prewrite is None else prewrite.add
            )
        except BaseException:
            if prewrite is not None:
                prewrite.discard()
            raise
        finally:
            self._landing.clear_cache()  # nothing cached: the result owns its memory alone
        with self._prewrite_lock:
            self._prewrite = prewrite
        return staged

    def synchronize_staging(self) -> None:
        """A no-op: staging is complete when :meth:`stage` returns."""

    def close(self) -> None:
        """Release the staging buffers (kept with ``cache_staged_state_dict=True``) and remove a
        pre-written file no save has used."""
        self._drop_prewrite()
        stager, self._stager = self._stager, None
        if stager is not None:
            stager.close()
        landing, self._landing = self._landing, None
        if landing is not None:
            landing.close()

    def __getstate__(self) -> dict[str, Any]:
        # DCP's PROCESS executor pickles the writer into its upload process, which only writes:
        # it writes every item itself, so this process's pre-written file would only be left
        # behind (pickling happens after stage(), in this process).
        self._drop_prewrite()
        state = self.__dict__.copy()
        state["_stager"] = None
        state["_landing"] = None
        state["_prewrite"] = None
        state["_prewrite_lock"] = None
        state["_thread"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._prewrite_lock = threading.Lock()
        self._thread = ThreadSaves()

    def _start_prewrite(self) -> _Prewrite | None:
        if not (self.single_file_per_rank and self.write_while_staging):
            return None  # asked not to, or one file per item (no shared early file to fill)
        try:
            created = not os.path.isdir(self.path)
            os.makedirs(self.path, exist_ok=True)
            return _Prewrite(
                self.path, self.thread_count, self.chunk_bytes, created, self.sync_files
            )
        except OSError:
            return None  # the save reports the folder's problem itself, from prepare_local_plan

    def _take_prewrite(self) -> _Prewrite | None:
        with self._prewrite_lock:
            prewrite, self._prewrite = self._prewrite, None
        return prewrite

    def _drop_prewrite(self) -> None:
        prewrite = self._take_prewrite()
        if prewrite is not None:
            prewrite.discard()

    # -- DCP's StorageWriter protocol -----------------------------------------------------------

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id:
            self.path = folder_path("checkpoint_id", checkpoint_id)
        self.save_id = secrets.token_hex(8)
        # The save that follows in this thread goes to this folder, whatever another thread's
        # save (an overlapping async_save) resets the writer to meanwhile.
        self._thread.reset_path = self.path

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        # Every save starts here, reset() or not (DCP calls reset() only when given a
        # checkpoint_id): a writer reused for saves into its folder must not name its data
        # files as the committed checkpoint it replaces does, or it overwrites them in place.
        path, self._thread.reset_path = self._thread.reset_path or self.path, None
        save = Save(
            path=path,
            save_id=secrets.token_hex(8),
            is_coordinator=is_coordinator,
            rank=kwargs.get("rank"),
            use_collectives=kwargs.get("use_collectives", True),
        )
        self._thread.save = save
        save.begin()
        # The writer's attributes show the latest save, as DCP's do; the save reads its own.
        self.save_id, self.is_coordinator = save.save_id, save.is_coordinator
        self.rank, self.use_collectives = save.rank, save.use_collectives

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        save = self._save()
        try:
            os.makedirs(save.path, exist_ok=True)
        except OSError as error:  # a file in its place, or on its path; no permission
            self._drop_prewrite()
            raise _write_error(save.path, "cannot make the checkpoint folder", error) from error
        if os.path.exists(save.metadata_path()) and not self.overwrite:
            self._drop_prewrite()  # this save ends here: its early file must not stay behind
            raise CheckpointWriteError(
                f"{save.path}: a checkpoint is already there and overwrite=False"
            )
        if save.rank is not None and not save.use_collectives:
            plan = dataclasses.replace(plan, storage_data=_StoragePrefix(save.prefix(save.rank)))
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        save = self._save()
        return [
            plan
            if plan.storage_data is not None
            else dataclasses.replace(plan, storage_data=_StoragePrefix(save.prefix(rank)))
            for rank, plan in enumerate(plans)
        ]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        save = self._save()
        folder = save.path
        planned: _StoragePrefix = plan.storage_data
        file_count = 1 if self.single_file_per_rank else max(1, len(plan.items))
        prefix = save.claim(planned.prefix, file_count)
        prewrite = self._take_prewrite()
        if prewrite is not None and not (
            self.single_file_per_rank and _same_file_system(prewrite.folder, folder)
        ):  # reset() moved the save to another file system after stage(): write it all here
            prewrite.discard()
            prewrite = None
        if prewrite is not None:
            name = f"{prefix}0{DATA_SUFFIX}"
            results = prewrite.commit(plan.items, planner, folder, name, sync=self.sync_files)
        else:
            items = [_Planned.of(item, planner) for item in plan.items]
            groups = [items] if self.single_file_per_rank else [[item] for item in items]
            files = [
                _DataFile(folder, f"{prefix}{number}{DATA_SUFFIX}", group)
                for number, group in enumerate(groups)
                if group or number == 0
            ]
            _write_files(
                files,
                planner,
                _Runs(
                    self.chunk_bytes,
                    self.per_thread_copy_ahead * self.thread_count,
                    writeback=self.sync_files,
                ),
                threads=self.thread_count,
                sync=self.sync_files,
                folder=folder,
            )
            results = [result for file in files for result in file.results()]
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        save = self._save()
        try:
            self._commit(save, metadata, results)
        finally:
            save.end()

    def _commit(self, save: Save, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Write the metadata under a temporary name, then, one commit in the process at a
        time: rename it into place and remove the files it replaced. One at a time, so the
        metadata a commit removes files by is still the folder's when it does; the other
        saves into the folder that have not committed yet are running, and keep theirs."""
        metadata.version = "1.0.0"  # DCP's CURRENT_DCP_VERSION: its reader expects it
        metadata.storage_data = {wr.index: wr.storage_data for rs in results for wr in rs}
        metadata.storage_meta = StorageMeta(checkpoint_id=save.path, save_id=save.save_id)
        final = save.metadata_path()
        temp = _temp_name(final)
        try:
            with open(temp, "xb") as stream:
                pickle.dump(metadata, stream)  # DCP's metadata format: DCP's own reader reads it
                stream.flush()
                if self.sync_files:
                    os.fsync(stream.fileno())
        except BaseException as error:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            if isinstance(error, OSError):
                raise _write_error(final, "cannot commit", error) from error
            raise
        with COMMIT_LOCK:
            try:
                os.replace(temp, final)  # atomic: the old .metadata or the new one, never neither
            except OSError as error:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
                raise _write_error(final, "cannot commit", error) from error
            if self.sync_files:
                _fsync_folder(save.path)
            self._remove_replaced(save, metadata)

    @staticmethod
    def _remove_replaced(save: Save, metadata: Metadata) -> None:
        if save.use_collectives:
            remove_unreferenced(save, metadata.storage_data.values())
        elif save.rank is not None and not os.path.exists(os.path.join(save.path, METADATA_NAME)):
            # Without collectives each rank commits a metadata file of its own, naming only its
            # own data files: it removes its replaced ones (they piled up, one per save), and
            # never another rank's. Not beside a global .metadata: that one (which DCP loads
            # first) may name this rank's older files too.
            remove_unreferenced(save, metadata.storage_data.values(), f"__{save.rank}_")

    def storage_meta(self) -> StorageMeta | None:
        # DCP asks before set_up_storage_writer: the folder reset() chose for this thread's save.
        reset_path = self._thread.reset_path
        if reset_path is not None:
            return StorageMeta(checkpoint_id=reset_path, save_id=self.save_id)
        save = self._save()
        return StorageMeta(checkpoint_id=save.path, save_id=save.save_id)

    @property
    def checkpoint_id(self) -> str:
        """The folder this writer saves into (in this thread: the save it runs, if any)."""
        return self._thread.reset_path or self._save().path

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return _DcpFileSystemReader.validate_checkpoint_id(checkpoint_id)

    # -- helpers --------------------------------------------------------------------------------

    def _save(self) -> Save:
        """The save this thread runs: DCP makes every call of a save in one thread (the caller's
        for ``dcp.save``, the save's own upload thread for ``dcp.async_save``), and two async
        saves with one writer run at once. Outside a save, the writer's own state."""
        save = self._thread.save
        if save is None:
            save = Save(
                self.path, self.save_id, self.is_coordinator, self.rank, self.use_collectives
            )
        return save


# -- writing --------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Payload:
    """One write item's bytes, resolved from the planner (``keep`` keeps them alive)."""

    item: WriteItem
    data: memoryview
    keep: Any
    is_bytes: bool

    @classmethod
    def resolve(cls, item: WriteItem, planner: SavePlanner) -> _Payload:
        data = planner.resolve_data(item)
        if item.type == WriteItemType.BYTE_IO:
            if not isinstance(data, io.BytesIO):
                raise CheckpointWriteError(
                    f"{item.index.fqn}: a bytes item resolved to {type(data)}"
                )
            return cls(item, data.getbuffer(), data, True)
        if not isinstance(data, torch.Tensor):
            raise CheckpointWriteError(f"{item.index.fqn}: a tensor item resolved to {type(data)}")
        tensor = data.detach()
        shortfall = _torch.storage_shortfall(tensor)
        if shortfall is not None:  # pwritev would read past the storage's end
            raise CheckpointWriteError(f"{item.index.fqn}: the tensor {shortfall}")
        # The file holds raw bytes of the plan's dtype and chunk shape, the metadata's. A
        # planner may hand over another dtype (saving in lower precision): DCP stores that and
        # its load copies it back into the destination; converted below, the load gives the
        # same values.
        planned = item.tensor_data
        if planned is not None and list(tensor.shape) != list(planned.chunk.sizes):
            raise CheckpointWriteError(
                f"{item.index.fqn}: the planner handed over a tensor of shape "
                f"{list(tensor.shape)} where its plan has {list(planned.chunk.sizes)}"
            )
        try:
            if planned is not None and tensor.dtype != planned.properties.dtype:
                tensor = tensor.to(planned.properties.dtype)
            if tensor.device.type != "cpu":
                tensor = tensor.cpu()  # dcp.save (not async): the planner hands device tensors
            # A conjugated or negated view keeps its bit and the plain values in memory: the
            # bytes to store are the values it stands for (both no-ops for a plain tensor).
            tensor = tensor.resolve_conj().resolve_neg()
            tensor = tensor.contiguous()  # a no-op for the staged tensors of async_save
        except (RuntimeError, NotImplementedError) as error:
            # What torch cannot convert or copy (a strided view of bytes viewed as a quantized
            # dtype: "Quantized copy only works with kFloat"), named, not torch's bare words.
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise CheckpointWriteError(
                f"{item.index.fqn}: cannot store the values of this {tensor.dtype} tensor: {reason}"
            ) from error
        return cls(item, bytes_of(tensor), tensor, False)


@dataclasses.dataclass
class _Planned:
    """One item of this rank's plan, its size known before its bytes are resolved: from the
    plan for a tensor (so that ``dcp.save`` resolves, that is copies off the device, one at a
    time while the others are written), from the resolved bytes for a bytes item."""

    item: WriteItem
    nbytes: int
    payload: _Payload | None = None  # resolved already: a bytes item, or a tensor of no plan

    @classmethod
    def of(cls, item: WriteItem, planner: SavePlanner) -> _Planned:
        data = item.tensor_data
        if item.type != WriteItemType.BYTE_IO and data is not None:
            element = torch.empty((), dtype=data.properties.dtype).element_size()
            return cls(item, math.prod(data.chunk.sizes) * element)
        payload = _Payload.resolve(item, planner)
        return cls(item, len(payload.data), payload)

    def resolve(self, planner: SavePlanner) -> _Payload:
        """The item's bytes (handed over once: this object keeps no reference to them)."""
        payload, self.payload = self.payload, None
        if payload is None:
            payload = _Payload.resolve(self.item, planner)
            if len(payload.data) != self.nbytes:
                raise CheckpointWriteError(
                    f"{self.item.index.fqn}: the planner resolved {len(payload.data)} bytes "
                    f"where its plan has {self.nbytes}"
                )
        return payload


class _DataFile:
    """One data file of this rank: its items laid end to end, written under a temporary name."""

    def __init__(self, folder: str, name: str, items: list[_Planned]) -> None:
        self.name = name
        self.path = os.path.join(folder, name)
        self.temp_path = _temp_name(self.path)
        self.items = items
        self.offsets: list[int] = []
        size = 0
        for item in items:
            self.offsets.append(size)
            size += item.nbytes
        self.size = size
        self.fd: int | None = None

    def results(self) -> list[WriteResult]:
        return [
            WriteResult(
                index=planned.item.index,
                size_in_bytes=planned.nbytes,
                storage_data=_StorageInfo(
                    self.name,
                    offset,
                    planned.nbytes,
                    None if planned.item.type == WriteItemType.BYTE_IO else [RAW_DESCRIPTOR],
                ),
            )
            for planned, offset in zip(self.items, self.offsets, strict=True)
        ]


class _Runs:
    """Gathers resolved items into runs for one ``pwritev`` each and submits them to a pool,
    keeping each item alive until its run is written, and no more than ``ahead_bytes`` of
    them resolved and not yet written (one item, whatever its size, always goes through).

    A run holds at most ``chunk_bytes`` and ``_IOV_MAX`` buffers: small neighbours go
    together (a run of more buffers than one pwritev takes was written in a time that grew
    with the square of their number, and by one thread)."""

    def __init__(self, chunk_bytes: int, ahead_bytes: int, *, writeback: bool) -> None:
        self._chunk_bytes = chunk_bytes
        self._ahead_bytes = ahead_bytes
        self._writeback = writeback  # start each run's writeback at once (sync_files)
        self._pool: ThreadPoolExecutor | None = None
        self._submitted: collections.deque[tuple[_PoolFuture[None], int, list[_Payload]]] = (
            collections.deque()
        )
        self._submitted_bytes = 0
        self._fd = -1
        self._start = 0
        self._buffers: list[memoryview] = []
        self._bytes = 0
        self._payloads: list[_Payload] = []

    def start(self, pool: ThreadPoolExecutor) -> None:
        self._pool = pool

    def add(self, fd: int, offset: int, payload: _Payload) -> None:
        """Queue ``payload``'s bytes for ``offset`` in ``fd``; wait for earlier runs to be
        written while more than ``ahead_bytes`` are pending."""
        data = payload.data
        if self._buffers and (fd != self._fd or offset != self._start + self._bytes):
            self.flush()
        done = 0
        while done < len(data):
            if not self._buffers:
                self._fd, self._start = fd, offset + done
            take = min(len(data) - done, self._chunk_bytes - self._bytes)
            self._buffers.append(data[done : done + take])
            self._payloads.append(payload)
            self._bytes += take
            done += take
            if self._bytes >= self._chunk_bytes or len(self._buffers) >= _IOV_MAX:
                self.flush()
        if self._submitted_bytes + self._bytes > self._ahead_bytes:
            self.flush()
            while self._submitted and self._submitted_bytes > self._ahead_bytes:
                future, nbytes, _ = self._submitted.popleft()
                future.result()  # raises a failed write's error
                self._submitted_bytes -= nbytes

    def flush(self) -> None:
        """Submit the run gathered so far."""
        if not self._buffers:
            return
        assert self._pool is not None
        future = self._pool.submit(
            _write_piece, self._fd, self._buffers, self._start, self._writeback
        )
        self._submitted.append((future, self._bytes, self._payloads))
        self._submitted_bytes += self._bytes
        self._buffers, self._bytes, self._payloads = [], 0, []

    def finish(self) -> None:
        """Submit the last run and wait for every one; on a failure cancel those that have not
        started, wait for those that have, and raise it."""
        self.flush()
        submitted, self._submitted = self._submitted, collections.deque()
        self._submitted_bytes = 0
        wait_all([future for future, _, _ in submitted])

    def cancel(self) -> None:
        """Cancel the runs that have not started (the pool's shutdown waits for the others)."""
        for future, _, _ in self._submitted:
            future.cancel()
        self._submitted.clear()
        self._buffers, self._bytes, self._payloads = [], 0, []


class _LandingStager(SyncStager):
    """A :class:`~astage.SyncStager` that hands each top-level tensor of the state dict to a
    callback as soon as its bytes have landed, while the other copies go on.

    The blocking face has no ``stage_iter``: this is its copy loop with the landed tensors
    handed out between batches (the async face's ``stage_iter`` does the same from an event
    loop, which DCP's synchronous ``stage()`` does not have). The callback runs in the calling
    thread and must be quick: the writer's only submits writes to its threads.
    """

    def __init__(self) -> None:
        super().__init__(pin_memory=False)  # a one-off host copy: pinning costs, gains nothing
        self._on_landed: Callable[[torch.Tensor], None] | None = None

    def stage_and_hand_out(
        self, state_dict: Any, on_landed: Callable[[torch.Tensor], None] | None
    ) -> Any:
        """``stage(state_dict)``, calling ``on_landed(tensor)`` for each staged tensor."""
        self._on_landed = on_landed
        try:
            return self.stage(state_dict)
        finally:
            self._on_landed = None

    def _new_run(self, state_dict: Any, buffer_set: Any, *, track_leaves: bool) -> Run[Any]:
        return super()._new_run(state_dict, buffer_set, track_leaves=self._on_landed is not None)

    def _landed(self, run: Run[_Enqueued]) -> None:
        if self._on_landed is not None:
            self._hand_out(run)

    def _hand_out(self, run: Run[_Enqueued]) -> None:
        assert self._on_landed is not None
        while leaves := run.landed_leaves():  # handed out a part at a time
            for leaf in leaves:
                self._on_landed(leaf.tensor)


class _Prewrite:
    """This rank's data file, filled while staging runs, committed by ``write_data``.

    :meth:`add` is given each staged tensor as it lands and queues its bytes, end to end, on
    the writer's threads (a temporary file; no name is known before DCP's plan). :meth:`commit`
    resolves every item of the plan through the planner and reuses pre-written bytes only when
    the item's tensor *is* them: a contiguous CPU tensor whose memory lies inside a staged
    tensor's, which this object keeps alive (so no other tensor can have that address). Any
    other item (bytes, a planner's transformed copy, a tensor not staged here, a non-contiguous
    one) is appended and written then, so the metadata never points at another tensor's bytes.
    Then the usual end: fsync, rename to the plan's name, fsync the folder.
    """

    def __init__(
        self, folder: str, threads: int, chunk_bytes: int, created: bool, writeback: bool = True
    ) -> None:
        self.folder = folder
        self._writeback = writeback  # start each piece's writeback at once (sync_files)
        self._created = created  # made the folder: discard() removes it again if empty
        self.temp_path = _temp_name(os.path.join(folder, f"prewrite{DATA_SUFFIX}"))
        self._chunk_bytes = chunk_bytes
        self._fd: int | None = os.open(
            self.temp_path,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
            0o644,
        )
        self._pool = ThreadPoolExecutor(threads, "astage-dcp-writer")
        self._writes: list[_PoolFuture[None]] = []
        self._ranges: dict[tuple[int, int], int] = {}  # (address, nbytes) -> file offset
        self._keep: list[torch.Tensor] = []  # the staged tensors: their addresses stay theirs
        self._sorted: list[tuple[int, int, int]] | None = None  # (address, nbytes, offset)
        self.end = 0  # bytes laid out so far
        self.reused = 0  # the plan's items found pre-written (commit() counts them)

    def add(self, staged: torch.Tensor) -> None:
        """Queue the bytes of a staged tensor (a DTensor's local shard), if plainly laid out."""
        tensor = _torch.dtensor_local(staged) if isinstance(staged, DTensor) else staged
        if type(tensor) is not torch.Tensor or not holds_plain_bytes(tensor) or tensor.numel() == 0:
            return  # written by commit() if the plan wants it
        key = (tensor.data_ptr(), tensor.numel() * tensor.element_size())
        if key in self._ranges:
            return  # the same bytes at a second path
        self._ranges[key] = self.end
        self._keep.append(tensor)
        self._queue(self.end, bytes_of(tensor))
        self.end += key[1]

    def _queue(self, offset: int, data: memoryview) -> None:
        fd = self._fd
        assert fd is not None
        for done in range(0, len(data), self._chunk_bytes):
            piece = data[done : done + self._chunk_bytes]
            self._writes.append(
                self._pool.submit(_write_piece, fd, [piece], offset + done, self._writeback)
            )

    def _find(self, tensor: torch.Tensor) -> int | None:
        """The file offset of ``tensor``'s bytes if they were pre-written, else None."""
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes == 0 or not holds_plain_bytes(tensor):
            return None
        address = tensor.data_ptr()
        exact = self._ranges.get((address, nbytes))
        if exact is not None:
            return exact
        # A view inside a staged tensor (a narrowed shard): its bytes are a run of that one's.
        if self._sorted is None:
            self._sorted = sorted((a, n, offset) for (a, n), offset in self._ranges.items())
        starts = self._sorted
        at = bisect_right(starts, (address, float("inf"), 0)) - 1
        if at >= 0:
            start, length, offset = starts[at]
            if start <= address and address + nbytes <= start + length:
                return offset + (address - start)
        return None

    def commit(
        self, items: list[WriteItem], planner: SavePlanner, folder: str, name: str, *, sync: bool
    ) -> list[WriteResult]:
        """Write what the plan needs beyond the pre-written bytes, make the file durable as
        ``folder/name`` (``folder`` on this file's file system: a save that ``reset()`` moved
        after staging), and return the plan's storage records; on any failure nothing is
        left."""
        path = os.path.join(folder, name)
        try:
            results: list[WriteResult] = []
            appended: list[_Payload] = []
            for item in items:
                payload = _Payload.resolve(item, planner)
                offset = None if payload.is_bytes else self._find(payload.keep)
                if offset is not None:
                    self.reused += 1
                else:
                    offset = self.end
                    self.end += len(payload.data)
                    appended.append(payload)
                    self._queue(offset, payload.data)
                results.append(
                    WriteResult(
                        index=item.index,
                        size_in_bytes=len(payload.data),
                        storage_data=_StorageInfo(
                            name,
                            offset,
                            len(payload.data),
                            None if payload.is_bytes else [RAW_DESCRIPTOR],
                        ),
                    )
                )
            wait_all(self._writes)
            fd = self._fd
            assert fd is not None
            if sync:
                os.fsync(fd)
            self._fd = None
            os.close(fd)
            os.replace(self.temp_path, path)
        except OSError as error:
            self.discard()
            raise _write_error(folder, "cannot write the data files in", error) from error
        except BaseException:
            self.discard()
            raise
        finally:
            self._pool.shutdown(wait=True)
            self._keep.clear()
        if sync:
            _fsync_folder(folder)
        if self._created and os.path.realpath(folder) != os.path.realpath(self.folder):
            with contextlib.suppress(OSError):  # made for the early file, which moved out
                os.rmdir(self.folder)
        return results

    def discard(self) -> None:
        """Stop writing and remove the file: no thread is left using its descriptor."""
        for write in self._writes:
            write.cancel()
        self._pool.shutdown(wait=True)
        fd, self._fd = self._fd, None
        _close_and_remove(fd, self.temp_path)
        if self._created:
            with contextlib.suppress(OSError):  # only if empty: the save may have used it
                os.rmdir(self.folder)
        self._keep.clear()


def _same_file_system(first: str, second: str) -> bool:
    """Whether a file in ``first`` can be renamed into ``second`` (one device)."""
    try:
        return os.stat(first).st_dev == os.stat(second).st_dev
    except OSError:
        return False


def _write_files(
    files: list[_DataFile],
    planner: SavePlanner,
    runs: _Runs,
    *,
    threads: int,
    sync: bool,
    folder: str,
) -> None:
    """Write, fsync and rename every file, or leave none of the temporary files behind.

    DCP calls ``write_data`` synchronously from its own thread (or a separate process) and waits
    on the result at once: there is no event loop to lend an anyio worker, so a plain
    ``concurrent.futures`` pool owned by this call is the fitting tool. It ends with the call:
    no thread outlives a save, and none is left using a descriptor once it is closed. The items
    are resolved one at a time, in this thread, while the pool writes the earlier ones.
    """
    try:
        # No posix_fallocate: on tmpfs and file systems without unwritten extents it zero-fills
        # the whole file first (a third of a save's time on tmpfs); a full disk still fails a
        # pwritev, and the files are removed then.
        with ThreadPoolExecutor(threads, "astage-dcp-writer") as pool:
            runs.start(pool)
            # A few files open at a time: one file per item (single_file_per_rank=False) may
            # mean more files than a process may hold open (EMFILE at 1,024 by default).
            for start in range(0, len(files), MAX_OPEN_FILES):
                _write_batch(files[start : start + MAX_OPEN_FILES], planner, runs, pool, sync)
        for file in files:
            os.replace(file.temp_path, file.path)
    except OSError as error:
        _discard(files)
        raise _write_error(folder, "cannot write the data files in", error) from error
    except BaseException:
        _discard(files)
        raise
    if sync:
        _fsync_folder(folder)


def _write_batch(
    files: list[_DataFile],
    planner: SavePlanner,
    runs: _Runs,
    pool: ThreadPoolExecutor,
    sync: bool,
) -> None:
    """Open, write, fsync and close ``files`` (still under their temporary names)."""
    for file in files:
        file.fd = os.open(
            file.temp_path,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
            0o644,
        )
    try:
        for file in files:
            assert file.fd is not None
            for planned, offset in zip(file.items, file.offsets, strict=True):
                runs.add(file.fd, offset, planned.resolve(planner))
            runs.flush()  # a run never spans two files
        runs.finish()
    except BaseException:
        runs.cancel()
        raise
    if sync:
        run_all(pool, [functools.partial(os.fsync, f.fd) for f in files if f.fd is not None])
    for file in files:
        fd, file.fd = file.fd, None
        assert fd is not None
        os.close(fd)


def _discard(files: list[_DataFile]) -> None:
    for file in files:
        fd, file.fd = file.fd, None
        _close_and_remove(fd, file.temp_path)


def _close_and_remove(fd: int | None, temp_path: str) -> None:
    """Close ``fd`` (where open) and remove the unfinished file, ignoring either's failure."""
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(temp_path)


def _write_piece(fd: int, buffers: list[memoryview], offset: int, writeback: bool) -> None:
    """Write a piece; with ``writeback``, have the kernel start sending it to the disk now."""
    pwritev_all(fd, buffers, offset)
    if writeback:
        start_writeback(fd, offset, sum(len(b) for b in buffers))


def _fsync_folder(folder: str) -> None:
    try:
        fsync_folder(folder)  # the file writer's: a filesystem without folder fsync is fine
    except OSError as error:
        raise _write_error(folder, "cannot fsync the folder", error) from error


def _temp_name(path: str) -> str:
    folder, name = os.path.split(path)
    return os.path.join(folder, temp_name(name))


def _write_error(path: str, doing: str, error: OSError) -> CheckpointWriteError:
    reason = error.strerror or str(error)
    code = errno.errorcode.get(error.errno, "") if error.errno is not None else ""
    return CheckpointWriteError(f"{doing} {path}: {reason}" + (f" ({code})" if code else ""))
