"""The async face: lifecycle, stage_iter, several callers, holds, cancellation, loop lag.

Every test runs on asyncio, uvloop and trio (conftest's legs), so they use anyio's idioms.
"""

from __future__ import annotations

import functools
import gc
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio
import anyio.to_thread
import pytest
import pytest_asyncio
import torch
from conftest import (
    assert_staged,
    assert_tree_staged,
    big_state_dict,
    heartbeat,
    in_a_forked_child,
    iter_tensors,
    model_state_dict,
    mutate_,
    storage_ptr,
    tensors_of,
)
from test_sync import FakeStream, RecordingBackend

import astage
from astage._devices._backend import installed
from astage._devices._host import run_host_batch
from astage._drivers import _async
from astage._drivers._gc import gc_paused

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


async def test_a_call_inside_inference_mode_leaves_buffers_later_calls_can_use() -> None:
    """The async face's walk slices run outside the caller's ``torch.inference_mode()`` too:
    its buffers and staged tensors are normal ones, which later calls outside it copy into."""
    source = model_state_dict()
    async with astage.Stager() as stager:
        with torch.inference_mode():
            staged = await stager.stage(source)
            assert_tree_staged(staged, source)
            assert torch.is_inference_mode_enabled()  # the caller's mode, as it left it
        mutate_(source)
        for _ in range(2):  # a walk, then a replay
            staged = await stager.stage(source)
            assert_tree_staged(staged, source)
            assert not any(t.is_inference() for t in tensors_of(staged))
            for t in tensors_of(staged):
                t.add_(0)


async def test_a_default_device_does_not_move_the_staged_tensors() -> None:
    """The loop's thread may have a default device (see test_sync's test of the same name)."""
    source = model_state_dict()
    torch.set_default_device("meta")
    try:
        async with astage.Stager() as stager:
            for _ in range(2):  # a walk, then a replay
                staged = await stager.stage(source)
                assert {t.device.type for t in tensors_of(staged)} == {"cpu"}
                assert_tree_staged(staged, source)
    finally:
        torch.set_default_device(None)


async def test_aclose_then_stage_is_refused() -> None:
    stager = astage.Stager()
    await stager.stage({"w": torch.randn(3)})
    await stager.aclose()
    with pytest.raises(astage.StagerClosedError, match="this Stager is closed") as info:
        await stager.stage({"w": torch.randn(3)})
    assert isinstance(info.value, astage.AstageError)
    with pytest.raises(astage.StagerClosedError):
        async with stager.stage_iter({"w": torch.randn(3)}):
            pass
    with pytest.raises(astage.StagerClosedError):
        async with stager:
            pass
    assert stager.closed


async def test_aclose_twice_and_without_use() -> None:
    unused = astage.Stager()
    await unused.aclose()
    await unused.aclose()
    used = astage.Stager()
    source = {"w": torch.randn(3)}  # alive: its buffer stays in the cache until aclose()
    staged = await used.stage(source)
    assert used.cache_info().storages == 1
    await used.aclose()
    await used.aclose()
    for stager in (unused, used):
        assert stager.cache_info().storages == 0
        with pytest.raises(astage.StagerClosedError):
            await stager.stage({"w": torch.randn(3)})
    assert staged["w"].shape == (3,)  # a result outlives its stager's close


async def test_aclose_releases_the_cache_but_not_results() -> None:
    source = {"w": torch.randn(64)}
    stager = astage.Stager()
    staged = await stager.stage(source)
    assert stager.cache_info().storages == 1
    await stager.aclose()
    assert stager.cache_info() == astage.CacheInfo(0, 0, 0)
    assert torch.equal(staged["w"], source["w"])


async def test_aclose_leaves_no_thread_of_its_own() -> None:
    # Copies run in the event loop's anyio worker threads; the stager starts none itself.
    before = {t for t in threading.enumerate() if t.name.startswith("astage")}
    stager = astage.Stager()
    await stager.stage(big_state_dict(4, 1 * MiB))
    await stager.aclose()
    after = {t for t in threading.enumerate() if t.name.startswith("astage")}
    assert not {t for t in after - before if t.is_alive()}


async def test_aclose_waits_for_a_call_in_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    SlowHostCopies(monkeypatch, delay=0.01)
    source = big_state_dict(16, 1 * MiB)
    stager = astage.Stager(chunk_bytes=MiB, max_inflight_bytes=MiB)
    results: list[Any] = []

    async def stage() -> None:
        results.append(await stager.stage(source))

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(stage)
        await anyio.sleep(0.02)  # the call is copying now
        await stager.aclose()
        assert len(results) == 1
    assert_tree_staged(results[0], source)


