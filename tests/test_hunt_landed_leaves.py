"""A hunt of stage_iter's part-at-a-time hand-out, the Python-flag leases and the restore's
one-thread rule for small jobs.

Differential and stress tests against plain references: every tensor a stage_iter block (or
the compat layer's landing stager) hands out is compared with its source as it was when the
call was made, at the moment it is handed out, with host copies slowed at random on several
worker threads so that batches land out of order, and with ``LEAF_STEP`` cut down so that
the run orders its leaves in many parts. None of them failed on the code as found; each
comment says what it guards.
"""

from __future__ import annotations

import functools
import gc
import os
import random
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from conftest import derandomized, same_values
from fake_accelerator import FakeAccelerator
from hypothesis import given
from hypothesis import strategies as st

import astage
from astage._core import _run
from astage._devices._host import run_host_batch
from astage._drivers import _async
from astage._files import _restore
from astage.compat._storage_writer import _LandingStager

# -- helpers -------------------------------------------------------------------------------------


def _slow_host_copies(monkeypatch: pytest.MonkeyPatch, seed: int, most_s: float = 0.002) -> None:
    """Host batches sleep a random while before they copy: with several copy threads they land
    out of order, and a tensor handed out before its copy landed reads stale bytes."""
    rng = random.Random(seed)
    lock = threading.Lock()
    real = run_host_batch

    def slow(batch: Any) -> None:
        with lock:
            pause = rng.random() * most_s
        time.sleep(pause)
        real(batch)

    monkeypatch.setattr(_async, "run_host_batch", slow)


def _state(rng: random.Random, count: int) -> dict[str, torch.Tensor]:
    """Small tensors with what breaks copy order: the same tensor at two paths, views of one
    storage, size-0 tensors, and large ones that a small ``chunk_bytes`` slices."""
    state: dict[str, torch.Tensor] = {}
    pool: list[torch.Tensor] = []
    for i in range(count):
        kind = rng.random()
        if kind < 0.1 and pool:
            state[f"same{i}"] = rng.choice(pool)
        elif kind < 0.18:
            state[f"empty{i}"] = torch.empty(0, 3)
        elif kind < 0.28 and pool:
            base = rng.choice(pool)
            state[f"view{i}"] = base[1:] if base.numel() > 2 else base
        elif kind < 0.33:
            state[f"big{i}"] = torch.randn(rng.randint(300, 3000))
        else:
            tensor = torch.randn(rng.randint(1, 8))
            pool.append(tensor)
            state[f"t{i}"] = tensor
    return state


def _bump(state: dict[str, torch.Tensor]) -> None:
    """Change every storage's values once, so that a cached call's stale bytes show."""
    seen: set[int] = set()
    for tensor in state.values():
        if tensor.numel() and tensor.untyped_storage().data_ptr() not in seen:
            seen.add(tensor.untyped_storage().data_ptr())
            tensor.add_(1)


def _values(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: tensor.clone() for key, tensor in state.items()}


