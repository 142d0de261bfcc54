"""Many small tensors on a device: gathered there, sent to the host in one copy, scattered.

Copying a small tensor from a device costs a launch (about 8 us of host time for
``copy_(non_blocking=True)`` on CUDA) whatever its size: 50,000 tensors of 256 bytes cost some
400 ms of launches for 12 MB of data. A batch of many small copies (:func:`should_gather`) is
therefore staged in three steps instead of one launch per tensor:

1. **Gather, on the device**, on the staging stream: one multi-tensor copy of every source's
   bytes into a device scratch buffer, each at its offset of a :class:`GatherPlan`.
2. **One transfer**: the scratch, device to host, into a host *slab* (page-locked when the
   backend pins) taken from a :class:`SlabPool`.
3. **Scatter, on the host**, once the device has completed both: one multi-tensor copy of the
   slab's pieces into each copy's own destination buffer, in astage's worker thread.

The kernel path is ``torch._foreach_copy_`` (through :func:`astage._torch.foreach_copy_`) of the
sources' flat byte views into aligned views of the scratch, rather than ``torch.cat``: it writes
into a buffer whose layout astage chose (the same :class:`GatherPlan` splits the scratch, the
slab and nothing else), so each piece starts on a :data:`SLAB_ALIGNMENT` boundary, where CUDA's
multi-tensor kernels take their vectorised path and the host scatter copies whole cache lines;
and the host scatter is the mirror call of the device gather. On CUDA, a list of same-dtype,
same-device, contiguous uint8 views takes the fused path (one kernel per few dozen tensors); an
accelerator without a fused kernel falls back to a ``copy_`` per tensor on the device, which is
no worse than not gathering but one transfer more. CUDA 12.8's ``cudaMemcpyBatchAsync`` would
need no scratch at all; torch does not expose it.

Lifetimes. The scratch and the slab must outlive the copies that use them: a
:class:`GatheredCopies` keeps both until its scatter has run, which is after the completion of
the batch (the device's event) was seen complete, so neither torch's caching allocator nor the
pool can hand them to other work while the device still reads or writes them. The scratch is
allocated on the staging stream (inside the backend's stream context), the only stream that
uses it. A slab goes back to its pool only after the scatter; a pool keeps a few free slabs,
grows them as batches need, and never holds one that is in use.

Kept layouts. A cached call gathers the same copies again: the same destination buffers, and
sources with the same metadata. The first gather of a batch keeps its layout
(:class:`GatherLayout`: a scratch and a slab of its own, and every copy's piece of each, viewed
with the copy's dtype and shape), keyed by the destination buffers; a later batch whose
destinations are those very tensors, and whose sources pass a metadata guard taken at the first
gather (exact type, dtype, shape, strides, the conj and neg bits: one C++ call), enqueues three
multi-tensor copies and makes no view. Typed copies are used only for the dtypes of
:data:`TYPED_COPY_DTYPES`, whose copy keeps every bit; other batches (``bool``, complex, float8,
sources that are not plain tensors or Parameters) keep the byte views. A layout serves one
batch at a time; layouts stay within :data:`LAYOUT_MAX_BYTES` per device, least recently used
first, and go with ``clear_cache()``.

The completion. A gathered batch is complete only once its bytes are in their own buffers, after
the scatter: :class:`GatheredCompletion` wraps the device's completion, its ``query()`` stays
False until the scatter has run (so that no driver takes an event-loop fast path past it), and
its ``synchronize()`` (what the drivers call in a worker thread) waits for the device, then
scatters, once. The drivers need no change: they already poll, then wait in a worker thread.

Ran on an H200 (docs/benchmarks-gpu.md): 10,002 small tensors staged in 23-24 us a tensor on
a cached call before layouts were kept (most of it the per-tensor views made for every batch),
5.4-7.2 us after (blocking face; DCP: 41-49 us; the gather, transfer and scatter alone, with no
stager: 1.8-2.5 us). Every step is plain torch, and the tests run it all on CPU tensors.
"""

from __future__ import annotations

import operator
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import torch

from .._core._batches import Batch
from .._torch import foreach_copy_, metadata_guard

if TYPE_CHECKING:  # _backend imports this module (to leave gathered batches unpinned)
    from ._backend import Completion

