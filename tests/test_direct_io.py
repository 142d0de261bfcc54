"""Direct I/O in SafetensorsWriter: the aligned layout, the direct path, and the fallbacks."""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import same_values
from test_writer import WAYS

import astage
import astage._files._writer as writer_module
from astage._files._layout import plan_layout
from astage._files._safetensors import DATA_ALIGN

PAGE = 4096


@pytest.fixture(autouse=True)
def fresh_folder_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no folder remembered as refusing (or allowing) direct I/O."""
    monkeypatch.setattr(writer_module, "_direct_folders", {})


def page_aligned(numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A tensor whose storage starts on a page, as an mmap arena gives."""
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    mapping = mmap.mmap(-1, nbytes)
    tensor = torch.frombuffer(mapping, dtype=dtype)
    tensor.copy_(torch.randn(numel).to(dtype))
    assert tensor.data_ptr() % PAGE == 0
    return tensor


def off_page(numel: int) -> torch.Tensor:
    """A tensor whose exact storage starts 64 bytes past a page (as malloc'ed buffers do)."""
    mapping = mmap.mmap(-1, numel * 4 + PAGE)
    tensor = torch.frombuffer(mapping, dtype=torch.float32, count=numel, offset=64)
    tensor.copy_(torch.randn(numel))
    assert tensor.untyped_storage().data_ptr() % PAGE == 64
    assert tensor.untyped_storage().nbytes() == numel * 4
    return tensor


def mixed_state() -> dict[str, Any]:
    return {
        "aligned": page_aligned(1 << 18),  # 1 MiB, whole pages, on a page: straight from memory
        "odd_address": off_page(1 << 18),  # whole pages, off a page: buffered
        "odd_size": page_aligned(300_001),  # not whole pages: head and tail buffered
        "odd_both": torch.randn(200_003),
        "small": torch.arange(7, dtype=torch.int16),
        "empty": torch.ones(0),
    }


def direct_allowed(folder: Path) -> bool:
    probe = folder / ".probe"
    probe.write_bytes(b"")
    try:
        os.close(os.open(probe, os.O_WRONLY | getattr(os, "O_DIRECT", 0) | os.O_CLOEXEC))
    except OSError:
        return False
    finally:
        probe.unlink()
    return hasattr(os, "O_DIRECT")


def check_file(path: Path, state: dict[str, Any]) -> None:
    back = astage.load(path)
    assert all(same_values(back[key], state[key]) for key in state)
    other = safetensors.torch.load_file(str(path))  # the reference reader reads it too
    assert torch.equal(other["['aligned']"], state["aligned"])
    assert torch.equal(other["['odd_both']"], state["odd_both"])


def test_staged_entries_start_on_a_page_whole_pages_first() -> None:
    state = {
        "small": torch.ones(3),
        "odd": torch.ones(1001),
        "page": torch.ones(1024),
        "pages": torch.ones(4096),
        "array": np.arange(6, dtype=np.float32),
    }
    layout = plan_layout(state)
    assert len(layout.header) % DATA_ALIGN == 0  # JSON padded so the captured array ends there
    assert layout.data_start % 8 == 0  # (captured bytes a multiple of 8: the array too)
    begins = {entry.key: layout.data_start + entry.begin for entry in layout.entries}
    assert begins["['page']"] % PAGE == 0 and begins["['pages']"] % PAGE == 0
    assert begins["['odd']"] % PAGE == 0  # the biggest of the others starts aligned too
    order = sorted(layout.entries, key=lambda entry: entry.begin)
    assert [entry.key for entry in order] == ["['page']", "['pages']", "['odd']", "['small']"]


