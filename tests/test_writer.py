"""SafetensorsWriter and the file layout, driven directly (no stager)."""

from __future__ import annotations

import errno
import itertools
import json
import os
import struct
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import same_values

import astage
from astage._files._layout import plan_layout


async def write_all(writer: astage.SafetensorsWriter, state: dict[str, Any]) -> None:
    await writer.begin(state)
    for key, tensor in state.items():
        await writer.write((key,), tensor)
    await writer.commit()


async def write_all_entered(writer: astage.SafetensorsWriter, state: dict[str, Any]) -> None:
    """The same inside ``async with``: writes are queued to the writer's own worker tasks."""
    async with writer:
        await write_all(writer, state)


WAYS = {"inline": write_all, "entered": write_all_entered}


def test_layout_is_contiguous_and_the_header_aligned() -> None:
    base = torch.arange(10.0)
    layout = plan_layout({"a": torch.ones(3), "b": base, "c": base[2:5], "d": torch.zeros(2, 2)})
    assert len(layout.header) % 8 == 0
    (length,) = struct.unpack("<Q", layout.header[:8])
    header = json.loads(layout.header[8:])
    assert length == len(layout.header) - 8
    spans = sorted(info["data_offsets"] for key, info in header.items() if key != "__metadata__")
    assert spans[0][0] == 0
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))  # no gap, no overlap
    assert spans[-1][1] == layout.nbytes == (3 + 10 + 4) * 4
    assert set(header) == {"__metadata__", "['a']", "['b']", "['d']"}  # c lives in b's entry


def test_keys_are_unambiguous() -> None:
    state = {"a.b": torch.ones(1), "a": {"b": torch.ones(1)}, 1: torch.ones(1), "1": torch.ones(1)}
    layout = plan_layout(state)
    assert [entry.key for entry in layout.entries] == ["['a.b']", "['a']['b']", "[1]", "['1']"]


def test_reserved_and_bad_metadata() -> None:
    with pytest.raises(astage.UnsavableError, match="reserved"):
        plan_layout({}, {"astage": "x"})
    with pytest.raises(astage.UnsavableError, match="str to str"):
        plan_layout({}, {"k": 1})  # type: ignore[dict-item]


def test_a_tensor_whose_storage_was_freed_is_refused_before_the_file(tmp_path: Path) -> None:
    # Before: SafetensorsWriter planned a 0-byte entry for it and wrote a file whose header
    # names 4,000 bytes of that entry: a file every loader refuses.
    freed = torch.zeros(1000)
    freed.untyped_storage().resize_(0)
    sd = {"layer": {"w": freed, "ok": torch.ones(3)}}
    target = tmp_path / "c.safetensors"

    async def main() -> None:
        async with astage.SafetensorsWriter(target) as writer:
            await writer.begin(sd)

    with pytest.raises(astage.UnsavableError, match=r"\['layer'\]\['w'\].*reaches 4000 bytes"):
        anyio.run(main)
    assert os.listdir(tmp_path) == []


def test_counts_take_numpy_integers_as_steps_do_and_refuse_bools(tmp_path: Path) -> None:
    # Before: keep=numpy.int64(3) was "must be an integer" (a step of numpy.int64 is taken),
    # and compat kept a copy of the same check of its own.
    from astage.compat import FileSystemWriter

    three: Any = np.int64(3)  # typed int: numpy's integers are taken at run time, as steps are
    two: Any = np.int32(2)
    folder = astage.CheckpointDir(tmp_path / "run", keep=three, threads=two)
    assert (folder.keep, folder.threads) == (3, 2) and type(folder.keep) is int
    writer = astage.SafetensorsWriter(tmp_path / "a.safetensors", threads=two)
    assert writer.threads == 2 and type(writer.threads) is int
    assert FileSystemWriter(tmp_path / "dcp", thread_count=two).thread_count == 2
    for bad in (True, 0, 2.0, "2", np.float64(2)):
        with pytest.raises(astage.InvalidOptionsError, match="threads must be an integer"):
            astage.SafetensorsWriter(tmp_path / "b.safetensors", threads=bad)  # type: ignore[arg-type]