GATHER_MIN_COPIES = 8
"""Fewer copies than this are launched one by one: the gather's extra transfer would not pay."""
GATHER_MAX_COPY_BYTES = 64 * 1024
"""A copy of this many bytes or more is launched on its own (the issue's estimate: the gather
wins below about 64 KB per tensor, where a launch costs more than moving the bytes twice)."""
SLAB_ALIGNMENT = 64
"""Every piece of a scratch or slab starts at a multiple of this many bytes (a cache line; also
what CUDA's vectorised multi-tensor path needs, 16 bytes, several times over)."""
MIN_SLAB_BYTES = 64 * 1024
"""The smallest slab a pool allocates; slabs grow by powers of two from there."""


def should_gather(batch: Batch) -> bool:
    """Whether ``batch``, about to be enqueued on a device, should be gathered.

    True for at least :data:`GATHER_MIN_COPIES` copies, each of fewer than
    :data:`GATHER_MAX_COPY_BYTES` bytes, whose sources and destinations are contiguous (a
    plan's copies always are: they cover whole storages; a slice of a large copy is alone in
    its batch, and so never gathered). A batch cut from a plan knows its largest copy
    (``Batch.largest``), and that decides; any other batch's tensors are read, each of them.
    The answer is kept on the batch (``Batch.gathered``): the driver and the backend both ask.
    """
    known = batch.gathered
    if known is not None:
        return known
    srcs = batch.srcs
    limit = GATHER_MAX_COPY_BYTES
    if len(srcs) < GATHER_MIN_COPIES:
        batch.gathered = False
    elif batch.largest is not None:
        # Why not read the tensors: two is_contiguous() and an nbytes a copy were ~1 us a
        # tensor of a cached call over small device tensors (8 us a tensor in all, on an H200).
        batch.gathered = batch.largest < limit
    else:
        batch.gathered = all(
            src.nbytes < limit and src.is_contiguous() and dst.is_contiguous()
            for src, dst in zip(srcs, batch.dsts, strict=True)
        )
    return batch.gathered


