"""ReplicationStager: stage a snapshot, swap it with a partner rank over torch.distributed.

Each rank stages its state dict with its own :class:`~astage.Stager` (cached host buffers),
sends the staged snapshot to a partner rank and receives the partner's in return: a copy of
every rank's snapshot then lives in another rank's memory (and, with ``storage_dir``, on its
disk), so a lost node can be restored from its partner.

The pieces: :mod:`._pairing` (who swaps with whom), :mod:`._wire` (the pickle-free header and
byte messages), :mod:`._transport` (posting sends and receives with deadlines, blocking, for a
worker thread), :mod:`._persist` (the replica file written while the bytes arrive). This module
drives them on anyio, so it runs on asyncio, asyncio with uvloop, and trio.

**Threads.** The exchange runs in one anyio worker thread at a time (a ``CapacityLimiter(1)``
of the stager's own): torch.distributed waits block, and the event loop must not. When the
replica is persisted, the thread reports each message as it lands through a thread-safe
mailbox that the loop reads; the thread never waits for the loop, so an exchange whose caller
went away (cancelled, or its loop ended) still runs to its end and the partner is not left
hanging.

**Staying in step.** Both sides number their calls, and each header carries the number: a
mismatch breaks the pair off on both sides. A call whose local staging fails still takes part
in the exchange, with a refusal instead of a snapshot: the partner's call raises at once
(naming this rank and the staging error), this caller gets the staging error, and both stay
in step for the next call.

**Cancellation.** Cancelling ``stage()`` frees the caller at once. If the exchange thread had
started, it is left to finish in the background (so the partner's exchange completes);
otherwise a refusal marked *broken* is sent from a thread of its own, so the partner raises
at once. Either way this stager is then out of step with its partner: later calls raise
:class:`~astage.ReplicationError` (the partner's, too, when it got the refusal). The same holds
after a timeout or a partner that died (a receive may still be posted and would swallow the
partner's next message): a fresh process group and stager are needed.
"""

from __future__ import annotations

import numbers
import os
import queue
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from types import TracebackType
from typing import Any, Final

import anyio
import anyio.lowlevel
import anyio.to_thread
import torch.distributed as dist

from .._drivers._async import Stager
from .._errors import BusyError, InvalidOptionsError, ReplicationError, StagerClosedError
from .._files._safetensors import fs_path
from .._options import StagingOptions
from ._pairing import pairing
from ._persist import ReplicaFile, replica_file_name
from ._transport import Progress, Transport

__all__ = ["DEFAULT_TIMEOUT", "ReplicationStager"]

DEFAULT_TIMEOUT = timedelta(minutes=5)


