"""Defects found by hunting in the write side (writer, layout, save, save_sync), one test each.

Each test failed before its fix. The contract attacked: a saved file is either complete and
durable (fsynced, renamed into place, its folder fsynced) or not there at all, with no
temporary file left, and every failure is an astage error naming the file.
"""

from __future__ import annotations

import errno
import os
import platform
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import in_a_forked_child

import astage
from astage._files import _writer

LINUX_DIRECT = _writer._O_DIRECT != 0


def state() -> dict[str, Any]:
    # Big enough for direct I/O (whole pages, over 256 KiB), plus a small buffered tensor.
    return {"w": torch.arange(1 << 18, dtype=torch.float32), "b": torch.ones(3)}


def assert_holds(path: Path, expected: dict[str, Any]) -> None:
    back = astage.load(path)
    assert back.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(back[key], value)


def opens_refused(
    monkeypatch: pytest.MonkeyPatch, refuse: Callable[[str, int], bool], code: int
) -> None:
    """Make ``os.open`` fail with ``code`` where ``refuse(path, flags)`` says so."""
    real_open = os.open

    def fake_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if refuse(os.fsdecode(path), flags):
            raise OSError(code, os.strerror(code), path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)


# -- permissions that the buffered path has and a second open lacks ----------------------------


@pytest.mark.skipif(not LINUX_DIRECT, reason="O_DIRECT is Linux's")
def test_a_temporary_file_the_umask_makes_read_only_is_still_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The O_DIRECT descriptor is a second open of the temporary file, which needs the write
    # permission that a umask such as 0o277 (files read-only for their owner) leaves out of
    # its mode; the first open has it (O_CREAT grants it). EACCES there failed the whole
    # save, where the buffered path writes the file fine. (Simulated: root ignores modes.)
    opens_refused(monkeypatch, lambda path, flags: bool(flags & _writer._O_DIRECT), errno.EACCES)
    target = tmp_path / "c.safetensors"
    expected = state()
    astage.save_sync(expected, target)
    assert_holds(target, expected)
    assert os.listdir(tmp_path) == ["c.safetensors"]


def test_a_folder_that_cannot_be_fsynced_fails_before_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A folder this process may write but not read (mode 0o300) cannot be opened to fsync
    # it. That was found after the rename: the save failed with its new file in place, and
    # the previous one gone. Now the folder is opened first, and the save fails before
    # anything is written. (Simulated: root ignores modes.)
    folder = tmp_path / "wx"
    folder.mkdir()
    target = folder / "c.safetensors"
    previous = {"old": torch.zeros(2)}
    astage.save_sync(previous, target)
    opens_refused(
        monkeypatch,
        lambda path, flags: path.rstrip("/") == str(folder) and not flags & os.O_WRONLY,
        errno.EACCES,
    )
    with pytest.raises(astage.CheckpointWriteError, match="Permission denied") as caught:
        astage.save_sync(state(), target)
    assert str(target) in str(caught.value)
    monkeypatch.undo()
    assert os.listdir(folder) == ["c.safetensors"]
    assert_holds(target, previous)


# -- a close that fails after the fsync ---------------------------------------------------------


@pytest.mark.parametrize("face", ["sync", "async"])
def test_a_failed_close_is_a_write_error_and_nothing_is_renamed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, face: str
) -> None:
    # close() of the temporary file can fail (EIO on NFS, where it flushes). It ran outside
    # any error handling: the save raised a raw OSError instead of a CheckpointWriteError.
    real_close = os.close

    def failing_close(fd: int) -> None:
        try:
            name = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            name = ""
        real_close(fd)
        if name.endswith(".tmp") and name.startswith(str(tmp_path)):
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    target = tmp_path / "c.safetensors"
    monkeypatch.setattr(os, "close", failing_close)
    with pytest.raises(astage.CheckpointWriteError, match=r"close.*\(EIO\)") as caught:
        if face == "sync":
            astage.save_sync(state(), target)
        else:
            anyio.run(astage.save, state(), target)
    assert isinstance(caught.value.__cause__, OSError)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


# -- targets the rename would refuse, found before anything is written --------------------------


@pytest.mark.parametrize("suffix", ["/", "/.", ""])
def test_a_path_that_names_a_folder_is_refused(tmp_path: Path, suffix: str) -> None:
    # "c.safetensors/" names a folder; the writer's abspath() dropped the separator and wrote
    # a file named c.safetensors there, and "" wrote over the working directory's name.
    given = str(tmp_path / "c.safetensors") + suffix if suffix else ""
    with pytest.raises(astage.InvalidOptionsError, match="folder"):
        astage.save_sync(state(), given)
    assert os.listdir(tmp_path) == []


