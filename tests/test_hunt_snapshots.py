"""A hunt on snapshots, leases, buffer sets, reserve() and the buffer cache.

Each test here failed (or hung, bounded by a timeout) before its fix; its comment says how.
"""

from __future__ import annotations

import gc
import threading
import weakref
from typing import Any

import anyio
import pytest
import torch
from conftest import in_a_forked_child

import astage
from astage._core import _cache


def _state() -> dict[str, torch.Tensor]:
    return {"w": torch.arange(16, dtype=torch.float32), "b": torch.ones(4)}


# -- leases a consumer dropped ------------------------------------------------------------------


@pytest.mark.parametrize("take", ["snapshot", "hold_buffers"])
def test_a_lease_collected_unreleased_frees_its_set(take: str) -> None:
    # Before: the stager kept every lease itself, so a snapshot (or hold) its consumer dropped
    # without release() (a writer that failed) held its buffer set for good: with buffers=1
    # the next stage() waited forever (here: LeaseTimeoutError) and close() hung. A private
    # lease nobody holds can never be released; collected, it now counts as released.
    state = _state()
    stager = astage.SyncStager()
    if take == "snapshot":
        stager.snapshot(state)
    else:
        stager.stage(state)
        stager.hold_buffers()
    gc.collect()
    staged = stager.stage(state, timeout=2.0)
    assert torch.equal(staged["w"], state["w"])
    stager.close()


def test_a_shared_lease_dropped_here_still_holds_its_set() -> None:
    # The other side of the fix above: a shared lease may have been sent to another process,
    # which releases it there; the parent dropping its own copy must not free the set.
    stager = astage.SyncStager(share_memory=True)
    snapshot = stager.snapshot(_state())
    flag = snapshot.lease._flag  # what a process it was sent to would release
    assert flag is not None  # a shared lease is a byte of shared memory
    del snapshot
    gc.collect()
    with pytest.raises(astage.LeaseTimeoutError):
        stager.stage(_state(), timeout=0.05)
    flag.fill_(1)  # the other process's release()
    stager.stage(_state(), timeout=2.0)
    stager.close()


# -- reserve() cut short ------------------------------------------------------------------------


class _Stop(Exception):
    pass


def _four_mib() -> dict[str, torch.Tensor]:
    return {f"t{index}": torch.full((1 << 18,), float(index)) for index in range(4)}


def _stop_at_first(done: int, total: int) -> None:
    raise _Stop


def test_a_reserve_cut_short_is_finished_by_the_next_reserve() -> None:
    # Before: a reserve() whose progress callback raised (or that was cancelled) after its
    # first batch left three buffers allocated but never touched, and the next reserve()
    # counted them as ready: Reservation(nbytes=0, buffers=0), so the first checkpoint paid
    # the page faults reserve() is there to take. Buffers a reserve allocated stay to be
    # touched until a reserve touches them or a call stages into them.
    state = _four_mib()
    with astage.SyncStager(chunk_bytes=1 << 20, max_inflight_bytes=1 << 20) as stager:
        with pytest.raises(_Stop):
            stager.reserve(state, progress=_stop_at_first)
        again = stager.reserve(state)
        assert (again.nbytes, again.buffers) == (3 << 20, 3)
        assert stager.reserve(state).nbytes == 0
        staged = stager.stage(state)
        assert stager.last_stats is not None and stager.last_stats.new_nbytes == 0
        assert all(torch.equal(staged[name], state[name]) for name in state)


@pytest.mark.asyncio
async def test_a_cancelled_reserve_is_finished_by_the_next_one() -> None:
    # Before: as above, on the async face, for a reserve() cancelled midway.
    state = _four_mib()
    async with astage.Stager(chunk_bytes=1 << 20, max_inflight_bytes=1 << 20) as stager:
        with anyio.CancelScope() as scope:
            await stager.reserve(state, progress=lambda done, total: scope.cancel())
        again = await stager.reserve(state)
        assert (again.nbytes, again.buffers) == (3 << 20, 3)
        staged = await stager.stage(state)
        assert all(torch.equal(staged[name], state[name]) for name in state)


def test_buffers_a_call_staged_into_are_never_touched_by_a_later_reserve() -> None:
    # The guard on the fix above: once a call staged into the buffers a cut-short reserve
    # left, they hold a result that someone may read, and a later reserve leaves them alone.
    state = _four_mib()
    with astage.SyncStager(chunk_bytes=1 << 20, max_inflight_bytes=1 << 20) as stager:
        with pytest.raises(_Stop):
            stager.reserve(state, progress=_stop_at_first)
        with stager.snapshot(state) as snapshot:
            assert stager.reserve(state).nbytes == 0
            assert all(torch.equal(snapshot.state_dict[name], state[name]) for name in state)


