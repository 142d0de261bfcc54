"""Snapshots and leases: a staged state dict stays valid while its consumer reads it.

The issue's case: ``stage()``, then ``torch.save`` of the result in a thread (or in a writer
process, with ``share_memory=True``), then the next ``stage()``: the file must hold the first
step's values. A snapshot leases its buffer set; the next call waits for the release
(``buffers=1``) or stages into another set (``buffers=2``), on both faces.
"""

from __future__ import annotations

import functools
import pickle
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
import torch
import torch.multiprocessing as mp

import astage

SLOW_WRITE_S = 0.3  # how long the writer waits before it reads: the window an overwrite needs


class Model:
    """A training state whose tensors are updated in place, as an optimizer step does: the
    stager finds the same source storages every step and reuses their buffers."""

    def __init__(self) -> None:
        self.w = torch.zeros(1 << 16)
        self.b = torch.zeros(4)

    def at(self, value: float) -> dict[str, Any]:
        """The state dict with every element set to ``value``."""
        self.w.fill_(value)
        self.b.fill_(value)
        return {"w": self.w, "b": self.b, "step": value}


MODEL = Model()


def step(value: float) -> dict[str, Any]:
    """The shared model's state dict at ``value`` (the same storages every time)."""
    return MODEL.at(value)


def assert_step(state_dict: Any, value: float) -> None:
    assert state_dict["step"] == value
    for name in ("w", "b"):
        assert torch.all(state_dict[name] == value), (name, state_dict[name][:4], value)


def slow_save(snapshot: astage.Snapshot, path: Path, delay_s: float = SLOW_WRITE_S) -> None:
    """A writer that starts late (a busy disk): it reads the snapshot, saves it, releases it."""
    time.sleep(delay_s)
    torch.save(snapshot.state_dict, path)
    snapshot.release()


# -- the case on the blocking face ------------------------------------------------------


def test_sync_next_stage_waits_for_a_writer_thread(tmp_path: Path) -> None:
    path = tmp_path / "step1.pt"
    with astage.SyncStager() as stager:
        snap = stager.snapshot(step(1.0))
        writer = threading.Thread(target=slow_save, args=(snap, path))
        writer.start()
        started = time.perf_counter()
        staged = stager.stage(step(2.0))  # waits for the writer's release
        waited = time.perf_counter() - started
        writer.join()
        assert_step(torch.load(path), 1.0)  # without the wait: step 2's values
        assert_step(staged, 2.0)
        assert waited >= SLOW_WRITE_S / 2
        assert snap.released


def test_sync_two_buffer_sets_stage_without_waiting(tmp_path: Path) -> None:
    path = tmp_path / "step1.pt"
    writer_may_go = threading.Event()
    with astage.SyncStager(buffers=2) as stager:
        snap = stager.snapshot(step(1.0))
        one = stager.cache_info()

        def save_when_told() -> None:
            writer_may_go.wait(10)
            slow_save(snap, path, 0.0)

        writer = threading.Thread(target=save_when_told)
        writer.start()
        # The writer has not read yet: a wait here would time out; a second set is used.
        staged = stager.stage(step(2.0), timeout=5)
        assert not snap.released
        assert_step(snap.state_dict, 1.0)
        assert_step(staged, 2.0)
        assert stager.cache_info().nbytes == 2 * one.nbytes  # the cost: two sets
        writer_may_go.set()
        writer.join()
        assert_step(torch.load(path), 1.0)


def test_sync_every_set_leased_waits_then_times_out_cleanly() -> None:
    # Snapshots as context managers: a failed assertion releases them, so close() cannot hang.
    with (
        astage.SyncStager(buffers=2) as stager,
        stager.snapshot(step(1.0)) as first,
        stager.snapshot(step(2.0)) as second,
    ):
        with pytest.raises(astage.LeaseTimeoutError, match=r"buffers=2.*release") as caught:
            stager.stage(step(3.0), timeout=0.1)
        assert isinstance(caught.value, astage.BusyError)
        assert isinstance(caught.value, TimeoutError)
        assert_step(first.state_dict, 1.0)  # neither held snapshot was touched
        assert_step(second.state_dict, 2.0)
        assert stager.last_stats is not None and stager.last_stats.tensors == 2
        first.release()
        assert_step(stager.stage(step(3.0), timeout=5), 3.0)  # into the first one's set
        assert_step(second.state_dict, 2.0)


