"""Cancellation of the async surfaces besides the stager's copy lanes (test_hunt_lanes.py has
those): astage.save / start_save and their SaveHandle, CheckpointDir, the writer.

The contract attacked: whatever point a cancellation lands at, nothing hangs, the folder holds
complete durable checkpoints or nothing (no temporary file), no writer thread runs on, the
objects stay usable (or refuse with an astage error), and a later save writes a correct file.

Each test here failed before its fix.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

import astage

WAIT_S = 10.0  # generous: only a hang waits this long


def state(seed: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(256, 1024, generator=generator), "step": torch.tensor(seed)}


def writer_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("astage-writer")]


def assert_only_complete_checkpoints(root: Path) -> None:
    """No temporary file, and each step file there loads back whole."""
    for name in os.listdir(root):
        assert not name.endswith(".tmp"), f"left behind: {name}"
        if name.endswith(".safetensors"):
            loaded = astage.load(root / name)
            expected = state(int(loaded["step"]))
            assert torch.equal(loaded["w"], expected["w"]), name


@pytest.mark.asyncio
@pytest.mark.parametrize("write", ["awaited", "in flight"])
async def test_a_cancelled_checkpoint_dir_block_still_closes_its_own_stager(
    tmp_path: Path, write: str
) -> None:
    """A CheckpointDir's `async with` block cancelled after a background save left the
    stager the folder made for itself open, its host buffers (the checkpoint's size, pinned
    where CUDA is) held until garbage collection: leaving the block, aclose() waited for the
    save's handle (over by then) at a checkpoint, where the cancellation ended it before the
    stager was closed."""
    ckpts = astage.CheckpointDir(tmp_path)
    with anyio.fail_after(WAIT_S):
        with anyio.CancelScope() as scope:
            async with ckpts:
                handle = await ckpts.start_save(1, state(1))
                if write == "awaited":
                    await handle
                scope.cancel()
                await anyio.sleep_forever()
    assert handle.done()
    assert ckpts.stager.closed
    assert ckpts.stager.cache_info().nbytes == 0
    assert writer_threads() == []
    assert_only_complete_checkpoints(tmp_path)
    async with astage.CheckpointDir(tmp_path) as again:
        with anyio.fail_after(WAIT_S):
            await again.save(2, state(2))
        assert again.latest_step() == 2
    assert_only_complete_checkpoints(tmp_path)
