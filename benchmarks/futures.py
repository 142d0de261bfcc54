"""Await a thread's ``concurrent.futures.Future`` on any anyio backend.

DCP's ``DefaultStager.stage()`` returns such a future, resolved in DCP's own thread. asyncio
programs await it through ``asyncio.wrap_future``; this does the same on asyncio and trio alike:
the future's callback schedules an event on the loop (never blocking DCP's thread) and the caller
awaits that event, with no worker thread parked on ``future.result()``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

import anyio

__all__ = ["wait_future"]

T = TypeVar("T")


def _call_soon_threadsafe() -> Callable[[Callable[[], object]], object]:
    """The running loop's way to run a callback soon, callable from any thread."""
    import asyncio

    try:
        return asyncio.get_running_loop().call_soon_threadsafe
    except RuntimeError:  # not asyncio: anyio's other backend is trio
        import trio

        return trio.lowlevel.current_trio_token().run_sync_soon


async def wait_future(future: Future[T]) -> T:
    """``future``'s result, awaited without holding the loop or a worker thread.

    Cancelling the wait leaves the future running; its late callback then sets an event that
    nobody awaits any more.
    """
    if not future.done():
        done = anyio.Event()
        call_soon = _call_soon_threadsafe()

        def wake(_: Future[T]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has finished meanwhile
                call_soon(done.set)

        future.add_done_callback(wake)
        await done.wait()
    return future.result()