def test_sync_timeout_must_be_seconds() -> None:
    with astage.SyncStager() as stager:
        for bad in (-1, "1", True):
            with pytest.raises(astage.InvalidOptionsError, match="timeout"):
                stager.stage(step(1.0), timeout=bad)  # type: ignore[arg-type]
        assert stager.last_stats is None  # refused before anything was staged


def test_sync_timeout_none_waits_for_a_release_from_another_thread() -> None:
    with astage.SyncStager() as stager:
        snap = stager.snapshot(step(1.0))
        threading.Timer(0.1, snap.release).start()
        assert_step(stager.stage(step(2.0)), 2.0)


def test_sets_rotate_and_a_plain_result_is_overwritten_when_its_set_comes_round() -> None:
    with astage.SyncStager(buffers=2) as stager:
        a = stager.stage(step(1.0))
        b = stager.stage(step(2.0))
        assert a["w"].untyped_storage().data_ptr() != b["w"].untyped_storage().data_ptr()
        assert_step(a, 1.0)  # two sets: the last result survives one more call
        c = stager.stage(step(3.0))
        assert c["w"].data_ptr() == a["w"].data_ptr()  # the same source: the same buffer
        assert torch.all(a["w"] == 3.0)  # unprotected: nothing leased it


def test_hold_buffers_leases_the_current_set() -> None:
    with astage.SyncStager(buffers=2) as stager:
        staged = stager.stage(step(1.0))
        with stager.hold_buffers() as hold:
            assert isinstance(hold, astage.BufferHold) and isinstance(hold, astage.Lease)
            for value in (2.0, 3.0, 4.0):  # all into the other set, none waits
                assert_step(stager.stage(step(value), timeout=5), value)
            assert_step(staged, 1.0)
        assert hold.released


def test_snapshot_used_after_release_raises() -> None:
    with astage.SyncStager() as stager:
        with stager.snapshot(step(1.0)) as snap:
            assert_step(snap.state_dict, 1.0)
            assert repr(snap) == "<Snapshot held>"
        assert snap.released
        with pytest.raises(astage.SnapshotReleasedError, match="released"):
            snap.state_dict  # noqa: B018
        assert issubclass(astage.SnapshotReleasedError, astage.UsageError)
        with pytest.raises(astage.SnapshotReleasedError):
            pickle.dumps(snap)
        snap.release()  # idempotent


def test_a_released_snapshot_lets_go_of_its_state_dict() -> None:
    """A consumer that keeps released snapshots (a queue of finished work) holds no staged
    tensor through them: the stager's next calls can hand those out again."""
    with astage.SyncStager() as stager:
        snap = stager.snapshot({"t": [torch.randn(3)]})
        staged = snap.state_dict["t"][0]
        held = sys.getrefcount(staged)
        snap.release()
        assert sys.getrefcount(staged) == held - 1  # the list in the dict let go of it
        with pytest.raises(astage.SnapshotReleasedError):
            snap.state_dict  # noqa: B018
        with stager.snapshot(None) as nothing:
            assert nothing.state_dict is None  # a value like any other, not "released"


def test_close_waits_for_snapshots() -> None:
    stager = astage.SyncStager()
    snap = stager.snapshot(step(1.0))
    started = time.perf_counter()  # before the timer starts: a late thread cannot shorten it
    threading.Timer(0.1, snap.release).start()
    stager.close()
    assert time.perf_counter() - started >= 0.09
    assert stager.closed and stager.cache_info().storages == 0


