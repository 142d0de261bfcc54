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
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import anyio.to_thread

from .._drivers._async import Stager
from .._errors import CheckpointFormatError, CheckpointWriteError
from ._safetensors import load
from ._save import SaveHandle, SaveResult, _start
from ._writer import DEFAULT_THREADS, SafetensorsWriter, fsync_folder

LATEST = "latest"
_STEP_FILE = re.compile(r"^step_(\d+)\.safetensors$")


class CheckpointDir:
    """Saves step ``N`` of a training run under ``root``, keeps the newest ``keep`` of them.

    ``stager`` is the :class:`Stager` to stage with (its buffers are reused from save to
    save); without one the folder makes its own, closed by :meth:`aclose` (or ``async with``).
    ``keep=None`` keeps every checkpoint.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        keep: int | None = 3,
        stager: Stager | None = None,
        threads: int = DEFAULT_THREADS,
    ) -> None:
        if keep is not None and keep < 1:
            raise ValueError("keep must be at least 1 (or None to keep every checkpoint)")
        self.root = os.path.abspath(os.fspath(root))
        self.keep = keep
        self.threads = threads
        self._own_stager = stager is None
        self.stager = stager if stager is not None else Stager()

    def path_for(self, step: int) -> str:
        """The file of step ``step``."""
        if step < 0:
            raise ValueError("steps are non-negative integers")
        return os.path.join(self.root, f"step_{step:09d}.safetensors")

    async def save(
        self, step: int, state_dict: Any, *, metadata: Mapping[str, str] | None = None
    ) -> SaveResult:
        """Save step ``step`` and return once it is durable and ``latest`` names it."""
        return await (await self.start_save(step, state_dict, metadata=metadata))

    async def start_save(
        self, step: int, state_dict: Any, *, metadata: Mapping[str, str] | None = None
    ) -> SaveHandle:
        """Stage step ``step`` and return; the write, ``latest`` and pruning go on after.

        Await the returned handle before the process exits (and, to bound the work in
        flight, before the next save; the stager makes the next save wait for it anyway).
        """
        await anyio.to_thread.run_sync(_makedirs, self.root)
        path = self.path_for(step)
        writer = SafetensorsWriter(path, metadata=metadata, threads=self.threads)

        async def publish() -> None:
            await anyio.to_thread.run_sync(self._publish, os.path.basename(path))

        return await _start(state_dict, writer, self.stager, publish)

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
        temp = os.path.join(self.root, f".{LATEST}.{os.getpid()}.tmp")
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
        """Close the stager the folder made for itself (a stager passed in stays open)."""
        if self._own_stager:
            await self.stager.aclose()

    async def __aenter__(self) -> CheckpointDir:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _makedirs(root: str) -> None:
    os.makedirs(root, exist_ok=True)