# -- timeouts ----------------------------------------------------------------------------------


def test_a_timeout_too_large_for_a_float_means_no_limit() -> None:
    # Before: stage(timeout=10**400) and Lease.wait(10**400) raised a raw OverflowError (the
    # deadline's sum, NaN check) where timeout=inf means no limit; now it means the same.
    with astage.SyncStager() as stager:
        stager.stage(_state(), timeout=10**400)
        hold = stager.hold_buffers()
        hold.release()
        assert hold.wait(10**400)


def test_a_timeout_behind_a_close_that_waits_for_a_lease_is_kept() -> None:
    # Before: with buffers=2 (a set free), a stage(timeout=0.05) behind a close() in another
    # thread that waited for a snapshot's release waited for that release, however long,
    # before it was refused as closed: the timeout bounded nothing. Now it is refused
    # (StagerClosedError, a call can never run there) once its timeout ran out.
    stager = astage.SyncStager(buffers=2)
    snapshot = stager.snapshot(_state())
    closer = threading.Thread(target=stager.close)
    closer.start()
    releaser = threading.Timer(2.0, snapshot.release)  # before the fix: the call's end
    releaser.start()
    try:
        while not stager._lock.locked():  # close() holds the stager's lock while it waits
            closer.join(0.001)
        with pytest.raises(astage.StagerClosedError, match="closing"):
            stager.stage(_state(), timeout=0.05)
        assert not stager.closed
    finally:
        releaser.cancel()
        snapshot.release()
        closer.join(5)
    assert stager.closed


def test_a_release_from_a_finalizer_in_the_waiting_thread_does_not_deadlock() -> None:
    # Before: the board that wakes waiters was a condition on a plain lock, which a waiting
    # thread holds for a moment around each wait. A release() run by that same thread in that
    # moment (a finalizer that releases, set off by the collector at the wait's allocation;
    # a signal handler) waited on the lock the thread itself held: a deadlock, forever. Here
    # the moment is held open by hand, in a thread of its own so that a hang cannot hang pytest.
    stager = astage.SyncStager()
    snapshot = stager.snapshot(_state())
    board = stager._sets.board

    def release_while_waiting() -> None:
        with board._changed:  # what LeaseBoard.pause holds around its wait
            snapshot.release()

    releaser = threading.Thread(target=release_while_waiting, daemon=True)
    releaser.start()
    releaser.join(5)
    assert not releaser.is_alive(), "release() deadlocked on the waiter's lock"
    stager.stage(_state(), timeout=2.0)
    stager.close()


# -- what a call keeps after it ended -----------------------------------------------------------


@pytest.mark.asyncio
async def test_a_stage_iter_block_lets_go_of_the_state_dict_when_it_exits() -> None:
    # Before: the block's iterator (`landed`, still bound in the caller's frame after the
    # block) kept the call's state dict, so every source tensor stayed alive (device memory
    # too, for a state dict gathered for the save) with its host buffer cached, and it kept
    # the staged tensors that had landed but were never handed out, so that in_use() said the
    # buffers were in use. Now the block's exit lets go of both.
    async with astage.Stager() as stager:
        source = torch.randn(1000)
        source_ref = weakref.ref(source)
        async with stager.stage_iter({"x": source, "y": torch.randn(3)}) as landed:
            async for _path, tensor in landed:
                del tensor
                break
        del source
        gc.collect()
        assert source_ref() is None, "the finished block still keeps the source alive"
        assert not stager._cache.in_use()
        with pytest.raises(astage.UsageError):
            await landed.__anext__()


@pytest.mark.asyncio
async def test_a_snapshot_call_kept_by_its_caller_lets_go_of_the_state_dict() -> None:
    # Before: the object snapshot() returns kept the staged state dict (and the source's)
    # after it was awaited, so a caller that kept it (`call = stager.snapshot(sd)`) kept both
    # after the snapshot's release, which is to let go of them.
    async with astage.Stager() as stager:
        source = torch.randn(1000)
        source_ref = weakref.ref(source)
        call = stager.snapshot({"x": source})
        async with call as snapshot:
            staged_ref = weakref.ref(snapshot.state_dict["x"])
        del source, snapshot
        gc.collect()
        assert source_ref() is None and staged_ref() is None
        del call


# -- huge pages ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_the_huge_page_probe_never_runs_on_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: with huge_pages=None the probe (populating 32 MiB, 10-150 ms) ran where the walk
    # met its first buffer of 2 MiB or more: on the event loop, which it held that long. The
    # async face now asks it in a worker thread before its first walk.
    threads: list[int] = []

    def probe() -> bool:
        threads.append(threading.get_ident())
        return False

    monkeypatch.setattr(_cache, "huge_pages_help", probe)
    state = {"big": torch.ones(3 << 20, dtype=torch.uint8)}
    async with astage.Stager(huge_pages=None, buffers=2) as stager:
        staged = await stager.stage(state)
        assert torch.equal(staged["big"], state["big"])
        await stager.reserve(state)
        await stager.stage(state)
    assert threads and threading.get_ident() not in threads
    assert len(threads) == 2  # once per buffer set, as before (the real probe is cached)


