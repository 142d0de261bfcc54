"""Gathering many small copies (astage._devices._gather), on CPU tensors.

Every step of the gather is plain torch, so it runs on CPU: the "device" gather and transfer
happen at once there, and what the tests control is the device's completion (a stand-in event
completed by the test), which is what the host scatter must wait for. Speed is not tested: the
gather's gain is launches saved on a GPU, and none is here.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import anyio
import pytest
import torch
from conftest import DTYPES, Driver, assert_tree_staged, bytes_of

import astage
from astage._core._batches import Batch, make_batches
from astage._core._cache import BufferCache
from astage._core._plan import Plan
from astage._core._walk import build_plan
from astage._devices import _gather as gather_module
from astage._devices._backend import Completion, Mark, installed
from astage._devices._gather import (
    GATHER_MAX_COPY_BYTES,
    GATHER_MIN_COPIES,
    MIN_SLAB_BYTES,
    SLAB_ALIGNMENT,
    GatheredCompletion,
    GatheredCopies,
    GatherPlan,
    SlabPool,
    SlabPools,
    _picker,
    enqueue_gather,
    pageable_slab,
    pinned_slab,
    should_gather,
)
from astage._devices._generic import GenericBackend
from astage._drivers._events import wait_for_event

KiB = 1024


class DeviceDone:
    """A device completion stand-in: complete when the test says (or at once)."""

    def __init__(self, *, complete: bool = False, error: BaseException | None = None) -> None:
        self._complete = threading.Event()
        if complete:
            self._complete.set()
        self._error = error
        self.waits = 0

    def complete(self) -> None:
        self._complete.set()

    def query(self) -> bool:
        return self._complete.is_set()

    def synchronize(self) -> None:
        self.waits += 1
        if not self._complete.wait(timeout=10):
            raise TimeoutError("the stand-in device completion never completed")
        if self._error is not None:
            raise self._error


class CountingAllocator:
    """Pageable slabs, counted; stands in for the pinned allocator of a CUDA backend."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def __call__(self, nbytes: int) -> torch.Tensor:
        self.sizes.append(nbytes)
        return pageable_slab(nbytes)


def _plan(state_dict: Any) -> Plan:
    cache = BufferCache(pin_memory=False, share_memory=False, pin_memory_min_bytes=0)
    walk = build_plan(cache, state_dict)
    while True:
        try:
            next(walk)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]


def _batches(plan: Plan, chunk_bytes: int = 64 * 1024 * KiB) -> list[Batch]:
    return list(make_batches(plan.copies, 0, len(plan.copies), chunk_bytes))


def _batch(srcs: list[torch.Tensor], dsts: list[torch.Tensor] | None = None) -> Batch:
    if dsts is None:
        dsts = [torch.zeros_like(src) for src in srcs]
    nbytes = sum(src.nbytes for src in srcs)
    return Batch(srcs[0].device, srcs=srcs, dsts=dsts, buffers=[], nbytes=nbytes, end=len(srcs))


def _random_bytes(nbytes: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=generator)


def _stage(batch: Batch, pool: SlabPool) -> GatheredCompletion:
    """Gather, transfer and scatter ``batch`` with a device completion that is already done."""
    completion = GatheredCompletion(DeviceDone(complete=True), enqueue_gather(batch, pool))
    completion.synchronize()
    return completion


# -- the layout -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_pieces_are_aligned_in_order_without_overlap(seed: int) -> None:
    rng = random.Random(seed)
    sizes = [
        rng.choice([0, 1, 3, 63, 64, 65, 127, 4096, rng.randrange(1, 70_000)])
        for _ in range(rng.randrange(1, 60))
    ]
    plan = GatherPlan.for_sizes(sizes)
    assert plan.sizes == tuple(sizes)
    assert plan.offsets[0] == 0
    assert all(offset % SLAB_ALIGNMENT == 0 for offset in plan.offsets)
    ends = [offset + size for offset, size in zip(plan.offsets, sizes, strict=True)]
    for previous_end, offset in zip(ends, plan.offsets[1:], strict=False):
        # After the previous piece, and no further than the next aligned byte.
        assert previous_end <= offset < previous_end + SLAB_ALIGNMENT
    assert plan.nbytes == ends[-1]


def test_split_cuts_views_at_the_offsets() -> None:
    plan = GatherPlan.for_sizes([5, 0, 64, 1, 100])
    assert plan.offsets == (0, 64, 64, 128, 192)
    assert plan.nbytes == 292
    buffer = torch.zeros(1000, dtype=torch.uint8)
    views = plan.split(buffer)
    assert all(view.untyped_storage().data_ptr() == buffer.data_ptr() for view in views)
    assert [view.storage_offset() for view in views] == list(plan.offsets)
    assert [view.numel() for view in views] == list(plan.sizes)
    views[4].fill_(7)  # a view, not a copy
    assert int(buffer[192:292].sum()) == 700
    assert GatherPlan.for_sizes([]).nbytes == 0
    assert GatherPlan.for_sizes([]).split(buffer) == []


