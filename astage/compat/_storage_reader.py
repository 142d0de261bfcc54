"""astage as DCP's ``StorageReader``: :class:`FileSystemReader` (the format: :mod:`._storage`).

Raw items are read straight into their destination; DCP's own checkpoints go through DCP's
reader. ``.metadata`` is unpickled with an allow-list of DCP's metadata classes, so a crafted
metadata file cannot run code.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import os
import pickle
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import torch
from torch.distributed.checkpoint.filesystem import (
    FileSystemReader as _DcpFileSystemReader,
)
from torch.distributed.checkpoint.filesystem import (
    _StorageInfo,
)
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
)
from torch.futures import Future

from .. import _torch
from .._errors import (
    AstageError,
    CheckpointFormatError,
    InvalidOptionsError,
)
from .._files._load import open_checked
from .._files._writer import positive_int
from ._storage import (
    DEFAULT_THREADS,
    MAX_OPEN_FILES,
    METADATA_NAME,
    RAW_DESCRIPTOR,
    boolean,
    bytes_of,
    folder_path,
    holds_plain_bytes,
    run_all,
)


class FileSystemReader(_DcpFileSystemReader):
    """Drop-in for ``torch.distributed.checkpoint.FileSystemReader``.

    Reads checkpoints of :class:`FileSystemWriter` (raw items, ``thread_count`` threads of
    positioned reads straight into the destination tensors) and DCP's own (through DCP's
    reader). ``.metadata`` is unpickled with an allow-list of DCP's metadata classes.

    Bytes items (the non-tensor values DCP pickles with ``torch.save``) reach the planner only
    once ``torch.load(weights_only=True)`` has read them: DCP's ``DefaultLoadPlanner`` unpickles
    them in full (``weights_only=False``), so a checkpoint's object could otherwise run any code
    it names. ``trust_pickled_bytes=True`` hands them over unchecked, for checkpoints you trust
    that hold objects of your own classes.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        _extension_registry: Any = None,
        *,
        thread_count: int = DEFAULT_THREADS,
        trust_pickled_bytes: bool = False,
    ) -> None:
        thread_count = positive_int("thread_count", thread_count)
        trust_pickled_bytes = boolean("trust_pickled_bytes", trust_pickled_bytes)
        if path != "":  # DCP's reader reads "" as the working directory: so does this one
            folder_path("path", path)
        super().__init__(path, _extension_registry)
        self.thread_count = thread_count
        self.trust_pickled_bytes = trust_pickled_bytes
        self._metadata: Metadata | None = None

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id:
            folder_path("checkpoint_id", checkpoint_id)
        super().reset(checkpoint_id)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        name = METADATA_NAME if rank is None else f"__{rank}{METADATA_NAME}"
        path = os.path.join(os.fspath(self.path), name)
        fd, size = open_checked(
            path, f"{path}: no checkpoint metadata (not a checkpoint, or one never committed)"
        )
        try:
            data = _pread_exact(fd, size, path)
        finally:
            os.close(fd)
        try:
            # Unpickled from memory: from the file, a length field gone wild made the unpickler
            # ask the file for that many bytes, which allocated them first (a MemoryError for
            # one flipped byte); from memory the read comes back short.
            metadata = _MetadataUnpickler(io.BytesIO(data), path).load()
        except CheckpointFormatError:
            raise
        except Exception as error:
            # A damaged stream fails in many ways (KeyError, OverflowError, MemoryError for a
            # length gone wild, RecursionError, ...): each is a format error here.
            raise CheckpointFormatError(
                f"{path}: not a DCP metadata file ({type(error).__name__}: {error})"
            ) from error
        if not isinstance(metadata, Metadata):
            raise CheckpointFormatError(f"{path}: holds a {type(metadata).__name__}, not Metadata")
        # The allow-list keeps code out, but any allowed object may sit in any field: checked
        # here, before DCP's planner and this reader use them (a list for a size made the
        # planner fail with an IndexError, a negative size made it skip the tensor silently).
        _check_metadata(metadata, path)
        storage_meta = metadata.storage_meta or StorageMeta()
        storage_meta.load_id = self.load_id
        metadata.storage_meta = storage_meta
        return metadata

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)
        self._metadata = metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        raw: list[ReadItem] = []
        foreign: list[ReadItem] = []
        for request in plan.items:
            info = self._info(request)
            (raw if RAW_DESCRIPTOR in (info.transform_descriptors or ()) else foreign).append(
                request
            )
        if not self.trust_pickled_bytes:
            planner = cast(LoadPlanner, _CheckedBytes(planner, os.fspath(self.path)))
        if foreign:  # a checkpoint of DCP's own writer: its items are torch.save pickles
            # DCP's reader opens and reads what the records say: its files are checked here
            # first (a FIFO would block its open forever, a device read on without end).
            self._check_items(foreign)
            self._read_foreign(plan, foreign, planner)
        if raw:
            self._read_raw(raw, planner)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _info(self, request: ReadItem) -> _StorageInfo:
        try:
            info = self.storage_data[request.storage_index]
        except KeyError:
            raise CheckpointFormatError(
                f"{self.path}: the metadata has no storage record for {request.storage_index.fqn}"
            ) from None
        # Checked again here: set_up_storage_reader may be given metadata this reader did not
        # read (under a process group, the coordinator's, broadcast).
        _check_record(
            info, f"the storage record of {request.storage_index.fqn!r}", os.fspath(self.path)
        )
        assert isinstance(info, _StorageInfo)
        return info

    def _read_raw(self, requests: list[ReadItem], planner: LoadPlanner) -> None:
        # A few files open at a time: a checkpoint of one file per item may hold more files
        # than a process may open (EMFILE at 1,024 by default). The requests keep their order.
        batch: list[ReadItem] = []
        files: set[str] = set()
        for request in requests:
            name = self._info(request).relative_path
            if name not in files and len(files) == MAX_OPEN_FILES:
                self._read_raw_batch(batch, planner)
                batch, files = [], set()
            batch.append(request)
            files.add(name)
        if batch:
            self._read_raw_batch(batch, planner)

    def _read_raw_batch(self, requests: list[ReadItem], planner: LoadPlanner) -> None:
        """Read ``requests`` in windows: a window's items are read on the pool at once, then
        handed to the planner in order, before the next window's host buffers are made. An item
        read straight into its destination needs none; the others (a destination on a device,
        of another dtype, a region of columns) hold at most ``_LANDING_BYTES`` of host buffers
        at once (and one item, whatever its size), as DCP's reader holds one item."""
        folder = os.fspath(self.path)
        fds: dict[str, tuple[int, int]] = {}  # relative path -> (fd, size)
        reads: list[tuple[int, int, memoryview, str]] = []  # (fd, offset, into, where)
        afterwards: list[Callable[[], None]] = []  # in order, in this thread: the planner's calls
        landing = 0  # bytes of host buffers the window holds
        try:
            with ThreadPoolExecutor(self.thread_count, "astage-dcp-reader") as pool:
                for request in requests:
                    info = self._info(request)
                    where = (
                        f"{os.path.join(folder, info.relative_path)} ({request.storage_index.fqn})"
                    )
                    fd = self._open_item(fds, folder, info, where)
                    if request.type == LoadItemType.BYTE_IO:
                        buffer = bytearray(info.length)
                        reads.append((fd, info.offset, memoryview(buffer), where))
                        afterwards.append(_load_bytes(planner, request, buffer))
                        landing += info.length
                    else:
                        commit, landed = self._plan_tensor(
                            request=request,
                            info=info,
                            fd=fd,
                            where=where,
                            reads=reads,
                            planner=planner,
                        )
                        afterwards.append(commit)
                        landing += landed
                    if landing >= _LANDING_BYTES:
                        _read_window(pool, reads, afterwards)
                        reads, afterwards, landing = [], [], 0
                _read_window(pool, reads, afterwards)
        finally:
            for fd, _ in fds.values():
                os.close(fd)

    def _read_foreign(self, plan: LoadPlan, requests: list[ReadItem], planner: Any) -> None:
        """Read items of DCP's own format through DCP's reader, so that a damaged one is a
        :class:`CheckpointFormatError` naming its file and item: DCP's reader let torch.load's
        RuntimeError (a damaged zip), a UnicodeDecodeError, an UnpicklingError or its own
        AssertionError (a stored tensor of another size) through.

        All in one call, as DCP reads them (a file opened once for all its items); only when
        that fails are they read again one at a time, to find the item to name. Reading an
        item twice is harmless: the same bytes reach the same destination.
        """
        try:
            super().read_data(dataclasses.replace(plan, items=requests), planner).wait()
        except AstageError:
            raise  # the bytes check's refusal, or an error of a planner of astage's
        except _FOREIGN_ERRORS as error:
            for request in requests:
                try:
                    super().read_data(dataclasses.replace(plan, items=[request]), planner).wait()
                except AstageError:
                    raise
                except _FOREIGN_ERRORS as item_error:
                    raise self._unreadable(request, item_error) from item_error
            # Every item read alone: name the files, since no one item could be.
            raise CheckpointFormatError(
                f"{os.fspath(self.path)}: DCP's reader cannot read the checkpoint's items "
                f"({_reason(error)})"
            ) from error

    def _unreadable(self, request: ReadItem, error: BaseException) -> CheckpointFormatError:
        info = self._info(request)
        where = f"{os.path.join(os.fspath(self.path), info.relative_path)}"
        return CheckpointFormatError(
            f"{where} ({request.storage_index.fqn}): DCP's reader cannot read the item "
            f"({_reason(error)})"
        )

    def _check_items(self, requests: list[ReadItem]) -> None:
        """Check that each item lies inside a regular data file of the folder (DCP's format)."""
        folder = os.fspath(self.path)
        sizes: dict[str, int] = {}  # each file opened once, and closed at once (EMFILE)
        for request in requests:
            info = self._info(request)
            where = f"{os.path.join(folder, info.relative_path)} ({request.storage_index.fqn})"
            if info.relative_path not in sizes:
                path = os.path.join(folder, info.relative_path)
                fd, sizes[info.relative_path] = open_checked(path, f"{path}: data file missing")
                os.close(fd)
            _check_inside(info, sizes[info.relative_path], where)

    def _open_item(
        self, fds: dict[str, tuple[int, int]], folder: str, info: _StorageInfo, where: str
    ) -> int:
        """The descriptor of the item's data file (opened once per file), the item inside it."""
        if info.relative_path not in fds:
            path = os.path.join(folder, info.relative_path)
            fds[info.relative_path] = open_checked(path, f"{path}: data file missing")
        fd, size = fds[info.relative_path]
        _check_inside(info, size, where)
        return fd

    def _plan_tensor(
        self,
        *,
        request: ReadItem,
        info: _StorageInfo,
        fd: int,
        where: str,
        reads: list[tuple[int, int, memoryview, str]],
        planner: LoadPlanner,
    ) -> tuple[Callable[[], None], int]:
        """The step that hands the item to the planner once read, and the bytes of the host
        buffer it is read into (0 when it is read straight into its destination)."""
        sizes, dtype = self._chunk(request.storage_index, where)
        element = torch.empty((), dtype=dtype).element_size()
        if info.length != math.prod(sizes) * element:
            raise CheckpointFormatError(
                f"{where}: {info.length} bytes stored, {math.prod(sizes) * element} expected"
            )
        offsets, lengths = list(request.storage_offsets), list(request.lengths)
        if len(offsets) != len(sizes) or any(
            o < 0 or n < 0 or o + n > s for o, n, s in zip(offsets, lengths, sizes, strict=True)
        ):
            raise CheckpointFormatError(f"{where}: the requested region lies outside the chunk")
        target = planner.resolve_tensor(request).detach()
        if list(target.shape) != lengths:
            raise CheckpointFormatError(
                f"{where}: destination shape {list(target.shape)} != requested {lengths}"
            )
        shortfall = _torch.storage_shortfall(target)
        if shortfall is not None:  # read into, preadv would write past the storage's end
            raise InvalidOptionsError(f"{where}: cannot load into a tensor that {shortfall}")
        strides = _contiguous_strides(sizes)
        if _is_contiguous_region(sizes, lengths):
            start = (
                info.offset + sum(o * s for o, s in zip(offsets, strides, strict=True)) * element
            )
            direct = target.dtype == dtype and holds_plain_bytes(target)
            landing = target if direct else torch.empty(lengths, dtype=dtype, device="cpu")
            reads.append((fd, start, bytes_of(landing), where))
            region = landing
            landed = 0 if direct else landing.numel() * element
        else:  # read the rows the region spans, then narrow the other dimensions
            rows = torch.empty([lengths[0], *sizes[1:]], dtype=dtype, device="cpu")
            reads.append(
                (fd, info.offset + offsets[0] * strides[0] * element, bytes_of(rows), where)
            )
            region = rows
            landed = rows.numel() * element
            for dim in range(1, len(sizes)):
                region = region.narrow(dim, offsets[dim], lengths[dim])

        def commit() -> None:
            if region is not target:
                target.copy_(region)
            planner.commit_tensor(request, target)

        return commit, landed

    def _chunk(self, index: MetadataIndex, where: str) -> tuple[list[int], torch.dtype]:
        metadata = self._metadata
        entry = None if metadata is None else metadata.state_dict_metadata.get(index.fqn)
        if not isinstance(entry, TensorStorageMetadata):
            raise CheckpointFormatError(f"{where}: the metadata has no tensor entry for it")
        chunks = entry.chunks
        wanted = list(index.offset or [])
        hint = index.index
        candidates = (
            [chunks[hint]] if hint is not None and 0 <= hint < len(chunks) else []
        ) + chunks
        for chunk in candidates:
            if list(chunk.offsets) == wanted:
                return list(chunk.sizes), entry.properties.dtype
        raise CheckpointFormatError(f"{where}: no chunk at offset {wanted} in the metadata")