def test_a_folder_at_the_target_is_refused_before_staging(tmp_path: Path) -> None:
    # An existing folder at the target was found by the final rename (EISDIR), once the
    # whole checkpoint had been staged and written to the temporary file.
    target = tmp_path / "c.safetensors"
    target.mkdir()
    with pytest.raises(astage.CheckpointWriteError, match=r"EISDIR") as caught:
        astage.start_save_sync(state(), target)  # returned a handle before
    assert str(target) in str(caught.value)
    assert os.listdir(tmp_path) == ["c.safetensors"]


@pytest.mark.parametrize("no_limit", [-1, 0])
def test_a_folder_that_reports_no_name_limit_takes_any_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_limit: int
) -> None:
    # pathconf gives -1 where a filesystem has no limit to report (and some FUSE mounts say
    # 0): the check added for over-long names refused every save into such a folder.
    monkeypatch.setattr(os, "pathconf", lambda path, name: no_limit)
    expected = state()
    astage.save_sync(expected, tmp_path / "c.safetensors")
    monkeypatch.undo()
    assert_holds(tmp_path / "c.safetensors", expected)


def test_a_name_too_long_for_the_folder_is_refused_before_staging(tmp_path: Path) -> None:
    # The temporary file's name is cut to fit, so a 256-byte target name was only refused by
    # the final rename (ENAMETOOLONG), once everything was written.
    target = tmp_path / ("n" * (os.pathconf(tmp_path, "PC_NAME_MAX") + 1))
    with pytest.raises(astage.CheckpointWriteError, match=r"ENAMETOOLONG"):
        astage.start_save_sync(state(), target)  # returned a handle before
    assert os.listdir(tmp_path) == []


# -- the layout ---------------------------------------------------------------------------------


@pytest.mark.parametrize("view", ["slice", "transpose", "complex128"])
def test_a_tensor_that_spans_its_storage_is_stored_as_itself_after_its_views(
    tmp_path: Path, view: str
) -> None:
    # The first tensor met decided a storage's entry: when a view came first (a slice, a
    # transpose, a dtype safetensors lacks), the storage was stored as bytes under
    # "<storage 0>", and the whole tensor met after it could not be found by its key in any
    # safetensors reader.

    whole = torch.arange(16, dtype=torch.float32).reshape(4, 4)
    first = {"slice": whole[1:], "transpose": whole.T, "complex128": whole.view(torch.complex128)}
    saved = {"view": first[view], "whole": whole}
    target = tmp_path / "c.safetensors"
    astage.save_sync(saved, target)
    plain = safetensors.torch.load_file(target)
    assert plain.keys() == {"['whole']"}
    assert torch.equal(plain["['whole']"], whole)
    back = astage.load(target)
    assert torch.equal(back["view"], saved["view"])
    assert back["view"].stride() == first[view].stride()
    assert torch.equal(back["whole"], whole)
    assert back["view"].untyped_storage().data_ptr() == back["whole"].untyped_storage().data_ptr()


# -- what a save reports ------------------------------------------------------------------------


def test_both_faces_count_the_bytes_of_numpy_arrays(tmp_path: Path) -> None:
    # save_sync counted the file's data (numpy arrays included) and save only the storages
    # of staged tensors: the same state dict, the same file, two different nbytes (and a
    # gb_per_s of 0 for a state of numpy arrays).
    saved = {"rng": np.arange(1000, dtype=np.float64), "w": torch.ones(4)}
    blocking = astage.save_sync(saved, tmp_path / "s.safetensors")
    awaited = anyio.run(astage.save, saved, tmp_path / "a.safetensors")
    assert blocking.nbytes == awaited.nbytes == 8000 + 16


# -- the writer's threads -----------------------------------------------------------------------


def _refusing_writer_threads(monkeypatch: pytest.MonkeyPatch, refused: set[int]) -> list[str]:
    """From now on, the system refuses the writer threads started ``refused`` (1: the first)."""
    real_start = threading.Thread.start
    started: list[str] = []

    def start(thread: threading.Thread) -> None:
        if thread.name.startswith("astage-writer-"):
            started.append(thread.name)
            if len(started) in refused:
                raise RuntimeError("can't start new thread")
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    return started


def test_a_refused_writer_thread_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first thread refused: the save fails at once, its temporary file removed once.
    _refusing_writer_threads(monkeypatch, {1})
    with pytest.raises(astage.CheckpointWriteError, match="cannot start a writer thread"):
        astage.save_sync(state(), tmp_path / "c.safetensors")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


