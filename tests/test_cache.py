"""The host-buffer cache (reuse across calls, weak keys, size checks, clearing, shared memory,
copies in flight holding a dropped buffer's registration); pinning itself is in test_pinning."""

from __future__ import annotations

import dataclasses
import functools
import queue
import threading
import time
from collections.abc import Callable

import pytest
import torch
from conftest import (
    Driver,
    assert_tree_staged,
    collect,
    in_a_fresh_interpreter,
    model_state_dict,
    mutate_,
    outcome_of,
    storage_ptr,
)

import astage
from astage._core import _arena
from astage._core import _cache as _cache_module
from astage._core._cache import BufferCache, HostBuffer
from astage._drivers._gc import gc_paused
from astage._torch import storage_use_count

# -- BufferCache on its own ---------------------------------------------------------------------


def _cache(
    *, pin_memory: bool = False, share_memory: bool = False, pin_memory_min_bytes: int = 0
) -> BufferCache:
    return BufferCache(
        pin_memory=pin_memory, share_memory=share_memory, pin_memory_min_bytes=pin_memory_min_bytes
    )


def test_allocate_then_lookup_finds_the_same_buffer() -> None:
    cache = _cache()
    source = torch.randn(16).untyped_storage()
    assert cache.lookup(source, ()) is None
    buffer = cache.allocate(source)
    assert buffer.nbytes == source.nbytes()
    assert buffer.storage.device.type == "cpu"
    assert buffer.storage.data_ptr() != source.data_ptr()
    assert cache.lookup(source, ()) is buffer
    assert cache.info() == astage.CacheInfo(storages=1, nbytes=64, pinned_nbytes=0)


def test_lookup_ignores_other_storages() -> None:
    cache = _cache()
    cache.allocate(torch.randn(4).untyped_storage())
    assert cache.lookup(torch.randn(4).untyped_storage(), ()) is None


def test_entry_is_dropped_with_its_source() -> None:
    cache = _cache()
    tensor = torch.randn(32)
    cache.allocate(tensor.untyped_storage())
    assert cache.info().storages == 1
    del tensor
    collect()
    assert cache.info() == astage.CacheInfo(0, 0, 0)


def test_resized_source_is_a_mismatch_naming_the_path() -> None:
    cache = _cache()
    tensor = torch.zeros(8)
    cache.allocate(tensor.untyped_storage())
    tensor.untyped_storage().resize_(64)
    with pytest.raises(astage.BufferMismatchError, match=r"\['w'\]"):
        cache.lookup(tensor.untyped_storage(), ("w",))


def test_clear_drops_buffers_but_not_their_memory() -> None:
    cache = _cache()
    source = torch.arange(8.0)
    buffer = cache.allocate(source.untyped_storage())
    cache.clear()
    assert cache.info() == astage.CacheInfo(0, 0, 0)
    assert cache.lookup(source.untyped_storage(), ()) is None
    assert buffer.storage.nbytes() == 32  # still valid for staged tensors that use it


def test_zero_byte_buffers_are_cached() -> None:
    cache = _cache()
    source = torch.empty(0)
    buffer = cache.allocate(source.untyped_storage())
    assert buffer.nbytes == 0
    assert cache.info().storages == 1


def test_shared_memory_buffers() -> None:
    cache = _cache(share_memory=True)
    buffer = cache.allocate(torch.randn(8).untyped_storage())
    assert buffer.storage.is_shared()


def test_no_pinning_without_cuda_request() -> None:
    cache = _cache(pin_memory=False)
    buffer = cache.allocate(torch.randn(1 << 16).untyped_storage())
    assert not buffer.pinned
    assert cache.info().pinned_nbytes == 0


