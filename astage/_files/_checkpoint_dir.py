"""CheckpointDir: numbered checkpoints in one folder for a training loop, and a ``latest`` pointer.

Layout of ``root``::

    step_000000100.safetensors
    step_000000200.safetensors
    latest                      # one line: the file name of the newest durable checkpoint

**Publishing.** A save writes ``step_<step>.safetensors`` durably (temporary file, fsync,
rename, folder fsync); only then is the checkpoint *published*: ``latest`` is replaced the
same way (a small temporary file renamed over it) and the steps beyond the newest ``keep`` are
deleted. Publishing is one ordered unit under a per-folder lock, so two saves finishing
together can never leave ``latest`` naming a step that the other one's pruning deleted, and
``latest`` always names the most recently *started* save that committed.

**Resuming.** :meth:`CheckpointDir.latest_step` and :meth:`CheckpointDir.load_latest` trust
``latest`` when it names a good file; when it is missing, unreadable, or names a missing or
corrupt file, they scan the step files newest first and take the first good one. What they
pass over is reported (:attr:`CheckpointDir.skipped` and a
:class:`~astage.CheckpointSkippedWarning`). ``latest`` is read as untrusted input: a regular
file of at most :data:`POINTER_LIMIT` bytes, ASCII, naming a step file; anything else (a FIFO,
a symbolic link, a large or binary file) is reported, never followed, and never echoed beyond a
short excerpt.

**Tidying.** A save killed mid-write leaves its temporary file behind (the size of a whole
checkpoint). On first use (``async with``, a save, or a read) the folder removes the temporary
files of its own naming (``.step_<step>.safetensors.<hex>.tmp`` and ``.latest.<hex>.tmp``).
A save holds a shared ``flock`` on the folder while it may have a temporary file there, and
tidying needs it exclusively: while any save runs, in this process or another (a reader
process polling the folder), tidying waits for a later use. Saving relies on the
**single-writer assumption**: one process at a time saves into a folder (in distributed
training, one rank per folder); publishing's order holds within one process. Where the
filesystem has no ``flock``, tidying spares only the saves in progress in this process.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import operator
import os
import re
import secrets
import stat
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, NamedTuple

import anyio
import anyio.abc
import anyio.to_thread
import torch

from .._drivers._async import Stager
from .._errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointSkippedWarning,
    CheckpointWriteError,
    ClosedError,
    InvalidOptionsError,
    UsageError,
)
from ._load import check_file, load
from ._safetensors import fs_path
from ._save import NO_OWNER, SaveHandle, SaveResult, run_save, start_in
from ._writer import (
    _O_DIRECTORY,
    DEFAULT_THREADS,
    NAME_MAX,
    TEMP_EXTRA,
    SafetensorsWriter,
    fsync_folder,
    positive_int,
)

LATEST = "latest"
POINTER_LIMIT = 256
"""Bytes of ``latest`` read at most: the pointer is one short line (a step file's name)."""

_STEP_FILE = re.compile(r"step_([0-9]+)\.safetensors", re.ASCII)
# The writer's temporary name for a target is `.<name>.<12 hex digits>.tmp` (_writer.py), and
# the pointer's is `.latest.<12 hex digits>.tmp` (_move_pointer below).
_TEMP_FILE = re.compile(r"\.(step_[0-9]+\.safetensors|latest)\.[0-9a-f]{12}\.tmp", re.ASCII)
_EXCERPT = 40  # characters of untrusted text quoted in a report, at most
# A step file's temporary name must fit in NAME_MAX whole (tidying recognises it by it).
_STEP_DIGITS = NAME_MAX - TEMP_EXTRA - len("step_.safetensors")
_STEP_LIMIT = 10**_STEP_DIGITS
# Searches for the step to resume from, at most, when files vanish under one (pruned by a save
# publishing meanwhile): each new search starts from the newer `latest`.
_RESUME_ATTEMPTS = 8
_HOLD_WAIT = 10.0  # seconds a save waits for another's tidying to end, at most


class SkippedCheckpoint(NamedTuple):
    """A file that resuming passed over, and why."""

    path: str
    """The file: a step file, or the ``latest`` pointer."""
    reason: str
    """Why it was passed over (missing, not a regular file, corrupt: the format error)."""


class _Save:
    """A save in progress in this process: its target file is not to be tidied or pruned."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.handle: SaveHandle | None = None  # a background save's, once staged
        self.finished = False
        # The folder, open with a shared lock on it while the save may have a temporary file
        # there (None where the filesystem has no such locks): see _tidy.
        self.hold: int | None = None
        self._closing = threading.Lock()  # release() runs in the save's thread and the loop's

    def done(self) -> bool:
        return self.finished or (self.handle is not None and self.handle.done())

    def release(self) -> None:
        """Let go of the folder's shared lock (once: the descriptor number may be reused)."""
        with self._closing:
            hold, self.hold = self.hold, None
        if hold is not None:
            os.close(hold)


class _Folder:
    """What every :class:`CheckpointDir` of this process on one root shares."""

    def __init__(self) -> None:
        # Publishing (pointer move + prune) and tidying are one ordered unit each: they run in
        # saves' threads and in callers' threads, so a thread lock, not an anyio one. It is
        # held across file system calls (fsync): never taken in an event loop's thread.
        self.lock = threading.Lock()
        # The saves in progress, and their sequence numbers: held only briefly (taken in the
        # event loop's thread); taken after `lock` where both are held, never before it.
        self.registry = threading.Lock()
        self.saves: list[_Save] = []
        self.started = 0  # sequence numbers handed to saves, in the order they started
        self.published = 0  # the sequence number of the save `latest` names (0: none here)
        self.latest: int | None = None  # the step `latest` names, once this process moved it
        # Files found good, by name: (inode, size, mtime, ctime) when checked; a file replaced
        # by a rename has a new inode, so a stale entry never vouches for new bytes.
        self.good: dict[str, tuple[int, int, int, int]] = {}

    def register(self, save: _Save) -> int:
        """Count ``save`` as in progress; its sequence number (the order saves started in)."""
        with self.registry:
            self.started += 1
            self.saves.append(save)
            return self.started

    def in_progress(self) -> set[str]:
        """The file names that saves in progress in this process are writing."""
        with self.registry:
            ended = [save for save in self.saves if save.done()]
            self.saves = [save for save in self.saves if not save.done()]
            names = {save.name for save in self.saves}
        for save in ended:  # a background save that failed has no other place to let go
            save.release()
        return names


class _Folders:
    """The :class:`_Folder` of each root this process uses."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_root: dict[str, _Folder] = {}

    def get(self, root: str) -> _Folder:
        with self.lock:
            return self.by_root.setdefault(root, _Folder())

    def forget_in_child(self) -> None:
        # A forked child starts with no saves of its own, and a lock that a thread of the
        # parent held at the fork would stay held forever: folders used in the child start
        # afresh. The child's copies of the parent's saves' folder locks are closed: kept,
        # they would hold the folder locked for as long as the child lives (a data loader's
        # worker, forked while a save ran), long after the parent's save let go.
        for folder in self.by_root.values():
            for save in folder.saves:
                hold, save.hold = save.hold, None  # one thread in the child: no lock needed
                if hold is not None:
                    with contextlib.suppress(OSError):
                        os.close(hold)
        self.lock = threading.Lock()
        self.by_root = {}


_FOLDERS = _Folders()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_FOLDERS.forget_in_child)


def file_name(step: int) -> str:
    """The file name of step ``step`` (zero-padded to 9 digits, so names sort like steps)."""
    return f"step_{step:09d}.safetensors"


def step_of(name: str) -> int | None:
    """The step of a step file's name, or None for any other name (non-canonical too)."""
    match = _STEP_FILE.fullmatch(name)
    if match is None:
        return None
    step = int(match.group(1))
    return step if name == file_name(step) else None


def as_step(step: object) -> int:
    """``step`` as a non-negative int, or :class:`InvalidOptionsError` saying what a step is."""
    if isinstance(step, str | bytes):
        raise InvalidOptionsError(
            f"step must be a non-negative integer, got {_shown(step)}: a CheckpointDir names "
            "its files by step number; save a named checkpoint with "
            "astage.save(state_dict, path) to a path of your own"
        )
    # A bool tensor's index is 0 or 1, as a bool's is; a meta tensor has no value to read
    # (its index is a raw RuntimeError).
    not_a_step = isinstance(step, bool) or (
        isinstance(step, torch.Tensor) and (step.dtype == torch.bool or step.is_meta)
    )
    try:
        # Integers of other kinds too: numpy's, an integer tensor of one element.
        value = None if not_a_step else operator.index(step)  # type: ignore[arg-type]
    except TypeError:
        value = None
    if value is None or value < 0:
        raise InvalidOptionsError(f"step must be a non-negative integer, got {_shown(step)}")
    if value >= _STEP_LIMIT:
        # Compared, not printed: printing a step of over 4,300 digits is a raw ValueError.
        raise InvalidOptionsError(
            f"step must be below 10**{_STEP_DIGITS}: a larger step's file name (with its "
            f"temporary name's {TEMP_EXTRA} bytes) would pass the limit of {NAME_MAX} bytes"
        )
    return value


def _shown(step: object) -> str:
    """``step`` for a message: a short repr (a caller's value, of any length)."""
    try:
        text = repr(step)
    except ValueError:  # an int of more digits than Python prints (sys.get_int_max_str_digits)
        return f"an {type(step).__qualname__} too long to print"
    return text if len(text) <= 2 * _EXCERPT else text[: 2 * _EXCERPT] + "..."


class CheckpointDir:
    """Saves step ``N`` of a training run under ``root``, keeps the newest ``keep`` of them.

    ``stager`` is the :class:`Stager` to stage with (its buffers are reused from save to
    save); without one the folder makes its own, closed by :meth:`aclose` (or ``async with``).
    ``keep=None`` keeps every checkpoint.

    Entered with ``async with``, the folder owns a task group for background saves
    (:meth:`start_save`): leaving the block waits for them, and an error in the block aborts
    them. :meth:`save` needs no ``async with``: it returns once its checkpoint is durable.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        keep: int | None = 3,
        stager: Stager | None = None,
        threads: int = DEFAULT_THREADS,
    ) -> None:
        given = fs_path(root, "root")
        if not given:
            # An unset setting (os.environ.get("CKPT_DIR", "")) would otherwise save, prune and
            # tidy in whatever the current folder is.
            raise InvalidOptionsError(
                "root is empty: give the checkpoint folder's path ('.' for the current folder)"
            )
        self.root = os.path.abspath(given)
        self.keep = keep
        self.threads = threads
        if stager is not None and not isinstance(stager, Stager):
            # Refused here, not at the first save (after the folder was made), and without
            # astage.save's advice to use save_sync: a CheckpointDir has no blocking face.
            raise InvalidOptionsError(
                f"stager must be an astage.Stager (CheckpointDir saves from async code), got "
                f"a {type(stager).__qualname__}"
            )
        self.skipped: tuple[SkippedCheckpoint, ...] = ()
        """What the last :meth:`latest_step` or :meth:`load_latest` passed over, and why."""
        self._own_stager = stager is None
        self.stager = stager if stager is not None else Stager()
        # By the folder itself, not by how this root spells it: a second CheckpointDir on the
        # same folder through a symbolic link must see this one's saves in progress (its
        # tidying would otherwise delete their temporary files) and share its lock.
        self._folder = _FOLDERS.get(os.path.realpath(self.root))
        self._tidied = False
        self._saves: anyio.abc.TaskGroup | None = None  # while entered with `async with`
        self._entered = False  # from the start of `async with` to its end
        self._pending: list[SaveHandle] = []  # background saves aclose() waits for
        self._closed = False

    # Properties: the attributes are public, and a value set later is used by a save's
    # thread (keep=0 pruned every step but the newest; "3" failed there with a raw TypeError).
    @property
    def keep(self) -> int | None:
        """How many checkpoints pruning keeps (None: every one); at least 1."""
        return self._keep

    @keep.setter
    def keep(self, keep: int | None) -> None:
        self._keep = None if keep is None else positive_int("keep", keep)

    @property
    def threads(self) -> int:
        """The writer threads of each save; at least 1."""
        return self._threads

    @threads.setter
    def threads(self, threads: int) -> None:
        self._threads = positive_int("threads", threads)

    def path_for(self, step: int) -> str:
        """The file of step ``step``."""
        return os.path.join(self.root, file_name(as_step(step)))

    # -- saving -----------------------------------------------------------------------------

    async def save(
        self, step: int, state_dict: Any, *, metadata: Mapping[str, str] | None = None
    ) -> SaveResult:
        """Save step ``step`` and return once it is durable and ``latest`` names it.

        Cancelled, it leaves nothing running and no temporary file; ``latest`` then still
        names the previous checkpoint (or, if the cancellation came after the rename, this
        one).
        """
        writer, publish, save = await self._prepare(step, metadata)
        try:
            return await run_save(state_dict, writer, self.stager, after_commit=publish)
        finally:
            save.finished = True
            save.release()

    async def start_save(
        self,
        step: int,
        state_dict: Any,
        *,
        metadata: Mapping[str, str] | None = None,
        task_group: anyio.abc.TaskGroup | None = None,
    ) -> SaveHandle:
        """Stage step ``step`` and return; the write, ``latest`` and pruning go on after.

        The write runs in a task of ``task_group``, or of the folder's own group when it was
        entered with ``async with`` (without either, :class:`~astage.UsageError`). Await the
        returned handle to bound the work in flight (the stager makes the next save wait for
        it anyway).
        """
        owner = task_group if task_group is not None else self._saves
        if owner is None:
            raise UsageError(NO_OWNER)
        writer, publish, save = await self._prepare(step, metadata)
        try:
            handle = await start_in(owner, state_dict, writer, self.stager, after_commit=publish)
        except BaseException:
            save.finished = True
            save.release()
            raise
        save.handle = handle
        owner.start_soon(_release_after, save, handle)
        self._pending = [*(h for h in self._pending if not h.done()), handle]
        return handle

    async def _prepare(
        self, step: int, metadata: Mapping[str, str] | None
    ) -> tuple[SafetensorsWriter, Callable[[], None], _Save]:
        self._check_open()
        path = self.path_for(step)
        writer = SafetensorsWriter(path, metadata=metadata, threads=self.threads)
        save = _Save(os.path.basename(path))
        try:
            await anyio.to_thread.run_sync(self._open_folder, save)
        except BaseException:
            save.release()
            raise
        sequence = self._folder.register(save)  # before its temporary file exists

        def publish() -> None:
            self._publish(save, sequence)

        return writer, publish, save

    def _open_folder(self, save: _Save | None = None) -> None:
        """Make the folder and tidy it; for ``save``, then take the folder's shared lock
        (before its temporary file exists)."""
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as error:  # a file there, or a folder above it that is one
            raise CheckpointWriteError(
                f"cannot make the checkpoint folder {self.root}: {error.strerror or error}"
            ) from error
        self._tidy()
        if save is not None:
            save.hold = _hold_folder(self.root)

    def _publish(self, save: _Save, sequence: int) -> None:
        """Runs in the save's thread once ``name`` is durable: move ``latest``, then prune.

        One ordered unit under the folder's lock: ``latest`` only moves to a file that is
        there, never back to a save that started before the one it names, and pruning never
        deletes the step ``latest`` names, a newer one, or a file a save is still writing.
        """
        folder = self._folder
        name = save.name
        path = os.path.join(self.root, name)
        with folder.lock:
            try:
                info = os.stat(path)
            except OSError as error:
                raise CheckpointWriteError(
                    f"cannot publish {path}: it is gone ({error.strerror or error}); "
                    f"{os.path.join(self.root, LATEST)} was left as it was"
                ) from error
            folder.good[name] = _identity(info)  # we wrote it and it is durable
            if sequence > folder.published:
                self._move_pointer(name)
                # Recorded before the folder's fsync, which may fail: `latest` names this save
                # from the rename on, and one that started before it must not move it back.
                folder.published = sequence
                folder.latest = step_of(name)
                self._sync_pointer(name)
            # Its file is durable and published: from here it is pruned like any other (a save
            # that published later, or this one's own prune, may delete it), not spared as a
            # file being written. Set under the lock, before the next publisher prunes.
            save.finished = True
            save.release()  # renamed: no temporary file of its own left to guard
            if self.keep is not None and folder.latest is not None:
                self._prune(folder.latest, self.keep)

    def _move_pointer(self, name: str) -> None:
        """Point ``latest`` at ``name`` (a durable temporary file renamed over it); the
        rename is durable once :meth:`_sync_pointer` returns."""
        pointer = os.path.join(self.root, LATEST)
        temp = os.path.join(self.root, f".{LATEST}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            try:
                _write_all(fd, f"{name}\n".encode("ascii"))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, pointer)
        except OSError as error:
            # Best effort: the error to report is the one above (a folder gone read-only after
            # an I/O error cannot delete either); tidying removes a leftover on a later use.
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise CheckpointWriteError(
                f"cannot move {pointer} to {name}: {error.strerror or error}"
            ) from error

    def _sync_pointer(self, name: str) -> None:
        """Make the rename of ``latest`` (to ``name``) durable: fsync the folder."""
        pointer = os.path.join(self.root, LATEST)
        try:
            fsync_folder(self.root)
        except OSError as error:
            raise CheckpointWriteError(
                f"{pointer} names {name}, but syncing the folder {self.root} failed, so a "
                f"crash may undo that: {error.strerror or error}"
            ) from error

    def _prune(self, latest: int, keep: int) -> None:
        """Keep the step ``latest`` names and the ``keep - 1`` newest good steps before it.

        Step files after ``latest`` (left by a run that went back to an earlier step) are
        neither counted nor deleted; a corrupt file does not count as one of the ``keep``.
        """
        in_progress = self._folder.in_progress()
        kept = 1
        for step in reversed(self._step_files()):
            name = file_name(step)
            if step >= latest or name in in_progress:
                continue
            if kept < keep:
                if self._problem(name) is None:
                    kept += 1
                continue
            self._delete(name, latest)
            self._folder.good.pop(name, None)

    def _delete(self, name: str, latest: int) -> None:
        """Delete the pruned step file ``name``; a folder of that name is left alone."""
        path = os.path.join(self.root, name)
        try:
            # A folder under a step file's name is not a checkpoint astage wrote (unlink
            # cannot remove it anyway): leave it, as tidying leaves one under a temporary name.
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as error:
            raise CheckpointWriteError(
                f"{os.path.join(self.root, file_name(latest))} is durable and "
                f"{os.path.join(self.root, LATEST)} names it, but pruning cannot delete "
                f"{path}: {error.strerror or error}"
            ) from error

    # -- reading back -----------------------------------------------------------------------

    def steps(self) -> list[int]:
        """Steps with a checkpoint file, oldest first (good or not: see :meth:`latest_step`)."""
        self._tidy(wait=False)
        return self._step_files()

    def latest_step(self) -> int | None:
        """The step to resume from, or None when no good checkpoint is there.

        That is the step ``latest`` names when its file is good; otherwise the newest good
        step file. Files passed over are in :attr:`skipped`, each also reported with a
        :class:`~astage.CheckpointSkippedWarning`. Blocking (it reads file headers).
        """
        found = self._resume(read=None)
        return None if found is None else found[0]

    def load_latest(
        self, *, device: str = "cpu", device_mesh: Any = None
    ) -> tuple[int, Any] | None:
        """``(step, state_dict)`` of the checkpoint to resume from, or None when there is none.

        The file is chosen as by :meth:`latest_step`; a file that fails to load is passed
        over (and reported) for the next good one. Blocking. ``device_mesh`` is passed to
        :func:`astage.load` (DTensor state dicts saved per rank).
        """
        return self._resume(read=lambda path: load(path, device=device, device_mesh=device_mesh))

    def _resume(self, read: Callable[[str], Any] | None) -> tuple[int, Any] | None:
        """The first good candidate (and what ``read`` made of it): the pointer's step, then
        the step files newest first.

        A file that was listed but is gone by the time it is checked or read was pruned by a
        save publishing meanwhile (or deleted): not a bad file, and a newer one is there. The
        search then starts over from the pointer, a few times at most (saves that keep
        pruning faster than it reads), rather than fall back to older files, or to None.
        """
        self._tidy(wait=False)
        for attempt in range(_RESUME_ATTEMPTS):
            outcome = self._resume_once(read, last=attempt == _RESUME_ATTEMPTS - 1)
            if outcome is not None:
                break
        assert outcome is not None
        found, skipped = outcome
        self.skipped = tuple(skipped)
        for item in skipped:
            message = f"resuming from {self.root}: skipped {item.path}: {item.reason}"
            warnings.warn(CheckpointSkippedWarning(message), stacklevel=3)
        return found

    def _resume_once(
        self, read: Callable[[str], Any] | None, *, last: bool
    ) -> tuple[tuple[int, Any] | None, list[SkippedCheckpoint]] | None:
        """One search: what it found and passed over; None when a listed file vanished
        (unless ``last``)."""
        skipped: list[SkippedCheckpoint] = []
        pointer = os.path.join(self.root, LATEST)
        named, problem = _read_pointer(pointer)
        steps = self._step_files()
        if problem is not None:
            skipped.append(SkippedCheckpoint(pointer, problem))
        elif named is None and steps:
            skipped.append(SkippedCheckpoint(pointer, "missing"))
        order = [] if named is None else [named]
        order += [step for step in reversed(steps) if step != named]
        listed = set(steps)
        for step in order:
            path = os.path.join(self.root, file_name(step))
            reason = self._problem(file_name(step))
            vanished = reason == "missing"
            if reason is None and read is not None:
                try:
                    return (step, read(path)), skipped
                except CheckpointNotFoundError as error:
                    reason, vanished = str(error), True
                except CheckpointError as error:
                    reason = str(error)
            elif reason is None:
                return (step, None), skipped
            if vanished and step in listed and not last:
                return None
            skipped.append(SkippedCheckpoint(path, reason))
        return None, skipped

    def _step_files(self) -> list[int]:
        return sorted(step for step in map(step_of, self._names()) if step is not None)

    def _names(self) -> list[str]:
        """The names in the folder; none while it does not exist."""
        try:
            return os.listdir(self.root)
        except FileNotFoundError:
            return []
        except OSError as error:  # a file, not a folder; no permission to list it
            raise CheckpointError(
                f"cannot list the checkpoint folder {self.root}: {error.strerror or error}"
            ) from error

    def _problem(self, name: str) -> str | None:
        """Why the step file ``name`` cannot be resumed from, or None when it is good."""
        path = os.path.join(self.root, name)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return "missing"
        except OSError as error:
            return f"cannot be read: {error.strerror or error}"
        if not stat.S_ISREG(info.st_mode):
            return "not a regular file"
        if self._folder.good.get(name) == _identity(info):
            return None
        try:
            check_file(path)
        except CheckpointNotFoundError:  # deleted since the lstat (pruned meanwhile)
            return "missing"
        except CheckpointError as error:
            return str(error)
        self._folder.good[name] = _identity(info)
        return None

    # -- tidying ----------------------------------------------------------------------------

    def _tidy(self, *, wait: bool = True) -> None:
        """Once: remove the temporary files of crashed saves (of this folder's naming).

        With ``wait=False`` (the blocking readers, which may run in an event loop's thread)
        it does not wait while a save of this process publishes: it tries again next time.
        """
        if self._tidied:
            return
        folder = self._folder
        # Under the publishing lock: no pointer is being moved meanwhile, so every
        # `.latest.*.tmp` there is an orphan.
        if not folder.lock.acquire(blocking=wait):
            return
        try:
            folder.in_progress()  # lets go of the locks of saves of this process that ended
            # A save holds the folder's shared lock while it may have a temporary file there,
            # in this process or another one (an evaluation job reading while training saves):
            # tidying needs the lock exclusively, and otherwise tries again next time.
            free, guard = _try_exclusive(self.root)
            if not free:
                return
            try:
                self._remove_orphans()
            finally:
                if guard is not None:
                    os.close(guard)
            self._tidied = True
        finally:
            folder.lock.release()

    def _remove_orphans(self) -> None:
        names = self._names()
        # Asked after listing: a save registers before it creates its temporary file, so any
        # save whose file was listed is in this answer (unless it has ended).
        in_progress = self._folder.in_progress()
        for name in names:
            match = _TEMP_FILE.fullmatch(name)
            if match is None or match.group(1) in in_progress:
                continue
            path = os.path.join(self.root, name)
            # Best effort: one that cannot be removed (another user's, in a shared folder)
            # stays, rather than fail every read and save of the folder with an OSError.
            with contextlib.suppress(OSError):
                if not stat.S_ISDIR(os.lstat(path).st_mode):
                    os.unlink(path)

    # -- lifetime ---------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Wait for the background saves, then close the stager the folder made for itself.

        A stager passed in stays open. Cancel-safe: cancelled while it waits, the saves go
        on in their owner, and a second ``aclose()`` finishes the job.
        """
        self._closed = True
        for handle in self._pending:
            # Only a save still running is waited for: waiting for one that ended is a
            # checkpoint, where a cancelled `async with` block (whose saves its task group
            # has ended) would stop here and leave the stager below open.
            if not handle.done():
                await handle.wait_quietly()
        self._pending = []
        if self._own_stager:
            with anyio.CancelScope(shield=True):  # the saves are over: nothing to wait for
                await self.stager.aclose()

    async def __aenter__(self) -> CheckpointDir:
        if self._entered:
            raise UsageError(f"CheckpointDir({self.root!r}) is already entered")
        self._check_open()
        # Marked before the first await: a second task entering meanwhile is refused, not
        # given a task group of its own that the first one's exit would then try to leave.
        self._entered = True
        try:
            await anyio.to_thread.run_sync(self._tidy)
            saves = anyio.create_task_group()
            await saves.__aenter__()
        except BaseException:
            self._entered = False
            raise
        self._saves = saves
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        saves, self._saves = self._saves, None
        self._entered = False
        assert saves is not None
        suppress = False
        try:
            if exc is not None:
                saves.cancel_scope.cancel()  # an error in the block aborts the background saves
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                suppress = bool(await saves.__aexit__(exc_type, exc, tb))
            else:
                # Waits for the saves; the block's own error propagates as it is (not inside
                # an exception group), a save's failure as the task group raises it.
                await saves.__aexit__(None, None, None)
        finally:
            await self.aclose()
        return suppress

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"CheckpointDir({self.root!r}) is closed")


async def _release_after(save: _Save, handle: SaveHandle) -> None:
    """A background save's folder lock, let go of once the save ends, however it ends."""
    try:
        # Shielded: a cancelled owner still waits for the save's task, which ends promptly;
        # let go before, the lock would no longer cover a temporary file being committed.
        with anyio.CancelScope(shield=True):
            await handle.wait_quietly()
    finally:
        save.release()


def _open_root(root: str) -> int | None:
    try:
        return os.open(root, os.O_RDONLY | os.O_CLOEXEC | _O_DIRECTORY)
    except OSError:  # not there (nothing to tidy yet), or not a folder (reported elsewhere)
        return None


def _hold_folder(root: str) -> int | None:
    """The folder, open with a shared lock on it, for a save to hold while it writes; None
    where the filesystem has no such locks (tidying is then unguarded, as before them).

    A tidier holds the lock exclusively only while it lists and deletes: waited for, a while
    at most (one that holds it for ever cannot stop saves; its listing, taken before this
    save's temporary file exists, is no danger to it).
    """
    fd = _open_root(root)
    if fd is None:
        return None
    deadline = time.monotonic() + _HOLD_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.005)
                continue
        except OSError:  # no flock on this filesystem
            pass
        os.close(fd)
        return None


def _try_exclusive(root: str) -> tuple[bool, int | None]:
    """``(free, fd)``: ``free`` is False while a save holds the folder's shared lock; ``fd``
    holds the exclusive lock, to be closed after tidying (None where the folder cannot be
    opened or locked: tidying then goes on unguarded, as before these locks)."""
    fd = _open_root(root)
    if fd is None:
        return True, None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False, None
    except OSError:  # no flock on this filesystem
        os.close(fd)
        return True, None
    return True, fd


def _write_all(fd: int, data: bytes) -> None:
    """Write ``data`` whole: a write to a nearly full disk may write a part and say so."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]


def _identity(info: os.stat_result) -> tuple[int, int, int, int]:
    # The ctime too: a write in place may put the mtime back (os.utime), never the ctime.
    return (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def _read_pointer(path: str) -> tuple[int | None, str | None]:
    """``(step, None)`` from the pointer file, ``(None, None)`` without one, else the problem.

    Untrusted input: not followed through a symbolic link, opened without blocking (a FIFO
    would otherwise wait forever for a writer), refused unless a regular file, read up to
    :data:`POINTER_LIMIT` bytes (a device file or a huge file cannot fill memory), and only
    a short excerpt of bad content goes into the report.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None, None
    except OSError as error:
        if error.errno == errno.ELOOP:
            return None, "a symbolic link (astage writes a regular file there)"
        return None, f"cannot be read: {error.strerror or error}"
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None, "not a regular file (astage writes a regular file there)"
        data = os.read(fd, POINTER_LIMIT + 1)
    except OSError as error:
        return None, f"cannot be read: {error.strerror or error}"
    finally:
        os.close(fd)
    if len(data) > POINTER_LIMIT:
        return None, f"longer than {POINTER_LIMIT} bytes (astage writes one file name there)"
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return None, f"not ASCII text: {_excerpt(data)}"
    name = text.strip(" \t\r\n")
    step = step_of(name)
    if step is None:
        return None, f"names no step file: {_excerpt(name)}"
    return step, None


def _excerpt(value: str | bytes) -> str:
    """A short repr: untrusted content is quoted, never echoed at length."""
    text = repr(value[: _EXCERPT + 1])
    return text if len(value) <= _EXCERPT and len(text) <= 2 * _EXCERPT else text[:_EXCERPT] + "..."
