"""A hunt on the writer side of astage's DCP storage layer (``astage.compat.FileSystemWriter``)
and its interplay with ``dcp.save`` / ``dcp.async_save`` / ``dcp.load``: each test failed
before the fix it came with."""

from __future__ import annotations

import os
import resource
import threading
import weakref
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import in_a_fresh_interpreter
from torch.distributed.checkpoint import state_dict_loader, state_dict_saver
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import FileSystemWriter as DcpFileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import SavePlanner
from torch.distributed.checkpoint.storage import WriteResult

from astage import InvalidOptionsError
from astage.compat import FileSystemReader, FileSystemWriter, _storage_reader, _storage_writer

pytestmark = pytest.mark.filterwarnings(
    "ignore:torch.distributed is disabled:UserWarning",
    "ignore:Detected an existing checkpoint:UserWarning",
)


def save(sd: dict[str, Any], writer: FileSystemWriter) -> None:
    state_dict_saver.save(sd, storage_writer=writer, no_dist=True)


def async_save(sd: dict[str, Any], writer: FileSystemWriter, **kwargs: Any) -> None:
    upload = state_dict_saver.async_save(sd, storage_writer=writer, no_dist=True, **kwargs)
    assert isinstance(upload, Future)
    upload.result()


def load_into(sd: dict[str, Any], path: Path) -> dict[str, Any]:
    state_dict_loader.load(sd, storage_reader=FileSystemReader(path), no_dist=True)
    return sd


class _Crash(Exception):
    """A process that dies between writing its data files and committing the metadata."""


def test_a_reused_writer_never_overwrites_the_files_of_the_committed_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: DCP calls reset() only when given a checkpoint_id, so a writer reused for saves
    # into its own folder kept one save id, and the third save named its data file as the
    # second (committed) one did and renamed it over it. A crash before the new metadata left
    # the committed .metadata naming the new, uncommitted bytes: it loaded 9s, never committed.
    writer = FileSystemWriter(tmp_path)
    for value in (1.0, 2.0):
        save({"w": torch.full((4,), value)}, writer)

    def crash(self: FileSystemWriter, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        raise _Crash

    monkeypatch.setattr(FileSystemWriter, "finish", crash)
    with pytest.raises(BaseException, match="_Crash"):
        save({"w": torch.full((4,), 9.0)}, writer)
    monkeypatch.undo()
    assert torch.equal(load_into({"w": torch.zeros(4)}, tmp_path)["w"], torch.full((4,), 2.0))
    save({"w": torch.full((4,), 3.0)}, writer)  # and the next save replaces it cleanly
    assert torch.equal(load_into({"w": torch.zeros(4)}, tmp_path)["w"], torch.full((4,), 3.0))
    assert sorted(os.listdir(tmp_path))[0] == ".metadata"
    assert len(os.listdir(tmp_path)) == 2, os.listdir(tmp_path)


def every_kind() -> dict[str, Any]:
    complex_values = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)
    return {
        "conjugated": complex_values.conj(),  # a view with the conjugate bit
        "negated": torch._neg_view(torch.tensor([1.0, -2.0])),  # a view with the negative bit
        "conjugated imag": complex_values.conj().imag,  # negative bit, on a strided view
        "complex128": torch.tensor([1 + 1j], dtype=torch.complex128),
        "bool": torch.tensor([True, False, True]),
        "float8_e4m3fn": torch.tensor([1.0, 2.0]).to(torch.float8_e4m3fn),
        "float8_e5m2": torch.tensor([1.0, -2.0]).to(torch.float8_e5m2),
        "bfloat16": torch.tensor([1.5, -3.0], dtype=torch.bfloat16),
        "uint16": torch.tensor([1, 65535], dtype=torch.uint16),
        "uint64": torch.tensor([1, 2**63], dtype=torch.uint64),
        "0-dim": torch.tensor(5.0),
        "empty": torch.empty(0, 2),
        "view": torch.arange(10.0)[2:5],
        "strided": torch.arange(10.0)[::3],
        "expanded": torch.tensor([1.0, 2.0]).expand(3, 2),
        "parameter": torch.nn.Parameter(torch.ones(2)),
        "object": {"step": 3, "name": "x"},  # a bytes item
    }