def test_refused_spare_writer_threads_are_done_without(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The threads beyond the first start only once big pieces are queued, from a writer
    # thread: one the system refuses there must neither fail the save nor hang its commit.
    monkeypatch.setattr(_writer, "SPARE_THREAD_BYTES", 1 << 10)
    monkeypatch.setattr(_writer, "SPARE_THREAD_PIECE_BYTES", 1 << 10)
    started = _refusing_writer_threads(monkeypatch, {2, 3})
    big = {f"t{i}": torch.full((1 << 16,), float(i)) for i in range(16)}
    # 64 KiB a take: the first thread leaves work queued, for which it starts the others.
    writer = astage.SafetensorsWriter(tmp_path / "big.safetensors", threads=4, chunk_bytes=1 << 16)
    astage.save_sync(big, writer)
    assert len(started) >= 2  # spares were asked for, and two of them refused
    monkeypatch.undo()
    loaded = astage.load(tmp_path / "big.safetensors")
    assert all(loaded[f"t{i}"][-1] == float(i) for i in range(16))


# -- folders a filesystem cannot fsync ----------------------------------------------------------


def test_a_filesystem_that_cannot_fsync_folders_still_saves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A filesystem with no fsync for folders (some FUSE and network mounts) answers fsync()
    # on a folder with EINVAL: nothing to flush there. Every save then failed after its
    # rename, the new file in place but reported as a CheckpointWriteError (PostgreSQL
    # ignores this error too).
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    target = tmp_path / "c.safetensors"
    expected = state()
    astage.save_sync(expected, target)
    anyio.run(astage.save, expected, target)
    monkeypatch.undo()
    assert_holds(target, expected)


def test_a_special_file_at_the_target_is_not_replaced(tmp_path: Path) -> None:
    # The rename replaced whatever was at the target: a FIFO a reader was waiting on, and for
    # root (as in many containers) a device such as /dev/null, with a regular file, without
    # a word. Only a regular file (or a link, which is replaced, not followed) is replaced.
    target = tmp_path / "c.safetensors"
    os.mkfifo(target)
    with pytest.raises(astage.CheckpointWriteError, match="not a regular file") as caught:
        astage.save_sync(state(), target)
    assert str(target) in str(caught.value)
    assert os.listdir(tmp_path) == ["c.safetensors"]
    assert stat.S_ISFIFO(os.lstat(target).st_mode)


def test_a_link_to_a_special_file_at_the_target_is_not_replaced(tmp_path: Path) -> None:
    # A link is replaced, not followed, as a rename does; but one that leads to a FIFO or a
    # device (/dev/stdout is a link to /proc/self/fd/1) was replaced by a regular file too:
    # for root, save_sync(state, "/dev/stdout") turned /dev's own link into a checkpoint.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "c.safetensors"
    link.symlink_to(fifo)
    with pytest.raises(astage.CheckpointWriteError, match="not a regular file"):
        astage.save_sync(state(), link)
    assert sorted(os.listdir(tmp_path)) == ["c.safetensors", "fifo"]
    assert link.is_symlink()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="no /proc")
def test_a_link_to_a_process_descriptor_is_not_replaced(tmp_path: Path) -> None:
    # /dev/stdout is a link to /proc/self/fd/1: with stdout sent to a regular file, the link
    # led to a file, so the save replaced /dev/stdout itself (for root) with a checkpoint.
    with open(tmp_path / "log", "w") as log:
        link = tmp_path / "c.safetensors"
        link.symlink_to(f"/proc/self/fd/{log.fileno()}")
        with pytest.raises(astage.CheckpointWriteError, match="descriptor"):
            astage.save_sync(state(), link)
    assert sorted(os.listdir(tmp_path)) == ["c.safetensors", "log"]
    assert link.is_symlink()


def test_a_platform_without_posix_fallocate_still_saves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # os.posix_fallocate exists only where the C library has it (not on macOS): the writer
    # called it unguarded, so every save there failed with a raw AttributeError, where a
    # filesystem that refuses it falls back to ftruncate.
    monkeypatch.setattr(_writer, "_fallocate", None, raising=False)  # off Linux: no fallocate(2)
    monkeypatch.delattr(os, "posix_fallocate")
    target = tmp_path / "c.safetensors"
    expected = state()
    astage.save_sync(expected, target)
    anyio.run(astage.save, expected, target)
    monkeypatch.undo()
    assert_holds(target, expected)


# -- the blocking face's handle -----------------------------------------------------------------


