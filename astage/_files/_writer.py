"""Checkpoint writers: consume staged tensors as they land and persist them.

:class:`CheckpointWriter` is the protocol :func:`astage.save` drives; :class:`SafetensorsWriter`
is its first implementation, a one-pass safetensors file writer. The header is known as soon as
the state dict's structure is (every tensor's size), so it is written first and each storage's
bytes go straight from the staged host buffer to their final offset (``os.pwritev``) in
whatever order they land: no second pass, no copy in Python.

How bytes reach the disk: in the writer's own threads, where the filesystem allows it, the bulk
of each storage goes with direct I/O (``O_DIRECT``, a second descriptor on the same file): the
disk reads the staged buffer itself, so the writer costs almost no CPU (no copy into the page
cache, no dirty pages for the kernel to write back later) and the final ``fsync`` has next to
nothing left. The data section starts at a page boundary and storages whose sizes are whole
pages lie first (see :func:`~astage._files._safetensors.plan_layout`), so a page-aligned staged
buffer lands at a page-aligned offset. A buffer whose address is not aligned like its file
offset (the default cache's malloc'ed buffers lie 64 bytes past a page) is written buffered,
as are the header, small storages and the unaligned head and tail of each storage, through
the first descriptor. A filesystem that refuses
``O_DIRECT`` (some tmpfs at ``open``; some network filesystems at the first write) is
remembered per folder, and its files are written buffered, with early writeback.

Durability: the file is written under a temporary name in the target's folder, then fsynced,
renamed over the target, and the folder fsynced. A failure or a cancellation at any point
before the rename leaves the previous file intact and removes the temporary one.

Concurrency: entered with ``async with`` (as :func:`astage.save` enters it), or opened by the
synchronous face, the writer owns a few plain threads (:class:`WriteThreads`) that take queued
pieces from a thread-side queue and write them, so ``write()`` returns at once and the disk works
while staging goes on. Sealed (:meth:`SafetensorsWriter.commit_in_threads`), the last thread out
fsyncs, renames, fsyncs the folder and calls ``after_commit``: once the caller has handed every
piece over, the checkpoint becomes durable with no event loop turn at all, so a training step that
blocks the loop (or a caller with no loop) does not delay it. An abort stops the threads; the last
one out closes the descriptor and removes the temporary file, so no descriptor is closed under a
system call (its number could otherwise be reused by another file and written over). An abort
wins if it comes before the rename; after the rename the commit stands and finishes. Used
without ``async with``, the writer instead does the work inside each ``write()`` call.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import numbers
import os
import secrets
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Protocol, TypeVar, runtime_checkable

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import torch

from .._drivers._gc import gc_paused
from .._drivers._gil import GilSharing
from .._errors import CheckpointWriteError, InvalidOptionsError, UsageError
from .._paths import Path, format_path
from ._layout import Entry, Layout, LayoutMemo, plan_layout
from ._safetensors import fs_path, storage_memoryview

DEFAULT_THREADS = 4
DEFAULT_CHUNK_BYTES = 8 << 20  # smaller pieces start the disk sooner (see docs/writers.md)
SPARE_THREAD_BYTES = 1 << 20
"""A writer's thread beyond the first writes only while this many queued bytes per thread
before it wait (see ``WriteThreads._wanted``)..."""
SPARE_THREAD_PIECE_BYTES = 64 << 10
"""... and only while the queued pieces are this big on average."""
_IOV_MAX = 1024  # buffers per pwritev call (Linux's IOV_MAX)

_ALIGN = 4096  # direct I/O: file offset, length and memory address multiples of this
_DIRECT_MIN_BYTES = 256 << 10  # below this a buffered write costs next to nothing anyway
_O_DIRECT = getattr(os, "O_DIRECT", 0) if sys.platform.startswith("linux") else 0
_DIRECT_REFUSED = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP)
# A second open of the temporary file needs write permission, which a umask such as 0o277
# (files read-only for their owner) leaves out of its mode; the first open has it anyway
# (O_CREAT grants it), so that file is written buffered.
_DIRECT_DENIED = (errno.EACCES, errno.EPERM)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_FOLDER_FSYNC_UNSUPPORTED = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP)

_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start writeback of the range's dirty pages, no wait
_CANCEL_POLL_S = 0.05  # how soon a task waiting for the threads notices its cancellation


def _linux_libc_call(
    names: tuple[str, ...], argtypes: list[Any]
) -> Callable[[int, int, int, int], int] | None:
    """The first of ``names`` that Linux's libc has, typed (errno kept); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    for name in names:
        fn = getattr(libc, name, None)
        if fn is not None:
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int
            return fn  # type: ignore[no-any-return]
    return None


