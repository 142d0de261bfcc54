"""Restore: ``astage.load(path, into=state_dict)`` and ``astage.load_async``.

A restore fills the tensors ``into`` already has, in place: it checks the structure before
writing anything, reads only the entries ``into`` asks for, reads contiguous CPU tensors
straight into their memory, and replaces plain values with the file's.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import outcome_of

import astage
from astage._files import _restore, _safetensors

# -- helpers ------------------------------------------------------------------------------------


def _trained(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A small model and an AdamW that has taken a step (so its state exists)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3 * (seed + 1))
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    return model, optimizer


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> dict[str, Any]:
    return {"model": model.state_dict(), "optim": optimizer.state_dict(), "step": step}


def _saved(tmp_path: Path, state: Any, name: str = "ckpt.safetensors") -> Path:
    path = tmp_path / name
    astage.save_sync(state, path)
    return path


def _snapshot(tree: Any) -> Any:
    """A deep copy of ``tree``'s tensors' values, to compare ``into`` after a refused restore."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {key: _snapshot(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_snapshot(value) for value in tree)
    return tree


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return bool(a == b)


class _Reads:
    """Every ``os.preadv`` a restore makes: the file offset, length and target address."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[int, int, int]] = []
        self.threads: set[str] = set()
        real = os.preadv
        lock = threading.Lock()

        def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
            (buffer,) = buffers
            address = ctypes.addressof(ctypes.c_char.from_buffer(buffer)) if len(buffer) else 0
            with lock:
                self.calls.append((offset, len(buffer), address))
                self.threads.add(threading.current_thread().name)
            return real(fd, buffers, offset)

        monkeypatch.setattr(os, "preadv", preadv)

    @property
    def nbytes(self) -> int:
        return sum(length for _, length, _ in self.calls)


# -- restoring ----------------------------------------------------------------------------------


def test_restores_model_and_optimizer_in_place(tmp_path: Path) -> None:
    source_model, source_optim = _trained(0)
    path = _saved(tmp_path, _state(source_model, source_optim, step=7))
    model, optim = _trained(1)
    into = _state(model, optim, step=0)
    weight = into["model"]["0.weight"]
    exp_avg = into["optim"]["state"][0]["exp_avg"]

    restored = astage.load(path, into=into)

    assert restored is into
    assert restored["model"]["0.weight"] is weight  # the same tensors, filled in place
    assert restored["optim"]["state"][0]["exp_avg"] is exp_avg
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, dict(source_model.named_parameters())[name]), name
    assert _same(restored["optim"]["state"], source_optim.state_dict()["state"])
    assert restored["step"] == 7  # plain values are the file's
    assert restored["optim"]["param_groups"][0]["lr"] == pytest.approx(1e-3)
    # The optimizer takes it back as usual, and its tensors are the restored ones.
    optim.load_state_dict(restored["optim"])
    assert torch.equal(optim.state_dict()["state"][0]["exp_avg"], exp_avg)


def test_contiguous_cpu_tensors_are_read_straight_into_their_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = {"a": torch.randn(64, 32), "b": torch.arange(1000, dtype=torch.int64)}
    path = _saved(tmp_path, source)
    into = {"a": torch.zeros(64, 32), "b": torch.zeros(1000, dtype=torch.int64)}
    reads = _Reads(monkeypatch)

    def no_staging(*args: Any) -> None:
        raise AssertionError("a contiguous CPU tensor went through a host buffer")

    monkeypatch.setattr(_restore._Plan, "_read_staged", no_staging)
    astage.load(path, into=into)

    assert torch.equal(into["a"], source["a"]) and torch.equal(into["b"], source["b"])
    spans = [(t.data_ptr(), t.data_ptr() + t.nbytes) for t in into.values()]
    for _, length, address in reads.calls:  # every byte landed in a destination, no copy
        assert any(lo <= address and address + length <= hi for lo, hi in spans)
    assert reads.nbytes == sum(t.nbytes for t in source.values())


def test_reads_only_the_entries_into_asks_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = {"small": torch.randn(10), "big": torch.randn(100_000), "other": torch.randn(5000)}
    path = _saved(tmp_path, source)
    into = {"small": torch.zeros(10)}
    reads = _Reads(monkeypatch)

    astage.load(path, into=into, strict=False)

    assert torch.equal(into["small"], source["small"])
    assert reads.nbytes == 10 * 4  # none of the 420 kB of the others


class _ThreadReads:
    """The reads with the thread that made each, in the order they were made."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, delay_s: float = 0.0) -> None:
        self.order: list[tuple[int, str]] = []
        real = os.preadv
        lock = threading.Lock()

        def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
            with lock:
                self.order.append((offset, threading.current_thread().name))
            time.sleep(delay_s)  # each piece takes a moment, so that threads would overlap
            return real(fd, buffers, offset)

        monkeypatch.setattr(os, "preadv", preadv)


