"""Buffer holds: a reader's claim that keeps a stager from overwriting its staged tensors.

Staged tensors live in the stager's cached host buffers, which the next call overwrites. A
reader that needs them for longer (a checkpoint writer still streaming them to disk) takes a
:class:`BufferHold`; the next call, ``close()`` and ``aclose()`` wait until every hold is
released before they touch the buffers. No second buffer set is allocated: a hold is
backpressure, not a copy.

A hold is released from wherever the reader finishes (the loop, a writer thread, a callback),
so its state is a :class:`threading.Event`. The blocking face waits on it directly; the async
face waits in an anyio worker thread that polls for cancellation, so a cancelled caller leaves
no thread behind.
"""

from __future__ import annotations

import threading
from types import TracebackType

import anyio
import anyio.from_thread
import anyio.to_thread

_CANCEL_POLL_S = 0.05  # how soon a waiting worker thread notices that its caller was cancelled


class BufferHold:
    """A claim on a stager's buffers; the next call waits until :meth:`release` is called.

    ``release()`` is idempotent and may be called from any thread or from the event loop.
    A hold is also a context manager that releases itself on exit.
    """

    __slots__ = ("_released",)

    def __init__(self) -> None:
        self._released = threading.Event()

    @property
    def released(self) -> bool:
        """Whether :meth:`release` was called."""
        return self._released.is_set()

    def release(self) -> None:
        """Let the stager touch its buffers again (as far as this hold is concerned)."""
        self._released.set()

    def wait(self) -> None:
        """Block the calling thread until the hold is released."""
        self._released.wait()

    async def wait_async(self) -> None:
        """Wait until the hold is released without blocking the event loop; cancellable."""
        if self._released.is_set():
            return
        # Not abandoned on cancel: the thread notices the cancellation within a poll and
        # returns, so no thread outlives the caller however long the hold stays taken.
        await anyio.to_thread.run_sync(self._wait_in_worker)

    def _wait_in_worker(self) -> None:
        while not self._released.wait(_CANCEL_POLL_S):
            anyio.from_thread.check_cancelled()

    def __enter__(self) -> BufferHold:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<BufferHold {'released' if self.released else 'held'}>"


class HoldRegistry:
    """The holds taken on one stager and not yet seen released; thread-safe."""

    def __init__(self) -> None:
        self._holds: list[BufferHold] = []
        self._lock = threading.Lock()

    def take(self) -> BufferHold:
        hold = BufferHold()
        with self._lock:
            self._holds.append(hold)
        return hold

    def unreleased(self) -> list[BufferHold]:
        """The holds still taken (released ones are forgotten)."""
        with self._lock:
            self._holds = [hold for hold in self._holds if not hold.released]
            return list(self._holds)

    def wait(self) -> None:
        """Block until every hold taken so far is released."""
        for hold in self.unreleased():
            hold.wait()

    async def wait_async(self) -> None:
        """Wait, without blocking the loop, until every hold taken so far is released."""
        for hold in self.unreleased():
            await hold.wait_async()