_sync_file_range = _linux_libc_call(
    ("sync_file_range",), [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
)


# Linux's fallocate(2) itself. glibc's posix_fallocate, where a filesystem has none (NFSv3,
# vfat, many FUSE mounts), writes a byte into every block instead: the whole file goes to the
# disk (over the network, on NFS) as zeros before its data, reserving nothing on NFS.
# fallocate(2) refuses there, and the size alone is set.
_fallocate = _linux_libc_call(
    ("fallocate64", "fallocate"), [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
)
_NO_FALLOCATE = (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """``sync_file_range(SYNC_FILE_RANGE_WRITE)``: queue the range's dirty pages for the disk
    without waiting. Without it the kernel holds them back until the final fsync, and the disk
    idles while staging and writing go on. A hint only: durability still comes from the fsync
    (where the call is missing, nothing is done)."""
    if _sync_file_range is not None and nbytes:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


# Folders where direct I/O was tried: True once a direct write worked, False once it was
# refused (then that folder's files are written buffered without trying again).
_direct_folders: dict[str, bool] = {}
_direct_lock = threading.Lock()


def _direct_known(folder: str) -> bool | None:
    with _direct_lock:
        return _direct_folders.get(folder)


def _remember_direct(folder: str, works: bool) -> None:
    with _direct_lock:
        if works:
            _direct_folders.setdefault(folder, True)  # a refusal seen by another file stays
        else:
            _direct_folders[folder] = False


def _direct_lock_anew_in_child() -> None:
    # A writer thread of the parent may have held the lock at the fork (every direct write
    # takes it); that thread does not exist in the child, which would wait for it forever.
    global _direct_lock  # noqa: PLW0603 - replaced, not released: its holder is gone
    _direct_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_direct_lock_anew_in_child)


_T = TypeVar("_T")
_Item = tuple[int, memoryview, torch.Tensor, int]
"""(file offset, bytes, the tensor that keeps those bytes alive, their memory address)."""


NAME_MAX = 255  # bytes in one file name (Linux, macOS, Windows)
TEMP_EXTRA = len(".") + len(".") + 12 + len(".tmp")  # what temp_name adds to the stem


def temp_name(name: str, ending: str = ".tmp") -> str:
    """The temporary file name for the target file name ``name``: ``.<name>.<12 hex><ending>``.

    A target name so long that this would pass the file name limit (a valid name of 238 to
    255 bytes with ``.tmp``) is cut in it (the rename gives the file its own name): the
    temporary file could not be created otherwise. Every shorter name, a step file's too, is
    kept whole.
    """
    extra = TEMP_EXTRA - len(".tmp") + len(ending)
    stem = os.fsencode(name)[: NAME_MAX - extra]
    return f".{os.fsdecode(stem)}.{secrets.token_hex(6)}{ending}"


def positive_int(name: str, value: object) -> int:
    """``value`` as an int if it is an integer of at least 1 (a numpy integer too, as steps
    are), else :class:`InvalidOptionsError` naming it; a bool is refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise InvalidOptionsError(f"{name} must be an integer of at least 1, got {value!r}")
    return int(value)


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
    writes run at once, each moving at most ``chunk_bytes`` (small tensors that lie side by
    side in the file are gathered into one ``pwritev``).

    Use it as ``async with SafetensorsWriter(path) as writer:`` (:func:`astage.save` does):
    then ``write`` only queues the bytes and the writer's own threads write them while the
    caller goes on; leaving the block without ``commit`` aborts. Without ``async with``, each
    ``write`` writes its tensor before it returns.

    ``writeback`` (on Linux): after each write, ask the kernel to start writing those pages
    to the disk (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, which does not wait), so the disk
    works while later tensors are still being copied and the final ``fsync`` has little left
    to do. It is a hint only: durability still comes from that ``fsync``.

    ``direct``: inside ``async with`` (or opened by the synchronous face), write the bulk of
    each storage with direct I/O (``O_DIRECT``) where the folder's filesystem allows it (the
    default; see the module's docstring), or never (False).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        metadata: Mapping[str, str] | None = None,
        threads: int = DEFAULT_THREADS,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        writeback: bool = True,
        direct: bool = True,
    ) -> None:
        given = fs_path(path, "path")
        if os.path.basename(given) in ("", ".", ".."):
            # abspath() would drop the separator of "ckpt/" and write a file named "ckpt".
            raise InvalidOptionsError(
                f"path {given!r} names a folder, not a file: give the checkpoint file's path"
            )
        self.path = os.path.abspath(given)
        try:
            self.metadata = dict(metadata or {})
        except (TypeError, ValueError):
            raise InvalidOptionsError(
                f"metadata must be a mapping of str to str, not {type(metadata).__qualname__}"
            ) from None
        self.threads = positive_int("threads", threads)
        self.chunk_bytes = positive_int("chunk_bytes", chunk_bytes)
        self.writeback = writeback and _sync_file_range is not None
        self.direct = bool(direct) and _O_DIRECT != 0
        self._direct_fd: int | None = None  # the same file opened with O_DIRECT, when allowed
        self._direct_ok = False  # False from the first refused direct write on
        self.direct_bytes = 0
        """Bytes written with direct I/O so far (the rest went through the page cache)."""
        self.layout: Layout | None = None
        self._layout_memo: LayoutMemo | None = None
        self.temp_path: str | None = None
        self._fd: int | None = None
        self._folder_fd: int | None = None  # the target's folder, to fsync after the rename
        self._state = "new"  # new -> open -> committed | aborted
        self._scheduled: set[int] = set()  # id() of entries whose bytes are written or queued
        self._error: BaseException | None = None
        self._limiter: anyio.CapacityLimiter | None = None
        self._entered = False  # `async with`: write() queues to the writer's own threads
        self._background: WriteThreads | None = None  # those threads, from begin() on

    @property
    def write_threads(self) -> WriteThreads | None:
        """The writer's own threads, from ``begin`` on when entered (else None)."""
        return self._background

    # -- `async with`: writes in the writer's own threads -------------------------------------

    async def __aenter__(self) -> SafetensorsWriter:
        if self._entered or self._state != "new":
            raise UsageError(
                f"{self.path}: this writer was already entered or used; a writer writes one "
                "file once (astage.save enters the writer it is given: pass it un-entered)"
            )
        self._entered = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._state in ("new", "open"):  # left without a commit: leave no trace
            await self.abort()

    # -- the protocol -------------------------------------------------------------------------

    async def begin(self, state_dict: Any) -> None:
        """Plan the file for ``state_dict``'s structure, create it and write its header."""
        self._start_begin()
        self._limiter = anyio.CapacityLimiter(self.threads)
        try:
            await anyio.to_thread.run_sync(self._open, state_dict, self._entered, True)
        except BaseException:
            await self.abort()
            raise

    async def write(self, path: Path, tensor: torch.Tensor) -> None:
        """Write (or, inside ``async with``, queue) the bytes of the tensor at ``path``."""
        items = self._items_for(path, tensor)
        if items is None:
            return  # a storage reached again (a tied tensor, a view): its bytes are on the way
        if self._background is not None:
            self._background.put(items)
        else:
            await self._write_now(items)
            self._check_open()
        self._scheduled.add(id(self._entry(path)))

    async def commit(self) -> None:
        """Wait for every write, fsync, rename over the target and fsync the folder."""
        if self._background is None:
            self._check_complete()
            await self._in_thread(self._finish)
            return
        threads = self.commit_in_threads()
        try:
            await threads.wait_async()
        except BaseException:
            # Cancelled while the threads commit: abort (unless the rename is done) and wait,
            # so that no thread of this writer runs on once the caller has moved on.
            with anyio.CancelScope(shield=True):
                threads.abort()
                await threads.wait_async()
            raise
        threads.raise_failure()

    async def abort(self) -> None:
        """Stop writing and remove the temporary file; the previous file stays. Idempotent.

        Once the threads of a committing writer have renamed the file into place, the commit
        stands: abort then waits for it to end and leaves the file.
        """
        # Cleanup runs to its end even if the caller is cancelled meanwhile: the descriptor
        # is closed only once no thread can still be inside a system call on it.
        background = self._background
        if background is not None:
            with anyio.CancelScope(shield=True):
                background.abort()
                await background.wait_async()  # the last thread out closed and removed
            return
        if self._state in ("aborted", "committed"):
            return
        with anyio.CancelScope(shield=True):
            if self._state != "committed":  # a commit whose await was cancelled may have ended
                self._state = "aborted"
                # Not under the writer's limiter: no write of ours is running any more.
                await anyio.to_thread.run_sync(self._close_and_remove)

    # -- the thread side, shared by both faces -------------------------------------------------

    def open_in_threads(self, state_dict: Any) -> WriteThreads:
        """Blocking: plan the file, create it, write its header and start the writer's threads.

        The synchronous face's ``begin``: then :meth:`queue` each staged tensor and seal with
        :meth:`commit_in_threads`. No event loop is needed.
        """
        self._start_begin()
        try:
            self._open(state_dict, True)
        except BaseException:
            if self._background is not None:
                # Started already (a ^C as _open returned): stopped, the last thread out
                # closes and removes; never closed under them, nor left waiting for pieces.
                self._background.abort()
                self._background.wait()
            else:
                self._state = "aborted"
                self._close_and_remove()
            raise
        assert self._background is not None
        return self._background

    def queue(self, path: Path, tensor: torch.Tensor) -> None:
        """Queue the bytes of the tensor at ``path`` for the writer's threads; any thread."""
        if self._background is None:
            raise UsageError(f"{self.path}: queue() needs the writer's threads (begin first)")
        items = self._items_for(path, tensor)
        if items is not None:
            self._background.put(items)
            self._scheduled.add(id(self._entry(path)))

    def commit_in_threads(self, after_commit: Callable[[], None] | None = None) -> WriteThreads:
        """Seal the file: the writer's threads finish it without the caller (or its loop).

        Once every queued piece is written, the last thread fsyncs the file, renames it over
        the target, fsyncs the folder and calls ``after_commit`` (a blocking function, in that
        thread); an exception from it fails the save. Returns the threads, whose ``wait`` /
        ``wait_async`` say when that is done, and whose ``abort`` stops it before the rename.
        """
        background = self._background
        if background is None:
            raise UsageError(
                f"{self.path}: commit_in_threads() needs the writer's threads: enter it with "
                "`async with` before begin(), or open it with open_in_threads()"
            )
        self._check_complete()
        background.seal(after_commit)
        return background

    # -- internals ----------------------------------------------------------------------------

    def _use_layout_memo(self, memo: LayoutMemo) -> None:
        """For astage.save and save_sync: plan the file with ``memo``, the stager's, so that a
        layout its last save planned is taken where the state dict still matches it
        (:class:`~astage._files._layout.LayoutMemo`). Before ``begin``; a writer already
        begun keeps its layout (and ``begin`` says so)."""
        if self._state == "new":
            self._layout_memo = memo

    def _start_begin(self) -> None:
        if self._state != "new":
            raise UsageError(f"{self.path}: begin() was already called on this writer")
        self._state = "open"

    def _open(self, state_dict: Any, background: bool, beside_loop: bool = False) -> None:
        """Runs in a thread: plan, create the temporary file, write the header, start threads.

        ``beside_loop``: the caller's event loop waits meanwhile; the plan, a long stretch of
        Python, lets it take the GIL every so often (:mod:`astage._drivers._gil`).
        """
        # The plan allocates a few objects per tensor, which set off collections over the
        # whole heap: over 20,000 small tensors, oldest-generation passes of 60-170 ms, which
        # hold the GIL and so stalled the event loop this thread was meant to spare.
        with gc_paused():
            sharing = GilSharing() if beside_loop else None
            layout = plan_layout(state_dict, self.metadata, self._layout_memo, sharing)
        self.layout = layout
        folder, name = os.path.split(self.path)
        self.temp_path = os.path.join(folder, temp_name(name))
        self._create(self.temp_path, layout)
        if background:
            # Only for the writer's own threads: a direct write returns when the disk has the
            # bytes, so a caller that awaits each write (no `async with`) would wait on the
            # disk tensor by tensor, where a buffered write returns after a copy.
            self._open_direct(self.temp_path)
        for entry in layout.entries:
            if entry.nbytes == 0:
                self._scheduled.add(id(entry))
        if background:
            self._background = WriteThreads(self, beside_loop)

    async def _in_thread(self, fn: Callable[..., _T], *args: Any) -> _T:
        # Never abandoned on cancellation: the await returns only when `fn` has returned.
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    def _check_open(self) -> None:
        if self._error is not None:
            raise self._error
        if self._background is not None:
            failure = self._background.error
            if failure is not None:
                raise failure
        if self._state != "open":
            raise UsageError(f"{self.path}: this writer is {self._state}, not open")

    def _check_complete(self) -> None:
        if self._background is None:
            self._check_open()
        elif self._state != "open" and self._background.error is None:
            # (a failed write is the threads' to report, once sealed)
            raise UsageError(f"{self.path}: this writer is {self._state}, not open")
        assert self.layout is not None
        entries = self.layout.entries
        # Every id in _scheduled is an entry's: equal counts mean none is missing (the list
        # below, on the loop, took a few ms over 50,000 entries at every commit).
        if len(self._scheduled) == len(entries):
            return
        missing = [e for e in entries if id(e) not in self._scheduled]
        if missing:
            where = format_path(missing[0].paths[0])
            raise UsageError(f"{self.path}: commit() before the tensor at {where} was written")

    def _entry(self, path: Path) -> Entry:
        assert self.layout is not None
        entry = self.layout.by_path.get(path)
        if entry is None:
            raise InvalidOptionsError(f"{self.path}: no tensor at {format_path(path)} in this file")
        return entry

    def _items_for(self, path: Path, tensor: torch.Tensor) -> list[_Item] | None:
        """The pieces to write for ``path``; None when its storage's bytes are on the way."""
        self._check_open()
        entry = self._entry(path)
        if id(entry) in self._scheduled:
            return None
        return self._pieces(entry, tensor, path)

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
        address = _address(data)
        step = self.chunk_bytes
        return [
            (offset + start, data[start : start + step], tensor, address + start)
            for start in range(0, len(data), step)
        ]

    async def _write_now(self, items: list[_Item]) -> None:
        """Write one tensor's pieces, ``threads`` at a time (without ``async with``)."""
        if len(items) == 1:
            await self._write_job(items)
            return
        written = 0

        async def piece(item: _Item) -> None:
            nonlocal written
            await self._write_job([item])
            written += 1

        async with anyio.create_task_group() as pieces:
            for item in items:
                pieces.start_soon(piece, item)
        if written < len(items):
            # A piece's task ended unwritten (a cancellation that reached it before its
            # thread ran), yet the group did not raise: on asyncio, anyio ends a group whose
            # tasks are all done without a checkpoint. Unchecked, write() returned and
            # commit() made the file durable with a hole in the tensor's bytes.
            await anyio.lowlevel.checkpoint_if_cancelled()
            if self._error is None:
                self._error = CheckpointWriteError(
                    f"{self.path}: {len(items) - written} of a tensor's {len(items)} pieces "
                    "were not written (their writes were cancelled before they ran)"
                )
            raise self._error

    async def _write_job(self, items: list[_Item]) -> None:
        """Write ``items`` in a worker thread; a failure is recorded (the next call raises it)."""
        try:
            await self._in_thread(self._write_items, items)
        except Exception as error:  # noqa: BLE001 - recorded; write() and commit() raise it
            if self._error is None:
                self._error = write_failure(self.path, error)

    def _write_items(self, items: list[_Item], sharing: GilSharing | None = None) -> None:
        """Runs in a thread: the bulk of big pieces direct, the rest buffered; each side in
        runs of pieces that lie side by side in the file, one ``pwritev`` a run. ``sharing``:
        beside the caller's event loop, ticked at each piece (a batch of 1,024 small pieces is
        1-1.5 ms of Python)."""
        fd = self._fd
        if fd is None or self._state != "open":
            return
        buffered: list[tuple[int, memoryview]] = []
        direct: list[tuple[int, memoryview]] = []
        for offset, data, _, address in items:
            if self._direct_ok and len(data) >= _DIRECT_MIN_BYTES:
                self._split_direct(offset, data, address, direct, buffered)
            else:
                buffered.append((offset, data))
            if sharing is not None:
                sharing.tick()
        # Gathered, neighbours go to the disk as one big request rather than many small ones:
        # the benchmark VM's disk takes ~4 ms for a 1 MiB direct write and ~15 ms for 8 MiB.
        for start, end, run in _runs(direct):
            buffered.extend(self._write_direct_run(run, start, end))
        for start, end, run in _runs(buffered):
            self._write_run(fd, [data for _, data in run], start, end)

    def _split_direct(
        self,
        offset: int,
        data: memoryview,
        address: int,
        direct: list[tuple[int, memoryview]],
        buffered: list[tuple[int, memoryview]],
    ) -> None:
        """Sort ``data`` (at file ``offset``) into its whole pages for direct I/O and its head
        and tail for a buffered write; all of it buffered where it cannot go direct."""
        head = -offset % _ALIGN
        body = (len(data) - head) // _ALIGN * _ALIGN
        if body <= 0 or (address + head) % _ALIGN:
            # Not a whole page, or not aligned like its offset (a malloc'ed buffer lies 64
            # bytes past a page): a bounce buffer would cost a copy and serialize the disk
            # behind it (measured: 1.5-2x slower than the page cache on the benchmark VM), so
            # this piece goes buffered.
            buffered.append((offset, data))
            return
        direct.append((offset + head, data[head : head + body]))
        buffered.extend([(offset, data[:head]), (offset + head + body, data[head + body :])])

    def _write_direct_run(
        self, run: list[tuple[int, memoryview]], start: int, end: int
    ) -> list[tuple[int, memoryview]]:
        """Write ``run`` (whole pages, side by side from file offset ``start``) with direct
        I/O; return nothing, or all of it once direct I/O was refused, for a buffered write."""
        direct_fd = self._direct_fd
        if not self._direct_ok or direct_fd is None:  # refused by an earlier run of this call
            return run
        try:
            pwritev_all(direct_fd, [data for _, data in run], start)
        except OSError as error:
            if error.errno not in _DIRECT_REFUSED:
                raise
            # Refused after the open (some network filesystems): this file and folder go
            # buffered from now on; whatever was written directly is rewritten, same bytes.
            self._direct_ok = False
            _remember_direct(os.path.dirname(self.path), False)
            return run
        with _direct_lock:
            self.direct_bytes += end - start
        return []

    def _write_run(self, fd: int, run: list[memoryview], start: int, end: int) -> None:
        pwritev_all(fd, run, start)
        if self.writeback and _sync_file_range is not None:
            # Start the disk on these pages now; errors surface at the final fsync.
            _sync_file_range(fd, start, end - start, _SYNC_FILE_RANGE_WRITE)

    def _create(self, temp: str, layout: Layout) -> None:
        """Runs in a thread: check the target, open its folder, create the temporary file,
        reserve its space, write the header."""
        self._check_target()
        try:
            # Opened before anything is written: a folder this process may write but not read
            # (mode 0o300) cannot be fsynced, and finding that out after the rename would
            # fail a save whose file had already replaced the previous one.
            self._folder_fd = os.open(
                os.path.dirname(self.path), os.O_RDONLY | _O_DIRECTORY | os.O_CLOEXEC
            )
        except OSError as error:
            raise _write_error(self.path, "cannot open the folder of", error) from error
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except OSError as error:
            raise _write_error(self.path, "cannot create a temporary file for", error) from error
        self._fd = fd
        try:
            _reserve(fd, layout.file_size)
            pwritev_all(fd, [memoryview(piece) for piece in layout.header_pieces], 0)
        except OSError as error:
            raise _write_error(self.path, "cannot write", error) from error

    def _check_target(self) -> None:
        """Refuse, before anything is staged or written, a target the final rename would
        refuse (a folder; a name too long for its folder: the temporary file's name is cut
        to fit, so only the rename would find out) or must not replace: a FIFO, a device
        such as /dev/null (which root may replace), a socket. A regular file is replaced,
        and so is a symbolic link (not followed) that leads to one or nowhere; one that
        leads to a folder or a special file (/dev/stdout) is refused as that would be."""
        folder, name = os.path.split(self.path)
        mode = _mode(self.path, os.lstat)  # None: not there (the usual case)
        if mode is not None and stat.S_ISLNK(mode):
            try:
                destination = os.path.abspath(os.path.join(folder, os.readlink(self.path)))
            except OSError:
                destination = ""  # gone meanwhile: as if never there
            if destination.startswith("/proc/"):
                # /dev/stdout and the like name a descriptor of whichever process opens
                # them: replacing the link would take it from every process.
                raise CheckpointWriteError(
                    f"cannot write {self.path}: it is a link to a process's descriptor "
                    f"({destination}), not to a file; give a file's path"
                )
            mode = _mode(self.path, os.stat)  # None: a dangling link, replaced
        if mode is not None and stat.S_ISDIR(mode):
            refusal = OSError(errno.EISDIR, os.strerror(errno.EISDIR), self.path)
            raise _write_error(self.path, "cannot write", refusal)
        if mode is not None and not stat.S_ISREG(mode):
            raise CheckpointWriteError(
                f"cannot write {self.path}: it is not a regular file (a FIFO, a device or a "
                "socket), which a save would replace; give a file's path"
            )
        try:
            name_max = os.pathconf(folder, "PC_NAME_MAX")
        except (OSError, ValueError):
            return  # no folder (the create says so), or no limit to know
        if name_max > 0 and len(os.fsencode(name)) > name_max:  # -1 (or 0): no limit known
            refusal = OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), self.path)
            raise _write_error(self.path, "cannot write", refusal)

    def _open_direct(self, temp: str) -> None:
        """Open the file a second time with O_DIRECT, where this folder allows it."""
        folder = os.path.dirname(self.path)
        if not self.direct or _direct_known(folder) is False:
            return
        try:
            self._direct_fd = os.open(temp, os.O_WRONLY | os.O_CLOEXEC | _O_DIRECT)
        except OSError as error:
            if error.errno in _DIRECT_DENIED:
                return  # this file's mode (not the folder's filesystem): the next may work
            if error.errno not in _DIRECT_REFUSED:
                raise _write_error(self.path, "cannot open", error) from error
            _remember_direct(folder, False)  # tmpfs says EINVAL: ask no more
            return
        self._direct_ok = True

    def _finish(self, may_rename: Callable[[], bool] | None = None) -> bool:
        """Runs in a thread: fsync, rename over the target, fsync the folder.

        ``may_rename`` (called under the threads' lock, right before the rename) says whether
        an abort came first; then nothing is renamed and False is returned.
        """
        fd, temp = self._fd, self.temp_path
        assert fd is not None and temp is not None
        try:
            os.fsync(fd)
        except OSError as error:
            raise _write_error(self.path, "cannot flush", error) from error
        if may_rename is not None and not may_rename():
            return False
        if self.direct_bytes:
            _remember_direct(os.path.dirname(self.path), True)
        self._close_direct()
        self._fd = None
        try:
            os.close(fd)  # may report a failed write-back (NFS): then nothing is renamed
        except OSError as error:
            raise _write_error(self.path, "cannot close", error) from error
        try:
            os.replace(temp, self.path)
        except OSError as error:
            raise _write_error(self.path, "cannot rename the temporary file to", error) from error
        self._state = "committed"
        folder_fd, self._folder_fd = self._folder_fd, None
        assert folder_fd is not None
        try:
            fsync_folder_fd(folder_fd)
        except OSError as error:
            raise _write_error(
                self.path, "renamed, but cannot fsync the folder of", error
            ) from error
        finally:
            with contextlib.suppress(OSError):
                os.close(folder_fd)
        return True

    def _close_direct(self) -> None:
        direct_fd, self._direct_fd = self._direct_fd, None
        self._direct_ok = False
        if direct_fd is not None:
            with contextlib.suppress(OSError):
                os.close(direct_fd)

    def _close_and_remove(self) -> None:
        self._close_direct()
        descriptors = (self._fd, self._folder_fd)
        self._fd = self._folder_fd = None
        for fd in descriptors:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        if self.temp_path is not None:
            with contextlib.suppress(OSError):  # gone already, or the first error says why
                os.unlink(self.temp_path)


