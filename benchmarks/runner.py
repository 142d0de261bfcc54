"""One event loop for a whole benchmark run, driven from the synchronous scenario code."""

from __future__ import annotations

from collections.abc import Coroutine
from contextlib import AbstractContextManager
from typing import Any, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

__all__ = ["BACKENDS", "LoopRunner", "anyio_backend"]

T = TypeVar("T")

BACKENDS = ("asyncio", "uvloop", "trio")
"""The loops a run can use: anyio's backends, asyncio also with uvloop's loop."""


def anyio_backend(backend: str) -> tuple[str, dict[str, Any]]:
    """``backend`` as anyio's ``backend`` and ``backend_options`` ("uvloop" is asyncio's option)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    return ("asyncio", {"use_uvloop": True}) if backend == "uvloop" else (backend, {})


class LoopRunner:
    """Runs coroutines to completion on one event loop that lives for the whole run.

    The loop runs in a thread of its own (anyio's blocking portal) under one root task, as a
    training program's loop does; the calling thread waits, holding no GIL, while a coroutine
    runs. A loop started afresh for every call (``run_until_complete``) would also stop anyio's
    worker threads after every call, and each next call would pay to start them again.
    Coroutines are timed inside the loop (see :func:`benchmarks.timing.timed_async`), so the
    hand-over between the threads is not part of any figure.
    """

    def __init__(self, backend: str = "asyncio") -> None:
        self.backend = backend
        self._context: AbstractContextManager[BlockingPortal] = start_blocking_portal(
            *anyio_backend(backend)
        )
        self._portal = self._context.__enter__()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Await ``coroutine`` on the loop and return its result (or raise its exception)."""

        async def await_it() -> T:
            return await coroutine

        return self._portal.call(await_it)

    def close(self) -> None:
        """Stop the loop and its thread (and anyio's worker threads with them)."""
        self._context.__exit__(None, None, None)

    def __enter__(self) -> LoopRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