def zeros_like_kinds(sd: dict[str, Any]) -> dict[str, Any]:
    return {
        key: torch.zeros(value.shape, dtype=value.dtype)
        if isinstance(value, torch.Tensor)
        else {"step": 0, "name": ""}
        for key, value in sd.items()
    }


def assert_values_equal(loaded: dict[str, Any], expected: dict[str, Any]) -> None:
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            want, got = value.detach().resolve_conj().resolve_neg(), loaded[key]
            assert got.dtype == want.dtype and got.shape == want.shape, key
            # Compared as bytes: float8 has no equality, and bytes also tell -0.0 from 0.0.
            same_bytes = torch.equal(
                got.reshape(-1).view(torch.uint8), want.contiguous().reshape(-1).view(torch.uint8)
            )
            assert same_bytes, (key, got, want)
        else:
            assert loaded[key] == value, key


@pytest.mark.parametrize("how", ["save", "async_save"])
def test_conjugated_and_negated_views_are_stored_as_the_values_they_stand_for(
    tmp_path: Path, how: str
) -> None:
    # Before: a conjugated (x.conj()) or negated view keeps the plain values in memory and a bit
    # that applies the conjugation on every read; the writer stored the memory as it was, so
    # the checkpoint held 1+2j where the tensor was 1-2j (and 1 where it was -1), with dcp.save
    # and with async_save (whose staged copy keeps the bit). DCP's own writer stores the values.
    writer = FileSystemWriter(tmp_path)
    if how == "save":
        save(every_kind(), writer)
    else:
        async_save(every_kind(), writer)
    writer.close()
    assert_values_equal(load_into(zeros_like_kinds(every_kind()), tmp_path), every_kind())


def test_a_load_into_a_conjugated_or_negated_view_stores_the_values_it_is_to_show(
    tmp_path: Path,
) -> None:
    # Before: the reader read a chunk straight into a destination whose memory it took for
    # plain values; into a conjugated view (or a negated one) the view then showed 1-2j where
    # the checkpoint held 1+2j. DCP's reader copies into it, which applies the bit.
    save({"c": torch.tensor([1 + 2j]), "n": torch.tensor([1.0, 2.0])}, FileSystemWriter(tmp_path))
    complex_base, real_base = torch.zeros(1, dtype=torch.complex64), torch.zeros(2)
    load_into({"c": complex_base.conj(), "n": torch._neg_view(real_base)}, tmp_path)
    assert torch.equal(complex_base, torch.tensor([1 - 2j]))  # its conjugate view shows 1+2j
    assert torch.equal(real_base, torch.tensor([-1.0, -2.0]))


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"path": None}, "path"),
        ({"path": 123}, "path"),
        ({"path": b"ckpt"}, "path"),  # bytes: every name joined to it later failed
        ({"path": ""}, "path"),  # made no folder: the save failed in prepare_local_plan
        ({"overwrite": "False"}, "overwrite"),  # a true string: overwrote
        ({"sync_files": None}, "sync_files"),  # falsy: silently not durable
        ({"single_file_per_rank": "yes"}, "single_file_per_rank"),
        ({"cache_staged_state_dict": 1.0}, "cache_staged_state_dict"),
        ({"write_while_staging": "no"}, "write_while_staging"),
        ({"per_thread_copy_ahead": "10MB"}, "per_thread_copy_ahead"),
        ({"per_thread_copy_ahead": -1}, "per_thread_copy_ahead"),  # a bound now (7add1e6)
    ],
)
def test_every_writer_option_is_checked_when_the_writer_is_made(
    tmp_path: Path, options: dict[str, Any], named: str
) -> None:
    # Before: only thread_count, chunk_bytes, _extensions and serialization_format were checked;
    # a path of None or 123 was a bare TypeError, b"ckpt" or "" failed only in the save, and any
    # value stood for a bool by its truth (overwrite="False" overwrote).
    options = {"path": tmp_path, **options}
    with pytest.raises(InvalidOptionsError, match=named):
        FileSystemWriter(**options)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"path": None}, "path"),
        ({"path": b"ckpt"}, "path"),
        ({"trust_pickled_bytes": "no"}, "trust_pickled_bytes"),  # a true string: trusted
    ],
)
def test_every_reader_option_is_checked_when_the_reader_is_made(
    tmp_path: Path, options: dict[str, Any], named: str
) -> None:
    # Before: trust_pickled_bytes="no" trusted the checkpoint's pickles (any true value did),
    # and a path of None or bytes was a bare TypeError from DCP's constructor.
    options = {"path": tmp_path, **options}
    with pytest.raises(InvalidOptionsError, match=named):
        FileSystemReader(**options)


