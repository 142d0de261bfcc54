"""The event loop on a call's first use, and on every use: work that ran on the loop's thread
(or held the GIL from a worker thread) for tens of milliseconds at a time.

Found by running each async entry point once, then again, in a fresh interpreter, on a
GPT-2-like state dict and on an optimizer state of 20,000 small tensors, with a 1 ms heartbeat
task beside it and a watchdog thread that took the loop thread's stack whenever the heartbeat
was 5 ms late. Each test here failed before its fix; they assert what ran where, not
milliseconds.
"""

from __future__ import annotations

import gc
import itertools
import os
import time
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import torch

import astage
from astage._files import _layout, _writer


def _small_tensors(count: int) -> dict[str, Any]:
    return {
        "state": {i: {"exp_avg": torch.ones(4), "step": torch.tensor(1.0)} for i in range(count)}
    }


@pytest.mark.asyncio
async def test_a_save_plans_its_file_with_the_collector_paused(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer's plan (a worker thread) allocates a few objects per tensor, which set off
    oldest-generation collections over the whole heap: over 20,000 small tensors, passes of
    60-170 ms per save, and a collection holds the GIL, so the event loop stalled with it."""
    thresholds: list[int] = []
    plan = _layout.plan_layout

    def recording(*args: Any) -> Any:
        thresholds.append(gc.get_threshold()[0])
        return plan(*args)

    monkeypatch.setattr(_writer, "plan_layout", recording)
    if not gc.isenabled() or gc.get_threshold()[0] == 0:
        pytest.skip("the collector is off: nothing to pause")
    await astage.save(_small_tensors(10), os.fspath(tmp_path / "a.safetensors"))
    assert thresholds == [0]
    assert gc.get_threshold()[0] != 0  # resumed after


@pytest.mark.asyncio
async def test_a_save_hands_the_loop_back_while_it_queues_landed_tensors(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tensors that land during one of the stager's turns are handed out with no checkpoint
    between them, and a write queued for the writer's threads awaits nothing: the save's loop
    over them held the event loop for 150-185 ms over 20,000 small tensors (every call)."""
    ticks = 0
    queued_at: list[int] = []
    write = _writer.SafetensorsWriter.write

    async def slow_write(self: Any, path: Any, tensor: torch.Tensor) -> None:
        queued_at.append(ticks)
        time.sleep(0.001)  # each longer than a turn (max_loop_hold_s, 0.5 ms)
        await write(self, path, tensor)

    monkeypatch.setattr(_writer.SafetensorsWriter, "write", slow_write)

    async def tick() -> None:
        nonlocal ticks
        while True:
            await anyio.lowlevel.checkpoint()
            ticks += 1

    async with astage.Stager() as stager, anyio.create_task_group() as tasks:
        tasks.start_soon(tick)
        await astage.save(_small_tensors(200), os.fspath(tmp_path / "a.safetensors"), stager=stager)
        tasks.cancel_scope.cancel()
    assert len(queued_at) == 400
    # Writes queued with no other task run in between (before: hundreds in a row).
    longest = run = 1
    for before, after in itertools.pairwise(queued_at):
        run = run + 1 if after == before else 1
        longest = max(longest, run)
    assert longest <= 2, longest
