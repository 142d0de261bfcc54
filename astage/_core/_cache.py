"""The host buffer cache: one reusable CPU buffer per source storage.

Entries are keyed weakly by the source ``UntypedStorage`` (torch keeps one Python object per
live storage, so ``id()`` plus a weak reference identifies it): when training frees a storage,
its buffer is dropped. Staging the same state dict again finds the same buffers, so a cached call
allocates nothing and copies straight into them.

The cache decides which buffers *want* pinning (the policy); the device layer pins them, in a
worker thread just before the first copy, and hangs a :class:`Registration` on the buffer. All
the cache knows of it is when a registration may be let go: once the buffer has been dropped
(evicted, cleared, or garbage collected) *and* no copy into it is still in flight. A buffer that
may be pinned counts its copies in flight (:meth:`HostBuffer.copy_started`,
:meth:`HostBuffer.copy_finished`, called by the device layer), because unregistering memory that
a device is still writing into is undefined behaviour. Letting go only hands the registration
back to the device layer, which undoes it later, in one of astage's own threads.

No lock, no thread: eviction runs in a weak-reference callback, in whatever thread drops the
last reference to a source storage, and so may interleave with a call in another thread at any
bytecode. Every shared structure is therefore changed only by single dict operations that
CPython performs atomically under the GIL (``get``, ``d[k] = v``, ``pop``, ``setdefault``,
``popitem``, ``list(d.values())``); each use below says why the interleavings it allows are
harmless.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Callable
from itertools import repeat
from operator import add, attrgetter, gt
from typing import Any, NamedTuple, Protocol

import torch

from .._errors import BufferMismatchError
from .._paths import Path
from .._torch import (
    new_shared_storage,
    storage_keys,
    storage_use_count,
    storage_use_counts,
)
from ._arena import (
    HUGE_PAGE,
    PAGE_ALIGNED_MIN_BYTES,
    host_empty,
    huge_empty,
    huge_pages_available,
    huge_pages_help,
    page_empty,
    sole_tensor,
)

_CPU = torch.device("cpu")


class CacheInfo(NamedTuple):
    """How much host memory a stager holds in its buffer cache."""

    storages: int
    """Host buffers held, one per live source storage."""
    nbytes: int
    """Bytes in those buffers."""
    pinned_nbytes: int
    """Bytes of them registered with CUDA as page-locked memory."""


Shape = torch.Size | tuple[int, ...]


class Registration(Protocol):
    """What the device layer attached to a buffer (a CUDA pin); undone when the buffer goes."""

    @property
    def active(self) -> bool:
        """Whether the memory is still registered (not yet undone)."""

    def release(self) -> None:
        """Have the registration undone; the buffer's memory stays valid.

        Called from any thread (a training thread dropping a source, a finalizer), possibly
        more than once, only when no copy into the buffer is in flight. It must neither block
        nor call the device runtime: it may only queue the work for the device layer.
        """


class HostBuffer(weakref.ref):  # type: ignore[type-arg]
    """The CPU buffer that receives one source storage's bytes; also the cache entry for it.

    A buffer *is* the weak reference to its source storage (a ``weakref.ref`` subclass), so a
    cache entry costs one object: a first call over tens of thousands of tensors allocates
    fewer long-lived objects, and the garbage collector has less to traverse.
    """

    __slots__ = (
        "copies",
        "device",
        "dropped",
        "key",
        "nbytes",
        "registration",
        "serial",
        "view",
        "view_dtype",
        "view_shape",
        "view_strides",
        "wants_pin",
        "whole",
    )
    copies: list[None] | None
    """Copies in flight into the buffer, one item each; None for a buffer never pinned (it has
    nothing to undo, so nothing to count). A list because ``append`` and ``pop`` are atomic
    under the GIL, where ``+= 1`` is a read and a write that another thread can split."""
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
    view_strides: tuple[int, ...] | None
    """``view``'s strides where its shape has a size-1 dimension, which ``is_contiguous()``
    leaves free (a tensor of that shape with other strides is contiguous too); None where the
    shape pins them (no view, or no such dimension)."""
    wants_pin: bool
    """Policy: the device layer should pin this buffer before copying into it."""
    registration: Registration | None
    """Set by the device layer once the buffer is pinned."""
    serial: int
    """The cache's allocation count when this buffer was allocated: ``reserve()`` touches only
    the buffers its own walk allocated (at or after the count it read first), never one that
    may hold staged bytes. A buffer an earlier reserve left :attr:`BufferCache.untouched`
    is numbered anew by the next one, as if its walk had allocated it."""
    dropped: bool
    """The cache has let go of the buffer: the device layer must not register it any more."""
    whole: torch.Tensor
    """A contiguous CPU tensor spanning exactly the buffer."""

    @property
    def pinned(self) -> bool:
        registration = self.registration
        return registration is not None and registration.active

    @property
    def storage(self) -> torch.UntypedStorage:
        return self.whole.untyped_storage()

    def as_bytes(self) -> torch.Tensor:
        """The buffer as a flat ``uint8`` tensor."""
        if self.whole.dtype is torch.uint8 and self.whole.dim() == 1:
            return self.whole
        return torch.empty((0,), dtype=torch.uint8, device="cpu").set_(self.storage)

    def copy_started(self) -> None:
        """Count a copy into the buffer as in flight: its registration is kept until it lands.

        Called by the device layer before it enqueues the copy; :meth:`copy_finished` once the
        copy has completed (for a device copy: once its completion event has), exactly once.
        """
        copies = self.copies
        if copies is not None:
            copies.append(None)

    def copy_finished(self) -> None:
        """A copy counted by :meth:`copy_started` has completed; the last one lets go of a
        registration that :meth:`release` had to leave in place."""
        copies = self.copies
        if copies is None:
            return
        copies.pop()
        # The write (pop) comes before the read (dropped); release() writes dropped before it
        # reads the count. Whichever of the two reads second sees the other's write, so the
        # registration is let go at least once (maybe twice, which release() allows).
        if self.dropped and not copies:
            self._let_go()

    def release(self) -> None:
        """Mark the buffer dropped; let go of its registration unless copies are in flight.

        The memory stays valid (staged tensors may use it). Races with the device layer
        registering it in a worker thread are settled by the order of the writes: ``dropped``
        is set before ``registration`` is read here, and the device layer sets
        ``registration`` before it reads ``dropped`` again. Whichever reads second sees the
        other's write and lets go, so a registration set meanwhile is never left behind.
        """
        self.dropped = True
        if not self.copies:
            self._let_go()

    def _let_go(self) -> None:
        # The registration stays on the buffer (``pinned`` asks it whether it is still active):
        # a copy that lands later must find it to let go again.
        registration = self.registration
        if registration is not None:
            registration.release()

    def __del__(self) -> None:
        # A buffer dropped without release() (a stager never closed, a cache collected with
        # its entries) must not stay registered. A copy still counted here was never reported
        # landed (its driver gave up waiting): the registration is then kept, as unregistering
        # under a copy would be unsafe, and leaks rather than corrupts.
        if not getattr(self, "dropped", True):
            self.release()


class BufferCache:
    """Host buffers keyed weakly by source storage; allocation policy from the options."""

    def __init__(
        self,
        *,
        pin_memory: bool,
        share_memory: bool,
        pin_memory_min_bytes: int,
        huge_pages: bool | None = False,
        record: bool = True,
    ) -> None:
        self._pin_memory = pin_memory
        self._share_memory = share_memory
        self._huge_pages = huge_pages
        """Large buffers on huge pages: True, False, or None (probed at the first one)."""
        self._pin_min = pin_memory_min_bytes
        self.entries: dict[int, HostBuffer] = {}
        """Buffers by ``id()`` of their source storage; check ``buffer() is source`` on lookup."""
        self._evict = _evicter(weakref.ref(self))
        self._free_use_count: int | None = None  # see in_use()
        self.allocations = 0
        """Buffers allocated so far (the next buffer's ``serial``). Only calls allocate, and
        calls run one at a time, so a plain ``+= 1`` is safe here."""
        self.reserving = False
        """A ``reserve()`` walk is allocating: its new buffers go into :attr:`untouched`."""
        self.untouched: dict[int, HostBuffer] = {}
        """Buffers a ``reserve()`` allocated that neither it nor a call has written yet, by
        ``id()``: a reserve cut short (cancelled, or its progress callback raised) leaves
        some, which the next reserve touches rather than count as ready. Nobody reads them,
        so writing zeros there is safe; a buffer a call staged into is never touched again."""
        # The structures recent full walks recorded, newest first (``_recording.Recording``; typed
        # Any because the replay module builds on this one). Replaced whole, never changed in
        # place: an eviction in another thread reads a consistent tuple.
        self.replays: tuple[Any, ...] = ()
        self.record_backoff = 0
        """Full walks left that skip recording (a structure that could not be recorded)."""
        self.record = record
        """Whether full walks record the structure at all (``StagingOptions.replay``)."""

    def get(self, source: torch.UntypedStorage) -> HostBuffer | None:
        """The cached buffer for ``source``, unchecked; None if there is none."""
        # One atomic dict read. An entry whose source died (its id now reused by ``source``)
        # but whose eviction has not run yet fails the identity check.
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
        if like is None:
            whole = self._empty((nbytes,), torch.uint8, nbytes)
        elif nbytes < PAGE_ALIGNED_MIN_BYTES and not self._share_memory:
            # Most buffers of a first call: on memory a caller cannot resize (see _arena).
            whole = host_empty(like.shape, like.dtype)
        else:
            whole = self._empty(like.shape, like.dtype, nbytes)
        device = source.device
        if device.type == "cpu":  # one object for all: a set of devices then hashes it once
            device = _CPU
        buffer = HostBuffer(source, self._evict)
        buffer.key = key = id(source)
        buffer.nbytes = nbytes
        buffer.device = device
        buffer.whole = whole
        buffer.view = whole if like is not None else None
        buffer.view_dtype = whole.dtype if like is not None else None
        view_shape = buffer.view_shape = whole.shape if like is not None else None
        buffer.view_strides = whole.stride() if view_shape and 1 in view_shape else None
        # Pinning speeds up device-to-host copies only: a CPU source gains nothing from it and
        # would pay ~0.1 s per GB to register.
        buffer.wants_pin = (
            self._pin_memory and nbytes > 0 and nbytes >= self._pin_min and device.type != "cpu"
        )
        buffer.copies = [] if buffer.wants_pin else None
        buffer.registration = None
        buffer.dropped = False
        buffer.serial = self.allocations
        self.allocations += 1
        if self.reserving:
            self.untouched[id(buffer)] = buffer
        # The buffer is complete before it is published: a reader in another thread (info(),
        # in_use()) never sees a half-built entry. An entry already under this key belongs to
        # a dead source whose eviction has not run; if that eviction runs between these two
        # statements, it pops our new entry, sees it is not its own and puts it back (_remove).
        entries = self.entries
        old = entries.get(key)
        entries[key] = buffer
        if old is not None and old is not buffer:
            old.release()  # the eviction may release it too: release() is idempotent
        return buffer

    def _empty(
        self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype, nbytes: int
    ) -> torch.Tensor:
        if not self._share_memory:
            if nbytes >= HUGE_PAGE and self._wants_huge_pages():
                return sole_tensor(huge_empty(nbytes).untyped_storage(), shape, dtype)
            if nbytes >= PAGE_ALIGNED_MIN_BYTES:
                return sole_tensor(page_empty(nbytes).untyped_storage(), shape, dtype)
            # No Python storage object is created: one tensor is the whole cost of a buffer.
            return host_empty(shape, dtype)
        return sole_tensor(new_shared_storage(nbytes), shape, dtype)

    def _wants_huge_pages(self) -> bool:
        huge = self._huge_pages
        if huge is None:  # decided once per process; the answer is kept for this cache
            huge = self._huge_pages = huge_pages_help()
        return huge and huge_pages_available()

    @property
    def huge_pages_undecided(self) -> bool:
        """Whether the first large buffer would run the huge-page probe (``huge_pages=None``)."""
        return self._huge_pages is None

    def decide_huge_pages(self) -> None:
        """Run the huge-page probe now, if it is to run at all (blocking, 10-150 ms once per
        process): the async face calls this in a worker thread before a walk, which would
        otherwise run it on the event loop at the first large buffer."""
        if self._huge_pages is None:
            self._huge_pages = huge_pages_help()

    def _remove(self, buffer: HostBuffer) -> None:
        """Evict ``buffer`` (its source died); runs in whatever thread dropped the source."""
        key = buffer.key
        entries = self.entries  # clear() may swap the dict meanwhile: then it drains this one
        # No atomic "delete if the value is this buffer" exists: pop whatever is there (one
        # atomic step), and if it was a newer buffer that allocate() put under the reused id,
        # put that back. setdefault does not overwrite an entry allocated in between.
        current = entries.pop(key, None)
        if current is not None and current is not buffer:
            entries.setdefault(key, current)
        for recording in self.replays:  # a recording holds no buffer the cache let go of
            recording.forget(buffer)
        self.untouched.pop(id(buffer), None)
        buffer.release()

    def _buffers(self) -> list[HostBuffer]:
        """A snapshot of the entries, safe against evictions that run meanwhile.

        ``list(d.values())`` copies in one C call under the GIL, so an eviction in another thread
        cannot interleave; one in this thread (a collection set off by an allocation) can only
        run before or after the copy. Should that ever change, the copy sees the dict change
        size and raises RuntimeError: then it is taken again.
        """
        while True:
            try:
                return list(self.entries.values())
            except RuntimeError:  # pragma: no cover - see the docstring
                continue

    def in_use(self) -> bool:
        """Whether a tensor outside the cache still uses one of its buffers.

        Staged results are views on the buffers, so this is true while any snapshot that this
        cache produced is alive (or a copy into it is still in flight): overwriting the buffers
        now would change data that someone may still read. It compares each buffer's storage
        reference count with that of a buffer nobody else holds, so it sees every holder,
        including tensors derived from a staged one (``detach()``, views, ``numpy()``).
        The staged tensors the recordings keep for the next replay (``Recording.twins``) are
        the cache's own, not a holder's: each that nobody else holds is one use more that a
        free buffer has, and stays kept, so the next call hands it out again.
        """
        for recording in self.replays:  # before the counts: they must not see these
            recording.let_go_of_uncounted()
        buffers = self._buffers()
        if not buffers:
            return False
        if self._free_use_count is None:  # two threads may both compute it: the same value
            # A buffer held by its ``whole`` tensor alone, counted while that tensor lives.
            free_buffer = self._empty((1,), torch.uint8, 1)
            self._free_use_count = storage_use_count(free_buffer.untyped_storage())
        free = self._free_use_count
        storages = list(map(_untyped_storage, map(_whole, buffers)))
        counts = list(storage_use_counts(storages))
        if max(counts) <= free:
            return False
        # Counted after the buffers: a kept tensor let go of meanwhile (an eviction in another
        # thread) then lowers only what is discounted, and the answer errs towards in use.
        own: list[int] = []  # a storage key per kept tensor nobody else holds
        for recording in self.replays:
            recording.count_own_uses(own)
        if not own:
            return True
        if min(counts) >= free:
            # Each buffer's count is at least ``free`` plus its own kept tensors (each is a
            # live tensor on that storage), so some buffer has another user exactly when the
            # counts over ``free`` add up to more than the kept tensors on the buffers: one
            # sum rather than a look-up per buffer (~20 ms less over 50,000).
            keys = set(storage_keys(storages))
            return sum(counts) - free * len(counts) > sum(map(keys.__contains__, own))
        per_storage = Counter(own)
        kept = map(per_storage.__getitem__, storage_keys(storages))
        return any(map(gt, counts, map(add, repeat(free), kept)))

    def written(self, buffers: list[HostBuffer]) -> None:
        """``buffers`` were staged into (or may have been): never :attr:`untouched` again.

        A call reports every buffer of its plan, copied or not: erring that way only leaves
        a buffer for the first call to fill, where the other way a later reserve() could
        write zeros over a result someone reads.
        """
        untouched = self.untouched
        if untouched:  # empty but after a reserve cut short: no work per buffer otherwise
            for buffer in buffers:
                untouched.pop(id(buffer), None)

    def unwritten(self, buffers: list[HostBuffer], since: int) -> None:
        """A call ended before it copied into ``buffers``: those it allocated itself (serials
        from ``since``) are fresh memory still, as a ``reserve()`` cut short leaves them
        (:attr:`untouched`), and the next call must not copy into them on the loop's thread
        (the async face's loop lane), which would wait for their page faults.

        Only for buffers nothing was handed out from: a call hands out no tensor whose
        copies have not all landed, and a result it never returned holds none.
        """
        untouched = self.untouched
        for buffer in buffers:
            if buffer.serial >= since:
                untouched[id(buffer)] = buffer

    def info(self) -> CacheInfo:
        buffers = self._buffers()
        return CacheInfo(
            storages=len(buffers),
            nbytes=sum(b.nbytes for b in buffers),
            pinned_nbytes=sum(b.nbytes for b in buffers if b.pinned),
        )

    def clear(self) -> None:
        """Drop every buffer (letting go of its registration once no copy into it is in flight);
        staged tensors handed out stay valid."""
        # Swap in an empty dict, then drain the old one with popitem (atomic): an eviction that
        # still reaches the old dict pops its own entry or finds it gone, never a half-iterated
        # dict; a buffer released twice (here and by its eviction) is fine.
        entries, self.entries = self.entries, {}
        self.replays = ()
        self.untouched = {}
        while True:
            try:
                _, buffer = entries.popitem()
            except KeyError:
                return
            buffer.release()


_whole = attrgetter("whole")
_untyped_storage = torch.Tensor.untyped_storage


def _evicter(cache_ref: weakref.ref[BufferCache]) -> Callable[[HostBuffer], None]:
    """The callback run when a source storage dies; holds the cache only weakly."""

    def evict(buffer: HostBuffer) -> None:
        cache = cache_ref()
        if cache is not None:
            cache._remove(buffer)

    return evict