def _check_inside(info: _StorageInfo, size: int, where: str) -> None:
    if info.offset + info.length > size:
        raise CheckpointFormatError(
            f"{where}: the item lies outside the file (bytes {info.offset} to "
            f"{info.offset + info.length} of {size})"
        )


def _read_window(
    pool: ThreadPoolExecutor,
    reads: list[tuple[int, int, memoryview, str]],
    afterwards: list[Callable[[], None]],
) -> None:
    """Read a window's items on ``pool``, then hand them to the planner in order."""
    run_all(pool, [functools.partial(_pread_all, *r) for r in reads])
    for step in afterwards:
        step()


_LANDING_BYTES = 256 << 20  # host buffers a load holds at once, at most (and one item)


def _pread_all(fd: int, offset: int, into: memoryview, where: str) -> None:
    done = 0
    while done < len(into):
        got = os.preadv(fd, [into[done:]], offset + done)
        if got <= 0:
            raise CheckpointFormatError(f"{where}: the file ends before the item does")
        done += got


def _pread_exact(fd: int, size: int, path: str) -> bytearray:
    """The first ``size`` bytes of the file open at ``fd``."""
    data = bytearray(size)
    _pread_all(fd, 0, memoryview(data), path)
    return data


# -- reading --------------------------------------------------------------------------------------