def test_a_sync_handle_takes_any_number_of_seconds_and_refuses_the_rest(tmp_path: Path) -> None:
    # wait(timeout=inf) (or any timeout past threading's TIMEOUT_MAX, 10**400 too) raised a raw
    # OverflowError instead of waiting; a str raised a raw TypeError; NaN timed out at once
    # ("did not end within nan s"), where the stagers refuse it as an invalid option.
    handle = astage.start_save_sync(state(), tmp_path / "c.safetensors")
    for endless in (float("inf"), 1e300, 10**400):
        assert handle.wait(timeout=endless).path == str(tmp_path / "c.safetensors")
    for bad in (float("nan"), "1", True):
        with pytest.raises(astage.InvalidOptionsError, match="timeout"):
            handle.wait(timeout=bad)  # type: ignore[arg-type]


# -- the async face's arguments -----------------------------------------------------------------


@pytest.mark.parametrize("wrong", ["sync", "str"])
def test_save_with_a_stager_of_the_other_face_is_an_invalid_option(
    tmp_path: Path, wrong: str
) -> None:
    # save_sync refuses an async Stager with an InvalidOptionsError naming stager=; save
    # given a SyncStager (or anything else) created the file, then failed with a raw
    # AttributeError ('SyncStager' object has no attribute 'stage_iter').
    with astage.SyncStager() as sync_stager:
        stager: Any = sync_stager if wrong == "sync" else "a stager"

        async def save() -> None:
            await astage.save(state(), tmp_path / "c.safetensors", stager=stager)

        with pytest.raises(astage.InvalidOptionsError, match="stager"):
            anyio.run(save)
    assert os.listdir(tmp_path) == []


# -- fork ---------------------------------------------------------------------------------------


@pytest.mark.skipif(not LINUX_DIRECT, reason="the direct I/O folder memory is Linux's")
def test_a_child_forked_while_a_writer_thread_held_the_direct_io_lock_can_save(
    tmp_path: Path,
) -> None:
    # The lock guarding the folders known to take (or refuse) direct I/O is taken by every
    # direct write. A child forked meanwhile (multiprocessing's default start method on
    # Linux, a DataLoader worker) inherited it held by a thread that does not exist there:
    # its first save waited for it forever.
    def child() -> None:
        # Tiny: a copy big enough for torch's thread pool, which is not fork-safe, could
        # hang the child on its own.
        astage.save_sync({"w": torch.ones(3)}, tmp_path / "child.safetensors")

    with _writer._direct_lock:  # as a writer thread of this process holds it at the fork
        code = in_a_forked_child(child)
    assert code == 0
    assert_holds(tmp_path / "child.safetensors", {"w": torch.ones(3)})


# -- reserving the file's space -----------------------------------------------------------------