def _probed_restore(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, sequential_below: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], _ThreadReads]:
    """A restore of 16 pieces of 64 KiB, the first two of them the probe."""
    # 128 and 384 KiB: 8 pieces.
    source = {"a": torch.randn(32 << 10), "b": torch.randn(48 << 10, dtype=torch.float64)}
    path = _saved(tmp_path, source)
    into = {"a": torch.empty(32 << 10), "b": torch.empty(48 << 10, dtype=torch.float64)}
    monkeypatch.setattr(_restore, "PIECE_BYTES", 64 << 10)
    monkeypatch.setattr(_restore, "PROBE_BYTES", 128 << 10)
    monkeypatch.setattr(_restore, "PROBED_FROM_BYTES", 512 << 10)
    monkeypatch.setattr(_restore, "SEQUENTIAL_BELOW", sequential_below)
    reads = _ThreadReads(monkeypatch, delay_s=0.002)
    astage.load(path, into=into)
    return source, into, reads


def test_a_restore_that_the_probe_finds_on_a_disk_reads_front_to_back_on_one_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every probe is slower than 2**62 bytes a second: the file counts as on a disk.
    source, into, reads = _probed_restore(tmp_path, monkeypatch, sequential_below=1 << 62)
    assert torch.equal(into["a"], source["a"]) and torch.equal(into["b"], source["b"])
    offsets = [offset for offset, _ in reads.order]
    assert len(offsets) == 8 and offsets == sorted(offsets)  # front to back
    probe, rest = reads.order[:2], reads.order[2:]
    assert {name for _, name in probe} == {threading.current_thread().name}
    assert len({name for _, name in rest}) == 1
    assert rest[0][1].startswith("astage-restore")


def test_a_restore_that_the_probe_finds_in_memory_reads_on_several_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, into, reads = _probed_restore(tmp_path, monkeypatch, sequential_below=0)
    assert torch.equal(into["a"], source["a"]) and torch.equal(into["b"], source["b"])
    assert {name for _, name in reads.order[:2]} == {threading.current_thread().name}
    assert len({name for _, name in reads.order[2:]}) > 1


def test_small_tensors_are_read_on_one_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small pieces cost Python per piece under the GIL: four threads only took turns at it,
    against the caller's event loop too (20,000 small tensors: 690-718 ms, 620-653 on one)."""
    source = {f"t{i}": torch.full((256,), float(i)) for i in range(64)}  # 1 KiB each
    path = _saved(tmp_path, source)
    into = {key: torch.zeros(256) for key in source}
    monkeypatch.setattr(_restore, "BATCH_JOBS", 2)  # 32 batches that four threads could share
    reads = _ThreadReads(monkeypatch, delay_s=0.001)
    astage.load(path, into=into)
    assert all(torch.equal(into[key], source[key]) for key in source)
    assert len({name for _, name in reads.order}) == 1, reads.order


def test_big_tensors_are_read_in_pieces_on_several_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = {"w": torch.randn(256, 1024), "v": torch.randn(300_001)}
    path = _saved(tmp_path, source)
    into = {"w": torch.empty(256, 1024), "v": torch.empty(300_001)}
    monkeypatch.setattr(_restore, "PIECE_BYTES", 64 << 10)
    reads = _Reads(monkeypatch)
    real = _safetensors.read_exactly

    def slow(*args: Any) -> None:  # each piece takes a moment, so the threads overlap
        time.sleep(0.002)
        real(*args)

    monkeypatch.setattr(_restore, "read_exactly", slow)
    astage.load(path, into=into)

    assert torch.equal(into["w"], source["w"]) and torch.equal(into["v"], source["v"])
    assert len(reads.calls) >= (256 * 1024 * 4 + 300_001 * 4) // (64 << 10)
    assert max(length for _, length, _ in reads.calls) <= 64 << 10
    assert len(reads.threads) > 1


