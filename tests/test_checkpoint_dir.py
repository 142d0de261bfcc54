"""CheckpointDir: numbered checkpoints, keep the last K, a `latest` pointer moved when durable."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

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
        back = ckpts.load_latest()
        assert back["step"] == 500 and torch.equal(back["w"], torch.full((4,), 500.0))


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
        assert ckpts.load_latest()["step"] == 1


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
        assert torch.equal(ckpts.load_latest()["w"], torch.full((8,), 6.0))
        assert torch.equal(astage.load(ckpts.path_for(2))["w"], torch.full((8,), 2.0))


def test_keep_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep"):
        astage.CheckpointDir(tmp_path, keep=0)


@pytest.mark.asyncio
async def test_a_given_stager_stays_open(tmp_path: Path) -> None:
    async with astage.Stager() as stager:
        async with astage.CheckpointDir(tmp_path, stager=stager) as ckpts:
            await ckpts.save(0, state_at(0))
        await stager.stage({"x": torch.ones(1)})  # still open