@pytest.mark.parametrize("share_memory", [False, True])
def test_in_use_sees_tensors_on_the_buffers(share_memory: bool) -> None:
    cache = _cache(share_memory=share_memory)
    assert not cache.in_use()  # empty
    source = torch.randn(8)
    buffer = cache.allocate(source.untyped_storage(), like=source)
    assert not cache.in_use()  # only the cache holds it
    view = buffer.whole[2:]
    assert cache.in_use()
    del view
    assert not cache.in_use()
    storage = buffer.whole.untyped_storage()  # the storage object alone is not a holder
    assert not cache.in_use()
    alias = torch.empty((0,)).set_(storage)
    assert cache.in_use()
    del alias, storage
    assert not cache.in_use()


def test_cpu_sources_never_want_pinning() -> None:
    # Regression: with pin_memory=True a buffer for a CPU source was registered too, which
    # costs ~0.1 s per GB and speeds up nothing for a CPU-to-CPU copy.
    cache = _cache(pin_memory=True)
    buffer = cache.allocate(torch.randn(1 << 16).untyped_storage())
    assert not buffer.wants_pin


def test_small_and_empty_buffers_never_want_pinning() -> None:
    cache = _cache(pin_memory=True, pin_memory_min_bytes=64)
    sources = [_device_storage(n) for n in (64, 60, 0)]
    assert [cache.allocate(source).wants_pin for source in sources] == [True, False, False]


def test_eviction_racing_with_allocate_keeps_the_new_entry() -> None:
    # The eviction of a dead source may run in another thread just after allocate() stored a
    # new buffer under the same (reused) id: it must not remove the new buffer.
    cache = _cache()
    source = torch.randn(4).untyped_storage()
    new = cache.allocate(source)
    stale = cache.allocate(torch.randn(4).untyped_storage())
    stale.key = new.key  # as if the dead source had had the id that ``source`` now has
    cache._remove(stale)
    assert cache.get(source) is new
    assert cache.info().storages == 2 - 1  # stale's own entry is still under its real id


def test_evictions_in_another_thread_race_with_the_callers_thread() -> None:
    # The cache has no lock: a training thread that drops source tensors runs the evictions
    # while the staging thread allocates, looks up and reads the cache's figures.
    cache = _cache()
    dropped: queue.SimpleQueue[torch.UntypedStorage | None] = queue.SimpleQueue()

    def training_thread() -> None:
        while (source := dropped.get()) is not None:
            del source  # the eviction runs here, in this thread

    thread = threading.Thread(target=training_thread)
    thread.start()
    kept: list[torch.UntypedStorage] = []
    try:
        deadline = time.perf_counter() + 0.5
        while time.perf_counter() < deadline:
            for _ in range(20):
                source = torch.empty(4).untyped_storage()
                cache.allocate(source)
                if len(kept) < 50:
                    kept.append(source)
                else:
                    dropped.put(source)
                del source
            cache.info()
            cache.in_use()
            assert all(cache.get(source) is not None for source in kept)
    finally:
        dropped.put(None)
        thread.join()
    collect()
    assert cache.info().storages == len(kept)


# -- copies in flight hold a dropped buffer's registration --------------------------------------


def _device_storage(nbytes: int) -> torch.UntypedStorage:
    """A source storage that is not on the CPU (so its buffer wants pinning), without a GPU."""
    return torch.empty(nbytes, dtype=torch.uint8, device="meta").untyped_storage()


class _Registration:
    """A registration that counts how often the cache let go of it."""

    def __init__(self) -> None:
        self.released = 0

    @property
    def active(self) -> bool:
        return self.released == 0

    def release(self) -> None:
        self.released += 1


def _registered(
    cache: BufferCache, source: torch.UntypedStorage
) -> tuple[HostBuffer, _Registration]:
    buffer = cache.allocate(source)
    registration = buffer.registration = _Registration()
    return buffer, registration


def test_only_buffers_that_may_be_pinned_count_copies() -> None:
    pinnable = _cache(pin_memory=True).allocate(_device_storage(64))
    pageable = _cache(pin_memory=False).allocate(_device_storage(64))
    assert pinnable.copies == [] and pageable.copies is None
    pageable.copy_started()  # nothing to count: a no-op
    pageable.copy_finished()


