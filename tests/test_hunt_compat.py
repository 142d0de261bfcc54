"""Bugs found by hunting in ``astage.compat``, ``astage.lightning`` and the CLI, one test each.

Each test failed before its fix. The DCP checkpoints here are one process's (``no_dist=True``).
"""

from __future__ import annotations

import io
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint import state_dict_loader, state_dict_saver
from torch.distributed.checkpoint.filesystem import FileSystemReader as DcpFileSystemReader
from torch.distributed.checkpoint.metadata import Metadata

import astage
from astage import compat
from astage.compat import FileSystemReader, FileSystemWriter

pytestmark = pytest.mark.filterwarnings(
    "ignore:torch.distributed is disabled:UserWarning",
    "ignore:Detected an existing checkpoint:UserWarning",
)


@pytest.fixture
def alarm() -> Iterator[None]:
    """Fail a test that blocks (a FIFO's open) instead of hanging the suite."""

    def expired(signum: int, frame: Any) -> None:
        raise TimeoutError("blocked for 20 s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(20)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def saved(path: Path) -> Path:
    state = {"w": torch.arange(12.0).reshape(3, 4), "objects": [1, "two"]}
    state_dict_saver.save(state, storage_writer=FileSystemWriter(path), no_dist=True)
    return path


def read_metadata(path: Path) -> Metadata:
    with open(path / ".metadata", "rb") as stream:
        metadata = pickle.load(stream)
    assert isinstance(metadata, Metadata)
    return metadata


def rewrite_metadata(path: Path, change: Callable[[Metadata], None]) -> None:
    metadata = read_metadata(path)
    change(metadata)
    with open(path / ".metadata", "wb") as stream:
        pickle.dump(metadata, stream)


def load_failure(path: Path, into: dict[str, Any] | None = None) -> BaseException:
    """The error the reader raised in ``dcp.load`` (DCP wraps it; this digs it out)."""
    if into is None:
        into = {"w": torch.zeros(3, 4), "objects": [0, ""]}
    with pytest.raises(BaseException) as caught:  # DCP's CheckpointException is one
        state_dict_loader.load(into, storage_reader=FileSystemReader(path), no_dist=True)
    error: BaseException = caught.value
    failures = getattr(error, "failures", None)
    if failures:  # CheckpointException: {rank: (error, traceback)}
        error = next(iter(failures.values()))[0]
    return error


def w_record(metadata: Metadata) -> Any:
    return next(record for index, record in metadata.storage_data.items() if index.fqn == "w")


# -- the reader: files that are not regular files ------------------------------------------------


def plant(path: Path, kind: str) -> None:
    """Put a FIFO, a folder or a link to /dev/zero where the file ``path`` was."""
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero")


@pytest.mark.parametrize("kind", ["fifo", "folder", "dev_zero"])
@pytest.mark.parametrize("writer", ["astage", "dcp"])
def test_a_data_file_that_is_not_a_regular_file_is_refused(
    tmp_path: Path, alarm: None, kind: str, writer: str
) -> None:
    """A FIFO under a data file's name blocked the load forever in ``os.open`` (astage's raw
    items) or in DCP's reader (a checkpoint of DCP's own writer); a folder was an
    IsADirectoryError, not an astage error."""
    if writer == "astage":
        saved(tmp_path)
    else:
        state = {"w": torch.arange(12.0).reshape(3, 4), "objects": [1, "two"]}
        state_dict_saver.save(state, checkpoint_id=tmp_path, no_dist=True)  # DCP's own writer
    plant(tmp_path / "__0_0.distcp", kind)
    error = load_failure(tmp_path)
    assert isinstance(error, astage.CheckpointFormatError), repr(error)
    assert str(error) == f"{tmp_path / '__0_0.distcp'}: not a regular file"


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_metadata_file_that_is_not_a_regular_file_is_refused(
    tmp_path: Path, alarm: None, kind: str
) -> None:
    """``.metadata`` was read with ``open().read()``: a FIFO blocked it, a folder was an
    IsADirectoryError."""
    plant(saved(tmp_path) / ".metadata", kind)
    with pytest.raises(astage.CheckpointFormatError, match=r"\.metadata: not a regular file"):
        FileSystemReader(tmp_path).read_metadata()


_READ_DEV_ZERO = """
import resource, sys
from astage.compat import FileSystemReader
from astage import CheckpointFormatError
pages = int(open("/proc/self/statm").read().split()[0])
room = pages * resource.getpagesize() + (1 << 30)  # what is mapped now, and 1 GiB more
resource.setrlimit(resource.RLIMIT_AS, (room, room))
try:
    FileSystemReader(sys.argv[1]).read_metadata()
except CheckpointFormatError as error:
    print(error)
"""


def test_a_metadata_file_linked_to_dev_zero_is_refused(tmp_path: Path) -> None:
    """A ``.metadata`` linked to /dev/zero was read until memory ran out (the OOM killer ended
    the test process): read here in a child process whose memory is capped."""
    plant(saved(tmp_path) / ".metadata", "dev_zero")
    done = subprocess.run(
        [sys.executable, "-c", _READ_DEV_ZERO, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == f"{tmp_path / '.metadata'}: not a regular file"


# -- the reader: fields of the metadata ------------------------------------------------------------


def _set(path: str, value: Any) -> Callable[[Metadata], None]:
    """A change of the metadata: the field at ``path`` (from the entry or record of w)."""

    def change(metadata: Metadata) -> None:
        root, _, rest = path.partition(".")
        if root == "record":
            obj: Any = w_record(metadata)
        elif root == "entry":
            obj = metadata.state_dict_metadata["w"]
        else:
            obj, rest = metadata, path
        *parents, name = rest.split(".")
        for parent in parents:
            obj = obj[int(parent)] if parent.isdigit() else getattr(obj, parent)
        if name.isdigit():
            obj[int(name)] = value
        else:
            setattr(obj, name, value)

    return change


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("record.relative_path", 5, r"storage_data\['w' at .*\]\.relative_path is 5"),
        ("record.relative_path", b"x", r"\.relative_path is b'x'"),
        ("record.relative_path", "../__0_0.distcp", r"\.relative_path is '\.\./__0_0"),
        ("record.offset", "3", r"\.offset is '3', not a non-negative integer"),
        ("record.offset", 3.5, r"\.offset is 3\.5"),
        ("record.length", -1, r"\.length is -1"),
        ("record.transform_descriptors", 5, r"\.transform_descriptors is 5"),
        ("entry.properties.dtype", 5, r"\['w'\]\.properties\.dtype is 5, not a torch\.dtype"),
        ("entry.properties", None, r"\['w'\]\.properties is None"),
        ("entry.size", torch.Size([3, -4]), r"\['w'\]\.size is torch\.Size\(\[3, -4\]\)"),
        ("entry.chunks", None, r"\['w'\]\.chunks is None, not a list"),
        ("entry.chunks.0", 7, r"\['w'\]\.chunks\[0\] is 7"),
        ("entry.chunks.0.sizes", torch.Size([12]), r"chunks\[0\]: .* do not have the 2 dim"),
        ("entry.chunks.0.sizes", [3, "4"], r"chunks\[0\]\.sizes is \[3, '4'\]"),
        # a negative size made DCP's planner skip the tensor: the load "succeeded" without it
        ("entry.chunks.0.sizes", torch.Size([3, -4]), r"chunks\[0\]\.sizes is torch\.Size"),
        ("entry.chunks.0.offsets", torch.Size([1, 0]), r"chunks\[0\]: .* reach outside"),
        ("state_dict_metadata", [], r"state_dict_metadata is \[\], not a dict"),
        ("storage_data", [], r"storage_data is \[\], not a dict"),
        ("storage_meta", [1], r"storage_meta is \[1\], not a StorageMeta"),
    ],
)
def test_a_bad_metadata_field_is_a_format_error_naming_it(
    tmp_path: Path, field: str, value: Any, named: str
) -> None:
    """Any allowed object can sit in any field of a crafted ``.metadata``: a wrong one was a
    TypeError, IndexError or AttributeError from inside DCP's planner or this reader, and a
    negative chunk size loaded without error, the tensor left as it was."""
    rewrite_metadata(saved(tmp_path), _set(field, value))
    with pytest.raises(astage.CheckpointFormatError, match=named) as caught:
        FileSystemReader(tmp_path).read_metadata()
    assert str(caught.value).startswith(f"{tmp_path / '.metadata'}: ")
    # dcp.load fails with it too (DCP wraps a failed metadata read in an AssertionError that
    # quotes it), where a negative chunk size loaded without error, the tensor left as it was
    assert re.search(named, str(load_failure(tmp_path)))


def test_a_missing_metadata_field_is_a_format_error_naming_it(tmp_path: Path) -> None:
    """A pickle can build an object without calling its constructor: a field may be absent."""
    rewrite_metadata(saved(tmp_path), lambda metadata: delattr(metadata, "state_dict_metadata"))
    with pytest.raises(astage.CheckpointFormatError, match="state_dict_metadata is missing"):
        FileSystemReader(tmp_path).read_metadata()


def test_the_checked_metadata_of_both_writers_still_loads(tmp_path: Path) -> None:
    """The checks refuse nothing either writer writes (empty tensors and bytes items too)."""
    state: dict[str, Any] = {"w": torch.arange(12.0).reshape(3, 4), "e": torch.empty(0, 3)}
    state["o"] = [1, "two"]
    for writer, folder in (("astage", tmp_path / "a"), ("dcp", tmp_path / "d")):
        if writer == "astage":
            state_dict_saver.save(state, storage_writer=FileSystemWriter(folder), no_dist=True)
        else:
            state_dict_saver.save(state, checkpoint_id=folder, no_dist=True)
        into: dict[str, Any] = {"w": torch.zeros(3, 4), "e": torch.empty(0, 3), "o": [0, ""]}
        state_dict_loader.load(into, storage_reader=FileSystemReader(folder), no_dist=True)
        assert torch.equal(into["w"], state["w"]) and into["o"] == [1, "two"], writer


# -- the writer ----------------------------------------------------------------------------------


def test_saves_without_collectives_leave_no_replaced_data_files(tmp_path: Path) -> None:
    """With ``use_collectives=False`` each rank commits ``__{rank}.metadata``; saving over it
    writes fresh data file names, and the replaced ones were never removed: one more file
    per save, forever. Another rank's files stay (its own metadata names them)."""
    other_rank = tmp_path / "__1_0.distcp"
    other_rank.write_bytes(b"rank 1's data")
    for step in range(3):
        state_dict_saver.save(
            {"w": torch.full((4,), float(step))},
            storage_writer=FileSystemWriter(tmp_path),
            no_dist=True,
            use_collectives=False,
        )
    names = sorted(os.listdir(tmp_path))
    # rank 0's metadata, the one data file it names, rank 1's file
    assert len(names) == 3, names
    assert names[0] == "__0.metadata" and names[1].startswith("__0_"), names
    assert names[2] == "__1_0.distcp", names
    assert other_rank.read_bytes() == b"rank 1's data"
    into = {"w": torch.zeros(4)}
    state_dict_loader.load(into, storage_reader=FileSystemReader(tmp_path), no_dist=True)
    assert torch.equal(into["w"], torch.full((4,), 2.0))


@pytest.mark.parametrize("where", ["file", "file/sub"])
@pytest.mark.parametrize("how", ["save", "async_save"])
def test_a_checkpoint_folder_that_cannot_be_made_is_a_write_error(
    tmp_path: Path, where: str, how: str
) -> None:
    """A file where the folder goes (or on its path) was a raw FileExistsError or
    NotADirectoryError from ``os.makedirs``, not an astage error naming the folder."""
    (tmp_path / "file").write_bytes(b"not a folder")
    folder = tmp_path / where
    writer = FileSystemWriter(folder)
    with pytest.raises(BaseException) as caught:  # DCP's CheckpointException is one
        if how == "save":
            state_dict_saver.save({"w": torch.ones(3)}, storage_writer=writer, no_dist=True)
        else:
            future = state_dict_saver.async_save(
                {"w": torch.ones(3)}, storage_writer=writer, no_dist=True
            )
            assert isinstance(future, Future)
            future.result()
    writer.close()
    failures = getattr(caught.value, "failures", None)
    assert failures, repr(caught.value)
    error = next(iter(failures.values()))[0]
    assert isinstance(error, astage.CheckpointWriteError), repr(error)
    assert str(error).startswith(f"cannot make the checkpoint folder {folder}: ")
    assert os.listdir(tmp_path) == ["file"]


# -- the stagers ---------------------------------------------------------------------------------


def _stage_and_fail(stage: Callable[[Any], Any]) -> BaseException:
    """Stage a dict whose second value cannot be staged; the error, kept by the caller."""
    with pytest.raises(astage.UnstageableError) as caught:
        stage({"a": torch.ones(1000), "lock": threading.Lock()})
    return caught.value


@pytest.mark.parametrize("make", ["default", "default_async", "blocking"])
def test_a_failed_staging_whose_error_is_kept_holds_no_buffer_set(make: str) -> None:
    """A staging that failed half-way left its buffer set in the pool, counted as in use for
    as long as its error lived (the traceback holds the tensors staged before it): every
    failed save whose error (or future) was kept added one more set, a copy of the state."""
    if make == "blocking":
        stager: Any = compat.BlockingAsyncStager(cache_staged_state_dict=True)
    else:
        stager = compat.DefaultStager(
            compat.StagingOptions(False, False, make == "default_async", False)
        )

    def stage(state: Any) -> Any:
        staged = stager.stage(state)
        return staged.result() if isinstance(staged, Future) else staged

    good = {"a": torch.ones(1000), "b": torch.ones(10)}
    kept = []
    try:
        for _ in range(4):
            kept.append(_stage_and_fail(stage))
            stage(good)  # the snapshot is dropped at once: its set is free again
        assert stager.cache_info().nbytes == 1010 * 4, (len(kept), stager.cache_info())
    finally:
        stager.close()


# -- the Lightning plugin ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "folder", "dev_zero"])
def test_the_plugin_refuses_to_load_what_is_not_a_regular_file(
    tmp_path: Path, alarm: None, kind: str
) -> None:
    """``load_checkpoint`` of a FIFO blocked forever in torch.load's open, of /dev/zero read
    without end, of a folder raised a raw IsADirectoryError."""
    pytest.importorskip("lightning")
    from astage.lightning import AstageCheckpointIO

    target = tmp_path / "x.ckpt"
    target.write_bytes(b"")
    plant(target, kind)
    plugin = AstageCheckpointIO()
    try:
        with pytest.raises(astage.CheckpointFormatError) as caught:
            plugin.load_checkpoint(target)
        assert (
            str(caught.value) == f"cannot load the checkpoint {str(target)!r}: not a regular file"
        )
    finally:
        plugin.teardown()


def test_type_check_takes_a_state_dict_with_a_cycle() -> None:
    """``BlockingAsyncStager(type_check=True)`` recursed around a cycle until a RecursionError,
    where the stager itself keeps cycles; a bad value in one is still named by its path."""
    stager = compat.BlockingAsyncStager(type_check=True)
    try:
        loop: list[Any] = [torch.ones(2)]
        loop.append(loop)
        staged = stager.stage({"loop": loop, "shared": loop})
        assert staged["loop"][1] is staged["loop"] and staged["shared"] is staged["loop"]
        assert torch.equal(staged["loop"][0], torch.ones(2))
        loop.append({"lock": threading.Lock()})
        with pytest.raises(astage.UnstageableError, match=r"^at \['loop'\]\[2\]\['lock'\]: type_"):
            stager.stage({"loop": loop})
    finally:
        stager.close()


def test_a_save_without_collectives_leaves_the_global_checkpoint_whole_until_it_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save with ``use_collectives=False`` checked only for its own ``__0.metadata`` before
    choosing its file names: over a folder with a committed global ``.metadata`` (which DCP
    loads first) it replaced ``__0_0.distcp`` in place, so a save that then failed before its
    commit changed what the committed checkpoint loads."""
    state_dict_saver.save(
        {"w": torch.zeros(4)}, storage_writer=FileSystemWriter(tmp_path), no_dist=True
    )

    def crash(self: FileSystemWriter, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the process died before its commit")

    monkeypatch.setattr(FileSystemWriter, "finish", crash)
    with pytest.raises(RuntimeError, match="before its commit"):
        state_dict_saver.save(
            {"w": torch.ones(4)},
            storage_writer=FileSystemWriter(tmp_path),
            no_dist=True,
            use_collectives=False,
        )
    into = {"w": torch.full((4,), 7.0)}
    state_dict_loader.load(into, storage_reader=FileSystemReader(tmp_path), no_dist=True)
    assert torch.equal(into["w"], torch.zeros(4)), into


def test_a_save_without_collectives_keeps_the_files_of_the_global_checkpoint(
    tmp_path: Path,
) -> None:
    """The removal of replaced data files after a save without collectives (above) must not
    take the files a global ``.metadata`` in the same folder names: DCP loads that one first."""
    state_dict_saver.save(
        {"w": torch.zeros(4)}, storage_writer=FileSystemWriter(tmp_path), no_dist=True
    )
    state_dict_saver.save(
        {"w": torch.ones(4)},
        storage_writer=FileSystemWriter(tmp_path),
        no_dist=True,
        use_collectives=False,
    )
    into = {"w": torch.full((4,), 7.0)}
    state_dict_loader.load(into, storage_reader=FileSystemReader(tmp_path), no_dist=True)
    assert torch.equal(into["w"], torch.zeros(4)), into  # the global checkpoint, whole


def test_a_collective_save_leaves_a_ranks_own_checkpoint_whole_until_it_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other way round: over a folder holding only ``__0.metadata`` (a save without
    collectives, what DCP loads when there is no global ``.metadata``), a collective save
    replaced ``__0_0.distcp`` in place before its commit."""
    state_dict_saver.save(
        {"w": torch.zeros(4)},
        storage_writer=FileSystemWriter(tmp_path),
        no_dist=True,
        use_collectives=False,
    )

    def crash(self: FileSystemWriter, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the process died before its commit")

    monkeypatch.setattr(FileSystemWriter, "finish", crash)
    with pytest.raises(BaseException, match="before its commit"):  # DCP wraps it
        state_dict_saver.save(
            {"w": torch.ones(4)}, storage_writer=FileSystemWriter(tmp_path), no_dist=True
        )
    into = {"w": torch.full((4,), 7.0)}
    state_dict_loader.load(into, storage_reader=FileSystemReader(tmp_path), no_dist=True)
    assert torch.equal(into["w"], torch.zeros(4)), into


# -- the command ---------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["ascii", "latin-1"])
def test_inspect_escapes_what_stdout_cannot_encode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, encoding: str
) -> None:
    """A key the terminal's encoding cannot hold made ``astage inspect`` die with a
    UnicodeEncodeError traceback (exit status 1), where it promises a report and never a
    traceback; now such characters are escaped."""
    from astage._cli import main

    path = tmp_path / "ckpt.safetensors"
    astage.save_sync({"gewicht_\u00fc": torch.ones(2), "\u6743\u91cd": torch.zeros(3)}, path)
    raw = io.BytesIO()
    stdout = io.TextIOWrapper(raw, encoding=encoding, newline="\n")
    monkeypatch.setattr(sys, "stdout", stdout)
    assert main(["inspect", str(path)]) == 0
    stdout.flush()
    text = raw.getvalue().decode(encoding)
    assert "['\\u6743\\u91cd']: tensor(float32, [3])" in text, text
    ue = "\u00fc" if encoding == "latin-1" else "\\xfc"
    assert f"['gewicht_{ue}']: tensor(float32, [2])" in text, text


def test_a_save_the_writer_thread_cannot_take_is_refused_not_left_pending(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the interpreter shuts down, a ThreadPoolExecutor takes no more work: a last save
    then (an atexit or signal handler's) raised a raw RuntimeError and left its write pending
    forever, so ``wait()`` and a load of that path would wait for it forever."""
    pytest.importorskip("lightning")
    import concurrent.futures.thread

    from astage.lightning import AstageCheckpointIO

    plugin = AstageCheckpointIO()
    target = tmp_path / "last.ckpt"
    try:
        monkeypatch.setattr(concurrent.futures.thread, "_shutdown", True)
        with pytest.raises(astage.CheckpointWriteError, match=r"last\.ckpt.*interpreter shutdown"):
            plugin.save_checkpoint({"w": torch.ones(4)}, target)
        monkeypatch.undo()
        assert plugin.stats.pending == 0
        assert plugin.wait(timeout=5)
        with pytest.raises(astage.CheckpointNotFoundError):
            plugin.load_checkpoint(target)
        plugin.save_checkpoint({"w": torch.ones(4)}, target)  # its snapshot was given back
        assert torch.equal(plugin.load_checkpoint(target)["w"], torch.ones(4))
    finally:
        plugin.teardown()


def test_a_truncated_data_file_of_dcps_own_writer_is_a_format_error(tmp_path: Path) -> None:
    """A checkpoint of DCP's own writer goes through DCP's reader: its truncated data file was
    torch's raw ``RuntimeError: PytorchStreamReader failed reading zip archive``. The reader
    checks each item against its file first (in the fix of the non-regular data files)."""
    state_dict_saver.save({"w": torch.arange(100.0)}, checkpoint_id=tmp_path, no_dist=True)
    os.truncate(tmp_path / "__0_0.distcp", 100)
    error = load_failure(tmp_path, {"w": torch.zeros(100)})
    assert isinstance(error, astage.CheckpointFormatError), repr(error)
    assert str(error).startswith(f"{tmp_path / '__0_0.distcp'} (w): the item lies outside the file")


def test_a_healthy_checkpoint_of_dcps_own_writer_is_read_in_one_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Items of DCP's own format are handed to DCP's reader together, as DCP reads them (each
    file opened once for all its items); only a failure reads them again one by one, to name
    the damaged item. One call per item made loading 20,000 small tensors 1.4x as long."""
    state = {f"t{i}": torch.full((3,), float(i)) for i in range(20)}
    state_dict_saver.save(state, checkpoint_id=tmp_path, no_dist=True)
    calls: list[int] = []
    dcp_read = DcpFileSystemReader.read_data

    def counted(self: Any, plan: Any, planner: Any) -> Any:
        calls.append(len(plan.items))
        return dcp_read(self, plan, planner)

    monkeypatch.setattr(DcpFileSystemReader, "read_data", counted)
    into = {key: torch.zeros(3) for key in state}
    state_dict_loader.load(into, storage_reader=FileSystemReader(tmp_path), no_dist=True)
    assert calls == [len(state)]
    assert all(torch.equal(into[key], value) for key, value in state.items())


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # a flipped byte
def test_a_damaged_item_of_dcps_own_writer_is_a_format_error_naming_it(tmp_path: Path) -> None:
    """DCP's reader let torch.load's RuntimeError (a damaged zip), a UnicodeDecodeError, an
    UnpicklingError or a ValueError through for a damaged item of DCP's own format; each
    is a CheckpointFormatError naming the file and the item now. Every 13th byte flipped in
    turn: the load reads (tensor data has no checksum in DCP's format) or refuses so."""
    state = {"w": torch.arange(100.0), "o": [1, 2]}
    state_dict_saver.save(state, checkpoint_id=tmp_path, no_dist=True)
    data = tmp_path / "__0_0.distcp"
    whole = data.read_bytes()
    record = w_record(read_metadata(tmp_path))
    damaged = bytearray(whole)
    damaged[record.offset : record.offset + 4] = b"XXXX"  # the zip header of the item
    data.write_bytes(damaged)
    error = load_failure(tmp_path, {"w": torch.zeros(100), "o": [0, 0]})
    assert isinstance(error, astage.CheckpointFormatError), repr(error)
    assert str(error).startswith(f"{data} (w): DCP's reader cannot read the item (")
    for at in range(0, len(whole), 13):
        damaged = bytearray(whole)
        damaged[at] ^= 0xFF
        data.write_bytes(damaged)
        into: dict[str, Any] = {"w": torch.zeros(100), "o": [0, 0]}
        try:
            state_dict_loader.load(into, storage_reader=FileSystemReader(tmp_path), no_dist=True)
        except BaseException as caught:  # noqa: BLE001 - DCP's CheckpointException is one
            failures = getattr(caught, "failures", None)
            assert failures, (at, repr(caught))
            cause = next(iter(failures.values()))[0]
            assert isinstance(cause, astage.CheckpointFormatError), (at, repr(cause))


def test_a_close_during_an_async_stage_call_leaves_no_thread_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``DefaultStager.stage`` checked for close() and then handed the call to its staging
    thread: a close() from another thread in between had shut that thread down, and the call
    started a new one that nothing would shut down (its future then failed). Now the call is
    refused as a closed stager's, and no thread is left."""
    from astage._drivers._base import mark_devices as real_mark_devices
    from astage.compat import _worker

    stager = compat.DefaultStager(compat.StagingOptions(False, False, True, False))
    checked, closed = threading.Event(), threading.Event()

    def mark_devices_then_wait(devices: Any) -> Any:
        checked.set()  # stage() is past its check for close()
        assert closed.wait(10)
        return real_mark_devices(devices)

    monkeypatch.setattr(_worker, "mark_devices", mark_devices_then_wait)
    outcome: list[Any] = []
    caller = threading.Thread(
        target=lambda: outcome.append(_try(stager.stage, {"a": torch.ones(2)}))
    )
    caller.start()
    assert checked.wait(10)
    stager.close()
    closed.set()
    caller.join(10)
    assert isinstance(outcome[0], astage.StagerClosedError), outcome
    assert str(outcome[0]) == "this DefaultStager is closed"
    assert not [t for t in threading.enumerate() if t.name.startswith("astage-compat")]


def _try(call: Callable[..., Any], *args: Any) -> Any:
    """``call(*args)``, or the exception it raised."""
    try:
        return call(*args)
    except Exception as error:  # noqa: BLE001 - handed to the test to check
        return error
