"""Checkpoint writers: consume staged tensors as they land and persist them.

:class:`CheckpointWriter` is the protocol :func:`astage.save` drives; :class:`SafetensorsWriter`
is its first implementation, a one-pass safetensors file writer. The header is known as soon as
the state dict's structure is (every tensor's size), so it is written first and each storage's
bytes go straight from the staged host buffer to their final offset (``os.pwritev``) in
whatever order they land: no second pass, no copy in Python.

Durability: the file is written under a temporary name in the target's folder, then fsynced,
renamed over the target, and the folder fsynced. A failure or a cancellation at any point
before the rename leaves the previous file intact and removes the temporary one.

Concurrency (anyio, so asyncio, uvloop and trio alike): entered with ``async with``, the writer
owns a task group whose worker tasks take queued pieces from a memory object stream and write
them with ``anyio.to_thread.run_sync`` under the writer's own ``CapacityLimiter``, so
``write()`` returns at once and the disk works while staging goes on. Such a thread is never
abandoned: a cancelled await still waits for its system call to return, so once the workers
have ended no thread uses the file descriptor, and :meth:`SafetensorsWriter.abort` can close
it (its number could otherwise be reused by another file and written over). Used without
``async with``, the writer does the same work inside each ``write()`` call instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import math
import os
import secrets
import sys
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Protocol, TypeVar, runtime_checkable

import anyio
import anyio.abc
import anyio.to_thread
import torch
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .._errors import CheckpointWriteError, InvalidOptionsError, UsageError
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


def positive_int(name: str, value: object) -> int:
    """``value`` if it is an int of at least 1, else :class:`InvalidOptionsError` naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidOptionsError(f"{name} must be an integer of at least 1, got {value!r}")
    return value


@runtime_checkable
class CheckpointWriter(Protocol):
    """What :func:`astage.save` drives: one checkpoint, written as its tensors land.

    The calls come in this order, all from one task:

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
       any point, also after a failed ``commit``, and must be safe to call twice;
       :func:`astage.save` calls it in a shielded cancel scope.

    A writer that is also an async context manager is entered by :func:`astage.save` around
    the whole save (``begin`` to ``commit`` or ``abort``): the place to run a task group of
    its own for background writes.
    """

    async def begin(self, state_dict: Any) -> None: ...

    async def write(self, path: Path, tensor: torch.Tensor) -> None: ...

    async def commit(self) -> None: ...

    async def abort(self) -> None: ...


