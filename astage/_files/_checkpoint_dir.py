"""CheckpointDir: numbered checkpoints in one folder for a training loop, and a ``latest`` pointer.

Layout of ``root``::

    step_000000100.safetensors
    step_000000200.safetensors
    latest                      # one line: the file name of the newest durable checkpoint

A save writes ``step_<step>.safetensors`` durably (temporary file, fsync, rename, folder
fsync); only then is ``latest`` replaced, the same way (a small temporary file renamed over
it), and only after that are checkpoints beyond the newest ``keep`` deleted. A crash at any
point leaves ``latest`` naming a complete checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread

from .._drivers._async import Stager
from .._errors import (
    CheckpointFormatError,
    CheckpointWriteError,
    ClosedError,
    InvalidOptionsError,
    UsageError,
)
from ._safetensors import load
from ._save import NO_OWNER, SaveHandle, SaveResult, run_save, start_in
from ._writer import DEFAULT_THREADS, SafetensorsWriter, fsync_folder, positive_int

LATEST = "latest"
_STEP_FILE = re.compile(r"^step_(\d+)\.safetensors$")


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
        self.root = os.path.abspath(os.fspath(root))
        self.keep = None if keep is None else positive_int("keep", keep)
        self.threads = positive_int("threads", threads)
        self._own_stager = stager is None
        self.stager = stager if stager is not None else Stager()
        self._saves: anyio.abc.TaskGroup | None = None  # while entered with `async with`
        self._pending: list[SaveHandle] = []  # background saves aclose() waits for
        self._closed = False

    def path_for(self, step: int) -> str:
        """The file of step ``step``."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise InvalidOptionsError(f"step must be a non-negative integer, got {step!r}")
        return os.path.join(self.root, f"step_{step:09d}.safetensors")

    async def save(
        self, step: int, state_dict: Any, *, metadata: Mapping[str, str] | None = None
    ) -> SaveResult:
        """Save step ``step`` and return once it is durable and ``latest`` names it.

        Cancelled, it leaves nothing running and no temporary file; ``latest`` then still
        names the previous checkpoint (or, if the cancellation came after the rename, this
        one).
        """
        writer, publish = await self._prepare(step, metadata)
        return await run_save(state_dict, writer, self.stager, after=publish)

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
        writer, publish = await self._prepare(step, metadata)
        handle = await start_in(owner, state_dict, writer, self.stager, publish)
        self._pending = [*(h for h in self._pending if not h.done()), handle]
        return handle

    async def _prepare(
        self, step: int, metadata: Mapping[str, str] | None
    ) -> tuple[SafetensorsWriter, Any]:
        self._check_open()
        path = self.path_for(step)
        writer = SafetensorsWriter(path, metadata=metadata, threads=self.threads)
        await anyio.to_thread.run_sync(_makedirs, self.root)

        async def publish() -> None:
            await anyio.to_thread.run_sync(self._publish, os.path.basename(path))

        return writer, publish

    def steps(self) -> list[int]:
        """Steps with a checkpoint file, oldest first."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for m in map(_STEP_FILE.match, names) if m)

    def latest_step(self) -> int | None:
        """The step ``latest`` names, or None when nothing was saved yet."""
        try:
            with open(os.path.join(self.root, LATEST), encoding="utf-8") as file:
                name = file.read().strip()
        except FileNotFoundError:
            return None
        match = _STEP_FILE.match(name)
        if match is None:
            raise CheckpointFormatError(f"{self.root}/{LATEST} names no checkpoint: {name!r}")
        return int(match.group(1))

    def load_latest(self, *, device: str = "cpu") -> Any:
        """The state dict of the latest checkpoint, or None when nothing was saved yet."""
        step = self.latest_step()
        return None if step is None else load(self.path_for(step), device=device)

    def _publish(self, name: str) -> None:
        """Runs in a thread: point ``latest`` at ``name`` durably, then prune old steps."""
        pointer = os.path.join(self.root, LATEST)
        temp = os.path.join(self.root, f".{LATEST}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
            try:
                os.write(fd, f"{name}\n".encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, pointer)
            fsync_folder(self.root)
        except OSError as error:
            if os.path.exists(temp):
                os.unlink(temp)
            raise CheckpointWriteError(
                f"cannot move {pointer} to {name}: {error.strerror or error}"
            ) from error
        if self.keep is None:
            return
        current = int(_STEP_FILE.match(name).group(1))  # type: ignore[union-attr]
        for step in self.steps()[: -self.keep]:
            if step != current:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path_for(step))

    async def aclose(self) -> None:
        """Wait for the background saves, then close the stager the folder made for itself.

        A stager passed in stays open. Cancel-safe: cancelled while it waits, the saves go
        on in their owner, and a second ``aclose()`` finishes the job.
        """
        self._closed = True
        for handle in self._pending:
            await handle.wait_quietly()
        self._pending = []
        if self._own_stager:
            with anyio.CancelScope(shield=True):  # the saves are over: nothing to wait for
                await self.stager.aclose()

    async def __aenter__(self) -> CheckpointDir:
        if self._saves is not None:
            raise UsageError(f"CheckpointDir({self.root!r}) is already entered")
        self._check_open()
        saves = anyio.create_task_group()
        await saves.__aenter__()
        self._saves = saves
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        saves, self._saves = self._saves, None
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


def _makedirs(root: str) -> None:
    os.makedirs(root, exist_ok=True)