def test_release_lets_go_at_once_without_copies_in_flight() -> None:
    source = _device_storage(64)
    buffer, registration = _registered(_cache(pin_memory=True), source)
    buffer.release()
    assert registration.released == 1 and not buffer.pinned


def test_release_waits_for_the_last_copy_in_flight() -> None:
    source = _device_storage(64)
    cache = _cache(pin_memory=True)
    buffer, registration = _registered(cache, source)
    buffer.copy_started()
    buffer.copy_started()
    cache.clear()
    assert registration.released == 0
    buffer.copy_finished()
    assert registration.released == 0
    buffer.copy_finished()
    assert registration.released == 1


def test_a_copy_landing_in_a_live_buffer_lets_nothing_go() -> None:
    source = _device_storage(64)
    buffer, registration = _registered(_cache(pin_memory=True), source)
    buffer.copy_started()
    buffer.copy_finished()
    assert registration.released == 0 and buffer.pinned


def test_a_buffer_collected_with_a_copy_never_landed_keeps_its_registration() -> None:
    # Its driver gave up waiting for the copy: unregistering could corrupt, keeping leaks.
    source = _device_storage(64)
    cache = _cache(pin_memory=True)
    buffer, registration = _registered(cache, source)
    buffer.copy_started()
    del cache, buffer
    collect()
    assert registration.released == 0


def test_a_buffer_collected_unreleased_lets_go() -> None:
    source = _device_storage(64)
    cache = _cache(pin_memory=True)
    registration = _registered(cache, source)[1]
    del cache
    collect()
    assert registration.released == 1


# -- the cache as seen through the stagers ------------------------------------------------------


def test_in_use_while_a_staged_result_lives(stager: Driver) -> None:
    cache = stager.stager._cache
    sd = model_state_dict()
    with gc_paused():  # the result must die by reference counting alone: no cycle holds it
        staged = stager.stage(sd)
        assert cache.in_use()
        del staged
        assert not cache.in_use()
        staged = stager.stage(sd)  # cached call
        derived = staged["model"]["proj.weight"].detach()[1:]
        array = staged["model"]["proj.bias"].numpy()
        del staged
        assert cache.in_use()
        del derived
        assert cache.in_use()
        del array
        assert not cache.in_use()


def test_a_failed_call_leaves_no_buffer_in_use(stager: Driver) -> None:
    cache = stager.stager._cache
    sd = {"w": torch.randn(16), "lock": threading.Lock()}
    with gc_paused():
        try:
            stager.stage(sd)
        except astage.UnstageableError:
            pass  # the error and its traceback are dropped here
        else:
            pytest.fail("the lock was staged")
        if stager.kind != "sync":
            # asyncio keeps a failed task and its traceback in a cycle of its own
            # (task -> exception -> traceback -> run_until_complete's frame -> task).
            collect()
        assert not cache.in_use()


def test_second_call_reuses_buffers_and_copies_fresh_values(stager: Driver) -> None:
    source = model_state_dict()
    first = stager.stage(source)
    first_ptrs = {key: storage_ptr(t) for key, t in first["model"].items()}
    info = stager.cache_info()
    mutate_(source)
    second = stager.stage(source)
    assert {key: storage_ptr(t) for key, t in second["model"].items()} == first_ptrs
    assert stager.cache_info() == info
    assert_tree_staged(second, source)  # the new values, not the cached ones


def test_cache_info_counts_distinct_storages(stager: Driver) -> None:
    a = torch.randn(10)
    b = torch.randn(3, dtype=torch.float64)
    stager.stage({"a": a, "a-view": a[2:], "b": b, "b-again": b})
    assert stager.cache_info() == astage.CacheInfo(storages=2, nbytes=40 + 24, pinned_nbytes=0)


