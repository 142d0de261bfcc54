"""CheckpointDir: numbered checkpoints, keep the last K, a `latest` pointer moved when durable."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

import astage


def state_at(step: int) -> dict[str, Any]:
    return {"w": torch.full((4,), float(step)), "step": step}


@pytest.mark.asyncio
async def test_saves_keep_the_last_k_and_move_latest(tmp_path: Path) -> None:
    root = tmp_path / "ckpts"
    async with astage.CheckpointDir(root, keep=2) as ckpts:
        assert ckpts.latest_step() is None and ckpts.load_latest() is None
        assert ckpts.skipped == ()
        for step in range(1, 6):
            result = await ckpts.save(step * 100, state_at(step * 100))
            assert result.path == ckpts.path_for(step * 100)
            assert ckpts.latest_step() == step * 100
        assert ckpts.steps() == [400, 500]
        assert sorted(os.listdir(root)) == [
            "latest",
            "step_000000400.safetensors",
            "step_000000500.safetensors",
        ]
        loaded = ckpts.load_latest()
        assert loaded is not None
        step, back = loaded
        assert step == 500 == back["step"] and torch.equal(back["w"], torch.full((4,), 500.0))


@pytest.mark.asyncio
async def test_a_failed_save_leaves_latest_where_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with astage.CheckpointDir(tmp_path, keep=1) as ckpts:
        await ckpts.save(1, state_at(1))

        def full_disk(fd: int, buffers: Any, offset: int) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "pwritev", full_disk)
        with pytest.raises(astage.CheckpointWriteError):
            await ckpts.save(2, state_at(2))
        assert ckpts.latest_step() == 1
        assert sorted(os.listdir(tmp_path)) == ["latest", "step_000000001.safetensors"]
        loaded = ckpts.load_latest()
        assert loaded is not None and loaded[0] == 1 == loaded[1]["step"]


@pytest.mark.asyncio
async def test_background_saves_in_a_training_loop(tmp_path: Path) -> None:
    w = torch.zeros(8)
    pending = None
    async with astage.CheckpointDir(tmp_path, keep=3) as ckpts:
        for step in range(1, 7):
            w.add_(1.0)  # a training step
            if step % 2 == 0:
                if pending is not None:
                    await pending  # the previous write is done before the next save
                pending = await ckpts.start_save(step, {"w": w, "step": step})
                w.add_(100.0)  # the optimizer steps while the write goes on
                w.sub_(100.0)
        assert pending is not None
        await pending
        assert ckpts.steps() == [2, 4, 6]
        assert ckpts.latest_step() == 6
        loaded = ckpts.load_latest()
        assert loaded is not None and loaded[0] == 6
        assert torch.equal(loaded[1]["w"], torch.full((8,), 6.0))
        assert torch.equal(astage.load(ckpts.path_for(2))["w"], torch.full((8,), 2.0))


def test_keep_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep"):
        astage.CheckpointDir(tmp_path, keep=0)
    for bad in (0, -1, 2.5, "3"):
        with pytest.raises(astage.InvalidOptionsError, match="keep"):
            astage.CheckpointDir(tmp_path, keep=bad)  # type: ignore[arg-type]
    with pytest.raises(astage.InvalidOptionsError, match="threads"):
        astage.CheckpointDir(tmp_path, threads=0)


@pytest.mark.asyncio
async def test_steps_are_non_negative_integers(tmp_path: Path) -> None:
    async with astage.CheckpointDir(tmp_path) as ckpts:
        for bad in (-1, 1.5, "final", True, None):
            with pytest.raises(astage.InvalidOptionsError, match="step"):
                ckpts.path_for(bad)  # type: ignore[arg-type]
            with pytest.raises(astage.InvalidOptionsError, match="step"):
                await ckpts.save(bad, state_at(0))  # type: ignore[arg-type]
            with pytest.raises(astage.InvalidOptionsError, match="step"):
                await ckpts.start_save(bad, state_at(0))  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == []


@pytest.mark.asyncio
async def test_a_given_stager_stays_open(tmp_path: Path) -> None:
    async with astage.Stager() as stager:
        async with astage.CheckpointDir(tmp_path, stager=stager) as ckpts:
            await ckpts.save(0, state_at(0))
        await stager.stage({"x": torch.ones(1)})  # still open


class SlowPublish:
    """Makes publishing (moving ``latest``, pruning) take ``seconds`` longer in its thread.

    Counts the threads inside; ``started`` is set (from that thread) once one is inside.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
        self.inside = 0
        self.started = threading.Event()
        self._lock = threading.Lock()
        real = astage.CheckpointDir._publish

        def publish(ckpts: astage.CheckpointDir, *args: Any) -> None:
            with self._lock:
                self.inside += 1
            try:
                self.started.set()
                time.sleep(seconds)
                real(ckpts, *args)
            finally:
                with self._lock:
                    self.inside -= 1

        monkeypatch.setattr(astage.CheckpointDir, "_publish", publish)

    async def wait_started(self) -> None:
        await wait_for(self.started)


