"""The async face's loop lane: small host copies of a cached call, copied on the loop's thread
in pieces that fit its turns (``_async._LoopLane``)."""

from __future__ import annotations

import threading
import time
from typing import Any

import anyio
import pytest
import torch
from conftest import assert_tree_staged

import astage
from astage._devices._host import copy_host_piece, run_host_batch
from astage._drivers import _async
from astage._drivers._async import LOOP_LANE_LARGEST_COPY, LOOP_LANE_PIECE_S, _LoopLane


def optimizer_like(params: int = 2_000) -> dict[str, Any]:
    return {
        "state": {
            i: {"step": torch.tensor(float(i)), "exp_avg": torch.full((16,), float(i))}
            for i in range(params)
        }
    }


def refill(source: dict[str, Any], step: int) -> None:
    """New values in every moment (in place): what a cached call must stage this time."""
    for i, entry in source["state"].items():
        entry["exp_avg"].fill_(float(i + step))


class CopyThreads:
    """Which threads ran the loop lane's pieces and the worker lane's batches."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.pieces: list[tuple[int, int]] = []  # (thread, copies)
        self.batches: list[int] = []  # thread
        piece, batch = copy_host_piece, run_host_batch

        def counted_piece(b: Any, start: int, stop: int) -> None:
            self.pieces.append((threading.get_ident(), stop - start))
            piece(b, start, stop)

        def counted_batch(b: Any) -> None:
            self.batches.append(threading.get_ident())
            batch(b)

        self.counted_batch = counted_batch
        monkeypatch.setattr(_async, "copy_host_piece", counted_piece)
        monkeypatch.setattr(_async, "run_host_batch", counted_batch)

    def clear(self) -> None:
        self.pieces.clear()
        self.batches.clear()


@pytest.mark.asyncio
async def test_a_cached_calls_small_copies_run_on_the_loop_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = await anyio.to_thread.run_sync(optimizer_like)
    threads = CopyThreads(monkeypatch)
    loop_thread = threading.get_ident()
    async with astage.Stager() as stager:
        first = await stager.stage(source)
        # The first call fills fresh buffers: its copies take their page faults in worker
        # threads, never on the loop.
        assert threads.batches and not threads.pieces
        assert all(thread != loop_thread for thread in threads.batches)
        await anyio.to_thread.run_sync(assert_tree_staged, first, source)
        del first
        for step in range(3):
            threads.clear()
            await anyio.to_thread.run_sync(refill, source, step)
            staged = await stager.stage(source)
            assert not threads.batches, "a cached call's small copies went to a worker thread"
            assert {thread for thread, _ in threads.pieces} == {loop_thread}
            assert sum(copies for _, copies in threads.pieces) == 2 * len(source["state"])
            await anyio.to_thread.run_sync(assert_tree_staged, staged, source)


@pytest.mark.asyncio
async def test_large_copies_stay_in_worker_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    numel = 2 * LOOP_LANE_LARGEST_COPY // 4  # twice the largest copy the loop may make
    source = {f"w{i}": torch.full((numel,), float(i)) for i in range(4)}
    source.update({f"b{i}": torch.full((4,), float(i)) for i in range(8)})
    threads = CopyThreads(monkeypatch)
    async with astage.Stager() as stager:
        await stager.stage(source)
        threads.clear()
        staged = await stager.stage(source)
    assert threads.batches and all(t != threading.get_ident() for t in threads.batches)
    await anyio.to_thread.run_sync(assert_tree_staged, staged, source)


@pytest.mark.asyncio
async def test_pieces_shrink_to_fit_a_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    # Copies made slow on purpose (0.1 ms each): a piece of the first size (64 copies, 6.4 ms)
    # would hold the loop for many turns' worth; the lane halves its pieces until one takes
    # no longer than LOOP_LANE_PIECE_S, and keeps them there.
    per_copy_s = 1e-4
    sizes: list[int] = []
    piece = copy_host_piece

    def slow_piece(batch: Any, start: int, stop: int) -> None:
        sizes.append(stop - start)
        time.sleep(per_copy_s * (stop - start))
        piece(batch, start, stop)

    source = optimizer_like(300)
    async with astage.Stager() as stager:
        await stager.stage(source)
        monkeypatch.setattr(_async, "copy_host_piece", slow_piece)
        staged = await stager.stage(source)
    fitting = int(LOOP_LANE_PIECE_S / per_copy_s)  # 2 copies
    assert sizes[0] > fitting
    assert max(sizes[-10:]) <= fitting, sizes
    assert sum(sizes) == 600
    await anyio.to_thread.run_sync(assert_tree_staged, staged, source)


@pytest.mark.asyncio
async def test_a_piece_that_fails_fails_the_call_and_the_next_call_is_right(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = optimizer_like(500)
    piece = copy_host_piece
    calls = 0

    def failing_piece(batch: Any, start: int, stop: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("copy refused")
        piece(batch, start, stop)

    async with astage.Stager() as stager:
        await stager.stage(source)
        monkeypatch.setattr(_async, "copy_host_piece", failing_piece)
        with pytest.raises(RuntimeError, match="copy refused"):
            await stager.stage(source)
        staged = await stager.stage(source)
    await anyio.to_thread.run_sync(assert_tree_staged, staged, source)


@pytest.mark.asyncio
async def test_a_call_cancelled_between_its_pieces_leaves_the_stager_usable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = await anyio.to_thread.run_sync(optimizer_like)
    piece = copy_host_piece
    pieces = 0
    cancel_after = 0
    scope = anyio.CancelScope()

    def cancelling(batch: Any, start: int, stop: int) -> None:
        nonlocal pieces
        piece(batch, start, stop)
        pieces += 1
        if pieces == cancel_after:
            scope.cancel()  # on the loop's thread, inside the call's turn

    async with astage.Stager() as stager:
        await stager.stage(source)
        monkeypatch.setattr(_async, "copy_host_piece", cancelling)
        for cancel_after in (1, 2, 3, 5):  # a call here copies in 7 pieces or more
            pieces, finished = 0, False
            with anyio.CancelScope() as scope:
                await stager.stage(source)
                finished = True
            assert not finished and pieces >= cancel_after, (cancel_after, pieces, finished)
            staged = await stager.stage(source)
            await anyio.to_thread.run_sync(assert_tree_staged, staged, source)


@pytest.mark.asyncio
async def test_buffers_a_first_call_left_unwritten_are_not_copied_into_on_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A first call that ended before its copies (a stage_iter block left after its first
    tensor) allocated buffers it never wrote: the next call, which allocated nothing, copied
    into them on the loop's thread and took their page faults there."""
    source = await anyio.to_thread.run_sync(optimizer_like)
    threads = CopyThreads(monkeypatch)
    counted = threads.counted_batch
    closed = threading.Event()
    batches = 0

    def second_waits_for_the_close(batch: Any) -> None:
        # The worker copies its queue until it runs dry: the second batch holds it there
        # until the block's exit has dropped the queued ones.
        nonlocal batches
        batches += 1
        if batches == 2:
            assert closed.wait(5.0)
        counted(batch)

    close = _async._HostLane.close

    def closing(lane: Any) -> Any:
        dropped = close(lane)
        closed.set()
        return dropped

    monkeypatch.setattr(_async, "run_host_batch", second_waits_for_the_close)
    monkeypatch.setattr(_async._HostLane, "close", closing)
    async with astage.Stager(copy_threads=1, chunk_bytes=4096) as stager:
        async with stager.stage_iter(source) as landed:
            async for _ in landed:
                break  # the copies not started yet never run
        assert batches == 2, batches
        monkeypatch.setattr(_async, "run_host_batch", counted)
        threads.clear()
        staged = await stager.stage(source)
        assert stager.last_stats is not None and stager.last_stats.new_nbytes == 0
        assert not threads.pieces, "copies into buffers never written ran on the loop"
        await anyio.to_thread.run_sync(assert_tree_staged, staged, source)
        del staged
        threads.clear()
        staged = await stager.stage(source)  # every buffer written now: the loop lane again
        assert threads.pieces and not threads.batches
        await anyio.to_thread.run_sync(assert_tree_staged, staged, source)


