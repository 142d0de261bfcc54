"""The staging thread behind ``DefaultStager(use_async_staging=True)``.

Async staging runs astage's sync driver (:class:`~astage.SyncStager`, through the pool) in one
worker thread, not :class:`~astage.Stager` on an event loop in that thread: DCP's callers are
synchronous and wait on a ``concurrent.futures.Future``, and a thread of its own may simply
block. The sync driver already gives up the GIL where the time goes (torch copies host bytes
without it, and CUDA copies are waited for in ``Event.synchronize()``), while an event loop
would add the loop and its worker threads with nothing to interleave. One thread
also keeps the calls in order, as DCP's DefaultStager (one worker) does.

Stream ordering: the copies must not start before the kernels that the caller queued up to its
``stage()`` call have written their outputs, but the worker thread has current streams of its
own. So ``submit`` records, in the caller's thread and at the call, a producer mark on the
caller's current stream of every device the state dict's tensors are on (found by a scan of its
dicts, lists and tuples) and of the device the caller has selected; the worker stages inside
:func:`~astage._drivers._base.ordered_after` those marks, so every staging stream waits on them
before its first copy. Recording later, in the worker, would order after the wrong stream (the
worker's) and after whatever training queued after the call. A device reached only through
another kind of object (a dataclass, a custom object) is marked when the walk meets it, on the
worker thread's current stream: pass such state dicts flattened, as DCP does.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from .._devices._backend import Mark
from .._drivers._base import mark_devices, ordered_after
from .._errors import StagerClosedError


def tensor_devices(state_dict: Any) -> set[torch.device]:
    """The devices of the tensors in ``state_dict``'s dicts, lists and tuples (not CPU)."""
    devices: set[torch.device] = set()
    seen: set[int] = set()
    stack = [state_dict]
    while stack:
        value = stack.pop()
        if isinstance(value, torch.Tensor):
            if not value.is_cpu:
                devices.add(value.device)
        elif isinstance(value, (dict, list, tuple)) and id(value) not in seen:
            seen.add(id(value))
            stack.extend(value.values() if isinstance(value, dict) else value)
    return devices


class StagingThread:
    """One worker thread that runs staging calls in order and resolves their futures."""

    def __init__(self, owner: str = "DefaultStager") -> None:
        self._owner = owner  # the class the user holds, for the closed-stager message
        self._executor: ThreadPoolExecutor | None = None
        self._last: Future[None] | None = None
        self._lock = threading.Lock()
        self._shut = False

    def submit(self, stage: Callable[[Any], Any], state_dict: Any) -> Future[Any]:
        """Run ``stage(state_dict)`` in the worker; the future resolves to its result."""
        marks = mark_devices(tensor_devices(state_dict))  # here: the caller's thread and streams
        future: Future[Any] = Future()
        with self._lock:
            if self._shut:
                # A close() that ran after the caller's check for it: a new executor here would
                # be a thread that nothing shuts down.
                raise StagerClosedError(f"this {self._owner} is closed")
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="astage-compat")
            # The executor's own future carries no result: only the caller's future holds the
            # staged dict, so the snapshot dies (and its buffers come free) with the caller's.
            self._last = self._executor.submit(self._run, stage, state_dict, marks, future)
        return future

    def _run(
        self,
        stage: Callable[[Any], Any],
        state_dict: Any,
        marks: list[Mark],
        future: Future[Any],
    ) -> None:
        if not future.set_running_or_notify_cancel():
            return  # cancelled before it started
        try:
            with ordered_after(marks):
                result = stage(state_dict)
        except BaseException as error:
            future.set_exception(error)
            raise
        future.set_result(result)

    def wait(self) -> None:
        """Wait for the last call submitted; raises its error, if it failed."""
        with self._lock:
            last = self._last
        if last is not None:
            last.result()

    def shutdown(self) -> None:
        """Let the calls submitted finish, then end the thread; later calls are refused."""
        with self._lock:
            executor, self._executor = self._executor, None
            self._shut = True
        if executor is not None:
            executor.shutdown(wait=True)
