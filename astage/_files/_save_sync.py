"""``astage.save_sync``: the blocking face of :func:`astage.save`, for code without an event loop.

The same pipeline as the async face, waited for another way (httpx's ``Client`` beside its
``AsyncClient``): a :class:`SafetensorsWriter` opened with its own threads, a
:class:`~astage.SyncStager` snapshot whose buffers stay leased until the writer is done with
them, and the threads that write, fsync, rename, fsync the folder and release the lease
(:class:`~astage._files._writer.WriteThreads`, shared with the async face). The caller only
stages, in its own thread; :meth:`SyncSaveHandle.wait` blocks until the file is durable.

Nothing here needs an event loop, so it also works when called from a loop's thread (legacy code
inside a coroutine): it then blocks that loop like any blocking call, and cannot deadlock on it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from .._drivers._leases import wait_seconds
from .._drivers._sync import SyncStager
from .._errors import CheckpointWriteError, InvalidOptionsError
from .._paths import Attr, Path, format_path
from ._layout import layout_memo
from ._save import SaveResult
from ._writer import DEFAULT_THREADS, SafetensorsWriter, WriteThreads

SyncTarget = str | os.PathLike[str] | SafetensorsWriter


class SyncSaveHandle:
    """A save whose staging is done and whose writing goes on in the writer's threads.

    ``wait()`` blocks until the checkpoint is durable and returns its :class:`SaveResult` (or
    raises the write's error); ``done()`` polls; ``cancel()`` stops the write. The
    :class:`~astage.SyncStager` the save used waits for it before it stages into the same
    buffers again. Every method may be called from any thread.
    """

    def __init__(
        self, path: str, threads: WriteThreads, figures: Callable[[float], SaveResult]
    ) -> None:
        self.path = path
        """The file being written."""
        self._threads = threads
        self._figures = figures

    def done(self) -> bool:
        """Whether the write has ended (committed, failed or cancelled)."""
        return self._threads.done()

    def cancel(self) -> bool:
        """Stop the write: the previous file stays, the temporary one is removed.

        Returns False when the write had already ended, or was too far to stop: once the
        file is renamed into place the commit stands, and ``wait()`` returns its result.
        After a True, ``wait()`` raises :class:`~astage.CheckpointWriteError`, and no thread
        of the save is left that could still commit.
        """
        return self._threads.abort()

    def wait(self, timeout: float | None = None) -> SaveResult:
        """The :class:`SaveResult` once the checkpoint is durable; or the write's error.

        With ``timeout`` (seconds; ``inf`` waits as None does), raises :class:`TimeoutError`
        if the write has not ended by then; the write goes on (wait again, or ``cancel()``).
        """
        if not self._threads.wait(_wait_limit(timeout)):
            raise TimeoutError(f"the save to {self.path} did not end within {timeout} s")
        self._threads.raise_failure()
        assert self._threads.finished_at is not None
        return self._figures(self._threads.finished_at)

    def __repr__(self) -> str:
        state = "done" if self.done() else "writing"
        return f"<SyncSaveHandle {self.path!r} {state}>"


def _wait_limit(timeout: float | None) -> float | None:
    """``timeout`` checked as the stagers check theirs, as ``threading.Event.wait`` takes it:
    None for no limit, also for ``inf`` or any time past ``threading.TIMEOUT_MAX`` (which it
    refuses with an OverflowError)."""
    limit = wait_seconds(timeout)
    return None if limit is None or limit > threading.TIMEOUT_MAX else limit


def save_sync(
    state_dict: Any,
    target: SyncTarget,
    *,
    stager: SyncStager | None = None,
    metadata: Mapping[str, str] | None = None,
    threads: int = DEFAULT_THREADS,
) -> SaveResult:
    """Stage ``state_dict`` and write it to ``target``; return when the checkpoint is durable.

    The blocking face of :func:`astage.save`: the same file, the same durability. ``target``
    is a file path or an un-entered :class:`SafetensorsWriter`; ``stager`` the
    :class:`~astage.SyncStager` whose buffers to reuse (without one, a temporary one is made
    and closed). Interrupted (``KeyboardInterrupt``) while it waits, the write is cancelled
    and waited for: the previous file stays and no thread is left behind.
    """
    handle = start_save_sync(state_dict, target, stager=stager, metadata=metadata, threads=threads)
    try:
        return handle.wait()
    except BaseException:
        handle.cancel()
        handle._threads.wait()
        raise


def start_save_sync(
    state_dict: Any,
    target: SyncTarget,
    *,
    stager: SyncStager | None = None,
    metadata: Mapping[str, str] | None = None,
    threads: int = DEFAULT_THREADS,
) -> SyncSaveHandle:
    """Like :func:`save_sync`, but return once every tensor has landed in host memory.

    The caller may then modify its tensors (step the optimizer) while the writer's threads
    finish the file, with no loop and no call of the caller's needed: ``handle.wait()`` only
    observes. The stager's next stage into the same buffers waits for the write (with
    ``buffers=1``, its next call).
    """
    return start_sync_in(state_dict, sync_writer_for(target, metadata, threads), stager)


def sync_writer_for(
    target: SyncTarget, metadata: Mapping[str, str] | None, threads: int
) -> SafetensorsWriter:
    """The writer for ``target``: a :class:`SafetensorsWriter` for a path, else ``target``."""
    if isinstance(target, (str, os.PathLike)):
        return SafetensorsWriter(target, metadata=metadata, threads=threads)
    if not isinstance(target, SafetensorsWriter):
        raise InvalidOptionsError(
            f"target: save_sync cannot write to a {type(target).__qualname__}; give a path or "
            "a SafetensorsWriter (a CheckpointWriter's coroutines need astage.save)"
        )
    if metadata is not None:
        raise InvalidOptionsError("metadata is for a path target; pass it to your writer instead")
    return target


def start_sync_in(
    state_dict: Any,
    writer: SafetensorsWriter,
    stager: SyncStager | None,
    after_commit: Callable[[], None] | None = None,
) -> SyncSaveHandle:
    """The pipeline, in the calling thread until staged; ``after_commit`` as in ``run_save``."""
    if stager is not None and not isinstance(stager, SyncStager):
        raise InvalidOptionsError(
            f"stager: save_sync stages with a SyncStager, got a {type(stager).__qualname__} "
            "(an async Stager goes with astage.save)"
        )
    started = time.perf_counter()
    own = stager is None
    # A stager made here is used for this one call: recording the structure would be waste.
    sync_stager = SyncStager(replay=False) if stager is None else stager
    if sync_stager.options.replay:
        # The stager's saves plan the same structure each time: the file's layout too.
        writer._use_layout_memo(layout_memo(sync_stager))
    try:
        threads = writer.open_in_threads(state_dict)  # refuses what cannot be saved
    except BaseException:
        if own:
            sync_stager.close()
        raise
    release: Callable[[], None] | None = None
    try:
        staging = time.perf_counter()
        staged, release = _stage_leased(sync_stager, state_dict)
        staged_at = time.perf_counter()
        threads.add_done_callback(release)  # in the last thread, once the writer is done
        if own:
            threads.add_done_callback(sync_stager.close)
        layout = writer.layout
        assert layout is not None
        for entry in layout.entries:
            if entry.nbytes:
                path = entry.paths[0]
                writer.queue(path, _tensor_at(staged, path, writer.path))
        writer.commit_in_threads(after_commit)
    except BaseException:
        threads.abort()
        threads.wait()  # the last thread out removed the temporary file and ran the callbacks
        if release is not None:
            release()
        if own:
            sync_stager.close()
        raise

    def figures(done: float) -> SaveResult:
        return SaveResult(
            path=writer.path,
            tensors=layout.tensors,
            nbytes=layout.nbytes,
            staging_seconds=staged_at - staging,
            writing_seconds=done - staged_at,
            seconds=done - started,
        )

    return SyncSaveHandle(writer.path, threads, figures)


def _stage_leased(stager: SyncStager, state_dict: Any) -> tuple[Any, Callable[[], None]]:
    """Stage, and lease the buffers in the same call (no other call can slip in between)."""
    snapshot = getattr(stager, "snapshot", None)
    if snapshot is not None:
        snap = snapshot(state_dict)
        return snap.state_dict, snap.release
    # A stager without snapshots: hold right after the call (a call from another thread
    # could still stage between the two).
    staged = stager.stage(state_dict)
    return staged, stager.hold_buffers().release


def _tensor_at(tree: Any, path: Path, file: str) -> Any:
    """The object at ``path`` in the staged copy ``tree`` (same structure as the source)."""
    node = tree
    for part in path:
        try:
            node = getattr(node, part) if isinstance(part, Attr) else node[part]
        except (KeyError, IndexError, TypeError, AttributeError) as error:
            raise CheckpointWriteError(
                f"{file}: the staged copy has no tensor at {format_path(path)} (was the state "
                "dict changed while it was staged?)"
            ) from error
    return node
