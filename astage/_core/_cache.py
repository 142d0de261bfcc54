"""The host buffer cache: one reusable CPU buffer per source storage.

Entries are keyed weakly by the source ``UntypedStorage`` (torch keeps one Python object per
live storage, so ``id()`` plus a weak reference identifies it): when training frees a storage,
its buffer is released, and unpinned first if it was pinned. Staging the same state dict again
finds the same buffers, so a cached call allocates nothing and copies straight into them.

Pinning is not done here but by the copy engine, in a worker thread, just before the first copy
into a buffer: ``cudaHostRegister`` costs about 0.1 s per GB and must not run on the event loop.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import NamedTuple

import torch

from .._devices import _pinning
from .._errors import BufferMismatchError
from .._paths import Path


class CacheInfo(NamedTuple):
    """How much host memory a stager holds in its buffer cache."""

    storages: int
    """Host buffers held, one per live source storage."""
    nbytes: int
    """Bytes in those buffers."""
    pinned_nbytes: int
    """Bytes of them registered with CUDA as page-locked memory."""


Shape = torch.Size | tuple[int, ...]

_pin_lock = threading.Lock()  # pinning is rare and slow; one lock for all buffers is plenty


class HostBuffer(weakref.ref):  # type: ignore[type-arg]
    """The CPU buffer that receives one source storage's bytes; also the cache entry for it.

    A buffer *is* the weak reference to its source storage (a ``weakref.ref`` subclass), so a
    cache entry costs one object: a first call over tens of thousands of tensors allocates
    fewer long-lived objects, and the garbage collector has less to traverse.
    """

    __slots__ = (
        "_pinned_ptr",
        "device",
        "key",
        "nbytes",
        "view",
        "view_dtype",
        "view_shape",
        "wants_pin",
        "whole",
    )
    device: torch.device
    """Device of the source storage."""
    key: int
    """``id()`` of the source storage while it lives."""
    nbytes: int
    view: torch.Tensor | None
    """The staged tensor spanning the whole buffer, reused by cached calls; None for buffers
    first staged through a partial view."""
    view_dtype: torch.dtype | None
    view_shape: torch.Size | None
    """``view``'s dtype and shape, kept here so the hot path need not touch ``view``."""
    wants_pin: bool
    whole: torch.Tensor
    """A contiguous CPU tensor spanning exactly the buffer."""
    _pinned_ptr: int

    @property
    def pinned(self) -> bool:
        return self._pinned_ptr != 0

    @property
    def storage(self) -> torch.UntypedStorage:
        return self.whole.untyped_storage()

    def as_bytes(self) -> torch.Tensor:
        """The buffer as a flat ``uint8`` tensor."""
        if self.whole.dtype is torch.uint8 and self.whole.dim() == 1:
            return self.whole
        return torch.empty((0,), dtype=torch.uint8).set_(self.storage)

    def ensure_pinned(self) -> None:
        """Register the buffer with CUDA if it asked for it and is not yet; safe from any thread."""
        if not self.wants_pin or self._pinned_ptr:
            return
        with _pin_lock:
            if not self._pinned_ptr:
                ptr = self.whole.data_ptr()
                _pinning.register(ptr, self.nbytes)
                self._pinned_ptr = ptr

    def release(self) -> None:
        """Unregister the buffer; its memory stays valid for staged tensors that still use it."""
        with _pin_lock:
            ptr, self._pinned_ptr = self._pinned_ptr, 0
        if ptr:
            _pinning.unregister(ptr)

    def __del__(self) -> None:
        # A buffer dropped without release() (a stager never closed) must not stay registered.
        if getattr(self, "_pinned_ptr", 0):
            _pinning.unregister(self._pinned_ptr)