# -- when to gather -------------------------------------------------------------------------------


def test_should_gather_takes_many_small_copies_only() -> None:
    def tensors(count: int, nbytes: int) -> list[torch.Tensor]:
        return [torch.zeros(nbytes, dtype=torch.uint8) for _ in range(count)]

    assert should_gather(_batch(tensors(GATHER_MIN_COPIES, 256)))
    assert not should_gather(_batch(tensors(GATHER_MIN_COPIES - 1, 256)))
    just_below = tensors(GATHER_MIN_COPIES - 1, 256) + tensors(1, GATHER_MAX_COPY_BYTES - 1)
    assert should_gather(_batch(just_below))
    one_too_big = tensors(GATHER_MIN_COPIES - 1, 256) + tensors(1, GATHER_MAX_COPY_BYTES)
    assert not should_gather(_batch(one_too_big))
    # A destination that no flat byte view covers cannot take its piece.
    srcs = [torch.zeros(4, 4) for _ in range(GATHER_MIN_COPIES)]
    dsts = [torch.zeros(4, 4) for _ in srcs]
    dsts[3] = torch.zeros(4, 4).t()
    assert not should_gather(_batch(srcs, dsts))


def test_a_plans_small_copies_are_gathered_and_its_slices_are_not() -> None:
    small = {f"s{i}": torch.randn(64) for i in range(GATHER_MIN_COPIES)}
    plan = _plan({**small, "big": torch.randn(1024 * KiB)})
    batches = _batches(plan, chunk_bytes=256 * KiB)
    assert [should_gather(batch) for batch in batches] == [True] + [False] * 16


