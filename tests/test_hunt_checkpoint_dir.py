"""CheckpointDir under a demanding user's and an attacker's probing: each test a bug once found."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from conftest import gate_pwritev, in_a_fresh_interpreter
from test_checkpoint_dir import saved, state_at

import astage
from astage._files import _checkpoint_dir
from astage._files._writer import fsync_folder

# -- step numbers -------------------------------------------------------------------------------


def test_a_huge_negative_step_is_refused_as_a_step(tmp_path: Path) -> None:
    # Printing the int in the message raised Python's raw ValueError (over 4,300 digits).
    ckpts = astage.CheckpointDir(tmp_path)
    with pytest.raises(astage.InvalidOptionsError, match="non-negative"):
        ckpts.path_for(-(10**5000))


def test_a_long_named_step_is_quoted_only_briefly(tmp_path: Path) -> None:
    ckpts = astage.CheckpointDir(tmp_path)
    with pytest.raises(astage.InvalidOptionsError) as caught:
        ckpts.path_for("x" * 100_000)  # type: ignore[arg-type]
    assert len(str(caught.value)) < 500


@pytest.mark.parametrize(
    "step",
    [torch.tensor(True), torch.tensor(False), torch.tensor(7, device="meta")],
    ids=["bool tensor true", "bool tensor false", "meta tensor"],
)
def test_a_tensor_that_is_no_integer_step_is_refused(tmp_path: Path, step: Any) -> None:
    # A bool tensor was taken as step 1 or 0 (a bool is refused); a meta tensor raised a raw
    # RuntimeError (it has no value to read).
    ckpts = astage.CheckpointDir(tmp_path)
    with pytest.raises(astage.InvalidOptionsError, match="step"):
        ckpts.path_for(step)


# -- resuming while saves prune -----------------------------------------------------------------


def test_load_latest_while_a_save_prunes_loads_the_new_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader checked step 1 and is about to load it; a save publishes 2 and prunes 1.

    The reader passed over the vanished file as bad and, having listed nothing newer, resumed
    from nothing (None) with a warning, though step 2 was there.
    """
    saved(tmp_path, [1], keep=1)
    loading, go_on = threading.Event(), threading.Event()
    real_load = astage.load

    def slow_load(path: str, **options: Any) -> Any:
        if path.endswith("step_000000001.safetensors"):
            loading.set()
            go_on.wait(5)
        return real_load(path, **options)

    monkeypatch.setattr(_checkpoint_dir, "load", slow_load)
    reader = astage.CheckpointDir(tmp_path)
    found: list[Any] = []

    def run() -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            found.append(reader.load_latest())
        found.append(caught)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert loading.wait(5)
    saved(tmp_path, [2], keep=1)
    assert astage.CheckpointDir(tmp_path).steps() == [2]
    go_on.set()
    thread.join(5)
    result, caught = found
    assert result is not None and result[0] == 2 == result[1]["step"]
    assert reader.skipped == () and caught == []


# -- moving `latest` ----------------------------------------------------------------------------


def test_a_short_write_of_latest_is_written_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A write to a nearly full disk may write part of its bytes and return their count: the
    # rest was dropped, and `latest` named "step_00000" (resuming warned and scanned).
    real = os.write

    def short(fd: int, data: Any) -> int:
        if bytes(data).endswith(b".safetensors\n"):
            return real(fd, bytes(data)[:10])
        return real(fd, data)

    monkeypatch.setattr(os, "write", short)
    saved(tmp_path, [1, 2])
    assert (tmp_path / "latest").read_text() == "step_000000002.safetensors\n"


