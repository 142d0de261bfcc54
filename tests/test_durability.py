"""When a checkpoint is durable: without loop turns, and never after a cancellation returned.

Once ``start_save()`` has returned (every tensor landed), the writer's own threads finish the
file (writes, fsync, rename, folder fsync, ``after_commit``, the buffer hold's release) even if
the caller's loop never runs again. A cancellation that comes before the rename aborts, and once
the cancelled call (or handle) has ended no thread is left that could still commit or call
``after_commit``; one that comes after the rename lets the commit end first, and its result
stands.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from conftest import assert_tree_staged

import astage
from astage._files._save import run_save, start_in
from astage._files._save_sync import start_sync_in

BOUND_S = 5.0  # what "within bounded time" means here: far above the injected delays


def state_at(step: int) -> dict[str, Any]:
    return {f"layer{i}": torch.full((4096,), float(step * 10 + i)) for i in range(4)}


def files_in(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def wait_blocking(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` with ``time.sleep``: the caller's event loop gets no turn."""
    deadline = time.monotonic() + BOUND_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {BOUND_S} s while the loop was blocked")
        time.sleep(0.01)


class AfterCommit:
    """A blocking ``after_commit`` that records its calls; ``delay`` seconds inside each."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.started = threading.Event()
        self.ended = threading.Event()
        self.threads: list[str] = []

    def __call__(self) -> None:
        self.threads.append(threading.current_thread().name)
        self.started.set()
        time.sleep(self.delay)
        self.ended.set()


class SlowFsync:
    """``os.fsync`` that takes ``delay`` seconds for the first file fsync (the commit's)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, delay: float) -> None:
        self.delay = delay
        self.entered = threading.Event()
        self.returned = threading.Event()
        self._real = os.fsync
        monkeypatch.setattr(os, "fsync", self)

    def __call__(self, fd: int) -> None:
        if not self.entered.is_set():
            self.entered.set()
            time.sleep(self.delay)
            self._real(fd)
            self.returned.set()
            return
        self._real(fd)

    async def wait_entered(self) -> None:
        with anyio.fail_after(BOUND_S):
            while not self.entered.is_set():
                await anyio.sleep(0.005)


def slow_data_writes(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    real = os.pwritev

    def slow(fd: int, buffers: Any, offset: int) -> int:
        if offset > 0:
            time.sleep(seconds)
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", slow)


def recorded_holds(monkeypatch: pytest.MonkeyPatch, stager: Any) -> list[Any]:
    holds: list[Any] = []
    real = stager.hold_buffers

    def hold() -> Any:
        holds.append(real())
        return holds[-1]

    monkeypatch.setattr(stager, "hold_buffers", hold)
    return holds


# -- durable without loop turns -----------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.allow_blocking("the training step blocks the loop on purpose (time.sleep)")
async def test_start_save_commits_while_the_loop_is_blocked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow_data_writes(monkeypatch, 0.1)  # the write is still going on when start_save returns
    path = tmp_path / "c.safetensors"
    after_commit = AfterCommit()
    async with astage.Stager() as stager, anyio.create_task_group() as tg:
        holds = recorded_holds(monkeypatch, stager)
        writer = astage.SafetensorsWriter(path, threads=1)
        handle = await start_in(tg, state_at(1), writer, stager, after_commit=after_commit)
        assert not path.exists()
        # Ordinary compute from here on: the loop gets no turn until the checks are done.
        wait_blocking(path.exists, "the rename")
        wait_blocking(after_commit.ended.is_set, "after_commit")
        wait_blocking(lambda: bool(holds) and holds[0].released, "the hold's release")
        assert files_in(tmp_path) == ["c.safetensors"]  # no temporary file left
        assert after_commit.threads[0].startswith("astage-writer")
        result = await handle  # only observes
    assert result.path == str(path)
    assert_tree_staged(astage.load(path), state_at(1))


@pytest.mark.asyncio
@pytest.mark.allow_blocking("the training step blocks the loop on purpose (time.sleep)")
async def test_public_start_save_is_durable_while_the_loop_is_blocked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow_data_writes(monkeypatch, 0.1)
    path = tmp_path / "c.safetensors"
    async with anyio.create_task_group() as tg:
        await astage.start_save(state_at(2), path, threads=1, task_group=tg)
        assert not path.exists()
        wait_blocking(lambda: files_in(tmp_path) == ["c.safetensors"], "the commit")
    assert_tree_staged(astage.load(path), state_at(2))


def test_start_save_sync_commits_without_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow_data_writes(monkeypatch, 0.1)
    path = tmp_path / "c.safetensors"
    after_commit = AfterCommit()
    writer = astage.SafetensorsWriter(path, threads=1)
    handle = start_sync_in(state_at(3), writer, None, after_commit)
    assert not path.exists()
    wait_blocking(after_commit.ended.is_set, "after_commit")  # nobody waits on the handle
    assert files_in(tmp_path) == ["c.safetensors"]
    assert handle.wait(timeout=BOUND_S).path == str(path)


# -- cancelled before the rename: nothing commits later ----------------------------------------


async def a_previous_file(tmp_path: Path) -> Path:
    path = tmp_path / "c.safetensors"
    await astage.save(state_at(0), path)
    return path


async def check_nothing_happens_later(
    path: Path, fsync: SlowFsync, after_commit: AfterCommit
) -> None:
    """The cancelled save has ended: no thread of it may rename or call after_commit now."""
    assert not after_commit.started.is_set()
    assert files_in(path.parent) == [path.name]
    with anyio.fail_after(BOUND_S):  # give the delayed fsync time to return, and then some
        while not fsync.returned.is_set():
            await anyio.sleep(0.01)
    await anyio.sleep(0.2)
    assert not after_commit.started.is_set()
    assert files_in(path.parent) == [path.name]
    assert_tree_staged(astage.load(path), state_at(0))  # the previous checkpoint stays


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["handle", "owner"])
async def test_cancel_during_the_commit_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    path = await a_previous_file(tmp_path)
    fsync = SlowFsync(monkeypatch, 0.4)
    after_commit = AfterCommit()
    async with astage.Stager() as stager:
        async with anyio.create_task_group() as owner:
            writer = astage.SafetensorsWriter(path)
            handle = await start_in(owner, state_at(1), writer, stager, after_commit=after_commit)
            await fsync.wait_entered()  # the last thread is committing
            if how == "handle":
                assert handle.cancel()
            else:
                owner.cancel_scope.cancel()
        assert handle.done()
        with pytest.raises(astage.CheckpointWriteError, match="cancelled"):
            await handle
        await check_nothing_happens_later(path, fsync, after_commit)
        with anyio.fail_after(2):
            await stager.stage({"w": torch.ones(2)})  # the hold was released


@pytest.mark.asyncio
async def test_a_cancelled_save_call_leaves_nothing_to_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = await a_previous_file(tmp_path)
    fsync = SlowFsync(monkeypatch, 0.4)
    after_commit = AfterCommit()
    writer = astage.SafetensorsWriter(path)
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:

            async def cancel_when_committing() -> None:
                await fsync.wait_entered()
                scope.cancel()

            tg.start_soon(cancel_when_committing)
            await run_save(state_at(1), writer, None, after_commit=after_commit)
    assert scope.cancelled_caught
    await check_nothing_happens_later(path, fsync, after_commit)


def test_sync_cancel_during_the_commit_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.safetensors"
    astage.save_sync(state_at(0), path)
    fsync = SlowFsync(monkeypatch, 0.4)
    after_commit = AfterCommit()
    handle = start_sync_in(state_at(1), astage.SafetensorsWriter(path), None, after_commit)
    assert fsync.entered.wait(BOUND_S)
    assert handle.cancel()
    with pytest.raises(astage.CheckpointWriteError, match="cancelled"):
        handle.wait(timeout=BOUND_S)
    assert fsync.returned.is_set()  # wait() returned only once the committing thread had
    time.sleep(0.2)
    assert not after_commit.started.is_set()
    assert files_in(tmp_path) == ["c.safetensors"]
    assert_tree_staged(astage.load(path), state_at(0))


# -- cancelled after the rename: the commit ends first, and stands ------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["handle", "owner"])
async def test_cancel_after_the_rename(tmp_path: Path, how: str) -> None:
    path = tmp_path / "c.safetensors"
    after_commit = AfterCommit(delay=0.3)
    async with astage.Stager() as stager:
        async with anyio.create_task_group() as owner:
            writer = astage.SafetensorsWriter(path)
            handle = await start_in(owner, state_at(1), writer, stager, after_commit=after_commit)
            with anyio.fail_after(BOUND_S):
                while not after_commit.started.is_set():
                    await anyio.sleep(0.005)
            if how == "handle":
                assert not handle.cancel()  # too late: the file is in place
            else:
                owner.cancel_scope.cancel()
        # The owner's block ended only once after_commit had: nothing of the save runs on.
        assert after_commit.ended.is_set() and handle.done()
        result = await handle  # the result stands
    assert result.path == str(path) and files_in(tmp_path) == ["c.safetensors"]
    assert_tree_staged(astage.load(path), state_at(1))


@pytest.mark.asyncio
async def test_a_cancelled_save_call_after_the_rename_waits_for_after_commit(
    tmp_path: Path,
) -> None:
    path = tmp_path / "c.safetensors"
    after_commit = AfterCommit(delay=0.3)
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:

            async def cancel_in_after_commit() -> None:
                with anyio.fail_after(BOUND_S):
                    while not after_commit.started.is_set():
                        await anyio.sleep(0.005)
                scope.cancel()

            tg.start_soon(cancel_in_after_commit)
            await run_save(
                state_at(1), astage.SafetensorsWriter(path), None, after_commit=after_commit
            )
    assert after_commit.ended.is_set()  # the cancelled call returned after after_commit did
    assert_tree_staged(astage.load(path), state_at(1))


# -- after_commit fails the save ------------------------------------------------------------------


@pytest.mark.asyncio
async def test_an_after_commit_error_fails_the_save(tmp_path: Path) -> None:
    def refuse() -> None:
        raise astage.CheckpointWriteError("cannot move the pointer")

    path = tmp_path / "c.safetensors"
    with pytest.raises(astage.CheckpointWriteError, match="pointer"):
        await run_save(state_at(1), astage.SafetensorsWriter(path), None, after_commit=refuse)
    assert files_in(tmp_path) == ["c.safetensors"]  # durable all the same: it was renamed
    handle = start_sync_in(state_at(1), astage.SafetensorsWriter(path), None, refuse)
    with pytest.raises(astage.CheckpointWriteError, match="pointer"):
        handle.wait(timeout=BOUND_S)


@pytest.mark.asyncio
async def test_a_cancel_that_ends_the_threads_at_once_is_still_a_cancellation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The threads end right after handle.cancel(), before the cancellation reaches the task
    # waiting for them: the owner must still see a cancelled save, not a failed one.
    path = await a_previous_file(tmp_path)
    entered, gate = threading.Event(), threading.Event()
    real = os.fsync

    def gated(fd: int) -> None:
        if not entered.is_set():
            entered.set()
            gate.wait(BOUND_S)
        real(fd)

    monkeypatch.setattr(os, "fsync", gated)
    async with anyio.create_task_group() as owner:  # no ExceptionGroup out of here
        handle = await astage.start_save(state_at(1), path, task_group=owner)
        with anyio.fail_after(BOUND_S):
            while not entered.is_set():
                await anyio.sleep(0.005)
        assert handle.cancel()
        gate.set()
        with pytest.raises(astage.CheckpointWriteError, match="cancelled"):
            await handle
    assert files_in(tmp_path) == ["c.safetensors"]
    assert_tree_staged(astage.load(path), state_at(0))
