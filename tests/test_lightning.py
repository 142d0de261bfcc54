"""astage.lightning.AstageCheckpointIO under a real Lightning Trainer (CPU, a tiny model).

What the plugin promises: a save returns once the checkpoint is staged and the file is written
behind; the file is what Lightning's own loaders read (``load_from_checkpoint``, ``torch.load``,
``fit(ckpt_path=)``), ``Namespace`` hyperparameters included; a second save while the first is
still being written does not wait for it (counted, not timed: the writes are held on a gate);
a snapshot being written is never overwritten; removals drop queued writes; teardown waits;
write errors reach the training thread. Skipped where Lightning is not installed.
"""

from __future__ import annotations

import argparse
import os
import pickle
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import astage

pytest.importorskip("lightning")

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from astage._drivers._sync import SyncStager
from astage._options import StagingOptions
from astage.lightning import AstageCheckpointIO
from astage.lightning._snapshots import SnapshotPool, is_memory_refusal
from astage.lightning._writer import BackgroundWriter

# -- a tiny model and its data -------------------------------------------------------------------


class Tiny(L.LightningModule):
    """Two linear layers and AdamW; its hyperparameters include an argparse.Namespace."""

    def __init__(self, args: argparse.Namespace, width: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(width, 16), nn.Tanh(), nn.Linear(16, 1))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss: torch.Tensor = nn.functional.mse_loss(self.net(x), y)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.05)


def make_model() -> Tiny:
    torch.manual_seed(0)
    return Tiny(argparse.Namespace(lr=0.05, name="tiny", layers=[16, 1]))


def make_data() -> DataLoader[Any]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(16, 8, generator=generator)
    y = torch.randn(16, 1, generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)


def make_trainer(root: Path, epochs: int, plugins: list[Any], callbacks: list[Any]) -> Any:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        plugins=plugins,
        callbacks=callbacks,
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        assert torch.equal(value, b[name]), name


# -- a gate that holds the background writes -----------------------------------------------------


class Gate:
    """torch.save that waits, in the writer thread, until the gate lets it through.

    ``open()`` lets every write through; ``let_one()`` lets the next write through; a write
    still held after ``timeout`` goes through anyway (a broken test then fails, not hangs).
    """

    def __init__(self, timeout: float = 10.0, fail: BaseException | None = None) -> None:
        self.opened = threading.Event()
        self.permits = threading.Semaphore(0)
        self.timeout = timeout
        self.fail = fail
        self.started = 0

    def open(self) -> None:
        self.opened.set()

    def let_one(self) -> None:
        self.permits.release()

    def serialize(self, obj: Any, file: Any) -> None:
        self.started += 1
        deadline = time.monotonic() + self.timeout
        while not self.opened.is_set() and time.monotonic() < deadline:
            if self.permits.acquire(timeout=0.01):
                break
        if self.fail is not None:
            raise self.fail
        torch.save(obj, file)


def blocked(call: Callable[[], object]) -> threading.Thread:
    """``call`` started in a thread, checked to be waiting (for a write held on a gate)."""
    thread = threading.Thread(target=call)
    thread.start()
    thread.join(0.2)
    assert thread.is_alive(), "the call did not wait"
    return thread


def finished(thread: threading.Thread) -> None:
    thread.join(10)
    assert not thread.is_alive()


def gated(plugin: AstageCheckpointIO, gate: Gate) -> AstageCheckpointIO:
    plugin._writer = BackgroundWriter(gate.serialize)
    return plugin