class ReplicationStager:
    """Stages a state dict and swaps the snapshot with a partner rank; returns the partner's.

    ``process_group``: the group to exchange over (the default group when None); gloo moves
    CPU tensors, so the snapshot travels from astage's host buffers. ``storage_dir``: where
    each received replica is persisted (one file per rank and partner, replaced atomically).
    ``timeout``: seconds (or a ``timedelta``) the partner may take to join an exchange.
    ``partner``: a fixed, symmetric partner rank instead of the default pairing.
    ``options``: the :class:`~astage.StagingOptions` of the local :class:`~astage.Stager`.

    The returned replica lives in buffers this stager reuses: the next ``stage`` call
    overwrites it (as :meth:`Stager.stage` does with its snapshot). Runs on asyncio, asyncio
    with uvloop, and trio; concurrent calls from one event loop run one after the other.
    """

    def __init__(
        self,
        process_group: Any = None,
        *,
        storage_dir: str | os.PathLike[str] | None = None,
        timeout: float | timedelta = DEFAULT_TIMEOUT,
        partner: int | None = None,
        options: StagingOptions | None = None,
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ReplicationError(
                "ReplicationStager needs an initialized torch.distributed process group "
                "(call torch.distributed.init_process_group first, e.g. under torchrun)"
            )
        group = process_group if process_group is not None else dist.group.WORLD
        if str(dist.get_backend(group)) == "nccl":
            raise InvalidOptionsError(
                "ReplicationStager sends the staged snapshot from host memory, which NCCL "
                "cannot move: pass a gloo group, e.g. "
                "process_group=torch.distributed.new_group(backend='gloo')"
            )
        self.rank: int = dist.get_rank(group)
        self.world_size: int = dist.get_world_size(group)
        self.send_to, self.receive_from = pairing(self.rank, self.world_size, partner)
        self.timeout: float = _seconds(timeout)
        self.storage_dir = replica_folder(storage_dir) if storage_dir else None
        self._stager = Stager(options)
        self._transport = Transport(group, self.rank, self.send_to, self.receive_from, self.timeout)
        self._closed = False
        self._calls = 0  # the call number in the header: both sides of a pair count alike
        # One caller at a time. The lock and the exchange thread's limiter are anyio
        # primitives, which belong to the event loop that made them: they are made anew by
        # the first caller of a turn, and a caller from another thread's loop meanwhile is
        # refused (BusyError) instead of corrupting them.
        self._entry = threading.Lock()
        self._callers = 0
        self._caller_thread: int | None = None
        self._lock: anyio.Lock | None = None
        self._exchange_limiter: anyio.CapacityLimiter | None = None

    @property
    def replica_path(self) -> str | None:
        """The file the replica received from ``receive_from`` is persisted to."""
        if self.storage_dir is None:
            return None
        return os.path.join(self.storage_dir, replica_file_name(self.rank, self.receive_from))

    @property
    def last_seconds(self) -> float | None:
        """Seconds the last exchange took on the wire (header and bytes, both directions)."""
        return self._transport.last_seconds

    async def stage(self, state_dict: Any) -> Any:
        """Stage ``state_dict``, send it to the partner, return the partner's replica.

        Raises :class:`~astage.ReplicationError` naming both ranks when the exchange or the
        replica file fails (:class:`~astage.ReplicationTimeoutError` when the partner does not
        take part in time), and :class:`~astage.StagerClosedError` after :meth:`aclose`.
        """
        async with self._turn():
            if self._closed:
                raise StagerClosedError("this ReplicationStager was closed")
            if self._transport.broken is not None:
                raise ReplicationError(self._transport.broken)
            self._calls += 1
            exchange = _Exchange(self._transport, self._calls)
            try:
                staged = await self._stager.stage(state_dict)
            except anyio.get_cancelled_exc_class():
                self._abandon(exchange, "was cancelled while staging")
                raise
            except Exception as error:
                await self._announce_failure(exchange, error)
                raise
            exchange.staged = staged
            try:
                if self.replica_path is None:
                    return await exchange.run(self._limiter())
                return await self._exchange_persisting(exchange, self.replica_path)
            except anyio.get_cancelled_exc_class():
                self._abandon(exchange, "was cancelled midway")
                raise

    async def _announce_failure(self, exchange: _Exchange, error: Exception) -> None:
        """Tell the partner that this call's local staging failed: both sides stay in step.

        The partner's call raises a :class:`~astage.ReplicationError` saying why; this side's
        caller gets the staging error itself (raised by the caller, once this returns).
        """
        kind = type(error).__name__
        exchange.refuse(
            ReplicationError(
                f"{self._transport.where}: the local staging of call {exchange.call} failed "
                f"({kind}: {error})"
            )
        )
        try:
            await exchange.run(self._limiter())
        except ReplicationError:
            pass  # the refusal itself, or a failed exchange (which broke the transport)
        except anyio.get_cancelled_exc_class():
            self._abandon(exchange, "was cancelled while announcing a failed staging")
            raise

    def _abandon(self, exchange: _Exchange, why: str) -> None:
        """A cancelled call: the partner is told, and the pair is broken on both sides.

        If the exchange thread has not started, it never will (:meth:`_Exchange.claim`): a
        refusal marked *broken* is sent from a thread of its own instead, so the partner's call
        raises at once and its stager refuses later calls, as this one does. If the thread
        runs, it runs to its end in the background (see the module docstring).
        """
        reason = (
            f"{self._transport.where}: call {exchange.call} {why}; the pair is out of step "
            "(make a new process group and stager)"
        )
        if exchange.claim():
            self._transport.break_off(reason)
            exchange.refuse(ReplicationError(reason), broken=True)
            # A plain thread, not anyio's: the caller was cancelled and returns now, its event
            # loop may end, and nobody waits for this thread; it ends by the deadline at most.
            threading.Thread(
                target=exchange.run_detached, name="astage-replication-refusal", daemon=True
            ).start()
        elif not exchange.finished:
            self._transport.break_off(reason)

    async def _exchange_persisting(self, exchange: _Exchange, path: str) -> Any:
        """Exchange while writing the replica as its bytes arrive; commit once it succeeded.

        The exchange's own error wins (the file is aborted); a failure of the file raises
        :class:`~astage.ReplicationError` once the exchange is over (the pair stays in step).
        """
        outcome: list[Any] = []
        # Entered for the whole exchange: its writer's workers then write while bytes arrive.
        async with ReplicaFile(path, self.rank, self.receive_from) as file:
            with _Mailbox() as mailbox:

                async def run_exchange() -> None:
                    try:
                        outcome.append(await exchange.run(self._limiter(), mailbox))
                    except Exception as error:  # noqa: BLE001 - raised below, once the file is settled
                        outcome.append(error)

                try:
                    async with anyio.create_task_group() as tasks:
                        tasks.start_soon(run_exchange)
                        async for progress in mailbox:
                            await file.follow(progress)
                    if not outcome:
                        # The exchange's task was cancelled while this one, waiting shielded
                        # for the file's thread, was not yet; on asyncio the task group's exit
                        # is no checkpoint once its tasks are over: the cancellation is raised
                        # here, not lost in a ValueError below.
                        await anyio.lowlevel.checkpoint_if_cancelled()
                    (result,) = outcome
                    if isinstance(result, Exception):
                        raise result
                    await file.commit()
                    return result
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await file.abort()
                    raise

    # -- one caller at a time --------------------------------------------------------------

    @asynccontextmanager
    async def _turn(self) -> AsyncIterator[None]:
        me = threading.get_ident()
        with self._entry:  # held for a few lines, never across an await
            if self._callers and self._caller_thread != me:
                raise BusyError(
                    "this ReplicationStager is in use by another thread's event loop; "
                    "use one stager per event loop"
                )
            if not self._callers or self._lock is None:
                self._lock = anyio.Lock()
                self._exchange_limiter = anyio.CapacityLimiter(1)
                self._caller_thread = me
            self._callers += 1
            lock = self._lock
        try:
            async with lock:
                yield
        finally:
            with self._entry:
                self._callers -= 1

    def _limiter(self) -> anyio.CapacityLimiter:
        assert self._exchange_limiter is not None
        return self._exchange_limiter

    # -- closing -----------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Wait for the exchange in progress, then release the local stager and the buffers.

        Cancel-safe: cancelled while it waits for the exchange, the stager stays open and a
        second ``aclose()`` finishes the job; the release itself is shielded. An exchange
        thread left behind by a cancelled ``stage()`` is not waited for (it ends by its
        deadline at the latest).
        """
        if self._closed:
            return
        async with self._turn():
            if self._closed:
                return
            with anyio.CancelScope(shield=True):
                await self._stager.aclose()
                self._transport.release()
                self._closed = True

    async def __aenter__(self) -> ReplicationStager:
        if self._closed:
            raise StagerClosedError("this ReplicationStager was closed")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


_MOST_SECONDS = 1e13
"""The longest timeout (about 300,000 years): each wait is a ``timedelta`` of whole
milliseconds, which an infinite or larger one cannot be (every exchange then failed)."""


def replica_folder(storage_dir: Any) -> str:
    """``storage_dir`` as an absolute str path, made if missing.

    A bytes path is decoded as os does (it became a bytes ``storage_dir`` that the replica
    file name, a str, could not be joined to: a raw ``TypeError`` from ``stage()`` after the
    local staging, with the partner left to wait for the exchange); a path of another type
    or with a NUL byte is an :class:`~astage.InvalidOptionsError`, and a folder that cannot
    be made (a file there, no permission) a :class:`~astage.ReplicationError` naming it.
    """
    folder = os.path.abspath(fs_path(storage_dir, "storage_dir"))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise ReplicationError(
            f"storage_dir {folder}: cannot make the folder for replicas: {error.strerror or error}"
        ) from error
    return folder


def _seconds(timeout: float | timedelta) -> float:
    seconds = float("nan")
    try:
        if isinstance(timeout, timedelta):
            seconds = timeout.total_seconds()
        # Numbers only: float() would also take True (1 s) and "5" (5 s).
        elif isinstance(timeout, numbers.Real) and not isinstance(timeout, bool):
            seconds = float(timeout)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int past a float
        pass
    if not 0 < seconds <= _MOST_SECONDS:  # NaN and infinity too
        raise InvalidOptionsError(
            f"timeout must be a positive, finite number of seconds (at most {_MOST_SECONDS:g}) "
            f"or a timedelta, got {timeout!r}"
        )
    return seconds


class _Exchange:
    """One call's exchange, run in a worker thread exactly once (or never: see :meth:`claim`)."""

    def __init__(self, transport: Transport, call: int) -> None:
        self._transport = transport
        self.call = call
        self.staged: Any = None
        self._refusal: ReplicationError | None = None
        self._broken = False
        self._claim = threading.Lock()
        self._claimed = False
        self.finished = False

    def claim(self) -> bool:
        """True for the first caller only: the one that runs (or gives up) this exchange."""
        with self._claim:
            claimed, self._claimed = self._claimed, True
            return not claimed

    def refuse(self, error: ReplicationError, *, broken: bool = False) -> None:
        """Send a refusal saying ``error`` instead of a snapshot (``broken``: the pair is done)."""
        self._refusal = error
        self._broken = broken

    async def run(self, limiter: anyio.CapacityLimiter, mailbox: _Mailbox | None = None) -> Any:
        """The replica. Cancelled, the caller returns at once and the thread runs to its end."""
        return await anyio.to_thread.run_sync(
            self._in_thread, mailbox, limiter=limiter, abandon_on_cancel=True
        )

    def _in_thread(self, mailbox: _Mailbox | None) -> Any:
        try:
            if not self.claim():  # the call was cancelled before this thread started
                raise ReplicationError(f"call {self.call} was abandoned before its exchange")
            return self._transport.exchange(
                self.staged,
                self.call,
                mailbox.put if mailbox is not None else None,
                refusal=self._refusal,
                broken=self._broken,
            )
        finally:
            self.finished = True
            if mailbox is not None:
                mailbox.close()

    def run_detached(self) -> None:
        """The refusal of a cancelled call, in a thread nobody waits for."""
        try:
            self._transport.exchange(None, self.call, refusal=self._refusal, broken=self._broken)
        except ReplicationError:
            pass  # the refusal itself, raised as promised; nobody is there to catch it
        finally:
            self.finished = True


_END: Final = object()


class _Mailbox:
    """Progress from the exchange thread to the event loop, in order, ending with ``close()``.

    The thread puts without waiting (a ``queue.SimpleQueue``); the loop side takes what is
    there, and otherwise waits in a worker thread of its own. A hand-off through
    ``anyio.from_thread`` would make the exchange thread wait for the loop, and hang for good
    if the loop ended while an abandoned exchange was still running.

    Used as ``with _Mailbox() as mailbox:``, leaving the block closes it too: a reader thread
    abandoned by a cancelled call then ends even if the exchange never ran (cancelled before
    its thread started it), instead of waiting forever (and holding up interpreter exit:
    asyncio's worker threads are not daemons).
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._reader = anyio.CapacityLimiter(1)

    def put(self, progress: Progress) -> None:
        self._queue.put(progress)

    def close(self) -> None:
        self._queue.put(_END)

    def __enter__(self) -> _Mailbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __aiter__(self) -> _Mailbox:
        return self

    async def __anext__(self) -> Progress:
        try:
            item = self._queue.get_nowait()
        except queue.Empty:
            item = await anyio.to_thread.run_sync(
                self._queue.get, limiter=self._reader, abandon_on_cancel=True
            )
        if item is _END:
            raise StopAsyncIteration
        progress: Progress = item
        return progress
