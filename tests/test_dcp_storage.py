"""astage as DCP's storage layer: ``astage.compat.FileSystemWriter`` / ``FileSystemReader``.

In one process (``no_dist=True``): round trips of every kind of item, both on-disk formats,
saving over a committed checkpoint, a failing write, a crafted metadata file, partial reads.
Under real process groups: a 4-rank and a 2-rank gloo job (``tests/_dcp_storage_worker.py``)
run side by side with an FSDP2 model and its optimizer: save, load back, load the other job's
checkpoint (4 -> 2 and 2 -> 4 ranks), and a rank killed in the middle of a save.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch._C._distributed_c10d import HashStore
from torch.distributed.checkpoint import (
    _async_process_executor,
    state_dict_loader,
    state_dict_saver,
)
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import SerializationFormat
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

import astage
from astage._drivers import _sync
from astage.compat import FileSystemReader, FileSystemWriter, _storage_writer

pytestmark = pytest.mark.filterwarnings(
    "ignore:torch.distributed is disabled:UserWarning",
    "ignore:Detected an existing checkpoint:UserWarning",
)

WORKER = Path(__file__).with_name("_dcp_storage_worker.py")


def state() -> dict[str, Any]:
    return {
        "a": torch.arange(12.0).reshape(3, 4),
        "nested": {"bf": torch.full((2, 2), 1.5, dtype=torch.bfloat16)},
        "scalar": torch.tensor(3),
        "empty": torch.empty(0, 3),
        "transposed": torch.arange(6).reshape(2, 3).t(),  # not contiguous
        "objects": [1, "two", {"three": 3.0}],  # bytes items: torch.save'd by DCP
    }


def blank() -> dict[str, Any]:
    return {
        "a": torch.zeros(3, 4),
        "nested": {"bf": torch.zeros(2, 2, dtype=torch.bfloat16)},
        "scalar": torch.tensor(0),
        "empty": torch.empty(0, 3),
        "transposed": torch.zeros(3, 2, dtype=torch.int64),
        "objects": [0, "", {"three": 0.0}],
    }


def same(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), (a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            same(a[key], b[key])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            same(x, y)
    else:
        assert a == b


def save(sd: dict[str, Any], path: Path, **options: Any) -> None:
    state_dict_saver.save(sd, storage_writer=FileSystemWriter(path, **options), no_dist=True)


def load(path: Path) -> dict[str, Any]:
    sd = blank()
    state_dict_loader.load(sd, storage_reader=FileSystemReader(path), no_dist=True)
    return sd


# -- one process ------------------------------------------------------------------------------


@pytest.mark.parametrize("single_file_per_rank", [True, False])
def test_round_trip(tmp_path: Path, single_file_per_rank: bool) -> None:
    save(state(), tmp_path, single_file_per_rank=single_file_per_rank, thread_count=3)
    same(load(tmp_path), state())
    names = sorted(os.listdir(tmp_path))
    assert names[0] == ".metadata" and all(n.endswith(".distcp") for n in names[1:]), names
    assert (len(names) == 2) == single_file_per_rank, names


def test_the_writer_stages_for_async_save(tmp_path: Path) -> None:
    """Given no async_stager, dcp.async_save stages with the writer: a copy, taken at the call."""
    sd = state()
    writer = FileSystemWriter(tmp_path, cache_staged_state_dict=True)
    future = state_dict_saver.async_save(sd, storage_writer=writer, no_dist=True)
    sd["a"].add_(100)  # after the call: not in the checkpoint
    assert isinstance(future, Future)
    future.result()
    same(load(tmp_path), state())
    assert writer._stager is not None and writer._stager.cache_info().nbytes > 0  # kept
    pickle.loads(pickle.dumps(writer))  # the PROCESS executor sends it to its upload process
    writer.close()


def test_async_save_thread_executor(tmp_path: Path) -> None:
    sd = state()
    future = state_dict_saver.async_save(
        sd, storage_writer=FileSystemWriter(tmp_path), no_dist=True
    )
    assert isinstance(future, Future)  # not an AsyncSaveResponse: staging is synchronous
    future.result()
    same(load(tmp_path), state())


class _Spy:
    """Records the pre-written files that write_data commits."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.committed: list[_storage_writer._Prewrite] = []
        commit = _storage_writer._Prewrite.commit

        def spy(prewrite: _storage_writer._Prewrite, *args: Any, **kwargs: Any) -> Any:
            results = commit(prewrite, *args, **kwargs)
            self.committed.append(prewrite)
            return results

        monkeypatch.setattr(_storage_writer._Prewrite, "commit", spy)