# -- stage_iter: once each, only after landing, in copy order ------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("seed", range(4))
async def test_stage_iter_hands_out_each_tensor_once_after_it_landed(
    monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    # Guards Run.landed_leaves' part-at-a-time ordering (LEAF_STEP cut to 1-7 here) and its
    # bisection: first and replayed calls, shared tensors, views, size-0 tensors, sliced copies,
    # batches landing out of order on several threads. Each tensor must be handed out exactly
    # once, with the values its source had at the call, each part in copy order.
    rng = random.Random(seed)
    monkeypatch.setattr(_run, "LEAF_STEP", rng.choice([1, 2, 3, 7]))
    _slow_host_copies(monkeypatch, seed)
    state = _state(rng, rng.choice([40, 300]))
    orders: list[list[int]] = []
    real = _run.Run.landed_leaves

    def recorded(self: _run.Run[Any]) -> list[Any]:
        leaves = real(self)
        orders.append([leaf.last_copy for leaf in leaves])
        return leaves

    monkeypatch.setattr(_run.Run, "landed_leaves", recorded)
    async with astage.Stager(chunk_bytes=512, copy_threads=3) as stager:
        for call in range(3):
            _bump(state)
            expected = _values(state)
            orders.clear()
            seen: list[str] = []
            async with stager.stage_iter(state) as landed:
                async for path, tensor in landed:
                    assert torch.equal(tensor, expected[path[0]]), (call, path)
                    seen.append(path[0])
            assert sorted(seen) == sorted(state), call
            # Each part in copy order. Across parts, a leaf out of copy order (size-0, tied,
            # a view of an earlier storage) found in a later LEAF_STEP is handed out after
            # leaves with later copies: only once the parts before it have landed (the full
            # sort before this change handed it out first). A delay, never an early hand-out.
            assert all(part == sorted(part) for part in orders), call


@pytest.mark.asyncio
@pytest.mark.parametrize("count", [4096, 4097, 8193])
async def test_stage_iter_over_more_than_two_leaf_steps(count: int) -> None:
    # Guards the default LEAF_STEP's boundaries: 4096, one more, two steps and one more, with
    # a tensor tied at two far apart paths and size-0 tensors (out of copy order: the rest is
    # sorted at once), on a first and a replayed call.
    tied = torch.ones(2)
    tensors = [torch.full((2,), float(i)) for i in range(count)]
    tensors.insert(count // 2, tied)
    tensors.append(tied)
    tensors.insert(3, torch.empty(0))
    tensors.append(torch.empty(0))
    state = {"t": tensors}
    async with astage.Stager(chunk_bytes=256, copy_threads=2) as stager:
        for _ in range(2):
            for tensor in tensors:
                if tensor.numel():
                    tensor.add_(1)  # the tied one twice: fine, read at the call
            expected = [tensor.clone() for tensor in tensors]
            seen: list[int] = []
            async with stager.stage_iter(state) as landed:
                async for path, tensor in landed:
                    assert torch.equal(tensor, expected[path[1]]), path
                    seen.append(path[1])
            assert sorted(seen) == list(range(len(tensors)))


@pytest.mark.asyncio
@pytest.mark.parametrize("seed", range(3))
async def test_a_block_left_early_then_another_call(
    monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    # Guards a stage_iter block left by break, an exception or a cancellation, part way through
    # the parts: the next stage_iter / stage / snapshot on the same stager (replayed) hands out
    # every tensor once with the call's values, and a snapshot held over a call (buffers=2) is
    # not overwritten by it.
    rng = random.Random(seed)
    monkeypatch.setattr(_run, "LEAF_STEP", rng.choice([1, 3]))
    _slow_host_copies(monkeypatch, seed)
    state = _state(rng, 120)
    async with astage.Stager(chunk_bytes=256, copy_threads=2, buffers=2) as stager:
        for call in range(6):
            _bump(state)
            expected = _values(state)
            mode = ("full", "break", "raise", "cancel")[call % 4]
            stop_at = rng.randint(0, len(state) - 1)
            seen: list[str] = []
            with anyio.CancelScope() as scope:
                try:
                    async with stager.stage_iter(state) as landed:
                        async for path, tensor in landed:
                            assert torch.equal(tensor, expected[path[0]]), (call, mode, path)
                            seen.append(path[0])
                            if mode != "full" and len(seen) > stop_at:
                                if mode == "break":
                                    break
                                if mode == "raise":
                                    raise LookupError
                                scope.cancel()
                                await anyio.sleep(0)
                except LookupError:
                    pass
            assert len(set(seen)) == len(seen)
            if mode == "full":
                assert sorted(seen) == sorted(state)
            staged = await stager.stage(state)
            assert all(torch.equal(staged[key], expected[key]) for key in state)
            del staged
            async with stager.snapshot(state) as snap:
                kept = _values(state)
                _bump(state)
                staged = await stager.stage(state)  # the other set: no wait
                assert all(torch.equal(snap.state_dict[key], kept[key]) for key in state)
                assert all(torch.equal(staged[key], state[key]) for key in state)
                del staged


def _device_state(fake: FakeAccelerator, rng: random.Random, count: int) -> dict[str, Any]:
    first, second = fake.devices
    state: dict[str, Any] = {}
    for i in range(count):
        kind = rng.random()
        if kind < 0.4:
            state[f"a{i}"] = first.zeros(rng.randint(1, 40))
        elif kind < 0.55:
            state[f"b{i}"] = second.zeros(rng.randint(1, 300))
        elif kind < 0.6:
            state[f"e{i}"] = torch.empty(0)
        else:
            state[f"c{i}"] = torch.zeros(rng.randint(1, 40))
    keys = list(state)
    for i in range(count // 10):
        state[f"same{i}"] = state[rng.choice(keys)]
    return state


def _produce(fake: FakeAccelerator, state: dict[str, Any], value: float) -> None:
    """Fill every tensor with ``value``: a CPU one now, a device one when its stream gets there."""
    done: set[int] = set()
    for tensor in state.values():
        if id(tensor) in done or tensor.numel() == 0:
            continue
        done.add(id(tensor))
        if tensor.device.type == "cpu":
            tensor.fill_(value)
        else:
            stream = fake.device(tensor.device).current_stream()
            stream.enqueue(functools.partial(fake.host(tensor).fill_, value))


@pytest.mark.asyncio
@pytest.mark.asyncio_only("the fake accelerator's streams are tested on asyncio's legs")
async def test_stage_iter_mixing_device_and_host_batches(fake: FakeAccelerator) -> None:
    # Guards the landed frontier over device batches (on the fake's stream threads) between
    # host batches, with the run's leaves ordered a few at a time: nothing is handed out
    # before the producer's value has landed in it.
    for seed in range(3):
        rng = random.Random(seed)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(_run, "LEAF_STEP", rng.choice([1, 5]))
            state = _device_state(fake, rng, 150)
            async with astage.Stager(chunk_bytes=2048, copy_threads=2) as stager:
                for call in range(2):
                    value = float(10 * seed + call + 1)
                    _produce(fake, state, value)
                    seen: list[str] = []
                    async with stager.stage_iter(state) as landed:
                        async for path, tensor in landed:
                            assert tensor.device.type == "cpu"
                            assert bool(torch.all(tensor == value)), (seed, call, path)
                            seen.append(path[0])
                    assert sorted(seen) == sorted(state)


def test_compat_landing_stager_with_device_batches(
    fake: FakeAccelerator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The compat layer's counterpart of the test above: its blocking copy loop asks the run
    # again for the rest of what landed between batches.
    monkeypatch.setattr(_run, "LEAF_STEP", 2)
    state = _device_state(fake, random.Random(7), 150)
    stager = _LandingStager()
    try:
        for call in range(3):
            value = float(call + 1)
            _produce(fake, state, value)
            landed: list[bool] = []

            def check(t: torch.Tensor, landed: list[bool] = landed, value: float = value) -> None:
                landed.append(bool(torch.all(t == value)))

            stager.stage_and_hand_out(state, check)
            assert len(landed) == len(state) and all(landed), call
    finally:
        stager.close()


@derandomized("ASTAGE_HUNT_EXAMPLES", 25)
@given(
    seed=st.integers(0, 2**16),
    count=st.sampled_from([1, 5, 60, 400]),
    leaf_step=st.sampled_from([1, 2, 3, 7, 64]),
)
def test_compat_landing_stager_hands_out_each_tensor_once(
    seed: int, count: int, leaf_step: int
) -> None:
    # Guards astage.compat's _LandingStager: every staged tensor handed to the callback once
    # per path (the same tensor at two paths twice), each with its source's values at that
    # moment, over parts of at most LEAF_STEP more leaves.
    rng = random.Random(seed)
    state = _state(rng, count)
    stager = _LandingStager()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_run, "LEAF_STEP", leaf_step)
        try:
            for _ in range(2):
                _bump(state)
                handed: list[tuple[torch.Tensor, torch.Tensor]] = []

                def keep(t: torch.Tensor, handed: list[Any] = handed) -> None:
                    handed.append((t, t.clone()))

                staged = stager.stage_and_hand_out(state, keep)
                paths: dict[int, list[str]] = {}
                for key in state:
                    paths.setdefault(id(staged[key]), []).append(key)
                assert len(handed) == len(state)
                assert sorted(id(t) for t, _ in handed) == sorted(id(staged[k]) for k in state)
                for tensor, values in handed:
                    for key in paths[id(tensor)]:
                        assert torch.equal(values, state[key]), key
        finally:
            stager.close()


# -- leases: held ones are never overwritten nor handed out again ---------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("seed", range(3))
async def test_held_staged_tensors_are_never_handed_out_again(seed: int) -> None:
    # Guards replay's reuse of unheld staged tensors (_core/_reuse.py) beside the Python-flag
    # leases: a tensor the caller still holds (itself, or through a view) from a stage(), a
    # stage_iter() or a released snapshot is never the object a later call hands out.
    rng = random.Random(seed)
    state = {f"k{i}": torch.randn(rng.randint(2, 5)) for i in range(80)}
    for i in range(8):
        state[f"tied{i}"] = state[f"k{rng.randrange(80)}"]
    held: list[torch.Tensor] = []
    async with astage.Stager(buffers=rng.choice([1, 2])) as stager:
        for call in range(10):
            _bump(state)
            how = ("stage", "iter", "snapshot")[call % 3]
            out: list[torch.Tensor] = []
            if how == "stage":
                out = list((await stager.stage(state)).values())
            elif how == "iter":
                async with stager.stage_iter(state) as landed:
                    out = [tensor async for _, tensor in landed]
            else:
                async with stager.snapshot(state) as snap:
                    out = list(snap.state_dict.values())
            mine = {id(t) for t in held} | {id(t._base) for t in held if t._base is not None}
            assert not any(id(t) in mine for t in out), (call, how)
            for tensor in {id(t): t for t in out}.values():
                chance = rng.random()
                if chance < 0.1:
                    held.append(tensor)
                elif chance < 0.15:
                    held.append(tensor[1:])  # held through a view only
            del out
            if held and rng.random() < 0.3:
                held.pop(rng.randrange(len(held)))
            if call % 4 == 3:
                gc.collect()


def test_lease_released_from_another_thread_and_after_close() -> None:
    # Guards the Python-flag lease: released from another thread it wakes a waiting stage()
    # and close(); released twice, or again after close(), it is harmless; a held snapshot's
    # buffers are not staged into (buffers=1: the next call waits for the release).
    state = {"w": torch.arange(8.0)}
    stager = astage.SyncStager()
    snap = stager.snapshot(state)
    kept = snap.state_dict["w"].clone()
    with pytest.raises(astage.LeaseTimeoutError):
        stager.stage({"w": state["w"] + 1}, timeout=0.05)
    assert torch.equal(snap.state_dict["w"], kept)
    timer = threading.Timer(0.05, snap.release)
    timer.start()
    staged = stager.stage({"w": state["w"] + 1}, timeout=5.0)
    timer.join()
    assert snap.released and torch.equal(staged["w"], state["w"] + 1)
    with pytest.raises(astage.SnapshotReleasedError):
        _ = snap.state_dict
    hold = stager.hold_buffers()
    closer = threading.Thread(target=stager.close)
    closer.start()
    time.sleep(0.05)
    assert closer.is_alive()  # close() waits for the hold
    threading.Thread(target=hold.release).start()
    closer.join(5.0)
    assert not closer.is_alive() and stager.closed
    hold.release()
    snap.release()
    assert hold.released and hold.wait(0) and snap.released


@pytest.mark.asyncio
async def test_aclose_waits_for_a_lease_released_from_a_thread() -> None:
    # Guards the async face's wait for a private (Python-flag) lease, released from a thread.
    stager = astage.Stager()
    snap = await stager.snapshot({"w": torch.ones(4)})
    timer = threading.Timer(0.05, snap.release)
    timer.start()
    with anyio.fail_after(5):
        await stager.aclose()
    timer.join()
    assert stager.closed and snap.released
    snap.release()


# -- restore: small jobs on one thread, the same bytes --------------------------------------------


def _mixed_state(rng: random.Random, small: int, huge: int) -> dict[str, Any]:
    dtypes = [torch.float32, torch.int8, torch.bfloat16, torch.complex64, torch.bool]
    state: dict[str, Any] = {}
    for i in range(small):
        dtype = rng.choice(dtypes)
        shape = (rng.randint(0, 3), rng.randint(1, 5))
        tensor = torch.randn(shape, dtype=dtype) if dtype.is_complex else torch.randn(shape)
        state[f"s{i}"] = tensor if dtype.is_complex else (tensor * 10).to(dtype)
    for i in range(huge):
        state[f"h{i}"] = torch.randn(rng.randint(20_000, 60_000))
    state["n"] = 7
    return state


def _empty_like(rng: random.Random, state: dict[str, Any]) -> dict[str, Any]:
    into: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            into[key] = 0
        elif value.dim() == 2 and rng.random() < 0.3:  # a non-contiguous destination
            into[key] = torch.zeros(value.shape[1], value.shape[0], dtype=value.dtype).t()
        else:
            into[key] = torch.zeros_like(value)
    return into


@pytest.mark.parametrize(("small", "huge"), [(3000, 1), (300, 3), (5, 2), (2000, 0)])
def test_restore_of_tiny_and_huge_tensors_gives_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small: int, huge: int
) -> None:
    # Guards the one-thread rule for small jobs (SMALL_JOB_SHARE) against load(): both sides
    # of the rule, with pieces cut small and the probe on, give load()'s bytes.
    monkeypatch.setattr(_restore, "PIECE_BYTES", 64 << 10)
    monkeypatch.setattr(_restore, "PROBED_FROM_BYTES", 256 << 10)
    monkeypatch.setattr(_restore, "PROBE_BYTES", 64 << 10)
    rng = random.Random(small + huge)
    state = _mixed_state(rng, small, huge)
    path = tmp_path / "mixed.safetensors"
    astage.save_sync(state, path)
    for share in (_restore.SMALL_JOB_SHARE, 1):  # as found, and always on four threads
        monkeypatch.setattr(_restore, "SMALL_JOB_SHARE", share)
        into = _empty_like(rng, state)
        assert astage.load(path, into=into) is into
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                assert same_values(into[key], value), (share, key)
        assert into["n"] == 7


@pytest.mark.asyncio
async def test_load_async_of_tiny_and_huge_tensors_gives_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same through load_async (its poll runs between the pieces).
    monkeypatch.setattr(_restore, "PIECE_BYTES", 64 << 10)
    rng = random.Random(3)
    state = _mixed_state(rng, 1500, 2)
    path = tmp_path / "mixed.safetensors"
    astage.save_sync(state, path)
    into = _empty_like(rng, state)
    assert await astage.load_async(path, into=into) is into
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            assert same_values(into[key], value), key


def test_a_failed_small_read_names_the_file_and_leaves_plain_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Guards the error path of the one-thread rule: a read that comes up short part way
    # through thousands of small jobs raises CheckpointFormatError naming the file, and the
    # plain values (replaced only after every tensor landed) are left alone.
    state: dict[str, Any] = {f"s{i}": torch.full((3,), float(i)) for i in range(3000)}
    state["n"] = 5
    path = tmp_path / "small.safetensors"
    astage.save_sync(state, path)
    calls = 0
    real: Callable[..., int] = os.preadv

    def short(fd: int, buffers: Any, offset: int) -> int:
        nonlocal calls
        calls += 1
        return 0 if calls == 1500 else real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", short)
    into: dict[str, Any] = {f"s{i}": torch.zeros(3) for i in range(3000)}
    into["n"] = 0
    with pytest.raises(astage.CheckpointFormatError, match=path.name) as failed:
        astage.load(path, into=into)
    assert into["n"] == 0
    # And which tensor: a file cut short while it loads names the entry it failed in.
    assert re.search(r"\(header entry \"\['s\d+'\]\"\)$", str(failed.value)), failed.value


@pytest.mark.parametrize("into", [False, True], ids=["load", "load-into"])
def test_a_read_that_comes_up_short_names_the_header_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, into: bool
) -> None:
    # The file ends before its data (truncated after its header was checked): the error
    # named the file only, not the tensor whose bytes were missing.
    state = {"first": torch.ones(4), "second.weight": torch.arange(1000.0)}
    path = tmp_path / "cut.safetensors"
    astage.save_sync(state, path)
    real: Callable[..., int] = os.preadv

    def short(fd: int, buffers: Any, offset: int) -> int:
        # The second tensor's bytes are missing (it lies after the first in the file).
        return 0 if sum(len(b) for b in buffers) >= 4000 else real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", short)
    target = {"first": torch.zeros(4), "second.weight": torch.zeros(1000)} if into else None
    with pytest.raises(astage.CheckpointFormatError) as failed:
        astage.load(path, into=target)
    message = str(failed.value)
    assert path.name in message and "(header entry \"['second.weight']\")" in message, message