def _align(offset: int) -> int:
    return -(-offset // SLAB_ALIGNMENT) * SLAB_ALIGNMENT


@dataclass(frozen=True, slots=True)
class GatherPlan:
    """Where each copy's bytes lie in a gathered buffer: aligned offsets, no overlap.

    ``offsets[i]`` is a multiple of :data:`SLAB_ALIGNMENT`; piece ``i`` is
    ``[offsets[i], offsets[i] + sizes[i])``; ``nbytes`` ends at the last piece (no padding
    after it: that much is transferred).
    """

    sizes: tuple[int, ...]
    offsets: tuple[int, ...]
    nbytes: int
    _pieces: tuple[int, ...] = field(repr=False)
    """Piece and padding lengths, interleaved, summing to ``nbytes``: what :meth:`split` cuts."""

    @classmethod
    def for_sizes(cls, sizes: Sequence[int]) -> GatherPlan:
        """The layout of pieces of ``sizes`` bytes, in order."""
        offsets: list[int] = []
        pieces: list[int] = []
        end = 0
        for size in sizes:
            start = _align(end)
            if offsets:
                pieces.append(start - end)  # the padding after the previous piece
            offsets.append(start)
            pieces.append(size)
            end = start + size
        return cls(tuple(sizes), tuple(offsets), end, tuple(pieces))

    def split(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``buffer`` (flat uint8, at least ``nbytes`` long), one per piece.

        One ``split_with_sizes`` call makes them all, rather than a Python slice per piece.
        """
        if not self.sizes:
            return []
        views = buffer[: self.nbytes].split_with_sizes(self._pieces)
        return list(views[::2])


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's memory as a flat ``uint8`` view (no copy; any dtype, bool too)."""
    if tensor.dtype is torch.uint8 and tensor.dim() == 1:
        return tensor
    return tensor.view(-1).view(torch.uint8)


# -- host slabs -----------------------------------------------------------------------------------


def pageable_slab(nbytes: int) -> torch.Tensor:
    """A slab of ordinary (pageable) host memory."""
    return torch.empty((nbytes,), dtype=torch.uint8, device="cpu")


def pinned_slab(nbytes: int) -> torch.Tensor:
    """A slab of page-locked host memory from torch's caching host allocator.

    Call it with the device selected, in astage's worker thread (like every pin). torch's
    allocator, not ``cudaHostRegister``: a slab is reused, never unpinned by astage (a dropped
    one goes back to torch's host cache, which also waits for copies it saw, so no thread that
    drops a slab ever calls the runtime), and its power-of-two rounding is the pool's growth.
    """
    return torch.empty((nbytes,), dtype=torch.uint8, device="cpu", pin_memory=True)


class SlabPool:
    """Reusable host slabs for one device's gathered transfers.

    :meth:`acquire` hands out a free slab large enough (or a new, larger one); :meth:`release`
    takes it back once nothing uses it any more. At most ``keep`` free slabs are kept, the
    largest: about as many as a device has gathered batches in flight at once, so that a cached
    call allocates none (a pinned slab dropped beyond that goes back to torch's host cache).
    Thread-safe: batches of one device are enqueued and finished from several threads.
    """

    def __init__(
        self, allocate: Callable[[int], torch.Tensor], *, keep: int = 8, layouts: bool = True
    ) -> None:
        self._allocate = allocate
        self._keep = keep
        # Slabs are found by position, never by value: `list.remove` compares tensors with `==`.
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()
        self.layouts = GatherLayouts(allocate) if layouts else None
        """The device's gathers kept for cached calls, with slabs of their own (None: every
        batch gathers through the pool's slabs)."""
        self.allocations = 0
        """Slabs allocated so far (for tests and diagnostics)."""

    def acquire(self, nbytes: int) -> torch.Tensor:
        """A slab of at least ``nbytes`` bytes that nothing else uses until :meth:`release`."""
        with self._lock:
            sizes = [slab.numel() for slab in self._free]
            fitting = [index for index, size in enumerate(sizes) if size >= nbytes]
            if fitting:
                return self._free.pop(min(fitting, key=sizes.__getitem__))
            # None fits: grow. The largest free slab is replaced, not kept beside the new one.
            if sizes:
                del self._free[max(range(len(sizes)), key=sizes.__getitem__)]
            self.allocations += 1
        capacity = max(MIN_SLAB_BYTES, 1 << max(nbytes - 1, 0).bit_length())
        return self._allocate(capacity)  # outside the lock: pinning may take milliseconds

    def release(self, slab: torch.Tensor) -> None:
        """Take ``slab`` back: no copy reads or writes it any more."""
        with self._lock:
            self._free.append(slab)
            if len(self._free) > self._keep:
                sizes = [free.numel() for free in self._free]
                del self._free[min(range(len(sizes)), key=sizes.__getitem__)]

    def clear(self) -> None:
        """Drop every free slab and kept layout (those in use come back when released)."""
        with self._lock:
            self._free.clear()
        if self.layouts is not None:
            self.layouts.clear()

    @property
    def free_nbytes(self) -> int:
        """Bytes in free slabs."""
        with self._lock:
            return sum(slab.numel() for slab in self._free)


class SlabPools:
    """One :class:`SlabPool` per device, made on first use (what a backend keeps)."""

    def __init__(self, allocate: Callable[[int], torch.Tensor]) -> None:
        self._allocate = allocate
        self._pools: dict[torch.device, SlabPool] = {}
        self._lock = threading.Lock()

    def __getitem__(self, device: torch.device) -> SlabPool:
        with self._lock:
            pool = self._pools.get(device)
            if pool is None:
                pool = self._pools[device] = SlabPool(self._allocate)
            return pool

    def clear(self) -> None:
        """Drop every pool's free slabs."""
        with self._lock:
            pools = list(self._pools.values())
        for pool in pools:
            pool.clear()


# -- layouts kept for cached calls ---------------------------------------------------------------

LAYOUT_MAX_BYTES = 256 << 20
"""Most bytes of kept layouts per device (their scratch and their slab each hold this much)."""


class GatherLayout:
    """A batch's gather, kept for the calls that stage the same copies again.

    A cached call hands the device the same destination buffers, and sources with the same
    metadata, batch after batch: the views that map each copy to its piece of a scratch and
    of a slab are made once, here, with a scratch and a slab of the batch's own. Why: making
    them anew cost four ``view()`` calls and two ``is_contiguous()`` a tensor, each 0.7-1 us
    on a GPU machine: most of a cached call over 10,002 small device tensors (23 us a tensor;
    one raw ``copy_`` per tensor: 4.9 us).

    Taken by one batch at a time (``busy``) until its scatter has run.
    """

    __slots__ = (
        "busy",
        "dsts",
        "gather",
        "guard",
        "nbytes",
        "scratch_head",
        "slab",
        "slab_head",
        "slab_views",
    )

    def __init__(
        self,
        batch: Batch,
        guard: Callable[..., bool],
        scratch: torch.Tensor,
        slab: torch.Tensor,
        plan: GatherPlan,
    ) -> None:
        self.dsts = list(batch.dsts)
        """The destination buffers, the layout's key: held, so that no other tensor takes
        their ids while the layout lives."""
        self.guard = guard
        """True for sources with the metadata the views were made for."""
        self.nbytes = plan.nbytes
        self.slab = slab
        self.scratch_head = scratch[: plan.nbytes]
        """The scratch's used part (it keeps the whole scratch alive)."""
        self.slab_head = slab[: plan.nbytes]
        self.gather = _by_dtype(_typed_pieces(plan.split(scratch), batch.srcs), batch.srcs)
        """Per dtype: the scratch's pieces, and what picks that dtype's sources from a batch.
        One list per dtype, because CUDA's fused multi-tensor copy takes one dtype a list."""
        self.slab_views = _typed_pieces(plan.split(slab), batch.dsts)
        self.busy = True

    def enqueue(self, srcs: list[torch.Tensor], *, non_blocking: bool) -> None:
        """Enqueue the gather of ``srcs`` into the scratch and its transfer into the slab, on
        the current stream (under ``torch.no_grad()``)."""
        for views, pick in self.gather:
            foreach_copy_(views, pick(srcs))
        self.slab_head.copy_(self.scratch_head, non_blocking=non_blocking)


def _typed_pieces(pieces: list[torch.Tensor], like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each uint8 piece viewed with the dtype and shape of its tensor in ``like``."""
    return [
        piece.view(tensor.dtype).view(tensor.shape)
        for piece, tensor in zip(pieces, like, strict=True)
    ]


def _by_dtype(
    views: list[torch.Tensor], srcs: list[torch.Tensor]
) -> list[tuple[list[torch.Tensor], Callable[[list[torch.Tensor]], list[torch.Tensor]]]]:
    """``views`` grouped by their sources' dtype, each group with a picker of its sources."""
    groups: dict[torch.dtype, list[int]] = {}
    for index, src in enumerate(srcs):
        groups.setdefault(src.dtype, []).append(index)
    return [([views[i] for i in indices], _picker(indices)) for indices in groups.values()]


def _picker(indices: list[int]) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    """What takes the items at ``indices`` from a list, in one C call."""
    if indices[-1] - indices[0] + 1 == len(indices):  # a run (sorted, no repeats): a slice
        return operator.itemgetter(slice(indices[0], indices[-1] + 1))
    get = operator.itemgetter(*indices)
    return lambda items: list(get(items))


TYPED_COPY_DTYPES = frozenset(
    {
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.uint8,
    }
)
"""Dtypes a kept layout copies as themselves: a same-dtype copy keeps every bit, and every
backend's multi-tensor copy takes them (float32, bfloat16, int64 and float64 ran through
CUDA's on an H200). Not ``bool`` (its copy writes 1 for any nonzero byte, and a staged tensor
keeps the bytes it was given); not complex, float8 or the wider unsigned types, whose
multi-tensor copy no hardware run has covered: their batches gather as bytes, as before."""


def _plain(tensors: list[torch.Tensor]) -> bool:
    """Plain tensors or Parameters of a :data:`TYPED_COPY_DTYPES` dtype, without a conjugate or
    negative bit: a typed copy_ of such a tensor copies its bytes (no ``__torch_function__``,
    nothing resolved on the way)."""
    return all(
        type(t) in (torch.Tensor, torch.nn.Parameter)
        and t.dtype in TYPED_COPY_DTYPES
        and not t.is_conj()
        and not t.is_neg()
        for t in tensors
    )


class GatherLayouts:
    """One device's kept :class:`GatherLayout`, least recently used first, within a budget."""

    def __init__(self, allocate_slab: Callable[[int], torch.Tensor]) -> None:
        self._allocate_slab = allocate_slab
        self._layouts: OrderedDict[int, GatherLayout] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()

    def take(self, batch: Batch) -> GatherLayout | None:
        """The kept layout of ``batch`` (same destinations, sources alike), marked busy."""
        dsts = batch.dsts
        with self._lock:
            layout = self._layouts.get(id(dsts[0]))
            if layout is None or layout.busy or len(layout.dsts) != len(dsts):
                return None
            layout.busy = True
            self._layouts.move_to_end(id(dsts[0]))
        if all(map(operator.is_, layout.dsts, dsts)) and layout.guard(*batch.srcs):
            return layout
        self.give_back(layout)
        return None

    def make(self, batch: Batch, plan: GatherPlan) -> GatherLayout | None:
        """A new layout for ``batch``, marked busy and kept; None where it may not have one
        (sources not plain, no metadata guard on this torch, or over the budget)."""
        if plan.nbytes > LAYOUT_MAX_BYTES or not (_plain(batch.srcs) and _plain(batch.dsts)):
            return None
        guard = metadata_guard(batch.srcs)
        if guard is None:
            return None
        key = id(batch.dsts[0])
        with self._lock:
            old = self._layouts.get(key)
            if old is not None:
                if old.busy:
                    return None  # taken by a batch of the same buffers still in flight
                # Sources that no longer match it (other metadata): this one replaces it.
                del self._layouts[key]
                self._nbytes -= old.nbytes
            self._evict(LAYOUT_MAX_BYTES - plan.nbytes)
            if self._nbytes + plan.nbytes > LAYOUT_MAX_BYTES:
                return None  # the rest are busy
            self._nbytes += plan.nbytes  # counted before the allocation, outside the lock
        try:
            # On the current (staging) stream: the only stream that touches it.
            scratch = torch.empty((plan.nbytes,), dtype=torch.uint8, device=batch.device)
            slab = self._allocate_slab(plan.nbytes)
            layout = GatherLayout(batch, guard, scratch, slab, plan)
        except BaseException:
            with self._lock:
                self._nbytes -= plan.nbytes
            raise
        with self._lock:
            if key in self._layouts:
                # Another batch of the same buffers kept one meanwhile: this one serves once.
                self._nbytes -= plan.nbytes
            else:
                self._layouts[key] = layout
        return layout

    def give_back(self, layout: GatherLayout) -> None:
        """The layout's batch has scattered (or never used it): another may take it."""
        with self._lock:
            layout.busy = False

    def clear(self) -> None:
        """Drop every layout not in use."""
        with self._lock:
            self._evict(0)

    def _evict(self, keep_nbytes: int) -> None:
        """Drop idle layouts, least recently used first, until at most ``keep_nbytes`` are
        kept (lock held)."""
        for key in list(self._layouts):
            if self._nbytes <= keep_nbytes:
                return
            layout = self._layouts[key]
            if not layout.busy:
                del self._layouts[key]
                self._nbytes -= layout.nbytes

    @property
    def nbytes(self) -> int:
        """Bytes of kept layouts (each holds a scratch and a slab of this many)."""
        with self._lock:
            return self._nbytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._layouts)


# -- one gathered batch ---------------------------------------------------------------------------


class GatheredCopies:
    """A batch gathered on its device and sent to a host slab; the host scatter still to do.

    Holds the slab and the device scratch (they must outlive the device's copies) until
    :meth:`scatter`, which must run only once those copies have completed; it then copies each
    piece into its destination and hands the slab back (``release``): to its pool, or to the
    kept :class:`GatherLayout` it belongs to.
    """

    __slots__ = ("_dsts", "_pieces", "_release", "_scratch", "_slab")

    def __init__(
        self,
        dsts: list[torch.Tensor],
        pieces: list[torch.Tensor],
        slab: torch.Tensor,
        release: Callable[[], None],
        scratch: torch.Tensor | None = None,
    ) -> None:
        self._dsts = dsts
        self._pieces = pieces
        self._slab: torch.Tensor | None = slab
        self._release = release
        self._scratch = scratch

    @property
    def slab(self) -> torch.Tensor | None:
        """The host slab, until the scatter has handed it back."""
        return self._slab

    def scatter(self) -> None:
        """Copy each piece of the slab into its destination, then let go of scratch and slab.

        Call once the device's completion of the gather and transfer has been seen complete.
        """
        if self._slab is None:
            return
        with torch.no_grad():
            foreach_copy_(self._dsts, self._pieces)
        self._pieces, self._dsts = [], []
        self._scratch = None  # the device is done with it: the allocator may reuse it
        self._slab = None
        self._release()


def enqueue_gather(batch: Batch, pool: SlabPool, *, non_blocking: bool = True) -> GatheredCopies:
    """Enqueue ``batch``'s gather and its one transfer on the current stream of its device.

    Call inside the backend's stream context (the staging stream current, the batch's device
    selected, the stream already waiting on the producer marks), under ``torch.no_grad()`` or
    not. Enqueues one multi-tensor copy of the sources' bytes into a device scratch and one
    copy of the scratch into a host slab; the backend then records its completion event and
    wraps it, with the result, in :class:`GatheredCompletion`. The batch's layout is kept
    (:class:`GatherLayout`), so that a later batch of the same copies reuses it.
    """
    layouts = pool.layouts
    layout = None if layouts is None else layouts.take(batch)
    if layout is None and layouts is not None:
        layout = layouts.make(batch, GatherPlan.for_sizes([src.nbytes for src in batch.srcs]))
    if layout is not None:
        assert layouts is not None
        # If this fails, the layout stays busy for good (never reused): work queued before
        # the failure may still read its scratch or write its slab.
        with torch.no_grad():
            layout.enqueue(batch.srcs, non_blocking=non_blocking)
        return GatheredCopies(
            list(batch.dsts), layout.slab_views, layout.slab, partial(layouts.give_back, layout)
        )
    srcs = [as_bytes(src) for src in batch.srcs]
    dsts = [as_bytes(dst) for dst in batch.dsts]
    plan = GatherPlan.for_sizes([src.numel() for src in srcs])
    # If anything below fails, the slab is not given back to the pool but dropped: work queued
    # before the failure may still write into it.
    slab = pool.acquire(plan.nbytes)
    with torch.no_grad():
        # Allocated on the current (staging) stream: the only stream that touches it.
        scratch = torch.empty((plan.nbytes,), dtype=torch.uint8, device=batch.device)
        foreach_copy_(plan.split(scratch), srcs)
        slab[: plan.nbytes].copy_(scratch, non_blocking=non_blocking)
    return GatheredCopies(dsts, plan.split(slab), slab, partial(pool.release, slab), scratch)


class GatheredCompletion:
    """The completion of a gathered batch: the device's event, then the host scatter.

    ``query()`` is True only once the scatter has run, so a driver that polls finds it
    incomplete and waits in a worker thread with ``synchronize()``, which waits for the device
    and then scatters (once; a concurrent caller waits for it). ``finish()`` is the same step
    under the name the device layer uses for "the host part of a completion".
    """

    __slots__ = ("_done", "_error", "_finished", "_gathered", "_lock")

    def __init__(self, done: Completion, gathered: GatheredCopies) -> None:
        self._done = done
        self._gathered = gathered
        self._lock = threading.Lock()
        self._finished = False
        self._error: BaseException | None = None

    @property
    def device_completion(self) -> Completion:
        """The device's own completion (the gather and the transfer)."""
        return self._done

    def query(self) -> bool:
        """Whether every byte is in its own buffer: the scatter has run (never blocks)."""
        return self._finished

    def synchronize(self) -> None:
        """Wait for the device, then scatter on the host; raises what either raised."""
        self.finish()

    def recycle(self) -> None:
        """The batch has landed: hand the device's event back (see ``DeviceCompletion``)."""
        recycle = getattr(self._done, "recycle", None)
        if self._finished and recycle is not None:
            recycle()

    def finish(self) -> None:
        """Wait for the device's copies (at once when complete), then scatter, once."""
        if self._finished:
            return
        with self._lock:
            if self._error is not None:
                raise self._error
            if self._finished:
                return
            self._done.synchronize()
            try:
                self._gathered.scatter()
            except BaseException as error:
                self._error = error
                raise
            self._finished = True