# -- which set a hold leases --------------------------------------------------------------------


def _a_failed_call_then_a_hold(stage: Any, hold_buffers: Any) -> None:
    weight = torch.ones(8)
    good = stage({"w": weight})  # set 0
    with pytest.raises(astage.UnstageableError):
        stage({"w": weight, "lock": threading.Lock()})  # set 1, fails
    with hold_buffers():  # for `good`, the caller's last result
        weight.fill_(2.0)
        stage({"w": weight})
        assert torch.equal(good["w"], torch.ones(8)), "the held result was overwritten"


def test_a_hold_after_a_failed_call_holds_the_last_result() -> None:
    # Before: a call that failed (or was cancelled) had already made its buffer set the current
    # one, so with buffers=2 hold_buffers() leased the failed call's set, the rotation went on
    # past it, and the next call staged over the result the hold was taken for. A call without
    # a result now gives the current set back to the last call that had one.
    with astage.SyncStager(buffers=2) as stager:
        _a_failed_call_then_a_hold(stager.stage, stager.hold_buffers)


@pytest.mark.asyncio
async def test_a_hold_after_a_failed_async_call_holds_the_last_result() -> None:
    # Before: as above, on the async face.
    async with astage.Stager(buffers=2) as stager:
        weight = torch.ones(8)
        good = await stager.stage({"w": weight})
        with pytest.raises(astage.UnstageableError):
            await stager.stage({"w": weight, "lock": threading.Lock()})
        with stager.hold_buffers():
            weight.fill_(2.0)
            await stager.stage({"w": weight})
            assert torch.equal(good["w"], torch.ones(8)), "the held result was overwritten"


# -- a stager inherited by a forked child ---------------------------------------------------


def test_hold_buffers_in_a_forked_child_is_refused_rather_than_hanging() -> None:
    # Before: every call of a stager made before os.fork() was refused in the child, but
    # hold_buffers() handed out a lease on the parent's wake-up board, whose lock another
    # parent thread may have held at the fork: the child's release() then waited for that
    # thread, which does not exist there, forever. Now it is refused like the calls.
    stager = astage.SyncStager()
    stager.stage(_state())
    board = stager._sets.board
    holding = threading.Event()
    done = threading.Event()

    def waiter() -> None:  # a parent thread inside the board's lock at the fork
        with board._changed:
            holding.set()
            done.wait(10)

    thread = threading.Thread(target=waiter)
    thread.start()
    holding.wait(5)

    def child() -> int:
        try:
            stager.hold_buffers().release()
        except astage.UsageError as error:
            return 0 if "fork" in str(error) else 3
        return 2  # handed out a lease that, here, did not hang this time

    code = in_a_forked_child(child)
    done.set()
    thread.join(5)
    assert code == 0, f"the child's hold_buffers() hung or was not refused (exit code {code})"
    stager.close()


def test_a_progress_that_cannot_be_called_is_refused_before_reserving() -> None:
    # Before: reserve(progress=5) allocated every buffer, touched the first batch, then raised
    # a raw TypeError ("'int' object is not callable"). Now: InvalidOptionsError, up front.
    with astage.SyncStager() as stager:
        with pytest.raises(astage.InvalidOptionsError, match="progress"):
            stager.reserve(_state(), progress=5)  # type: ignore[arg-type]
        assert stager.cache_info().storages == 0


@pytest.mark.asyncio
async def test_an_async_progress_that_cannot_be_called_is_refused_before_reserving() -> None:
    # Before: as above, on the async face.
    async with astage.Stager() as stager:
        with pytest.raises(astage.InvalidOptionsError, match="progress"):
            await stager.reserve(_state(), progress="bytes")  # type: ignore[arg-type]
        assert stager.cache_info().storages == 0


@pytest.mark.asyncio
async def test_an_async_def_progress_is_refused() -> None:
    # Before: reserve(progress=an async def function) called it after each batch and dropped
    # the coroutine it made: no progress was ever shown, and every batch warned "coroutine
    # ... was never awaited". Now: InvalidOptionsError, before anything is allocated.
    async def progress(done: int, total: int) -> None:
        pass

    async with astage.Stager() as stager:
        with pytest.raises(astage.InvalidOptionsError, match="async def"):
            await stager.reserve(_state(), progress=progress)  # type: ignore[arg-type]
        assert stager.cache_info().storages == 0