def test_clear_cache_keeps_a_leased_set_leased() -> None:
    with astage.SyncStager() as stager, stager.snapshot(step(1.0)) as snap:
        stager.clear_cache()
        assert stager.cache_info().storages == 0
        with pytest.raises(astage.LeaseTimeoutError):
            stager.stage(step(2.0), timeout=0.05)
        assert_step(snap.state_dict, 1.0)  # its tensors keep their buffers alive


def test_a_lease_of_a_private_memory_stager_does_not_pickle() -> None:
    with astage.SyncStager() as stager, stager.snapshot(step(1.0)) as snap:
        assert not snap.lease.shared
        with pytest.raises(astage.UsageError, match="share_memory=True"):
            pickle.dumps(snap)


def test_a_shared_lease_copied_by_a_plain_pickle_is_refused() -> None:
    with astage.SyncStager(share_memory=True) as stager, stager.snapshot(step(1.0)) as snap:
        assert snap.lease.shared
        # A plain pickle copies the byte: its release could never reach the stager.
        with pytest.raises(astage.UsageError, match=r"torch\.multiprocessing"):
            pickle.loads(pickle.dumps(snap.lease))


# -- the async face -----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_async_next_stage_waits_for_a_writer_thread(tmp_path: Path) -> None:
    path = tmp_path / "step1.pt"
    async with astage.Stager() as stager:
        snap = await stager.snapshot(step(1.0))
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(functools.partial(anyio.to_thread.run_sync, slow_save, snap, path))
            staged = await stager.stage(step(2.0))  # waits off the loop (the detector watches)
            assert snap.released
        assert_step(torch.load(path), 1.0)
        assert_step(staged, 2.0)


@pytest.mark.asyncio
async def test_async_two_buffer_sets_stage_without_waiting(tmp_path: Path) -> None:
    path = tmp_path / "step1.pt"
    writer_may_go = threading.Event()

    def save_when_told(snap: astage.Snapshot) -> None:
        writer_may_go.wait(10)
        slow_save(snap, path, 0.0)

    async with astage.Stager(buffers=2) as stager:
        async with stager.snapshot(step(1.0)) as snap, anyio.create_task_group() as tasks:
            tasks.start_soon(anyio.to_thread.run_sync, save_when_told, snap)
            with anyio.fail_after(5):  # a wait would last until the writer is told to go
                staged = await stager.stage(step(2.0))
            assert not snap.released
            assert_step(snap.state_dict, 1.0)
            assert_step(staged, 2.0)
            writer_may_go.set()
        assert_step(torch.load(path), 1.0)
        with pytest.raises(astage.SnapshotReleasedError):
            snap.state_dict  # noqa: B018


@pytest.mark.asyncio
async def test_async_snapshot_context_releases_on_exit() -> None:
    async with astage.Stager() as stager:
        async with stager.snapshot(step(1.0)) as snap:
            assert_step(snap.state_dict, 1.0)
            with anyio.move_on_after(0.1) as scope:
                await stager.stage(step(2.0))  # the set is leased: waits
            assert scope.cancelled_caught
            assert_step(snap.state_dict, 1.0)
        assert snap.released
        with anyio.fail_after(5):
            assert_step(await stager.stage(step(2.0)), 2.0)


@pytest.mark.asyncio
async def test_async_waiting_for_a_lease_is_cancellable_and_leaves_the_stager_usable() -> None:
    async with (
        astage.Stager(buffers=2) as stager,
        stager.snapshot(step(1.0)) as first,
        stager.snapshot(step(2.0)) as second,
    ):
        with anyio.move_on_after(0.1) as scope:
            await stager.snapshot(step(3.0))
        assert scope.cancelled_caught
        assert_step(first.state_dict, 1.0)
        assert_step(second.state_dict, 2.0)
        second.release()
        with anyio.fail_after(5):
            async with stager.snapshot(step(3.0)) as third:  # into the second one's set
                assert_step(first.state_dict, 1.0)
                assert_step(third.state_dict, 3.0)