def test_async_save_writes_while_staging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """stage() starts the data file; write_data reuses the staged tensors' bytes."""
    spy = _Spy(monkeypatch)
    writer = FileSystemWriter(tmp_path)
    staged_calls: list[int] = []
    stage = writer.stage

    def staging(sd: Any) -> Any:
        result = stage(sd)
        assert writer._prewrite is not None
        staged_calls.append(writer._prewrite.end)  # bytes laid out before write_data ran
        return result

    writer.stage = staging  # type: ignore[method-assign,assignment]
    sd = state()
    future = state_dict_saver.async_save(sd, storage_writer=writer, no_dist=True)
    sd["a"].add_(100)  # after the call: not in the checkpoint
    assert isinstance(future, Future)
    future.result()
    same(load(tmp_path), state())
    # a, bf and scalar were written while staging; "transposed" (not contiguous), "empty"
    # and the bytes items are written by write_data.
    assert staged_calls == [12 * 4 + 4 * 2 + 8]
    (prewrite,) = spy.committed
    assert prewrite.reused == 3
    assert sorted(os.listdir(tmp_path)) == [".metadata", "__0_0.distcp"]  # no temporary file
    writer.close()


def test_tensors_are_written_as_they_land(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each tensor goes to the writer once its batch has landed, before later batches run."""
    events: list[str] = []
    run_host_batch = _sync.run_host_batch  # type: ignore[attr-defined]
    add = _storage_writer._Prewrite.add

    def batch(b: Any) -> None:
        run_host_batch(b)
        events.append("batch")

    def landed(prewrite: _storage_writer._Prewrite, tensor: torch.Tensor) -> None:
        assert events and events[-1] in ("batch", "landed")  # never before its copy
        events.append("landed")
        add(prewrite, tensor)

    monkeypatch.setattr(_sync, "run_host_batch", batch)
    monkeypatch.setattr(_storage_writer._Prewrite, "add", landed)
    sd = {f"t{i}": torch.full((3 << 20,), float(i)) for i in range(6)}  # 12 MiB each
    writer = FileSystemWriter(tmp_path)
    future = state_dict_saver.async_save(sd, storage_writer=writer, no_dist=True)
    assert isinstance(future, Future)
    future.result()
    assert events.count("batch") > 1 and events.index("landed") < len(events) - 1 - events[
        ::-1
    ].index("batch"), events  # a tensor was handed out before the last batch ran
    loaded = {key: torch.zeros_like(value) for key, value in sd.items()}
    state_dict_loader.load(loaded, storage_reader=FileSystemReader(tmp_path), no_dist=True)
    same(loaded, sd)
    writer.close()


class _ShiftingPlanner(DefaultSavePlanner):
    """A planner that hands the writer another tensor than the staged one for ``a``."""

    def resolve_data(self, write_item: Any) -> Any:
        data = super().resolve_data(write_item)
        if write_item.index.fqn == "a":
            assert isinstance(data, torch.Tensor)
            return data + 1  # same shape, dtype and size: only its identity differs
        return data


def test_an_item_that_is_not_the_staged_tensor_is_written_anew(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The metadata never points at pre-written bytes of another tensor: what the planner
    resolves is what lands in the checkpoint."""
    spy = _Spy(monkeypatch)
    writer = FileSystemWriter(tmp_path)
    future = state_dict_saver.async_save(
        state(), storage_writer=writer, planner=_ShiftingPlanner(), no_dist=True
    )
    assert isinstance(future, Future)
    future.result()
    expected = state()
    expected["a"] += 1
    same(load(tmp_path), expected)
    assert spy.committed[0].reused == 2  # bf and scalar only
    writer.close()


def test_prewrite_finds_views_inside_staged_tensors_only(tmp_path: Path) -> None:
    prewrite = _storage_writer._Prewrite(str(tmp_path), 2, 16, created=False)
    try:
        first = torch.arange(10.0)
        second = torch.arange(4, dtype=torch.int16)
        prewrite.add(first)
        prewrite.add(second)
        prewrite.add(first)  # the same bytes again: laid out once
        assert prewrite.end == 40 + 8
        assert prewrite._find(first) == 0 and prewrite._find(second) == 40
        assert prewrite._find(first[2:5]) == 8  # a resharded view: a run inside a tensor
        assert prewrite._find(first[::2]) is None  # not one run of bytes
        assert prewrite._find(first.clone()) is None  # equal values, other memory
        assert prewrite._find(first[8:].view(torch.int64)) == 32
        assert prewrite._find(torch.empty(0)) is None
    finally:
        prewrite.discard()
    assert os.listdir(tmp_path) == []


def test_a_failed_prewrite_leaves_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save(state(), tmp_path)
    before = sorted(os.listdir(tmp_path))

    def failing(fd: int, buffers: list[memoryview], offset: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_storage_writer, "pwritev_all", failing)
    newer = state()
    newer["a"] += 1
    writer = FileSystemWriter(tmp_path)
    future = state_dict_saver.async_save(newer, storage_writer=writer, no_dist=True)
    assert isinstance(future, Future)
    with pytest.raises(CheckpointException, match="ENOSPC"):
        future.result()
    assert sorted(os.listdir(tmp_path)) == before  # no temporary file left
    same(load(tmp_path), state())
    writer.close()


def test_a_save_moved_by_checkpoint_id_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """async_save(checkpoint_id=...) points the writer elsewhere after stage() ran: the early
    file moves along (same file system) and the folder made for it goes."""
    spy = _Spy(monkeypatch)
    first, second = tmp_path / "first", tmp_path / "second"
    writer = FileSystemWriter(first)
    future = state_dict_saver.async_save(
        state(), storage_writer=writer, checkpoint_id=second, no_dist=True
    )
    assert isinstance(future, Future)
    future.result()
    same(load(second), state())
    assert not first.exists()  # made for the early file, removed once it moved out
    assert spy.committed[0].reused == 3
    assert sorted(os.listdir(second)) == [".metadata", "__0_0.distcp"]
    writer.close()


def test_a_save_that_never_writes_leaves_no_early_file(tmp_path: Path) -> None:
    save(state(), tmp_path)
    before = sorted(os.listdir(tmp_path))
    writer = FileSystemWriter(tmp_path, overwrite=False)
    future = state_dict_saver.async_save(state(), storage_writer=writer, no_dist=True)
    assert isinstance(future, Future)
    with pytest.raises(CheckpointException, match="overwrite=False"):
        future.result()
    assert sorted(os.listdir(tmp_path)) == before
    writer.stage(state())  # staged, never saved: close() removes its file
    assert len(os.listdir(tmp_path)) == len(before) + 1
    writer.close()
    assert sorted(os.listdir(tmp_path)) == before


def test_tensors_are_raw_bytes_and_dcps_reader_refuses_them(tmp_path: Path) -> None:
    save({"a": torch.arange(4, dtype=torch.int32)}, tmp_path)
    data = (tmp_path / "__0_0.distcp").read_bytes()
    assert data == torch.arange(4, dtype=torch.int32).numpy().tobytes()  # no pickle around it
    with pytest.raises(CheckpointException, match=r"astage\.compat\.FileSystemReader"):
        state_dict_loader.load(
            {"a": torch.zeros(4, dtype=torch.int32)}, checkpoint_id=tmp_path, no_dist=True
        )


def test_reads_checkpoints_of_dcps_own_writer(tmp_path: Path) -> None:
    state_dict_saver.save(
        state(), storage_writer=dcp_filesystem.FileSystemWriter(tmp_path), no_dist=True
    )
    same(load(tmp_path), state())


def test_saving_over_a_checkpoint_replaces_it_whole(tmp_path: Path) -> None:
    save(state(), tmp_path)
    newer = state()
    newer["a"] += 1
    save(newer, tmp_path)
    same(load(tmp_path), newer)
    names = sorted(os.listdir(tmp_path))
    assert len(names) == 2 and names[1] != "__0_0.distcp", names  # fresh name, old one removed
    with pytest.raises(CheckpointException, match="overwrite=False"):
        save(state(), tmp_path, overwrite=False)


def test_a_failed_write_leaves_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save(state(), tmp_path)
    before = sorted(os.listdir(tmp_path))
    calls = 0

    def failing(fd: int, buffers: list[memoryview], offset: int) -> None:
        nonlocal calls
        calls += 1
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_storage_writer, "pwritev_all", failing)
    newer = state()
    newer["a"] += 1
    with pytest.raises(CheckpointException, match="ENOSPC"):
        save(newer, tmp_path)
    assert calls
    assert sorted(os.listdir(tmp_path)) == before  # no temporary file left
    same(load(tmp_path), state())


