"""Misuse of the drivers (the two stagers, leases, snapshots) that hung instead of refusing.

Each test here failed (or hung, bounded by a timeout) before its fix.
"""

from __future__ import annotations

import gc
import threading
import time

import anyio
import pytest
import torch
from conftest import in_a_forked_child

import astage
from astage._drivers._gc import gc_paused


def test_a_nan_timeout_is_refused_rather_than_waiting_forever() -> None:
    """NaN passed the ``timeout < 0`` check, and a deadline of NaN never came: the call
    waited for the lease forever instead of raising LeaseTimeoutError."""
    with astage.SyncStager() as stager:
        snapshot = stager.snapshot({"w": torch.ones(3)})
        released = threading.Timer(2.0, snapshot.release)  # ends the hang of the old code
        released.start()
        try:
            with pytest.raises(astage.InvalidOptionsError, match="timeout"):
                stager.stage({"w": torch.ones(3)}, timeout=float("nan"))
        finally:
            released.cancel()
            snapshot.release()
        assert snapshot.lease.wait(timeout=-1.0)  # released: a negative timeout only looks


def test_a_lease_wait_with_a_nan_timeout_is_refused() -> None:
    with astage.SyncStager() as stager:
        stager.stage({"w": torch.ones(3)})
        hold = stager.hold_buffers()
        released = threading.Timer(2.0, hold.release)  # ends the hang of the old code
        released.start()
        try:
            with pytest.raises(astage.InvalidOptionsError, match="timeout"):
                hold.wait(timeout=float("nan"))
            assert not hold.wait(timeout=0.0)
        finally:
            released.cancel()
            hold.release()


def test_a_call_from_inside_a_call_of_the_same_thread_is_refused() -> None:
    """A reserve() progress callback that stages on the same SyncStager waited on the
    stager's lock, held by its own thread, forever."""
    stager = astage.SyncStager()
    seen: list[BaseException] = []

    def progress(done: int, total: int) -> None:
        if seen:
            return
        # The old code hung here: bounded by a thread that times the call out.
        finished = threading.Event()

        def unstick() -> None:
            if not finished.wait(2.0):
                stager._lock.release()  # lets the hung call through, so the test can fail

        threading.Thread(target=unstick, daemon=True).start()
        try:
            stager.stage({"w": torch.ones(3)})
        except astage.UsageError as exc:
            seen.append(exc)
        finally:
            finished.set()

    stager.reserve({"big": torch.zeros(1 << 16)}, progress=progress)
    assert seen and "from inside one of its own calls" in str(seen[0])
    # The stager is fine afterwards, and the refusal left no caller counted.
    assert torch.equal(stager.stage({"w": torch.ones(3)})["w"], torch.ones(3))
    stager.close()
    assert stager.closed


def test_a_stage_iter_entered_twice_is_refused() -> None:
    """The second block of one stage_iter() call had a run that was never walked: its
    iteration waited forever."""

    async def main() -> None:
        async with astage.Stager() as stager:
            staging = stager.stage_iter({"a": torch.ones(2), "b": torch.zeros(3)})
            async with staging as landed:
                assert [path async for path, _ in landed] == [("a",), ("b",)]
            with anyio.fail_after(2):  # the old code hung here
                with pytest.raises(astage.UsageError, match="stage_iter"):
                    async with staging as landed:
                        [path async for path, _ in landed]
            # The refusal left the stager usable.
            staged = await stager.stage({"a": torch.ones(2)})
            assert torch.equal(staged["a"], torch.ones(2))

    anyio.run(main)


def test_close_in_a_forked_child_does_not_wait_for_a_parents_call() -> None:
    """A fork while another thread of the parent was inside a call copied the stager's lock
    taken: close() in the child waited for a thread that does not exist there, forever."""
    stager = astage.SyncStager()
    stager.stage({"w": torch.ones(3)})

    def child() -> None:
        stager.close()
        assert stager.closed
        with pytest.raises(astage.UsageError, match=r"before os\.fork"):
            stager.stage({"w": torch.ones(3)})

    with stager._lock:  # as a parent's thread inside stage() holds it
        code = in_a_forked_child(child)
    assert code == 0, f"the child's close() hung or failed (exit code {code})"
    assert torch.equal(stager.stage({"w": torch.ones(3)})["w"], torch.ones(3))  # parent: fine
    stager.close()


