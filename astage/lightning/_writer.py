"""The background writer: ``torch.save`` of staged snapshots, one file after another.

Lightning trains in plain threads with no event loop, and the write must go on while the
training thread computes the next steps, so the writes run in a thread of their own (a
one-worker :class:`~concurrent.futures.ThreadPoolExecutor`: files are committed in the order
they were saved, and the interpreter finishes queued writes before it exits) rather than on an
event loop that nothing would drive.

A local file is written next to its target under a temporary name, flushed and fsynced, then
renamed over the target (the folder fsynced after), so a reader sees the old file or the new
one, never a part. Other fsspec URLs (``s3://``...) are serialized in memory and written in one
``open(..., "wb")``, as Lightning's own ``TorchCheckpointIO`` does.

``discard(path)`` (Lightning's ``remove_checkpoint``) marks the writes queued for ``path`` so
that none of them lands afterwards; the rename happens under the same lock, so a removal and a
rename never interleave.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec  # type: ignore[import-untyped]
import torch
from fsspec.implementations.local import LocalFileSystem  # type: ignore[import-untyped]

from .._errors import CheckpointWriteError, InvalidOptionsError
from .._files._writer import temp_name


@dataclass(eq=False)
class WriteJob:
    """One queued write: the staged checkpoint, where it goes, and what happened to it."""

    path: str
    staged: Any
    release: Callable[[], None]
    discarded: bool = False
    key: str = ""
    """Which file ``path`` names (:func:`file_key`); set by :meth:`BackgroundWriter.submit`."""
    error: BaseException | None = None
    reported: bool = False
    seconds: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)


def filesystem_of(target: str) -> tuple[Any, str]:
    """fsspec's filesystem for ``target`` and the path on it; a protocol fsspec does not know
    (``nosuch://``), or one whose package is not installed, raised fsspec's bare ValueError or
    ImportError, without the checkpoint's path."""
    if "\0" in target:
        # No file has such a name: the save returned and its write failed in the background;
        # a load or a folder to make raised a bare ValueError.
        raise InvalidOptionsError(f"cannot use the checkpoint path {target!r}: it holds a NUL")
    try:
        filesystem, local = fsspec.core.url_to_fs(target)
    except (ValueError, ImportError) as error:
        raise InvalidOptionsError(
            f"cannot use the checkpoint path {target!r}: {type(error).__name__}: {error}"
        ) from error
    return filesystem, str(local)


def file_key(path: str) -> str:
    """The file ``path`` names, however it is spelled, for telling which writes are of it.

    Lightning's callers spell one file in several ways (ModelCheckpoint saves under an absolute
    real path, ``fit(ckpt_path="ckpts/last.ckpt")`` loads a relative one, a ``file://`` URL, a
    folder reached through a link): compared as given, a load did not wait for the pending
    write of its file and a removal did not drop it (the pruned file reappeared). A local path
    is made absolute with its folder's links resolved; the last part is kept as it is, since the
    write replaces that folder entry (a link there included). Other URLs are compared as given.
    """
    try:
        filesystem, local = filesystem_of(path)
    except InvalidOptionsError:  # an unknown protocol or a NUL: its save is refused anyway
        return path
    if not isinstance(filesystem, LocalFileSystem):
        return path
    local = os.path.abspath(str(local))
    return os.path.join(os.path.realpath(os.path.dirname(local)), os.path.basename(local))


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - a platform without folder descriptors
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on folders
        pass
    finally:
        os.close(fd)


class BackgroundWriter:
    """Writes jobs in order in one thread; tracks the pending ones, their errors and figures."""

    def __init__(self, serialize: Callable[[Any, Any], None] = torch.save) -> None:
        # serialize(obj, file) writes obj into an open binary file: torch.save, or a test's.
        self._serialize = serialize
        self._lock = threading.Lock()
        self._pending: list[WriteJob] = []
        self._failed: list[WriteJob] = []
        self._executor: ThreadPoolExecutor | None = None
        self.written = 0
        self.discarded = 0
        self.write_seconds = 0.0

    # -- the training thread's side -----------------------------------------------------------

    def submit(self, job: WriteJob) -> None:
        """Queue ``job``; it is written after every job queued before it."""
        job.key = file_key(job.path)
        with self._lock:
            self._pending.append(job)
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="astage-ckpt-writer")
            executor = self._executor
        try:
            executor.submit(self._run, job)
        except RuntimeError as error:
            # The executor takes no more work once the interpreter is shutting down (a last
            # save from an atexit or signal handler): the job would stay pending forever, and
            # wait() and a load of its path would wait for it forever.
            with self._lock:
                self._pending.remove(job)
            raise CheckpointWriteError(
                f"cannot queue the write of the checkpoint {job.path!r}: {error}"
            ) from error

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def wait(self, path: str | None = None, timeout: float | None = None) -> bool:
        """Wait for the jobs queued so far (for ``path`` only, if given); False on timeout."""
        key = None if path is None else file_key(path)
        with self._lock:
            jobs = [job for job in self._pending if key is None or job.key == key]
        deadline = None if timeout is None else time.monotonic() + timeout
        for job in jobs:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not job.done.wait(left):
                return False
        return True

    def discard(self, path: str, remove: Callable[[str], None]) -> None:
        """Keep every write queued for ``path`` from landing, then ``remove(path)``."""
        key = file_key(path)
        with self._lock:
            for job in self._pending:
                if job.key == key and not job.discarded:
                    job.discarded = True
            remove(path)

    def take_error(self, path: str | None = None) -> CheckpointWriteError | None:
        """The first failed write not yet reported (of ``path``, if given), as an astage error."""
        key = None if path is None else file_key(path)
        with self._lock:
            failed = [
                job for job in self._failed if not job.reported and (key is None or job.key == key)
            ]
            for job in failed:
                job.reported = True
            self._failed = [job for job in self._failed if not job.reported]
        if not failed:
            return None
        first = failed[0]
        others = f" (and {len(failed) - 1} more failed writes)" if len(failed) > 1 else ""
        error = CheckpointWriteError(
            f"writing the checkpoint {first.path!r} in the background failed{others}: "
            f"{type(first.error).__name__}: {first.error}"
        )
        error.__cause__ = first.error
        return error

    def close(self) -> None:
        """Wait for every queued write and stop the thread (a later submit starts another)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)

    # -- the writer thread's side -------------------------------------------------------------

    def _run(self, job: WriteJob) -> None:
        started = time.perf_counter()
        try:
            if not job.discarded:
                self._write(job)
        except Exception as error:  # noqa: BLE001 - raised in the training thread later
            job.error = error
        finally:
            job.seconds = time.perf_counter() - started
            # The staged tensors are no longer read: the slot may take the next snapshot.
            job.staged = None
            job.release()
            with self._lock:
                self._pending.remove(job)
                if job.error is not None:
                    self._failed.append(job)
                elif job.discarded:
                    self.discarded += 1
                else:
                    self.written += 1
                    self.write_seconds += job.seconds
            job.done.set()

    def _write(self, job: WriteJob) -> None:
        fs, target = fsspec.core.url_to_fs(job.path)
        if isinstance(fs, LocalFileSystem):
            # To the absolute path made at the save: a relative one resolved now would follow
            # an os.chdir made since (the file landed in the new working folder).
            self._write_local(job, job.key or target)
            return
        buffer = io.BytesIO()
        self._serialize(job.staged, buffer)
        if job.discarded:
            return
        with fs.open(target, "wb") as file:
            file.write(buffer.getbuffer())
        with self._lock:
            landed_after_removal = job.discarded
        if landed_after_removal:
            # remove_checkpoint ran while the bytes went out: take them back.
            with contextlib.suppress(FileNotFoundError):
                fs.rm(target)

    def _write_local(self, job: WriteJob, target: str) -> None:
        folder = os.path.dirname(target) or "."
        # Shortened where a long target's name would pass the file name limit.
        temporary = os.path.join(folder, temp_name(os.path.basename(target), ".astage-tmp"))
        # O_EXCL on a fresh name: never another writer's file; 0o666 under the umask, as
        # torch.save's own open() would create it.
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as file:
                self._serialize(job.staged, file)
                file.flush()
                os.fsync(file.fileno())
            with self._lock:
                if job.discarded:
                    os.unlink(temporary)
                    return
                os.replace(temporary, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise
        _fsync_folder(folder)
