"""``astage.save``: stage a state dict and stream it into a checkpoint as the tensors land.

One call runs the pipeline: the writer learns the structure (:meth:`CheckpointWriter.begin`),
the stager copies the tensors into its host buffers, and each tensor goes to the writer as soon
as its bytes have landed (``Stager.stage_iter``), so writing overlaps staging. The writer then
commits (durably) or, on any error or cancellation, aborts.

Buffer safety is **backpressure**: from the first landed tensor until the writer has committed
or aborted, the stager's next call waits before it touches its buffers. The mechanism is the
one the stagers already use for copies that a cancelled call left in flight
(``StagerBase.outstanding``): the save registers one more piece of pending work on the stager,
resolved when the writer is done with the buffers. No second buffer set is allocated, so a save
needs no host memory beyond the stager's cache; to stage the next step while a write still
runs, use a second ``Stager`` (twice the host memory).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import time
from collections.abc import Awaitable, Callable, Generator, Mapping
from typing import Any, NamedTuple

from .._drivers._async import Stager
from ._writer import DEFAULT_THREADS, CheckpointWriter, SafetensorsWriter

Target = str | os.PathLike[str] | CheckpointWriter


class SaveResult(NamedTuple):
    """Figures of one completed save."""

    path: str | None
    """The file written (None for a writer that is not a file writer)."""
    tensors: int
    """Tensors written (a tensor at two paths counts twice)."""
    nbytes: int
    """Bytes of tensor data (each storage once)."""
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
    """A save whose staging is done and whose writing goes on in a background task.

    ``await handle`` returns the :class:`SaveResult` once the checkpoint is durable (or raises
    the write's error). The stager the save used waits for it before it stages again.
    """

    def __init__(self, task: asyncio.Task[SaveResult]) -> None:
        self._task = task

    def done(self) -> bool:
        """Whether the write has ended (committed, failed or cancelled)."""
        return self._task.done()

    def cancel(self) -> bool:
        """Stop the write: the previous file stays, the temporary one is removed."""
        return self._task.cancel()

    async def wait(self) -> SaveResult:
        return await self._task

    def __await__(self) -> Generator[Any, None, SaveResult]:
        return self._task.__await__()


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
    writer = _writer_for(target, metadata, threads)
    return await _save(state_dict, writer, stager, None, None)


async def start_save(
    state_dict: Any,
    target: Target,
    *,
    stager: Stager | None = None,
    metadata: Mapping[str, str] | None = None,
    threads: int = DEFAULT_THREADS,
) -> SaveHandle:
    """Like :func:`save`, but return as soon as every tensor has landed in host memory.

    The training loop may then modify its tensors (step the optimizer) while the write goes
    on in a background task; ``await`` the returned :class:`SaveHandle` for its result.
    """
    writer = _writer_for(target, metadata, threads)
    return await _start(state_dict, writer, stager, None)


def _writer_for(target: Target, metadata: Mapping[str, str] | None, threads: int) -> Any:
    if isinstance(target, (str, os.PathLike)):
        return SafetensorsWriter(target, metadata=metadata, threads=threads)
    if metadata is not None:
        raise TypeError("metadata is for a path target; pass it to your writer instead")
    if not isinstance(target, CheckpointWriter):
        raise TypeError(f"cannot save to a {type(target).__qualname__}: give a path or a writer")
    return target


async def _start(
    state_dict: Any,
    writer: CheckpointWriter,
    stager: Stager | None,
    after: Callable[[], Awaitable[None]] | None,
) -> SaveHandle:
    staged: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def landed() -> None:
        if not staged.done():
            staged.set_result(None)

    task = asyncio.create_task(_save(state_dict, writer, stager, landed, after))
    task.add_done_callback(lambda _: landed())
    try:
        await staged
    except asyncio.CancelledError:
        task.cancel()
        await asyncio.wait([task])
        raise
    if task.done():
        task.result()  # the save failed (or was cancelled) before staging was done: raise it
    return SaveHandle(task)


async def _save(
    state_dict: Any,
    writer: CheckpointWriter,
    stager: Stager | None,
    on_staged: Callable[[], None] | None,
    after: Callable[[], Awaitable[None]] | None,
) -> SaveResult:
    started = time.perf_counter()
    own = stager is None
    active = Stager() if stager is None else stager
    hold: concurrent.futures.Future[None] | None = None
    tensors = 0
    storages: dict[int, int] = {}
    first_write = 0.0
    try:
        try:
            await writer.begin(state_dict)
            staging = time.perf_counter()
            landed = active.stage_iter(state_dict)
            async with contextlib.aclosing(landed):  # type: ignore[type-var]
                async for path, tensor in landed:
                    if hold is None:
                        # stage_iter holds the stager's lock while it yields: no call has
                        # started since ours, and the next one will wait for this hold.
                        hold = _hold_buffers(active)
                        first_write = time.perf_counter()
                    tensors += 1
                    storage = tensor.untyped_storage()
                    storages[storage._cdata] = storage.nbytes()
                    await writer.write(path, tensor)
            staged = time.perf_counter()
            if on_staged is not None:
                on_staged()
            await writer.commit()
            if after is not None:
                await after()
        except BaseException:
            await writer.abort()
            raise
    finally:
        if hold is not None:
            hold.set_result(None)
        if own:
            await active.aclose()
    done = time.perf_counter()
    return SaveResult(
        path=getattr(writer, "path", None),
        tensors=tensors,
        nbytes=sum(storages.values()),
        staging_seconds=staged - staging,
        writing_seconds=done - (first_write or staged),
        seconds=done - started,
    )


def _hold_buffers(stager: Stager) -> concurrent.futures.Future[None]:
    """Make ``stager``'s next call wait, before it touches its buffers, for the returned future.

    Stagers already wait for work that a failed or cancelled call left in flight into their
    buffers (``outstanding``, drained under the call's lock by both drivers and by
    ``aclose``); a writer still reading staged tensors is one more such piece of work. Call it
    while the caller's own ``stage_iter`` on ``stager`` is suspended at a yield (it holds the
    lock then); resolve the future when the writer is done with the tensors.
    """
    future: concurrent.futures.Future[None] = concurrent.futures.Future()
    stager._base.hold_buffers(future)
    return future
