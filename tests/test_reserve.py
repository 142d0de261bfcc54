"""reserve(): every host buffer a state dict needs, allocated and touched before the first call.

Behaviour, not speed: after reserve() the first stage() allocates nothing and finds its
structure recorded; reserve never writes into a buffer that may hold staged bytes; progress
reaches the total; the async face keeps its loop free and can be cancelled.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

import anyio
import pytest
import torch
from conftest import Driver, assert_tree_staged, big_state_dict, model_state_dict, mutate_

import astage
from astage._devices._host import reserve_batch
from astage._drivers import _async

MiB = 1 << 20


def _reserve(
    driver: Driver, state_dict: Any, progress: Callable[[int, int], None] | None = None
) -> astage.Reservation:
    stager = driver.stager
    if driver.kind == "sync":
        result: astage.Reservation = stager.reserve(state_dict, progress=progress)
        return result

    async def reserve() -> astage.Reservation:
        reserved: astage.Reservation = await stager.reserve(state_dict, progress=progress)
        return reserved

    reserved: astage.Reservation = driver.run(reserve)
    return reserved


def _storage_bytes(state_dict: Any) -> int:
    seen: dict[int, int] = {}

    def visit(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            storage = x.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        elif isinstance(x, dict):
            for value in x.values():
                visit(value)
        elif isinstance(x, (list, tuple)):
            for value in x:
                visit(value)

    visit(state_dict)
    return sum(seen.values())


def test_first_call_after_reserve_allocates_nothing(make_stager: Callable[..., Driver]) -> None:
    driver = make_stager()
    sd = {**model_state_dict(), **big_state_dict(3, 256 * 1024, small=20)}
    seen: list[tuple[int, int]] = []
    reserved = _reserve(driver, sd, lambda done, total: seen.append((done, total)))
    nbytes = _storage_bytes(sd)
    assert reserved.nbytes == nbytes
    assert reserved.held_nbytes == nbytes == driver.cache_info().nbytes
    assert reserved.buffers == driver.cache_info().storages
    assert reserved.sets == 1
    assert reserved.pinned_nbytes == 0  # CPU sources are never pinned
    assert seen, "progress was never reported"
    assert seen[-1] == (nbytes, nbytes)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    assert driver.last_stats is None  # reserve is not a call

    staged = driver.stage(sd)
    assert_tree_staged(staged, sd)
    stats = driver.last_stats
    assert stats is not None
    assert stats.new_nbytes == 0
    assert stats.nbytes == nbytes


def test_reserve_records_the_structure_for_replay(make_stager: Callable[..., Driver]) -> None:
    driver = make_stager()
    sd = model_state_dict()
    _reserve(driver, sd)
    assert driver.stager._cache.replays, "reserve's walk recorded nothing"
    assert_tree_staged(driver.stage(sd), sd)


def test_reserve_covers_every_buffer_set(make_stager: Callable[..., Driver]) -> None:
    driver = make_stager(buffers=3)
    sd = big_state_dict(2, 64 * 1024, small=5)
    nbytes = _storage_bytes(sd)
    reserved = _reserve(driver, sd)
    assert reserved.sets == 3
    assert reserved.nbytes == reserved.held_nbytes == 3 * nbytes
    for _ in range(3):  # each call rotates to the next set: none of them allocates
        assert_tree_staged(driver.stage(sd), sd)
        stats = driver.last_stats
        assert stats is not None and stats.new_nbytes == 0


def test_reserve_again_commits_nothing(make_stager: Callable[..., Driver]) -> None:
    driver = make_stager()
    sd = model_state_dict()
    assert _reserve(driver, sd).nbytes > 0
    again = _reserve(driver, sd)
    assert again.nbytes == again.buffers == 0
    assert again.held_nbytes == _storage_bytes(sd)


def test_reserve_never_writes_into_staged_buffers(make_stager: Callable[..., Driver]) -> None:
    """A snapshot's bytes survive a reserve() of the same (changed, grown) state dict."""
    driver = make_stager(buffers=2)
    sd = big_state_dict(2, 64 * 1024, small=10)
    staged = driver.stage(sd)  # set 0 holds these bytes; nothing protects them but reserve's care
    expected = {key: value.clone() for key, value in sd.items() if key != "small"}
    mutate_(sd)
    sd["new"] = torch.full((1000,), 5.0)  # a tensor reserve must allocate in both sets
    reserved = _reserve(driver, sd)
    assert reserved.nbytes == _storage_bytes(sd) + 4000  # set 1 in full; set 0: only "new"
    for key, value in expected.items():
        assert torch.equal(staged[key], value), f"reserve() overwrote the staged {key!r}"