def test_a_crafted_metadata_file_cannot_run_code(tmp_path: Path) -> None:
    save(state(), tmp_path)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.mkdir, (str(marker),))

    (tmp_path / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(astage.CheckpointFormatError, match=r"posix\.mkdir|os\.mkdir"):
        FileSystemReader(tmp_path).read_metadata()
    assert not marker.exists()


def _global(module: str, name: str) -> bytes:
    """Pickle opcodes (protocol 4) that push the global ``module``.``name``."""
    parts = b""
    for text in (module, name):
        raw = text.encode()
        parts += pickle.SHORT_BINUNICODE + bytes([len(raw)]) + raw
    return b"\x80\x04" + parts + pickle.STACK_GLOBAL


@pytest.mark.parametrize(
    ("module", "name"),
    [
        # Names an allowed module merely imports, reached whole or through a dotted path
        # (protocol 4 resolves "os.mkdir" attribute by attribute): the dotted one ran code.
        ("torch.distributed.checkpoint.metadata", "os.mkdir"),
        ("torch.distributed.checkpoint.planner", "io.open"),
        ("torch.distributed.checkpoint.metadata", "torch.load"),
        ("torch.distributed.checkpoint.metadata", "Metadata.__init__"),
        ("torch", "float32.__class__"),
    ],
)
def test_a_metadata_file_reaches_no_callable_through_an_allowed_name(
    tmp_path: Path, module: str, name: str
) -> None:
    marker = tmp_path / "ran"
    arg = str(marker).encode()
    payload = (
        _global(module, name)
        + pickle.SHORT_BINUNICODE
        + bytes([len(arg)])
        + arg
        + pickle.TUPLE1
        + pickle.REDUCE
        + pickle.STOP
    )
    (tmp_path / ".metadata").write_bytes(payload)
    with pytest.raises(astage.CheckpointFormatError, match="refused"):
        FileSystemReader(tmp_path).read_metadata()
    assert not marker.exists()


def test_only_classes_of_dcps_metadata_modules_are_allowed() -> None:
    import torch.distributed.checkpoint.metadata as metadata_module

    from astage.compat._storage_reader import _allowed

    assert _allowed("torch.distributed.checkpoint.metadata", "Metadata")
    assert _allowed("torch.distributed.checkpoint.planner", "LoadItemType")
    assert _allowed("torch", "bfloat16") and _allowed("torch", "Size")
    for name in ("os", "torch", "dataclass", "field", "Enum", "Any"):
        assert hasattr(metadata_module, name)
        assert not _allowed("torch.distributed.checkpoint.metadata", name), name


def test_a_damaged_metadata_file_is_a_format_error(tmp_path: Path) -> None:
    # Every byte of a real .metadata flipped in turn: refused as a CheckpointFormatError (or,
    # where the flip is harmless, read), never another exception (KeyError, IndexError,
    # OverflowError, RecursionError, ... escaped before).
    save(state(), tmp_path)
    raw = (tmp_path / ".metadata").read_bytes()
    escaped: dict[str, int] = {}
    for at in range(len(raw)):
        damaged = bytearray(raw)
        damaged[at] ^= 0x5A
        (tmp_path / ".metadata").write_bytes(bytes(damaged))
        try:
            FileSystemReader(tmp_path).read_metadata()
        except astage.CheckpointFormatError:
            pass
        except Exception as error:  # noqa: BLE001 - counted, to name them all at once
            kind = type(error).__name__
            escaped[kind] = escaped.get(kind, 0) + 1
    assert not escaped, escaped


class _Mkdir:
    """A non-tensor value whose pickle calls ``os.mkdir`` when it is loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.path),))


@pytest.mark.parametrize("writer", ["astage", "dcp"])
def test_a_pickled_object_that_would_run_code_is_refused_unless_trusted(
    tmp_path: Path, writer: str
) -> None:
    # DCP's DefaultLoadPlanner unpickles bytes items with torch.load(weights_only=False): a
    # crafted (or merely foreign) checkpoint ran os.mkdir while the reader handed them over.
    marker = tmp_path / "ran"
    folder = tmp_path / "ckpt"
    source = {"w": torch.ones(2), "payload": _Mkdir(marker), "plain": [1, "two", 3.0]}
    if writer == "astage":
        save(source, folder)
    else:
        state_dict_saver.save(
            source, storage_writer=dcp_filesystem.FileSystemWriter(folder), no_dist=True
        )
    assert not marker.exists()
    into: dict[str, Any] = {"w": torch.zeros(2), "payload": None, "plain": None}
    with pytest.raises(CheckpointException, match=r"'payload'.*mkdir.*trust_pickled_bytes"):
        state_dict_loader.load(into, storage_reader=FileSystemReader(folder), no_dist=True)
    assert not marker.exists()
    # Plain values pass the check; trusted, the object loads as DCP would load it.
    reader = FileSystemReader(folder, trust_pickled_bytes=True)
    state_dict_loader.load(into, storage_reader=reader, no_dist=True)
    assert marker.exists() and into["plain"] == [1, "two", 3.0]


def test_missing_metadata_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(astage.CheckpointNotFoundError, match="never committed"):
        FileSystemReader(tmp_path).read_metadata()


def test_bad_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(astage.InvalidOptionsError, match="thread_count"):
        FileSystemWriter(tmp_path, thread_count=0)
    with pytest.raises(astage.InvalidOptionsError, match="serialization_format"):
        FileSystemWriter(tmp_path, serialization_format=SerializationFormat.SAFETENSORS)
    with pytest.raises(astage.InvalidOptionsError, match="_extensions"):
        FileSystemWriter(tmp_path, _extensions=[object()])


class _Planner:
    """The two calls of a load planner that the reader makes, into one destination tensor."""

    def __init__(self, target: torch.Tensor) -> None:
        self.target = target
        self.committed = 0

    def resolve_tensor(self, request: ReadItem) -> torch.Tensor:
        return self.target

    def commit_tensor(self, request: ReadItem, tensor: torch.Tensor) -> None:
        self.committed += 1


@pytest.mark.parametrize(
    ("offsets", "lengths"),
    [
        ([1, 0], [2, 5]),  # rows: one run of bytes, read straight into the destination
        ([2, 1], [1, 3]),  # part of one row: one run too
        ([1, 2], [3, 2]),  # a block of columns: read the rows, narrow, copy
        ([0, 0], [4, 5]),  # the whole chunk
    ],
)
def test_a_region_of_a_stored_chunk(tmp_path: Path, offsets: list[int], lengths: list[int]) -> None:
    """What a resharding load asks: a box inside a stored chunk."""
    stored = torch.arange(20.0).reshape(4, 5)
    save({"w": stored}, tmp_path)
    reader = FileSystemReader(tmp_path)
    metadata = reader.read_metadata()
    reader.set_up_storage_reader(metadata, True)
    planner = _Planner(torch.zeros(lengths))
    request = ReadItem(
        type=LoadItemType.TENSOR,
        dest_index=MetadataIndex("w", [0, 0]),
        dest_offsets=torch.Size([0, 0]),
        storage_index=MetadataIndex("w", [0, 0]),
        storage_offsets=torch.Size(offsets),
        lengths=torch.Size(lengths),
    )
    reader.read_data(LoadPlan([request]), planner).wait()  # type: ignore[arg-type]
    expected = stored[offsets[0] : offsets[0] + lengths[0], offsets[1] : offsets[1] + lengths[1]]
    assert torch.equal(planner.target, expected) and planner.committed == 1


def test_a_truncated_data_file_is_a_format_error(tmp_path: Path) -> None:
    save({"w": torch.arange(100.0)}, tmp_path)
    os.truncate(tmp_path / "__0_0.distcp", 100)
    with pytest.raises(CheckpointException, match="outside the file"):
        state_dict_loader.load(
            {"w": torch.zeros(100)}, storage_reader=FileSystemReader(tmp_path), no_dist=True
        )


@pytest.mark.slow
def test_async_save_process_executor(tmp_path: Path) -> None:
    """DCP's PROCESS executor sends the writer to its upload process: it pickles and works."""
    store = HashStore()
    dist.init_process_group("gloo", rank=0, world_size=1, store=store)
    try:
        future = state_dict_saver.async_save(
            state(),
            storage_writer=FileSystemWriter(tmp_path),
            async_checkpointer_type=AsyncCheckpointerType.PROCESS,
        )
        assert isinstance(future, Future)
        future.result(timeout=300)
        loaded = blank()
        state_dict_loader.load(loaded, storage_reader=FileSystemReader(tmp_path))
        same(loaded, state())
    finally:
        upload_process = _async_process_executor._CHECKPOINT_PROCESS
        _async_process_executor._CHECKPOINT_PROCESS = None
        if upload_process is not None:  # ends DCP's upload process as its __del__ would
            upload_process._send(
                _async_process_executor._CheckpointSaveProcessControlOpts.TERMINATE
            )
            upload_process._save_process.join(timeout=60)
            if upload_process._save_process.is_alive():
                upload_process._save_process.kill()
                upload_process._save_process.join()
        dist.destroy_process_group()


# -- real process groups ------------------------------------------------------------------------


@dataclass
class Jobs:
    root: Path
    procs: dict[tuple[int, int], subprocess.Popen[bytes]]  # (world, rank) -> process
    logs: dict[tuple[int, int], str]

    def result(self, world: int, rank: int) -> dict[str, str]:
        report = self.root / f"rank{rank}-of-{world}.json"
        if not report.exists():
            pytest.fail(f"rank {rank} of {world} wrote no report:\n{self.logs[world, rank]}")
        result: dict[str, str] = json.loads(report.read_text())
        return result

    def check(self, world: int, name: str, ranks: range | None = None) -> None:
        failures = {
            rank: self.result(world, rank).get(name, "not run")
            for rank in ranks or range(world)
            if self.result(world, rank).get(name) != "ok"
        }
        assert not failures, "\n".join(f"rank {r} of {world}:\n{t}" for r, t in failures.items())


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jobs]:
    root = tmp_path_factory.mktemp("dcp-storage")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = {
        (world, rank): subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                str(rank),
                str(world),
                str(root / f"init{world}"),
                str(root),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        for world in (4, 2)
        for rank in range(world)
    }
    logs = {}
    try:
        for key, proc in procs.items():
            try:
                output, _ = proc.communicate(timeout=300)  # a loaded 2-core CI machine
            except subprocess.TimeoutExpired:
                proc.kill()
                output, _ = proc.communicate()
            logs[key] = output.decode(errors="replace")[-3000:]
        yield Jobs(root, procs, logs)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("world", [4, 2], ids=["4 ranks, async_save", "2 ranks, save"])
