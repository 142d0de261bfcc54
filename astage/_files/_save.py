"""``astage.save``: stage a state dict and stream it into a checkpoint as the tensors land.

One call runs the pipeline: the writer learns the structure (:meth:`CheckpointWriter.begin`),
the stager copies the tensors into its host buffers, and each tensor goes to the writer as soon
as its bytes have landed (``Stager.stage_iter``), so writing overlaps staging. The writer then
commits (durably) or, on any error or cancellation, aborts.

Buffer safety is **backpressure**: from the first landed tensor until the writer has committed
or aborted, the stager's next call waits before it touches its buffers: the save takes a
buffer hold (``Stager.hold_buffers()``, a lease on the stager's current buffer set) and
releases it when the writer is done with them. With the default ``StagingOptions(buffers=1)``
a save needs no host memory beyond the stager's cache; with ``buffers=2`` the next ``stage()``
goes into the other set while the write runs (twice the host memory).

Durability needs no loop turn: with a :class:`SafetensorsWriter` (a path target), once every
tensor has landed the file is sealed (``commit_in_threads``), and the writer's own threads
finish the writes, fsync, rename, fsync the folder, call ``after_commit`` and release the buffer
hold, whether or not the caller's event loop runs again; the task only observes the end. A
cancellation before the rename aborts (no thread is left that could still commit or call
``after_commit``); one that comes after it waits for the commit to end, and the result stands.

Background saves are structured: :func:`start_save` runs the pipeline in a task of an owner, a
task group the caller passes in (or a :class:`~astage.CheckpointDir` entered with ``async
with``), and returns once staging is done. The write never outlives its owner: the owner's
``async with`` waits for it, cancelling the owner aborts it, and its failure reaches the owner.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Awaitable, Callable, Generator, Mapping
from typing import Any, NamedTuple

import anyio
import anyio.abc
import anyio.lowlevel

from .._drivers._async import Stager
from .._errors import CheckpointWriteError, InvalidOptionsError, UsageError
from .._torch import dtensor_local, storage_key
from ._layout import layout_memo
from ._skeleton import is_dtensor
from ._writer import DEFAULT_THREADS, CheckpointWriter, SafetensorsWriter, WriteThreads

Target = str | os.PathLike[str] | CheckpointWriter

NO_OWNER = (
    "start_save() returns before the write ends, so the write needs an owner that waits for "
    "it: pass task_group= (from `async with anyio.create_task_group() as tg:`), call it on a "
    "CheckpointDir entered with `async with`, or use `await save(...)`, which returns once "
    "the checkpoint is durable"
)


class SaveResult(NamedTuple):
    """Figures of one completed save."""

    path: str | None
    """The file written (None for a writer that is not a file writer)."""
    tensors: int
    """Tensors written (a tensor at two paths counts twice)."""
    nbytes: int
    """Bytes of tensor data (each storage once), numpy arrays' included."""
    staging_seconds: float
    """From the start of staging until the last tensor landed in host memory."""
    writing_seconds: float
    """From the first tensor handed to the writer until the checkpoint was durable."""
    seconds: float
    """The whole call: from the start until the checkpoint was durable."""

    @property
    def gb_per_s(self) -> float:
        """Tensor bytes per second of the whole call (GB = 1e9 bytes)."""
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


