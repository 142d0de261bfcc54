"""The staging thread behind ``DefaultStager(use_async_staging=True)``.

Async staging runs astage's sync driver (:class:`~astage.SyncStager`, through the pool) in one
worker thread, not :class:`~astage.Stager` on an event loop in that thread: DCP's callers are
synchronous and wait on a ``concurrent.futures.Future``, and a thread of its own may simply
block. The sync driver already gives up the GIL where the time goes (torch copies host bytes
without it, and CUDA copies are waited for in ``Event.synchronize()``), while an event loop
would add the loop and its worker threads with nothing to interleave. One thread
also keeps the calls in order, as DCP's DefaultStager (one worker) does.

Stream ordering: the copies must not start before the kernels that the caller queued up to its
``stage()`` call have written their outputs, but the worker thread has a current CUDA stream of
its own. So ``submit`` records an event on the caller's current stream (current device), and
the worker stages under a stream that first waits for that event; astage's staging stream
follows that stream as it always follows the current one. Recording in the caller's thread, at
the call, matters: an event recorded later in the worker would also wait for whatever training
queued after the call.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from .._options import cuda_available


class _ProducerMark:
    """Where the caller's current CUDA stream stood when it asked for staging."""

    __slots__ = ("device", "event")

    def __init__(self) -> None:
        self.device: int | None = None
        self.event: torch.cuda.Event | None = None
        # CUDA tensors exist only once CUDA is initialized: nothing to order before that.
        if cuda_available() and torch.cuda.is_initialized():
            self.device = torch.cuda.current_device()
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(self.device))


class StagingThread:
    """One worker thread that runs staging calls in order and resolves their futures."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._last: Future[None] | None = None
        self._streams: dict[int, torch.cuda.Stream] = {}  # used from the worker thread only
        self._lock = threading.Lock()

    def submit(self, stage: Callable[[Any], Any], state_dict: Any) -> Future[Any]:
        """Run ``stage(state_dict)`` in the worker; the future resolves to its result."""
        mark = _ProducerMark()
        future: Future[Any] = Future()
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="astage-compat")
            # The executor's own future carries no result: only the caller's future holds the
            # staged dict, so the snapshot dies (and its buffers come free) with the caller's.
            self._last = self._executor.submit(self._run, stage, state_dict, mark, future)
        return future

    def _run(
        self, stage: Callable[[Any], Any], state_dict: Any, mark: _ProducerMark, future: Future[Any]
    ) -> None:
        if not future.set_running_or_notify_cancel():
            return  # cancelled before it started
        try:
            with self._after(mark):
                result = stage(state_dict)
        except BaseException as error:
            future.set_exception(error)
            raise
        future.set_result(result)

    @contextlib.contextmanager
    def _after(self, mark: _ProducerMark) -> Iterator[None]:
        """Make the worker's current stream wait for the caller's, as it was at the call."""
        if mark.event is None or mark.device is None:
            yield
            return
        stream = self._streams.get(mark.device)
        if stream is None:
            stream = self._streams[mark.device] = torch.cuda.Stream(device=mark.device)
        stream.wait_event(mark.event)
        with torch.cuda.stream(stream):
            yield

    def wait(self) -> None:
        """Wait for the last call submitted; raises its error, if it failed."""
        with self._lock:
            last = self._last
        if last is not None:
            last.result()

    def shutdown(self) -> None:
        """Let the calls submitted finish, then end the thread."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