class SafetensorsWriter:
    """Writes one safetensors file at ``path``; see :mod:`astage._files._safetensors`.

    ``metadata`` (str -> str) goes into the header's ``__metadata__``. At most ``threads``
    writes run at once, each in a worker thread under the writer's own capacity limiter,
    moving at most ``chunk_bytes`` (small tensors that lie side by side in the file are
    gathered into one ``pwritev``).

    Use it as ``async with SafetensorsWriter(path) as writer:`` (:func:`astage.save` does):
    then ``write`` only queues the bytes and the writer's own worker tasks write them while
    the caller goes on; leaving the block without ``commit`` aborts. Without ``async with``,
    each ``write`` writes its tensor before it returns.

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
        self.path = os.path.abspath(os.fspath(path))
        self.metadata = dict(metadata or {})
        self.threads = positive_int("threads", threads)
        self.chunk_bytes = positive_int("chunk_bytes", chunk_bytes)
        self.writeback = writeback and _sync_file_range is not None
        self.layout: Layout | None = None
        self.temp_path: str | None = None
        self._fd: int | None = None
        self._state = "new"  # new -> open -> committed | aborted
        self._scheduled: set[int] = set()  # id() of entries whose bytes are written or queued
        self._error: BaseException | None = None
        self._limiter: anyio.CapacityLimiter | None = None
        # Only when entered with `async with`: the task group, and its workers' queue.
        self._task_group: anyio.abc.TaskGroup | None = None
        self._queue: MemoryObjectSendStream[_Item] | None = None
        self._workers: anyio.CancelScope | None = None
        self._workers_done: anyio.Event | None = None

    # -- the writer's own task group ----------------------------------------------------------

    async def __aenter__(self) -> SafetensorsWriter:
        if self._task_group is not None or self._state != "new":
            raise UsageError(
                f"{self.path}: this writer was already entered or used; a writer writes one "
                "file once (astage.save enters the writer it is given: pass it un-entered)"
            )
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task_group, self._task_group = self._task_group, None
        assert task_group is not None
        try:
            if self._state in ("new", "open"):  # left without a commit: leave no trace
                await self.abort()
        finally:
            # The workers have ended (commit and abort wait for them): the group is empty,
            # and an exception of the block propagates as it is, not in an exception group.
            await task_group.__aexit__(None, None, None)

    # -- the protocol -------------------------------------------------------------------------

    async def begin(self, state_dict: Any) -> None:
        """Plan the file for ``state_dict``'s structure, create it and write its header."""
        if self._state != "new":
            raise UsageError(f"{self.path}: begin() was already called on this writer")
        self._state = "open"
        self._limiter = anyio.CapacityLimiter(self.threads)
        try:
            layout = await self._in_thread(plan_layout, state_dict, self.metadata)
            self.layout = layout
            folder, name = os.path.split(self.path)
            self.temp_path = os.path.join(folder, f".{name}.{secrets.token_hex(6)}.tmp")
            await self._in_thread(self._create, self.temp_path, layout)
        except BaseException:
            await self.abort()
            raise
        for entry in layout.entries:
            if entry.nbytes == 0:
                self._scheduled.add(id(entry))
        if self._task_group is not None:
            send, receive = anyio.create_memory_object_stream[_Item](math.inf)
            self._queue = send
            self._workers = anyio.CancelScope()
            self._workers_done = anyio.Event()
            self._task_group.start_soon(self._run_workers, receive)

    async def write(self, path: Path, tensor: torch.Tensor) -> None:
        """Write (or, inside ``async with``, queue) the bytes of the tensor at ``path``."""
        self._check_open()
        assert self.layout is not None
        entry = self.layout.by_path.get(path)
        if entry is None:
            raise InvalidOptionsError(f"{self.path}: no tensor at {format_path(path)} in this file")
        if id(entry) in self._scheduled:
            return  # a storage reached again (a tied tensor, a view): its bytes are on the way
        items = self._pieces(entry, tensor, path)
        if self._queue is None:
            await self._write_now(items)
            self._check_open()
        else:
            for item in items:
                self._queue.send_nowait(item)
        self._scheduled.add(id(entry))

    async def commit(self) -> None:
        """Wait for every write, fsync, rename over the target and fsync the folder."""
        self._check_open()
        assert self.layout is not None
        missing = [e for e in self.layout.entries if id(e) not in self._scheduled]
        if missing:
            where = format_path(missing[0].paths[0])
            raise UsageError(f"{self.path}: commit() before the tensor at {where} was written")
        if self._queue is not None:
            self._queue.close()  # the workers write what is queued, then end
            assert self._workers_done is not None
            await self._workers_done.wait()
        self._check_open()  # a write may have failed meanwhile
        await self._in_thread(self._finish)

    async def abort(self) -> None:
        """Stop writing and remove the temporary file; the previous file stays. Idempotent."""
        if self._state in ("aborted", "committed"):
            return
        # Cleanup runs to its end even if the caller is cancelled meanwhile: the descriptor
        # is closed only once no worker thread can still be inside a system call on it.
        with anyio.CancelScope(shield=True):
            if self._workers is not None and self._workers_done is not None:
                self._workers.cancel()
                await self._workers_done.wait()
            if self._queue is not None:
                self._queue.close()
            if self._state != "committed":  # a commit whose await was cancelled may have ended
                self._state = "aborted"
                # Not under the writer's limiter: the wait above is what makes closing safe.
                await anyio.to_thread.run_sync(self._close_and_remove)

    # -- internals ----------------------------------------------------------------------------

    async def _in_thread(self, fn: Callable[..., _T], *args: Any) -> _T:
        # Never abandoned on cancellation: the await returns only when `fn` has returned.
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    def _check_open(self) -> None:
        if self._error is not None:
            raise self._error
        if self._state != "open":
            raise UsageError(f"{self.path}: this writer is {self._state}, not open")

    def _pieces(self, entry: Entry, tensor: torch.Tensor, path: Path) -> list[_Item]:
        """The tensor's storage bytes, cut into pieces of at most ``chunk_bytes``."""
        if tensor.device.type != "cpu":
            raise InvalidOptionsError(
                f"{self.path}: the tensor at {format_path(path)} is on {tensor.device}; "
                "a writer takes staged (CPU) tensors"
            )
        data = storage_memoryview(tensor)
        if len(data) != entry.nbytes:
            raise InvalidOptionsError(
                f"{self.path}: the tensor at {format_path(path)} has {len(data)} bytes of "
                f"storage, {entry.nbytes} were planned (was it resized during the save?)"
            )
        assert self.layout is not None
        offset = self.layout.data_start + entry.begin
        step = self.chunk_bytes
        return [
            (offset + start, data[start : start + step], tensor)
            for start in range(0, len(data), step)
        ]

    async def _write_now(self, items: list[_Item]) -> None:
        """Write one tensor's pieces, ``threads`` at a time (without ``async with``)."""
        if len(items) == 1:
            await self._write_job(items)
            return
        async with anyio.create_task_group() as pieces:
            for item in items:
                pieces.start_soon(self._write_job, [item])

    async def _run_workers(self, queue: MemoryObjectReceiveStream[_Item]) -> None:
        """The writer's workers, until the queue is closed and drained, or they are cancelled."""
        assert self._workers is not None and self._workers_done is not None
        try:
            with self._workers, queue:
                async with anyio.create_task_group() as workers:
                    for _ in range(self.threads):
                        workers.start_soon(self._worker, queue.clone())
        finally:
            self._workers_done.set()

    async def _worker(self, queue: MemoryObjectReceiveStream[_Item]) -> None:
        with queue:
            async for item in queue:
                items = [item]
                gathered = len(item[1])
                while gathered < self.chunk_bytes and len(items) < _IOV_MAX:
                    try:
                        more = queue.receive_nowait()
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                    items.append(more)
                    gathered += len(more[1])
                if not await self._write_job(items):
                    return

    async def _write_job(self, items: list[_Item]) -> bool:
        """Write ``items`` in a worker thread; on failure record the error and stop the rest."""
        try:
            await self._in_thread(self._write_items, items)
        except Exception as error:  # noqa: BLE001 - recorded; write() and commit() raise it
            if self._error is None:
                self._error = (
                    _write_error(self.path, "cannot write", error)
                    if isinstance(error, OSError)
                    else error
                )
            if self._workers is not None:
                self._workers.cancel()  # the file is lost: the other workers stop too
            return False
        return True

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