class _CheckedBytes:
    """A planner whose ``load_bytes`` first reads the item with ``torch.load(weights_only=True)``
    (plain values, containers, tensors; no other class, nothing called), and refuses it as a
    :class:`CheckpointFormatError` if that fails; everything else goes to the planner."""

    def __init__(self, planner: LoadPlanner, folder: str) -> None:
        self._planner = planner
        self._folder = folder

    def __getattr__(self, name: str) -> Any:
        return getattr(self._planner, name)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            torch.load(io.BytesIO(value.getvalue()), map_location="cpu", weights_only=True)
        except Exception as error:
            raise CheckpointFormatError(
                f"{self._folder}: the non-tensor value {fqn!r} is a pickle that "
                f"torch.load(weights_only=True) refuses ({_reason(error)}); DCP's planner "
                "would unpickle it in full, which runs whatever code it names. Load it only "
                "from a checkpoint you trust, with FileSystemReader(..., "
                "trust_pickled_bytes=True)"
            ) from error
        self._planner.load_bytes(read_item, value)


_FOREIGN_ERRORS = (RuntimeError, ValueError, EOFError, pickle.UnpicklingError, AssertionError)
"""What DCP's own reader raises on a damaged item (UnicodeDecodeError is a ValueError)."""


def _reason(error: BaseException) -> str:
    """The line of ``torch.load``'s refusal that names the global, else its first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line]  # worded differently by version
    text = (named or lines or [""])[0]
    return f"{type(error).__name__}: {text[:200]}"


def _load_bytes(planner: LoadPlanner, request: ReadItem, buffer: bytearray) -> Callable[[], None]:
    def load() -> None:
        planner.load_bytes(request, io.BytesIO(buffer))

    return load


def _contiguous_strides(sizes: list[int]) -> list[int]:
    strides = [1] * len(sizes)
    for dim in range(len(sizes) - 2, -1, -1):
        strides[dim] = strides[dim + 1] * sizes[dim + 1]
    return strides


def _is_contiguous_region(sizes: list[int], lengths: list[int]) -> bool:
    """Whether a box of ``lengths`` in a C-ordered chunk of ``sizes`` is one run of bytes:
    every dimension after the last partial one is whole and every one before it has length 1."""
    partial = [d for d, (n, s) in enumerate(zip(lengths, sizes, strict=True)) if n != s]
    if not partial or math.prod(lengths) == 0:
        return True
    last = partial[-1]
    return all(lengths[d] == 1 for d in range(last))


# -- the metadata file ---------------------------------------------------------------------------

_ALLOWED_MODULES = {
    "torch.distributed.checkpoint.metadata",  # Metadata, its entries, chunks, indices
    "torch.distributed.checkpoint.planner",
}
_ALLOWED_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.filesystem", "_StoragePrefix"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
}


class _MetadataUnpickler(pickle._Unpickler):
    """Unpickles DCP's ``.metadata``, refusing every class but DCP's metadata classes, torch
    dtypes and sizes: a crafted file is refused instead of running code.

    The pure-Python unpickler, not the C one: the C one keeps its memo in an array that a
    ``LONG_BINPUT`` index resizes, so one flipped byte (an index of 560 million) made it
    allocate and clear 4.5 GB (7-13 s); this one's memo is a dict, and what it allocates stays
    in proportion to the file. It is 2.4x slower: 1.6 s against 0.66 s for the metadata of 20,000
    tensors (4.3 MB), paid once per load.
    """

    def __init__(self, stream: io.BytesIO, path: str) -> None:
        super().__init__(stream)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if not _allowed(module, name):
            raise CheckpointFormatError(
                f"{self._path}: the metadata refers to {module}.{name}, which a DCP metadata "
                "file never holds (refused: unpickling it could run code)"
            )
        return super().find_class(module, name)


def _allowed(module: str, name: str) -> bool:
    """Whether a metadata file may name the global ``module.name``.

    Only whole names: from protocol 4 on, the unpickler resolves a dotted name attribute by
    attribute, and ``os.mkdir`` through the metadata module (which imports ``os``) ran. In
    DCP's metadata modules, only the classes they define, not what they import (``os``,
    ``torch``, ``dataclass``): any of those would hand the file a callable.
    """
    if "." in name:
        return False
    if (module, name) in _ALLOWED_GLOBALS:
        return True
    if module == "torch":
        return isinstance(getattr(torch, name, None), torch.dtype)
    if module not in _ALLOWED_MODULES:
        return False
    found = getattr(sys.modules[module], name, None)
    return isinstance(found, type) and found.__module__ == module


# -- what the metadata holds ---------------------------------------------------------------------

_MISSING = object()


def _check_metadata(metadata: Metadata, path: str) -> None:
    """Check every field of ``metadata`` that DCP's planner or this reader uses (types, sizes,
    chunks inside their tensor, storage records inside the folder): a damaged or crafted file
    is a :class:`CheckpointFormatError` naming the file and the field, not an IndexError or
    TypeError from deep inside DCP, nor a tensor left unread because its chunk lies nowhere."""
    entries = _field(metadata, "state_dict_metadata", path)
    if not isinstance(entries, dict):
        raise _bad(path, "state_dict_metadata", entries, "a dict")
    for fqn, entry in entries.items():
        where = f"state_dict_metadata[{fqn!r}]"
        if not isinstance(fqn, str):
            raise _bad(path, where, fqn, "a string key")
        if isinstance(entry, TensorStorageMetadata):
            _check_tensor_entry(entry, where, path)
        elif not isinstance(entry, BytesStorageMetadata):
            raise _bad(path, where, entry, "a TensorStorageMetadata or BytesStorageMetadata")
    records = _field(metadata, "storage_data", path)
    if not isinstance(records, dict):
        raise _bad(path, "storage_data", records, "a dict")
    for index, record in records.items():
        if not isinstance(index, MetadataIndex):
            raise _bad(path, "storage_data", index, "a dict keyed by MetadataIndex")
        _check_record(record, f"storage_data[{index.fqn!r} at {index.offset}]", path)
    storage_meta = _field(metadata, "storage_meta", path)
    if storage_meta is not None and not isinstance(storage_meta, StorageMeta):
        raise _bad(path, "storage_meta", storage_meta, "a StorageMeta or None")


def _check_tensor_entry(entry: TensorStorageMetadata, where: str, path: str) -> None:
    properties = _field(entry, "properties", path, where)
    if not isinstance(properties, TensorProperties):
        raise _bad(path, f"{where}.properties", properties, "a TensorProperties")
    dtype = _field(properties, "dtype", path, f"{where}.properties")
    if not isinstance(dtype, torch.dtype):
        raise _bad(path, f"{where}.properties.dtype", dtype, "a torch.dtype")
    size = _dims(_field(entry, "size", path, where), f"{where}.size", path)
    chunks = _field(entry, "chunks", path, where)
    if not isinstance(chunks, list):
        raise _bad(path, f"{where}.chunks", chunks, "a list")
    for number, chunk in enumerate(chunks):
        at = f"{where}.chunks[{number}]"
        if not isinstance(chunk, ChunkStorageMetadata):
            raise _bad(path, at, chunk, "a ChunkStorageMetadata")
        offsets = _dims(_field(chunk, "offsets", path, at), f"{at}.offsets", path)
        sizes = _dims(_field(chunk, "sizes", path, at), f"{at}.sizes", path)
        if len(offsets) != len(size) or len(sizes) != len(size):
            raise CheckpointFormatError(
                f"{path}: {at}: offsets {offsets} and sizes {sizes} do not have the "
                f"{len(size)} dimensions of the tensor's size {size}"
            )
        # An empty chunk (an empty shard of an unevenly sharded DTensor) holds nothing: where
        # DCP put its offsets does not matter.
        if math.prod(sizes) and any(
            o + n > s for o, n, s in zip(offsets, sizes, size, strict=True)
        ):
            raise CheckpointFormatError(
                f"{path}: {at}: offsets {offsets} + sizes {sizes} reach outside the tensor's "
                f"size {size}"
            )


def _check_record(record: object, where: str, path: str) -> None:
    if not isinstance(record, _StorageInfo):
        raise _bad(path, where, record, "a _StorageInfo")
    name = _field(record, "relative_path", path, where)
    if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
        # Only a file of the checkpoint's folder: no folder, no way out of it.
        raise _bad(path, f"{where}.relative_path", name, "a file name in the folder")
    for key in ("offset", "length"):
        value = _field(record, key, path, where)
        if not _is_count(value):
            raise _bad(path, f"{where}.{key}", value, "a non-negative integer")
    descriptors = _field(record, "transform_descriptors", path, where)
    if descriptors is not None and not (
        isinstance(descriptors, (list, tuple)) and all(isinstance(d, str) for d in descriptors)
    ):
        raise _bad(path, f"{where}.transform_descriptors", descriptors, "a list of strings")


def _field(obj: object, name: str, path: str, where: str = "") -> Any:
    """``obj.name``; a file can build an object without it (pickle's BUILD sets any state)."""
    value = getattr(obj, name, _MISSING)
    if value is _MISSING:
        raise CheckpointFormatError(f"{path}: {where + '.' if where else ''}{name} is missing")
    return value


def _dims(value: object, where: str, path: str) -> list[int]:
    if not isinstance(value, (tuple, list)) or not all(type(d) is int and d >= 0 for d in value):
        raise _bad(path, where, value, "a list of non-negative integers")
    return list(value)


def _is_count(value: object) -> bool:
    # type(), not isinstance(): a bool is no count (and the check runs per chunk and record)
    return type(value) is int and value >= 0


def _bad(path: str, where: str, value: object, expected: str) -> CheckpointFormatError:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return CheckpointFormatError(f"{path}: {where} is {shown}, not {expected}")
