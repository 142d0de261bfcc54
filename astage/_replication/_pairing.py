"""Pairing: which rank each rank sends its snapshot to, and which rank it receives from.

In a group of ``world`` ranks, rank ``r`` swaps with ``(r + world // 2) % world`` when
``world`` is even (``0<->2, 1<->3`` for four ranks): the two copies of a snapshot then sit
half a group apart, so a job laid out node by node keeps them on different nodes. When
``world`` is odd no such pairing exists, so the ranks form a ring: ``r`` sends to ``r + 1``
and receives from ``r - 1``. ``partner=`` pins a symmetric partner instead.
"""

from __future__ import annotations

import contextlib
import operator

from .._errors import InvalidOptionsError, ReplicationError

__all__ = ["pairing"]


def pairing(rank: int, world: int, partner: int | None = None) -> tuple[int, int]:
    """``(send_to, receive_from)`` for ``rank`` in a group of ``world`` ranks.

    Even ``world``: the symmetric pair ``(r + world // 2) % world``. Odd ``world``: a ring,
    send to ``r + 1``, receive from ``r - 1``. ``partner`` pins a symmetric partner.

    Raises :class:`~astage.ReplicationError` for a group of fewer than 2 ranks (there is
    nobody to swap with) or a ``rank`` outside it, and :class:`~astage.InvalidOptionsError`
    for a ``partner`` that is not another rank of the group (an integer).
    """
    if rank < 0 or world < 0:
        # torch.distributed's answer (-1 for both) in a process outside the group: any
        # arithmetic on it would name a partner this process cannot reach.
        raise ReplicationError(
            f"this process is not a member of the process group (rank {rank}, world {world}); "
            "pass a group it belongs to"
        )
    if world < 2:
        raise ReplicationError(
            f"rank {rank}: replication needs at least 2 ranks; this process group has {world}"
        )
    if not 0 <= rank < world:
        raise ReplicationError(f"rank {rank} is not a rank of this {world}-rank group")
    if partner is not None:
        # An integer only (a numpy one too): True passed as rank 1, and 1.0 reached
        # torch.distributed's sends, an error at the first exchange with its partner left to
        # time out.
        number = None
        if not isinstance(partner, bool):
            with contextlib.suppress(TypeError):
                number = operator.index(partner)
        if number is None or not 0 <= number < world or number == rank:
            raise InvalidOptionsError(
                f"rank {rank}: partner={partner!r} is not another rank of this {world}-rank group"
            )
        return number, number
    if world % 2 == 0:
        other = (rank + world // 2) % world
        return other, other
    return (rank + 1) % world, (rank - 1) % world
