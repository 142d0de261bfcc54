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

from . import _pinning
from ._errors import BufferMismatchError
from ._paths import Path


class CacheInfo(NamedTuple):
    """How much host memory a stager holds in its buffer cache."""

    storages: int
    """Host buffers held, one per live source storage."""
    nbytes: int
    """Bytes in those buffers."""
    pinned_nbytes: int
    """Bytes of them registered with CUDA as page-locked memory."""


_pin_lock = threading.Lock()  # pinning is rare and slow; one lock for all buffers is plenty


class HostBuffer:
    """A CPU storage that receives the bytes of one source storage, pinned on demand."""

    __slots__ = ("_pinned_ptr", "device", "nbytes", "storage", "view", "wants_pin")

    def __init__(
        self, storage: torch.UntypedStorage, device: torch.device, wants_pin: bool
    ) -> None:
        self._pinned_ptr = 0
        self.storage = storage
        self.nbytes = storage.nbytes()
        self.device = device
        """Device of the source storage."""
        self.view: torch.Tensor | None = None
        """The staged tensor that spans the whole buffer, kept so cached calls can reuse it."""
        self.wants_pin = wants_pin

    @property
    def pinned(self) -> bool:
        return self._pinned_ptr != 0

    def ensure_pinned(self) -> None:
        """Register the buffer with CUDA if it asked for it and is not yet; safe from any thread."""
        if not self.wants_pin or self._pinned_ptr:
            return
        with _pin_lock:
            if not self._pinned_ptr:
                ptr = self.storage.data_ptr()
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
        if self._pinned_ptr:
            _pinning.unregister(self._pinned_ptr)


class _SourceRef(weakref.ref):  # type: ignore[type-arg]
    """A cache entry: the weak reference to a source storage, carrying that storage's buffer.

    One object per entry (rather than a weakref plus a record) keeps a first call's allocations,
    and so the garbage collector's work, down.
    """

    __slots__ = ("buffer", "key")
    buffer: HostBuffer
    key: int


class BufferCache:
    """Host buffers keyed weakly by source storage; allocation policy from the options."""

    def __init__(self, *, pin_memory: bool, share_memory: bool, pin_memory_min_bytes: int) -> None:
        self._pin_memory = pin_memory
        self._share_memory = share_memory
        self._pin_min = pin_memory_min_bytes
        self._entries: dict[int, _SourceRef] = {}
        self._lock = threading.Lock()
        self._evict = _evicter(weakref.ref(self))

    def get(self, source: torch.UntypedStorage) -> HostBuffer | None:
        """The cached buffer for ``source``, unchecked; None if there is none."""
        entry = self._entries.get(id(source))
        if entry is None or entry() is not source:
            return None
        return entry.buffer

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

    def allocate(self, source: torch.UntypedStorage) -> HostBuffer:
        """A new host buffer for ``source``, cached until ``source`` dies or the cache closes."""
        nbytes = source.nbytes()
        if self._share_memory:
            storage = torch.UntypedStorage._new_shared(nbytes)
        else:
            storage = torch.UntypedStorage(nbytes)
        wants_pin = self._pin_memory and nbytes > 0 and nbytes >= self._pin_min
        buffer = HostBuffer(storage, source.device, wants_pin)
        entry = _SourceRef(source, self._evict)
        entry.key = key = id(source)
        entry.buffer = buffer
        with self._lock:
            old = self._entries.get(key)
            self._entries[key] = entry
        if old is not None:  # a dead source whose callback has not run yet
            old.buffer.release()
        return buffer

    def _remove(self, entry: _SourceRef) -> None:
        with self._lock:
            if self._entries.get(entry.key) is not entry:
                return  # already replaced or cleared
            del self._entries[entry.key]
        entry.buffer.release()

    def info(self) -> CacheInfo:
        with self._lock:
            buffers = [entry.buffer for entry in self._entries.values()]
        return CacheInfo(
            storages=len(buffers),
            nbytes=sum(b.nbytes for b in buffers),
            pinned_nbytes=sum(b.nbytes for b in buffers if b.pinned),
        )

    def clear(self) -> None:
        """Drop every buffer (unpinning it); staged tensors handed out stay valid."""
        with self._lock:
            entries, self._entries = self._entries, {}
        for entry in entries.values():
            entry.buffer.release()


def _evicter(cache_ref: weakref.ref[BufferCache]) -> Callable[[_SourceRef], None]:
    """The callback run when a source storage dies; holds the cache only weakly."""

    def evict(entry: _SourceRef) -> None:
        cache = cache_ref()
        if cache is not None:
            cache._remove(entry)

    return evict