async def test_stager_can_be_built_outside_a_loop() -> None:
    stager = await anyio.to_thread.run_sync(astage.Stager)  # no running loop in that thread
    try:
        source = {"w": torch.randn(5)}
        assert torch.equal((await stager.stage(source))["w"], source["w"])
    finally:
        await stager.aclose()


async def test_stager_serves_event_loops_in_turn() -> None:
    # One stager, used from this test's loop, then from loops of each backend in a worker
    # thread one after the other: a new turn makes its lock in the loop it runs on.
    source = model_state_dict()
    async with astage.Stager() as stager:
        assert_tree_staged(await stager.stage(source), source)
        for backend in ("asyncio", "trio"):
            staged = await anyio.to_thread.run_sync(
                functools.partial(anyio.run, stager.stage, source, backend=backend)
            )
            assert_tree_staged(staged, source)
        assert_tree_staged(await stager.stage(source), source)


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


async def _stage_all(stager: astage.Stager, sources: list[Any]) -> list[Any]:
    """Stage every source concurrently, from one task each; the results in order."""
    results: list[Any] = [None] * len(sources)

    async def stage(index: int) -> None:
        results[index] = await stager.stage(sources[index])

    async with anyio.create_task_group() as tasks:
        for index in range(len(sources)):
            tasks.start_soon(stage, index)
    return results


async def test_concurrent_calls_on_one_stager(stager: astage.Stager) -> None:
    sources = [model_state_dict(seed=1), model_state_dict(seed=2), big_state_dict(4, MiB)]
    for staged, source in zip(await _stage_all(stager, sources), sources, strict=True):
        assert_tree_staged(staged, source)


async def test_concurrent_calls_on_the_same_state_dict(stager: astage.Stager) -> None:
    source = model_state_dict()
    for staged in await _stage_all(stager, [source] * 4):
        assert_tree_staged(staged, source)


async def test_stage_error_names_path_and_stager_stays_usable(stager: astage.Stager) -> None:
    source = model_state_dict()
    source["optim"]["state"][3] = {"lock": threading.Lock()}
    with pytest.raises(astage.AstageError, match=r"\['optim'\]\['state'\]\[3\]\['lock'\]"):
        await stager.stage(source)
    del source["optim"]["state"][3]
    assert_tree_staged(await stager.stage(source), source)


# -- cancellation --------------------------------------------------------------------------------


