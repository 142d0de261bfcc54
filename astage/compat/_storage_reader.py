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
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
)
from torch.futures import Future

from .._errors import (
    CheckpointFormatError,
    CheckpointNotFoundError,
)
from ._storage import (
    DEFAULT_THREADS,
    METADATA_NAME,
    RAW_DESCRIPTOR,
    bytes_of,
    positive_int,
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
        super().__init__(path, _extension_registry)
        self.thread_count = positive_int("thread_count", thread_count)
        self.trust_pickled_bytes = trust_pickled_bytes
        self._metadata: Metadata | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        name = METADATA_NAME if rank is None else f"__{rank}{METADATA_NAME}"
        path = os.path.join(os.fspath(self.path), name)
        try:
            with open(path, "rb") as stream:
                data = stream.read()
        except FileNotFoundError as error:
            raise CheckpointNotFoundError(
                f"{path}: no checkpoint metadata (not a checkpoint, or one never committed)"
            ) from error
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
        storage_meta = getattr(metadata, "storage_meta", None) or StorageMeta()
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
            super().read_data(dataclasses.replace(plan, items=foreign), planner).wait()
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
        if not isinstance(info, _StorageInfo):
            raise CheckpointFormatError(
                f"{self.path}: bad storage record for {request.storage_index.fqn}"
            )
        return info

    def _read_raw(self, requests: list[ReadItem], planner: LoadPlanner) -> None:
        folder = os.fspath(self.path)
        fds: dict[str, tuple[int, int]] = {}  # relative path -> (fd, size)
        reads: list[tuple[int, int, memoryview, str]] = []  # (fd, offset, into, where)
        afterwards: list[Callable[[], None]] = []  # in order, in this thread: the planner's calls
        try:
            for request in requests:
                info = self._info(request)
                where = f"{os.path.join(folder, info.relative_path)} ({request.storage_index.fqn})"
                fd, size = self._open(fds, folder, info)
                if info.offset < 0 or info.length < 0 or info.offset + info.length > size:
                    raise CheckpointFormatError(f"{where}: the item lies outside the file")
                if request.type == LoadItemType.BYTE_IO:
                    buffer = bytearray(info.length)
                    reads.append((fd, info.offset, memoryview(buffer), where))
                    afterwards.append(_load_bytes(planner, request, buffer))
                else:
                    afterwards.append(
                        self._plan_tensor(
                            request=request,
                            info=info,
                            fd=fd,
                            where=where,
                            reads=reads,
                            planner=planner,
                        )
                    )
            with ThreadPoolExecutor(self.thread_count, "astage-dcp-reader") as pool:
                run_all(pool, [functools.partial(_pread_all, *r) for r in reads])
            for step in afterwards:
                step()
        finally:
            for fd, _ in fds.values():
                os.close(fd)

    def _open(
        self, fds: dict[str, tuple[int, int]], folder: str, info: _StorageInfo
    ) -> tuple[int, int]:
        if info.relative_path not in fds:
            name = info.relative_path
            if os.path.basename(name) != name or name in ("", ".", ".."):
                raise CheckpointFormatError(f"{folder}: bad data file name {name!r} in metadata")
            path = os.path.join(folder, name)
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except FileNotFoundError as error:
                raise CheckpointNotFoundError(f"{path}: data file missing") from error
            fds[name] = (fd, os.fstat(fd).st_size)
        return fds[info.relative_path]

    def _plan_tensor(
        self,
        *,
        request: ReadItem,
        info: _StorageInfo,
        fd: int,
        where: str,
        reads: list[tuple[int, int, memoryview, str]],
        planner: LoadPlanner,
    ) -> Callable[[], None]:
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
        strides = _contiguous_strides(sizes)
        if _is_contiguous_region(sizes, lengths):
            start = (
                info.offset + sum(o * s for o, s in zip(offsets, strides, strict=True)) * element
            )
            direct = (
                target.device.type == "cpu" and target.dtype == dtype and target.is_contiguous()
            )
            landing = target if direct else torch.empty(lengths, dtype=dtype, device="cpu")
            reads.append((fd, start, bytes_of(landing), where))
            region = landing
        else:  # read the rows the region spans, then narrow the other dimensions
            rows = torch.empty([lengths[0], *sizes[1:]], dtype=dtype, device="cpu")
            reads.append(
                (fd, info.offset + offsets[0] * strides[0] * element, bytes_of(rows), where)
            )
            region = rows
            for dim in range(1, len(sizes)):
                region = region.narrow(dim, offsets[dim], lengths[dim])

        def commit() -> None:
            if region is not target:
                target.copy_(region)
            planner.commit_tensor(request, target)

        return commit

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


def _pread_all(fd: int, offset: int, into: memoryview, where: str) -> None:
    done = 0
    while done < len(into):
        got = os.preadv(fd, [into[done:]], offset + done)
        if got <= 0:
            raise CheckpointFormatError(f"{where}: the file ends before the item does")
        done += got


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


def _reason(error: Exception) -> str:
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