def test_aclose_in_a_forked_child_does_not_refuse_as_busy() -> None:
    """A fork while the parent's loop was inside a call left the call counted in the child:
    aclose() there raised BusyError (another thread's event loop) and never closed."""

    async def main() -> None:
        stager = astage.Stager()
        async with stager.stage_iter({"w": torch.ones(3)}) as landed:
            async for _ in landed:
                pass

            def child() -> None:
                # A thread of its own: the child inherited this thread's running loop.
                errors: list[BaseException] = []

                def run() -> None:
                    try:
                        anyio.run(stager.aclose)
                    except BaseException as exc:  # noqa: BLE001 - reported below
                        errors.append(exc)

                thread = threading.Thread(target=run)
                thread.start()
                thread.join()
                assert not errors, errors
                assert stager.closed

            code = await anyio.to_thread.run_sync(in_a_forked_child, child)
            assert code == 0, f"the child's aclose() failed or hung (exit code {code})"
        await stager.aclose()

    anyio.run(main)


def test_a_timeout_bounds_the_wait_behind_a_call_that_waits_for_a_release() -> None:
    """A SyncStager call with ``timeout=`` queued behind another thread's call that waits
    (without a timeout) for a snapshot's release waited on the stager's lock for as long,
    forever if the snapshot is never released, instead of raising LeaseTimeoutError."""
    stager = astage.SyncStager()
    snapshot = stager.snapshot({"w": torch.ones(3)})
    first = threading.Thread(target=stager.stage, args=({"w": torch.ones(3)},))
    first.start()  # waits for the release, inside the stager's lock
    while not stager._lock.locked():
        time.sleep(0.001)
    outcome: list[object] = []

    def second() -> None:
        try:
            outcome.append(stager.stage({"w": torch.ones(3)}, timeout=0.1))
        except astage.LeaseTimeoutError as exc:
            outcome.append(exc)

    behind = threading.Thread(target=second)
    behind.start()
    behind.join(2.0)  # the old code waited here for the release below
    try:
        assert outcome and isinstance(outcome[0], astage.LeaseTimeoutError), outcome
        assert "buffers=1" in str(outcome[0])
    finally:
        snapshot.release()
        first.join()
        behind.join()
    # The stager is fine afterwards: both waits let go of the lock.
    assert torch.equal(stager.stage({"w": torch.ones(3)}, timeout=0.0)["w"], torch.ones(3))
    # No limit, as before: the lock's wait is clamped to what threading accepts.
    for unbounded in (float("inf"), 1e300):
        assert torch.equal(
            stager.stage({"w": torch.ones(3)}, timeout=unbounded)["w"], torch.ones(3)
        )
    stager.close()


def test_a_child_forked_during_another_threads_walk_gets_its_collector_back() -> None:
    """The pause is process-wide and counted: a fork while another thread was inside it
    (a staging thread's walk while a DataLoader forks its workers) left the child with a
    caller that never leaves, so automatic collection stayed off for the child's whole life,
    its own stagers' calls included."""
    if not gc.isenabled() or gc.get_threshold()[0] == 0:
        pytest.skip("the collector is not running automatically here")
    threshold = gc.get_threshold()
    inside, leave = threading.Event(), threading.Event()

    def walking() -> None:
        with gc_paused():
            inside.set()
            leave.wait()

    walker = threading.Thread(target=walking)
    walker.start()
    inside.wait()

    def child() -> None:
        assert gc.get_threshold() == threshold, gc.get_threshold()
        with astage.SyncStager() as stager:  # the child's own calls pause and resume
            stager.stage({"w": torch.ones(3)})
        assert gc.get_threshold() == threshold, gc.get_threshold()

    try:
        assert gc.get_threshold()[0] == 0  # paused in the parent while the walker is inside
        code = in_a_forked_child(child)
    finally:
        leave.set()
        walker.join()
    assert code == 0, f"the child's collector stayed paused (exit code {code})"
    assert gc.get_threshold() == threshold  # the parent's walker resumed it as usual