class WriteThreads:
    """One file's writer threads: they write queued pieces; the last one out ends the file.

    Plain threads owned by the writer rather than anyio worker tasks, because the work must go
    on without the event loop: once the caller has queued every piece and sealed the file, the
    writes, fsync, rename, folder fsync and ``after_commit`` finish here even if the caller's
    loop never turns again (a training step that blocks it), and the synchronous face has no
    loop at all. Non-daemon: an interpreter that exits while a sealed file is being committed
    waits for it rather than leave a temporary file.

    The last thread out commits (sealed, no failure, no abort) or closes the descriptor and
    removes the temporary file (failure or abort), then runs the done callbacks (a buffer
    hold's release) and sets :meth:`done`. :meth:`abort` wins if it comes before the rename:
    right before renaming, the last thread checks for an abort and marks the commit decided,
    both under the threads' lock, so a later abort finds it decided and the commit stands.
    """

    def __init__(self, writer: SafetensorsWriter, beside_loop: bool = False) -> None:
        self._writer = writer
        self._beside_loop = beside_loop  # an async face's: the threads share the GIL with it
        self._lock = threading.RLock()
        # One condition a thread, on the one lock: a put wakes the threads it has work for.
        self._wakes = [threading.Condition(self._lock) for _ in range(writer.threads)]
        self._queued = 0  # bytes of the queued pieces
        self._pieces: deque[_Item] = deque()
        self._sealed = False
        self._aborted = False
        self._after_commit: Callable[[], None] | None = None
        self._callbacks: list[Callable[[], None]] = []
        self._renaming = False  # the last thread is past the point where an abort wins
        self._ended = False  # the last thread has run the callbacks (under the lock)
        self._finished = threading.Event()
        self.error: BaseException | None = None
        """Why the file was not committed (or why its ``after_commit`` failed)."""
        self.committed = False
        """Whether the file was renamed into place."""
        self.finished_at: float | None = None
        """``time.perf_counter()`` when the last thread was done."""
        self.cpu_seconds = 0.0
        """CPU time the threads spent, all together (``time.thread_time``), once done."""
        self._name = os.path.basename(writer.path)
        self._running = 0
        # The first thread starts now; each other one only once there is work for it
        # (_wanted), started by a thread of the writer's, never on the caller's loop: a file
        # of small pieces never has them, and starting four threads cost the loop 2-3 ms.
        self._started = 1
        self._begun: set[int] = set()  # threads that entered _work
        self._abandoned: set[int] = set()  # spares whose start raised, counted out
        created: list[threading.Thread] = []
        try:
            thread = self._thread(0)
            with self._lock:
                self._running += 1
            created.append(thread)
            thread.start()
        except BaseException as error:  # the system refused a thread, or ^C came meanwhile
            self._stop_started(created)
            if isinstance(error, RuntimeError):
                raise CheckpointWriteError(
                    f"cannot start a writer thread for {writer.path}"
                ) from error
            raise

    def _thread(self, index: int) -> threading.Thread:
        return threading.Thread(
            target=self._work,
            args=(index,),
            name=f"astage-writer-{index}:{self._name}",
            daemon=False,
        )

    def _stop_started(self, created: list[threading.Thread]) -> None:
        """Starting the threads failed: stop those that started and end the file (close,
        remove) before the caller hears of it, so that its own cleanup cannot close the
        same descriptors a second time, and no non-daemon thread is left waiting for pieces
        (it would keep the interpreter from exiting)."""
        self.abort()
        for thread in created:
            with contextlib.suppress(RuntimeError):  # never started (or not yet known to)
                thread.join()
        with self._lock:
            ended = self._ended or self._running == 0
            self._running = 0  # the threads that never started are not running
        if not ended:
            self._end()
        self._finished.wait()

    # -- what the faces call --------------------------------------------------------------------

    def put(self, items: list[_Item]) -> None:
        """Queue pieces for the threads."""
        with self._lock:
            self._pieces.extend(items)
            self._queued += sum(len(item[1]) for item in items)
            for index in range(self._started):
                if not self._wanted(index):
                    break
                self._wakes[index].notify()

    def seal(self, after_commit: Callable[[], None] | None) -> None:
        """No more pieces: once they are written, the last thread commits."""
        with self._lock:
            self._after_commit = after_commit
            self._sealed = True
            self._wake_all()

    def abort(self) -> bool:
        """Stop; the temporary file goes. False when too late (renamed, or ended already)."""
        with self._lock:
            if self._renaming or self._ended:
                return False
            self._aborted = True
            self._pieces.clear()
            self._queued = 0
            self._wake_all()
            return True

    def add_done_callback(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` in the last thread once the file has ended (now if it has)."""
        with self._lock:
            if not self._ended:
                self._callbacks.append(callback)
                return
        callback()

    def done(self) -> bool:
        """Whether the file has ended (committed, failed or aborted) and the threads stopped."""
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until :meth:`done`, at most ``timeout`` seconds; whether it is."""
        return self._finished.wait(timeout)

    async def wait_async(self) -> None:
        """Wait until :meth:`done` without blocking the event loop; cancellable."""
        if self._finished.is_set():
            return
        # Not abandoned on cancel: the waiting thread notices the cancellation within a poll
        # and returns, so no thread is left behind; the writer's threads are not its business.
        await anyio.to_thread.run_sync(self._wait_in_worker)

    def raise_failure(self) -> None:
        """Once done: raise why the file was not committed (or its ``after_commit``'s error)."""
        if self.error is not None:
            raise self.error
        if not self.committed:
            raise CheckpointWriteError(
                f"the save to {self._writer.path} was cancelled before it committed; "
                "the previous checkpoint stays"
            )

    # -- the threads ----------------------------------------------------------------------------

    def _wait_in_worker(self) -> None:
        while not self._finished.wait(_CANCEL_POLL_S):
            anyio.from_thread.check_cancelled()

    def _work(self, index: int) -> None:
        with self._lock:
            if index in self._abandoned:
                return  # its start raised and it was counted out: it must not count itself
            self._begun.add(index)
        started = time.thread_time()
        try:
            self._write_queued(index)
        except BaseException as error:  # noqa: BLE001 - never expected: fail, never commit a hole
            with self._lock:
                if self.error is None:
                    self.error = write_failure(self._writer.path, error)
                self._wake_all()
        finally:
            with self._lock:
                self._running -= 1
                last = self._running == 0
                self.cpu_seconds += time.thread_time() - started
            if last:
                self._end()

    def _write_queued(self, index: int) -> None:
        """Thread ``index``'s loop: take the pieces it is wanted for and write them, until the
        file is sealed and its part is done, or stopped."""
        writer = self._writer
        wake = self._wakes[index]
        sharing = GilSharing() if self._beside_loop else None
        while True:
            with self._lock:
                while not (
                    self._stopping() or (self._pieces and self._wanted(index)) or self._sealed
                ):
                    wake.wait()
                if self._stopping() or not (self._pieces and self._wanted(index)):
                    return  # sealed, and what is left (if anything) is the first thread's
                items = self._take()
                spare = self._spare()
            if spare is not None:
                self._start_spare(spare)
            try:
                writer._write_items(items, sharing)
            except BaseException as error:  # noqa: BLE001 - the file is lost: stop the others
                with self._lock:
                    if self.error is None:
                        self.error = write_failure(writer.path, error)
                    # Never written now: let go of them (they hold the staged tensors).
                    self._pieces.clear()
                    self._queued = 0
                    self._wake_all()
                return

    def _stopping(self) -> bool:
        return self._aborted or self.error is not None

    def _wanted(self, index: int) -> bool:
        """Under the lock: whether thread ``index`` should write now. The first always; each
        other one once :data:`SPARE_THREAD_BYTES` more are queued, in pieces of
        :data:`SPARE_THREAD_PIECE_BYTES` or more on average. Small pieces cost their threads
        Python (per piece, holding the GIL) more than disk time, and more threads only took
        turns at the GIL against the caller's event loop: over 20,000 small tensors (13 MB,
        queued faster than written), with four threads a 1 ms heartbeat's p99 during staging
        was 1.6-4.9 ms (max 3-9 ms), with one 0.7-1.2 ms (max 1-2 ms), the save as fast. Big
        pieces, whose writes wait on the disk without the GIL, still get every thread."""
        queued = self._queued
        return index == 0 or (
            queued >= index * SPARE_THREAD_BYTES
            and queued >= len(self._pieces) * SPARE_THREAD_PIECE_BYTES
        )

    def _spare(self) -> int | None:
        """Under the lock: the index of a thread not started yet that has work now, counted
        as running from here on (the caller starts it); None when none does."""
        index = self._started
        if index == len(self._wakes) or self._stopping() or not self._wanted(index):
            return None
        self._started += 1
        self._running += 1
        return index

    def _start_spare(self, index: int) -> None:
        """Start thread ``index`` (counted as running); one the system refuses (any exception
        from ``start``) is done without: the threads running write everything."""
        try:
            self._thread(index).start()
        except Exception:  # noqa: BLE001 - RuntimeError, MemoryError: the others write it all
            with self._lock:
                # Counted out unless it began after all (start() can raise after the OS
                # thread runs); never 0 here: the calling thread is still running.
                if index not in self._begun:
                    self._abandoned.add(index)
                    self._running -= 1

    def _wake_all(self) -> None:
        """Under the lock: every thread looks again (sealed, aborted, failed)."""
        for wake in self._wakes:
            wake.notify_all()

    def _take(self) -> list[_Item]:
        """Under the lock: one piece, and its queued neighbours up to ``chunk_bytes``."""
        first = self._pieces.popleft()
        items = [first]
        gathered = len(first[1])
        limit = self._writer.chunk_bytes
        while self._pieces and gathered < limit and len(items) < _IOV_MAX:
            more = self._pieces.popleft()
            items.append(more)
            gathered += len(more[1])
        self._queued -= gathered
        return items

    def _end(self) -> None:
        """The last thread out: commit (when sealed and nothing failed), or clean up."""
        started = time.thread_time()
        writer = self._writer
        try:
            if self._sealed and not self._stopping() and writer._finish(self._may_rename):
                self.committed = True
                after_commit = self._after_commit
                if after_commit is not None:
                    after_commit()
        except BaseException as error:  # noqa: BLE001 - reported by raise_failure()
            self.error = error
        finally:
            self.committed = writer._state == "committed"  # renamed, even if a later step failed
            if not self.committed:
                writer._state = "aborted"
                writer._close_and_remove()
            with self._lock:
                self._ended = True
                callbacks, self._callbacks = self._callbacks, []
            for callback in callbacks:
                try:
                    callback()
                except BaseException as error:  # noqa: BLE001 - the others still run
                    if self.error is None:
                        self.error = error
            self.finished_at = time.perf_counter()
            self.cpu_seconds += time.thread_time() - started
            self._finished.set()

    def _may_rename(self) -> bool:
        with self._lock:
            if self._aborted:
                return False
            self._renaming = True  # from here on an abort is too late: the commit stands
            return True


def _mode(path: str, status: Callable[[str], os.stat_result]) -> int | None:
    """``path``'s mode by ``status`` (``os.lstat`` or ``os.stat``); None where there is none
    to know (nothing there, or an error that creating the file will name)."""
    try:
        return status(path).st_mode
    except OSError:
        return None


def _offset(item: tuple[int, memoryview]) -> int:
    return item[0]


def _runs(
    pieces: list[tuple[int, memoryview]],
) -> list[tuple[int, int, list[tuple[int, memoryview]]]]:
    """``pieces`` (file offset, bytes) in file order, cut into runs that lie side by side:
    (start, end, pieces) each, at most ``_IOV_MAX`` pieces a run; empty pieces dropped."""
    runs: list[tuple[int, int, list[tuple[int, memoryview]]]] = []
    for offset, data in sorted(pieces, key=_offset):
        if not len(data):
            continue
        if runs:
            start, end, run = runs[-1]
            if offset == end and len(run) < _IOV_MAX:
                run.append((offset, data))
                runs[-1] = (start, end + len(data), run)
                continue
        runs.append((offset, offset + len(data), [(offset, data)]))
    return runs


def _address(data: memoryview) -> int:
    """The memory address of ``data``'s first byte (a writable, C-contiguous byte view)."""
    if not len(data):
        return 0
    return ctypes.addressof(ctypes.c_char.from_buffer(data))


def write_failure(path: str, error: BaseException) -> BaseException:
    """What a failed write of ``path`` raises: an OSError becomes a CheckpointWriteError."""
    if isinstance(error, OSError):
        return _write_error(path, "cannot write", error)
    return error


def _write_error(path: str, doing: str, error: OSError) -> CheckpointWriteError:
    reason = error.strerror or str(error)
    code = errno.errorcode.get(error.errno, "") if error.errno is not None else ""
    failure = CheckpointWriteError(f"{doing} {path}: {reason}" + (f" ({code})" if code else ""))
    failure.__cause__ = error
    return failure


def pwritev_all(fd: int, buffers: list[memoryview], offset: int) -> None:
    """Write every byte of ``buffers`` at ``offset``, resuming after partial writes."""
    pending = [b for b in buffers if len(b)]
    first = 0  # pending[first:] is left to write: an index, as popping the front of a list
    # of more than IOV_MAX buffers, one at a time, is quadratic in their number
    while first < len(pending):
        written = os.pwritev(fd, pending[first : first + _IOV_MAX], offset)
        if written <= 0:
            raise OSError(errno.EIO, "pwritev wrote nothing")
        offset += written
        while first < len(pending) and written >= len(pending[first]):
            written -= len(pending[first])
            first += 1
        if written:
            pending[first] = pending[first][written:]


def _reserve(fd: int, size: int) -> None:
    """Give the file its final size; reserve the blocks too where the filesystem can."""
    if size == 0:
        return
    if _fallocate is not None:
        while _fallocate(fd, 0, 0, size):  # a full disk fails here, before any data is copied
            code = ctypes.get_errno()
            if code == errno.EINTR:
                continue
            if code not in _NO_FALLOCATE:
                raise OSError(code, os.strerror(code))
            break  # the filesystem has no fallocate: set the size alone
        else:
            return
    else:
        posix_fallocate = getattr(os, "posix_fallocate", None)  # not where libc lacks it (macOS)
        if posix_fallocate is not None:
            try:
                posix_fallocate(fd, 0, size)
                return
            except OSError as error:
                if error.errno not in _NO_FALLOCATE:
                    raise
    os.ftruncate(fd, size)


def fsync_folder(folder: str) -> None:
    """Make a rename inside ``folder`` durable."""
    fd = os.open(folder or ".", os.O_RDONLY | _O_DIRECTORY)
    try:
        fsync_folder_fd(fd)
    finally:
        os.close(fd)


def fsync_folder_fd(fd: int) -> None:
    """fsync an open folder; a filesystem that cannot sync folders has nothing to flush.

    The kernel answers EINVAL where a filesystem has no fsync for folders (some FUSE and
    network mounts): the rename is then as durable as that filesystem makes it, and failing
    the save for it would report a checkpoint that is in place as lost (PostgreSQL ignores
    this error for the same reason).
    """
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in _FOLDER_FSYNC_UNSUPPORTED:
            raise
