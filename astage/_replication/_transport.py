"""The transport: one snapshot out to a partner rank and the partner's in, over torch.distributed.

:meth:`Transport.exchange` is blocking code for a worker thread (torch.distributed waits
block). Every rank posts its sends and its receives at once (non-blocking ``isend`` /
``irecv``), so no ordering between the two sides is needed and no pair deadlocks; message
``i`` of a step goes on its own tag, which lets gloo move the messages side by side (one tag
serializes them: about 1.5x slower on loopback). Every wait has a deadline: a partner that
does not take part within ``timeout`` raises :class:`~astage.ReplicationTimeoutError`.

The steps (see :mod:`._wire`): the header's length, the header, a verdict each way, the bytes.
What the partner sends is untrusted: its header is checked, and the replica rebuilt on its
buffers, before a single receive is posted; a header this side refuses is answered with a
"refused" verdict, so the partner sends no bytes and both sides raise at once, still in step.
A snapshot a side cannot send (or a call whose local staging failed) is announced in its
header instead, with the same effect. Both headers carry the call number: a mismatch means
the pair is out of step, and both sides break off.

After a timeout or a transport failure (a partner that died: gloo's errors become
:class:`~astage.ReplicationError`), a receive may still be posted in the process group, where
it would swallow the partner's next message: the transport is then *broken*
(:attr:`Transport.broken` says why) and must not exchange again, and the buffers of messages
still posted are kept alive for good (gloo may still write into them).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .._core._arena import host_empty
from .._drivers._gc import gc_paused
from .._errors import ReplicationError, ReplicationTimeoutError
from .._paths import format_path
from .._torch import storage_use_count
from ._wire import (
    Encoded,
    Header,
    Incoming,
    check_lengths,
    decode,
    encode,
    header_bytes,
    pack,
    parse_header,
    refusal_bytes,
    unpack_plan,
)

__all__ = ["Landed", "Progress", "ReplicaReady", "Transport"]


@dataclass(frozen=True)
class ReplicaReady:
    """The partner's header is read: ``replica`` is built on ``storages``, still being filled."""

    replica: Any
    storages: list[torch.Tensor]


@dataclass(frozen=True)
class Landed:
    """The bytes of the partner's storages at ``indices`` are in place."""

    indices: list[int]


Progress = ReplicaReady | Landed
"""What :meth:`Transport.exchange` reports while the bytes arrive."""

# Tags of the steps: the sizes, the header, the verdict, then one tag per byte message.
_SIZES_TAG, _HEADER_TAG, _VERDICT_TAG, _FIRST_BYTES_TAG = 0, 1, 2, 3

# The verdicts: the header is accepted, refused, or shows that the pair is out of step.
_ACCEPT, _REFUSE, _BREAK = 1, 0, -1


class _Buffers:
    """The receive buffers of one exchange: the last call's, or fresh ones made one by one as
    the decoder reaches them (see :func:`._wire.decode`, which refuses a storage no tensor views).
    """

    def __init__(self, sizes: list[int], reused: list[torch.Tensor] | None) -> None:
        self._sizes = sizes
        self._reused = reused
        self._made: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._sizes)

    def __getitem__(self, index: int, /) -> torch.Tensor:
        if self._reused is not None:
            return self._reused[index]
        buffer = self._made.get(index)
        if buffer is None:
            size = self._sizes[index]
            # A replica's tensors view these buffers, and the next exchange of the same sizes
            # receives into them again: memory whose storage refuses resize_, so that a caller
            # freeing a replica cannot shrink a buffer under the next exchange (see _arena).
            buffer = self._made[index] = host_empty((size,), torch.uint8)
        return buffer

    def all(self) -> list[torch.Tensor]:
        """Every buffer, in storage order (made by now: the decoder reached each one)."""
        if self._reused is not None:
            return self._reused
        return [self[i] for i in range(len(self._sizes))]


_KEPT_FOR_GLOO: list[Any] = []
"""Buffers of messages still posted when an exchange failed, kept alive for good.

After a timeout or a transport failure, gloo may still write a late message into a posted
receive buffer (or read a send buffer): freeing them would let it overwrite unrelated memory.
Only a broken transport adds here, so this holds at most one exchange's buffers per pair.
"""