def test_the_lane_takes_only_small_cpu_copies_into_touched_buffers() -> None:
    class FakePlan:
        new_buffers = 0

    def batch(largest: int | None, copies: int = 2, device: str = "cpu") -> Any:
        class FakeBatch:
            pass

        made = FakeBatch()
        made.largest = largest  # type: ignore[attr-defined]
        made.srcs = [None] * copies  # type: ignore[attr-defined]
        made.device = torch.device(device)  # type: ignore[attr-defined]
        return made

    class FakeCache:
        def __init__(self) -> None:
            self.untouched: dict[int, Any] = {}

    plan: Any = FakePlan()
    cache: Any = FakeCache()
    assert _LoopLane.takes(batch(64), plan, cache)
    assert _LoopLane.takes(batch(LOOP_LANE_LARGEST_COPY), plan, cache)
    assert not _LoopLane.takes(batch(LOOP_LANE_LARGEST_COPY + 1), plan, cache)
    assert not _LoopLane.takes(batch(None), plan, cache)  # sizes unknown
    # One copy: a slice of a large one.
    assert not _LoopLane.takes(batch(64, copies=1), plan, cache)
    assert not _LoopLane.takes(batch(64, device="meta"), plan, cache)
    cache.untouched = {1: None}  # a reserve() cut short left buffers never written
    assert not _LoopLane.takes(batch(64), plan, cache)
    cache.untouched = {}
    plan.new_buffers = 1  # fresh memory: its page faults are not the loop's to take
    assert not _LoopLane.takes(batch(64), plan, cache)