def test_fsdp2_model_and_optimizer_save_and_load(jobs: Jobs, world: int) -> None:
    jobs.check(world, "save")
    jobs.check(world, "load")


@pytest.mark.slow
@pytest.mark.parametrize(
    "world", [2, 4], ids=["saved on 4, loaded on 2", "saved on 2, loaded on 4"]
)
def test_fsdp2_checkpoint_loads_resharded(jobs: Jobs, world: int) -> None:
    jobs.check(world, "reshard")


@pytest.mark.slow
def test_a_rank_killed_mid_save_leaves_the_previous_checkpoint(jobs: Jobs) -> None:
    jobs.check(2, "kill", ranks=range(1))  # rank 0: the second save failed
    assert jobs.procs[2, 1].returncode == 17, jobs.logs[2, 1]  # rank 1 died in it
    folder = jobs.root / "kill"
    names = sorted(os.listdir(folder))
    # The second save never committed: the metadata is the first one's, and what the second
    # one left are files under names no metadata refers to (temporary ones, fresh ones).
    metadata = FileSystemReader(folder).read_metadata()
    referenced = {info.relative_path for info in metadata.storage_data.values()}
    assert referenced == {"__0_0.distcp", "__1_0.distcp"}, names
    assert set(names) - referenced - {".metadata"}, names  # the second save did write
    for rank in range(2):
        first = torch.load(jobs.root / f"kill-reference{rank}.pt", weights_only=True)
        loaded = {f"r{rank}": {"w": torch.zeros(1000), "b": torch.zeros(77)}}
        state_dict_loader.load(loaded, storage_reader=FileSystemReader(folder), no_dist=True)
        same(loaded, first)