def test_a_snapshot_released_in_a_forked_child_does_not_wait_for_the_parents_waiter() -> None:
    """A child forked with a snapshot (a writer process, ``share_memory=True``) inherited the
    lease's wake-up board, whose lock a parent's waiter takes every 10 ms: copied taken, the
    child's ``release()`` waited for it forever. The release reaches the parent through the
    shared byte, which its waiter polls."""
    stager = astage.SyncStager(share_memory=True)
    snapshot = stager.snapshot({"w": torch.ones(3)})

    def child() -> None:
        assert torch.equal(snapshot.state_dict["w"], torch.ones(3))
        snapshot.release()

    board = stager._sets.board
    with board._changed:  # as a parent's waiter holds it for a moment
        code = in_a_forked_child(child)
    assert code == 0, f"the child's release() hung or failed (exit code {code})"
    assert snapshot.released  # the shared byte: the parent sees the child's release
    assert torch.equal(stager.stage({"w": torch.zeros(3)}, timeout=1.0)["w"], torch.zeros(3))
    stager.close()


def test_an_infinite_loop_hold_is_refused() -> None:
    """``max_loop_hold_s=inf`` was accepted: the async face's walk then never yielded, holding
    the event loop for the whole call (NaN, zero and negatives were refused already)."""
    for hold in (float("inf"), -float("inf")):
        with pytest.raises(astage.InvalidOptionsError, match="finite"):
            astage.StagingOptions(max_loop_hold_s=hold)
        with pytest.raises(astage.InvalidOptionsError, match="max_loop_hold_s"):
            astage.StagingOptions().replace(max_loop_hold_s=hold)
    assert astage.StagingOptions(max_loop_hold_s=3600).max_loop_hold_s == 3600  # long: fine


@pytest.mark.asyncio
async def test_a_call_inside_its_own_stage_iter_block_is_named_in_the_refusal() -> None:
    """aclose(), reserve() and snapshot() inside the task's own stage_iter() block were
    refused as "stage() called from inside...", naming a call the caller never made."""
    async with astage.Stager() as stager:
        async with stager.stage_iter({"w": torch.ones(3)}) as landed:
            async for _ in landed:
                pass
            with pytest.raises(astage.UsageError, match=r"^aclose\(\) on this Stager"):
                await stager.aclose()
            with pytest.raises(astage.UsageError, match=r"^reserve\(\) on this Stager"):
                await stager.reserve({"w": torch.ones(3)})
            with pytest.raises(astage.UsageError, match=r"^snapshot\(\) on this Stager"):
                await stager.snapshot({"w": torch.ones(3)})
            with pytest.raises(astage.UsageError, match=r"^stage_iter\(\) on this Stager"):
                async with stager.stage_iter({"w": torch.ones(3)}):
                    pass
        assert not stager.closed  # the refused aclose() left it open and usable
        assert torch.equal((await stager.stage({"w": torch.ones(3)}))["w"], torch.ones(3))


@pytest.mark.asyncio
async def test_tensors_that_landed_are_not_handed_out_after_the_block() -> None:
    """An iteration abandoned inside a stage_iter() block and resumed after it handed out the
    tensors that had landed meanwhile, whose buffers the next call overwrites; only once
    those ran out was it refused."""
    state_dict = {f"t{i}": torch.full((4,), float(i)) for i in range(5)}
    async with astage.Stager() as stager:
        async with stager.stage_iter(state_dict) as landed:
            async for _ in landed:
                break
        handed_out = []
        with pytest.raises(astage.UsageError, match="block has exited"):
            async for path, _ in landed:
                handed_out.append(path)
        assert handed_out == []
