"""The async driver: lifecycle, stage_iter, concurrency, cancellation and event-loop lag."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import pytest_asyncio
import torch
from conftest import (
    assert_staged,
    assert_tree_staged,
    big_state_dict,
    heartbeat,
    iter_tensors,
    model_state_dict,
    mutate_,
    storage_ptr,
)

import astage

pytestmark = pytest.mark.asyncio

MiB = 1 << 20


@pytest_asyncio.fixture
async def stager() -> AsyncIterator[astage.Stager]:
    async with astage.Stager() as stager:
        yield stager


# -- lifecycle ----------------------------------------------------------------------------------


async def test_async_with_stages_and_closes() -> None:
    source = model_state_dict()
    async with astage.Stager() as stager:
        staged = await stager.stage(source)
        assert_tree_staged(staged, source)
    with pytest.raises(astage.StagerClosedError):
        await stager.stage(source)


async def test_aclose_then_stage_is_refused() -> None:
    stager = astage.Stager()
    await stager.stage({"w": torch.randn(3)})
    await stager.aclose()
    with pytest.raises(astage.StagerClosedError) as info:
        await stager.stage({"w": torch.randn(3)})
    assert isinstance(info.value, astage.AstageError)
    with pytest.raises(astage.AstageError):
        async for _ in stager.stage_iter({"w": torch.randn(3)}):
            pass
    with pytest.raises(astage.StagerClosedError):
        async with stager:
            pass


async def test_aclose_twice_and_without_use() -> None:
    unused = astage.Stager()
    await unused.aclose()
    await unused.aclose()
    used = astage.Stager()
    await used.stage({"w": torch.randn(3)})
    await used.aclose()
    await used.aclose()


async def test_aclose_releases_the_cache_but_not_results() -> None:
    source = {"w": torch.randn(64)}
    stager = astage.Stager()
    staged = await stager.stage(source)
    assert stager.cache_info().storages == 1
    await stager.aclose()
    assert stager.cache_info() == astage.CacheInfo(0, 0, 0)
    assert torch.equal(staged["w"], source["w"])


async def test_aclose_stops_copy_threads() -> None:
    before = {t for t in threading.enumerate() if t.name.startswith("astage")}
    stager = astage.Stager()
    await stager.stage(big_state_dict(4, 1 * MiB))
    await stager.aclose()
    after = {t for t in threading.enumerate() if t.name.startswith("astage")}
    assert not {t for t in after - before if t.is_alive()}


async def test_aclose_waits_for_a_call_in_progress() -> None:
    source = big_state_dict(16, 1 * MiB)
    stager = astage.Stager(chunk_bytes=MiB, max_inflight_bytes=MiB)
    task = asyncio.create_task(stager.stage(source))
    await asyncio.sleep(0)
    await stager.aclose()
    assert task.done()
    assert_tree_staged(task.result(), source)


async def test_stager_can_be_built_outside_a_loop() -> None:
    stager = await asyncio.to_thread(astage.Stager)  # no running loop in that thread
    try:
        source = {"w": torch.randn(5)}
        assert torch.equal((await stager.stage(source))["w"], source["w"])
    finally:
        await stager.aclose()


# -- stage ---------------------------------------------------------------------------------------


async def test_stage_copies_values(stager: astage.Stager) -> None:
    source = model_state_dict()
    staged = await stager.stage(source)
    expected = model_state_dict()
    mutate_(source)
    assert_tree_staged(staged, expected)


async def test_large_tensors_split_across_many_batches() -> None:
    # A small chunk size: each tensor is sliced, and several slices are in flight at once.
    source = {"a": torch.randn(3 * MiB // 4), "b": torch.randn(257, 1001).t(), "c": torch.ones(3)}
    async with astage.Stager(chunk_bytes=64 * 1024, max_inflight_bytes=256 * 1024) as stager:
        staged = await stager.stage(source)
        for key, value in source.items():
            assert_staged(staged[key], value)


async def test_last_stats(stager: astage.Stager) -> None:
    base = torch.randn(100)
    source = {"a": base, "b": base[10:], "c": torch.randn(20, dtype=torch.float64)}
    assert stager.last_stats is None
    await stager.stage(source)
    first = stager.last_stats
    assert first is not None
    assert (first.storages, first.nbytes, first.new_nbytes) == (2, 400 + 160, 560)
    await stager.stage(source)
    second = stager.last_stats
    assert second is not None
    assert (second.storages, second.nbytes, second.new_nbytes) == (2, 560, 0)
    assert second.seconds > 0


async def test_concurrent_calls_on_one_stager(stager: astage.Stager) -> None:
    a, b = model_state_dict(seed=1), model_state_dict(seed=2)
    c = big_state_dict(4, MiB)
    staged_a, staged_b, staged_c = await asyncio.gather(
        stager.stage(a), stager.stage(b), stager.stage(c)
    )
    assert_tree_staged(staged_a, a)
    assert_tree_staged(staged_b, b)
    assert_tree_staged(staged_c, c)


async def test_concurrent_calls_on_the_same_state_dict(stager: astage.Stager) -> None:
    source = model_state_dict()
    results = await asyncio.gather(*(stager.stage(source) for _ in range(4)))
    for staged in results:
        assert_tree_staged(staged, source)


async def test_stage_error_names_path_and_stager_stays_usable(stager: astage.Stager) -> None:
    source = model_state_dict()
    source["optim"]["state"][3] = {"lock": threading.Lock()}
    with pytest.raises(astage.AstageError, match=r"\['optim'\]\['state'\]\[3\]\['lock'\]"):
        await stager.stage(source)
    del source["optim"]["state"][3]
    assert_tree_staged(await stager.stage(source), source)


async def test_cancelled_call_leaves_cache_consistent() -> None:
    # Many batches: 64 x 4 MiB cut into 512 KiB slices; the small tensors keep the walk going
    # long enough that the cancellation lands while copies started by the walk are in flight.
    source = big_state_dict(64, 4 * MiB, small=5000)
    async with astage.Stager(chunk_bytes=512 * 1024, max_inflight_bytes=2 * MiB) as stager:
        task = asyncio.create_task(stager.stage(source))
        await asyncio.sleep(0.005)
        assert not task.done(), "the call finished before it could be cancelled"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        mutate_(source)  # new values: what the next call must return
        staged = await asyncio.wait_for(stager.stage(source), timeout=5)
        assert_tree_staged(staged, source)
        info = stager.cache_info()
        assert info.storages == 64 + 5000
        assert info.nbytes == 64 * 4 * MiB + 5000 * 16
        assert info.pinned_nbytes == 0
        stats = stager.last_stats
        assert stats is not None
        assert (stats.storages, stats.nbytes) == (info.storages, info.nbytes)


async def test_cancel_while_a_batch_is_queued_does_not_poison_the_stager() -> None:
    # Regression: cancelling the call cancelled the queued batch's concurrent future (through
    # asyncio.wrap_future); the next stage() and aclose() then raised CancelledError forever.
    source = big_state_dict(8, MiB)
    stager = astage.Stager(copy_threads=1, chunk_bytes=MiB, max_inflight_bytes=4 * MiB)
    # Hold the stager's single copy thread busy so that its batches wait in the queue:
    # the state a busy machine reaches by chance when a cancellation lands on a copy wait.
    gate = threading.Event()
    stager._executor = ThreadPoolExecutor(1, thread_name_prefix="astage-copy")
    stager._executor.submit(gate.wait, 5)
    try:
        task = asyncio.create_task(stager.stage(source))
        await asyncio.sleep(0.05)  # the walk is done; the call awaits its first, queued batch
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.set()
        try:
            staged = await asyncio.wait_for(stager.stage(source), timeout=5)
        except asyncio.CancelledError:
            raise AssertionError(
                "stage() raised CancelledError though nobody cancelled it"
            ) from None
        assert_tree_staged(staged, source)
    finally:
        gate.set()
        with contextlib.suppress(asyncio.CancelledError):
            await stager.aclose()


async def test_cancelled_stage_iter_then_stage(stager: astage.Stager) -> None:
    source = big_state_dict(16, MiB)

    async def consume() -> None:
        async for _ in stager.stage_iter(source):
            await asyncio.sleep(1)  # the consumer is slow; we cancel it here

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    staged = await asyncio.wait_for(stager.stage(source), timeout=5)
    assert_tree_staged(staged, source)


@pytest.fixture
def collector_off() -> Iterator[None]:
    """Hold CPython's cyclic collector off: with torch imported, one full collection takes
    ~100 ms here whoever triggers it, which would swamp what these tests measure."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@pytest.mark.usefixtures("collector_off")
