"""The async face's copy lanes while a call runs: host batches queued for worker threads, the
loop lane, device batches, and how a call ends (an error, a cancellation, an early exit).

Each test here failed before its fix.
"""

from __future__ import annotations

import threading
from typing import Any

import anyio
import pytest
import torch
from conftest import assert_tree_staged, big_state_dict
from fake_accelerator import FakeAccelerator, FakeBackend
from test_host_batches import on_submit

import astage
from astage._devices._backend import installed
from astage._devices._host import run_host_batch
from astage._drivers import _async

KiB = 1 << 10
MiB = 1 << 20
WAIT_S = 5.0  # generous: only a broken lane waits this long


@pytest.mark.asyncio
@pytest.mark.parametrize("copy_threads", [1, 2])
async def test_a_failed_host_batch_starts_no_queued_one(
    monkeypatch: pytest.MonkeyPatch, copy_threads: int
) -> None:
    """A worker went on copying the queued batches after one failed, and told the loop only
    once the queue ran dry: a cached call whose fourth batch of 16 failed copied the twelve
    after it before raising (a 1 GiB call, all its bytes)."""
    batches, failing = 16, 4
    submitted: list[int] = []
    on_submit(monkeypatch, lambda inflight: submitted.append(inflight.batch.end))
    failed = threading.Event()
    copied: list[int] = []

    def run(batch: Any) -> None:
        if batch.end == failing:
            # Fails once every batch is queued: a lane that copied on would copy them all.
            deadline = WAIT_S
            while len(submitted) < batches and deadline > 0:
                failed.wait(0.001)
                deadline -= 0.001
            failed.set()
            raise OSError("the fourth batch failed")
        if batch.end > failing:
            # Another worker waits for the failure (copy_threads=2): what it copies after it.
            assert failed.wait(WAIT_S), "the failing batch never ran"
        run_host_batch(batch)
        copied.append(batch.end)

    source = big_state_dict(batches, 256 * KiB)
    async with astage.Stager(
        copy_threads=copy_threads,
        chunk_bytes=256 * KiB,
        max_inflight_bytes=8 * MiB,
        max_loop_hold_s=0.05,
    ) as stager:
        await stager.stage(source)
        monkeypatch.setattr(_async, "run_host_batch", run)
        submitted.clear()
        with anyio.fail_after(WAIT_S), pytest.raises(OSError, match="fourth batch failed"):
            await stager.stage(source)
        assert len(submitted) == batches
        after = [end for end in copied if end > failing]
        if copy_threads == 1:
            assert after == [], f"copied after the failure: {after}"
        else:
            # The other worker finishes the batch it holds (and, racing the failure, maybe
            # one more); the rest of the queue is dropped.
            assert len(after) <= 2, f"copied after the failure: {after}"
        monkeypatch.setattr(_async, "run_host_batch", run_host_batch)
        with anyio.fail_after(WAIT_S):
            staged = await stager.stage(source)
        assert_tree_staged(staged, source)


async def iterate_shielded_after_a_cancel(stager: astage.Stager, state: Any) -> Any:
    """Enter a stage_iter block, cancel a scope around it, then iterate under a shield (to
    finish the checkpoint begun): the iteration must end, with every tensor or with a
    StagingError that says what happened, and not wait forever. Returns what a call made
    afterwards staged (the stager stays usable)."""
    outcome = "hung"
    with anyio.CancelScope() as outer:
        async with stager.stage_iter(state) as landed:
            outer.cancel()
            with anyio.CancelScope(shield=True), anyio.move_on_after(WAIT_S):
                try:
                    async for _ in landed:
                        pass
                    outcome = "finished"
                except astage.StagingError as error:
                    outcome = str(error)
    assert outcome != "hung"
    if outcome != "finished":
        assert "cancel" in outcome and "stage_iter" in outcome, outcome
    with anyio.fail_after(WAIT_S):
        return await stager.stage(state)


@pytest.mark.asyncio
@pytest.mark.parametrize("copy_threads", [1, 2])
@pytest.mark.parametrize("walk_turns", ["one", "several"])
async def test_a_shielded_iteration_whose_copies_were_cancelled_raises_rather_than_hangs(
    copy_threads: int, walk_turns: str
) -> None:
    """A stage_iter block cancelled from outside, whose caller shields the iteration to
    finish it: the copies, tasks of the call started outside that shield, were cancelled
    before they ran, and the shielded iteration waited for them forever (every loop).

    With a walk of several turns, the copies are spawned after the loop has run: on asyncio,
    anyio had stopped delivering the cancellation by then (no unshielded task was left), and
    each copy task spun at its first checkpoint forever (see ``_async._born_cancelled``)."""
    source = big_state_dict(8, 256 * KiB)
    if walk_turns == "one":
        source["small"] = torch.arange(4.0)
        hold = 0.05
    else:
        source["small"] = [torch.arange(4.0) + i for i in range(3000)]
        hold = 1e-4
    async with astage.Stager(
        copy_threads=copy_threads, chunk_bytes=256 * KiB, max_loop_hold_s=hold
    ) as stager:
        assert_tree_staged(await iterate_shielded_after_a_cancel(stager, source), source)


@pytest.mark.asyncio
async def test_a_shielded_iteration_whose_device_copies_were_cancelled_raises() -> None:
    """The same with device batches: a device batch's task, cancelled before it enqueued,
    set its batch landed but neither done nor failed, and the shielded iteration spun. On
    asyncio the first walk's turns let anyio's delivery of the cancellation end before the
    device tasks were spawned; they then spun at their first checkpoint (every run, with
    anyio 4.16; one run in ten before)."""
    fake = FakeAccelerator(devices=1)
    device = fake.devices[0]
    try:
        state = {f"w{i}": device.tensor(torch.full((48 * KiB,), float(i))) for i in range(4)}
        with installed(FakeBackend(fake)):
            async with astage.Stager(copy_threads=1, chunk_bytes=256 * KiB) as stager:
                staged = await iterate_shielded_after_a_cancel(stager, state)
        for i in range(4):
            assert torch.equal(staged[f"w{i}"], torch.full((48 * KiB,), float(i)))
    finally:
        fake.close()
    assert fake.errors == []


@pytest.mark.asyncio
async def test_the_gil_hand_over_stays_within_a_short_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    """A replay's turn sleeps to hand the GIL to a copying worker (_async._hand_over_gil):
    0.1 ms, whatever the turn, so max_loop_hold_s=4e-5 held the loop 0.1 ms a turn."""
    hold = 4e-5
    sleeps: list[float] = []
    hand_over = _async._hand_over_gil

    def recorded(seconds: float) -> float:
        sleeps.append(seconds)
        return hand_over(seconds)

    # Large tensors (host lane, worker threads) copied while the replay walks the small ones.
    source: dict[str, Any] = {f"big.{i}": torch.full((128 * KiB,), float(i)) for i in range(16)}
    source.update({f"small.{i}": torch.full((4,), float(i)) for i in range(4000)})
    async with astage.Stager(copy_threads=1, chunk_bytes=512 * KiB, max_loop_hold_s=hold) as stager:
        for _ in range(2):
            await stager.stage(source)
        monkeypatch.setattr(_async, "_hand_over_gil", recorded)
        staged = await stager.stage(source)
    assert sleeps, "no hand-over happened: the test no longer covers it"
    assert max(sleeps) <= hold / 2
    assert_tree_staged(staged, source)