class SlowHostCopies:
    """Host batches that take ``delay`` each in their worker thread, and when each one landed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, delay: float) -> None:
        self.delay = delay
        self.landed: list[float] = []
        self.started = 0
        monkeypatch.setattr(_async, "run_host_batch", self._run)

    def _run(self, batch: Any) -> None:
        self.started += 1
        time.sleep(self.delay)
        run_host_batch(batch)
        self.landed.append(time.perf_counter())


async def test_cancelled_call_returns_only_after_its_copies_landed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The call owns its copies: cancelled while copies run in worker threads, it returns once
    # they have landed, and no copy starts or lands after it returned.
    copies = SlowHostCopies(monkeypatch, delay=0.05)
    source = big_state_dict(16, 256 * 1024)
    async with astage.Stager(
        copy_threads=2, chunk_bytes=256 * 1024, max_inflight_bytes=MiB
    ) as stager:
        # Cancelled once the first copy has started (not after a fixed delay: on a loaded
        # machine the walk and the first allocations can outlast any fixed delay).
        with anyio.CancelScope() as scope:

            async def cancel_while_copying() -> None:
                while copies.started == 0:
                    await anyio.sleep(0.001)
                scope.cancel()

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(cancel_while_copying)
                await stager.stage(source)
        returned = time.perf_counter()
        assert scope.cancelled_caught
        assert copies.started >= 1
        assert len(copies.landed) == copies.started  # every started copy has landed ...
        started = copies.started
        await anyio.sleep(0.2)
        assert copies.started == started  # ... and none starts after the call returned
        assert all(landed <= returned for landed in copies.landed)
        assert started < 16  # the copies not started yet were dropped, not run
        assert stager.last_stats is None
        mutate_(source)
        with anyio.fail_after(5):
            assert_tree_staged(await stager.stage(source), source)


async def test_cancelled_call_leaves_cache_consistent() -> None:
    # Many batches: 64 x 4 MiB cut into 512 KiB slices; the small tensors keep the walk going
    # long enough that the cancellation lands while copies started by the walk are in flight.
    source = await anyio.to_thread.run_sync(big_state_dict, 64, 4 * MiB, 5000)
    async with astage.Stager(chunk_bytes=512 * 1024, max_inflight_bytes=2 * MiB) as stager:
        with anyio.move_on_after(0.005) as scope:
            await stager.stage(source)
        assert scope.cancelled_caught, "the call finished before it could be cancelled"
        await anyio.to_thread.run_sync(mutate_, source)  # new values: what the next call returns
        with anyio.fail_after(5):
            staged = await stager.stage(source)
        await anyio.to_thread.run_sync(assert_tree_staged, staged, source)
        info = stager.cache_info()
        assert info.storages == 64 + 5000
        assert info.nbytes == 64 * 4 * MiB + 5000 * 16
        assert info.pinned_nbytes == 0
        stats = stager.last_stats
        assert stats is not None
        assert (stats.storages, stats.nbytes) == (info.storages, info.nbytes)


async def test_cancel_while_batches_wait_for_a_thread_does_not_poison_the_stager(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Regression (from the executor days): cancelling the call cancelled a batch queued for a
    # copy thread; the next stage() and aclose() then raised a cancellation forever. Here the
    # single copy thread is slow, so batches queue on the host limiter when the cancel lands.
    SlowHostCopies(monkeypatch, delay=0.05)
    source = big_state_dict(8, MiB)
    stager = astage.Stager(copy_threads=1, chunk_bytes=MiB, max_inflight_bytes=4 * MiB)
    try:
        with anyio.move_on_after(0.02) as scope:
            await stager.stage(source)
        assert scope.cancelled_caught
        with anyio.fail_after(5):
            staged = await stager.stage(source)
        assert_tree_staged(staged, source)
    finally:
        with anyio.fail_after(5):
            await stager.aclose()


async def test_cancelled_stage_iter_then_stage(stager: astage.Stager) -> None:
    source = big_state_dict(16, MiB)
    with anyio.move_on_after(0.05) as scope:
        async with stager.stage_iter(source) as landed:
            async for _ in landed:
                await anyio.sleep(1)  # the consumer is slow; the cancel lands here
    assert scope.cancelled_caught
    with anyio.fail_after(5):
        staged = await stager.stage(source)
    assert_tree_staged(staged, source)


# -- several callers -------------------------------------------------------------------------------


async def _within_5_s(func: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    with anyio.fail_after(5):
        return await func(*args)


@pytest.mark.filterwarnings("ignore:The test <Function:pytest.PytestWarning")
def test_two_threads_event_loops_at_once_raise_busy_error() -> None:
    # Regression: one Stager used from two threads' event loops at once hung forever.
    source = big_state_dict(4, 64 * 1024)
    stager = astage.Stager()
    inside = threading.Event()
    leave = threading.Event()

    async def hold_the_stager() -> None:
        async with stager.stage_iter(source) as landed:
            async for _ in landed:
                pass
            inside.set()
            await anyio.to_thread.run_sync(leave.wait, 10)

    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(anyio.run, hold_the_stager)
        assert inside.wait(10)
        try:
            for backend in ("asyncio", "trio"):
                started = time.perf_counter()
                with pytest.raises(astage.BusyError, match="another thread's event loop"):
                    anyio.run(_within_5_s, stager.stage, source, backend=backend)
                assert time.perf_counter() - started < 1.0  # at once, not after a wait
                with pytest.raises(astage.BusyError):
                    anyio.run(stager.aclose)
        finally:
            leave.set()
        first.result(timeout=10)
    # Once the first loop's call is over, another loop may use the stager.
    assert_tree_staged(anyio.run(stager.stage, source), source)
    anyio.run(stager.aclose)


async def test_clear_cache_is_refused_during_a_call(stager: astage.Stager) -> None:
    source = {"w": torch.randn(8)}
    async with stager.stage_iter(source) as landed:
        with pytest.raises(astage.BusyError, match="clear_cache"):
            stager.clear_cache()
        async for _ in landed:
            pass
    stager.clear_cache()
    assert stager.cache_info().storages == 0


# -- buffer holds --------------------------------------------------------------------------------


async def test_a_hold_blocks_the_next_call_until_released(stager: astage.Stager) -> None:
    source = {"w": torch.zeros(16)}
    staged = await stager.stage(source)
    hold = stager.hold_buffers()
    results: list[Any] = []

    async def stage_again() -> None:
        results.append(await stager.stage({"w": torch.ones(16)}))

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(stage_again)
        await anyio.sleep(0.1)
        assert results == []  # waiting for the hold
        assert torch.equal(staged["w"], torch.zeros(16))  # the held buffer is untouched
        threading.Thread(target=hold.release).start()  # released from another thread
    assert torch.equal(results[0]["w"], torch.ones(16))
    hold.release()  # idempotent


async def test_released_holds_do_not_wait(stager: astage.Stager) -> None:
    with stager.hold_buffers() as hold:
        assert not hold.released
    assert hold.released
    with anyio.fail_after(5):
        await stager.stage({"w": torch.randn(4)})


async def test_cancelled_while_waiting_for_a_hold(stager: astage.Stager) -> None:
    hold = stager.hold_buffers()
    with anyio.move_on_after(0.1) as scope:
        await stager.stage({"w": torch.randn(4)})
    assert scope.cancelled_caught
    assert stager.last_stats is None
    hold.release()
    with anyio.fail_after(5):
        await stager.stage({"w": torch.randn(4)})


async def test_aclose_waits_for_holds_and_is_cancel_safe() -> None:
    stager = astage.Stager()
    source = {"w": torch.randn(64)}
    staged = await stager.stage(source)
    hold = stager.hold_buffers()
    with anyio.move_on_after(0.1) as scope:
        await stager.aclose()
    assert scope.cancelled_caught
    assert not stager.closed  # nothing was released by the cancelled close ...
    assert stager.cache_info().storages == 1
    hold.release()
    with anyio.fail_after(5):
        await stager.aclose()  # ... and a second aclose() finishes the job
    assert stager.closed
    assert stager.cache_info().storages == 0
    assert staged["w"].shape == (64,)


@pytest.fixture
def collector_off() -> Iterator[None]:
    """Hold CPython's cyclic collector off: with torch imported, one full collection takes
    ~100 ms here whoever triggers it, which would swamp what these tests measure."""
    gc.collect()
    with gc_paused():
        yield


LAG_TESTS_BLOCK = (
    "builds, collects and checks a 64-256 MiB state dict on the loop between the calls; the "
    "calls themselves are measured by the test's own heartbeat, with a stricter limit"
)


@pytest.mark.allow_blocking(LAG_TESTS_BLOCK)
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


@pytest.mark.allow_blocking(LAG_TESTS_BLOCK)
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
    async with stager.stage_iter(source) as landed:
        return [(path, tensor) async for path, tensor in landed]


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
    stager = astage.Stager(chunk_bytes=256 * 1024, max_inflight_bytes=MiB)
    async with stager, stager.stage_iter(source) as landed:
        async for path, tensor in landed:
            expected: torch.Tensor = source[path[0]] if len(path) == 1 else source[path[0]][path[1]]
            assert_staged(tensor, expected)  # checked as it arrives, not at the end


async def test_stage_iter_empty_and_scalar_tensors(stager: astage.Stager) -> None:
    source: dict[str, Any] = {"e": torch.empty(0), "s": torch.tensor(1.0), "n": 3}
    items = dict(await _collect(stager, source))
    assert set(items) == {("e",), ("s",)}
    assert_staged(items[("s",)], source["s"])


async def test_stage_iter_unstageable_raises_before_anything_is_yielded(
    stager: astage.Stager,
) -> None:
    source = {"first": torch.randn(3), "lock": threading.Lock(), "last": torch.randn(3)}
    got: list[Any] = []
    with pytest.raises(astage.UnstageableError, match=r"\['lock'\]"):
        async with stager.stage_iter(source) as landed:
            async for item in landed:
                got.append(item)
    assert got == []


async def test_stage_iter_block_left_early_releases_the_stager(stager: astage.Stager) -> None:
    source = big_state_dict(8, 256 * 1024, small=50)
    async with stager.stage_iter(source) as landed:
        async for _ in landed:
            break
    with anyio.fail_after(5):
        staged = await stager.stage(source)
        assert_tree_staged(staged, source)
        items = await _collect(stager, source)
    assert len(items) == 8 + 50


async def test_stage_iter_block_without_iterating(stager: astage.Stager) -> None:
    source = big_state_dict(8, 256 * 1024)
    async with stager.stage_iter(source):
        pass
    with anyio.fail_after(5):
        assert_tree_staged(await stager.stage(source), source)
    assert stager.last_stats is not None


async def test_error_in_the_block_reaches_the_caller_as_itself(stager: astage.Stager) -> None:
    # The block runs inside the call's task group; its error must not come out wrapped in an
    # ExceptionGroup, and the stager must be free afterwards.
    source = big_state_dict(8, 256 * 1024)
    with pytest.raises(KeyError, match="consumer"):
        async with stager.stage_iter(source) as landed:
            async for _ in landed:
                raise KeyError("consumer")
    with anyio.fail_after(5):
        assert_tree_staged(await stager.stage(source), source)


async def test_iterating_after_the_block_is_refused(stager: astage.Stager) -> None:
    source = big_state_dict(4, 64 * 1024)
    async with stager.stage_iter(source) as landed:
        pass
    with pytest.raises(astage.UsageError, match="block has exited"):
        await landed.__anext__()


async def test_stage_inside_own_stage_iter_is_refused_not_a_deadlock(
    stager: astage.Stager,
) -> None:
    # The block holds the stager; staging again from the same task could never proceed.
    source = big_state_dict(4, 64 * 1024)
    with anyio.fail_after(5):
        with pytest.raises(astage.UsageError, match="stage_iter"):
            async with stager.stage_iter(source) as landed:
                async for _ in landed:
                    await stager.stage(source)
        staged = await stager.stage(source)
    assert_tree_staged(staged, source)


async def test_stage_from_another_task_waits_for_the_block(stager: astage.Stager) -> None:
    source = big_state_dict(4, 64 * 1024)
    results: list[Any] = []

    async def stage() -> None:
        results.append(await stager.stage(source))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tasks, stager.stage_iter(source) as landed:
            async for _ in landed:
                if not results and not tasks.cancel_scope.cancel_called:
                    tasks.start_soon(stage)
                    await anyio.sleep(0.01)
                    assert results == []  # serialized behind the block, not refused
                    break
    assert_tree_staged(results[0], source)


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
    with anyio.move_on_after(0.002):
        await stager.stage(big_state_dict(0, 0, small=5000))
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


# -- ordering taken at the call, and refusals (through an injected backend) ------------------------


async def test_stage_marks_the_producer_when_called_not_when_awaited() -> None:
    backend = RecordingBackend()
    with installed(backend):
        async with astage.Stager() as stager:
            pending = stager.stage({"w": torch.ones(3)})
            assert backend.marks == [(RecordingBackend.device, threading.get_ident())]
            staged = await pending
            async with stager.stage_iter({"w": torch.ones(2)}) as landed:
                assert len(backend.marks) == 2
                assert [path async for path, _ in landed] == [("w",)]
    assert torch.equal(staged["w"], torch.ones(3))


async def test_stage_called_in_another_thread_marks_that_thread() -> None:
    # run_coroutine_threadsafe(stager.stage(sd), loop) from a training thread: the coroutine is
    # made (and the producer marked) in the training thread, and runs on the loop.
    backend = RecordingBackend()
    with installed(backend):
        async with astage.Stager() as stager:
            made: list[Any] = []
            training = threading.Thread(target=lambda: made.append(stager.stage({"w": 1})))
            training.start()
            await anyio.to_thread.run_sync(training.join)
            assert await made[0] == {"w": 1}
    [(_, thread)] = backend.marks
    assert thread == training.ident
    assert thread != threading.get_ident()


async def test_staging_while_capturing_is_refused_at_the_call() -> None:
    backend = RecordingBackend(capturing=True)
    with installed(backend):
        async with astage.Stager() as stager:
            with pytest.raises(astage.UsageError, match=r"meta.*capturing a graph"):
                _ = stager.stage({"w": torch.ones(3)})
            with pytest.raises(astage.UsageError, match="capturing"):
                stager.stage_iter({"w": torch.ones(3)})
            assert stager.cache_info().storages == 0
            backend.capturing = False
            assert torch.equal((await stager.stage({"w": torch.ones(3)}))["w"], torch.ones(3))


async def test_after_is_checked_at_the_call() -> None:
    async with astage.Stager() as stager:
        with pytest.raises(astage.InvalidOptionsError, match="after="):
            _ = stager.stage({}, after=torch.ones(1))
        with installed(RecordingBackend()):
            assert await stager.stage({"a": 1}, after=FakeStream()) == {"a": 1}


async def test_a_stager_from_before_a_fork_refuses_in_the_child() -> None:
    stager = astage.Stager()
    await stager.stage({"w": torch.ones(3)})

    def child() -> None:
        for call in (stager.stage, stager.stage_iter):
            with pytest.raises(astage.UsageError, match=r"before os\.fork"):
                call({"w": torch.ones(3)})

    assert await anyio.to_thread.run_sync(in_a_forked_child, child) == 0
    await stager.stage({"w": torch.ones(3)})  # the parent's stager still works
    await stager.aclose()