async def test_event_loop_stays_responsive() -> None:
    # ~256 MiB in a few tensors plus 20,000 small ones: the loop must keep ticking.
    source = big_state_dict(4, 64 * MiB, small=20_000)
    async with astage.Stager() as stager:
        async with heartbeat() as first:
            await stager.stage(source)
        async with heartbeat() as cached:
            staged = await stager.stage(source)
    assert_tree_staged(staged, source)
    # Behaviour, not speed: a blocked loop would show lag of the whole call (hundreds of ms).
    assert first.max_lag < 0.1, f"first call: max loop lag {first.max_lag * 1e3:.0f} ms"
    assert cached.max_lag < 0.1, f"cached call: max loop lag {cached.max_lag * 1e3:.0f} ms"
    assert len(first.lateness) > 1 and len(cached.lateness) > 1


async def test_event_loop_stays_responsive_on_cached_calls_with_the_collector_on() -> None:
    # A cached call allocates next to nothing, so the collector has no reason to run either.
    source = big_state_dict(2, 32 * MiB, small=20_000)
    async with astage.Stager() as stager:
        await stager.stage(source)
        gc.collect()
        async with heartbeat() as cached:
            await stager.stage(source)
    assert cached.max_lag < 0.1, f"cached call: max loop lag {cached.max_lag * 1e3:.0f} ms"