def test_a_checkpoint_id_that_is_no_path_is_refused_before_the_save(tmp_path: Path) -> None:
    # Before: dcp.save(checkpoint_id=b"...") set the writer's folder to bytes, and the save
    # failed deep in its first os.path.join with a TypeError; 123 was a bare TypeError; either
    # was a TypeError from pathlib in dcp.load.
    writer = FileSystemWriter(tmp_path)
    for checkpoint_id in (b"ckpt", 123):
        with pytest.raises(InvalidOptionsError, match="checkpoint_id"):
            state_dict_saver.save(
                {"w": torch.ones(2)},
                checkpoint_id=checkpoint_id,  # type: ignore[arg-type]
                storage_writer=writer,
                no_dist=True,
            )
        with pytest.raises(InvalidOptionsError, match="checkpoint_id"):  # and before a load
            state_dict_loader.load(
                {"w": torch.ones(2)},
                checkpoint_id=checkpoint_id,  # type: ignore[arg-type]
                storage_reader=FileSystemReader(tmp_path),
                no_dist=True,
            )
    assert os.listdir(tmp_path) == []
    # a str and a path-like both name the folder
    for folder in (str(tmp_path / "a"), tmp_path / "b"):
        state_dict_saver.save(
            {"w": torch.ones(2)}, checkpoint_id=folder, storage_writer=writer, no_dist=True
        )
        assert load_into({"w": torch.zeros(2)}, Path(folder))["w"].tolist() == [1.0, 1.0]