def test_a_pointer_that_fails_and_cannot_be_deleted_reports_the_write_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An I/O error, after which the folder went read-only: the temporary file's unlink raised a
    # raw OSError (EROFS) in place of the CheckpointWriteError naming the pointer.
    saved(tmp_path, [1])
    real_fsync, real_unlink = os.fsync, os.unlink

    def failing_fsync(fd: int) -> None:
        if ".latest." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    def failing_unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        if ".latest." in os.fspath(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    monkeypatch.setattr(os, "unlink", failing_unlink)
    with pytest.raises(astage.CheckpointWriteError, match=r"latest.*Input/output error"):
        saved(tmp_path, [2])
    monkeypatch.undo()
    assert astage.CheckpointDir(tmp_path).latest_step() == 1  # and the leftover is tidied
    assert sorted(os.listdir(tmp_path)) == [
        "latest",
        "step_000000001.safetensors",
        "step_000000002.safetensors",
    ]


def test_latest_never_moves_back_after_a_failed_folder_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step 2 (started second) moves `latest`, but the folder's fsync after it fails; then
    step 1 (started first) publishes.

    The failed sync was taken for a pointer that did not move: step 1 then moved `latest` back
    to itself, a save that started before the one `latest` named.
    """
    real_pwritev, real_sync = os.pwritev, fsync_folder
    writing, go_on = threading.Event(), threading.Event()

    def slow(fd: int, buffers: Any, offset: int) -> int:
        if offset > 0 and "step_000000001" in os.readlink(f"/proc/self/fd/{fd}"):
            writing.set()
            go_on.wait(5)
        return real_pwritev(fd, buffers, offset)

    def failing_sync(folder: str) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "pwritev", slow)

    async def main() -> None:
        async with (
            astage.CheckpointDir(tmp_path, keep=None) as first,
            astage.CheckpointDir(tmp_path, keep=None) as second,
        ):
            handle = await first.start_save(1, {"w": torch.ones(1 << 12)})
            with anyio.fail_after(5):
                while not writing.is_set():
                    await anyio.sleep(0.005)
            monkeypatch.setattr(_checkpoint_dir, "fsync_folder", failing_sync)
            with pytest.raises(astage.CheckpointWriteError, match="Input/output error"):
                await second.save(2, state_at(2))
            monkeypatch.setattr(_checkpoint_dir, "fsync_folder", real_sync)
            go_on.set()
            await handle

    anyio.run(main)
    assert (tmp_path / "latest").read_text() == "step_000000002.safetensors\n"


# -- the folder ---------------------------------------------------------------------------------


@pytest.mark.parametrize("root", ["", b""])
def test_an_empty_root_is_refused(root: Any) -> None:
    # It was taken for the current folder (os.path.abspath("")): an unset setting saved,
    # pruned and tidied wherever the process happened to run.
    with pytest.raises(astage.InvalidOptionsError, match="root is empty"):
        astage.CheckpointDir(root)


def test_a_second_task_entering_meanwhile_is_refused(tmp_path: Path) -> None:
    # Both passed the "already entered" check while the first one's tidying ran in a thread;
    # the second's task group replaced the first's, and leaving the blocks raised anyio's raw
    # RuntimeError (a cancel scope exited in another task).
    ckpts = astage.CheckpointDir(tmp_path)
    outcomes: list[str] = []

    async def enter() -> None:
        try:
            async with ckpts:
                await anyio.sleep(0.05)
        except astage.UsageError as error:
            outcomes.append(f"UsageError: {error}")
        else:
            outcomes.append("entered")

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(enter)
            tg.start_soon(enter)

    anyio.run(main)
    assert sorted(outcomes) == [
        "UsageError: " + f"CheckpointDir({str(tmp_path)!r}) is already entered",
        "entered",
    ]


def test_a_file_damaged_in_place_with_its_mtime_put_back_is_checked_again(
    tmp_path: Path,
) -> None:
    # Files found good are remembered by (inode, size, mtime): bytes rewritten in place at the
    # same size, with the old mtime put back (os.utime, as `touch -r` or a restore tool does),
    # were still vouched for, and a corrupt step was resumed from.
    saved(tmp_path, [1, 2])
    ckpts = astage.CheckpointDir(tmp_path)
    assert ckpts.latest_step() == 2
    path = tmp_path / "step_000000002.safetensors"
    before = path.stat()
    time.sleep(0.02)  # past the clock tick of file times (coarse: up to 10 ms)
    with open(path, "r+b") as file:
        file.write(b"\xff" * 8)  # a header length no file has
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.warns(astage.CheckpointSkippedWarning, match="step_000000002"):
        assert ckpts.latest_step() == 1


# -- two processes on one folder ----------------------------------------------------------------


def test_a_reader_in_another_process_leaves_a_running_saves_file_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An evaluation job polls ``latest_step()`` while training writes a checkpoint.

    Its first use tidied the folder: the save's temporary file, which no save of *its*
    process was writing, was deleted as a crashed save's, and the save failed (ENOENT at its
    rename).
    """
    writing, go_on = gate_pwritev(monkeypatch, seconds=10)
    orphan = tmp_path / ".step_000000007.safetensors.0123456789ab.tmp"

    async def main() -> None:
        async with astage.CheckpointDir(tmp_path) as ckpts:
            handle = await ckpts.start_save(1, {"w": torch.ones(1 << 12)})
            with anyio.fail_after(5):
                while not writing.is_set():
                    await anyio.sleep(0.005)
            orphan.write_bytes(b"\0" * 100)  # a crashed save's: left for a later use too
            reader = await anyio.to_thread.run_sync(
                in_a_fresh_interpreter,
                f"import astage; print(astage.CheckpointDir({str(tmp_path)!r}).latest_step())",
            )
            assert reader.returncode == 0 and reader.stdout == "None\n", reader.stderr
            go_on.set()
            await handle

    anyio.run(main)
    assert orphan.exists()
    assert astage.CheckpointDir(tmp_path).latest_step() == 1  # no save runs: tidied now
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_000000001.safetensors"]


def test_a_failed_background_save_lets_go_of_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A background save holds the folder's shared lock while it writes; one that fails must
    # let go, or tidying (in this process as in others) would wait for it for ever.
    real = os.pwritev

    def full_disk(fd: int, buffers: Any, offset: int) -> int:
        if offset > 0:  # the write in the background, after start_save returned
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", full_disk)
    ckpts = astage.CheckpointDir(tmp_path, keep=None)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            handle = await ckpts.start_save(1, {"w": torch.ones(1 << 12)}, task_group=tg)
            with pytest.raises(astage.CheckpointWriteError):
                await handle
            tg.cancel_scope.cancel()

    with pytest.raises(BaseExceptionGroup) as caught:  # the owner sees the write's error
        anyio.run(main)
    assert caught.group_contains(astage.CheckpointWriteError)
    # Another process's tidying takes the lock exclusively: an open file of its own, as here.
    folder = os.open(tmp_path, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError while held
    finally:
        os.close(folder)


@pytest.mark.parametrize("stager", [astage.SyncStager, object], ids=["SyncStager", "object"])
def test_a_stager_of_another_kind_is_refused_at_once(tmp_path: Path, stager: Any) -> None:
    # It was taken, and the first save (after making the folder) raised astage.save's advice
    # to use save_sync, which a CheckpointDir does not have.
    given = stager()
    try:
        with pytest.raises(astage.InvalidOptionsError, match=r"stager must be an astage\.Stager"):
            astage.CheckpointDir(tmp_path / "run", stager=given)
    finally:
        if isinstance(given, astage.SyncStager):
            given.close()
    assert not (tmp_path / "run").exists()


def test_after_aclose_saving_raises_and_reading_works(tmp_path: Path) -> None:
    # What writers.md says of a closed folder (it said "the folder raises" of every use).
    ckpts = astage.CheckpointDir(tmp_path)

    async def main() -> None:
        await ckpts.save(1, state_at(1))
        await ckpts.aclose()
        await ckpts.aclose()  # twice is fine
        with pytest.raises(astage.ClosedError, match="closed"):
            await ckpts.save(2, state_at(2))
        async with anyio.create_task_group() as tg:
            with pytest.raises(astage.ClosedError, match="closed"):
                await ckpts.start_save(2, state_at(2), task_group=tg)
        with pytest.raises(astage.ClosedError, match="closed"):
            async with ckpts:
                pass

    anyio.run(main)
    loaded = ckpts.load_latest()
    assert ckpts.latest_step() == 1 and ckpts.steps() == [1]
    assert loaded is not None and loaded[0] == 1


@pytest.mark.parametrize(("name", "value"), [("keep", 0), ("keep", "3"), ("threads", 0)])
def test_a_bad_keep_or_threads_set_later_is_refused(
    tmp_path: Path, name: str, value: object
) -> None:
    # Checked at construction only: keep=0 set later pruned every step but the newest, and
    # keep="3" failed the save in its writer thread with a raw TypeError.
    ckpts = astage.CheckpointDir(tmp_path, keep=3)
    with pytest.raises(astage.InvalidOptionsError, match=name):
        setattr(ckpts, name, value)
    assert (ckpts.keep, ckpts.threads) == (3, 4)
    ckpts.keep = None  # keep every checkpoint from here on
    assert ckpts.keep is None


def test_a_child_forked_during_a_save_does_not_keep_the_folder_locked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The child inherited the save's locked descriptor of the folder: the folder stayed locked
    # (no tidying anywhere) while the child lived, though the parent's save had ended.
    writing, go_on = gate_pwritev(monkeypatch)
    child = 0

    async def main() -> None:
        nonlocal child
        async with astage.CheckpointDir(tmp_path) as ckpts:
            handle = await ckpts.start_save(1, {"w": torch.ones(1 << 12)})
            with anyio.fail_after(5):
                while not writing.is_set():
                    await anyio.sleep(0.005)
            child = os.fork()
            if child == 0:  # pragma: no cover - the child: lives on a while, then ends
                time.sleep(3)
                os._exit(0)
            go_on.set()
            await handle

    try:
        anyio.run(main)
        folder = os.open(tmp_path, os.O_RDONLY)
        try:
            fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError while held
        finally:
            os.close(folder)
    finally:
        if child:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