class SaveHandle:
    """A save whose staging is done and whose writing goes on in astage's threads.

    ``await handle`` (or ``await handle.wait()``) returns the :class:`SaveResult` once the
    checkpoint is durable, or raises the write's error (which also reaches the owner task
    group, like any failing task's). The write itself does not need the caller's event loop:
    it finishes in the writer's threads even while the loop is blocked. The stager the save
    used waits for it before it stages again.
    """

    def __init__(self, path: str | None) -> None:
        self.path = path
        """The file being written (None for a writer that is not a file writer)."""
        self._scope = anyio.CancelScope()
        self._finished = anyio.Event()
        self._result: SaveResult | None = None
        self._error: BaseException | None = None
        self._threads: WriteThreads | None = None  # the writer's threads, once sealed

    def done(self) -> bool:
        """Whether the write has ended (committed, failed or cancelled)."""
        return self._finished.is_set()

    def cancel(self) -> bool:
        """Stop the write: the previous file stays, the temporary one is removed.

        Returns False when the write had already ended, or was too far to stop: once the
        file is renamed into place the commit stands (it finishes, ``after_commit``
        included, and ``await handle`` returns its result). After a True, ``await handle``
        raises :class:`~astage.CheckpointWriteError`, and no thread of the save is left that
        could still commit.
        """
        if self.done():
            return False
        # Stop the threads at once, not at the next loop turn: an abort decided here can no
        # longer lose a race with a rename that the threads would reach meanwhile.
        if self._threads is not None and not self._threads.abort():
            return False
        self._scope.cancel()
        return True

    async def wait(self) -> SaveResult:
        """The :class:`SaveResult`, once the checkpoint is durable; or the write's error."""
        await self._finished.wait()
        if self._result is not None:
            return self._result
        if self._error is not None:
            raise self._error
        raise CheckpointWriteError(
            f"the save to {self.path or 'its writer'} was cancelled before it committed; "
            "the previous checkpoint stays"
        )

    async def wait_quietly(self) -> None:
        """Wait until the write has ended, however it ended (its owner sees its error)."""
        await self._finished.wait()

    def __await__(self) -> Generator[Any, None, SaveResult]:
        return self.wait().__await__()

    async def _run(
        self,
        run: Callable[[_Progress], Awaitable[SaveResult]],
        *,
        task_status: anyio.abc.TaskStatus[SaveHandle],
    ) -> None:
        """The owner's task: run the save; report this handle to the starter once staged."""
        handle = self

        class Progress(_Progress):
            def staged(self, threads: WriteThreads | None) -> None:
                handle._threads = threads
                task_status.started(handle)

            def committed(self, result: SaveResult) -> None:
                handle._result = result  # stands even if a cancellation comes after it

        try:
            with self._scope:
                self._result = await run(Progress())
        except anyio.get_cancelled_exc_class():
            raise  # the owner was cancelled: the write was aborted (or committed), reported
        except BaseException as error:
            self._error = error
            raise
        finally:
            self._finished.set()


class _Progress:
    """What ``run_save`` tells its handle: staging is done; the file was committed."""

    def staged(self, threads: WriteThreads | None) -> None:
        """Every tensor has landed (and, with ``threads``, the file is sealed)."""

    def committed(self, result: SaveResult) -> None:
        """The checkpoint is durable (also when a cancellation follows)."""


async def save(
    state_dict: Any,
    target: Target,
    *,
    stager: Stager | None = None,
    metadata: Mapping[str, str] | None = None,
    threads: int = DEFAULT_THREADS,
) -> SaveResult:
    """Stage ``state_dict`` and write it to ``target``; return when the checkpoint is durable.

    ``target`` is a file path (a :class:`SafetensorsWriter` is made for it, with ``metadata``
    and ``threads``) or any :class:`CheckpointWriter`. ``stager`` is the :class:`Stager` whose
    cached host buffers to use; without one a temporary stager is made and closed after.
    On error or cancellation the writer aborts: the previous file at ``path`` stays as it was.
    """
    writer = writer_for(target, metadata, threads)
    return await run_save(state_dict, writer, stager)


async def start_save(
    state_dict: Any,
    target: Target,
    *,
    stager: Stager | None = None,
    metadata: Mapping[str, str] | None = None,
    threads: int = DEFAULT_THREADS,
    task_group: anyio.abc.TaskGroup | None = None,
) -> SaveHandle:
    """Like :func:`save`, but return as soon as every tensor has landed in host memory.

    The training loop may then modify its tensors (step the optimizer) while the write goes
    on in a task of ``task_group``, which waits for it (cancelling the group aborts it);
    ``await`` the returned :class:`SaveHandle` for its result. Without ``task_group`` this
    raises :class:`~astage.UsageError`: a write nobody owns could outlive its program.
    """
    if task_group is None:
        raise UsageError(NO_OWNER)
    writer = writer_for(target, metadata, threads)
    return await start_in(task_group, state_dict, writer, stager)


def writer_for(target: Target, metadata: Mapping[str, str] | None, threads: int) -> Any:
    """The writer for ``target``: a :class:`SafetensorsWriter` for a path, else ``target``."""
    if isinstance(target, (str, os.PathLike)):
        return SafetensorsWriter(target, metadata=metadata, threads=threads)
    if metadata is not None:
        raise InvalidOptionsError("metadata is for a path target; pass it to your writer instead")
    if not isinstance(target, CheckpointWriter):
        raise InvalidOptionsError(
            f"target: cannot save to a {type(target).__qualname__}; give a path or a "
            "CheckpointWriter"
        )
    return target


async def start_in(
    owner: anyio.abc.TaskGroup,
    state_dict: Any,
    writer: CheckpointWriter,
    stager: Stager | None,
    after_commit: Callable[[], None] | None = None,
) -> SaveHandle:
    """Run a save in a task of ``owner``; return its handle once staging is done.

    Until then the task counts as the caller's (anyio's ``TaskGroup.start``): cancelling the
    caller cancels it, and an error found before staging ends is raised here.
    ``after_commit`` as in :func:`run_save`.
    """
    handle = SaveHandle(getattr(writer, "path", None))

    def run(progress: _Progress) -> Awaitable[SaveResult]:
        return run_save(state_dict, writer, stager, after_commit=after_commit, progress=progress)

    started: SaveHandle = await owner.start(handle._run, run)
    return started


