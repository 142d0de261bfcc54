"""SyncStager: the blocking driver of the staging core, for code that is not async.

It runs the same walk, cache and batches as :class:`~astage.Stager`, in the calling thread:
host copies inline, CUDA copies enqueued on the staging streams and waited for with
``Event.synchronize()``. It needs no event loop and starts no thread, so it works anywhere,
including legacy code called from inside a running loop (where it blocks that loop, as any
blocking call would).
"""

from __future__ import annotations

import contextlib
import threading
from types import TracebackType
from typing import Any

from .._devices._host import run_host_batch
from .._options import StagingOptions
from ._base import Pending, StagerFace, gc_paused


class SyncStager(StagerFace):
    """Stages state dicts into reusable host buffers, blocking until the copies are done.

    Thread-safe: concurrent calls from several threads run one after the other.
    """

    def __init__(self, options: StagingOptions | None = None, **overrides: Any) -> None:
        super().__init__(options, **overrides)
        self._lock = threading.Lock()

    def stage(self, state_dict: Any) -> Any:
        """A copy of ``state_dict`` whose tensors all live in host buffers of this stager."""
        base = self._base
        with self._lock:
            base.check_open()
            self._drain_outstanding()
            base.staging = True
            run = base.new_run(state_dict, track_leaves=False)
            try:
                with gc_paused(base.resolved.pause_gc):
                    for _ in run.walk:
                        pass
                while True:
                    batch = run.next_batch(final=True)
                    if batch is None:
                        if not run.pending:
                            break
                        run.pending[0].wait_blocking()
                        run.reap()
                        continue
                    base.before_batch(run, batch)
                    if batch.device.type == "cuda":
                        assert base.cuda is not None
                        run.start(Pending(batch, event=base.cuda.enqueue(batch)))
                    else:
                        run_host_batch(batch)
                base.finish(run)
                return run.plan.result
            except BaseException:
                base.outstanding.extend(run.pending)
                raise
            finally:
                base.staging = False

    def _drain_outstanding(self) -> None:
        outstanding = self._base.outstanding
        while outstanding:
            with contextlib.suppress(Exception):  # that call already reported its error
                outstanding[0].wait_blocking()
            outstanding.pop(0)

    def close(self) -> None:
        """Wait for a call in progress, then release every buffer and stream."""
        with self._lock:
            if self._base.closed:
                return
            self._drain_outstanding()
            self._base.closed = True
            if self._base.cuda is not None:
                self._base.cuda.synchronize()
            self._base.cache.clear()

    def __enter__(self) -> SyncStager:
        self._base.check_open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