class BufferCache:
    """Host buffers keyed weakly by source storage; allocation policy from the options."""

    def __init__(self, *, pin_memory: bool, share_memory: bool, pin_memory_min_bytes: int) -> None:
        self._pin_memory = pin_memory
        self._share_memory = share_memory
        self._pin_min = pin_memory_min_bytes
        self.entries: dict[int, HostBuffer] = {}
        """Buffers by ``id()`` of their source storage; check ``buffer() is source`` on lookup."""
        self._lock = threading.Lock()
        self._evict = _evicter(weakref.ref(self))
        self._free_use_count: int | None = None  # see in_use()

    def get(self, source: torch.UntypedStorage) -> HostBuffer | None:
        """The cached buffer for ``source``, unchecked; None if there is none."""
        buffer = self.entries.get(id(source))
        if buffer is None or buffer() is not source:
            return None
        return buffer

    def lookup(self, source: torch.UntypedStorage, path: Path) -> HostBuffer | None:
        """The cached buffer for ``source``, or None; a buffer of the wrong size is an error."""
        buffer = self.get(source)
        if buffer is not None and buffer.nbytes != source.nbytes():
            raise BufferMismatchError(
                f"the source storage now holds {source.nbytes()} bytes but its cached host buffer "
                f"holds {buffer.nbytes}; a storage was resized in place since the last stage() "
                "(call clear_cache() after resizing storages)",
                path,
            )
        return buffer

    def allocate(
        self, source: torch.UntypedStorage, like: torch.Tensor | None = None
    ) -> HostBuffer:
        """A new host buffer for ``source``, cached until ``source`` dies or the cache closes.

        ``like``, when given, is a contiguous tensor spanning all of ``source``: the buffer is
        then allocated as its staged twin, which becomes the buffer's reusable ``view``.
        """
        nbytes = source.nbytes()
        if like is not None:
            whole = self._empty(like.shape, like.dtype, nbytes)
        else:
            whole = self._empty((nbytes,), torch.uint8, nbytes)
        buffer = HostBuffer(source, self._evict)
        buffer.key = key = id(source)
        buffer.nbytes = nbytes
        buffer.device = source.device
        buffer.whole = whole
        buffer.view = whole if like is not None else None
        buffer.view_dtype = whole.dtype if like is not None else None
        buffer.view_shape = whole.shape if like is not None else None
        buffer.wants_pin = self._pin_memory and nbytes > 0 and nbytes >= self._pin_min
        buffer._pinned_ptr = 0
        with self._lock:
            old = self.entries.get(key)
            self.entries[key] = buffer
        if old is not None:  # a dead source whose callback has not run yet
            old.release()
        return buffer

    def _empty(
        self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype, nbytes: int
    ) -> torch.Tensor:
        if not self._share_memory:
            # No Python storage object is created: one tensor is the whole cost of a buffer.
            return torch.empty(shape, dtype=dtype)
        storage = torch.UntypedStorage._new_shared(nbytes)
        return torch.empty((0,), dtype=dtype).set_(storage, 0, shape, _contiguous_strides(shape))

    def _remove(self, buffer: HostBuffer) -> None:
        with self._lock:
            if self.entries.get(buffer.key) is not buffer:
                return  # already replaced or cleared
            del self.entries[buffer.key]
        buffer.release()

    def in_use(self) -> bool:
        """Whether a tensor outside the cache still uses one of its buffers.

        Staged results are views on the buffers, so this is true while any snapshot that this
        cache produced is alive (or a copy into it is still in flight): overwriting the buffers
        now would change data that someone may still read. It compares each buffer's storage
        reference count with that of a buffer nobody else holds, so it sees every holder,
        including tensors derived from a staged one (``detach()``, views, ``numpy()``).
        """
        with self._lock:
            buffers = list(self.entries.values())
        if not buffers:
            return False
        if self._free_use_count is None:
            self._free_use_count = _use_count(self._empty((1,), torch.uint8, 1))
        free = self._free_use_count
        count = torch._C._storage_Use_Count  # see _use_count(); inlined, this runs per buffer
        return any(count(buffer.whole.untyped_storage()._cdata) > free for buffer in buffers)

    def info(self) -> CacheInfo:
        with self._lock:
            buffers = list(self.entries.values())
        return CacheInfo(
            storages=len(buffers),
            nbytes=sum(b.nbytes for b in buffers),
            pinned_nbytes=sum(b.nbytes for b in buffers if b.pinned),
        )

    def clear(self) -> None:
        """Drop every buffer (unpinning it); staged tensors handed out stay valid."""
        with self._lock:
            entries, self.entries = self.entries, {}
        for buffer in entries.values():
            buffer.release()


def _evicter(cache_ref: weakref.ref[BufferCache]) -> Callable[[HostBuffer], None]:
    """The callback run when a source storage dies; holds the cache only weakly."""

    def evict(buffer: HostBuffer) -> None:
        cache = cache_ref()
        if cache is not None:
            cache._remove(buffer)

    return evict


def _use_count(tensor: torch.Tensor) -> int:
    """References to ``tensor``'s storage held by tensors and storage objects (C++ side)."""
    return int(torch._C._storage_Use_Count(tensor.untyped_storage()._cdata))


def _contiguous_strides(shape: Shape) -> tuple[int, ...]:
    strides = []
    step = 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))