def test_a_cycle_is_refused() -> None:
    state: dict[str, Any] = {"a": []}
    state["a"].append(state)
    with pytest.raises(astage.UnsavableError, match=r"\['a'\]\[0\]"):
        plan_layout(state)


@pytest.mark.asyncio
@pytest.mark.parametrize("way", WAYS)
async def test_writer_without_a_stager(tmp_path: Path, way: str) -> None:
    state = {"w": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int16)}
    writer = astage.SafetensorsWriter(tmp_path / "w.safetensors", metadata={"k": "v"})
    assert isinstance(writer, astage.CheckpointWriter)
    await WAYS[way](writer, state)
    loaded = safetensors.torch.load_file(str(tmp_path / "w.safetensors"))
    assert same_values(loaded["['w']"], state["w"])
    assert same_values(loaded["['b']"], state["b"])
    assert os.listdir(tmp_path) == ["w.safetensors"]


@pytest.mark.asyncio
@pytest.mark.parametrize("way", WAYS)
async def test_large_tensors_in_chunks_and_partial_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, way: str
) -> None:
    real = os.pwritev

    def short(fd: int, buffers: Any, offset: int) -> int:  # the kernel may write less
        first = bytes(buffers[0][:1000])
        return real(fd, [first], offset)

    monkeypatch.setattr(os, "pwritev", short)
    state = {"big": torch.randn(10_000), "small": torch.randn(7)}
    writer = astage.SafetensorsWriter(tmp_path / "c.safetensors", threads=3, chunk_bytes=4096)
    await WAYS[way](writer, state)
    back = astage.load(tmp_path / "c.safetensors")
    assert same_values(back["big"], state["big"]) and same_values(back["small"], state["small"])


@pytest.mark.asyncio
@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("writeback", [True, False])
async def test_early_writeback_covers_every_byte_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writeback: bool, way: str
) -> None:
    import astage._files._writer as writer_module

    ranges: list[tuple[int, int]] = []

    def record(fd: int, offset: int, nbytes: int, flags: int) -> int:
        assert flags == writer_module._SYNC_FILE_RANGE_WRITE
        ranges.append((offset, nbytes))
        return 0

    monkeypatch.setattr(writer_module, "_sync_file_range", record)
    state = {"big": torch.randn(10_000), "small": torch.randn(7), "empty": torch.ones(0)}
    path = tmp_path / "wb.safetensors"
    writer = astage.SafetensorsWriter(path, chunk_bytes=4096, writeback=writeback)
    await WAYS[way](writer, state)
    back = astage.load(path)
    assert all(same_values(back[k], state[k]) for k in state)
    if not writeback:
        assert ranges == []
        return
    assert writer.layout is not None
    start = writer.layout.data_start
    covered = sorted(ranges)
    assert covered[0][0] == start and sum(n for _, n in covered) == writer.layout.nbytes
    assert all(a[0] + a[1] == b[0] for a, b in itertools.pairwise(covered))


@pytest.mark.asyncio
async def test_commit_before_every_tensor_was_written(tmp_path: Path) -> None:
    writer = astage.SafetensorsWriter(tmp_path / "c.safetensors")
    await writer.begin({"a": torch.ones(2), "b": torch.ones(2)})
    await writer.write(("a",), torch.ones(2))
    with pytest.raises(astage.UsageError, match=r"\['b'\]"):
        await writer.commit()
    await writer.abort()
    await writer.abort()  # twice is fine
    assert os.listdir(tmp_path) == []


@pytest.mark.asyncio
async def test_write_checks_the_tensor(tmp_path: Path) -> None:
    writer = astage.SafetensorsWriter(tmp_path / "c.safetensors")
    await writer.begin({"a": torch.ones(2)})
    with pytest.raises(astage.InvalidOptionsError, match="no tensor at"):
        await writer.write(("zzz",), torch.ones(2))
    with pytest.raises(astage.InvalidOptionsError, match="resized"):
        await writer.write(("a",), torch.ones(3))
    with pytest.raises(astage.InvalidOptionsError, match="meta"):
        await writer.write(("a",), torch.ones(2, device="meta"))
    await writer.abort()
    assert os.listdir(tmp_path) == []