def test_buffers_are_released_when_sources_die(stager: Driver) -> None:
    keep = torch.randn(4)
    source = {"keep": keep, "drop": torch.randn(100), "view-only": torch.randn(50)[10:20]}
    staged = stager.stage(source)
    assert stager.cache_info().storages == 3
    del source
    collect()
    assert stager.cache_info() == astage.CacheInfo(storages=1, nbytes=16, pinned_nbytes=0)
    assert torch.equal(staged["keep"], keep)  # staged tensors outlive the cache entries


def test_staged_results_do_not_keep_sources_alive(stager: Driver) -> None:
    source = {"w": torch.randn(256)}
    staged = stager.stage(source)
    ref = source["w"].untyped_storage()
    ptr = ref.data_ptr()
    del ref, source
    collect()
    assert stager.cache_info().storages == 0
    assert storage_ptr(staged["w"]) != ptr


def test_resized_source_raises_buffer_mismatch(stager: Driver) -> None:
    weight = torch.zeros(8)
    source = {"model": {"layer": [weight]}}
    stager.stage(source)
    weight.untyped_storage().resize_(64)  # in place: same storage object, new size
    with pytest.raises(astage.BufferMismatchError) as info:
        stager.stage(source)
    assert isinstance(info.value, astage.AstageError)
    assert "['model']['layer'][0]" in str(info.value)


def _every_kind_of_buffer() -> dict[str, torch.Tensor]:
    return {
        "small": torch.randn(8, 8),  # allocated as its twin (host_empty)
        "bf16": torch.randn(64).to(torch.bfloat16),  # numpy has no bfloat16: carried as int16
        "flags": torch.rand(64) > 0.5,  # bool: staged as its storage's bytes
        "view": torch.randn(64)[8:40],  # a view: the buffer is the whole storage, as bytes
        "complex32": torch.randn(8, dtype=torch.complex64).to(torch.complex32),  # no numpy twin
        "large": torch.randn(1 << 19),  # 2 MiB: a page-aligned mapping of its own
        "empty": torch.empty(0),
    }


@pytest.mark.parametrize("share_memory", [False, True])
def test_no_staged_storage_can_be_resized(
    make_stager: Callable[..., Driver], share_memory: bool
) -> None:
    stager = make_stager(share_memory=share_memory)
    source = _every_kind_of_buffer()
    for _ in range(3):  # first call, full walk, replay
        staged = stager.stage(source)
        for key, tensor in staged.items():
            storage = tensor.untyped_storage()
            assert not storage.resizable(), key
            if storage.nbytes():
                with pytest.raises(RuntimeError, match="not resizable"):
                    storage.resize_(0)


@pytest.mark.parametrize("numpy_twins", [True, False], ids=["numpy", "without-numpy"])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.bool, torch.complex32, torch.float8_e4m3fn]
)
def test_host_empty_makes_a_sole_contiguous_tensor_that_cannot_be_resized(
    monkeypatch: pytest.MonkeyPatch, numpy_twins: bool, dtype: torch.dtype
) -> None:
    if not numpy_twins:  # as where numpy is not installed: a bytearray carries the bytes
        monkeypatch.setattr(_arena, "_NUMPY_TWINS", {})
    for shape in [(3, 5), (), (0, 4)]:
        tensor = _arena.host_empty(shape, dtype)
        assert (tensor.shape, tensor.dtype, tensor.device.type) == (shape, dtype, "cpu")
        assert tensor.is_contiguous() and tensor.storage_offset() == 0
        storage = tensor.untyped_storage()
        assert storage.nbytes() == tensor.nbytes
        plain = torch.empty(1)  # what BufferCache.in_use expects of a free buffer
        assert storage_use_count(storage) == storage_use_count(plain.untyped_storage()) == 2
        if tensor.nbytes:
            assert not storage.resizable()


