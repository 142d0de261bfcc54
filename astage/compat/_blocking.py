"""BlockingAsyncStager: DCP's blocking stager, on astage's core, CPU-only machines included."""

from __future__ import annotations

import io
from typing import Any

import torch
from torch.distributed.checkpoint.staging import AsyncStager

from .._core._cache import CacheInfo
from .._drivers._sync import SyncStager
from .._errors import StagerClosedError, UnstageableError
from .._options import StagingOptions
from .._paths import Path
from ._pool import SnapshotPool

_DCP_VALUES = (torch.Tensor, int, float, str, bytes, io.BytesIO, type(None))


def check_types(value: Any, path: Path = ()) -> None:
    """DCP's ``type_check``: dicts, lists and tuples of tensors, numbers, strings and bytes.

    A check only, run before staging: the staging itself is astage's walk. Iterative, and each
    container is checked once: a cycle or a deep nest (which the stager keeps) recursed until
    a RecursionError.
    """
    seen: set[int] = set()
    stack: list[tuple[Any, Path]] = [(value, path)]
    while stack:
        value, path = stack.pop()
        if isinstance(value, _DCP_VALUES):
            continue
        if isinstance(value, (dict, list, tuple)):
            if id(value) in seen:
                continue  # a cycle, or a container reached twice: checked already
            seen.add(id(value))
            pairs = value.items() if isinstance(value, dict) else enumerate(value)
            # reversed: the stack pops the first item first, so the first bad value is named
            stack.extend(reversed([(item, (*path, key)) for key, item in pairs]))
            continue
        cls = type(value)
        raise UnstageableError(
            f"type_check: DCP saves tensors, int, float, str, bytes, BytesIO and None in dicts, "
            f"lists and tuples, not a {cls.__module__}.{cls.__qualname__}",
            path,
        )


class BlockingAsyncStager(AsyncStager):
    """Drop-in for ``torch.distributed.checkpoint.staging.BlockingAsyncStager``.

    ``stage()`` blocks until the copy is complete and returns it. Without
    ``cache_staged_state_dict`` every call returns fresh host memory that the stager does not
    keep. With it, the buffers are cached across calls (pinned when CUDA is available; DCP's
    asks for pinned memory unconditionally and so fails on a CPU-only machine), and a snapshot
    still read by an upload is never overwritten by the next call (see
    :mod:`astage.compat._pool`). ``type_check`` refuses values DCP cannot save, with an
    :class:`astage.UnstageableError` naming their path.
    """

    _synchronize_after_execute: bool = False

    def __init__(self, cache_staged_state_dict: bool = False, type_check: bool = False) -> None:
        self.cache_staged_state_dict = bool(cache_staged_state_dict)
        self.type_check = bool(type_check)
        self._pool: SnapshotPool | None = None
        self._stager: SyncStager | None = None
        self._closed = False
        if self.cache_staged_state_dict:
            self._pool = SnapshotPool(StagingOptions(), type(self).__name__)
        else:
            self._stager = SyncStager(pin_memory=False)

    def stage(self, state_dict: Any) -> Any:
        """A copy of ``state_dict`` on the CPU; complete when it returns."""
        if self._closed:
            raise StagerClosedError(f"this {type(self).__name__} is closed")
        if self.type_check:
            check_types(state_dict)
        if self._pool is not None:
            return self._pool.stage(state_dict)
        assert self._stager is not None
        staged = self._stager.stage(state_dict)
        self._stager.clear_cache()  # nothing cached: the result owns its memory alone
        return staged

    def cache_info(self) -> CacheInfo:
        """Host memory held in cached buffers (none without ``cache_staged_state_dict``)."""
        if self._pool is not None:
            return self._pool.cache_info()
        assert self._stager is not None
        return self._stager.cache_info()

    def synchronize_staging(self) -> None:
        """A no-op: staging is complete when ``stage()`` returns."""

    def close(self) -> None:
        """Release the cached buffers; results handed out stay valid."""
        self._closed = True
        if self._pool is not None:
            self._pool.close()
        if self._stager is not None:
            self._stager.close()
