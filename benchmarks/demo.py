"""``python -m benchmarks.demo`` (``make demo``): stage a training state after each step, vs DCP.

A small GPT (token and position embeddings, transformer blocks, LayerNorm, an lm_head tied to
the token embedding) trains for a few steps with AdamW on random batches, in a worker thread so
the event loop stays live. After each step the loop stages ``{'model': ..., 'optim': ...,
'step': n}`` with :class:`astage.Stager`, counting bytes as they land (``stage_iter``) while
:class:`~benchmarks.lag.LagProbe` measures how late the loop gets. The last snapshot is then
staged by DCP's ``DefaultStager`` the way an async program would use it (its future awaited on
the loop), and a table compares the two. ``--backend`` picks the loop: asyncio, uvloop or trio.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, TextIO

import anyio
import torch
from torch.distributed.checkpoint.staging import DefaultStager

from astage import Path, Stager, StagingOptions, format_path

from .contenders import dcp_default_options
from .futures import wait_future
from .gpt import Setup, Trainer
from .lag import LagProbe, LagSummary
from .runner import BACKENDS, anyio_backend
from .state_dicts import describe, tensor_leaves

# --- options ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoOptions:
    """The command line, checked."""

    setup: Setup
    steps: int
    dcp: bool
    backend: str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options, on ``parser``."""
    parser.add_argument("--layers", type=int, default=6, help="transformer blocks (default 6)")
    parser.add_argument("--width", type=int, default=768, help="model width (default 768)")
    parser.add_argument(
        "--heads", type=int, default=None, help="attention heads (default: width / 64)"
    )
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary (default 32000)")
    parser.add_argument("--context", type=int, default=64, help="tokens per sequence (64)")
    parser.add_argument("--batch", type=int, default=2, help="sequences per step (default 2)")
    parser.add_argument("--steps", type=int, default=4, help="training steps (default 4)")
    parser.add_argument(
        "--device",
        default="auto",
        help="where the model lives: auto (cuda if available, else cpu), cpu, cuda, cuda:N",
    )
    parser.add_argument(
        "--no-dcp", dest="dcp", action="store_false", help="skip the DCP comparison"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--backend", choices=BACKENDS, default="asyncio", help="the event loop (default asyncio)"
    )