_FREEING_A_STAGED_TENSOR = """
import anyio, contextlib, torch, astage

source = {f"t{i}": torch.randn(256) for i in range(64)}


def free(staged):
    with contextlib.suppress(RuntimeError):  # refused now: not resizable
        staged["t5"].untyped_storage().resize_(0)


def whole(staged):
    assert all(torch.equal(staged[key], source[key]) for key in source)


def sync_calls():
    with astage.SyncStager() as stager:
        for _ in range(3):
            staged = stager.stage(source)
        free(staged)
        for _ in range(3):
            staged = stager.stage(source)
        whole(staged)


async def async_calls():
    async with astage.Stager() as stager:
        for _ in range(3):
            staged = await stager.stage(source)
        free(staged)
        for _ in range(3):
            staged = await stager.stage(source)
        whole(staged)


sync_calls() if face == "sync" else anyio.run(async_calls)
"""


@pytest.mark.parametrize("face", ["sync", "async"])
def test_freeing_a_staged_tensor_the_usual_way_leaves_the_next_call_whole(face: str) -> None:
    # `staged.untyped_storage().resize_(0)` frees a tensor's memory; on a cached buffer it
    # shrank the buffer under the next call's copy, which wrote past its end (a segfault): run
    # in a process of its own, so that the suite sees a failure rather than dying.
    child = in_a_fresh_interpreter(f"face = {face!r}\n{_FREEING_A_STAGED_TENSOR}")
    assert child.returncode == 0, child.stderr[-2000:]


def test_a_tensor_whose_storage_was_freed_is_refused_naming_it(stager: Driver) -> None:
    # FSDP frees an unsharded parameter with `untyped_storage().resize_(0)`, leaving a tensor
    # whose metadata claims bytes its storage no longer has. Before, the buffer was grown to
    # the tensor's size and uninitialised memory was staged (the blocking face) or torch's raw
    # "not resizable" error came out.
    freed = torch.zeros(1000)
    freed.untyped_storage().resize_(0)
    base = torch.zeros(64)
    view = base[40:60]
    base.untyped_storage().resize_(100)  # shorter than the view reaches (240 bytes)
    for where, tensor, reached, holds in [("w", freed, 4000, 0), ("v", view, 240, 100)]:
        # An outcome as text: a failure report that showed the freed tensor would read it.
        state = {"layer": {where: tensor, "ok": torch.ones(3)}}
        outcome = outcome_of(functools.partial(stager.stage, state))
        assert outcome.startswith(f"UnstageableError: at ['layer']['{where}']: "), outcome
        assert f"reaches {reached} bytes of its storage, which holds {holds}" in outcome
    staged = stager.stage({"ok": torch.ones(3)})  # the stager goes on
    assert torch.equal(staged["ok"], torch.ones(3))


def test_clear_cache_after_resize_recovers(stager: Driver) -> None:
    weight = torch.zeros(8)
    source = {"w": weight}
    stager.stage(source)
    weight.untyped_storage().resize_(64)
    weight.set_(weight.untyped_storage(), 0, (16,), (1,))
    weight.fill_(3.0)
    stager.clear_cache()
    assert stager.cache_info().storages == 0
    staged = stager.stage(source)
    assert torch.equal(staged["w"], weight)
    assert stager.cache_info().nbytes == 64


def test_clear_cache_allocates_afresh(stager: Driver) -> None:
    source = {"w": torch.randn(16)}
    first = stager.stage(source)
    stager.clear_cache()
    second = stager.stage(source)
    assert storage_ptr(first["w"]) != storage_ptr(second["w"])
    assert torch.equal(first["w"], source["w"])  # the old result is still readable
    stats = stager.last_stats
    assert stats is not None and stats.new_nbytes == 64


def test_stats_of_first_and_cached_calls(stager: Driver) -> None:
    x, y = torch.randn(10), torch.randn(6)
    source = {"x": x, "x2": x, "y": y, "yv": y[1:]}
    stager.stage(source)
    first = stager.last_stats
    assert first is not None
    assert (first.storages, first.nbytes, first.new_nbytes) == (2, 64, 64)
    assert first.seconds >= 0
    stager.stage(source)
    second = stager.last_stats
    assert second is not None
    assert (second.storages, second.nbytes, second.new_nbytes) == (2, 64, 0)
    assert second.reused_fraction == 1.0
    assert first.reused_fraction == 0.0
    assert second.gb_per_s >= 0.0


