"""``python -m benchmarks.lightning_steps``: Lightning step times with each CheckpointIO.

A small GPT (``benchmarks.gpt``) trains under ``lightning.Trainer`` on fixed random batches,
once per contender, in one process:

- ``none``: no checkpointing at all (the floor);
- ``torch``: Lightning's default ``TorchCheckpointIO`` (``torch.save`` in the training thread);
- ``lightning-async``: Lightning's ``AsyncCheckpointIO`` (clones every tensor in the training
  thread, ``torch.save`` in a thread);
- ``astage``: ``astage.lightning.AstageCheckpointIO`` (stages into reused host buffers, writes
  in a thread).

Every contender but ``none`` checkpoints every ``--every`` steps with
``ModelCheckpoint(every_n_train_steps=..., save_last=True)``: two saves per checkpoint step
(the step's file, then ``last.ckpt``), and the previous step's file removed. A step's time is
the wall time from one ``on_train_batch_start`` to the next, so it includes the checkpointing
done at the end of the batch. Reported per contender: the median step and its spread (10th to
90th percentile) over the steps without a save, the median and the worst of the steps with a
save, and the whole run's time (``fit`` returned: for the background writers, after teardown
waited for the last write).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from torch.utils.data import DataLoader, TensorDataset

from astage.lightning import AstageCheckpointIO

from .gpt import GPT

CONTENDERS = ("none", "torch", "lightning-async", "astage")


class GPTModule(L.LightningModule):
    """``benchmarks.gpt.GPT`` with AdamW, as a LightningModule."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, context: int) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.vocab = vocab
        self.gpt = GPT(vocab, width, layers, heads, context)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (tokens,) = batch
        logits = self.gpt(tokens[:, :-1])
        loss: torch.Tensor = F.cross_entropy(
            logits.reshape(-1, self.vocab), tokens[:, 1:].reshape(-1)
        )
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-4, weight_decay=0.1)


class StepClock(Callback):
    """Records the wall time between consecutive batch starts, and which steps saved."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, index: int) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer: Any, module: Any) -> None:
        self.starts.append(time.perf_counter())  # the last step's end (its save included)

    def steps(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:], strict=False)]


@dataclass(frozen=True)
class Run:
    """One contender's run: its step times (first step left out) and its whole time."""

    plain: list[float]
    saving: list[float]
    total: float
    checkpoint_mb: float
    astage: Any = None
    """``AstageCheckpointIO.stats`` after the run (the astage contender only)."""


@dataclass(frozen=True)
class Result:
    """One contender's figures, in seconds."""

    name: str
    plain_median: float
    plain_p10: float
    plain_p90: float
    save_median: float
    save_max: float
    total: float
    checkpoint_mb: float


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def plugins_for(name: str) -> list[Any]:
    if name == "torch":
        return []  # Lightning's default: TorchCheckpointIO
    if name == "lightning-async":
        return [AsyncCheckpointIO()]
    if name == "astage":
        return [AstageCheckpointIO()]
    return []