class OpenAtTrainEnd(Callback):
    """Opens the gate once training ended (before teardown waits for the writes)."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.stats: Any = None

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.stats = trainer.strategy.checkpoint_io.stats  # while both writes are held
        self.gate.open()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".astage-tmp"))


# -- Lightning's own loaders read what the plugin writes -----------------------------------------


def test_load_from_checkpoint_and_torch_load_read_the_file(
    tmp_path: Path, plugins: Callable[..., AstageCheckpointIO]
) -> None:
    model = make_model()
    plugin = plugins()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="step", save_last=True)
    make_trainer(tmp_path, 1, [plugin], [checkpoint]).fit(model, make_data())
    assert plugin.stats.written == 2  # the epoch's checkpoint and last.ckpt, committed

    loaded = Tiny.load_from_checkpoint(tmp_path / "step.ckpt", weights_only=False)
    assert_bit_equal(params(loaded), params(model))
    assert loaded.hparams["args"] == argparse.Namespace(lr=0.05, name="tiny", layers=[16, 1])

    raw = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert raw["global_step"] == 4
    assert raw["epoch"] == 0
    assert isinstance(raw["hyper_parameters"]["args"], argparse.Namespace)
    assert_bit_equal(raw["state_dict"], params(model))
    assert len(raw["optimizer_states"]) == 1
    assert leftovers(tmp_path) == []


def test_the_file_holds_what_torch_checkpoint_io_writes(
    tmp_path: Path, plugins: Callable[..., AstageCheckpointIO]
) -> None:
    ours, lightnings = tmp_path / "ours.ckpt", tmp_path / "lightnings.ckpt"
    model = make_model()
    trainer = make_trainer(tmp_path, 1, [plugins()], [])
    trainer.fit(model, make_data())
    trainer.save_checkpoint(ours)
    trainer.strategy.checkpoint_io.wait()
    torch_io = L.pytorch.plugins.TorchCheckpointIO()
    torch_io.save_checkpoint(trainer._checkpoint_connector.dump_checkpoint(), lightnings)

    a = torch.load(ours, weights_only=False)
    b = torch.load(lightnings, weights_only=False)
    assert a.keys() == b.keys()
    assert_bit_equal(a["state_dict"], b["state_dict"])
    assert repr(a["optimizer_states"]) == repr(b["optimizer_states"])
    assert a["hyper_parameters"] == b["hyper_parameters"]
    assert a["loops"] == b["loops"]


def test_resume_is_bit_exact(tmp_path: Path, plugins: Callable[..., AstageCheckpointIO]) -> None:
    uninterrupted = make_model()
    make_trainer(tmp_path / "a", 3, [], []).fit(uninterrupted, make_data())

    first = make_model()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "b", save_last=True)
    make_trainer(tmp_path / "b", 1, [plugins()], [checkpoint]).fit(first, make_data())
    resumed = make_model()  # fresh weights: everything must come from the checkpoint
    trainer = make_trainer(tmp_path / "b", 3, [plugins()], [])
    trainer.fit(resumed, make_data(), ckpt_path=tmp_path / "b" / "last.ckpt", weights_only=False)

    assert trainer.global_step == 12
    assert_bit_equal(params(resumed), params(uninterrupted))


# -- saves do not wait for earlier writes --------------------------------------------------------


def test_save_last_makes_two_saves_per_epoch_and_the_second_does_not_wait(
    tmp_path: Path, plugins: Callable[..., AstageCheckpointIO]
) -> None:
    gate = Gate()  # both writes are held until training ended
    plugin = gated(plugins(), gate)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="step", save_last=True)
    at_end = OpenAtTrainEnd(gate)
    make_trainer(tmp_path, 1, [plugin], [checkpoint, at_end]).fit(make_model(), make_data())
    held = at_end.stats
    assert (held.saves, held.pending, held.written) == (2, 2, 0)  # both writes on the gate
    assert held.waits == 0  # so the second save staged into the second snapshot
    assert held.snapshots == 2
    assert plugin.stats.written == 2  # teardown waited for both
    assert (tmp_path / "step.ckpt").exists()
    assert (tmp_path / "last.ckpt").exists()


def test_with_one_snapshot_the_second_save_waits_for_the_first_write(
    tmp_path: Path, plugins: Callable[..., AstageCheckpointIO]
) -> None:
    # The counterpart of the test above: the counter sees a wait when there is one.
    gate = Gate()
    plugin = gated(plugins(snapshots=1), gate)
    plugin.save_checkpoint({"w": torch.ones(4)}, tmp_path / "1.ckpt")
    second = blocked(lambda: plugin.save_checkpoint({"w": torch.ones(4)}, tmp_path / "2.ckpt"))
    gate.open()
    finished(second)
    assert plugin.stats.waits == 1
    assert plugin.stats.wait_seconds > 0


def test_a_snapshot_being_written_is_not_overwritten_by_the_next_save(
    tmp_path: Path, plugins: Callable[..., AstageCheckpointIO]
) -> None:
    gate = Gate()
    plugin = gated(plugins(), gate)
    weight = torch.ones(1000)
    plugin.save_checkpoint({"w": weight, "step": 1}, tmp_path / "1.ckpt")
    weight.fill_(2.0)  # training goes on in place, as an optimizer step does
    plugin.save_checkpoint({"w": weight, "step": 2}, tmp_path / "2.ckpt")
    weight.fill_(3.0)
    assert plugin.stats.pending == 2
    gate.open()
    assert plugin.wait(timeout=10)
    one = torch.load(tmp_path / "1.ckpt")
    two = torch.load(tmp_path / "2.ckpt")
    assert one["step"] == 1
    assert torch.equal(one["w"], torch.full((1000,), 1.0))
    assert two["step"] == 2
    assert torch.equal(two["w"], torch.full((1000,), 2.0))


def test_refused_memory_for_a_second_snapshot_makes_the_save_wait_instead(
    tmp_path: Path, plugins: Callable[..., AstageCheckpointIO]
) -> None:
    made: list[SyncStager] = []

    class NoMemory(SyncStager):
        def snapshot(self, state_dict: Any, **kwargs: Any) -> Any:
            raise RuntimeError(
                "[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory"
            )

    def make_stager(options: StagingOptions | None) -> SyncStager:
        stager = SyncStager(options) if not made else NoMemory(options)
        made.append(stager)
        return stager

    gate = Gate()
    plugin = gated(plugins(), gate)
    plugin._pool = SnapshotPool(2, None, make_stager)
    weight = torch.ones(8)
    plugin.save_checkpoint({"w": weight}, tmp_path / "1.ckpt")
    weight.fill_(2.0)
    # No memory for a second snapshot: the save waits for write 1, then reuses its set.
    second = blocked(lambda: plugin.save_checkpoint({"w": weight}, tmp_path / "2.ckpt"))
    gate.let_one()
    finished(second)
    # Memory is not asked for again: the next save waits for write 2.
    third = blocked(lambda: plugin.save_checkpoint({"w": weight}, tmp_path / "3.ckpt"))
    gate.open()
    finished(third)
    stats = plugin.stats
    assert (stats.memory_refusals, stats.waits, stats.snapshots) == (1, 2, 1)
    assert len(made) == 2 and made[1].closed
    assert plugin.wait(timeout=10)
    assert torch.equal(torch.load(tmp_path / "1.ckpt")["w"], torch.ones(8))
    assert torch.equal(torch.load(tmp_path / "2.ckpt")["w"], torch.full((8,), 2.0))


def test_memory_refusals_are_told_from_other_errors() -> None:
    assert is_memory_refusal(MemoryError())
    assert is_memory_refusal(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate"))
    assert is_memory_refusal(RuntimeError("DefaultCPUAllocator: can't allocate memory: 9 GB"))
    wrapped = astage.StagingError("copy failed")
    wrapped.__cause__ = MemoryError()
    assert is_memory_refusal(wrapped)
    assert not is_memory_refusal(RuntimeError("expected scalar type Float"))
    assert not is_memory_refusal(astage.UnstageableError("cannot stage a lock"))


# -- removal, teardown, loading, errors ----------------------------------------------------------


def test_remove_checkpoint_drops_a_queued_write(
    tmp_path: Path, plugins: Callable[..., AstageCheckpointIO]
) -> None:
    gate = Gate()
    plugin = gated(plugins(), gate)
    (tmp_path / "old.ckpt").write_bytes(b"an older file")
    plugin.save_checkpoint({"w": torch.ones(2)}, tmp_path / "old.ckpt")
    plugin.remove_checkpoint(tmp_path / "old.ckpt")
    assert not (tmp_path / "old.ckpt").exists()
    gate.open()
    assert plugin.wait(timeout=10)
    assert not (tmp_path / "old.ckpt").exists()  # the write never landed after the removal
    assert leftovers(tmp_path) == []
    assert (plugin.stats.discarded, plugin.stats.written) == (1, 0)


def test_teardown_waits_for_pending_writes(
    tmp_path: Path, plugins: Callable[..., AstageCheckpointIO]
) -> None:
    gate = Gate()
    plugin = gated(plugins(), gate)
    plugin.save_checkpoint({"w": torch.ones(2)}, tmp_path / "a.ckpt")
    tearing_down = blocked(plugin.teardown)  # held by the write on the gate
    assert not (tmp_path / "a.ckpt").exists()
    gate.open()
    finished(tearing_down)
    assert torch.equal(torch.load(tmp_path / "a.ckpt")["w"], torch.ones(2))
    assert plugin.stats.snapshots == 0  # host buffers given back
    plugin.save_checkpoint({"w": torch.zeros(2)}, tmp_path / "b.ckpt")  # usable after teardown
    plugin.teardown()
    assert torch.equal(torch.load(tmp_path / "b.ckpt")["w"], torch.zeros(2))


def test_load_checkpoint_waits_for_the_write_of_that_path(
    tmp_path: Path, plugins: Callable[..., AstageCheckpointIO]
) -> None:
    gate = Gate()
    plugin = gated(plugins(), gate)
    plugin.save_checkpoint({"w": torch.arange(3.0)}, tmp_path / "a.ckpt")
    loaded: dict[str, Any] = {}
    loading = blocked(lambda: loaded.update(plugin.load_checkpoint(tmp_path / "a.ckpt")))
    gate.open()
    finished(loading)
    assert torch.equal(loaded["w"], torch.arange(3.0))


def test_a_failed_write_is_raised_by_the_next_call_and_leaves_nothing(
    tmp_path: Path, plugins: Callable[..., AstageCheckpointIO]
) -> None:
    gate = Gate(timeout=0.0, fail=OSError(28, "No space left on device"))
    plugin = gated(plugins(), gate)
    plugin.save_checkpoint({"w": torch.ones(2)}, tmp_path / "a.ckpt")
    assert plugin._writer.wait(timeout=10)
    with pytest.raises(astage.CheckpointWriteError, match=r"a\.ckpt.*No space left") as caught:
        plugin.save_checkpoint({"w": torch.ones(2)}, tmp_path / "b.ckpt")
    assert isinstance(caught.value.__cause__, OSError)
    assert os.listdir(tmp_path) == []  # no target, no temporary file
    assert plugin.stats.saves == 1  # the refused save staged nothing


def test_teardown_raises_a_write_error_not_yet_reported(
    tmp_path: Path, plugins: Callable[..., AstageCheckpointIO]
) -> None:
    plugin = gated(plugins(), Gate(timeout=0.0, fail=OSError(5, "Input/output error")))
    plugin.save_checkpoint({"w": torch.ones(2)}, tmp_path / "a.ckpt")
    with pytest.raises(astage.CheckpointWriteError, match="Input/output error"):
        plugin.teardown()
    plugin.teardown()  # reported once


def test_an_unstageable_object_is_refused_at_the_save(
    tmp_path: Path, plugins: Callable[..., AstageCheckpointIO]
) -> None:
    plugin = plugins()
    with pytest.raises(astage.UnstageableError, match="lock"):
        plugin.save_checkpoint({"hyper_parameters": {"lock": threading.Lock()}}, tmp_path / "a")
    assert plugin.stats.pending == 0
    assert os.listdir(tmp_path) == []


def test_bad_arguments_are_refused(
    tmp_path: Path, plugins: Callable[..., AstageCheckpointIO]
) -> None:
    with pytest.raises(astage.InvalidOptionsError, match="snapshots"):
        AstageCheckpointIO(snapshots=0)
    with pytest.raises(astage.InvalidOptionsError, match="storage_options"):
        plugins().save_checkpoint({}, tmp_path / "a.ckpt", storage_options={"x": 1})
    with pytest.raises(astage.InvalidOptionsError):
        AstageCheckpointIO(pin_memory="sometimes")
    with pytest.raises(astage.InvalidOptionsError, match="snapshots=2"):
        AstageCheckpointIO(buffers=2)


def test_an_fsspec_url_is_written_too(plugins: Callable[..., AstageCheckpointIO]) -> None:
    plugin = plugins()
    plugin.save_checkpoint({"w": torch.ones(3)}, "memory://astage-test/a.ckpt")
    loaded = plugin.load_checkpoint("memory://astage-test/a.ckpt")
    assert torch.equal(loaded["w"], torch.ones(3))
    plugin.remove_checkpoint("memory://astage-test/a.ckpt")
    with pytest.raises(FileNotFoundError):
        plugin.load_checkpoint("memory://astage-test/a.ckpt")


def test_the_step_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import lightning_steps

    threads = torch.get_num_threads()  # the benchmark sets its own; the suite keeps its own
    tiny = ["--layers", "1", "--width", "32", "--heads", "2", "--vocab", "50", "--context", "8"]
    try:
        assert (
            lightning_steps.main([*tiny, "--steps", "4", "--every", "2", "--only", "astage"]) == 0
        )
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "| astage | " in out
    assert "a checkpoint every 2 steps" in out


def test_a_pickled_plugin_is_a_fresh_one_with_the_same_settings(
    tmp_path: Path, plugins: Callable[..., AstageCheckpointIO]
) -> None:
    # ddp_spawn pickles the strategy and its plugin into each process.
    plugin = plugins(snapshots=3, pin_memory=False)
    plugin.save_checkpoint({"w": torch.ones(2)}, tmp_path / "a.ckpt")
    copy = pickle.loads(pickle.dumps(plugin))
    assert repr(copy) == "AstageCheckpointIO(snapshots=3)"
    assert copy._options == plugin._options
    assert (copy.stats.saves, copy.stats.snapshots) == (0, 0)
    copy.save_checkpoint({"w": torch.zeros(2)}, tmp_path / "b.ckpt")
    copy.teardown()
    assert torch.equal(torch.load(tmp_path / "b.ckpt")["w"], torch.zeros(2))


def test_a_missing_or_broken_file_is_refused_naming_it(
    tmp_path: Path, plugins: Callable[..., AstageCheckpointIO]
) -> None:
    plugin = plugins()
    with pytest.raises(astage.CheckpointNotFoundError, match=r"nothing\.ckpt"):
        plugin.load_checkpoint(tmp_path / "nothing.ckpt")
    plugin.save_checkpoint({"w": torch.ones(100)}, tmp_path / "a.ckpt")
    plugin.wait()
    whole = (tmp_path / "a.ckpt").read_bytes()
    (tmp_path / "a.ckpt").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(astage.CheckpointFormatError, match=r"a\.ckpt"):
        plugin.load_checkpoint(tmp_path / "a.ckpt")
    # weights_only=True (torch.load's default) refuses a Namespace: said, with the file named.
    plugin.save_checkpoint({"args": argparse.Namespace(lr=1)}, tmp_path / "b.ckpt")
    with pytest.raises(astage.CheckpointFormatError, match=r"b\.ckpt.*[Ww]eights only"):
        plugin.load_checkpoint(tmp_path / "b.ckpt", weights_only=True)
    assert plugin.load_checkpoint(tmp_path / "b.ckpt", weights_only=False)["args"].lr == 1
