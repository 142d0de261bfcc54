"""The big per-call tables of a walk (an entry per tensor or storage): grown apart, emptied
in steps, so that neither holds the event loop for long."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

EMPTY_STEP = 2048
"""Entries freed between two yields of :func:`empty_in_steps` (~0.1-0.2 ms on a quiet core)."""

LEAD_AFTER = 4096
"""Storages a first call meets before its per-storage tables are given their leads."""

LEAD = 1000
"""A lead's unit, in entries: tables given 0, 1 and 2 units grow 1,000 storages apart."""


def give_lead(table: dict[int, Any], units: int) -> None:
    """Put ``units`` x :data:`LEAD` entries into ``table`` under keys no ``id()`` can be.

    Why: a first call keeps several dicts with an entry per source storage (the call's copy
    index, the cache's buffers, the recording's slots). They reach the size where CPython
    grows a dict (two thirds of a power of two) at the same tensor, and each grows in one go,
    rehashing every entry into fresh memory: over 50,000 storages, three growths of 43,690
    entries held the loop 4-6 ms in one step, mostly in page faults. Entries that no lookup
    can match (``id()`` is never negative) move a table's growths ahead of the others', into
    other steps. Given only past :data:`LEAD_AFTER` storages, so small state dicts pay nothing;
    the lead's own entries cost ~0.1 ms.
    """
    table.update(dict.fromkeys(range(-units * LEAD, 0), -1))


def empty_in_steps(
    *containers: dict[Any, Any] | list[Any] | set[Any],
) -> Generator[None, None, None]:
    """Empty big dicts, lists and sets a few thousand entries at a time, yielding between.

    Freeing a container frees its entries (the ``id()`` keys of a memo, say) in one C call that
    holds the loop for as long as it takes; this spreads the same work over slices.
    """
    for container in containers:
        while len(container) > EMPTY_STEP:
            if isinstance(container, list):
                del container[-EMPTY_STEP:]
            else:
                pop: Any = container.popitem if isinstance(container, dict) else container.pop
                for _ in range(EMPTY_STEP):
                    pop()
            yield
        container.clear()
        yield
