"""Letting an event loop take the GIL from a worker thread's long stretch of Python.

Work moved off the event loop into a worker thread (``anyio.to_thread``) spares the loop only
while that thread is in C code that lets go of the GIL. A stretch of Python (planning a file's
layout over 20,000 tensors: 0.1-0.3 s) keeps it, and a loop thread that wakes meanwhile (a
timer, a socket) waits for it: CPython asks the holder to let go only after a whole switch
interval (5 ms) without a switch, so a 1 ms heartbeat beside such a plan ran 6-12 ms late.
The thread itself has to let go: a short sleep every so often, during which the waiting loop
takes the GIL, runs its ready callbacks and lets go again at its next ``select``.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

_GIL = getattr(sys, "_is_gil_enabled", lambda: True)()

HAND_OVER_EVERY_S = 5e-4
"""How long a worker thread keeps the GIL between two hand-overs: a loop that wakes meanwhile
waits at most about this long (half the 1 ms heartbeat the benchmarks hold the loop to)."""

HAND_OVER_S = 5e-5
"""How long each hand-over sleeps: long enough for the woken loop thread to take the GIL
(a futex wake), short against :data:`HAND_OVER_EVERY_S`."""


class GilSharing:
    """Call :meth:`tick` often from a long Python stretch in a worker thread: about every
    :data:`HAND_OVER_EVERY_S` it sleeps :data:`HAND_OVER_S`, letting a waiting loop run.

    A tick reads the clock (tens of nanoseconds): tick between steps of a few microseconds
    or more. Never tick it on the event loop's own thread: it would sleep the loop.
    """

    __slots__ = ("_due", "handed_over")

    def __init__(self) -> None:
        # A free-threaded build has no GIL to hand over: the ticks never sleep there.
        self._due = time.perf_counter() + HAND_OVER_EVERY_S if _GIL else math.inf
        self.handed_over = 0
        """Hand-overs so far (tests and benchmarks read it)."""

    def tick(self) -> None:
        if time.perf_counter() < self._due:
            return
        time.sleep(HAND_OVER_S)
        self.handed_over += 1
        self._due = time.perf_counter() + HAND_OVER_EVERY_S


def drop_in_pieces(pile: list[Any], sharing: GilSharing) -> None:
    """Free the nested lists and dicts in ``pile`` a piece at a time, ticking ``sharing``.

    Why: freeing a tree of many small objects is one long stretch holding the GIL (a save's
    header skeleton over 20,000 tensors: ~50,000 lists and dicts, 4-7 ms at once). Here a big
    list or dict (more than :data:`DROP_PIECE` items) is cut from its end
    :data:`DROP_PIECE` items at a time, each cut freed at once (in C), and the small
    containers of the top :data:`DROP_OPEN_DEPTH` levels, where a tree nests its big ones, are
    opened, so that a big one under them is cut too. Emptying each container item by item
    instead cost 37 ms of Python for those 5 ms. A container something else still holds
    (another place in the tree, a cache) is only let go of, never emptied. The caller hands
    its references over: ``pile`` must be the only thing that holds the tree's root
    (``pile = [tree]; del tree``).
    """
    stack: list[tuple[Any, int]] = []
    while pile:
        root = pile.pop()
        # The roots as any item: a root that is no container (a bare tensor's node shared
        # with a cache, a plain value) is only let go of.
        if type(root) in _CONTAINERS and root and sys.getrefcount(root) == 2:
            stack.append((root, 0))
        del root
    while stack:
        node, depth = stack.pop()
        if type(node) is dict:
            values = list(node.values())
            node.clear()
        else:
            values = node
        del node
        if len(values) <= DROP_PIECE and depth < DROP_OPEN_DEPTH:
            while values:
                item = values.pop()
                # 2: `item` and getrefcount's argument; then nothing else holds it
                if type(item) in _CONTAINERS and item and sys.getrefcount(item) == 2:
                    stack.append((item, depth + 1))
                del item
            continue
        while values:
            cut = values[-DROP_PIECE:]
            del values[-DROP_PIECE:]
            for item in cut:
                # 3: the cut, `item` and getrefcount's argument
                if (
                    type(item) in _CONTAINERS
                    and len(item) > DROP_PIECE
                    and sys.getrefcount(item) == 3
                ):
                    stack.append((item, depth + 1))
            del cut  # the rest of the cut is freed here
            sharing.tick()


_CONTAINERS = (list, dict)
DROP_PIECE = 256
"""The most items :func:`drop_in_pieces` frees at once (each maybe a small tree of its own)."""
DROP_OPEN_DEPTH = 8
"""How deep :func:`drop_in_pieces` opens small containers to look for big ones inside."""
