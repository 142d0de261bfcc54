"""ReplicaFile entered with ``async with``: the replica's bytes go to disk in the background.

Driven directly with the progress an exchange reports (``ReplicaReady``, then ``Landed``), no
process group. Where a test must see a write in flight, :class:`HeldWrites` holds the writer's
disk writes in their worker threads until the test lets them go: ``threading.Event`` waits with
a timeout, so a broken ReplicaFile fails the test instead of hanging it.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
import safetensors
import torch
import torch.distributed.tensor  # imported early on purpose: see below
from conftest import same_values

import astage
from astage._files._writer import SafetensorsWriter
from astage._replication._persist import ReplicaFile
from astage._replication._transport import Landed, ReplicaReady

# How long a held write, or a test waiting on one, waits before giving up; only a broken
# ReplicaFile ever waits this long.
TIMEOUT = 10.0

RANK, PARTNER = 0, 1


def received_replica() -> tuple[dict[str, Any], list[torch.Tensor]]:
    """A replica as an exchange builds it: its tensors view the byte storages being received."""
    a = torch.arange(1 << 16, dtype=torch.float32)
    b = torch.linspace(-1.0, 1.0, 1 << 12, dtype=torch.float64)
    replica = {"a": a, "head": a[:8], "b": b, "n": 3}
    return replica, [a.view(torch.uint8), b.view(torch.uint8)]


class HeldWrites:
    """Holds every disk write of :class:`SafetensorsWriter` in its worker thread until released."""

    def __init__(self) -> None:
        self.started = threading.Event()
        """A write reached the disk and is being held."""
        self.released = threading.Event()
        self.finished = threading.Event()
        """A held write went on and returned."""
        self.descriptor_open_when_released: list[bool] = []
        """For each held write: whether its file was still open when the write went on."""

    def release(self) -> None:
        self.released.set()

    async def wait_started(self) -> bool:
        """Wait (in a thread, the loop keeps running) until a write is held."""
        return await anyio.to_thread.run_sync(self.started.wait, TIMEOUT)


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> Iterator[HeldWrites]:
    writes = HeldWrites()
    real = SafetensorsWriter._write_items

    def held_write(writer: SafetensorsWriter, items: list[Any], sharing: Any = None) -> None:
        writes.started.set()
        # Not released in time: go on anyway; the test's own assertions say what went wrong.
        writes.released.wait(TIMEOUT)
        writes.descriptor_open_when_released.append(writer._fd is not None)
        real(writer, items, sharing)
        writes.finished.set()

    monkeypatch.setattr(SafetensorsWriter, "_write_items", held_write)
    yield writes
    writes.release()  # a failed test must leave no thread waiting


def assert_loads_back(path: Path, replica: dict[str, Any]) -> None:
    loaded = astage.load(path)
    assert loaded.keys() == replica.keys()
    for key in ("a", "head", "b"):
        assert same_values(loaded[key], replica[key]), key
    assert loaded["head"].untyped_storage().data_ptr() == loaded["a"].untyped_storage().data_ptr()
    assert loaded["n"] == 3
    with safetensors.safe_open(path, "pt") as file:
        info = json.loads(file.metadata()["astage.replica"])
    assert info == {"rank": RANK, "partner": PARTNER, "dtensors": {}}


@pytest.mark.asyncio
async def test_follow_only_queues_the_landed_bytes(tmp_path: Path, held: HeldWrites) -> None:
    path = tmp_path / "replica.safetensors"
    replica, storages = received_replica()
    async with ReplicaFile(os.fspath(path), RANK, PARTNER) as file:
        await file.follow(ReplicaReady(replica, storages))
        await file.follow(Landed([0, 1]))
        # follow() returned while the disk write is still held: it queued the bytes.
        assert not held.finished.is_set()
        assert await held.wait_started(), "the landed bytes were never written"
        assert not held.finished.is_set()
        held.release()
        await file.commit()
    assert held.finished.is_set()
    await anyio.to_thread.run_sync(assert_loads_back, path, replica)


@pytest.mark.asyncio
async def test_background_writes_commit_and_load_back_equal(tmp_path: Path) -> None:
    path = tmp_path / "replica.safetensors"
    replica, storages = received_replica()
    async with ReplicaFile(os.fspath(path), RANK, PARTNER) as file:
        await file.follow(ReplicaReady(replica, storages))
        await file.follow(Landed([1]))  # messages land in any order
        await file.follow(Landed([0]))
        await file.commit()
    assert os.listdir(tmp_path) == [path.name]
    await anyio.to_thread.run_sync(assert_loads_back, path, replica)


@pytest.mark.asyncio
@pytest.mark.parametrize("leaving", ["by the cancellation", "after abort()"])
async def test_a_cancel_during_commit_leaves_no_file(
    tmp_path: Path, held: HeldWrites, leaving: str
) -> None:
    # The cancel lands while commit() waits for a write still inside its thread: the file must
    # go, and only once that write has returned (its descriptor is closed after, never under it).
    path = tmp_path / "replica.safetensors"
    replica, storages = received_replica()

    async def cancel_then_release(scope: anyio.CancelScope) -> None:
        scope.cancel()
        await anyio.sleep(0.2)  # cleanup that does not wait for the write has run by now
        held.release()

    async with anyio.create_task_group() as tasks:
        with anyio.CancelScope() as scope:
            async with ReplicaFile(os.fspath(path), RANK, PARTNER) as file:
                await file.follow(ReplicaReady(replica, storages))
                await file.follow(Landed([0, 1]))
                assert await held.wait_started()
                tasks.start_soon(cancel_then_release, scope)
                try:
                    await file.commit()
                except anyio.get_cancelled_exc_class():
                    if leaving == "after abort()":
                        await file.abort()  # in the cancelled scope, with no shield of ours
                    raise
    assert scope.cancelled_caught
    assert os.listdir(tmp_path) == []  # neither the temporary file nor the target
    assert held.descriptor_open_when_released == [True]


@pytest.mark.asyncio
async def test_a_block_left_before_begin_leaves_the_folder_empty(tmp_path: Path) -> None:
    async with ReplicaFile(os.fspath(tmp_path / "replica.safetensors"), RANK, PARTNER):
        pass
    assert os.listdir(tmp_path) == []


@pytest.mark.asyncio
async def test_an_error_before_begin_leaves_the_folder_empty_and_propagates_as_itself(
    tmp_path: Path,
) -> None:
    with pytest.raises(KeyError, match="the exchange failed"):
        async with ReplicaFile(os.fspath(tmp_path / "replica.safetensors"), RANK, PARTNER):
            raise KeyError("the exchange failed")  # not wrapped in an exception group
    assert os.listdir(tmp_path) == []