async def wait_for(event: threading.Event, seconds: float = 5) -> None:
    """Wait (without blocking the loop) until another thread sets ``event``."""
    with anyio.fail_after(seconds):
        while not event.is_set():
            await anyio.sleep(0.005)


def temp_files(folder: Path) -> list[str]:
    return [name for name in os.listdir(folder) if name.endswith(".tmp")]


@pytest.mark.asyncio
async def test_cancelling_save_leaves_nothing_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow = SlowPublish(monkeypatch, 0.2)
    async with astage.CheckpointDir(tmp_path, keep=2) as ckpts:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(ckpts.save, 1, state_at(1))
                await slow.wait_started()
                scope.cancel()  # while the thread moves `latest`
        # The thread that moves `latest` has ended: it is no background work left running.
        assert slow.inside == 0
        assert temp_files(tmp_path) == []
        assert ckpts.latest_step() == 1  # it had started: it finished (a durable checkpoint)


@pytest.mark.asyncio
async def test_cancelling_save_mid_write_keeps_latest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with astage.CheckpointDir(tmp_path, keep=2) as ckpts:
        await ckpts.save(1, state_at(1))
        real = os.pwritev
        writing = threading.Event()

        def slow(fd: int, buffers: Any, offset: int) -> int:
            if offset > 0:
                writing.set()
                time.sleep(0.1)
            return real(fd, buffers, offset)

        monkeypatch.setattr(os, "pwritev", slow)
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(ckpts.save, 2, state_at(2))
                await wait_for(writing)
                scope.cancel()
        assert temp_files(tmp_path) == []
        assert ckpts.latest_step() == 1 and ckpts.steps() == [1]


@pytest.mark.asyncio
async def test_start_save_without_an_owner_raises_usage_error(tmp_path: Path) -> None:
    ckpts = astage.CheckpointDir(tmp_path)  # not entered: no task group of its own
    with pytest.raises(astage.UsageError, match="task_group="):
        await ckpts.start_save(1, state_at(1))
    async with anyio.create_task_group() as tg:  # an owner passed in is enough
        handle = await ckpts.start_save(1, state_at(1), task_group=tg)
    assert handle.done() and ckpts.latest_step() == 1
    await ckpts.aclose()
    with pytest.raises(astage.ClosedError):
        await ckpts.save(2, state_at(2))


@pytest.mark.asyncio
async def test_aclose_waits_for_background_saves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow = SlowPublish(monkeypatch, 0.1)
    async with astage.CheckpointDir(tmp_path) as ckpts:
        handle = await ckpts.start_save(1, state_at(1))
        await ckpts.aclose()
        assert handle.done() and slow.inside == 0
        assert ckpts.latest_step() == 1


@pytest.mark.asyncio
async def test_an_error_in_the_block_aborts_background_saves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.pwritev
    inside = [0]

    def slow(fd: int, buffers: Any, offset: int) -> int:
        inside[0] += 1
        try:
            time.sleep(0.05)
            return real(fd, buffers, offset)
        finally:
            inside[0] -= 1

    monkeypatch.setattr(os, "pwritev", slow)
    with pytest.raises(KeyError):  # the block's own error, not wrapped in a group
        async with astage.CheckpointDir(tmp_path) as ckpts:
            handle = await ckpts.start_save(1, {"w": torch.ones(1 << 16)})
            raise KeyError("training failed")
    assert handle.done() and inside[0] == 0
    assert temp_files(tmp_path) == [] and ckpts.latest_step() is None


@pytest.mark.asyncio
async def test_cancelling_the_folder_owner_aborts_its_saves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow = SlowPublish(monkeypatch, 0.05)
    with anyio.CancelScope() as scope:
        async with astage.CheckpointDir(tmp_path) as ckpts:
            await ckpts.start_save(1, state_at(1))
            scope.cancel()
            await anyio.sleep(1)
            pytest.fail("not cancelled")
    assert slow.inside == 0 and temp_files(tmp_path) == []