@pytest.mark.parametrize("seed", range(10))
def test_a_plans_batches_know_their_largest_copy_and_gather_as_a_scan_would(seed: int) -> None:
    rng = random.Random(seed)
    sizes = [
        rng.choice([4, 100, GATHER_MAX_COPY_BYTES // 4, rng.randrange(1, 40_000)])
        for _ in range(rng.randrange(1, 90))
    ]
    state_dict = {f"t{i}": torch.zeros(size, dtype=torch.uint8) for i, size in enumerate(sizes)}
    for chunk_bytes in (64 * KiB, 1024 * KiB):
        for batch in _batches(_plan(state_dict), chunk_bytes=chunk_bytes):
            assert batch.largest == max(src.nbytes for src in batch.srcs)
            scanned = _batch(batch.srcs, batch.dsts)  # the same tensors, nothing known of them
            assert scanned.largest is None
            assert should_gather(batch) == should_gather(scanned)


class _Unreadable(torch.Tensor):
    """A tensor that fails when asked about its layout."""

    def is_contiguous(self, *args: Any, **kwargs: Any) -> bool:
        raise AssertionError("should_gather read a tensor of a batch cut from a plan")


def test_a_plans_batch_is_decided_without_reading_its_tensors() -> None:
    srcs: list[torch.Tensor] = [
        torch.zeros(64).as_subclass(_Unreadable) for _ in range(GATHER_MIN_COPIES)
    ]
    batch = _batch(srcs)
    batch.largest = 64 * 4
    assert should_gather(batch)
    too_big = _batch(srcs)
    too_big.largest = GATHER_MAX_COPY_BYTES
    assert not should_gather(too_big)
    with pytest.raises(AssertionError, match="read a tensor"):
        should_gather(_batch(srcs))  # nothing known: the tensors are read


# -- the round trip -------------------------------------------------------------------------------


def _state_dict_of(dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """Tensors of ``dtype`` with random bytes, laid out every way a plan copies them."""

    def values(*shape: int, salt: int) -> torch.Tensor:
        count = 1
        for n in shape:
            count *= n
        itemsize = torch.empty((), dtype=dtype).element_size()
        raw = _random_bytes(count * itemsize, seed * 100 + salt)
        return raw.view(dtype).reshape(shape)

    storage_for_views = values(40, salt=0)
    return {
        "vector": values(13, salt=1),  # copied as itself (the plan's typed source)
        "matrix": values(3, 5, salt=2),
        "scalar": values(salt=3).reshape(()),
        "odd": values(7, salt=4),
        "transposed": values(4, 6, salt=5).t(),  # copied as its storage's bytes
        "view_a": storage_for_views[3:11],  # a view into a larger storage: bytes again
        "view_b": storage_for_views[20:],  # the same storage: one copy for both
        "offset": values(9, salt=6)[1:],
        "big_odd": values(1001, salt=7),
        "last": values(2, 3, 1, salt=8),
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_transfer_scatter_is_byte_exact(dtype: torch.dtype) -> None:
    state_dict = _state_dict_of(dtype, seed=DTYPES.index(dtype))
    plan = _plan(state_dict)
    (batch,) = _batches(plan)
    assert len(batch.srcs) >= GATHER_MIN_COPIES
    assert should_gather(batch)
    pool = SlabPool(pageable_slab)
    completion = _stage(batch, pool)
    assert completion.query()
    assert_tree_staged(plan.result, state_dict)


def test_empty_storages_are_gathered_too() -> None:
    srcs = [
        torch.empty(0, dtype=torch.float32),
        _random_bytes(100, 1),
        torch.empty(0, 3, dtype=torch.complex64),
        _random_bytes(1, 2).view(torch.bool),
        torch.empty(0, dtype=torch.uint8),
        _random_bytes(64, 3),
        _random_bytes(16, 4).view(torch.float64),
        torch.empty(0, dtype=torch.int64),
    ]
    batch = _batch(srcs)
    assert should_gather(batch)
    _stage(batch, SlabPool(pageable_slab))
    for src, dst in zip(srcs, batch.dsts, strict=True):
        assert dst.shape == src.shape
        assert torch.equal(dst.view(-1).view(torch.uint8), src.view(-1).view(torch.uint8))
    # Only empty ones: nothing to transfer, and nothing fails.
    empties = _batch([torch.empty(0) for _ in range(GATHER_MIN_COPIES)])
    assert _stage(empties, SlabPool(pageable_slab)).query()


# -- slabs ----------------------------------------------------------------------------------------


def test_a_pool_reuses_a_free_slab_and_grows_when_none_fits() -> None:
    allocator = CountingAllocator()
    pool = SlabPool(allocator)
    first = pool.acquire(100)
    assert allocator.sizes == [MIN_SLAB_BYTES]
    pool.release(first)
    again = pool.acquire(MIN_SLAB_BYTES)
    assert again is first and allocator.sizes == [MIN_SLAB_BYTES]
    pool.release(again)
    grown = pool.acquire(MIN_SLAB_BYTES + 1)  # none fits: a larger one replaces it
    assert allocator.sizes == [MIN_SLAB_BYTES, 2 * MIN_SLAB_BYTES]
    assert grown.numel() == 2 * MIN_SLAB_BYTES and pool.free_nbytes == 0
    pool.release(grown)
    assert pool.acquire(10) is grown  # the grown slab serves small batches as well
    pool.release(grown)
    pool.clear()
    assert pool.free_nbytes == 0


def test_a_slab_in_use_is_never_handed_out_again() -> None:
    pool = SlabPool(CountingAllocator(), keep=2)
    held = [pool.acquire(1000) for _ in range(4)]
    assert len({slab.data_ptr() for slab in held}) == 4
    for slab in held:
        pool.release(slab)
    assert pool.free_nbytes == 2 * MIN_SLAB_BYTES  # at most `keep` free slabs are kept


def test_a_pool_holding_slabs_of_several_sizes_takes_the_right_one_out() -> None:
    # Found on an H200: slabs of different sizes in the free list, and the one taken out not the
    # first, made `list.remove` compare tensors by value and fail on their shapes.
    allocator = CountingAllocator()
    pool = SlabPool(allocator, keep=2)
    big, small = pool.acquire(2 * MIN_SLAB_BYTES), pool.acquire(MIN_SLAB_BYTES)
    pool.release(big)
    pool.release(small)
    assert pool.acquire(MIN_SLAB_BYTES) is small  # the smallest that fits, second in the list
    pool.release(small)
    grown = pool.acquire(4 * MIN_SLAB_BYTES)  # none fits: the largest free one is replaced
    assert pool.free_nbytes == MIN_SLAB_BYTES
    pool.release(grown)
    pool.release(big)  # one over `keep`: the smallest free slab goes, wherever it lies
    assert pool.free_nbytes == 6 * MIN_SLAB_BYTES
    assert pool.acquire(1) is big and pool.acquire(1) is grown


def test_pools_are_per_device() -> None:
    pools = SlabPools(pageable_slab)
    assert pools[torch.device("cuda", 0)] is pools[torch.device("cuda", 0)]
    assert pools[torch.device("cuda", 0)] is not pools[torch.device("cuda", 1)]


def test_consecutive_batches_reuse_one_slab_and_concurrent_ones_do_not_share() -> None:
    allocator = CountingAllocator()
    pool = SlabPool(allocator, layouts=False)
    for seed in range(3):
        _stage(_batch([_random_bytes(500, seed + i) for i in range(10)]), pool)
    assert len(allocator.sizes) == 1
    first = enqueue_gather(_batch([_random_bytes(500, i) for i in range(10)]), pool)
    second = enqueue_gather(_batch([_random_bytes(500, i) for i in range(10)]), pool)
    assert first.slab is not None and second.slab is not None
    assert first.slab.data_ptr() != second.slab.data_ptr()


# -- layouts kept for cached calls ----------------------------------------------------------------


def _mixed(seed: int, count: int = 24) -> list[torch.Tensor]:
    """Small tensors of interleaved dtypes and shapes (runs, singles and scattered dtypes)."""
    generator = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    for i in range(count):
        kind = (i * 7) % 5
        if kind == 0:
            out.append(torch.randn(3, 4, generator=generator))
        elif kind == 1:
            out.append(torch.randint(-99, 99, (5,), generator=generator))
        elif kind == 2:
            out.append(torch.randn(2, generator=generator, dtype=torch.float64))
        elif kind == 3:
            out.append(torch.randn((), generator=generator).to(torch.bfloat16))
        else:
            out.append(torch.randn(4, generator=generator, dtype=torch.float16))
    out.append(torch.empty(0, 3))
    return out


def _bytes_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def test_a_batch_of_the_same_copies_reuses_its_kept_layout_byte_exact() -> None:
    allocator = CountingAllocator()
    pool = SlabPool(allocator)
    assert pool.layouts is not None
    srcs = _mixed(0)
    batch = _batch(srcs)
    _stage(batch, pool)
    assert all(_bytes_equal(d, s) for d, s in zip(batch.dsts, srcs, strict=True))
    assert len(pool.layouts) == 1 and len(allocator.sizes) == 1
    for round_ in range(3):  # new values in the same sources: the layout serves, no allocation
        for src in srcs:
            src.copy_(torch.full_like(src, round_ + 1))
        _stage(batch, pool)
        assert all(_bytes_equal(d, s) for d, s in zip(batch.dsts, srcs, strict=True))
    assert len(pool.layouts) == 1 and len(allocator.sizes) == 1
    # Other sources with the same metadata (a state_dict() rebuilt per call) serve too.
    others = [src.clone() + 5 for src in srcs]
    _stage(_batch(others, batch.dsts), pool)
    assert all(_bytes_equal(d, s) for d, s in zip(batch.dsts, others, strict=True))
    assert len(allocator.sizes) == 1


def test_sources_whose_metadata_changed_get_a_new_layout() -> None:
    allocator = CountingAllocator()
    pool = SlabPool(allocator)
    srcs = _mixed(1)
    batch = _batch(srcs)
    _stage(batch, pool)
    changed = list(srcs)
    # The same bytes under another dtype: the old layout's float32 views would convert values.
    changed[0] = (srcs[0] + 0.5).view(torch.int32)
    changed[5] = torch.nn.Parameter(srcs[5].clone() * 2)  # another exact type
    _stage(_batch(changed, batch.dsts), pool)
    for dst, src in zip(batch.dsts, changed, strict=True):
        assert torch.equal(dst.reshape(-1).view(torch.uint8), src.reshape(-1).view(torch.uint8))
    assert len(allocator.sizes) == 2
    assert pool.layouts is not None and len(pool.layouts) == 1  # it replaced the old one


def test_a_layout_in_use_is_not_taken_by_a_second_batch_of_the_same_buffers() -> None:
    pool = SlabPool(CountingAllocator())
    srcs = _mixed(2)
    batch = _batch(srcs)
    _stage(batch, pool)
    first = enqueue_gather(batch, pool)  # in flight: its scatter has not run
    second_srcs = [src + 1 for src in srcs]
    second = enqueue_gather(_batch(second_srcs, batch.dsts), pool)
    assert first.slab is not None and second.slab is not None
    assert first.slab.data_ptr() != second.slab.data_ptr()
    GatheredCompletion(DeviceDone(complete=True), first).synchronize()
    assert all(_bytes_equal(d, s) for d, s in zip(batch.dsts, srcs, strict=True))
    GatheredCompletion(DeviceDone(complete=True), second).synchronize()
    assert all(_bytes_equal(d, s) for d, s in zip(batch.dsts, second_srcs, strict=True))


def test_no_layout_for_sources_a_typed_copy_would_change() -> None:
    # bool: copy_ writes 1 for any nonzero byte (conj and neg views never get here: a plan's
    # copies of those are byte views, and as_bytes refuses them).
    pool = SlabPool(CountingAllocator())
    assert pool.layouts is not None
    odd_bools = [_random_bytes(4, i).view(torch.bool) for i in range(GATHER_MIN_COPIES)]
    # Complex and float8: a same-dtype copy keeps their bits, but no hardware run has covered
    # a multi-tensor copy of them.
    complex_ = [torch.randn(3, dtype=torch.complex64) for _ in range(GATHER_MIN_COPIES)]
    float8 = [_random_bytes(4, i).view(torch.float8_e4m3fn) for i in range(GATHER_MIN_COPIES)]
    for srcs in (odd_bools, complex_, float8):
        batch = _batch(srcs)
        _stage(batch, pool)
        assert len(pool.layouts) == 0
        assert all(_bytes_equal(d, s) for d, s in zip(batch.dsts, srcs, strict=True))


def test_kept_layouts_stay_within_their_budget_least_recently_used_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(gather_module, "LAYOUT_MAX_BYTES", 3 * 1024)
    pool = SlabPool(CountingAllocator())
    layouts = pool.layouts
    assert layouts is not None
    batches = [_batch([_random_bytes(100, 10 * b + i) for i in range(10)]) for b in range(5)]
    for batch in batches:
        _stage(batch, pool)
        assert layouts.nbytes <= 3 * 1024
    assert len(layouts) == 2  # ~1.2 KiB each: the two most recent
    kept = layouts.take(batches[-1])
    assert kept is not None
    layouts.give_back(kept)
    assert layouts.take(batches[0]) is None
    pool.clear()
    assert len(layouts) == 0 and layouts.nbytes == 0


@pytest.mark.parametrize(
    ("indices", "expected"),
    [([0, 1, 2], [10, 11, 12]), ([3], [13]), ([0, 2, 5], [10, 12, 15]), ([4, 5], [14, 15])],
)
def test_a_picker_takes_the_items_at_its_indices(indices: list[int], expected: list[int]) -> None:
    items: list[Any] = list(range(10, 16))
    assert list(_picker(indices)(items)) == expected


# -- the completion -------------------------------------------------------------------------------


def test_nothing_is_scattered_before_the_device_completed() -> None:
    srcs = [_random_bytes(300, i) for i in range(10)]
    batch = _batch(srcs)
    device = DeviceDone()
    completion = GatheredCompletion(
        device, enqueue_gather(batch, SlabPool(pageable_slab, layouts=False))
    )
    assert not completion.query()
    waiter = threading.Thread(target=completion.synchronize)
    waiter.start()
    time.sleep(0.05)  # the waiter is in the device's wait, or would have scattered by now
    assert waiter.is_alive()
    assert all(int(dst.count_nonzero()) == 0 for dst in batch.dsts), "scattered too early"
    assert not completion.query()
    device.complete()
    waiter.join(10)
    assert not waiter.is_alive()
    assert completion.query()
    assert all(torch.equal(dst, src) for dst, src in zip(batch.dsts, srcs, strict=True))


def test_query_stays_false_until_the_scatter_ran() -> None:
    """A driver that polls must not take a complete device event for a landed batch."""
    batch = _batch([_random_bytes(300, i) for i in range(10)])
    device = DeviceDone(complete=True)
    completion = GatheredCompletion(device, enqueue_gather(batch, SlabPool(pageable_slab)))
    assert device.query() and not completion.query()
    assert all(int(dst.count_nonzero()) == 0 for dst in batch.dsts)
    completion.finish()
    assert completion.query()
    assert completion.device_completion is device


def test_the_scratch_and_slab_live_until_the_scatter_then_go_back() -> None:
    pool = SlabPool(pageable_slab, layouts=False)
    device = DeviceDone()
    gathered = enqueue_gather(_batch([_random_bytes(300, i) for i in range(10)]), pool)
    scratch = weakref.ref(gathered._scratch)  # type: ignore[arg-type]
    completion = GatheredCompletion(device, gathered)
    assert scratch() is not None and gathered.slab is not None
    assert pool.free_nbytes == 0  # the slab is not back in the pool while copies may run
    device.complete()
    completion.synchronize()
    assert scratch() is None  # let go once the device is done with it
    assert gathered.slab is None and pool.free_nbytes == MIN_SLAB_BYTES


def test_concurrent_waiters_scatter_once() -> None:
    allocator = CountingAllocator()
    pool = SlabPool(allocator, layouts=False)
    device = DeviceDone()
    batch = _batch([_random_bytes(300, i) for i in range(10)])
    completion = GatheredCompletion(device, enqueue_gather(batch, pool))
    waiters = [threading.Thread(target=completion.synchronize) for _ in range(4)]
    for waiter in waiters:
        waiter.start()
    device.complete()
    for waiter in waiters:
        waiter.join(10)
    assert completion.query()
    assert pool.free_nbytes == MIN_SLAB_BYTES  # given back once, not four times


def test_a_failed_device_wait_scatters_nothing_and_keeps_the_slab() -> None:
    pool = SlabPool(pageable_slab, layouts=False)
    device = DeviceDone(complete=True, error=RuntimeError("device lost"))
    batch = _batch([_random_bytes(300, i) for i in range(10)])
    completion = GatheredCompletion(device, enqueue_gather(batch, pool))
    with pytest.raises(RuntimeError, match="device lost"):
        completion.synchronize()
    assert not completion.query()
    assert all(int(dst.count_nonzero()) == 0 for dst in batch.dsts)
    assert pool.free_nbytes == 0  # the device may still write into it: never reused


@pytest.mark.asyncio
async def test_the_drivers_wait_scatters_in_a_worker_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The async face's wait (poll, then synchronize in a thread) never scatters on the loop."""
    batch = _batch([_random_bytes(300, i) for i in range(10)])
    device = DeviceDone(complete=True)  # the loop's fast path would see the device done
    threads: list[threading.Thread] = []
    scatter = GatheredCopies.scatter

    def recording_scatter(self: GatheredCopies) -> None:
        threads.append(threading.current_thread())
        scatter(self)

    monkeypatch.setattr(GatheredCopies, "scatter", recording_scatter)
    completion = GatheredCompletion(device, enqueue_gather(batch, SlabPool(pageable_slab)))
    loop_thread = threading.current_thread()
    await wait_for_event(completion, anyio.CapacityLimiter(1))
    assert completion.query()
    assert threads and threads[0] is not loop_thread
    assert all(torch.equal(dst, src) for dst, src in zip(batch.dsts, batch.srcs, strict=True))


# -- through the generic backend ------------------------------------------------------------------


class HostEvent:
    """A completion event on a "device" whose work runs at once."""

    def record(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


class HostStream:
    """A stream whose work has all run by the time it was enqueued."""

    def synchronize(self) -> None:
        pass


class CpuGenericBackend(GenericBackend):
    """The generic backend's own ``enqueue``, on CPU tensors, with streams that run at once.

    Installed in front of the built-in backends, it takes the CPU batches of every stager, so
    that the drivers' real device path (enqueue_batch, completions, landed) runs the gather.
    """

    def __init__(self) -> None:
        super().__init__("cpu")
        self.completions: list[Any] = []

    def _new_stream(self, device: torch.device) -> Any:
        return HostStream()

    def _use_stream(self, stream: Any) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def _record_done(self, stream: Any) -> Any:
        return HostEvent()

    def _wait(self, stream: Any, event: Any) -> None:
        pass

    @contextlib.contextmanager
    def selected(self, device: torch.device) -> Iterator[None]:
        yield

    def current_device(self) -> torch.device | None:
        return None  # marked when a batch meets the device, not at the call

    def mark(self, device: torch.device) -> Mark:
        return Mark(device, HostEvent())

    def is_capturing(self, device: torch.device) -> bool:
        return False

    def enqueue(self, batch: Batch, after: Sequence[Mark], *, non_blocking: bool) -> Completion:
        completion = super().enqueue(batch, after, non_blocking=non_blocking)
        self.completions.append(completion)
        return completion


def test_the_generic_backend_gathers_many_small_copies_only() -> None:
    backend = CpuGenericBackend()
    small = _batch([_random_bytes(100, i) for i in range(GATHER_MIN_COPIES)])
    completion = backend.enqueue(small, [], non_blocking=True)
    assert isinstance(completion, GatheredCompletion)
    assert not completion.query()  # the scatter is still to run
    completion.synchronize()
    assert all(torch.equal(d, s) for d, s in zip(small.dsts, small.srcs, strict=True))
    few = _batch([_random_bytes(100, i) for i in range(GATHER_MIN_COPIES - 1)])
    completion = backend.enqueue(few, [], non_blocking=True)
    assert not isinstance(completion, GatheredCompletion) and completion.query()
    assert all(torch.equal(d, s) for d, s in zip(few.dsts, few.srcs, strict=True))
    # The same copies gathered again reuse the batch's kept layout (scratch, slab and views);
    # release_slabs lets go of it.
    pool = backend._slabs[small.device]
    assert pool.layouts is not None and len(pool.layouts) == 1
    kept = pool.layouts.nbytes
    backend.enqueue(small, [], non_blocking=True).synchronize()
    assert len(pool.layouts) == 1 and pool.layouts.nbytes == kept
    assert pool.allocations == 0  # the pool's own slabs serve batches without a layout
    backend.release_slabs()
    assert len(pool.layouts) == 0 and pool.layouts.nbytes == 0


def test_stagers_stage_gathered_batches_byte_exact(make_stager: Callable[..., Driver]) -> None:
    state_dict = {str(dtype): _state_dict_of(dtype, seed=i) for i, dtype in enumerate(DTYPES)}
    backend = CpuGenericBackend()
    with installed(backend):
        stager = make_stager()
        staged = stager.stage(state_dict)
        assert_tree_staged(staged, state_dict)
        gathered = sum(isinstance(c, GatheredCompletion) for c in backend.completions)
        assert gathered == len(backend.completions) > 0
        for tensors in state_dict.values():  # a cached call gathers the new values
            for tensor in tensors.values():
                storage = tensor.untyped_storage()
                bytes_of(storage).add_(1)
        staged = stager.stage(state_dict)
        assert_tree_staged(staged, state_dict)
        stager.close()


class TrackedEvent(HostEvent):
    """A host event that notes the thread that destroys it."""

    destroyed_in: ClassVar[list[int]] = []

    def __del__(self) -> None:
        TrackedEvent.destroyed_in.append(threading.get_ident())


class TrackedEventBackend(CpuGenericBackend):
    def __init__(self) -> None:
        super().__init__()
        self.made = 0

    def _record_done(self, stream: Any) -> Any:
        self.made += 1
        return TrackedEvent()


@pytest.mark.parametrize("face", ["async", "sync"])
def test_completion_events_are_recycled_never_destroyed_in_the_callers_thread(face: str) -> None:
    # Found on an H200: an event destroyed on the loop waited for the driver's lock while a
    # worker thread pinned a buffer (6-9 ms a 16 MiB buffer). Batches of both kinds: gathered
    # small copies and one copy each.
    state_dict = {
        "small": [_random_bytes(64, i) for i in range(3 * GATHER_MIN_COPIES)],
        "large": [_random_bytes(1 << 20, i) for i in range(4)],
    }
    gc.collect()  # events of an earlier test's backend die now, not during this one
    TrackedEvent.destroyed_in.clear()
    backend = TrackedEventBackend()
    caller = threading.get_ident()
    options: dict[str, Any] = {"chunk_bytes": 1 << 20}
    with installed(backend):
        if face == "sync":
            with astage.SyncStager(**options) as sync:
                for _ in range(4):
                    assert_tree_staged(sync.stage(state_dict), state_dict)
        else:

            async def main() -> None:
                async with astage.Stager(**options) as stager:
                    for _ in range(4):
                        assert_tree_staged(await stager.stage(state_dict), state_dict)

            anyio.run(main)
        gc.collect()
        assert caller not in TrackedEvent.destroyed_in
        made = backend.made
        assert 0 < made <= 8  # a few per call at first, then only spare ones
        completions = list(backend.completions)
        assert all(c.query() for c in completions)  # recycled: complete, whatever comes next
    assert made == backend.made


@pytest.mark.parametrize("how", ["clear_cache", "close"])
def test_clear_cache_and_close_let_go_of_kept_layouts(how: str) -> None:
    # A layout holds its batch's destination buffers, a scratch and a slab: after clear_cache()
    # or close() none of that may stay (the layouts of calls in flight would come back later).
    state_dict = [_random_bytes(64, i) for i in range(4 * GATHER_MIN_COPIES)]
    backend = CpuGenericBackend()
    with installed(backend):
        sync = astage.SyncStager()
        assert_tree_staged(sync.stage(state_dict), state_dict)
        layouts = backend._slabs[torch.device("cpu")].layouts
        assert layouts is not None and len(layouts) > 0
        if how == "clear_cache":
            sync.clear_cache()
        else:
            sync.close()
        assert len(layouts) == 0 and layouts.nbytes == 0
        sync.close()


class SpanBackend(CpuGenericBackend):
    """Notes when each enqueue runs, and makes it take a while (so that overlaps show)."""

    def __init__(self, spans: list[tuple[float, float]]) -> None:
        super().__init__()
        self.spans = spans

    def enqueue(self, batch: Batch, after: Sequence[Mark], *, non_blocking: bool) -> Completion:
        started = time.perf_counter()
        time.sleep(0.003)
        completion = super().enqueue(batch, after, non_blocking=non_blocking)
        self.spans.append((started, time.perf_counter()))
        return completion


def test_the_async_face_runs_a_devices_host_work_one_batch_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Found on an H200: worker threads enqueueing and scattering a device's small batches side
    # by side paid a thread switch per torch call (each lets go of the GIL): a cached call over
    # 10,002 small tensors took 0.9 s on the async face, 0.24 s on the blocking one.
    spans: list[tuple[float, float]] = []
    scatter = GatheredCopies.scatter

    def slow_scatter(self: GatheredCopies) -> None:
        started = time.perf_counter()
        time.sleep(0.003)
        scatter(self)
        spans.append((started, time.perf_counter()))

    monkeypatch.setattr(GatheredCopies, "scatter", slow_scatter)
    state_dict = [_random_bytes(64, i) for i in range(12 * GATHER_MIN_COPIES)]
    backend = SpanBackend(spans)

    async def main() -> None:
        async with astage.Stager(copy_threads=4, chunk_bytes=64 * 16) as stager:
            for _ in range(2):
                assert_tree_staged(await stager.stage(state_dict), state_dict)

    with installed(backend):
        anyio.run(main)
    assert len(spans) >= 8
    ordered = sorted(spans)
    overlaps = [(a, b) for a, b in itertools.pairwise(ordered) if b[0] < a[1]]
    assert not overlaps, f"{len(overlaps)} of {len(spans)} spans overlap"


# -- on a GPU (skipped without CUDA; ran on an H200) -----------------------------------------------

GPU_SLEEP_CYCLES = 200_000_000  # a GPU busy-wait of ~0.1 s, so that a copy not ordered after it
# reads the values from before it


class CudaDone:
    """A CUDA event as a device completion."""

    def __init__(self, event: torch.cuda.Event) -> None:
        self.event = event

    def query(self) -> bool:
        return bool(self.event.query())

    def synchronize(self) -> None:
        self.event.synchronize()


@pytest.mark.cuda
def test_on_cuda_the_gather_is_byte_exact_ordered_and_pinned() -> None:
    device = torch.device("cuda", 0)
    srcs = [
        (_random_bytes(4 * (i + 1), i).view(torch.int32) if i % 2 else _random_bytes(i, i))
        for i in range(3 * GATHER_MIN_COPIES)
    ]
    srcs = [src.to(device) for src in srcs]
    batch = _batch(srcs, [torch.zeros_like(src, device="cpu") for src in srcs])
    assert should_gather(batch)
    torch.cuda.synchronize()
    producer, staging = torch.cuda.Stream(device), torch.cuda.Stream(device)
    with torch.cuda.stream(producer):
        torch.cuda._sleep(GPU_SLEEP_CYCLES)
        for src in srcs:
            src.add_(1)  # what the snapshot must hold (integers: +1-1+1 is exact)
        expected = [src.cpu() for src in srcs]  # (waits for the producer: stream-ordered)
        for src in srcs:
            src.sub_(1)
        torch.cuda._sleep(GPU_SLEEP_CYCLES)
        for src in srcs:
            src.add_(1)
        mark = torch.cuda.Event()
        mark.record(producer)
    staging.wait_event(mark)
    pool = SlabPool(pinned_slab)
    with torch.cuda.stream(staging):
        gathered = enqueue_gather(batch, pool, non_blocking=True)
        done = torch.cuda.Event(blocking=True)
        done.record(staging)
    assert gathered.slab is not None and gathered.slab.is_pinned()
    completion = GatheredCompletion(CudaDone(done), gathered)
    completion.synchronize()
    for dst, want in zip(batch.dsts, expected, strict=True):
        assert torch.equal(dst.view(-1).view(torch.uint8), want.view(-1).view(torch.uint8))


class _PinningBackend:
    """Asks for pinned buffers; records nothing but what enqueue_batch decides."""

    def pins_host_memory(self, device: torch.device) -> bool:
        return True

    def enqueue(self, batch: Batch, after: Sequence[Mark], *, non_blocking: bool) -> Any:
        return DeviceDone()

    def synchronize(self) -> None:
        pass


def test_a_gathered_batch_leaves_its_small_buffers_unpinned(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its bytes cross the link through one pinned slab: a registration per buffer buys nothing."""
    from astage._devices import _backend, _pinning

    asked: list[bool] = []
    real = _pinning.begin_copies

    def recording(batch: Batch, *, pin_buffers: bool) -> Any:
        asked.append(pin_buffers)
        return real(batch, pin_buffers=False)  # no CUDA runtime here

    monkeypatch.setattr(_backend, "begin_copies", recording)
    small = [torch.full((16,), float(i)) for i in range(32)]
    gathered = _batch(small)
    assert should_gather(gathered)
    backend: Any = _PinningBackend()  # the two calls enqueue_batch makes, nothing more
    _backend.enqueue_batch(backend, gathered, [], non_blocking=True)
    alone = _batch([torch.zeros(1 << 16)])
    assert not should_gather(alone)
    _backend.enqueue_batch(backend, alone, [], non_blocking=True)
    assert asked == [False, True]