async def run_save(
    state_dict: Any,
    writer: CheckpointWriter,
    stager: Stager | None,
    *,
    after_commit: Callable[[], None] | None = None,
    progress: _Progress | None = None,
) -> SaveResult:
    """The pipeline, in the calling task: begin, stage into the writer, commit, ``after_commit``.

    ``after_commit`` is a blocking function called once the file is durable (renamed, folder
    fsynced), while the stager's buffers are still held (a ``latest`` pointer moves there);
    with a :class:`SafetensorsWriter` it runs in the writer's last thread, with the rest of
    the commit, whether or not this task's event loop turns; an exception from it fails the
    save (the file itself stays, durable).
    """
    if stager is not None and not isinstance(stager, Stager):
        raise InvalidOptionsError(
            f"stager: astage.save stages with a Stager, got a {type(stager).__qualname__} "
            "(a SyncStager goes with astage.save_sync)"
        )
    progress = progress if progress is not None else _Progress()
    started = time.perf_counter()
    hold: Any = None
    tensors = 0
    storages: dict[int, int] = {}
    first_write = 0.0
    threads: WriteThreads | None = None
    async with contextlib.AsyncExitStack() as resources:
        if stager is None:
            # Used for this one call: recording the structure for later calls would be waste.
            stager = Stager(replay=False)
            resources.push_async_callback(_close_shielded, stager)
        if isinstance(writer, SafetensorsWriter) and stager.options.replay:
            # The stager's saves plan the same structure each time: the file's layout too.
            writer._use_layout_memo(layout_memo(stager))
        if isinstance(writer, contextlib.AbstractAsyncContextManager):
            await resources.enter_async_context(writer)  # its background work lives here
        try:
            await writer.begin(state_dict)
            staging = time.perf_counter()
            # A write queued for the writer's threads awaits nothing: the iterator gives the
            # loop its turns (over 20,000 small tensors this loop held it 150-185 ms before).
            async with stager.stage_iter(state_dict) as landed:
                async for path, tensor in landed:
                    if hold is None:
                        # The stager is ours until the block exits: no call has started
                        # since ours, and the next one will wait for this hold.
                        hold = stager.hold_buffers()
                        first_write = time.perf_counter()
                    tensors += 1
                    # A DTensor's bytes in this rank's file are its local shard's.
                    local = dtensor_local(tensor) if is_dtensor(tensor) else tensor
                    storage = local.untyped_storage()
                    storages[storage_key(storage)] = storage.nbytes()
                    await writer.write(path, tensor)
            staged = time.perf_counter()

            layout = writer.layout if isinstance(writer, SafetensorsWriter) else None

            def result(done: float) -> SaveResult:
                return SaveResult(
                    path=getattr(writer, "path", None),
                    tensors=tensors,
                    # The file's data: numpy arrays' bytes too, which no staged tensor brings
                    # (as save_sync counts them).
                    nbytes=layout.nbytes if layout is not None else sum(storages.values()),
                    staging_seconds=staged - staging,
                    writing_seconds=done - (first_write or staged),
                    seconds=done - started,
                )

            if isinstance(writer, SafetensorsWriter) and writer.write_threads is not None:
                # Sealed before the starter hears that staging is done: from here on the
                # threads finish the checkpoint and release the hold without this task.
                threads = writer.commit_in_threads(after_commit)
                if hold is not None:
                    threads.add_done_callback(hold.release)
                progress.staged(threads)
                await threads.wait_async()
                if not threads.committed:
                    # Aborted by handle.cancel() (or our cancelled owner) and ended before the
                    # cancellation reached this task: report it as the cancellation it is.
                    await anyio.lowlevel.checkpoint_if_cancelled()
                threads.raise_failure()
                assert threads.finished_at is not None
                done = threads.finished_at
            else:
                progress.staged(None)
                await writer.commit()
                if after_commit is not None:
                    await anyio.to_thread.run_sync(after_commit)
                done = time.perf_counter()
            outcome = result(done)
            progress.committed(outcome)
        except BaseException:
            with anyio.CancelScope(shield=True):
                if threads is not None:
                    # No thread of this save runs on once we return: the abort wins before
                    # the rename; after it the commit (and after_commit) ends first.
                    threads.abort()
                    await threads.wait_async()
                    if threads.committed and threads.error is None and threads.finished_at:
                        progress.committed(result(threads.finished_at))
                await writer.abort()
            raise
        finally:
            if hold is not None:
                hold.release()  # the writer is done with the buffers (committed or aborted)
    return outcome


async def _close_shielded(stager: Stager) -> None:
    with anyio.CancelScope(shield=True):
        await stager.aclose()