_WITHOUT_FALLOCATE = """
import ctypes, os, platform, sys
import torch
import astage
from astage._files import _writer

# A seccomp filter that answers fallocate(2) with EOPNOTSUPP, as NFSv3, vfat and many FUSE
# filesystems do (unprivileged: no_new_privs first).
number = {"x86_64": 285, "aarch64": 47}[platform.machine()]
libc = ctypes.CDLL(None, use_errno=True)
class Instruction(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint)]
class Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Instruction))]
code = [(0x20, 0, 0, 0), (0x15, 0, 1, number), (0x06, 0, 0, 0x00050000 | 95),
        (0x06, 0, 0, 0x7FFF0000)]
instructions = (Instruction * len(code))(*[Instruction(*step) for step in code])
if libc.prctl(38, 1, 0, 0, 0) or libc.prctl(22, 2, ctypes.byref(Program(4, instructions)), 0, 0):
    sys.exit(77)  # no seccomp here

reserved_blocks = []
real_reserve = _writer._reserve
def reserve(fd, size):
    real_reserve(fd, size)
    reserved_blocks.append(os.fstat(fd).st_blocks)
_writer._reserve = reserve
target = sys.argv[1]
state = {"w": torch.arange(1 << 20, dtype=torch.float32)}
astage.save_sync(state, target)
assert torch.equal(astage.load(target)["w"], state["w"])
print(reserved_blocks[0])
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "aarch64"),
    reason="a seccomp filter on Linux's fallocate(2) stands for the filesystem",
)
def test_a_filesystem_without_fallocate_gets_no_zeros_written_first(tmp_path: Path) -> None:
    # Where the filesystem has no fallocate (NFSv3, vfat, many FUSE mounts), glibc's
    # posix_fallocate writes a byte into every block of the file instead: the whole file went
    # to the disk (over the network, on NFS) as zeros before its data, and reserved nothing
    # on NFS anyway. The writer now asks fallocate(2) itself and only sets the size there.
    target = tmp_path / "c.safetensors"
    child = subprocess.run(
        [sys.executable, "-c", _WITHOUT_FALLOCATE, str(target)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if child.returncode == 77:
        pytest.skip("seccomp filters are not allowed here")
    assert child.returncode == 0, child.stderr
    assert int(child.stdout) == 0  # the reservation wrote no block: the file is sparse


def test_an_interrupt_while_starting_the_writer_threads_leaves_none_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only a RuntimeError from starting a thread was handled: a KeyboardInterrupt there (^C
    # during save_sync) left the threads already started waiting for pieces forever, and,
    # not being daemons, they kept the interpreter from exiting. Here the ^C lands as the
    # writer's (first, and at that point only) thread has started.
    real_start = threading.Thread.start
    started: list[threading.Thread] = []

    def start(thread: threading.Thread) -> None:
        real_start(thread)
        if thread.name.startswith("astage-writer-"):
            started.append(thread)
            raise KeyboardInterrupt

    made: list[_writer.WriteThreads] = []
    real_init = _writer.WriteThreads.__init__

    def init(threads: _writer.WriteThreads, writer: _writer.SafetensorsWriter, *rest: Any) -> None:
        made.append(threads)
        real_init(threads, writer, *rest)

    monkeypatch.setattr(threading.Thread, "start", start)
    monkeypatch.setattr(_writer.WriteThreads, "__init__", init)
    try:
        with pytest.raises(KeyboardInterrupt):
            astage.save_sync(state(), tmp_path / "c.safetensors")
        started[0].join(timeout=2)
        assert not started[0].is_alive()
    finally:
        for threads in made:  # so that a failure here does not hang the interpreter's exit
            threads.abort()
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


def test_an_interrupt_as_the_sync_writer_opens_leaves_no_thread_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A ^C that came once the writer's threads had started, before open_in_threads returned,
    # closed the file under them without stopping them: they waited for pieces forever and,
    # not being daemons, kept the interpreter from exiting.
    real_open = _writer.SafetensorsWriter._open
    opened: list[_writer.SafetensorsWriter] = []

    def open_then_interrupt(
        writer: _writer.SafetensorsWriter, state_dict: Any, background: bool
    ) -> None:
        opened.append(writer)
        real_open(writer, state_dict, background)
        raise KeyboardInterrupt

    monkeypatch.setattr(_writer.SafetensorsWriter, "_open", open_then_interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            astage.save_sync(state(), tmp_path / "c.safetensors")
        threads = opened[0].write_threads
        assert threads is not None and threads.wait(timeout=2)
    finally:
        for writer in opened:  # so that a failure here does not hang the interpreter's exit
            if writer.write_threads is not None:
                writer.write_threads.abort()
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


def test_pwritev_all_resumes_short_writes_across_more_buffers_than_one_call_takes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # More buffers than IOV_MAX, each call cut short at an odd byte (as a signal or a full pipe
    # would): every byte lands once, in order. (It popped finished buffers off the list's
    # front one at a time, quadratic in their number: 200,000 small buffers took tens of
    # seconds; now an index walks the list.)
    buffers = [memoryview(bytes([i % 251]) * (1 + i % 5)) for i in range(3 * _writer._IOV_MAX)]
    real = os.pwritev

    def short(fd: int, parts: list[memoryview], offset: int) -> int:
        return real(fd, parts, offset) if len(parts) < 7 else real(fd, parts[:7], offset) - 1

    monkeypatch.setattr(os, "pwritev", short)
    path = tmp_path / "out"
    fd = os.open(path, os.O_CREAT | os.O_WRONLY)
    try:
        _writer.pwritev_all(fd, buffers, 3)
    finally:
        os.close(fd)
    assert path.read_bytes()[3:] == b"".join(bytes(b) for b in buffers)


def test_a_save_of_small_pieces_starts_one_writer_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Starting four threads cost the caller's loop 2-3 ms a save (the plan's thread waited
    # for each to start), for threads that small pieces never use.
    started = _refusing_writer_threads(monkeypatch, set())
    small = {f"t{i}": torch.full((16,), float(i)) for i in range(500)}
    astage.save_sync(small, tmp_path / "small.safetensors", threads=4)
    assert started == ["astage-writer-0:small.safetensors"]
    monkeypatch.undo()
    assert astage.load(tmp_path / "small.safetensors")["t499"][0] == 499.0
