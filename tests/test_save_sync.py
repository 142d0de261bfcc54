"""astage.save_sync / start_save_sync: the blocking face of save, with no event loop."""

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
from conftest import assert_tree_staged, count_recorders, model_state_dict, mutate_, tensors_of

import astage


def state_at(step: int) -> dict[str, Any]:
    return {
        "model": {"w": torch.full((64, 64), float(step)), "b": torch.arange(8.0) + step},
        "tied": [torch.ones(3)] * 2,
        "step": step,
        "name": "run",
    }


def files_in(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


class SlowWrites:
    """``os.pwritev`` that sleeps ``seconds`` before each data write (not the header's)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
        self.seconds = seconds
        self.started = threading.Event()
        self.inside = 0
        self._lock = threading.Lock()
        self._real = os.pwritev
        monkeypatch.setattr(os, "pwritev", self)

    def __call__(self, fd: int, buffers: Any, offset: int) -> int:
        with self._lock:
            self.inside += 1
        try:
            if offset > 0:
                self.started.set()
                time.sleep(self.seconds)
            return self._real(fd, buffers, offset)
        finally:
            with self._lock:
                self.inside -= 1


def test_round_trip_same_file_as_the_async_save(tmp_path: Path) -> None:
    state = state_at(3)
    result = astage.save_sync(state, tmp_path / "sync.safetensors", metadata={"run": "x"})
    assert result.path == str(tmp_path / "sync.safetensors")
    assert result.tensors == 4 and result.nbytes == (64 * 64 + 8 + 3) * 4
    assert result.seconds >= result.staging_seconds > 0 and result.writing_seconds > 0
    assert files_in(tmp_path) == ["sync.safetensors"]
    back = astage.load(tmp_path / "sync.safetensors")
    assert_tree_staged(back, state)
    assert back["tied"][0].data_ptr() == back["tied"][1].data_ptr()

    async def save_async() -> None:
        await astage.save(state, tmp_path / "async.safetensors", metadata={"run": "x"})

    anyio.run(save_async)
    sync_bytes = (tmp_path / "sync.safetensors").read_bytes()
    assert sync_bytes == (tmp_path / "async.safetensors").read_bytes()


def test_save_sync_without_a_stager_records_no_structure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorders = count_recorders(monkeypatch)
    state = state_at(1)
    astage.save_sync(state, tmp_path / "a.safetensors")
    assert recorders == []
    assert_tree_staged(astage.load(tmp_path / "a.safetensors"), state)
    with astage.SyncStager() as stager:
        astage.save_sync(state, tmp_path / "b.safetensors", stager=stager)
    assert len(recorders) == 1


def test_a_given_stager_is_reused_and_stays_open(tmp_path: Path) -> None:
    state = state_at(1)
    with astage.SyncStager() as stager:
        astage.save_sync(state, tmp_path / "a.safetensors", stager=stager)
        info = stager.cache_info()
        mutate_(state)
        astage.save_sync(state, tmp_path / "b.safetensors", stager=stager)
        assert stager.cache_info() == info
        assert not stager.closed
    assert_tree_staged(astage.load(tmp_path / "b.safetensors"), state)


def test_start_save_sync_returns_once_staged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    SlowWrites(monkeypatch, 0.2)
    state = state_at(1)
    expected = {"model": {k: v.clone() for k, v in state["model"].items()}}
    handle = astage.start_save_sync(state, tmp_path / "c.safetensors")
    assert not handle.done() and handle.path == str(tmp_path / "c.safetensors")
    mutate_(state)  # the optimizer steps: the save must not see it
    with pytest.raises(TimeoutError):
        handle.wait(timeout=0.01)
    result = handle.wait()
    assert handle.done() and handle.wait() == result
    assert result.writing_seconds >= 0.2
    assert not handle.cancel()  # over already
    back = astage.load(tmp_path / "c.safetensors")
    assert torch.equal(back["model"]["w"], expected["model"]["w"])


def test_the_next_stage_waits_for_the_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    SlowWrites(monkeypatch, 0.3)
    state = state_at(1)
    expected = state_at(1)
    staged_next: list[Any] = []
    with astage.SyncStager() as stager:
        handle = astage.start_save_sync(state, tmp_path / "n.safetensors", stager=stager)
        mutate_(state)  # step N+1
        worker = threading.Thread(target=lambda: staged_next.append(stager.stage(state)))
        worker.start()
        time.sleep(0.1)
        assert not staged_next  # backpressure: it waits for the write of step N
        handle.wait()
        worker.join(timeout=5)
        assert staged_next
        assert_tree_staged(staged_next[0], state)  # the next stage got step N+1's values
    assert_tree_staged(astage.load(tmp_path / "n.safetensors"), expected)  # file N: step N


def test_works_in_a_thread_without_a_loop(tmp_path: Path) -> None:
    results: list[Any] = []

    def in_thread() -> None:
        results.append(astage.save_sync(state_at(2), tmp_path / "t.safetensors"))

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join(timeout=10)
    assert results and results[0].tensors == 4
    assert_tree_staged(astage.load(tmp_path / "t.safetensors"), state_at(2))


@pytest.mark.asyncio
@pytest.mark.allow_blocking("save_sync blocks the loop it is called from, by design")
async def test_works_from_inside_a_running_loop(tmp_path: Path) -> None:
    # It needs no loop, so it cannot deadlock on the one it blocks.
    result = astage.save_sync(state_at(4), tmp_path / "l.safetensors")
    assert result.tensors == 4
    assert_tree_staged(astage.load(tmp_path / "l.safetensors"), state_at(4))


def test_unsavable_writes_nothing(tmp_path: Path) -> None:
    with astage.SyncStager() as stager:
        with pytest.raises(astage.UnsavableError, match=r"\['x'\]\['lock'\]"):
            astage.save_sync({"x": {"lock": threading.Lock()}}, tmp_path / "u", stager=stager)
        astage.save_sync({"w": torch.ones(2)}, tmp_path / "ok.safetensors", stager=stager)
    assert files_in(tmp_path) == ["ok.safetensors"]


def test_a_write_error_keeps_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.safetensors"
    astage.save_sync(state_at(1), path)
    real = os.pwritev

    def full_disk(fd: int, buffers: Any, offset: int) -> int:
        if offset == 0:
            return real(fd, buffers, offset)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwritev", full_disk)
    with astage.SyncStager() as stager:
        with pytest.raises(astage.CheckpointWriteError, match="ENOSPC") as caught:
            astage.save_sync(state_at(2), path, stager=stager)
        assert str(path) in str(caught.value)
        monkeypatch.undo()
        stager.stage(state_at(3), timeout=2)  # the lease was released
    assert files_in(tmp_path) == ["c.safetensors"]
    assert_tree_staged(astage.load(path), state_at(1))


def test_cancel_keeps_the_previous_file_and_leaves_no_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.safetensors"
    astage.save_sync(state_at(1), path)
    slow = SlowWrites(monkeypatch, 0.3)
    before = threading.active_count()
    with astage.SyncStager() as stager:
        handle = astage.start_save_sync(state_at(2), path, stager=stager)
        assert slow.started.wait(2)
        assert handle.cancel()
        with pytest.raises(astage.CheckpointWriteError, match="cancelled"):
            handle.wait(timeout=5)
        assert handle.done() and slow.inside == 0
        stager.stage(state_at(3), timeout=2)  # not held any more
    deadline = time.monotonic() + 2
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)  # the threads are past their last callback; let them exit
    assert threading.active_count() <= before
    assert files_in(tmp_path) == ["c.safetensors"]
    assert_tree_staged(astage.load(path), state_at(1))


def test_bad_targets_stagers_and_options(tmp_path: Path) -> None:
    class Recorder:
        async def begin(self, state_dict: Any) -> None: ...
        async def write(self, path: astage.Path, tensor: torch.Tensor) -> None: ...
        async def commit(self) -> None: ...
        async def abort(self) -> None: ...

    with pytest.raises(astage.InvalidOptionsError, match="Recorder"):
        astage.save_sync({}, Recorder())  # type: ignore[arg-type]
    with pytest.raises(astage.InvalidOptionsError, match=r"target.*int"):
        astage.save_sync({}, 42)  # type: ignore[arg-type]
    with pytest.raises(astage.InvalidOptionsError, match="metadata"):
        astage.save_sync({}, astage.SafetensorsWriter(tmp_path / "w"), metadata={"a": "b"})
    with pytest.raises(astage.InvalidOptionsError, match="SyncStager"):
        astage.save_sync({}, tmp_path / "s", stager=astage.Stager())  # type: ignore[arg-type]
    with pytest.raises(astage.InvalidOptionsError, match="threads"):
        astage.save_sync({}, tmp_path / "c.safetensors", threads=0)
    assert files_in(tmp_path) == []
    writer = astage.SafetensorsWriter(tmp_path / "w.safetensors")
    astage.save_sync({"a": torch.ones(1)}, writer)
    with pytest.raises(astage.UsageError, match="already"):
        astage.save_sync({"a": torch.ones(1)}, writer)  # a writer writes one file once
    assert files_in(tmp_path) == ["w.safetensors"]


def test_a_default_device_does_not_reach_the_files(tmp_path: Path) -> None:
    """Under ``torch.set_default_device(...)`` (meta here: no data) a save still writes the
    state and a load still returns CPU tensors: the lease's byte and the loaded tensors were
    made on the default device before ("Tensor.item() cannot be called on meta tensors",
    "Bad address")."""
    source = model_state_dict()
    path = tmp_path / "model.safetensors"
    torch.set_default_device("meta")
    try:
        astage.save_sync(source, path)
        loaded = astage.load(path)
    finally:
        torch.set_default_device(None)
    assert {t.device.type for t in tensors_of(loaded)} == {"cpu"}
    assert_tree_staged(loaded, source)