@pytest.mark.asyncio
async def test_a_snapshot_call_is_awaited_once() -> None:
    async with astage.Stager() as stager:
        call = stager.snapshot(step(1.0))
        async with call as snap:
            with pytest.raises(astage.UsageError, match="once"):
                await call
            assert_step(snap.state_dict, 1.0)


@pytest.mark.asyncio
async def test_aclose_waits_for_snapshots() -> None:
    stager = astage.Stager()
    snap = await stager.snapshot(step(1.0))
    with anyio.move_on_after(0.1) as scope:
        await stager.aclose()
    assert scope.cancelled_caught and not stager.closed
    threading.Timer(0.05, snap.release).start()
    with anyio.fail_after(5):
        await stager.aclose()
    assert stager.closed


# -- a writer process (share_memory=True) -------------------------------------------------------


class WriterProcess:
    """One spawned writer (tests/_snapshot_writer.py) shared by this module's process tests."""

    def __init__(self) -> None:
        import _snapshot_writer

        context = mp.get_context("spawn")
        self.jobs: Any = context.Queue()
        self.done: Any = context.Queue()
        self.process = context.Process(
            target=_snapshot_writer.serve, args=(self.jobs, self.done), daemon=True
        )
        self.process.start()

    def send(self, snap: astage.Snapshot, path: Path, delay_s: float) -> None:
        self.jobs.put((snap, str(path), delay_s))

    def result(self) -> str:
        answer: str = self.done.get(timeout=60)
        return answer

    def stop(self) -> None:
        self.jobs.put(None)
        self.process.join(30)
        if self.process.is_alive():  # pragma: no cover - a stuck writer
            self.process.kill()
        for queue in (self.jobs, self.done):  # their feeder threads end with the module
            queue.close()
            queue.join_thread()


@pytest.fixture(scope="module")
def writer_process() -> Iterator[WriterProcess]:
    writer = WriterProcess()
    try:
        yield writer
    finally:
        writer.stop()


def test_sync_writer_process_releases_the_parents_set(
    writer_process: WriterProcess, tmp_path: Path
) -> None:
    path = tmp_path / "step1.pt"
    with astage.SyncStager(share_memory=True) as stager:
        snap = stager.snapshot(step(1.0))
        writer_process.send(snap, path, SLOW_WRITE_S)
        staged = stager.stage(step(2.0), timeout=60)  # waits for the child's release
        released_before_it_returned = snap.released  # released over there, seen here
        assert writer_process.result() == str(path)
        assert_step(torch.load(path), 1.0)  # without the wait: step 2's values
        assert released_before_it_returned
        assert_step(staged, 2.0)


def test_sync_writer_process_with_two_sets(writer_process: WriterProcess, tmp_path: Path) -> None:
    path = tmp_path / "step1.pt"
    with astage.SyncStager(share_memory=True, buffers=2) as stager:
        snap = stager.snapshot(step(1.0))
        writer_process.send(snap, path, 2.0)
        staged = stager.stage(step(2.0), timeout=1.0)  # the other set: no wait
        assert not snap.released
        assert_step(staged, 2.0)
        assert writer_process.result() == str(path)
        assert snap.released
        assert_step(torch.load(path), 1.0)


@pytest.mark.asyncio
async def test_async_writer_process_releases_the_parents_set(
    writer_process: WriterProcess, tmp_path: Path
) -> None:
    path = tmp_path / "step1.pt"
    async with astage.Stager(share_memory=True) as stager:
        snap = await stager.snapshot(step(1.0))
        writer_process.send(snap, path, SLOW_WRITE_S)
        with anyio.fail_after(60):
            staged = await stager.stage(step(2.0))  # polls the shared byte off the loop
        released_before_it_returned = snap.released
        assert await anyio.to_thread.run_sync(writer_process.result) == str(path)
        assert_step(torch.load(path), 1.0)  # without the wait: step 2's values
        assert released_before_it_returned
        assert_step(staged, 2.0)
