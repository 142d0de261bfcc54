"""astage.save / start_save / load: round trips, safetensors interop, failures, buffer safety."""

from __future__ import annotations

import errno
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import anyio
import pytest
import safetensors.torch
import torch
from conftest import assert_tree_staged, count_recorders, iter_tensors, mutate_, same_values

import astage
from astage._devices import _host
from astage._drivers import _async as _stager


def training_state(seed: int = 0) -> dict[str, Any]:
    """A tiny language model with tied embeddings, AdamW after one step, and plain values."""
    torch.manual_seed(seed)
    embed = torch.nn.Embedding(16, 8)
    head = torch.nn.Linear(8, 16, bias=False)
    head.weight = embed.weight  # tied
    model = torch.nn.ModuleDict({"embed": embed, "mlp": torch.nn.Linear(8, 8), "head": head})
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 16, (4,))
    model["head"](model["mlp"](model["embed"](x))).sum().backward()
    optim.step()
    return {
        "model": model.state_dict(),
        "optim": optim.state_dict(),
        "step": 1,
        "loss": 2.5,
        "name": "run-1",
        "done": False,
        "extra": None,
        "history": [1.0, 0.5, (3, "x")],
    }


# The first AdamW step imports torch's optimizer machinery (seconds): pay it at import, not
# inside a test's event loop, where the blocking-call detector would rightly complain.
training_state()