def test_pieces_through_host_buffers_as_for_a_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The device path's pieces (read into a buffer, copy_ into a byte range), shown on CPU."""
    source = {"w": torch.randn(300, 129), "i": torch.arange(5000, dtype=torch.int16)}
    path = _saved(tmp_path, source)
    monkeypatch.setattr(_restore, "PIECE_BYTES", 16 << 10)
    monkeypatch.setattr(_restore, "_host_memory", lambda tensor: False)
    staged: list[int] = []
    real = _restore._Plan._read_staged

    def recording(self: Any, fill: Any, destination: torch.Tensor, *args: Any) -> None:
        staged.append(destination.numel())
        real(self, fill, destination, *args)

    monkeypatch.setattr(_restore._Plan, "_read_staged", recording)
    into = {"w": torch.zeros(300, 129), "i": torch.zeros(5000, dtype=torch.int16)}
    astage.load(path, into=into)
    assert torch.equal(into["w"], source["w"]) and torch.equal(into["i"], source["i"])
    assert len(staged) > 2 and max(staged) <= 16 << 10


def test_views_tied_tensors_and_non_contiguous_destinations(tmp_path: Path) -> None:
    base = torch.randn(6, 4)
    source = {
        "t": base.t(),  # a strided view in the file
        "row": base[2],  # a contiguous view inside a bigger storage
        "tied": base,
        "again": base,
        "half": torch.randn(3, 5).to(torch.float16),
        "c": torch.randn(4, dtype=torch.complex64).conj(),
        "empty": torch.zeros(0, 3),
    }
    path = _saved(tmp_path, source)
    shared = torch.zeros(6, 4)
    into = {
        "t": torch.zeros(6, 4).t(),  # a non-contiguous destination
        "row": torch.zeros(4),
        "tied": shared,
        "again": shared,
        "half": torch.zeros(3, 5, dtype=torch.float16),
        "c": torch.zeros(4, dtype=torch.complex64),
        "empty": torch.zeros(0, 3),
    }

    astage.load(path, into=into)

    for key, value in source.items():
        assert torch.equal(into[key].resolve_conj(), value.resolve_conj()), key
    assert into["tied"] is into["again"] is shared


def test_conjugate_and_negative_destinations_get_their_values(tmp_path: Path) -> None:
    source = {"c": torch.randn(4, dtype=torch.complex64), "n": torch.randn(4)}
    path = _saved(tmp_path, source)
    conj = torch.zeros(4, dtype=torch.complex64).conj()  # its memory holds the conjugates
    astage.load(path, into={"c": conj, "n": torch.zeros(4)})
    assert torch.equal(conj.resolve_conj(), source["c"])


def test_parameters_that_require_grad_are_filled(tmp_path: Path) -> None:
    source = {"p": torch.randn(3, 4), "q": torch.randn(4, 3)}
    path = _saved(tmp_path, source)
    p = torch.nn.Parameter(torch.zeros(3, 4))
    q = torch.nn.Parameter(torch.zeros(3, 4).t())  # non-contiguous: the copy_ path
    astage.load(path, into={"p": p, "q": q})
    assert torch.equal(p.detach(), source["p"]) and torch.equal(q.detach(), source["q"])
    assert p.requires_grad and q.requires_grad


