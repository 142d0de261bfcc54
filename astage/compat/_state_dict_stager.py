"""StateDictStager: DCP's deep copy into cached CPU storages, on astage's core."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from .._core._cache import CacheInfo
from .._core._stats import StageStats
from .._drivers._sync import SyncStager
from .._errors import StagerClosedError
from ._options import pinning


class StateDictStager:
    """Drop-in for ``torch.distributed.checkpoint._state_dict_stager.StateDictStager``.

    ``stage()`` returns a copy of the state dict whose tensors live in host buffers cached per
    source storage: the next call on the same state dict copies fresh values into the same
    buffers (so it overwrites the previous result, as DCP's does). Aliasing, tensor attributes,
    dataclasses and every dtype are kept (the semantics of :class:`astage.SyncStager`, which
    does the work).

    ``pin_memory=True`` without CUDA warns (here, once) and pins nothing, as DCP does; with
    CUDA, buffers of at least ``pin_memory_min_bytes`` are pinned. ``share_memory=True`` puts
    the buffers in shared memory.
    """

    def __init__(
        self,
        pin_memory: bool = False,
        share_memory: bool = False,
        pin_memory_min_bytes: int = 5,
    ) -> None:
        self.pin_memory = pinning(pin_memory, stacklevel=2)
        self.share_memory = bool(share_memory)
        self.pin_memory_min_bytes = pin_memory_min_bytes
        self._stager = SyncStager(
            pin_memory=self.pin_memory,
            share_memory=self.share_memory,
            pin_memory_min_bytes=pin_memory_min_bytes,
        )

    @property
    def last_stats(self) -> StageStats | None:
        """Figures of the last completed call, or None before the first one."""
        return self._stager.last_stats

    def stage(self, state_dict: Any, non_blocking: bool = False) -> Any:
        """A copy of ``state_dict`` with every tensor in this stager's host buffers.

        ``non_blocking`` is accepted for DCP's signature. DCP returns before non-blocking
        device copies have landed and leaves the waiting to its caller; astage's copies have
        always landed when ``stage()`` returns (on CUDA they run asynchronously on a staging
        stream that astage waits for), so the result is safe to read either way.
        """
        if self._stager.closed:
            raise StagerClosedError(f"this {type(self).__name__} is closed")
        return self._stager.stage(state_dict)

    def cache_info(self) -> CacheInfo:
        """How many host buffers the cache holds, and how many bytes (pinned and in all)."""
        return self._stager.cache_info()

    def close(self) -> None:
        """Release every cached buffer; results handed out stay valid."""
        self._stager.close()

    def __enter__(self) -> StateDictStager:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