# -- stage_iter ----------------------------------------------------------------------------------


async def _collect(stager: astage.Stager, source: Any) -> list[tuple[tuple[Any, ...], Any]]:
    return [(path, tensor) async for path, tensor in stager.stage_iter(source)]


async def test_stage_iter_yields_every_tensor_with_its_path(stager: astage.Stager) -> None:
    source = model_state_dict()
    items = await _collect(stager, source)
    expected = dict(iter_tensors(source))
    assert sorted(map(repr, (p for p, _ in items))) == sorted(map(repr, expected))
    for path, tensor in items:
        assert isinstance(path, tuple)
        assert_staged(tensor, expected[path])


async def test_stage_iter_tied_tensor_is_yielded_at_every_path(stager: astage.Stager) -> None:
    x = torch.randn(4)
    items = dict(await _collect(stager, {"a": x, "b": [x], "c": {"d": x}}))
    assert set(items) == {("a",), ("b", 0), ("c", "d")}
    assert items[("a",)] is items[("b", 0)] is items[("c", "d")]


async def test_stage_iter_paths_name_attributes(stager: astage.Stager) -> None:
    class Holder:
        def __init__(self) -> None:
            self.weight = torch.randn(3)

    holder = Holder()
    items = dict(await _collect(stager, {"h": holder}))
    assert list(items) == [("h", astage.Attr("weight"))]
    assert isinstance(next(iter(items))[1], astage.Attr)
    assert_staged(items[("h", "weight")], holder.weight)


async def test_stage_iter_tensors_have_landed_when_yielded() -> None:
    source = big_state_dict(8, MiB, small=100)
    async with astage.Stager(chunk_bytes=256 * 1024, max_inflight_bytes=MiB) as stager:
        async for path, tensor in stager.stage_iter(source):
            expected = source[path[0]] if len(path) == 1 else source[path[0]][path[1]]
            assert_staged(tensor, expected)  # checked as it arrives, not at the end


async def test_stage_iter_empty_and_scalar_tensors(stager: astage.Stager) -> None:
    source = {"e": torch.empty(0), "s": torch.tensor(1.0), "n": 3}
    items = dict(await _collect(stager, source))
    assert set(items) == {("e",), ("s",)}
    assert_staged(items[("s",)], source["s"])


