"""The async face's host batches: copied back to back by a worker, told to the loop as they land.

A cached call of many host batches used to hand each batch to a worker thread of its own, with a
loop turn between one batch's end and the next one's start (see ``_async._HostLane``). These
tests pin down what the lane promises: the next batch does not wait for the loop, a consumer of
``stage_iter`` still gets each batch's tensors as it lands, and a failing batch still fails its
call.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import torch
from conftest import assert_tree_staged, big_state_dict
from fake_accelerator import FakeAccelerator, FakeBackend

import astage
from astage._core._batches import MAX_BATCH_COPIES
from astage._core._recording import ReplayRecorder
from astage._devices._backend import enqueue_batch, installed
from astage._devices._host import copy_host_piece, run_host_batch
from astage._drivers import _async
from astage._torch import FOREACH_STEP, foreach_copy_

KiB = 1 << 10
MiB = 1 << 20
WAIT_S = 5.0  # generous: only a broken lane waits this long


class GatedCopies:
    """Host batches that record their order, the first one held until ``release`` is set."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.first_started = threading.Event()
        self.release = threading.Event()
        self.copied: list[int] = []
        self.all_copied = threading.Event()
        self.expected = 0
        monkeypatch.setattr(_async, "run_host_batch", self._run)

    def _run(self, batch: Any) -> None:
        if not self.copied:
            self.first_started.set()
            assert self.release.wait(WAIT_S), "the test never released the first batch"
        run_host_batch(batch)
        self.copied.append(batch.end)
        if len(self.copied) == self.expected:
            self.all_copied.set()