def run_one(name: str, args: argparse.Namespace, folder: Path) -> Run:
    torch.manual_seed(args.seed)
    module = GPTModule(args.vocab, args.width, args.layers, args.heads, args.context)
    generator = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(
        args.vocab, (args.steps * args.batch, args.context + 1), generator=generator
    )
    data = DataLoader(TensorDataset(tokens), batch_size=args.batch, shuffle=False)
    clock = StepClock()
    callbacks: list[Callback] = [clock]
    if name != "none":
        callbacks.append(
            ModelCheckpoint(dirpath=folder, every_n_train_steps=args.every, save_last=True)
        )
    plugins = plugins_for(name)
    trainer = L.Trainer(
        accelerator=args.device,
        devices=1,
        max_epochs=1,
        plugins=plugins,
        callbacks=callbacks,
        enable_checkpointing=name != "none",
        default_root_dir=folder,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    started = time.perf_counter()
    trainer.fit(module, data)
    total = time.perf_counter() - started
    steps = clock.steps()
    # Step i (1-based) saves when i % every == 0; the first step (allocations, warm-up) is
    # left out of both groups.
    saving = [t for i, t in enumerate(steps, 1) if name != "none" and i % args.every == 0]
    plain = [t for i, t in enumerate(steps, 1) if i > 1 and (name == "none" or i % args.every)]
    size = (folder / "last.ckpt").stat().st_size / 1e6 if name != "none" else 0.0
    stats = plugins[0].stats if name == "astage" else None
    return Run(plain, saving, total, size, stats)


def summarize(name: str, runs: Sequence[Run]) -> Result:
    """A contender's figures over all its repeats (the whole run: the median repeat)."""
    plain = [t for run in runs for t in run.plain]
    saving = [t for run in runs for t in run.saving]
    return Result(
        name,
        statistics.median(plain),
        percentile(plain, 0.1),
        percentile(plain, 0.9),
        statistics.median(saving) if saving else float("nan"),
        max(saving) if saving else float("nan"),
        statistics.median(run.total for run in runs),
        max(run.checkpoint_mb for run in runs),
    )


def render(results: Sequence[Result]) -> str:
    ms: Callable[[float], str] = lambda seconds: f"{seconds * 1e3:.0f}"  # noqa: E731
    lines = [
        "| CheckpointIO | step, no save: median (p10-p90) ms | step with 2 saves: median / "
        "worst ms | whole run s |",
        "| --- | --- | --- | --- |",
    ]
    for r in results:
        saves = "-" if r.name == "none" else f"{ms(r.save_median)} / {ms(r.save_max)}"
        lines.append(
            f"| {r.name} | {ms(r.plain_median)} ({ms(r.plain_p10)}-{ms(r.plain_p90)}) | "
            f"{saves} | {r.total:.2f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.lightning_steps", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40, help="training steps per contender")
    parser.add_argument("--every", type=int, default=5, help="checkpoint every N steps")
    parser.add_argument("--device", default="cpu", help="Lightning accelerator (cpu, gpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a shared 2-core machine, 2 threads make "
        "small steps wait for each other's cores, 10-100x slower)",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs per contender, interleaved (default 1)"
    )
    parser.add_argument(
        "--only", action="append", choices=CONTENDERS, help="run only this contender"
    )
    args = parser.parse_args(argv)
    if args.steps < 2 * args.every or args.every < 1:
        parser.error("--steps must cover at least two checkpoints (--every >= 1)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # Lightning's banners and tips, once per Trainer, would bury the table.
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    names = args.only or list(CONTENDERS)
    runs: dict[str, list[Run]] = {name: [] for name in names}
    for repeat in range(args.repeats):
        # Interleaved, each repeat in another order: drifts of a shared machine spread evenly.
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            with tempfile.TemporaryDirectory(prefix=f"astage-lightning-{name}-") as folder:
                runs[name].append(run_one(name, args, Path(folder)))
    results = [summarize(name, runs[name]) for name in names]
    sizes = {r.checkpoint_mb for r in results if r.name != "none"}
    print(
        f"GPT {args.layers} layers x {args.width}, vocab {args.vocab}, batch {args.batch} x "
        f"{args.context} tokens, {args.steps} steps on {args.device}, a checkpoint every "
        f"{args.every} steps (save_last=True: 2 saves), {args.repeats} repeat(s), "
        f"checkpoint {max(sizes, default=0.0):.0f} MB, torch {torch.__version__}, "
        f"lightning {L.__version__}, {args.threads} torch thread(s)"
    )
    print(render(results))
    for run in runs.get("astage", []):
        stats = run.astage
        per_save = stats.stage_seconds / max(stats.saves, 1) * 1e3
        per_write = stats.write_seconds / max(stats.written, 1) * 1e3
        print(
            f"astage run: {stats.saves} saves, {stats.waits} waited for a write "
            f"({stats.wait_seconds:.2f} s), {per_save:.0f} ms per save in the training "
            f"thread, {per_write:.0f} ms per write in the background"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