def test_closed_stager_refuses_reserve(make_stager: Callable[..., Driver]) -> None:
    driver = make_stager()
    if driver.kind == "sync":
        driver.stager.close()
    else:
        driver.run(driver.stager.aclose)  # the driver's loop stays up for the next call
    with pytest.raises(astage.StagerClosedError):
        _reserve(driver, model_state_dict())


def test_reserve_commits_no_more_host_memory_than_the_bytes() -> None:
    """Resident memory grows by at most 1.05x the staged bytes (buffers are touched, once)."""
    sd = big_state_dict(64, MiB)
    nbytes = _storage_bytes(sd)
    page = os.sysconf("SC_PAGE_SIZE")

    def resident() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * page

    with astage.SyncStager() as stager:
        before = resident()
        reserved = stager.reserve(sd)
        grown = resident() - before
        stager.stage(sd)
        after_stage = resident() - before
    assert reserved.nbytes == nbytes
    assert grown >= 0.9 * nbytes, "reserve() did not touch its buffers"
    assert after_stage <= 1.05 * nbytes


@pytest.mark.asyncio
async def test_async_reserve_touches_in_worker_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The touching (and pinning) never runs on the loop: only the walk does, in slices."""
    threads: list[int] = []
    touch = reserve_batch

    def recorded(*args: Any, **kwargs: Any) -> int:
        threads.append(threading.get_ident())
        return touch(*args, **kwargs)

    monkeypatch.setattr(_async, "reserve_batch", recorded)
    sd = await anyio.to_thread.run_sync(partial(big_state_dict, 4, MiB, small=3000))
    async with astage.Stager(chunk_bytes=MiB // 2, max_inflight_bytes=MiB) as stager:
        reserved = await stager.reserve(sd)
        assert reserved.nbytes == _storage_bytes(sd)
        assert len(threads) > 8
        assert threading.get_ident() not in threads
        await stager.stage(sd)
        assert stager.last_stats is not None and stager.last_stats.new_nbytes == 0


@pytest.mark.asyncio
async def test_cancelled_reserve_leaves_a_usable_stager() -> None:
    sd = await anyio.to_thread.run_sync(big_state_dict, 4, 4 * MiB)
    async with astage.Stager(chunk_bytes=MiB, max_inflight_bytes=MiB) as stager:
        seen: list[int] = []
        with anyio.CancelScope() as scope:

            def progress(done: int, total: int) -> None:
                seen.append(done)
                scope.cancel()  # after the first batch

            await stager.reserve(sd, progress=progress)
        assert scope.cancelled_caught
        assert len(seen) == 1 and seen[0] < _storage_bytes(sd)
        staged = await stager.stage(sd)
        assert_tree_staged(staged, sd)
        reserved = await stager.reserve(sd)
        assert reserved.nbytes == 0


@pytest.mark.cuda
def test_reserve_pins_buffers_of_cuda_sources() -> None:
    sd = {"w": torch.randn(1 << 20, device="cuda"), "b": torch.randn(8, device="cuda")}
    with astage.SyncStager(pin_memory=True, pin_memory_min_bytes=1024) as stager:
        reserved = stager.reserve(sd)
        assert reserved.pinned_nbytes == sd["w"].nbytes  # the tiny one stays pageable
        assert stager.cache_info().pinned_nbytes == sd["w"].nbytes
        staged = stager.stage(sd)
        assert stager.last_stats is not None and stager.last_stats.new_nbytes == 0
        assert torch.equal(staged["w"], sd["w"].cpu())
        assert torch.equal(staged["b"], sd["b"].cpu())


def test_reserve_shared_memory_buffers(make_stager: Callable[..., Driver]) -> None:
    driver = make_stager(share_memory=True)
    sd = big_state_dict(2, 64 * 1024, small=3)
    assert _reserve(driver, sd).nbytes == _storage_bytes(sd)
    staged = driver.stage(sd)
    assert_tree_staged(staged, sd)
    assert driver.last_stats is not None and driver.last_stats.new_nbytes == 0
    assert staged["big.0"].is_shared()
