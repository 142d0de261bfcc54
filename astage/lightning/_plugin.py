"""``AstageCheckpointIO``: Lightning checkpoints staged into host buffers, written behind.

``save_checkpoint`` runs in the training thread: it stages Lightning's checkpoint dict (tensors
into reusable host buffers, every other object deep-copied) and returns; a background thread
``torch.save``-s the staged copy. The file is what Lightning's ``TorchCheckpointIO`` writes, so
``LightningModule.load_from_checkpoint``, ``trainer.fit(ckpt_path=...)`` and ``torch.load``
read it as they read any ``.ckpt``.

Why ``torch.save`` and not astage's safetensors format: Lightning loads checkpoints with
``torch.load`` in places that bypass the plugin (``load_from_checkpoint``), and its checkpoint
dict holds arbitrary Python objects (hyperparameters, callback states) that only a pickle keeps.
What astage adds is the staging: the step waits for copies into buffers that are reused from
save to save (pinned where CUDA is present; no device memory is cloned), not for the write.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem  # type: ignore[import-untyped]
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH
from typing_extensions import override

from .._errors import (
    AstageError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    InvalidOptionsError,
)
from .._files._load import load_device
from .._options import StagingOptions, make_options
from ._snapshots import SnapshotPool
from ._writer import BackgroundWriter, WriteJob, filesystem_of


def _check_local_file(target: str) -> None:
    """Refuse a local ``target`` that is there but not a regular file: torch.load would block
    on a FIFO's open forever, read a device such as /dev/zero without end, and fail on a
    folder with a raw IsADirectoryError."""
    filesystem, local = filesystem_of(target)
    if not isinstance(filesystem, LocalFileSystem):
        return
    try:
        mode = os.stat(local).st_mode
    except OSError:
        return  # missing or unreadable: torch.load says which, and it is named then
    if not stat.S_ISREG(mode):
        raise CheckpointFormatError(f"cannot load the checkpoint {target!r}: not a regular file")


def _check_map_location(map_location: Any) -> None:
    """Refuse a ``map_location`` that no file can be loaded with, before the file is read.

    torch.load refuses it with a RuntimeError (``"cuda"`` without CUDA, a name that is no
    device), which was reported as a CheckpointFormatError of a good file: a resume that
    passes over bad files would pass over every one. A function is torch's to call.
    """
    if map_location is None or callable(map_location):
        return
    if isinstance(map_location, dict):
        places = list(map_location.values())
    elif isinstance(map_location, str | torch.device):
        places = [map_location]
    else:
        raise InvalidOptionsError(
            "map_location must be a device, a device name, a dict of them or a function, "
            f"not {type(map_location).__name__} {map_location!r}"
        )
    for place in places:
        load_device(place)  # InvalidOptionsError, or AcceleratorUnavailableError


def _cpu(storage: Any, location: str) -> Any:
    return storage  # TorchCheckpointIO's default map_location: every storage stays on the CPU


@dataclass(frozen=True)
class CheckpointIOStats:
    """What an :class:`AstageCheckpointIO` has done so far (see ``stats``)."""

    saves: int
    """``save_checkpoint`` calls that returned."""
    waits: int
    """Saves that waited for an earlier write, because every snapshot was still being written."""
    wait_seconds: float
    """The time those saves spent waiting."""
    memory_refusals: int
    """Times host memory for another snapshot was refused (the save then waited instead)."""
    stage_seconds: float
    """Time saves spent in the training thread, staging included (waits too)."""
    written: int
    """Files committed by the background writer."""
    discarded: int
    """Queued writes dropped because ``remove_checkpoint`` removed their path first."""
    write_seconds: float
    """Time the writer spent on committed files."""
    pending: int
    """Writes queued or in progress now."""
    snapshots: int
    """Host buffer sets allocated now (each about the size of the checkpoint's tensors)."""


class AstageCheckpointIO(CheckpointIO):
    """A Lightning ``CheckpointIO`` that stages checkpoints and writes them in the background.

    ``Trainer(plugins=[AstageCheckpointIO()])``. A save returns once the checkpoint's tensors
    are in host buffers; the file is written by a background thread, in the format of
    Lightning's ``TorchCheckpointIO`` (atomically: a temporary file, fsync, rename).

    ``snapshots`` buffer sets are kept (default 2): a save made while an earlier write is still
    running (``ModelCheckpoint(save_last=True)`` saves twice per epoch) stages into another one
    and does not wait. A save waits for the oldest write only when all ``snapshots`` are being
    written, or when host memory for another set was refused. Host memory: up to
    ``snapshots`` x the checkpoint's tensor bytes, allocated on first use and reused after.

    Staging options (``StagingOptions``, or its fields as keywords) go to the stagers.
    Errors of a background write are raised, as :class:`~astage.CheckpointWriteError`, by the
    next call of the plugin in the training thread (a save, load, removal, :meth:`wait`, or
    ``teardown``). ``teardown`` (the end of ``fit``/``validate``/...) waits for every write.
    """

    def __init__(
        self,
        options: StagingOptions | None = None,
        *,
        snapshots: int = 2,
        **overrides: Any,
    ) -> None:
        super().__init__()
        if isinstance(snapshots, bool) or not isinstance(snapshots, int) or snapshots < 1:
            raise InvalidOptionsError(f"snapshots must be an int >= 1, got {snapshots!r}")
        self._options = make_options(options, overrides)
        if self._options.buffers != 1:
            raise InvalidOptionsError(
                f"{type(self).__name__} keeps its own buffer sets: pass snapshots="
                f"{self._options.buffers} instead of buffers={self._options.buffers}"
            )
        self._snapshots = snapshots
        self._pool = SnapshotPool(snapshots, self._options)
        self._writer = BackgroundWriter()
        self._torch_io = TorchCheckpointIO()  # loads and removals, exactly as Lightning does
        self._lock = threading.Lock()
        self._saves = 0
        self._waits = 0
        self._wait_seconds = 0.0
        self._memory_refusals = 0
        self._stage_seconds = 0.0

    @property
    def stats(self) -> CheckpointIOStats:
        """Counters and times of the saves and writes so far."""
        return CheckpointIOStats(
            saves=self._saves,
            waits=self._waits,
            wait_seconds=self._wait_seconds,
            memory_refusals=self._memory_refusals,
            stage_seconds=self._stage_seconds,
            written=self._writer.written,
            discarded=self._writer.discarded,
            write_seconds=self._writer.write_seconds,
            pending=self._writer.pending(),
            snapshots=self._pool.slots,
        )

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        """Stage ``checkpoint`` and queue its write to ``path``; returns before the write."""
        if storage_options is not None:
            raise InvalidOptionsError(
                f"storage_options is not supported by {type(self).__name__} (got "
                f"{storage_options!r} for {os.fspath(path)!r})"
            )
        target = os.fspath(path)
        with self._lock:
            self._raise_write_error()
            started = time.perf_counter()
            self._check_target(target)
            snapshot = self._pool.take(checkpoint)
            try:
                # Made after the staging: a checkpoint that cannot be staged (a lock among the
                # hyperparameters) left the new folders of its path behind.
                self._make_folder(target)
                self._writer.submit(WriteJob(target, snapshot.staged, snapshot.release))
            except BaseException:
                snapshot.release()  # nothing will write it: its buffers are free again
                raise
            self._saves += 1
            if snapshot.waited_s is not None:
                self._waits += 1
                self._wait_seconds += snapshot.waited_s
            if snapshot.memory_refused:
                self._memory_refusals += 1
            self._stage_seconds += time.perf_counter() - started

    @override
    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Any | None = _cpu,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Load ``path`` as Lightning's ``TorchCheckpointIO`` does, once its write is done.

        A missing file raises :class:`~astage.CheckpointNotFoundError` (a FileNotFoundError),
        one ``torch.load`` cannot read, or a path that is not a regular file (a folder, a FIFO,
        a device), :class:`~astage.CheckpointFormatError`, one that cannot be opened
        :class:`~astage.CheckpointError`, naming the file. A MemoryError is raised as it is. A
        ``map_location`` naming an absent device raises
        :class:`~astage.AcceleratorUnavailableError`, one that is no device
        :class:`~astage.InvalidOptionsError`, before the file is read.
        """
        target = os.fspath(path)
        filesystem_of(target)  # a path no file can have is refused before anything else
        try:
            _check_map_location(map_location)
        except InvalidOptionsError as error:
            raise type(error)(f"cannot load the checkpoint {target!r}: {error}") from None
        self._writer.wait(target)
        self._raise_write_error(target)
        _check_local_file(target)
        if weights_only is None and target.startswith("http"):
            # Lightning loads an http(s) URL with weights_only=False when it is not given: a
            # file from the network would run whatever code its pickle names. torch.load's own
            # default (weights only) applies to every path here; False must be asked for.
            weights_only = True
        try:
            return self._torch_io.load_checkpoint(
                target, map_location=map_location, weights_only=weights_only
            )
        except FileNotFoundError as error:
            raise CheckpointNotFoundError(f"no checkpoint file at {target!r}") from error
        except OSError as error:  # a folder, no permission, an I/O error
            raise CheckpointError(
                f"cannot load the checkpoint {target!r}: {type(error).__name__}: {error}"
            ) from error
        except (AstageError, MemoryError):
            raise  # already ours; or memory, which a damaged file and a big one both run out of
        except Exception as error:
            # torch.load's own message says what it refused (weights_only's allow-list, a
            # truncated zip): kept, with the file named. A damaged pickle fails in whatever the
            # unpickler was doing (struct.error, IndexError, KeyError, AssertionError; with
            # weights_only=False also an ImportError or AttributeError for a garbled name), so
            # every error but those above is one the file caused.
            raise CheckpointFormatError(
                f"cannot load the checkpoint {target!r}: {type(error).__name__}: {error}"
            ) from error

    @override
    def remove_checkpoint(self, path: _PATH) -> None:
        """Remove ``path``; a write of it still queued or in progress never lands.

        Then raises :class:`~astage.CheckpointWriteError` for a write that failed, as every
        call of the plugin in the training thread does (the removal is done first: pruning
        goes on whatever failed before).
        """
        target = os.fspath(path)
        filesystem_of(target)  # an unknown protocol is refused naming the path
        self._writer.discard(target, self._torch_io.remove_checkpoint)
        self._raise_write_error()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every queued write is committed; False if ``timeout`` ran out first.

        Raises :class:`~astage.CheckpointWriteError` for a write that failed.
        """
        done = self._writer.wait(timeout=timeout)
        self._raise_write_error()
        return done

    @override
    def teardown(self) -> None:
        """Wait for every write, then give the host buffers back (a later save makes new ones)."""
        with self._lock:
            self._writer.close()
            self._pool.close()
            self._raise_write_error()

    def _raise_write_error(self, path: str | None = None) -> None:
        error = self._writer.take_error(path)
        if error is not None:
            raise error

    @staticmethod
    def _check_target(target: str) -> None:
        # Before the staging: a path that cannot take the file fails the save at once, in the
        # training thread, rather than its write later.
        filesystem, local = filesystem_of(target)
        if isinstance(filesystem, LocalFileSystem) and (
            os.path.isdir(local) or target.endswith(("/", os.sep))
        ):
            # The rename over a folder fails, in the background, after a whole write; "" is
            # the working folder itself. "ckpts/" names a folder too, but fsspec drops the
            # slash: a file named ckpts was written where TorchCheckpointIO fails.
            raise CheckpointWriteError(
                f"cannot save the checkpoint {target!r}: {local!r} is a folder, not a file"
            )

    @staticmethod
    def _make_folder(target: str) -> None:
        # In the training thread, as TorchCheckpointIO does: a folder that cannot be made
        # fails this save at once rather than a write later.
        filesystem, local = filesystem_of(target)
        folder = os.path.dirname(local)
        if not folder:
            return
        try:
            filesystem.makedirs(folder, exist_ok=True)
        except OSError as error:
            raise CheckpointWriteError(
                f"cannot make the folder of the checkpoint {target!r}: {error}"
            ) from error

    def __getstate__(self) -> dict[str, Any]:
        # Strategies that start their processes by spawning (ddp_spawn) pickle the plugin:
        # the copy gets the settings and buffers, threads and queues of its own.
        return {"options": self._options, "snapshots": self._snapshots}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["options"], snapshots=state["snapshots"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(snapshots={self._snapshots})"