def test_stats_count_tensors(stager: Driver) -> None:
    x = torch.randn(3)
    stager.stage({"x": x, "again": x, "y": torch.randn(2)})
    stats = stager.last_stats
    assert stats is not None
    assert stats.tensors == 3  # a tensor at two paths counts twice


@dataclasses.dataclass
class _Holder:
    weight: torch.Tensor


def test_stats_count_tensors_in_every_container(stager: Driver) -> None:
    # Regression: stage() counted only plain tensors met directly in a dict or list.
    x = torch.randn(3)
    stager.stage({"p": torch.nn.Parameter(torch.randn(2)), "t": (x,), "h": _Holder(x), "l": [x]})
    stats = stager.last_stats
    assert stats is not None
    assert stats.tensors == 4


def test_stats_before_any_call(stager: Driver) -> None:
    assert stager.last_stats is None
    assert stager.cache_info() == astage.CacheInfo(0, 0, 0)


def test_cache_is_per_stager(make_stager: object) -> None:
    source = {"w": torch.randn(8)}
    one, two = make_stager(), make_stager()  # type: ignore[operator]
    a, b = one.stage(source), two.stage(source)
    assert storage_ptr(a["w"]) != storage_ptr(b["w"])


def test_share_memory_option(make_stager: object) -> None:
    stager = make_stager(share_memory=True)  # type: ignore[operator]
    source = {"w": torch.randn(64), "v": torch.randn(8)}
    staged = stager.stage(source)
    assert staged["w"].is_shared() and staged["v"].is_shared()
    assert torch.equal(staged["w"], source["w"])


def test_cache_stays_consistent_after_a_failed_call(stager: Driver) -> None:
    good = {"w": torch.randn(8)}
    stager.stage(good)
    with pytest.raises(astage.UnstageableError):
        stager.stage({"w": good["w"], "n": torch.randn(4), "bad": torch.empty(2, device="meta")})
    staged = stager.stage(good)
    assert torch.equal(staged["w"], good["w"])
    info = stager.cache_info()
    assert info.storages in (1, 2)  # the storage met before the error may stay cached
    assert info.pinned_nbytes == 0


# -- consumers of a staged result do not leak into the next call --------------------------------


def test_attributes_set_on_the_first_result_do_not_leak(stager: Driver) -> None:
    source = {"w": torch.randn(4)}
    first = stager.stage(source)
    first["w"].consumer_note = "written by a checkpoint writer"
    assert not hasattr(stager.stage(source)["w"], "consumer_note")


def test_attributes_set_on_a_cached_result_do_not_leak(stager: Driver) -> None:
    # Regression: from the second call on, results shared the buffer's own view object.
    source = {"w": torch.randn(4)}
    stager.stage(source)
    second = stager.stage(source)  # a cached call
    second["w"].consumer_note = "written by a checkpoint writer"
    third = stager.stage(source)
    assert not hasattr(third["w"], "consumer_note")


@pytest.mark.parametrize("calls_before", [0, 1], ids=["first-result", "cached-result"])
def test_in_place_metadata_change_on_a_result_does_not_corrupt_the_next(
    stager: Driver, calls_before: int
) -> None:
    # Regression: a cached call handed out the previous result's tensor objects, so t_() on
    # result n gave result n+1 the consumer's strides.
    source = {"w": torch.arange(4.0).view(2, 2)}
    for _ in range(calls_before):
        stager.stage(source)
    result = stager.stage(source)
    result["w"].t_()  # the consumer's tensor to do with as it likes
    after = stager.stage(source)
    assert after["w"].stride() == source["w"].stride()
    assert torch.equal(after["w"], source["w"])