@pytest.mark.asyncio
@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
async def test_permission_denied_names_the_path(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(astage.CheckpointWriteError, match="Permission denied"):
            await astage.save({"a": torch.ones(1)}, folder / "c.safetensors")
    finally:
        folder.chmod(0o700)


@pytest.mark.asyncio
async def test_failed_rename_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(src: Any, dst: Any) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(astage.CheckpointWriteError, match="rename"):
        await astage.save({"a": torch.ones(1)}, tmp_path / "c.safetensors")
    assert os.listdir(tmp_path) == []


def test_bad_options_name_the_argument(tmp_path: Path) -> None:
    for bad in (0, -1, 1.5, True, "4"):
        with pytest.raises(astage.InvalidOptionsError, match="threads"):
            astage.SafetensorsWriter(tmp_path / "c", threads=bad)  # type: ignore[arg-type]
        with pytest.raises(astage.InvalidOptionsError, match="chunk_bytes"):
            astage.SafetensorsWriter(tmp_path / "c", chunk_bytes=bad)  # type: ignore[arg-type]


@pytest.mark.asyncio
@pytest.mark.parametrize("way", WAYS)
async def test_misuse_is_a_usage_error(tmp_path: Path, way: str) -> None:
    writer = astage.SafetensorsWriter(tmp_path / "c.safetensors")
    await WAYS[way](writer, {"a": torch.ones(2)})
    with pytest.raises(astage.UsageError, match="already"):
        await writer.begin({"a": torch.ones(2)})
    with pytest.raises(astage.UsageError, match="committed"):
        await writer.write(("a",), torch.ones(2))
    with pytest.raises(astage.UsageError, match="committed"):
        await writer.commit()
    with pytest.raises(astage.UsageError, match="already entered or used"):
        async with writer:
            pass
    await writer.abort()  # after a commit: nothing to do, the file stays
    assert os.listdir(tmp_path) == ["c.safetensors"]


@pytest.mark.asyncio
async def test_leaving_the_block_without_commit_aborts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.pwritev
    inside = [0]

    def slow(fd: int, buffers: Any, offset: int) -> int:
        inside[0] += 1
        try:
            if offset > 0:
                time.sleep(0.05)
            return real(fd, buffers, offset)
        finally:
            inside[0] -= 1

    monkeypatch.setattr(os, "pwritev", slow)
    state = {f"t{i}": torch.full((1024,), float(i)) for i in range(8)}
    with pytest.raises(KeyError):
        async with astage.SafetensorsWriter(tmp_path / "c.safetensors", threads=2) as writer:
            await writer.begin(state)
            for key, tensor in state.items():
                await writer.write((key,), tensor)
            raise KeyError("the caller fails before commit()")  # not wrapped in a group
    assert inside[0] == 0
    assert os.listdir(tmp_path) == []
    with pytest.raises(astage.UsageError, match="aborted"):
        await writer.commit()


@pytest.mark.asyncio
async def test_a_failed_write_is_raised_by_the_next_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.pwritev

    def failing(fd: int, buffers: Any, offset: int) -> int:
        if offset == 0:
            return real(fd, buffers, offset)
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "pwritev", failing)
    state = {"a": torch.ones(4), "b": torch.ones(4)}
    async with astage.SafetensorsWriter(tmp_path / "c.safetensors") as writer:
        await writer.begin(state)
        await writer.write(("a",), state["a"])
        with pytest.raises(astage.CheckpointWriteError, match="EIO"):
            with anyio.fail_after(2):
                while True:  # the worker fails in the background; the next call says so
                    await writer.write(("b",), state["b"])
                    await anyio.sleep(0.01)
        with pytest.raises(astage.CheckpointWriteError, match="EIO"):
            await writer.commit()
        await writer.abort()
    assert os.listdir(tmp_path) == []


def test_load_rejects_garbage(tmp_path: Path) -> None:
    (tmp_path / "g").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00nope!")
    with pytest.raises(astage.CheckpointFormatError, match="not JSON"):
        astage.load(tmp_path / "g")
    (tmp_path / "short").write_bytes(b"\x01")
    with pytest.raises(astage.CheckpointFormatError, match="too short"):
        astage.load(tmp_path / "short")


