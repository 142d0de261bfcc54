"""The transport: one snapshot out to a partner rank and the partner's in, over torch.distributed.

:meth:`Transport.exchange` is blocking code for a worker thread (torch.distributed waits
block). Every rank posts its sends and its receives at once (non-blocking ``isend`` /
``irecv``), so no ordering between the two sides is needed and no pair deadlocks; message
``i`` of a step goes on its own tag, which lets gloo move the messages side by side (one tag
serializes them: about 1.5x slower on loopback). Every wait has a deadline: a partner that
does not take part within ``timeout`` raises :class:`~astage.ReplicationTimeoutError`.

After a timeout, a transport failure or a header it cannot read, a receive may still be
posted in the process group, where it would swallow the partner's next message: the
transport is then *broken* (:attr:`Transport.broken` says why) and must not exchange again.
A snapshot a side refuses to send is announced in its header instead, so both sides raise
at once and stay in step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .._errors import ReplicationError, ReplicationTimeoutError
from .._paths import format_path
from ._wire import (
    Encoded,
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

# Tags of the three steps: the sizes, the header, then one tag per byte message.
_SIZES_TAG, _HEADER_TAG, _FIRST_BYTES_TAG = 0, 1, 2


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

    def exchange(self, staged: Any, report: Callable[[Progress], None] | None = None) -> Any:
        """Send ``staged``, receive the partner's snapshot, return it (blocking).

        With ``report``, it reports :class:`ReplicaReady` as soon as the header is read, then
        :class:`Landed` as each message's bytes are in place, so a file can be written while
        the bytes are still arriving.
        """
        started = time.monotonic()
        deadline = started + self.timeout
        # A snapshot this rank cannot send is announced in the header (total bytes -1), so
        # the partner raises at once instead of timing out, and the pair stays in step.
        refused: ReplicationError | None = None
        try:
            encoded = encode(staged)
            text = header_bytes(encoded)
            sizes: list[int] = encoded.header["storages"]
            total = sum(sizes)
        except ReplicationError as error:
            refused = self._refusal(error)
            encoded = Encoded({}, [])
            text = refusal_bytes(str(error))
            sizes, total = [], -1
        # 1. sizes
        mine = torch.tensor([len(text), total], dtype=torch.int64)
        theirs = torch.zeros(2, dtype=torch.int64)
        self._swap([mine], [theirs], deadline, "the header-size exchange", _SIZES_TAG)
        # 2. header
        out = torch.frombuffer(bytearray(text), dtype=torch.uint8)
        into = torch.empty(int(theirs[0]), dtype=torch.uint8)
        self._swap([out], [into], deadline, "the header exchange", _HEADER_TAG)
        their_total = int(theirs[1])
        try:
            header, their_sizes = parse_header(into.numpy().tobytes(), their_total)
        except (ValueError, KeyError, TypeError) as error:
            reason = f"{self.where}: unreadable header from rank {self.receive_from}: {error}"
            self.break_off(reason)
            raise ReplicationError(reason) from error
        # 3. bytes (each side sends unless it refused, receives unless its sender refused)
        send = pack(encoded.storages, sizes, self._send_buckets) if refused is None else []
        storages = self._receive_buffers(their_sizes)
        plan = unpack_plan(storages, their_sizes)
        send_works, recv_works = self._post(
            send, [message.buffer for message in plan], _FIRST_BYTES_TAG
        )
        replica = None
        if refused is None and their_total >= 0:
            try:
                replica = decode(header, storages, encoded.meshes, self.receive_from)
            except Exception as error:
                # the receives are posted: the pair cannot be brought back in step
                reason = (
                    f"{self.where}: cannot rebuild the snapshot of rank {self.receive_from}: "
                    f"{error}"
                )
                self.break_off(reason)
                raise ReplicationError(reason) from error
            if report is not None:
                report(ReplicaReady(replica, storages))
        for work, message in zip(recv_works, plan, strict=True):
            self._wait([work], deadline, "the tensor exchange")
            message.unpack(storages, their_sizes)
            if report is not None and replica is not None:
                report(Landed(message.indices))
        self._wait(send_works, deadline, "the tensor exchange")
        if refused is not None:
            raise refused
        if their_total < 0:
            raise ReplicationError(
                f"{self.where}: rank {self.receive_from} could not send its snapshot: "
                f"{header.get('refused')}"
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

    def _receive_buffers(self, sizes: list[int]) -> list[torch.Tensor]:
        """One host buffer per partner storage, reused from the last call when sizes match."""
        if [b.numel() for b in self._recv_buffers] != sizes:
            self._recv_buffers = [torch.empty(n, dtype=torch.uint8) for n in sizes]
        return self._recv_buffers

    def _post(
        self, send: list[torch.Tensor], recv: list[torch.Tensor], first_tag: int
    ) -> tuple[list[Any], list[Any]]:
        """Post every send and receive at once, message ``i`` on tag ``first_tag + i``."""
        group, dst, src = self.group, self.send_to, self.receive_from
        sends = [
            dist.isend(tensor, group=group, group_dst=dst, tag=first_tag + i)
            for i, tensor in enumerate(send)
        ]
        receives = [
            dist.irecv(tensor, group=group, group_src=src, tag=first_tag + i)
            for i, tensor in enumerate(recv)
        ]
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
        self._wait(sends + receives, deadline, doing)

    def _wait(self, works: list[Any], deadline: float, doing: str) -> None:
        for work in works:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError("deadline passed")
                work.wait(timedelta(seconds=left))
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