@pytest.mark.asyncio
async def test_clear_cache_is_refused_while_staging() -> None:
    async with astage.Stager() as stager:
        source = {f"w{i}": torch.randn(1 << 10) for i in range(4)}
        # Inside stage_iter's block the call is in progress, whatever the scheduling order.
        async with stager.stage_iter(source) as landed:
            async for _path, _tensor in landed:
                with pytest.raises(astage.BusyError):
                    stager.clear_cache()
        stager.clear_cache()
        assert stager.cache_info().storages == 0


# -- huge-page buffers (StagingOptions(huge_pages=)) --------------------------------------------

needs_thp = pytest.mark.skipif(
    not _arena.huge_pages_available(), reason="no transparent huge pages on this kernel"
)


@needs_thp
def test_huge_page_buffers_are_aligned_exact_and_staged(make_stager: object) -> None:
    stager = make_stager(huge_pages=True)  # type: ignore[operator]
    sd = {
        "big": torch.randn((2 << 20) // 4 + 3, dtype=torch.float32),
        "matrix": torch.randn(1024, 1024, dtype=torch.float64).t(),
        "small": torch.randn(10),
    }
    for _ in range(2):
        staged = stager.stage(sd)
        assert_tree_staged(staged, sd)
    for key in ("big", "matrix"):
        storage = staged[key].untyped_storage()
        assert storage.data_ptr() % _arena.HUGE_PAGE == 0, key
        assert storage.nbytes() == sd[key].untyped_storage().nbytes()  # no padding
    assert stager.last_stats is not None and stager.last_stats.new_nbytes == 0


def test_large_buffers_are_page_aligned_by_default(make_stager: object) -> None:
    # A writer sends page-aligned buffers to the file with O_DIRECT (no page-cache copy):
    # torch's allocator starts large blocks 64 bytes past a page.
    stager = make_stager()  # type: ignore[operator]
    sd = {
        "big": torch.randn((1 << 20) // 4 + 3, dtype=torch.float32),
        "matrix": torch.randn(512, 1024, dtype=torch.float64).t(),
        "small": torch.randn(10),
    }
    staged = stager.stage(sd)
    assert_tree_staged(staged, sd)
    for key in ("big", "matrix"):
        storage = staged[key].untyped_storage()
        assert storage.data_ptr() % 4096 == 0, key
        assert storage.nbytes() == sd[key].untyped_storage().nbytes()  # no padding


@needs_thp
def test_huge_pages_commit_no_more_than_the_bytes() -> None:
    """Only whole huge pages are advised: a tail of each buffer must not take a 2 MiB page."""
    sd = {f"w{i}": torch.ones((2 << 20) // 4 + 1024) for i in range(16)}  # 2 MiB + 4 KiB each
    nbytes = sum(t.nbytes for t in sd.values())

    def huge_kib() -> int:
        with open("/proc/self/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1])
        return 0

    with astage.SyncStager(huge_pages=True) as stager:
        before = huge_kib()
        stager.reserve(sd)
        grown = (huge_kib() - before) * 1024
    assert grown <= 1.05 * nbytes, f"{grown} bytes of huge pages for {nbytes} staged"


def test_huge_pages_auto_asks_the_probe_once(monkeypatch: pytest.MonkeyPatch) -> None:
    answers: list[bool] = []

    def probe() -> bool:
        answers.append(False)
        return False

    monkeypatch.setattr(_cache_module, "huge_pages_help", probe)
    cache = BufferCache(
        pin_memory=False, share_memory=False, pin_memory_min_bytes=0, huge_pages=None
    )
    sources = [torch.zeros(3 << 20, dtype=torch.uint8) for _ in range(3)]
    small = torch.zeros(16)
    cache.allocate(small.untyped_storage())
    assert answers == []  # a small buffer never needs the answer
    for source in sources:
        cache.allocate(source.untyped_storage())
    assert answers == [False]


def test_huge_pages_option_is_checked() -> None:
    with pytest.raises(astage.InvalidOptionsError, match="huge_pages"):
        astage.StagingOptions(huge_pages="yes")  # type: ignore[arg-type]
    assert astage.StagingOptions(huge_pages=None).resolve().huge_pages is None
