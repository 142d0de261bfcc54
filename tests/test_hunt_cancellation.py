"""Cancellation of the async surfaces besides the stager's copy lanes (test_hunt_lanes.py has
those): astage.save / start_save and their SaveHandle, CheckpointDir, the writer.

The contract attacked: whatever point a cancellation lands at, nothing hangs, the folder holds
complete durable checkpoints or nothing (no temporary file), no writer thread runs on, the
objects stay usable (or refuse with an astage error), and a later save writes a correct file.

Each test here failed before its fix.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
import torch.distributed as dist
from test_hunt_replication import ScriptedPartner

import astage
from astage._files._writer import SafetensorsWriter
from astage._replication import _stager
from astage._replication._transport import ReplicaReady
from astage._replication._wire import encode

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


@pytest.mark.asyncio
async def test_a_persisting_exchange_cancelled_while_its_file_begins_raises_the_cancellation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ReplicationStager with a storage_dir, cancelled while the replica file was being
    begun (a worker thread the task waits for, shielded): the exchange's own task was
    cancelled (its thread abandoned), the caller's was not yet, and on asyncio the task group
    around them ended without a checkpoint, so stage() raised a raw ValueError (`(result,) =
    outcome` on no outcome) instead of the cancellation."""
    for name, value in [
        ("is_initialized", lambda: True),
        ("get_backend", lambda group=None: "gloo"),
    ]:
        monkeypatch.setattr(dist, name, value)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    theirs = {"w": torch.arange(1024.0)}

    def partner(call: int) -> None:
        encoded = encode(theirs, call=call)
        scripted = ScriptedPartner(json.dumps(encoded.header).encode(), 4096)
        scripted.sends[3] = encoded.storages[0].clone()
        monkeypatch.setattr(dist, "isend", scripted.isend)
        monkeypatch.setattr(dist, "irecv", scripted.irecv)

    opening, cancelled, exchanged = threading.Event(), threading.Event(), threading.Event()
    put, close, open_file = _stager._Mailbox.put, _stager._Mailbox.close, SafetensorsWriter._open

    def put_then_wait(mailbox: Any, progress: Any) -> None:
        put(mailbox, progress)
        if isinstance(progress, ReplicaReady):  # the exchange thread goes on once cancelled
            cancelled.wait(WAIT_S)

    def close_and_tell(mailbox: Any) -> None:
        close(mailbox)
        exchanged.set()

    def open_once_over(writer: Any, *args: Any) -> None:
        opening.set()  # the caller's task waits for this thread, shielded
        cancelled.wait(WAIT_S)
        exchanged.wait(WAIT_S)
        open_file(writer, *args)

    monkeypatch.setattr(_stager._Mailbox, "put", put_then_wait)
    monkeypatch.setattr(_stager._Mailbox, "close", close_and_tell)
    monkeypatch.setattr(SafetensorsWriter, "_open", open_once_over)

    async def cancel_once_opening(scope: anyio.CancelScope) -> None:
        await anyio.to_thread.run_sync(opening.wait, WAIT_S)
        scope.cancel()
        cancelled.set()

    partner(1)
    replicas = tmp_path / "replicas"
    stager = astage.ReplicationStager(storage_dir=replicas, timeout=WAIT_S)
    mine = {"x": torch.randn(1024)}
    with anyio.fail_after(WAIT_S):
        async with anyio.create_task_group() as tasks:
            with anyio.CancelScope() as scope:
                tasks.start_soon(cancel_once_opening, scope)
                await stager.stage(mine)
        assert scope.cancelled_caught
        assert [n for n in os.listdir(replicas) if n.endswith(".tmp")] == []
        # The exchange itself ran to its end: the pair is in step, and the next call works.
        monkeypatch.setattr(SafetensorsWriter, "_open", open_file)
        partner(2)
        replica = await stager.stage(mine)
        assert torch.equal(replica["w"], theirs["w"])
        await stager.aclose()
    assert stager.replica_path is not None
    assert torch.equal(astage.load(stager.replica_path)["w"], theirs["w"])


@pytest.mark.asyncio
@pytest.mark.asyncio_only("a cancellation raised in one piece's task alone: trio has no such")
async def test_a_writers_piece_cancelled_before_its_thread_fails_the_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SafetensorsWriter used without ``async with`` writes a tensor's pieces in tasks of a
    group of its own. A cancellation that reached a piece's task before its thread ran, the
    caller's own scope not cancelled, ended the group without raising (asyncio): write()
    returned, commit() made the file durable, and the tensor loaded with a hole."""
    calls = 0
    in_thread = SafetensorsWriter._in_thread

    async def second_piece_cancelled(self: SafetensorsWriter, fn: Any, *args: Any) -> Any:
        nonlocal calls
        if getattr(fn, "__name__", "") == "_write_items":
            calls += 1
            if calls == 2:
                raise anyio.get_cancelled_exc_class()()
        return await in_thread(self, fn, *args)

    monkeypatch.setattr(SafetensorsWriter, "_in_thread", second_piece_cancelled)
    target = tmp_path / "a.safetensors"
    tensor = torch.arange(4096.0)
    writer = SafetensorsWriter(target, chunk_bytes=1024)
    await writer.begin({"t": tensor})
    with pytest.raises(astage.CheckpointWriteError, match="were not written"):
        await writer.write(("t",), tensor)
    with pytest.raises(astage.CheckpointWriteError):
        await writer.commit()
    await writer.abort()
    assert os.listdir(tmp_path) == []