def eight_queued_batches(
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[GatedCopies, dict[str, torch.Tensor], astage.Stager]:
    """8 batches of 256 KiB, all cut before the first one lands (the budget holds them all),
    the first one held: the gate, the source, and a stager (not entered yet) that queues them."""
    copies = GatedCopies(monkeypatch)
    copies.expected = 8
    stager = astage.Stager(
        copy_threads=1, chunk_bytes=256 * KiB, max_inflight_bytes=8 * MiB, max_loop_hold_s=0.05
    )
    return copies, big_state_dict(8, 256 * KiB), stager


def on_submit(monkeypatch: pytest.MonkeyPatch, seen: Callable[[Any], object]) -> None:
    """Tell ``seen`` of every batch a call queues in its host lane, as it is queued."""
    submit = _async._HostLane.submit

    def watched(lane: Any, inflight: Any) -> bool:
        seen(inflight)
        return submit(lane, inflight)

    monkeypatch.setattr(_async._HostLane, "submit", watched)


async def first_batch_started(copies: GatedCopies) -> None:
    while not copies.first_started.is_set():
        await anyio.sleep(0.001)


@pytest.mark.asyncio
@pytest.mark.allow_blocking("holds the loop on purpose: the batches must not need it")
async def test_queued_host_batches_are_copied_while_the_loop_is_held(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    copies, source, stager = eight_queued_batches(monkeypatch)
    async with stager:
        copied_while_held: list[int] = []

        async def hold_the_loop() -> None:
            await first_batch_started(copies)
            copies.release.set()
            # Blocks the loop: batches that each needed a loop turn to start would stop here.
            copies.all_copied.wait(WAIT_S)
            copied_while_held.extend(copies.copied)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(hold_the_loop)
            staged = await stager.stage(source)
        assert len(copied_while_held) == 8, f"{len(copied_while_held)} of 8 ran while held"
        assert copies.copied == sorted(copies.copied)  # in the plan's order
        assert_tree_staged(staged, source)


async def all_queued_while_the_first_is_held(
    monkeypatch: pytest.MonkeyPatch, **options: Any
) -> None:
    """Stage the 8 batches of :func:`eight_queued_batches` with ``options``, the first one held
    until all 8 were queued in the host lane (or a while passed): all 8 must be, in order."""
    copies, source, _ = eight_queued_batches(monkeypatch)
    submitted: list[int] = []
    on_submit(monkeypatch, lambda inflight: submitted.append(inflight.batch.end))
    async with astage.Stager(copy_threads=1, chunk_bytes=256 * KiB, **options) as stager:
        queued_while_held = 0

        async def hold_the_first_batch() -> None:
            nonlocal queued_while_held
            try:
                await first_batch_started(copies)
                with anyio.move_on_after(WAIT_S):
                    while len(submitted) < 8:
                        await anyio.sleep(0.001)
                queued_while_held = len(submitted)
            finally:
                copies.release.set()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(hold_the_first_batch)
            staged = await stager.stage(source)
        assert queued_while_held == 8, f"{queued_while_held} of 8 queued before the first landed"
        assert copies.copied == sorted(copies.copied)
        assert_tree_staged(staged, source)


@pytest.mark.asyncio
async def test_batches_left_to_cut_after_the_walk_do_not_wait_for_a_landing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A turn of cutting that runs out of time (here: after each batch) with batches left
    # comes back for them on the next loop turn. Waiting for the first batch to land instead
    # left the worker with nothing queued after each batch.
    await all_queued_while_the_first_is_held(
        monkeypatch, max_inflight_bytes=8 * MiB, max_loop_hold_s=1e-9
    )


@pytest.mark.asyncio
async def test_host_batches_are_queued_past_the_in_flight_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # max_inflight_bytes bounds device copies: host batches copy into buffers that exist, and
    # the worker takes them one after another. Bounded too, a call queued the budget's worth,
    # and its worker ran dry and waited for the loop to queue the rest.
    await all_queued_while_the_first_is_held(
        monkeypatch, max_inflight_bytes=512 * KiB, max_loop_hold_s=0.05
    )


@pytest.mark.asyncio
async def test_device_batches_in_flight_stay_within_the_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    enqueued: list[int] = []

    def enqueue(backend: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
        enqueued.append(batch.end)
        return enqueue_batch(backend, batch, *args, **kwargs)

    monkeypatch.setattr(_async, "enqueue_batch", enqueue)
    fake = FakeAccelerator(devices=1)
    device = fake.devices[0]
    staging = device.staging
    try:
        # 192 KiB each: one per 256 KiB batch, whole (a fake device tensor cannot be sliced).
        state = {f"w{i}": device.tensor(torch.full((48 * KiB,), float(i))) for i in range(8)}
        with installed(FakeBackend(fake)):
            async with astage.Stager(
                copy_threads=1,
                chunk_bytes=256 * KiB,
                max_inflight_bytes=512 * KiB,  # two of those batches
                max_loop_hold_s=0.05,
            ) as stager:
                staging.gate.hold()  # no copy completes: the first two stay in flight
                try:
                    async with anyio.create_task_group() as tasks:
                        tasks.start_soon(stager.stage, state)
                        with anyio.move_on_after(WAIT_S):
                            while len(enqueued) < 2:
                                await anyio.sleep(0.001)
                        await anyio.sleep(0.1)  # time for a third, were it let through
                        in_flight = list(enqueued)
                        staging.gate.release()
                finally:
                    staging.gate.release()
                staged = await stager.stage(state)
        assert sorted(in_flight) == [1, 2]  # each its own task: on trio, in any order
        for i in range(8):
            assert torch.equal(staged[f"w{i}"], torch.full((48 * KiB,), float(i)))
    finally:
        staging.gate.release()
        fake.close()
    assert fake.errors == []


@pytest.mark.asyncio
async def test_a_first_calls_copies_start_while_its_recording_is_finished(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A first call starts no copy while its walk allocates buffers (see Run._allocating_walk);
    # its tail (the walk's tables emptied, the replay recording finished) allocates nothing,
    # so its copies start there rather than after it.
    events: list[str] = []
    on_submit(monkeypatch, lambda _: events.append("copy"))
    finish = ReplayRecorder.finish

    def finishing(recorder: ReplayRecorder) -> Any:
        recording = yield from finish(recorder)
        events.append("recorded")
        return recording

    monkeypatch.setattr(ReplayRecorder, "finish", finishing)
    source = {f"t{i}": torch.full((4,), float(i)) for i in range(3 * MAX_BATCH_COPIES)}
    async with astage.Stager(copy_threads=1, max_loop_hold_s=1e-9) as stager:
        staged = await stager.stage(source)
    assert "recorded" in events and "copy" in events
    assert events.index("copy") < events.index("recorded"), events[:5]
    assert_tree_staged(staged, source)


@pytest.mark.asyncio
async def test_a_cached_calls_copies_run_while_its_walk_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A worker thread waiting for the GIL never made the loop let go of it while the loop
    # walked (see _async._hand_over_gil): the copies all ran after the walk, every call. Small
    # copies into cached buffers are now the loop lane's (pieces between the walk's turns);
    # either way they must start before the walk ends.
    started: list[float] = []
    walked: list[float] = []

    def timed(batch: Any) -> None:
        started.append(time.perf_counter())
        run_host_batch(batch)

    def timed_piece(batch: Any, start: int, stop: int) -> None:
        started.append(time.perf_counter())
        copy_host_piece(batch, start, stop)

    walk = _async._Call._walk

    async def timed_walk(call: Any) -> None:
        await walk(call)
        walked.append(time.perf_counter())

    def optimizer_like() -> dict[int, dict[str, torch.Tensor]]:
        return {i: {"a": torch.full((4,), float(i)), "b": torch.zeros(8)} for i in range(10_000)}

    source = await anyio.to_thread.run_sync(optimizer_like)  # 0.3 s: not on the loop
    async with astage.Stager(copy_threads=1) as stager:
        # The first call records the structure, the second replays it and makes the checks
        # that the next replays reuse (its copies may run early: its turns are slower).
        for _ in range(2):
            await stager.stage(source)
        monkeypatch.setattr(_async, "run_host_batch", timed)
        monkeypatch.setattr(_async, "copy_host_piece", timed_piece)
        monkeypatch.setattr(_async._Call, "_walk", timed_walk)
        staged = await stager.stage(source)
    assert len(walked) == 1 and len(started) >= 5
    during = sum(start < walked[0] for start in started)
    assert during >= len(started) // 4, f"{during} of {len(started)} started before the walk ended"
    await anyio.to_thread.run_sync(assert_tree_staged, staged, source)  # 20,000 comparisons


@pytest.mark.asyncio
@pytest.mark.parametrize("walk", ["one turn", "several turns"])
async def test_stage_iter_hands_out_each_batch_as_it_lands(
    monkeypatch: pytest.MonkeyPatch, walk: str
) -> None:
    # With batches still queued, a plain call's worker tells the loop nothing before the queue
    # ran dry; a stage_iter consumer gets the first tensor anyway, while the second batch
    # waits for it. A walk of several turns, during which the first batch landed, held that
    # tensor back until the batch after the walk landed too (here: never).
    handed_out = threading.Event()
    started: list[int] = []

    def run(batch: Any) -> None:
        started.append(batch.end)
        if len(started) == 2:
            assert handed_out.wait(WAIT_S), "the first tensor was not handed out meanwhile"
        run_host_batch(batch)

    monkeypatch.setattr(_async, "run_host_batch", run)
    source: dict[str, Any] = big_state_dict(8, 256 * KiB)
    chunk, hold = 256 * KiB, 0.05
    if walk == "several turns":
        source = {f"s{i}": torch.full((16,), float(i)) for i in range(4000)}
        chunk, hold = 4 * KiB, 5e-4
    async with astage.Stager(
        copy_threads=1, chunk_bytes=chunk, max_inflight_bytes=2 * MiB, max_loop_hold_s=hold
    ) as stager:
        async with stager.stage_iter(source) as landed:
            paths = []
            async for path, _ in landed:
                paths.append(path)
                handed_out.set()
        assert len(paths) == len(source)
        assert handed_out.is_set()


@pytest.mark.asyncio
async def test_stage_iter_gives_the_loop_a_turn_while_it_hands_out_landed_tensors() -> None:
    # The tensors that landed during a turn were handed out with nothing awaited between
    # them: a consumer that awaits nothing of its own per tensor (astage.save queues each for
    # its writer's threads) held the loop for all of them, 150-185 ms over 20,000 tensors.
    source = {f"s{i}": torch.full((4,), float(i)) for i in range(3000)}
    turns = 0
    done = False

    async def other_task() -> None:
        nonlocal turns
        while not done:
            turns += 1
            await anyio.lowlevel.checkpoint()

    longest = run = 0
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(other_task)
        stager = astage.Stager(max_loop_hold_s=5e-4)
        async with stager, stager.stage_iter(source) as landed:
            seen = turns
            async for _ in landed:
                ends = time.perf_counter() + 2e-5  # a consumer's own work, ~20 us
                while time.perf_counter() < ends:
                    pass
                run = run + 1 if turns == seen else 1
                seen = turns
                longest = max(longest, run)
        done = True
    # 0.5 ms turns of ~20 us each: about 25 tensors a turn (a loaded machine: a few more).
    assert longest <= 250, f"{longest} tensors handed out with no other task run between"


@pytest.mark.asyncio
async def test_a_stage_iter_block_lets_go_of_its_tensors_in_turns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Leaving the block dropped the call's leaves and copies (every staged tensor it handed
    # out, and their sources) in one go: 10-13 ms of loop over 50,000 tensors.
    source = {f"s{i}": torch.full((4,), float(i)) for i in range(20_000)}
    yields = 0
    exiting = False
    yield_to_due_timers = _async._yield_to_due_timers

    async def counted() -> None:
        nonlocal yields
        yields += exiting
        await yield_to_due_timers()

    monkeypatch.setattr(_async, "_yield_to_due_timers", counted)
    stager = astage.Stager(max_loop_hold_s=2e-4)
    async with stager:
        async with stager.stage_iter(source) as landed:
            async for _ in landed:
                pass
            exiting = True
        exiting = False
    assert yields >= 2, yields


@pytest.mark.asyncio
async def test_failing_host_batch_fails_its_call_and_the_stager_stays_usable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def run(batch: Any) -> None:
        if batch.end == 3:
            raise OSError("the third batch failed")
        run_host_batch(batch)

    monkeypatch.setattr(_async, "run_host_batch", run)
    source = big_state_dict(8, 256 * KiB)
    async with astage.Stager(
        copy_threads=1, chunk_bytes=256 * KiB, max_inflight_bytes=8 * MiB
    ) as stager:
        with pytest.raises(OSError, match="the third batch failed"):
            await stager.stage(source)
        monkeypatch.setattr(_async, "run_host_batch", run_host_batch)
        with anyio.fail_after(WAIT_S):
            assert_tree_staged(await stager.stage(source), source)


@pytest.mark.asyncio
async def test_cancelled_call_starts_no_queued_host_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Cancelled while the first batch copies, with the others queued: the call returns once
    # that batch landed, and no queued batch starts, then or later.
    copies, source, stager = eight_queued_batches(monkeypatch)
    async with stager:
        scope = anyio.CancelScope()

        async def cancel_while_copying() -> None:
            await first_batch_started(copies)
            scope.cancel()
            await anyio.sleep(0.05)  # the call is cancelled, its first batch still copies
            copies.release.set()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(cancel_while_copying)
            with scope:
                await stager.stage(source)
        assert scope.cancelled_caught
        assert len(copies.copied) == 1  # the batch that ran has landed; no queued one ran
        await anyio.sleep(0.1)
        assert len(copies.copied) == 1
        with anyio.fail_after(WAIT_S):
            staged = await stager.stage(source)
        assert_tree_staged(staged, source)


@pytest.mark.asyncio
async def test_a_device_batch_is_not_held_up_behind_host_batches_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Host and device batches share copy_threads (one here). Each batch taking a thread in
    # turn, a device batch waited only for the host batches started before it; the lane's
    # worker gives way to it between two batches rather than copying its whole queue first.
    order: list[str] = []

    def slow_host(batch: Any) -> None:
        time.sleep(0.02)  # the device batch starts waiting meanwhile
        run_host_batch(batch)
        order.append(f"host {batch.end}")

    def enqueue(*args: Any, **kwargs: Any) -> Any:
        order.append("device")
        return enqueue_batch(*args, **kwargs)

    monkeypatch.setattr(_async, "run_host_batch", slow_host)
    monkeypatch.setattr(_async, "enqueue_batch", enqueue)
    fake = FakeAccelerator(devices=1)
    try:
        host = big_state_dict(6, 256 * KiB)
        state = {**dict(list(host.items())[:3]), "w": fake.devices[0].zeros(1024)}
        state.update(dict(list(host.items())[3:]))
        with installed(FakeBackend(fake)):
            async with astage.Stager(
                copy_threads=1,
                chunk_bytes=256 * KiB,
                max_inflight_bytes=8 * MiB,
                max_loop_hold_s=0.05,  # every batch started in the first turn
            ) as stager:
                staged = await stager.stage(state)
        # Before the host batches after it (on trio, whose scheduling order is random, maybe
        # before some of those before it too); the host batches in plan order.
        assert order.index("device") < order.index("host 5")
        assert [step for step in order if step != "device"] == [
            f"host {end}" for end in (1, 2, 3, 5, 6, 7)
        ]
        assert torch.equal(staged["big.4"], host["big.4"])
        assert staged["w"].device.type == "cpu"
    finally:
        fake.close()
    assert fake.errors == []


@pytest.mark.parametrize(("tell_each", "told"), [(False, []), (True, [[1], [2], [3]])])
def test_lane_tells_the_loop_when_dry_or_after_each_batch(
    monkeypatch: pytest.MonkeyPatch, tell_each: bool, told: list[list[int]]
) -> None:
    # A plain call's loop is told once the queue ran dry, through the worker's return (which
    # wakes it anyway), not after each batch; stage_iter's consumer is told of each batch.
    posted: list[list[int]] = []

    def post(callback: Any) -> None:
        posted.append([inflight.batch.end for inflight in callback.args[0]])

    ran: list[int] = []

    def copy(batch: _FakeBatch) -> None:
        assert not batch.cleared
        ran.append(batch.end)

    monkeypatch.setattr(_async, "run_host_batch", copy)
    lane = _async._HostLane(1, post, tell_each=tell_each)
    batches = [_FakeInFlight(end) for end in range(1, 5)]
    starts = [lane.submit(inflight) for inflight in batches]  # type: ignore[arg-type]
    assert starts == [True, False, False, False]  # one worker for the whole queue
    untold = lane.copy_queued()
    assert ran == [1, 2, 3, 4]
    assert posted == told
    assert [inflight.batch.end for inflight in untold] == ([4] if tell_each else [1, 2, 3, 4])
    assert all(inflight.finished for inflight in batches)
    # Each batch's tensors dropped by the worker once copied, not all at once by the loop's
    # reap at the end (2 ms of loop over 50,000 small tensors).
    assert all(inflight.batch.cleared for inflight in batches)


class _FakeBatch:
    def __init__(self, end: int) -> None:
        self.end = end
        self.nbytes = 1
        self.cleared = False

    def clear(self) -> None:
        self.cleared = True


class _FakeInFlight:
    """What the lane reads and writes of an in-flight batch."""

    def __init__(self, end: int) -> None:
        self.batch = _FakeBatch(end)
        self.serial = end
        self.finished = False
        self.error: Exception | None = None


def _timed_steps(clock: list[float], cost_s: float, count: int) -> Any:
    """A walk of ``count`` steps, each ``cost_s`` long on ``clock``."""
    for _ in range(count):
        clock[0] += cost_s
        yield


def _slices(monkeypatch: pytest.MonkeyPatch, cost_s: float, count: int) -> list[float]:
    """How long each slice of ``_walk_for`` held the loop, on a clock the steps move."""
    clock = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    walk = _timed_steps(clock, cost_s, count)
    held = []
    while True:
        start = clock[0]
        done = _async._walk_for(walk, 0.0005)
        held.append(clock[0] - start)
        if done:
            return held


def test_a_slice_does_not_start_a_step_that_would_end_past_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Steps of 0.3 ms: a slice that looked at the clock only after each step ran two of them
    # (0.6 ms over a 0.5 ms slice); one as long as the last would end past it: one a slice.
    assert max(_slices(monkeypatch, 0.0003, 10)) == pytest.approx(0.0003)
    # Short steps still fill the slice: 100 of 10 us in 3 slices, not one per step.
    held = _slices(monkeypatch, 0.00001, 100)
    assert len(held) <= 3 and max(held) <= 0.0005 + 1e-9


def test_a_host_batch_gives_torch_at_most_foreach_step_tensors_a_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The binding converts the lists under the GIL: a call over a whole batch (1,024 tensors)
    # held it long enough to keep an event loop in another thread waiting (see foreach_copy_).
    copy = torch._foreach_copy_
    calls: list[int] = []

    def watched(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
        calls.append(len(srcs))
        copy(dsts, srcs)

    monkeypatch.setattr(torch, "_foreach_copy_", watched)
    sources = {f"t{i}": torch.full((3,), float(i)) for i in range(1000)}
    with astage.SyncStager() as stager:
        staged = stager.stage(sources)
    assert calls == [FOREACH_STEP, FOREACH_STEP, FOREACH_STEP, 1000 - 3 * FOREACH_STEP]
    assert_tree_staged(staged, sources)
    calls.clear()
    dsts = [torch.zeros(3) for _ in range(FOREACH_STEP)]
    foreach_copy_(dsts, list(sources.values())[:FOREACH_STEP])
    assert calls == [FOREACH_STEP] and torch.equal(dsts[-1], sources[f"t{FOREACH_STEP - 1}"])