def test_plain_values_lists_and_tuples_take_the_files_values(tmp_path: Path) -> None:
    source = {
        "lr": 0.5,
        "betas": (0.8, 0.9),
        "names": ["a", "b", "c"],
        "pairs": [torch.ones(2), 3],
        "inner": (torch.full((2,), 4.0), "x"),
        "array": np.arange(6, dtype=np.int32).reshape(2, 3),
        "size": torch.Size([2, 3]),
    }
    path = _saved(tmp_path, source)
    pairs = [torch.zeros(2), 0]
    inner_tensor = torch.zeros(2)
    into: dict[str, Any] = {
        "lr": 0.1,
        "betas": (0.0, 0.0),
        "names": [],
        "pairs": pairs,
        "inner": (inner_tensor, "y"),
        "array": None,
        "size": torch.Size([0]),
    }

    astage.load(path, into=into)

    assert into["lr"] == 0.5 and into["betas"] == (0.8, 0.9) and into["names"] == ["a", "b", "c"]
    assert into["pairs"] is pairs and pairs[1] == 3 and torch.equal(pairs[0], torch.ones(2))
    assert into["inner"][0] is inner_tensor and into["inner"][1] == "x"
    assert torch.equal(inner_tensor, torch.full((2,), 4.0))
    assert isinstance(into["array"], np.ndarray) and into["array"].tolist() == [
        [0, 1, 2],
        [3, 4, 5],
    ]
    assert into["size"] == torch.Size([2, 3])


def test_a_plain_safetensors_file_restores_into_a_flat_dict(tmp_path: Path) -> None:
    source = {"x": torch.randn(5, 5), "y": torch.arange(7, dtype=torch.int32)}
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file(source, str(path))
    into = {"x": torch.zeros(5, 5), "y": torch.zeros(7, dtype=torch.int32)}
    astage.load(path, into=into)
    assert torch.equal(into["x"], source["x"]) and torch.equal(into["y"], source["y"])


# -- refusals -----------------------------------------------------------------------------------


def _refused(path: Path, into: Any, match: str, **options: Any) -> astage.InvalidOptionsError:
    before = _snapshot(into)
    with pytest.raises(astage.InvalidOptionsError, match=match) as caught:
        astage.load(path, into=into, **options)
    assert str(path) in str(caught.value) or "restore" in str(caught.value)
    assert _same(into, before), "a refused restore changed `into`"
    return caught.value


def test_mismatches_are_refused_naming_the_path_and_before_anything_changes(
    tmp_path: Path,
) -> None:
    source = {"a": torch.randn(3), "m": {"w": torch.randn(2, 2), "n": 1}, "z": torch.randn(4)}
    path = _saved(tmp_path, source)

    def into(**changes: Any) -> dict[str, Any]:
        # "a" comes first: a late mismatch must not leave it restored.
        tree = {"a": torch.zeros(3), "m": {"w": torch.zeros(2, 2), "n": 0}, "z": torch.zeros(4)}
        tree.update(changes)
        return tree

    error = _refused(path, into(z=torch.zeros(5)), r"\['z'\].*shape \[5\].*shape \[4\]")
    assert str(path) in str(error)
    _refused(path, into(z=torch.zeros(4, dtype=torch.float64)), r"\['z'\].*float64.*float32")
    _refused(path, into(m={"w": torch.zeros(2, 2)}), r"\['m'\].*'n'.*strict=False")
    _refused(path, into(m={"w": torch.zeros(2, 2), "n": 0, "extra": 1}), r"no key 'extra'")
    _refused(
        path,
        into(m={"w": torch.zeros(2, 2), "n": 0, "extra": 1}),
        r"no key 'extra'",
        strict=False,  # a key the file lacks is refused either way
    )
    _refused(path, into(m=[torch.zeros(2, 2)]), r"\['m'\].*holds a list.*holds a dict")
    _refused(path, into(z=5), r"\['z'\].*holds a tensor where `into` holds a plain value")
    _refused(path, into(m={"w": torch.zeros(2, 2), "n": torch.zeros(1)}), r"\['m'\]\['n'\]")
    _refused(path, into(z=torch.zeros(1).expand(4)), r"expanded")
    freed = torch.zeros(4)
    freed.untyped_storage().resize_(0)  # freed under the tensor: was torch's raw RuntimeError
    # Not _refused, whose snapshot would read `freed`; an outcome as text, since a failure
    # report that showed the freed tensor would read it too.
    outcome = outcome_of(lambda: astage.load(path, into=into(z=freed)))
    assert outcome.startswith("InvalidOptionsError: at ['z']: "), outcome
    assert "reaches 16 bytes of its storage, which holds 0" in outcome
    with pytest.raises(astage.InvalidOptionsError, match=r"\['z'\].*meta"):
        astage.load(path, into=into(z=torch.zeros(4, device="meta")))
    with pytest.raises(astage.InvalidOptionsError, match="device"):
        astage.load(path, into=into(), device="meta")
    with pytest.raises(astage.InvalidOptionsError, match="device"):
        anyio.run(lambda: astage.load_async(path, into=into(), device="meta"))