def files_in(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def temp_files(folder: Path) -> list[str]:
    return [name for name in files_in(folder) if name.endswith(".tmp")]


@pytest.mark.asyncio
async def test_round_trip_model_optim_plain_values_tied(tmp_path: Path) -> None:
    state = training_state()
    path = tmp_path / "ckpt.safetensors"
    result = await astage.save(state, path)
    assert result.path == str(path)
    assert result.tensors == len(list(iter_tensors(state)))
    assert result.nbytes > 0
    assert result.seconds >= result.staging_seconds > 0
    assert result.gb_per_s > 0
    assert files_in(tmp_path) == ["ckpt.safetensors"]

    back = astage.load(path)
    assert_tree_staged(back, state)  # same containers, types, values, layouts
    assert type(back["model"]) is OrderedDict
    model = back["model"]
    assert model["embed.weight"].data_ptr() == model["head.weight"].data_ptr()  # tied again
    assert model["head.weight"].untyped_storage().nbytes() == 16 * 8 * 4  # stored once


@pytest.mark.asyncio
async def test_loaded_state_restores_a_model(tmp_path: Path) -> None:
    state = training_state(seed=3)
    await astage.save(state, tmp_path / "c.safetensors")
    back = astage.load(tmp_path / "c.safetensors")
    model = torch.nn.ModuleDict(
        {
            "embed": torch.nn.Embedding(16, 8),
            "mlp": torch.nn.Linear(8, 8),
            "head": torch.nn.Linear(8, 16, bias=False),
        }
    )
    model["head"].weight = model["embed"].weight
    model.load_state_dict(back["model"])
    mlp: Any = model["mlp"]
    assert torch.equal(mlp.weight, state["model"]["mlp.weight"])
    optim = torch.optim.AdamW(model.parameters())
    optim.load_state_dict(back["optim"])


@pytest.mark.asyncio
async def test_module_state_dict_metadata_is_kept(tmp_path: Path) -> None:
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    state: dict[str, Any] = {"model": net.state_dict(), "step": 7}
    expected = state["model"]._metadata
    assert expected["1"] == {"version": 2}  # BatchNorm's version: load_state_dict reads it
    async with astage.Stager() as stager:
        await astage.save(state, tmp_path / "m.safetensors", stager=stager)
    back = astage.load(tmp_path / "m.safetensors")
    model: Any = back["model"]
    assert type(model) is OrderedDict
    saved: Any = model._metadata  # type: ignore[attr-defined]
    assert saved == expected
    assert type(saved) is OrderedDict
    assert list(saved) == list(expected)
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    fresh.load_state_dict(model)
    restored: Any = fresh[0]
    original: Any = net[0]
    assert torch.equal(restored.weight, original.weight)
    assert len(safetensors.torch.load_file(str(tmp_path / "m.safetensors"))) == len(state["model"])

    plain: OrderedDict[str, Any] = OrderedDict(a=torch.ones(2))  # no _metadata: none back
    await astage.save(plain, tmp_path / "p.safetensors")
    assert not hasattr(astage.load(tmp_path / "p.safetensors"), "_metadata")


@pytest.mark.asyncio
async def test_tensor_in_metadata_is_refused(tmp_path: Path) -> None:
    state: OrderedDict[str, Any] = OrderedDict(w=torch.ones(2))
    state._metadata = {"": {"scale": torch.ones(1)}}  # type: ignore[attr-defined]
    with pytest.raises(astage.UnsavableError, match=r"\._metadata\[''\]\['scale'\]"):
        await astage.save({"model": state}, tmp_path / "x.safetensors")
    assert files_in(tmp_path) == []


@pytest.mark.asyncio
async def test_safetensors_library_reads_every_tensor(tmp_path: Path) -> None:
    state = training_state()
    path = tmp_path / "ckpt.safetensors"
    await astage.save(state, path, metadata={"run": "abc"})
    loaded = safetensors.torch.load_file(str(path))
    tensors = dict(iter_tensors(state))
    # Every key is a path; the tied head weight is stored once, under the embedding's path.
    expected = {astage.format_path(p) for p in tensors} - {"['model']['head.weight']"}
    assert set(loaded) == expected
    for path_, tensor in tensors.items():
        key = astage.format_path(path_)
        if key in loaded:
            assert same_values(loaded[key], tensor)
    with safetensors.safe_open(str(path), "pt") as file:
        metadata = file.metadata()
    assert metadata["run"] == "abc"
    assert metadata["format"] == "pt"


@pytest.mark.asyncio
async def test_views_dtypes_and_empty_tensors(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {
        "base": base,
        "slice": base[1:3],
        "t": base.t(),
        "bytes_view": base.view(torch.int32),
        "only_slice": torch.arange(10.0)[2:7],  # its storage is not stored as a whole tensor
        "bf16": torch.randn(5).to(torch.bfloat16),
        "c128": torch.randn(3, dtype=torch.complex128),  # no safetensors dtype: bytes + view
        "conj": torch.randn(3, dtype=torch.complex64).conj(),
        "bool": torch.tensor([True, False]),
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(7, dtype=torch.int64),
        "f8": torch.randn(4).to(torch.float8_e4m3fn),
    }
    path = tmp_path / "v.safetensors"
    await astage.save(state, path)
    back = astage.load(path)
    assert_tree_staged(back, state)
    storage = back["base"].untyped_storage().data_ptr()
    for name in ("slice", "t", "bytes_view"):
        assert back[name].untyped_storage().data_ptr() == storage
    assert back["conj"].is_conj()
    safetensors.torch.load_file(str(path))  # a valid file for the reference reader


@pytest.mark.asyncio
async def test_save_with_a_given_stager_reuses_its_buffers(tmp_path: Path) -> None:
    state = training_state()
    async with astage.Stager() as stager:
        await astage.save(state, tmp_path / "a.safetensors", stager=stager)
        info = stager.cache_info()
        mutate_(state)
        await astage.save(state, tmp_path / "b.safetensors", stager=stager)
        assert stager.cache_info() == info
        assert stager.last_stats is not None and stager.last_stats.new_nbytes == 0
    assert_tree_staged(astage.load(tmp_path / "b.safetensors"), state)


@pytest.mark.asyncio
async def test_save_without_a_stager_records_no_structure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stager save makes is used for one call: a recording for later calls would be waste
    (a first call over many small tensors takes a third longer with it)."""
    recorders = count_recorders(monkeypatch)
    state = training_state()
    await astage.save(state, tmp_path / "a.safetensors")
    assert recorders == []
    assert_tree_staged(astage.load(tmp_path / "a.safetensors"), state)
    async with astage.Stager() as stager:  # a stager of the caller's records, as ever
        await astage.save(state, tmp_path / "b.safetensors", stager=stager)
    assert len(recorders) == 1


@pytest.mark.asyncio
async def test_writing_starts_before_staging_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copies_done: list[float] = []
    real = _host.run_host_batch

    def timed_copy(batch: Any) -> Any:
        result = real(batch)
        time.sleep(0.01)  # room between batches for the loop to hand tensors to the writer
        copies_done.append(time.perf_counter())
        return result

    monkeypatch.setattr(_stager, "run_host_batch", timed_copy)
    writes: list[float] = []
    real_pwritev = os.pwritev

    def timed_pwritev(fd: int, buffers: Any, offset: int) -> int:
        writes.append(time.perf_counter())
        return real_pwritev(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", timed_pwritev)
    state = {f"t{i}": torch.full((64 * 1024,), float(i)) for i in range(8)}  # 256 KiB each
    async with astage.Stager(chunk_bytes=256 * 1024, max_inflight_bytes=256 * 1024) as stager:
        await astage.save(state, tmp_path / "c.safetensors", stager=stager)
    assert len(copies_done) == 8
    data_writes = writes[1:]  # the first write is the header
    assert data_writes and data_writes[0] < copies_done[-1]


@pytest.mark.asyncio
async def test_to_a_custom_writer(tmp_path: Path) -> None:
    class Recorder:
        def __init__(self) -> None:
            self.calls: list[Any] = []

        async def begin(self, state_dict: Any) -> None:
            self.calls.append("begin")

        async def write(self, path: astage.Path, tensor: torch.Tensor) -> None:
            self.calls.append((path, tensor.clone()))

        async def commit(self) -> None:
            self.calls.append("commit")

        async def abort(self) -> None:
            self.calls.append("abort")

    recorder = Recorder()
    assert isinstance(recorder, astage.CheckpointWriter)
    result = await astage.save({"a": torch.ones(2), "b": [torch.zeros(1)]}, recorder)
    assert result.path is None and result.tensors == 2
    assert recorder.calls[0] == "begin" and recorder.calls[-1] == "commit"
    assert {call[0] for call in recorder.calls[1:-1]} == {("a",), ("b", 0)}


# -- failures -----------------------------------------------------------------------------------


async def previous_file(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    path = tmp_path / "ckpt.safetensors"
    previous = {"w": torch.arange(4.0)}
    await astage.save(previous, path)
    return path, previous


@pytest.mark.asyncio
async def test_unsavable_leaf_names_its_path_and_writes_nothing(tmp_path: Path) -> None:
    path, previous = await previous_file(tmp_path)
    state = {"model": {"w": torch.ones(3)}, "optim": {"state": {3: {"lock": object()}}}}
    with pytest.raises(astage.UnsavableError, match=r"\['optim'\]\['state'\]\[3\]\['lock'\]"):
        await astage.save(state, path)
    assert files_in(tmp_path) == ["ckpt.safetensors"]
    assert_tree_staged(astage.load(path), previous)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "value",
    # (sets and torch dtypes are saved since issue #10 item 6: they round-trip now)
    [b"bytes", torch.ones(2).to_sparse(), {("a", 1): 1}],
    ids=["bytes", "sparse", "tuple-key"],
)
async def test_unsavable_values(tmp_path: Path, value: Any) -> None:
    with pytest.raises(astage.UnsavableError, match=r"\['x'\]"):
        await astage.save({"x": value}, tmp_path / "c.safetensors")
    assert files_in(tmp_path) == []


@pytest.mark.asyncio
async def test_injected_write_error_keeps_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, previous = await previous_file(tmp_path)

    def full_disk(fd: int, buffers: Any, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwritev", full_disk)
    async with astage.Stager() as stager:
        with pytest.raises(astage.CheckpointWriteError) as caught:
            await astage.save(training_state(), path, stager=stager)
        message = str(caught.value)
        assert str(path) in message and "No space left on device" in message
        assert "ENOSPC" in message
        assert isinstance(caught.value.__cause__, OSError)
        monkeypatch.undo()
        # The stager is usable again, and not held by the failed save.
        with anyio.fail_after(2):
            await stager.stage({"w": torch.ones(2)})
    assert files_in(tmp_path) == ["ckpt.safetensors"]
    assert_tree_staged(astage.load(path), previous)


class SlowData:
    """``os.pwritev`` that takes ``seconds`` for every data write (not the header's).

    ``inside`` counts the calls still running; ``wait_writing()`` returns once the first data
    write has started (the writes run in the writer's own threads, not the loop's workers);
    ``closed_under_write`` counts writes whose descriptor was closed while they slept (a closed
    number can be reused by another file, which the write would hit).
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
        self.seconds = seconds
        self.inside = 0
        self.closed_under_write = 0
        self.writing = threading.Event()
        self._lock = threading.Lock()
        self._real = os.pwritev
        monkeypatch.setattr(os, "pwritev", self)

    async def wait_writing(self) -> None:
        with anyio.fail_after(2):
            while not self.writing.is_set():
                await anyio.sleep(0.005)

    def __call__(self, fd: int, buffers: Any, offset: int) -> int:
        with self._lock:
            self.inside += 1
        try:
            if offset > 0:  # past the header
                self.writing.set()
                time.sleep(self.seconds)
                try:
                    os.fstat(fd)
                except OSError:
                    self.closed_under_write += 1
            return self._real(fd, buffers, offset)
        finally:
            with self._lock:
                self.inside -= 1


@pytest.mark.asyncio
async def test_cancellation_mid_write_keeps_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, previous = await previous_file(tmp_path)
    slow = SlowData(monkeypatch, 0.3)  # the cancel lands before the commit, even on a slow machine
    state = {f"t{i}": torch.full((1024,), float(i)) for i in range(6)}
    scope = anyio.CancelScope()

    async def save() -> None:
        with scope:
            await astage.save(state, path, threads=1)
            pytest.fail("the save was not cancelled")

    async with anyio.create_task_group() as tg:
        tg.start_soon(save)
        await slow.wait_writing()
        assert temp_files(tmp_path)
        scope.cancel()
    # The save waited for the write under way: no thread still uses the closed descriptor.
    assert slow.inside == 0 and slow.closed_under_write == 0
    assert files_in(tmp_path) == ["ckpt.safetensors"]
    assert_tree_staged(astage.load(path), previous)


@pytest.mark.asyncio
async def test_missing_folder_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "no" / "such" / "c.safetensors"
    with pytest.raises(astage.CheckpointWriteError, match="No such file or directory") as caught:
        await astage.save({"w": torch.ones(1)}, path)
    assert str(path) in str(caught.value)


@pytest.mark.asyncio
async def test_bad_targets_and_options(tmp_path: Path) -> None:
    class Recorder:
        async def begin(self, state_dict: Any) -> None: ...
        async def write(self, path: astage.Path, tensor: torch.Tensor) -> None: ...
        async def commit(self) -> None: ...
        async def abort(self) -> None: ...

    with pytest.raises(astage.InvalidOptionsError, match="metadata"):
        await astage.save({}, Recorder(), metadata={"a": "b"})
    with pytest.raises(astage.InvalidOptionsError, match=r"target.*int"):
        await astage.save({}, 42)  # type: ignore[arg-type]
    with pytest.raises(astage.InvalidOptionsError, match="threads"):
        await astage.save({}, tmp_path / "c.safetensors", threads=0)
    assert files_in(tmp_path) == []


# -- buffer safety ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_stage_waits_while_a_save_still_writes_its_buffers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    SlowData(monkeypatch, 0.2)
    state = {f"layer{i}": torch.full((256,), float(i)) for i in range(8)}
    expected_n = {key: value.clone() for key, value in state.items()}
    path = tmp_path / "step_n.safetensors"
    staged_n1: list[Any] = []

    async def next_stage(stager: astage.Stager) -> None:
        staged_n1.append(await stager.stage(state))

    async with astage.Stager() as stager, anyio.create_task_group() as tg:
        handle = await astage.start_save(state, path, stager=stager, threads=1, task_group=tg)
        mutate_(state)  # training goes on: step N+1
        tg.start_soon(next_stage, stager)
        await anyio.sleep(0.05)
        assert not handle.done()
        assert not staged_n1  # backpressure: it waits for the write of step N
        result = await handle
        with anyio.fail_after(2):
            while not staged_n1:
                await anyio.sleep(0.01)
    assert result.tensors == 8
    assert_tree_staged(astage.load(path), expected_n)  # file N holds step N's values
    assert_tree_staged(staged_n1[0], state)  # and the next stage got step N+1's


@pytest.mark.asyncio
async def test_start_save_returns_once_staged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    SlowData(monkeypatch, 0.3)  # still writing when start_save returns, even if slow
    state = {"w": torch.ones(1000)}
    path = tmp_path / "c.safetensors"
    async with anyio.create_task_group() as tg:
        handle = await astage.start_save(state, path, task_group=tg)
        assert not handle.done()
        assert handle.path == str(path)
        state["w"].add_(1)  # the optimizer steps: the save must not see it
        result = await handle
        assert handle.done() and await handle.wait() == result
    assert result.writing_seconds >= 0.3
    assert torch.equal(astage.load(path)["w"], torch.ones(1000))


@pytest.mark.asyncio
async def test_start_save_without_an_owner_raises_usage_error(tmp_path: Path) -> None:
    with pytest.raises(astage.UsageError, match="task_group="):
        await astage.start_save({"w": torch.ones(2)}, tmp_path / "c.safetensors")
    assert files_in(tmp_path) == []


@pytest.mark.asyncio
async def test_start_save_raises_errors_found_before_staging_ends(tmp_path: Path) -> None:
    async with anyio.create_task_group() as tg:
        with pytest.raises(astage.UnsavableError):
            await astage.start_save({"x": object()}, tmp_path / "c.safetensors", task_group=tg)
    assert files_in(tmp_path) == []


@pytest.mark.asyncio
async def test_cancelling_a_background_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, previous = await previous_file(tmp_path)
    slow = SlowData(monkeypatch, 0.3)  # the cancel lands before the commit, even on a slow machine
    async with astage.Stager() as stager:
        async with anyio.create_task_group() as tg:
            handle = await astage.start_save(
                {"w": torch.zeros(4)}, path, stager=stager, task_group=tg
            )
            assert handle.cancel()
            with pytest.raises(astage.CheckpointWriteError, match="cancelled"):
                await handle
            assert not handle.cancel()  # over already
        assert slow.inside == 0 and slow.closed_under_write == 0
        with anyio.fail_after(2):
            await stager.stage({"w": torch.ones(2)})  # not held any more
    assert files_in(tmp_path) == ["ckpt.safetensors"]
    assert_tree_staged(astage.load(path), previous)


@pytest.mark.asyncio
async def test_cancelling_the_owner_aborts_the_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, previous = await previous_file(tmp_path)
    slow = SlowData(monkeypatch, 0.3)  # the cancel lands before the commit, even on a slow machine
    state = {f"t{i}": torch.full((1024,), float(i)) for i in range(6)}
    async with astage.Stager() as stager:
        async with anyio.create_task_group() as owner:
            handle = await astage.start_save(
                state, path, stager=stager, threads=1, task_group=owner
            )
            await slow.wait_writing()
            assert temp_files(tmp_path)
            owner.cancel_scope.cancel()
        # The owner's block ended only once the write was aborted: nothing runs on.
        assert handle.done() and slow.inside == 0 and slow.closed_under_write == 0
        with pytest.raises(astage.CheckpointWriteError, match="cancelled"):
            await handle
        with anyio.fail_after(2):
            await stager.stage({"w": torch.ones(2)})  # the hold was released
    assert files_in(tmp_path) == ["ckpt.safetensors"]
    assert_tree_staged(astage.load(path), previous)


@pytest.mark.asyncio
async def test_a_background_failure_reaches_the_owner_and_the_handle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full_disk(fd: int, buffers: Any, offset: int) -> int:
        if offset == 0:
            return real(fd, buffers, offset)  # the header goes in; the data does not
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real = os.pwritev
    monkeypatch.setattr(os, "pwritev", full_disk)
    handle: astage.SaveHandle | None = None
    with pytest.raises(ExceptionGroup) as caught:
        async with anyio.create_task_group() as owner:
            handle = await astage.start_save(
                {"w": torch.ones(4)}, tmp_path / "c.safetensors", task_group=owner
            )
            with pytest.raises(astage.CheckpointWriteError, match="No space left"):
                await handle
    assert caught.group_contains(astage.CheckpointWriteError)
    assert handle is not None and handle.done()
    assert files_in(tmp_path) == []


# -- load ---------------------------------------------------------------------------------------


def test_load_of_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.safetensors"
    with pytest.raises(astage.CheckpointNotFoundError, match="no checkpoint file at") as caught:
        astage.load(path)
    assert isinstance(caught.value, FileNotFoundError)
    assert isinstance(caught.value, astage.CheckpointFormatError)
    assert caught.value.errno == errno.ENOENT
    assert str(path) in str(caught.value)


def test_load_of_a_plain_safetensors_file(tmp_path: Path) -> None:
    tensors = {"a": torch.arange(3.0), "b.c": torch.ones(2, 2, dtype=torch.int32)}
    safetensors.torch.save_file(tensors, str(tmp_path / "p.safetensors"))
    back = astage.load(tmp_path / "p.safetensors")
    assert set(back) == {"a", "b.c"}
    for key, value in tensors.items():
        assert same_values(back[key], value)


# -- every backend, explicitly ------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_save_start_save_and_checkpoint_dir_run_on(backend: str, tmp_path: Path) -> None:
    """The file layer outside pytest's runners: anyio.run on asyncio and on trio."""
    state = training_state()

    async def main() -> None:
        async with astage.Stager() as stager:
            result = await astage.save(state, tmp_path / "a.safetensors", stager=stager)
            assert result.tensors == len(list(iter_tensors(state)))
            async with anyio.create_task_group() as tg:
                handle = await astage.start_save(
                    state, tmp_path / "b.safetensors", stager=stager, task_group=tg
                )
            assert handle.done()
        async with astage.CheckpointDir(tmp_path / "ckpts", keep=2) as ckpts:
            await ckpts.save(1, state)
            pending = await ckpts.start_save(2, state)
            await pending
            assert ckpts.latest_step() == 2

    anyio.run(main, backend=backend)
    for name in ("a.safetensors", "b.safetensors", "ckpts/step_000000002.safetensors"):
        assert_tree_staged(astage.load(tmp_path / name), state)