async def test_stage_iter_unstageable_raises_before_anything_is_yielded(
    stager: astage.Stager,
) -> None:
    source = {"first": torch.randn(3), "lock": threading.Lock(), "last": torch.randn(3)}
    got: list[Any] = []
    with pytest.raises(astage.UnstageableError, match=r"\['lock'\]"):
        async for item in stager.stage_iter(source):
            got.append(item)
    assert got == []


async def test_stage_iter_break_early_then_stage_again(stager: astage.Stager) -> None:
    source = big_state_dict(8, 256 * 1024, small=50)
    async for _ in stager.stage_iter(source):
        break
    staged = await asyncio.wait_for(stager.stage(source), timeout=5)
    assert_tree_staged(staged, source)
    items = await asyncio.wait_for(_collect(stager, source), timeout=5)
    assert len(items) == 8 + 50


async def test_stage_iter_closed_explicitly_then_stage(stager: astage.Stager) -> None:
    source = big_state_dict(8, 256 * 1024)
    items = stager.stage_iter(source)
    async for _ in items:
        break
    await items.aclose()  # type: ignore[attr-defined]
    staged = await asyncio.wait_for(stager.stage(source), timeout=5)
    assert_tree_staged(staged, source)


async def test_stage_inside_own_stage_iter_is_refused_not_a_deadlock(
    stager: astage.Stager,
) -> None:
    # The iteration holds the stager; staging again from inside it could never proceed.
    source = big_state_dict(4, 64 * 1024)
    with pytest.raises(astage.AstageError, match="stage_iter"):
        async for _ in stager.stage_iter(source):
            await stager.stage(source)  # same task (wait_for would run it in another one)
    # Once the abandoned iteration is finalized, the stager works again.
    staged = await asyncio.wait_for(stager.stage(source), timeout=5)
    assert_tree_staged(staged, source)


async def test_stage_from_another_task_waits_for_an_iteration(stager: astage.Stager) -> None:
    source = big_state_dict(4, 64 * 1024)
    other: asyncio.Task[Any] | None = None
    async for _ in stager.stage_iter(source):
        if other is None:
            other = asyncio.create_task(stager.stage(source))
            await asyncio.sleep(0.01)
            assert not other.done()  # serialized behind the iteration, not refused
    assert other is not None
    assert_tree_staged(await asyncio.wait_for(other, timeout=5), source)


async def test_stage_iter_stats(stager: astage.Stager) -> None:
    x = torch.randn(4)
    items = await _collect(stager, {"a": x, "b": (x,), "c": torch.randn(2)})
    stats = stager.last_stats
    assert stats is not None
    assert stats.tensors == len(items) == 3
    assert stats.storages == 2


async def test_collector_is_left_enabled(stager: astage.Stager) -> None:
    # The walk pauses the cyclic collector; every way out of a call must turn it back on.
    assert gc.isenabled()
    await stager.stage(model_state_dict())
    assert gc.isenabled()
    with pytest.raises(astage.UnstageableError):
        await stager.stage({"w": torch.randn(2), "lock": threading.Lock()})
    assert gc.isenabled()
    task = asyncio.create_task(stager.stage(big_state_dict(0, 0, small=5000)))
    await asyncio.sleep(0.002)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert gc.isenabled()


async def test_stage_iter_and_stage_share_the_cache(stager: astage.Stager) -> None:
    source = {"w": torch.randn(32)}
    (_, first), *_ = await _collect(stager, source)
    second = await stager.stage(source)
    assert storage_ptr(first) == storage_ptr(second["w"])
    assert stager.cache_info().storages == 1


async def test_stage_iter_tensor_attribute_referring_to_itself(stager: astage.Stager) -> None:
    # Regression: raised KeyError from the leaf bookkeeping (stage() was fine).
    x = torch.randn(3)
    x.me = x  # type: ignore[attr-defined]
    items = dict(await _collect(stager, {"x": x}))
    assert items[("x",)].me is items[("x",)]