def test_strict_false_restores_a_subset(tmp_path: Path) -> None:
    source: dict[str, Any] = {"a": torch.randn(3), "m": {"w": torch.randn(2, 2), "n": 1}}
    path = _saved(tmp_path, source)
    into = {"m": {"w": torch.zeros(2, 2)}}
    astage.load(path, into=into, strict=False)
    assert torch.equal(into["m"]["w"], source["m"]["w"]) and "n" not in into["m"]


def test_a_corrupt_file_is_a_format_error_and_into_is_untouched(tmp_path: Path) -> None:
    path = _saved(tmp_path, {"a": torch.randn(100)})
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data[:-8]))  # truncated
    into = {"a": torch.zeros(100)}
    with pytest.raises(astage.CheckpointFormatError, match=str(path.name)):
        astage.load(path, into=into)
    assert not into["a"].any()


def test_a_failed_read_leaves_plain_values_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _saved(tmp_path, {"a": torch.randn(100), "n": 5})

    def broken(fd: int, buffers: Any, offset: int) -> int:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "preadv", broken)
    into = {"a": torch.zeros(100), "n": 0}
    with pytest.raises(astage.CheckpointError, match="Input/output error"):
        astage.load(path, into=into)
    assert into["n"] == 0


# -- the async face -----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_load_async_restores_off_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source: dict[str, Any] = {"w": torch.randn(512, 1024), "n": 3}
    path = _saved(tmp_path, source)
    monkeypatch.setattr(_restore, "PIECE_BYTES", 64 << 10)
    real = _safetensors.read_exactly

    def slow(*args: Any) -> None:  # 32 pieces of 2 ms: the loop would notice a blocking call
        time.sleep(0.002)
        real(*args)

    monkeypatch.setattr(_restore, "read_exactly", slow)
    into = {"w": torch.zeros(512, 1024), "n": 0}
    restored = await astage.load_async(path, into=into)
    assert restored is into and torch.equal(into["w"], source["w"]) and into["n"] == 3
    fresh = await astage.load_async(path)  # without `into`: load, in a thread
    assert torch.equal(fresh["w"], source["w"])


@pytest.mark.asyncio
async def test_cancelling_load_async_waits_for_the_pieces_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _saved(tmp_path, {"w": torch.randn(64, 1024)})
    monkeypatch.setattr(_restore, "PIECE_BYTES", 4 << 10)
    running = 0
    started = 0
    lock = threading.Lock()
    real = _safetensors.read_exactly

    def slow(*args: Any) -> None:
        nonlocal running, started
        with lock:
            running += 1
            started += 1
        try:
            time.sleep(0.02)
            real(*args)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(_restore, "read_exactly", slow)
    into = {"w": torch.zeros(64, 1024)}
    with anyio.move_on_after(0.1) as scope:
        await astage.load_async(path, into=into)
    assert scope.cancelled_caught
    assert running == 0  # no thread still writes into `into` once the call is gone
    assert started < 64  # it stopped early: not all 64 pieces were read


@pytest.mark.cuda
def test_restores_into_cuda_tensors_through_pinned_buffers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source: dict[str, Any] = {"w": torch.randn(1024, 256), "t": torch.randn(16, 8).t(), "n": 1}
    path = _saved(tmp_path, source)
    monkeypatch.setattr(_restore, "PIECE_BYTES", 256 << 10)
    pinned: list[bool] = []
    real_empty = torch.empty

    def recording_empty(*args: Any, **kwargs: Any) -> torch.Tensor:
        tensor = real_empty(*args, **kwargs)
        if kwargs.get("pin_memory"):
            pinned.append(tensor.is_pinned())
        return tensor

    monkeypatch.setattr(torch, "empty", recording_empty)
    into: dict[str, Any] = {
        "w": torch.zeros(1024, 256, device="cuda"),
        "t": torch.zeros(8, 16, device="cuda"),
        "n": 0,
    }
    astage.load(path, into=into)
    assert torch.equal(into["w"].cpu(), source["w"]) and torch.equal(into["t"].cpu(), source["t"])
    assert pinned and all(pinned)