def write_file(path: Path, header: dict[str, Any], data: bytes = b"") -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        ({"shape": [1], "data_offsets": [0, 4]}, "'dtype'"),
        ({"dtype": "F32", "data_offsets": [0, 4]}, "'shape'"),
        ({"dtype": "F32", "shape": [1]}, "'data_offsets'"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}, "'data_offsets' span 4"),
        ({"dtype": "X99", "shape": [1], "data_offsets": [0, 4]}, "dtype 'X99'"),
    ],
)
def test_format_errors_name_the_file_and_the_field(
    tmp_path: Path, entry: dict[str, Any], field: str
) -> None:
    path = tmp_path / "bad.safetensors"
    write_file(path, {"w": entry}, b"\0" * 4)
    with pytest.raises(astage.CheckpointFormatError) as caught:
        astage.load(path)
    message = str(caught.value)
    assert str(path) in message and "'w'" in message and field in message


def test_a_skeleton_view_without_its_fields_is_a_format_error(tmp_path: Path) -> None:
    skeleton = {"dict": [["v", {"tensor": "['w']", "dtype": "float32", "shape": [1]}]]}
    meta = {"astage": json.dumps({"version": 1, "skeleton": skeleton})}
    entry = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    write_file(tmp_path / "v.safetensors", {"__metadata__": meta, "['w']": entry}, b"\0" * 4)
    with pytest.raises(astage.CheckpointFormatError, match="missing 'offset'"):
        astage.load(tmp_path / "v.safetensors")


def _takes_by_thread(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """From now on, how many batches each writer thread took, by its index."""
    import threading

    from astage._files import _writer

    takes: dict[str, int] = {}
    real = _writer.WriteThreads._take

    def counted(self: _writer.WriteThreads) -> Any:
        index = threading.current_thread().name.split(":")[0]
        takes[index] = takes.get(index, 0) + 1
        return real(self)

    monkeypatch.setattr(_writer.WriteThreads, "_take", counted)
    return takes


def test_small_pieces_are_written_by_one_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More threads over small pieces only took turns at the GIL against the caller's loop
    (a 1 ms heartbeat's p99 1.6-4.9 ms with four, 0.7-1.2 ms with one, as fast)."""
    from astage._files import _writer

    takes = _takes_by_thread(monkeypatch)
    monkeypatch.setattr("astage._files._writer._IOV_MAX", 4)  # many batches
    write_items = _writer.SafetensorsWriter._write_items

    def slow(self: _writer.SafetensorsWriter, items: Any, sharing: Any = None) -> None:
        time.sleep(0.001)  # the other threads would have time to take batches
        write_items(self, items, sharing)

    monkeypatch.setattr(_writer.SafetensorsWriter, "_write_items", slow)
    state = {f"t{i}": torch.full((16,), float(i)) for i in range(400)}
    astage.save_sync(state, tmp_path / "small.safetensors", threads=4)
    assert set(takes) == {"astage-writer-0"} and takes["astage-writer-0"] >= 100
    assert safetensors.torch.load_file(tmp_path / "small.safetensors")["['t7']"][0] == 7.0


def test_big_pieces_are_written_by_every_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    takes = _takes_by_thread(monkeypatch)
    monkeypatch.setattr("astage._files._writer.SPARE_THREAD_BYTES", 1 << 10)
    monkeypatch.setattr("astage._files._writer.SPARE_THREAD_PIECE_BYTES", 1 << 10)
    state = {f"t{i}": torch.full((1 << 16,), float(i)) for i in range(64)}  # 256 KiB each
    writer = astage.SafetensorsWriter(tmp_path / "big.safetensors", threads=4, chunk_bytes=1 << 14)
    threads = writer.open_in_threads(state)
    for key, tensor in state.items():
        writer.queue((key,), tensor)  # all queued before a thread could drain them
    writer.commit_in_threads()
    threads.wait()
    threads.raise_failure()
    assert len(takes) > 1, takes
    loaded = safetensors.torch.load_file(tmp_path / "big.safetensors")
    assert all(loaded[f"['t{i}']"][-1] == float(i) for i in range(64))