def options_from(args: argparse.Namespace) -> DemoOptions:
    """Checked options from parsed arguments (``SystemExit`` with the reason otherwise)."""
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if min(args.layers, args.width, args.vocab, args.context, args.batch, args.steps) < 1:
        raise SystemExit("sizes and --steps must be positive")
    heads = args.heads if args.heads is not None else max(1, args.width // 64)
    if heads < 1 or args.width % heads:
        raise SystemExit(f"--width {args.width} is not a multiple of --heads {heads}")
    setup = Setup(
        layers=args.layers,
        width=args.width,
        heads=heads,
        vocab=args.vocab,
        context=args.context,
        batch=args.batch,
        device=device,
        seed=args.seed,
    )
    return DemoOptions(setup=setup, steps=args.steps, dcp=args.dcp, backend=args.backend)


# --- walking a snapshot ----------------------------------------------------------------------


def storage_key(tensor: torch.Tensor) -> int:
    """One number per storage: tensors that share a storage share it."""
    storage = tensor.untyped_storage()
    return storage.data_ptr() or id(storage)


# --- progress --------------------------------------------------------------------------------


class Progress:
    """Bytes landed of one snapshot: a bar redrawn in place on a TTY, a few lines otherwise."""

    def __init__(self, label: str, total: int, stream: TextIO) -> None:
        self.label = label
        self.total = max(total, 1)
        self.stream = stream
        self.tty = stream.isatty()
        self.landed = 0
        self._drawn_at = 0.0
        self._next_line = 0.25

    def add(self, nbytes: int) -> None:
        self.landed += nbytes
        fraction = self.landed / self.total
        if self.tty:
            now = time.perf_counter()
            if now - self._drawn_at >= 0.03 or fraction >= 1.0:  # redraws cost loop time
                self._drawn_at = now
                self.stream.write("\r" + self._line())
                self.stream.flush()
        else:
            while fraction >= self._next_line and self._next_line <= 1.0:
                self.stream.write(self._line() + "\n")
                self._next_line += 0.25

    def _line(self) -> str:
        fraction = min(self.landed / self.total, 1.0)
        filled = int(fraction * 24)
        bar = "#" * filled + "." * (24 - filled)
        return (
            f"  {self.label:<12} [{bar}] {fraction * 100:5.1f}%  "
            f"{self.landed / 1e6:8.1f} / {self.total / 1e6:.1f} MB"
        )

    def finish(self, summary: str) -> None:
        if self.tty:
            self.stream.write("\r" + self._line() + "  " + summary + "\n")
        else:
            self.stream.write(f"  {self.label:<12} {summary}\n")
        self.stream.flush()


# --- one row of the final table --------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One staging call in the final table: its size, time, cache reuse and loop lag."""

    label: str
    nbytes: int
    tensors: int
    seconds: float
    reused: str
    new_nbytes: str
    lag: LagSummary

    @property
    def gb_per_s(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else math.nan


def render_table(rows: list[Row]) -> str:
    """The final table, one line per staging call."""
    header = (
        f"{'':<26} {'bytes':>10} {'tensors':>8} {'time':>9} {'GB/s':>7} "
        f"{'reused':>7} {'new bytes':>10} {'lag p99':>9} {'lag max':>9}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row.label:<26} {row.nbytes / 1e6:>7.1f} MB {row.tensors:>8} "
            f"{row.seconds * 1e3:>6.1f} ms {row.gb_per_s:>7.2f} {row.reused:>7} "
            f"{row.new_nbytes:>10} {row.lag.p99_ms:>6.2f} ms {row.lag.max_ms:>6.2f} ms"
        )
    return "\n".join(lines)


def mb(nbytes: int) -> str:
    """Bytes as megabytes, for the table."""
    return f"{nbytes / 1e6:.1f} MB"


# --- the run ---------------------------------------------------------------------------------


async def stage_with_progress(
    stager: Stager, snapshot: Any, label: str, probe: LagProbe, out: TextIO
) -> tuple[dict[Path, torch.Tensor], LagSummary]:
    """Stage through ``stage_iter``, drawing progress; the staged tensors by path, and the lag."""
    total = describe(snapshot).nbytes
    progress = Progress(label, total, out)
    staged: dict[Path, torch.Tensor] = {}
    seen: set[int] = set()
    async with probe.window() as window, stager.stage_iter(snapshot) as landed:
        async for path, tensor in landed:
            staged[path] = tensor
            key = storage_key(tensor)
            if key not in seen:  # a storage shared by several tensors lands once
                seen.add(key)
                progress.add(tensor.untyped_storage().nbytes())
    lag = window.summary()
    stats = stager.last_stats
    assert stats is not None
    progress.finish(
        f"{stats.seconds * 1e3:.0f} ms, {stats.gb_per_s:.2f} GB/s, "
        f"reused {stats.reused_fraction * 100:.0f}%, lag p99 {lag.p99_ms:.2f} ms"
    )
    return staged, lag


def check_snapshot(snapshot: Any, staged: dict[Path, torch.Tensor], out: TextIO) -> bool:
    """Print and return whether the staged copy is right: tied weights aliased, values equal."""
    tied = (("model", "tok_emb.weight"), ("model", "lm_head.weight"))
    a, b = staged.get(tied[0]), staged.get(tied[1])
    live = snapshot["model"]["tok_emb.weight"]
    aliased = (
        a is not None
        and b is not None
        and storage_key(a) == storage_key(b)
        and storage_key(a) != storage_key(live)
        and a.device.type == "cpu"
    )
    out.write(
        f"check: {format_path(tied[0])} and {format_path(tied[1])} share one staged CPU "
        f"storage, separate from the live one: {'OK' if aliased else 'FAILED'}\n"
    )
    sources = dict(tensor_leaves(snapshot))
    mismatched = [
        format_path(path)
        for path, source in sources.items()
        if path not in staged or not torch.equal(staged[path], source.detach().cpu())
    ]
    out.write(
        f"check: {len(sources)} staged tensors equal the live state after step "
        f"{snapshot['step']}: {'OK' if not mismatched else 'FAILED ' + ', '.join(mismatched[:3])}\n"
    )
    return aliased and not mismatched


async def dcp_rows(snapshot: Any, probe: LagProbe, cuda: bool) -> list[Row]:
    """DCP's DefaultStager on the same snapshot: a first call, then a cached one."""
    shape = describe(snapshot)
    stager = DefaultStager(dcp_default_options(cuda))
    rows = []
    try:
        for label in ("DCP DefaultStager first", "DCP DefaultStager cached"):
            async with probe.window() as window:
                started = time.perf_counter()
                future = stager.stage(snapshot)
                assert not isinstance(future, dict)
                await wait_future(future)
                seconds = time.perf_counter() - started
            rows.append(
                Row(label, shape.nbytes, shape.tensors, seconds, "n/a", "n/a", window.summary())
            )
    finally:
        stager.close()
    return rows


async def run_demo(options: DemoOptions, out: TextIO) -> int:
    """Train, stage after every step, compare with DCP; 0 when the staged copy checked out."""
    started = time.perf_counter()
    setup = options.setup
    out.write(
        f"astage demo: GPT with {setup.layers} layers, width {setup.width}, vocab "
        f"{setup.vocab} on {setup.device}; AdamW; {options.steps} steps; "
        f"{options.backend} loop\n"
    )
    trainer = Trainer(setup)
    params = sum(p.numel() for p in trainer.model.parameters())
    out.write(f"model: {params / 1e6:.1f} M parameters ({mb(params * 4)} of weights)\n")
    cuda = trainer.device.type == "cuda"
    rows: list[Row] = []
    staged: dict[Path, torch.Tensor] = {}
    snapshot: dict[str, Any] = {}
    ok = True
    async with LagProbe() as probe, Stager(StagingOptions()) as stager:
        for step in range(1, options.steps + 1):
            # Training runs in a worker thread so the loop, and its heartbeat, stay live.
            step_started = time.perf_counter()
            loss = await anyio.to_thread.run_sync(trainer.step)
            step_ms = (time.perf_counter() - step_started) * 1e3
            out.write(f"step {step}: loss {loss:.3f} ({step_ms:.0f} ms)\n")
            snapshot = trainer.snapshot()
            staged, lag = await stage_with_progress(
                stager, snapshot, f"snapshot {step}", probe, out
            )
            stats = stager.last_stats
            assert stats is not None
            kind = "first" if step == 1 else "cached"
            rows.append(
                Row(
                    f"astage step {step} ({kind})",
                    stats.nbytes,
                    stats.tensors,
                    stats.seconds,
                    f"{stats.reused_fraction * 100:.0f}%",
                    mb(stats.new_nbytes),
                    lag,
                )
            )
        ok = check_snapshot(snapshot, staged, out)
        del staged
        if options.dcp:
            out.write("DCP DefaultStager on the same snapshot (its thread, future awaited)...\n")
            rows += await dcp_rows(snapshot, probe, cuda)
    out.write("\n" + render_table(rows) + "\n")
    _print_comparison(rows, out)
    out.write(f"\ndone in {time.perf_counter() - started:.1f} s\n")
    return 0 if ok else 1


def _print_comparison(rows: list[Row], out: TextIO) -> None:
    astage_cached = [r for r in rows if r.label.endswith("(cached)")]
    dcp = {r.label: r for r in rows if r.label.startswith("DCP")}
    theirs = dcp.get("DCP DefaultStager cached")
    if not astage_cached or theirs is None:
        return
    seconds = sorted(r.seconds for r in astage_cached)[len(astage_cached) // 2]
    worst_max = max(r.lag.max_ms for r in astage_cached)
    worst_p99 = max(r.lag.p99_ms for r in astage_cached)
    out.write(
        f"\ncached snapshot: astage {seconds * 1e3:.1f} ms (median) vs DCP "
        f"{theirs.seconds * 1e3:.1f} ms = {theirs.seconds / seconds:.2f}x; loop lag (worst "
        f"snapshot) p99 {worst_p99:.2f} ms vs {theirs.lag.p99_ms:.2f} ms, "
        f"max {worst_max:.2f} ms vs {theirs.lag.max_ms:.2f} ms\n"
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.demo``: parse the options, run the demo; the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.demo",
        description="Train a GPT-style model for a few steps on an event loop and stage "
        "{'model', 'optim', 'step'} after each one with astage.Stager while a heartbeat measures "
        "loop lag; then compare with DCP's DefaultStager on the same snapshot.",
    )
    add_arguments(parser)
    options = options_from(parser.parse_args(argv))
    backend, backend_options = anyio_backend(options.backend)
    return anyio.run(
        partial(run_demo, options, sys.stdout), backend=backend, backend_options=backend_options
    )


if __name__ == "__main__":
    sys.exit(main())