class Transport:
    """Swaps staged snapshots between ``rank`` and its partners over ``group``.

    It keeps the receive buffers (one per partner storage) and the send buckets from call to
    call, so a steady state dict is exchanged without allocating; the replica it returns is
    a set of views on those receive buffers, overwritten by the next exchange.
    """

    def __init__(
        self, group: Any, rank: int, send_to: int, receive_from: int, timeout: float
    ) -> None:
        self.group = group
        self.rank = rank
        self.send_to = send_to
        self.receive_from = receive_from
        self.timeout = timeout
        self.broken: str | None = None
        """Why this transport must not exchange again (``None`` while it may)."""
        self.last_seconds: float | None = None
        """Seconds the last successful exchange took (header and bytes, both directions)."""
        self._recv_buffers: list[torch.Tensor] = []
        self._send_buckets: list[torch.Tensor] = []
        self.fresh_when_in_use = False
        """Receive into fresh buffers while a replica handed out still uses the last ones."""

    @property
    def where(self) -> str:
        """Both ranks of this exchange, as every error message names them."""
        if self.send_to == self.receive_from:
            return f"rank {self.rank} <-> partner rank {self.send_to}"
        return (
            f"rank {self.rank} (sending to rank {self.send_to}, "
            f"receiving from rank {self.receive_from})"
        )

    def break_off(self, reason: str) -> None:
        """Mark the transport unusable; the first reason given is the one kept."""
        if self.broken is None:
            self.broken = reason

    def release(self) -> None:
        """Drop the cached buffers (a replica handed out keeps its own alive)."""
        self._recv_buffers = []
        self._send_buckets = []

    # -- the exchange (worker thread) ------------------------------------------------------

    def exchange(
        self,
        staged: Any,
        call: int,
        report: Callable[[Progress], None] | None = None,
        *,
        refusal: ReplicationError | None = None,
        broken: bool = False,
    ) -> Any:
        """Send ``staged``, receive the partner's snapshot of the same ``call``, return it.

        With ``report``, it reports :class:`ReplicaReady` as soon as the header is read and
        checked, then :class:`Landed` as each message's bytes are in place, so a file can be
        written while the bytes are still arriving. With ``refusal``, this side sends no
        snapshot: the partner is told why (and, with ``broken``, that this pair is done), and
        ``refusal`` is raised once the exchange is over. Any failure is a
        :class:`~astage.ReplicationError` naming both ranks.
        """
        try:
            return self._exchange(staged, call, report, refusal, broken)
        except ReplicationError:
            raise
        except Exception as error:  # gloo's RuntimeError, an allocation that failed, ...
            first_line = (str(error).splitlines() or [type(error).__name__])[0]
            reason = f"{self.where}: the exchange of call {call} failed: {first_line}"
            self.break_off(reason)
            raise ReplicationError(reason) from error

    def _exchange(
        self,
        staged: Any,
        call: int,
        report: Callable[[Progress], None] | None,
        refused: ReplicationError | None,
        broken: bool,
    ) -> Any:
        started = time.monotonic()
        deadline = started + self.timeout
        # A snapshot this rank cannot send is announced in the header (total bytes -1), so
        # the partner raises at once instead of timing out, and the pair stays in step.
        encoded, text, sizes, total = Encoded({}, []), b"", [], -1
        if refused is None:
            try:
                # Here and in decoding: a few objects per tensor set off collections over the
                # whole heap, which hold the GIL (and so the caller's event loop): over 20,000
                # small tensors, oldest-generation passes of 230-380 ms, twice a call.
                with gc_paused():
                    encoded = encode(staged, call)
                    text = header_bytes(encoded)
                sizes = encoded.header["storages"]
                total = sum(sizes)
                # The partner would refuse this first message and break off without a verdict,
                # leaving this side to wait for the header exchange until its deadline.
                problem = check_lengths(len(text), total)
                if problem is not None:
                    raise ReplicationError(f"the partner cannot take its header: {problem}")
            except ReplicationError as error:
                refused = self._refusal(error)
        if refused is not None:
            text = refusal_bytes(str(refused), call, broken=broken)
            encoded, sizes, total = Encoded({}, []), [], -1
        # 1. the header's length and the total bytes
        mine = torch.tensor([len(text), total], dtype=torch.int64, device="cpu")
        theirs = torch.zeros(2, dtype=torch.int64, device="cpu")
        self._swap([mine], [theirs], deadline, "the header-size exchange", _SIZES_TAG)
        their_length, their_total = int(theirs[0]), int(theirs[1])
        problem = check_lengths(their_length, their_total)
        if problem is not None:  # nothing sane to receive the header into: the pair is lost
            reason = f"{self.where}: bad first message from rank {self.receive_from}: {problem}"
            self.break_off(reason)
            raise ReplicationError(reason)
        # 2. the header
        out = torch.frombuffer(bytearray(text), dtype=torch.uint8)
        into = torch.empty(their_length, dtype=torch.uint8, device="cpu")
        self._swap([out], [into], deadline, "the header exchange", _HEADER_TAG)
        # 3. check it and rebuild the replica on its buffers, before any byte is received
        header: Header | None = None
        replica: Any = None
        storages: list[torch.Tensor] = []
        plan: list[Incoming] = []
        rejected: ReplicationError | None = None
        out_of_step = False
        try:
            with gc_paused():
                header = parse_header(into.numpy().tobytes(), their_total)
            if header.call != call:
                out_of_step = True
                raise ReplicationError(
                    f"header field 'call' is {header.call} where this rank is at call {call}: "
                    "the pair is out of step"
                )
            if their_total >= 0:
                # The buffers are made as the decoder reaches each storage, never before: a
                # header may list storages by the million at two bytes each ("0,"), and the
                # decoder refuses storages that no tensor views before any more are made.
                buffers = self._receive_buffers(header.sizes)
                with gc_paused():
                    replica = decode(
                        header.raw,
                        buffers,
                        encoded.meshes,
                        self.receive_from,
                        sizes=header.sizes,
                        rank=self.rank,
                        group=self.group,
                    )
                storages = self._recv_buffers = buffers.all()
                plan = unpack_plan(storages, header.sizes)
        except Exception as error:  # noqa: BLE001 - sent back as this rank's refusal
            # Whatever went wrong checking the header is a refusal: an exception that left here
            # would skip the verdict exchange below, and the partner would wait for its verdict
            # until the deadline.
            text_error = str(error)
            rejected = ReplicationError(
                f"{self.where}: refused the header from rank {self.receive_from}: {text_error}"
            )
            rejected.__cause__ = error
            replica, plan = None, []
        # 4. the verdicts: bytes flow only into a receiver that accepted its header
        code = _ACCEPT if rejected is None else _BREAK if out_of_step else _REFUSE
        verdict = torch.tensor([code], dtype=torch.int64, device="cpu")
        their_verdict = torch.zeros(1, dtype=torch.int64, device="cpu")
        self._swap([verdict], [their_verdict], deadline, "the verdict exchange", _VERDICT_TAG)
        accepted = int(their_verdict[0]) == _ACCEPT
        out_of_step = out_of_step or int(their_verdict[0]) == _BREAK
        if replica is not None and report is not None:
            report(ReplicaReady(replica, storages))
        # 5. the bytes
        send = []
        if refused is None and accepted:
            send = pack(encoded.storages, sizes, self._send_buckets)
        send_works, recv_works = self._post(
            send, [message.buffer for message in plan], _FIRST_BYTES_TAG
        )
        try:
            for work, message in zip(recv_works, plan, strict=True):
                self._wait([work], deadline, "the tensor exchange")
                assert header is not None
                message.unpack(storages, header.sizes)
                if report is not None:
                    report(Landed(message.indices))
            self._wait(send_works, deadline, "the tensor exchange")
        except BaseException:
            # A receive or a send may still be posted: gloo would write into (or read from)
            # these buffers after they were freed. They are kept for good instead.
            _KEPT_FOR_GLOO.append((send, [message.buffer for message in plan], storages))
            raise
        # 6. the outcome, the same on both sides
        if out_of_step or (header is not None and header.broken):
            self.break_off(
                f"{self.where}: the pair is out of step since call {call}"
                + (f": {header.refused}" if header is not None and header.refused else "")
            )
        if refused is not None:
            raise refused
        if rejected is not None:
            raise rejected
        if not accepted:
            why = "the pair is out of step" if out_of_step else "its own error says which field"
            raise ReplicationError(
                f"{self.where}: rank {self.send_to} refused the header of this rank's snapshot "
                f"(call {call}): {why}"
            )
        assert header is not None
        if header.refused is not None:
            raise ReplicationError(
                f"{self.where}: rank {self.receive_from} could not send its snapshot "
                f"(call {call}): {header.refused}"
            )
        self.last_seconds = time.monotonic() - started
        return replica

    def _refusal(self, error: ReplicationError) -> ReplicationError:
        """The encoder's refusal, naming both ranks and still carrying the path."""
        text = str(error)
        if error.path is not None:
            text = text.removeprefix(f"at {format_path(error.path)}: ")
        refusal = ReplicationError(f"{self.where}: cannot send this snapshot: {text}", error.path)
        refusal.__cause__ = error
        return refusal

    def _receive_buffers(self, sizes: list[int]) -> _Buffers:
        """One host buffer per partner storage, reused from the last call when sizes match.

        With :attr:`fresh_when_in_use`, buffers that a replica handed out still uses are left
        to it, and fresh ones are made (each when the decoder first reaches it).
        """
        if self.fresh_when_in_use and any(
            storage_use_count(b.untyped_storage()) > 2  # this tensor and the storage object
            for b in self._recv_buffers
        ):
            self._recv_buffers = []
        if len(self._recv_buffers) == len(sizes) and all(
            b.numel() == n for b, n in zip(self._recv_buffers, sizes, strict=True)
        ):
            return _Buffers(sizes, self._recv_buffers)
        return _Buffers(sizes, None)

    def _post(
        self, send: list[torch.Tensor], recv: list[torch.Tensor], first_tag: int
    ) -> tuple[list[Any], list[Any]]:
        """Post every send and receive at once, message ``i`` on tag ``first_tag + i``."""
        group, dst, src = self.group, self.send_to, self.receive_from
        sends: list[Any] = []
        receives: list[Any] = []
        try:
            for i, tensor in enumerate(send):
                sends.append(dist.isend(tensor, group=group, group_dst=dst, tag=first_tag + i))
            for i, tensor in enumerate(recv):
                receives.append(dist.irecv(tensor, group=group, group_src=src, tag=first_tag + i))
        except Exception as error:
            # A partner that is gone fails the posting itself (gloo's RuntimeError); what was
            # posted already may still be in flight.
            _KEPT_FOR_GLOO.append((send, recv))
            first_line = (str(error).splitlines() or [type(error).__name__])[0]
            reason = f"{self.where}: posting a message failed: {first_line}"
            self.break_off(reason)
            raise ReplicationError(reason) from error
        return [w for w in sends if w is not None], [w for w in receives if w is not None]

    def _swap(
        self,
        send: list[torch.Tensor],
        recv: list[torch.Tensor],
        deadline: float,
        doing: str,
        first_tag: int,
    ) -> None:
        sends, receives = self._post(send, recv, first_tag)
        try:
            self._wait(sends + receives, deadline, doing)
        except BaseException:
            _KEPT_FOR_GLOO.append((send, recv))  # still posted: see _exchange
            raise

    def _wait(self, works: list[Any], deadline: float, doing: str) -> None:
        for work in works:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError("deadline passed")
                # Whole milliseconds, rounded up: torch.distributed truncates to them, and gloo
                # reads 0 ms as no timeout at all (the process group's own, 30 minutes by
                # default), so a wait begun under 1 ms before the deadline blocked that long.
                work.wait(timedelta(milliseconds=math.ceil(left * 1000)))
            except Exception as error:
                text = str(error)
                timed_out = (
                    isinstance(error, TimeoutError)
                    or "imed out" in text
                    or "imeout" in text
                    or time.monotonic() >= deadline
                )
                if timed_out:
                    reason = (
                        f"{self.where}: the partner did not complete {doing} within "
                        f"{self.timeout:g} s; is rank {self.receive_from} gone or not calling "
                        "stage()?"
                    )
                    self.break_off(f"{reason} (a receive is still posted: this stager is unusable)")
                    raise ReplicationTimeoutError(reason) from error
                first_line = (text.splitlines() or [type(error).__name__])[0]
                reason = f"{self.where}: {doing} failed: {first_line}"
                self.break_off(reason)
                raise ReplicationError(reason) from error
