"""DefaultStager: DCP's full-featured stager, on astage's core."""

from __future__ import annotations

from concurrent.futures import Future
from types import TracebackType
from typing import Any

from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.checkpoint.staging import StagingOptions as DcpStagingOptions

from .._core._cache import CacheInfo
from .._core._stats import StageStats
from .._errors import StagerClosedError
from .._torch import register_checkpoint_stager
from ._options import DcpFlags
from ._pool import SnapshotPool
from ._worker import StagingThread


class DefaultStager(AsyncStager):
    """Drop-in for ``torch.distributed.checkpoint.staging.DefaultStager``.

    ``config`` is DCP's ``StagingOptions`` (the default: all four flags on, as in DCP), its
    experimental ``CheckpointStagerConfig``, or any object with ``use_pinned_memory``,
    ``use_shared_memory``, ``use_async_staging`` and ``use_non_blocking_copy``. Keyword
    arguments override fields of the :class:`astage.StagingOptions` the flags translate to
    (``pin_memory_min_bytes``, ``chunk_bytes``, ...).

    ``stage()`` returns the staged dict, or a ``concurrent.futures.Future`` of it when
    ``use_async_staging`` is on. One stager serves any number of saves: its buffers stay cached
    (and pinned) from save to save, and a snapshot that an upload still reads is never
    overwritten by the next save's staging (see :mod:`astage.compat._pool`).
    """

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        self._config = config if config is not None else DcpStagingOptions()
        flags = DcpFlags.of(self._config)
        self._pool = SnapshotPool(flags.options(overrides, stacklevel=2), type(self).__name__)
        self._thread = StagingThread(type(self).__name__) if flags.use_async_staging else None
        self._closed = False

    @property
    def config(self) -> Any:
        """The DCP config this stager was built from."""
        return self._config

    @property
    def last_stats(self) -> StageStats | None:
        """Figures of the last completed staging, or None before the first one."""
        return self._pool.last_stats

    def cache_info(self) -> CacheInfo:
        """Host memory held in cached buffers, over all buffer sets."""
        return self._pool.cache_info()

    def stage(self, state_dict: Any, **kwargs: Any) -> Any | Future[Any]:
        """Stage ``state_dict``: the staged dict, or a Future of it under async staging.

        Extra keyword arguments are accepted and ignored, as DCP's ``DefaultStager`` does.
        """
        self._check_open()
        if self._thread is None:
            return self._pool.stage(state_dict)
        return self._thread.submit(self._pool.stage, state_dict)

    def synchronize_staging(self) -> None:
        """Wait until the last staging has completed (a no-op without async staging)."""
        if self._thread is not None:
            self._thread.wait()

    def close(self) -> None:
        """Let staging in progress finish, then release the thread and every buffer."""
        self._closed = True
        if self._thread is not None:
            self._thread.shutdown()
        self._pool.close()

    def __enter__(self) -> DefaultStager:
        self._check_open()
        return self

    def _check_open(self) -> None:
        if self._closed:
            raise StagerClosedError(f"this {type(self).__name__} is closed")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# DCP's experimental Checkpointer takes a CheckpointStager (an ABC): the same class serves it,
# with its CheckpointStagerConfig, so it is registered as one.
register_checkpoint_stager(DefaultStager)
