"""Checkpoint writers: consume staged tensors as they land and persist them.

:class:`CheckpointWriter` is the protocol :func:`astage.save` drives; :class:`SafetensorsWriter`
is its first implementation, a one-pass safetensors file writer. The header is known as soon as
the state dict's structure is (every tensor's size), so it is written first and each storage's
bytes go straight from the staged host buffer to their final offset (``os.pwritev``) in
whatever order they land: no second pass, no copy in Python.

Durability: the file is written under a temporary name in the target's folder, then fsynced,
renamed over the target, and the folder fsynced. A failure or a cancellation at any point
before the rename leaves the previous file intact and removes the temporary one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import errno
import os
import secrets
import sys
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch

from .._errors import CheckpointWriteError, StagingError
from .._paths import Path, format_path
from ._safetensors import Entry, Layout, plan_layout, storage_memoryview

DEFAULT_THREADS = 4
DEFAULT_CHUNK_BYTES = 8 << 20  # smaller pieces start the disk sooner (see docs/writers.md)
_IOV_MAX = 1024  # buffers per pwritev call (Linux's IOV_MAX)

_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start writeback of the range's dirty pages, no wait


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_sync_file_range = _load_sync_file_range()

_T = TypeVar("_T")
_Item = tuple[int, memoryview, torch.Tensor]
"""(file offset, bytes, the tensor that keeps those bytes alive)."""


@runtime_checkable
class CheckpointWriter(Protocol):
    """What :func:`astage.save` drives: one checkpoint, written as its tensors land.

    The calls come in this order, all from the event loop's thread:

    1. ``await begin(state_dict)`` once, before staging: the structure to write. Its tensors
       may be the live source ones; only their dtypes, shapes, strides and storage sharing
       matter here (the values come through ``write``). Refuse what cannot be written here
       (nothing has been staged or written yet).
    2. ``await write(path, tensor)`` for each tensor as soon as its bytes have landed in host
       memory; a tensor reachable at two paths comes at both. ``write`` should return quickly
       (queue the work) so staging goes on; the writer may read ``tensor`` until ``commit`` or
       ``abort`` returns, and :func:`astage.save` keeps the staged buffers untouched till then.
    3. ``await commit()`` once every tensor was written: return when the checkpoint is durable.
       Or ``await abort()`` on any error or cancellation: leave no trace. ``abort`` may come at
       any point, also after a failed ``commit``, and must be safe to call twice.
    """

    async def begin(self, state_dict: Any) -> None: ...

    async def write(self, path: Path, tensor: torch.Tensor) -> None: ...

    async def commit(self) -> None: ...

    async def abort(self) -> None: ...


class SafetensorsWriter:
    """Writes one safetensors file at ``path``; see :mod:`astage._safetensors` for the layout.

    ``metadata`` (str -> str) goes into the header's ``__metadata__``. At most ``threads``
    writes run at once, each in a worker thread of the writer's own small pool, moving at
    most ``chunk_bytes`` (small tensors that lie side by side in the file are gathered into
    one ``pwritev``). The pool is the writer's own, not a shared one, so that ``abort`` can
    wait for every system call still using the file before it closes the descriptor.

    ``writeback`` (on Linux): after each write, ask the kernel to start writing those pages
    to the disk (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, which does not wait), so the disk
    works while later tensors are still being copied and the final ``fsync`` has little left
    to do. It is a hint only: durability still comes from that ``fsync``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        metadata: Mapping[str, str] | None = None,
        threads: int = DEFAULT_THREADS,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        writeback: bool = True,
    ) -> None:
        if threads < 1 or chunk_bytes < 1:
            raise ValueError("threads and chunk_bytes must be positive")
        self.path = os.path.abspath(os.fspath(path))
        self.metadata = dict(metadata or {})
        self.threads = threads
        self.chunk_bytes = chunk_bytes
        self.writeback = writeback and _sync_file_range is not None
        self.layout: Layout | None = None
        self.temp_path: str | None = None
        self._fd: int | None = None
        self._state = "new"  # new -> open -> committed | aborted
        self._queue: asyncio.Queue[_Item | None] = asyncio.Queue()
        self._workers: list[asyncio.Task[None]] = []
        self._scheduled: set[int] = set()  # id() of entries whose bytes are queued
        self._error: BaseException | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._jobs: list[concurrent.futures.Future[Any]] = []

    # -- the protocol -------------------------------------------------------------------------

    async def begin(self, state_dict: Any) -> None:
        if self._state != "new":
            raise StagingError(f"{self.path}: begin() was already called on this writer")
        self._executor = concurrent.futures.ThreadPoolExecutor(
            self.threads, thread_name_prefix="astage-write"
        )
        self._state = "open"
        try:
            layout = await self._run(plan_layout, state_dict, self.metadata)
        except BaseException:
            await self.abort()
            raise
        self.layout = layout
        folder, name = os.path.split(self.path)
        temp = os.path.join(folder, f".{name}.{secrets.token_hex(6)}.tmp")
        self.temp_path = temp
        try:
            await self._run(self._create, temp, layout)
        except BaseException:
            await self.abort()
            raise
        for entry in layout.entries:
            if entry.nbytes == 0:
                self._scheduled.add(id(entry))
        self._workers = [asyncio.create_task(self._worker()) for _ in range(self.threads)]

    async def write(self, path: Path, tensor: torch.Tensor) -> None:
        self._check()
        assert self.layout is not None
        entry = self.layout.by_path.get(path)
        if entry is None:
            raise StagingError(f"{self.path}: no tensor at {format_path(path)} in this file")
        if id(entry) in self._scheduled:
            return
        self._enqueue(entry, tensor, path)

    async def commit(self) -> None:
        self._check()
        assert self.layout is not None
        missing = [e for e in self.layout.entries if id(e) not in self._scheduled]
        if missing:
            where = format_path(missing[0].paths[0])
            raise StagingError(f"{self.path}: commit() before the tensor at {where} was written")
        for _ in self._workers:
            self._queue.put_nowait(None)
        await asyncio.gather(*self._workers)
        self._check()
        await self._run(self._finish)
        self._shutdown()

    async def abort(self) -> None:
        if self._state in ("aborted", "committed"):
            return
        for worker in self._workers:
            worker.cancel()
        # A thread may still be inside pwritev on our descriptor (a cancelled await does not
        # stop it): wait for every job before the descriptor is closed, since its number
        # could be reused by another file; keep waiting even if we are cancelled meanwhile.
        cancelled = False
        pending = [job for job in self._jobs if not job.done()]
        if pending:
            waiting = asyncio.ensure_future(asyncio.wait([asyncio.wrap_future(j) for j in pending]))
            while not waiting.done():
                try:
                    await asyncio.shield(waiting)
                except asyncio.CancelledError:
                    cancelled = True
        if self._workers:
            await asyncio.wait(self._workers)
        self._workers = []
        self._drop_queue()
        self._shutdown()
        if self._state != "committed":  # a commit whose await was cancelled may have finished
            self._state = "aborted"
            self._close_and_remove()
        if cancelled:
            raise asyncio.CancelledError

    # -- internals ----------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn`` in the writer's pool; the job is tracked until it ends, even if we don't."""
        assert self._executor is not None
        self._jobs = [job for job in self._jobs if not job.done()]
        job = self._executor.submit(fn, *args)
        self._jobs.append(job)
        return await asyncio.wrap_future(job)

    def _shutdown(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self._state != "open":
            raise StagingError(f"{self.path}: this writer is {self._state}, not open")

    def _enqueue(self, entry: Entry, tensor: torch.Tensor, path: Path) -> None:
        if tensor.device.type != "cpu":
            raise StagingError(
                f"{self.path}: the tensor at {format_path(path)} is on {tensor.device}; "
                "a writer takes staged (CPU) tensors"
            )
        data = storage_memoryview(tensor)
        if len(data) != entry.nbytes:
            raise StagingError(
                f"{self.path}: the tensor at {format_path(path)} has {len(data)} bytes of "
                f"storage, {entry.nbytes} were planned (was it resized during the save?)"
            )
        assert self.layout is not None
        offset = self.layout.data_start + entry.begin
        step = self.chunk_bytes
        for start in range(0, len(data), step):
            self._queue.put_nowait((offset + start, data[start : start + step], tensor))
        self._scheduled.add(id(entry))

    async def _worker(self) -> None:
        queue = self._queue
        while True:
            item = await queue.get()
            if item is None:
                return
            items = [item]
            gathered = len(item[1])
            while gathered < self.chunk_bytes and len(items) < _IOV_MAX and not queue.empty():
                more = queue.get_nowait()
                if more is None:
                    queue.put_nowait(None)  # for the next worker: this one ends after this batch
                    break
                items.append(more)
                gathered += len(more[1])
            try:
                await self._run(self._write_items, items)
            except OSError as error:
                self._fail(error, "cannot write")
                return

    def _fail(self, error: OSError, doing: str) -> None:
        if self._error is None:
            self._error = _write_error(self.path, doing, error)

    def _write_items(self, items: list[_Item]) -> None:
        """Runs in a worker thread: write contiguous runs with one ``pwritev`` each."""
        fd = self._fd
        if fd is None or self._state != "open":
            return
        items.sort(key=_offset)
        run: list[memoryview] = []
        run_start = run_end = 0
        for offset, data, _ in items:
            if run and offset == run_end and len(run) < _IOV_MAX:
                run.append(data)
                run_end += len(data)
                continue
            if run:
                self._write_run(fd, run, run_start, run_end)
            run, run_start, run_end = [data], offset, offset + len(data)
        if run:
            self._write_run(fd, run, run_start, run_end)

    def _write_run(self, fd: int, run: list[memoryview], start: int, end: int) -> None:
        _pwritev_all(fd, run, start)
        if self.writeback and _sync_file_range is not None:
            # Start the disk on these pages now; errors surface at the final fsync.
            _sync_file_range(fd, start, end - start, _SYNC_FILE_RANGE_WRITE)

    def _drop_queue(self) -> None:
        while not self._queue.empty():
            self._queue.get_nowait()

    def _create(self, temp: str, layout: Layout) -> None:
        """Runs in a thread: create the temporary file, reserve its space, write the header."""
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except OSError as error:
            raise _write_error(self.path, "cannot create a temporary file for", error) from error
        self._fd = fd
        try:
            _reserve(fd, layout.file_size)
            _pwritev_all(fd, [memoryview(layout.header)], 0)
        except OSError as error:
            raise _write_error(self.path, "cannot write", error) from error

    def _finish(self) -> None:
        """Runs in a thread: fsync, rename over the target, fsync the folder."""
        fd, temp = self._fd, self.temp_path
        assert fd is not None and temp is not None
        try:
            os.fsync(fd)
        except OSError as error:
            raise _write_error(self.path, "cannot flush", error) from error
        self._fd = None
        os.close(fd)
        try:
            os.replace(temp, self.path)
        except OSError as error:
            raise _write_error(self.path, "cannot rename the temporary file to", error) from error
        self._state = "committed"
        try:
            fsync_folder(os.path.dirname(self.path))
        except OSError as error:
            raise _write_error(
                self.path, "renamed, but cannot fsync the folder of", error
            ) from error

    def _close_and_remove(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.temp_path is not None:
            with contextlib.suppress(OSError):  # gone already, or the first error says why
                os.unlink(self.temp_path)


def _offset(item: _Item) -> int:
    return item[0]


def _write_error(path: str, doing: str, error: OSError) -> CheckpointWriteError:
    reason = error.strerror or str(error)
    code = errno.errorcode.get(error.errno, "") if error.errno is not None else ""
    failure = CheckpointWriteError(f"{doing} {path}: {reason}" + (f" ({code})" if code else ""))
    failure.__cause__ = error
    return failure


def _pwritev_all(fd: int, buffers: list[memoryview], offset: int) -> None:
    """Write every byte of ``buffers`` at ``offset``, resuming after partial writes."""
    pending = [b for b in buffers if len(b)]
    while pending:
        written = os.pwritev(fd, pending[:_IOV_MAX], offset)
        if written <= 0:
            raise OSError(errno.EIO, "pwritev wrote nothing")
        offset += written
        while pending and written >= len(pending[0]):
            written -= len(pending[0])
            pending.pop(0)
        if written:
            pending[0] = pending[0][written:]


def _reserve(fd: int, size: int) -> None:
    """Give the file its final size; reserve the blocks too where the filesystem can."""
    if size == 0:
        return
    try:
        os.posix_fallocate(fd, 0, size)  # a full disk fails here, before any data is copied
    except OSError as error:
        if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size)


def fsync_folder(folder: str) -> None:
    """Make a rename inside ``folder`` durable."""
    fd = os.open(folder or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