@pytest.mark.asyncio
@pytest.mark.parametrize("way", WAYS)
async def test_direct_writes_every_byte_right(tmp_path: Path, way: str) -> None:
    if not direct_allowed(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT")
    state = await anyio.to_thread.run_sync(mixed_state)
    path = tmp_path / "d.safetensors"
    writer = astage.SafetensorsWriter(path, chunk_bytes=256 << 10, threads=3)
    await WAYS[way](writer, state)
    await anyio.to_thread.run_sync(check_file, path, state)
    if way == "inline":  # each write() awaited: buffered, which returns after a copy
        assert writer.direct_bytes == 0
        return
    # The page-aligned buffers' pieces of 256 KiB (odd_size's last piece is smaller: buffered);
    # the malloc'ed buffers (off a page) go buffered.
    piece = 256 << 10
    assert writer.direct_bytes == (1 << 20) + 300_001 * 4 // piece * piece
    assert writer_module._direct_folders == {str(tmp_path): True}


@pytest.mark.asyncio
async def test_direct_off_leaves_everything_buffered(tmp_path: Path) -> None:
    state = await anyio.to_thread.run_sync(mixed_state)
    writer = astage.SafetensorsWriter(tmp_path / "b.safetensors", direct=False)
    await WAYS["entered"](writer, state)
    await anyio.to_thread.run_sync(check_file, tmp_path / "b.safetensors", state)
    assert writer.direct_bytes == 0


@pytest.mark.asyncio
async def test_refused_at_open_is_remembered_per_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.open
    tries: list[str] = []

    def like_tmpfs(path: Any, flags: int, *args: Any) -> int:
        if flags & writer_module._O_DIRECT:
            tries.append(os.fspath(path))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(path, flags, *args)

    monkeypatch.setattr(writer_module, "_O_DIRECT", getattr(os, "O_DIRECT", 0o40000))
    monkeypatch.setattr(os, "open", like_tmpfs)
    state = await anyio.to_thread.run_sync(mixed_state)
    for name in ("1", "2"):
        writer = astage.SafetensorsWriter(tmp_path / f"{name}.safetensors")
        await WAYS["entered"](writer, state)
        assert writer.direct_bytes == 0
        await anyio.to_thread.run_sync(check_file, tmp_path / f"{name}.safetensors", state)
    assert len(tries) == 1  # the second file in the folder did not ask again
    assert writer_module._direct_folders == {str(tmp_path): False}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1.safetensors", "2.safetensors"]


@pytest.mark.asyncio
async def test_refused_at_the_first_write_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some network filesystems open with O_DIRECT but refuse the writes: rewrite buffered."""
    if not direct_allowed(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT")
    real = os.pwritev
    refused: list[int] = []

    def refuse_direct(fd: int, buffers: Any, offset: int) -> int:
        if _is_direct(fd):
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", refuse_direct)
    state = await anyio.to_thread.run_sync(mixed_state)
    path = tmp_path / "f.safetensors"
    writer = astage.SafetensorsWriter(path, threads=1)
    await WAYS["entered"](writer, state)
    await anyio.to_thread.run_sync(check_file, path, state)
    assert refused and writer.direct_bytes == 0
    assert writer_module._direct_folders == {str(tmp_path): False}


def _is_direct(fd: int) -> bool:
    import fcntl

    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0))


@pytest.mark.asyncio
async def test_tmpfs_falls_back(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or direct_allowed(shm):
        pytest.skip("no tmpfs at /dev/shm (or it allows O_DIRECT)")
    folder = shm / f"astage-test-{os.getpid()}-{tmp_path.name}"
    folder.mkdir()
    try:
        state = await anyio.to_thread.run_sync(mixed_state)
        writer = astage.SafetensorsWriter(folder / "t.safetensors")
        await WAYS["entered"](writer, state)
        await anyio.to_thread.run_sync(check_file, folder / "t.safetensors", state)
        assert writer.direct_bytes == 0
        assert writer_module._direct_folders == {str(folder): False}
    finally:
        for child in folder.iterdir():
            child.unlink()
        folder.rmdir()


def test_neighbouring_pieces_go_direct_in_one_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pieces that lie side by side in the file are gathered into one direct ``pwritev``: the
    disk gets one big request instead of many small ones (each has a fixed cost)."""
    if not direct_allowed(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT")
    state = {f"t{i}": page_aligned(1 << 16) for i in range(6)}  # 256 KiB each, whole pages
    real = os.pwritev
    direct_calls: list[tuple[int, int]] = []

    def counting(fd: int, buffers: Any, offset: int) -> int:
        if _is_direct(fd):
            direct_calls.append((offset, sum(len(b) for b in buffers)))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", counting)
    path = tmp_path / "g.safetensors"
    writer = astage.SafetensorsWriter(path, threads=1)
    threads = writer.open_in_threads(state)
    try:
        # The writer's thread idles (nothing queued); hand one thread's batch straight in, as
        # WriteThreads._take gathers it: every piece of the six tensors at once.
        assert writer.layout is not None
        items = [
            piece
            for key, tensor in state.items()
            for piece in writer._pieces(writer.layout.by_path[(key,)], tensor, (key,))
        ]
        writer._write_items(items)
        assert len(direct_calls) == 1
        assert direct_calls[0][1] == 6 << 18 == writer.direct_bytes
        for key, tensor in state.items():
            writer.queue((key,), tensor)  # bytes already written: rewritten, the same ones
        writer.commit_in_threads()
    except BaseException:
        threads.abort()  # no writer thread outlives a failed test
        raise
    finally:
        threads.wait()
    threads.raise_failure()
    back = safetensors.torch.load_file(str(path))
    assert all(torch.equal(back[f"['{key}']"], state[key]) for key in state)