def test_async_saves_that_overlap_on_one_writer_each_commit_their_own_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: a save's folder, save id and rank were the writer's attributes, and the second
    # async_save's upload thread set them (reset(checkpoint_id)) while the first upload was
    # still writing: the first save wrote its files and its .metadata into the second's folder,
    # its own folder was never committed, and its upload future reported success.
    first_may_write = threading.Event()
    original_write_data = FileSystemWriter.write_data
    original_reset = FileSystemWriter.reset
    calls = 0

    def write_data(self: FileSystemWriter, plan: Any, planner: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:  # the first save's upload waits for the second save to begin
            assert first_may_write.wait(timeout=60)
        return original_write_data(self, plan, planner)

    def reset(self: FileSystemWriter, checkpoint_id: Any = None) -> None:
        original_reset(self, checkpoint_id)
        if checkpoint_id is not None and Path(checkpoint_id).name == "second":
            first_may_write.set()

    monkeypatch.setattr(FileSystemWriter, "write_data", write_data)
    monkeypatch.setattr(FileSystemWriter, "reset", reset)
    writer = FileSystemWriter(tmp_path / "unused")
    uploads = []
    for name, value in (("first", 1.0), ("second", 2.0)):
        upload = state_dict_saver.async_save(
            {"w": torch.full((8,), value)},
            checkpoint_id=tmp_path / name,
            storage_writer=writer,
            no_dist=True,
        )
        assert isinstance(upload, Future)
        uploads.append(upload)
    for upload in uploads:
        upload.result(timeout=60)
    writer.close()
    for name, value in (("first", 1.0), ("second", 2.0)):
        loaded = load_into({"w": torch.zeros(8)}, tmp_path / name)
        assert torch.equal(loaded["w"], torch.full((8,), value)), name


def test_many_small_items_are_written_in_runs_that_one_pwritev_takes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: small neighbours were gathered into runs of up to chunk_bytes (8 MiB) whatever
    # their number, so 100,000 small tensors made one run of 100,000 buffers: written by one
    # thread, in a time that grew with the square of the count (0.87 s against 0.04 s in runs
    # of IOV_MAX buffers; 1,000,000 would take minutes).
    runs: list[int] = []
    write_piece = _storage_writer._write_piece

    def counting(fd: int, buffers: list[memoryview], offset: int, writeback: bool) -> None:
        runs.append(len(buffers))
        write_piece(fd, buffers, offset, writeback)

    monkeypatch.setattr(_storage_writer, "_write_piece", counting)
    sd = {f"t{number}": torch.full((2,), float(number)) for number in range(2500)}
    save(sd, FileSystemWriter(tmp_path, sync_files=False))
    assert sum(runs) == 2500 and max(runs) <= 1024, runs
    loaded = load_into({key: torch.zeros(2) for key in sd}, tmp_path)
    assert all(torch.equal(loaded[key], value) for key, value in sd.items())


class _OverlappingSaves:
    """Two ``dcp.save`` calls into one folder from two threads, each with a writer of its own,
    in a fixed order: both write their data, then the first commits (``finish``), then the
    second; ``seen_between`` is what the folder loads between the two commits."""

    def __init__(self, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.folder = folder
        self.second_wrote = threading.Event()
        self.first_committed = threading.Event()
        self.seen_between: torch.Tensor | BaseException | None = None
        self.errors: list[BaseException] = []
        original_write_data = FileSystemWriter.write_data
        original_finish = FileSystemWriter.finish

        def write_data(writer: FileSystemWriter, plan: Any, planner: Any) -> Any:
            written = original_write_data(writer, plan, planner)
            if threading.current_thread().name == "second":
                self.second_wrote.set()
            return written

        def finish(writer: FileSystemWriter, metadata: Any, results: Any) -> None:
            if threading.current_thread().name == "first":
                assert self.second_wrote.wait(timeout=60)
                try:
                    original_finish(writer, metadata, results)
                finally:
                    self.first_committed.set()
                return
            assert self.first_committed.wait(timeout=60)
            try:
                self.seen_between = load_into({"w": torch.zeros(8)}, folder)["w"]
            except BaseException as error:  # noqa: BLE001 - what the folder held is the result
                self.seen_between = error
            original_finish(writer, metadata, results)

        monkeypatch.setattr(FileSystemWriter, "write_data", write_data)
        monkeypatch.setattr(FileSystemWriter, "finish", finish)

    def run(self) -> None:
        def save_in_thread(value: float) -> None:
            try:
                save({"w": torch.full((8,), value)}, FileSystemWriter(self.folder))
            except BaseException as error:  # noqa: BLE001 - reported by the test
                self.errors.append(error)

        threads = [
            threading.Thread(target=save_in_thread, args=(value,), name=name)
            for name, value in (("first", 1.0), ("second", 2.0))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not self.errors, self.errors


def test_overlapping_saves_into_a_committed_checkpoint_leave_one_that_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: a commit removed every data file its metadata did not name, those of a save
    # into the same folder still running included: the second save then committed a .metadata
    # naming a file the first had deleted, and the folder held no checkpoint that loaded.
    save({"w": torch.full((8,), 0.0)}, FileSystemWriter(tmp_path))
    saves = _OverlappingSaves(tmp_path, monkeypatch)
    saves.run()
    monkeypatch.undo()
    assert isinstance(saves.seen_between, torch.Tensor), saves.seen_between
    assert torch.equal(saves.seen_between, torch.full((8,), 1.0))
    assert torch.equal(load_into({"w": torch.zeros(8)}, tmp_path)["w"], torch.full((8,), 2.0))
    save({"w": torch.full((8,), 3.0)}, FileSystemWriter(tmp_path))  # no overlap: all swept
    assert sorted(os.listdir(tmp_path))[0] == ".metadata"
    assert len(os.listdir(tmp_path)) == 2, os.listdir(tmp_path)


def test_overlapping_first_saves_into_an_empty_folder_name_their_files_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: into a folder with no metadata yet, both saves named their data file
    # __0_0.distcp, the second's rename replaced the first's, and the first committed a
    # .metadata naming the second's bytes: the folder loaded 2s, a save never committed then.
    saves = _OverlappingSaves(tmp_path, monkeypatch)
    saves.run()
    monkeypatch.undo()
    assert isinstance(saves.seen_between, torch.Tensor), saves.seen_between
    assert torch.equal(saves.seen_between, torch.full((8,), 1.0))
    assert torch.equal(load_into({"w": torch.zeros(8)}, tmp_path)["w"], torch.full((8,), 2.0))


def test_the_files_of_a_save_that_failed_after_writing_go_with_the_next_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before (d934f0f): a save counted as running until its commit ended it, and DCP tells no
    # writer of a failure after write_data; a save whose folder fsync failed after its data
    # file was in place stayed running for as long as its thread lived, and the next saves
    # (a writer each, the usual dcp.save) kept its file forever.
    save({"w": torch.full((8,), 0.0)}, FileSystemWriter(tmp_path))
    fsync_folder = _storage_writer._fsync_folder

    def failing(folder: str) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(_storage_writer, "_fsync_folder", failing)
    with pytest.raises(BaseException, match="Input/output error"):
        save({"w": torch.full((8,), 1.0)}, FileSystemWriter(tmp_path))
    monkeypatch.setattr(_storage_writer, "_fsync_folder", fsync_folder)
    assert len(os.listdir(tmp_path)) == 3  # its data file is in place, unreferenced
    save({"w": torch.full((8,), 2.0)}, FileSystemWriter(tmp_path))
    assert len(os.listdir(tmp_path)) == 2, os.listdir(tmp_path)
    assert torch.equal(load_into({"w": torch.zeros(8)}, tmp_path)["w"], torch.full((8,), 2.0))


@pytest.mark.parametrize("how", ["save", "async_save"])
def test_dcps_plan_caching_never_overwrites_the_committed_checkpoints_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    # Before: with DefaultSavePlanner(enable_plan_caching=True), DCP hands each rank its cached
    # plan of the first save, names included: every later save renamed its data file over
    # __0_0.distcp, the committed checkpoint's, and a crash before its metadata left that
    # checkpoint loading 9s, never committed.
    monkeypatch.setattr(SavePlanner, "_cached_save_plan", {})  # DCP caches per class
    monkeypatch.setattr(SavePlanner, "_cached_all_plans", {})
    monkeypatch.setattr(SavePlanner, "_cached_global_plan", {})
    monkeypatch.setattr(SavePlanner, "_cached_metadata", {})
    monkeypatch.setattr(SavePlanner, "_cached_final_save_plan", {})

    def save_cached(value: float) -> None:
        sd = {"w": torch.full((4,), value)}
        planner = DefaultSavePlanner(enable_plan_caching=True)
        writer = FileSystemWriter(tmp_path)
        if how == "save":
            state_dict_saver.save(sd, storage_writer=writer, planner=planner, no_dist=True)
        else:
            async_save(sd, writer, planner=planner)
        writer.close()

    for value in (1.0, 2.0):
        save_cached(value)

    def crash(self: FileSystemWriter, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        raise _Crash

    with monkeypatch.context() as patch:
        patch.setattr(FileSystemWriter, "finish", crash)
        with pytest.raises(BaseException, match="_Crash"):
            save_cached(9.0)
    assert torch.equal(load_into({"w": torch.zeros(4)}, tmp_path)["w"], torch.full((4,), 2.0))
    save_cached(3.0)
    assert torch.equal(load_into({"w": torch.zeros(4)}, tmp_path)["w"], torch.full((4,), 3.0))
    assert len(os.listdir(tmp_path)) == 2, os.listdir(tmp_path)


@pytest.fixture
def few_open_files() -> Iterator[None]:
    """This process may open 200 more files than it has open now (Linux's default limit is
    1,024), and no more."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    open_now = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + 200, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files in /proc")
@pytest.mark.parametrize("writer", ["astage", "dcp"])
def test_a_file_per_item_checkpoint_of_more_items_than_open_files_saves_and_loads(
    tmp_path: Path, few_open_files: None, writer: str
) -> None:
    # Before: with single_file_per_rank=False the writer opened every item's file at once, and
    # the reader opened every file a load reads at once (and every file of DCP's own format to
    # check it): 500 items were EMFILE (too many open files), to write and to read back.
    sd = {f"t{number}": torch.full((3,), float(number)) for number in range(500)}
    if writer == "astage":
        save(sd, FileSystemWriter(tmp_path, single_file_per_rank=False, sync_files=False))
    else:
        state_dict_saver.save(
            sd,
            storage_writer=DcpFileSystemWriter(tmp_path, single_file_per_rank=False),
            no_dist=True,
        )
    assert len(os.listdir(tmp_path)) == 501
    loaded = load_into({key: torch.zeros(3) for key in sd}, tmp_path)
    assert all(torch.equal(loaded[key], value) for key, value in sd.items())


class _CopyingPlanner(DefaultSavePlanner):
    """Hands each tensor over as a new copy, as ``dcp.save`` of device tensors does (each
    item's host copy), and counts how many of those copies are alive at once."""

    def __init__(self) -> None:
        super().__init__()
        self.alive = 0
        self.most_alive = 0

    def resolve_data(self, write_item: Any) -> Any:
        data = super().resolve_data(write_item)
        if not isinstance(data, torch.Tensor):
            return data
        copy = data.clone()
        self.alive += 1
        self.most_alive = max(self.most_alive, self.alive)
        weakref.finalize(copy.untyped_storage(), self._dropped)  # views of it count too
        return copy

    def _dropped(self) -> None:
        self.alive -= 1


@pytest.mark.parametrize("single_file_per_rank", [True, False])
def test_dcp_save_holds_a_bounded_number_of_host_copies_at_once(
    tmp_path: Path, single_file_per_rank: bool
) -> None:
    # Before: write_data resolved every item before writing any, so dcp.save of device
    # tensors held the host copy of the rank's whole state at once (all 40 copies here; a
    # model's worth of host memory on a GPU machine), where DCP's writer holds
    # per_thread_copy_ahead bytes per thread.
    sd = {f"t{number}": torch.full((64 << 10,), float(number)) for number in range(40)}  # 256 KiB
    planner = _CopyingPlanner()
    writer = FileSystemWriter(
        tmp_path,
        single_file_per_rank=single_file_per_rank,
        thread_count=2,
        per_thread_copy_ahead=256 << 10,
        sync_files=False,
    )
    state_dict_saver.save(sd, storage_writer=writer, planner=planner, no_dist=True)
    assert 1 <= planner.most_alive <= 4, planner.most_alive
    loaded = load_into({key: torch.zeros(64 << 10) for key in sd}, tmp_path)
    assert all(torch.equal(loaded[key], value) for key, value in sd.items())


class _CountingLoadPlanner(DefaultLoadPlanner):
    """Counts the items resolved (their destination handed out) and not yet committed."""

    def __init__(self) -> None:
        super().__init__()
        self.outstanding = 0
        self.most_outstanding = 0

    def resolve_tensor(self, read_item: Any) -> torch.Tensor:
        self.outstanding += 1
        self.most_outstanding = max(self.most_outstanding, self.outstanding)
        destination: torch.Tensor = super().resolve_tensor(read_item)
        return destination

    def commit_tensor(self, read_item: Any, tensor: torch.Tensor) -> None:
        self.outstanding -= 1
        super().commit_tensor(read_item, tensor)


def test_a_load_through_host_buffers_holds_a_bounded_number_of_them_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: the reader read every item of a data file into its host buffer before copying
    # any into its destination, so a load into destinations it cannot read into directly (a
    # GPU model, another dtype) held the rank's whole checkpoint in host memory at once (all
    # 40 items here), where DCP's reader holds one item.
    monkeypatch.setattr(_storage_reader, "_LANDING_BYTES", 512 << 10, raising=False)
    sd = {f"t{number}": torch.full((64 << 10,), float(number)) for number in range(40)}  # 256 KiB
    save(sd, FileSystemWriter(tmp_path, sync_files=False))
    destination = {key: torch.zeros(64 << 10, dtype=torch.float64) for key in sd}  # not direct
    planner = _CountingLoadPlanner()
    state_dict_loader.load(
        destination, storage_reader=FileSystemReader(tmp_path), planner=planner, no_dist=True
    )
    assert 1 <= planner.most_outstanding <= 3, planner.most_outstanding
    assert all(torch.equal(destination[key], sd[key].double()) for key in sd)


class _CastingPlanner(DefaultSavePlanner):
    """Hands each tensor over in another dtype (a planner that saves in lower precision):
    DCP's writer stores what it is given, and its load copies it back into the destination."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def resolve_data(self, write_item: Any) -> Any:
        data = super().resolve_data(write_item)
        return data.to(self.dtype) if isinstance(data, torch.Tensor) else data


@pytest.mark.parametrize("how", ["save", "async_save"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.bfloat16], ids=["same size", "smaller"])
def test_a_tensor_the_planner_hands_over_in_another_dtype_loads_as_with_dcp(
    tmp_path: Path, how: str, dtype: torch.dtype
) -> None:
    # Before: the writer stored the handed-over tensor's raw bytes under the plan's dtype:
    # float32 values cast to int32 (as large) loaded as 1.4e-45 and NaN, silently; cast to
    # bfloat16 (half as large) the save failed, or with async_save committed a checkpoint
    # that no load could read. DCP stores the cast tensor and its load copies it back.
    sd = {"w": torch.tensor([1.7, 2.9, -3.2])}
    writer = FileSystemWriter(tmp_path)
    if how == "save":
        state_dict_saver.save(
            sd, storage_writer=writer, planner=_CastingPlanner(dtype), no_dist=True
        )
    else:
        async_save(sd, writer, planner=_CastingPlanner(dtype))
    writer.close()
    expected = sd["w"].to(dtype).float()
    assert torch.equal(load_into({"w": torch.zeros(3)}, tmp_path)["w"], expected)


@pytest.mark.parametrize("left", [0, 8], ids=["freed", "shrunk"])
def test_a_tensor_whose_storage_was_freed_under_it_is_refused_naming_it(
    tmp_path: Path, left: int
) -> None:
    # Before: its data pointer went to pwritev as it was: EFAULT for a freed storage (an
    # unexplained "Bad address"), and for a shrunk one the save succeeded, writing whatever
    # heap memory lay past the storage's 8 bytes into the checkpoint.
    freed = torch.zeros(1000)
    freed.untyped_storage().resize_(left)
    sd = {"layer": {"w": freed, "ok": torch.ones(3)}}
    with pytest.raises(BaseException) as caught:  # DCP wraps it in a CheckpointException
        save(sd, FileSystemWriter(tmp_path))
    assert f"layer.w: the tensor reaches 4000 bytes of its storage, which holds {left}" in str(
        caught.value
    )
    assert os.listdir(tmp_path) == []  # nothing half-done left


def test_a_tensor_torch_cannot_copy_is_refused_naming_it(tmp_path: Path) -> None:
    # Before: torch's bare "Quantized copy only works with kFloat as source Tensor" from the
    # writer's contiguous(), naming no item (found by the dtype hunt).
    strided = torch.zeros(8, dtype=torch.uint8).view(torch.qint8)[::2]  # bytes seen as qint8
    sd = {"layer": {"q": strided, "ok": torch.ones(3)}}
    with pytest.raises(BaseException) as caught:  # DCP wraps it in a CheckpointException
        save(sd, FileSystemWriter(tmp_path))
    assert "layer.q: cannot store the values of this torch.qint8 tensor" in str(caught.value)
    assert os.listdir(tmp_path) == []  # nothing half-done left


def test_a_load_into_a_tensor_whose_storage_was_freed_is_refused_naming_it(
    tmp_path: Path,
) -> None:
    # Before: its data pointer went to preadv as it was: a bare EFAULT for a freed storage.
    save({"w": torch.randn(1000), "ok": torch.ones(3)}, FileSystemWriter(tmp_path))
    freed = torch.zeros(1000)
    freed.untyped_storage().resize_(0)
    with pytest.raises(BaseException) as caught:  # DCP wraps it in a CheckpointException
        load_into({"w": freed, "ok": torch.zeros(3)}, tmp_path)
    message = "(w): cannot load into a tensor that reaches 4000 bytes of its storage, which holds 0"
    assert message in str(caught.value)


def test_a_load_into_a_tensor_whose_storage_was_shrunk_is_refused_not_a_crash(
    tmp_path: Path,
) -> None:
    # Before: preadv wrote 4,000 bytes into a storage of 64, over the heap (a segfault). In a
    # process of its own, so that the suite sees a failure rather than dying.
    save({"w": torch.randn(1000), "ok": torch.ones(3)}, FileSystemWriter(tmp_path))
    child = in_a_fresh_interpreter(
        f"""
        import warnings
        warnings.simplefilter("ignore")
        import torch
        from torch.distributed.checkpoint import state_dict_loader
        from astage.compat import FileSystemReader
        shrunk = torch.zeros(1000)
        shrunk.untyped_storage().resize_(64)
        try:
            state_dict_loader.load(
                {{"w": shrunk, "ok": torch.zeros(3)}},
                storage_reader=FileSystemReader({str(tmp_path)!r}),
                no_dist=True,
            )
        except BaseException as error:  # DCP's CheckpointException is no Exception
            assert "reaches 4000 bytes of its storage, which holds 64" in str(error), error
        else:
            raise SystemExit("loaded")
        """
    )
    assert child.returncode == 0, child.stderr[-2000:]
