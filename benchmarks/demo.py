"""``python -m astage demo``: stage a training state after every step, next to DCP.

A small GPT (token and position embeddings, transformer blocks, LayerNorm, an lm_head tied to
the token embedding) trains for a few steps with AdamW on random batches. After each step the
event loop stages ``{'model': ..., 'optim': ..., 'step': n}`` with :class:`astage.Stager`,
counting bytes as they land (``stage_iter``) while a heartbeat task measures how late the loop
gets. The last snapshot is then staged by DCP's ``DefaultStager`` the way an asyncio program
would use it (its future awaited with ``asyncio.wrap_future``), and a table compares the two.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TextIO

import torch
import torch.nn.functional as F
from torch import nn

from astage import Path, Stager, StagingOptions, format_path

from .lag import LagProbe, LagSummary

# --- the model -------------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a 4x MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.attn_qkv = nn.Linear(width, 3 * width)
        self.attn_proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp_fc = nn.Linear(width, 4 * width)
        self.mlp_proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        qkv: torch.Tensor = self.attn_qkv(self.ln_1(x))
        q, k, v = (
            part.view(batch, tokens, self.heads, width // self.heads).transpose(1, 2)
            for part in qkv.split(width, dim=2)
        )
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(attended.transpose(1, 2).reshape(batch, tokens, width))
        hidden: torch.Tensor = F.gelu(self.mlp_fc(self.ln_2(x)))
        out: torch.Tensor = x + self.mlp_proj(hidden)
        return out


class GPT(nn.Module):
    def __init__(self, vocab: int, width: int, layers: int, heads: int, context: int) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, width)
        self.pos_emb = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied: one storage behind two state-dict keys
        self.apply(_init_weights)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x: torch.Tensor = self.tok_emb(tokens) + self.pos_emb(positions)
        for block in self.blocks:
            x = block(x)
        logits: torch.Tensor = self.lm_head(self.ln_f(x))
        return logits


def _init_weights(module: nn.Module) -> None:
    # GPT-2's initialisation: with PyTorch's N(0, 1) embeddings the tied lm_head starts with
    # huge logits and a loss in the hundreds instead of about ln(vocab).
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


# --- options ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoOptions:
    layers: int
    width: int
    heads: int
    vocab: int
    context: int
    batch: int
    steps: int
    device: str
    dcp: bool
    seed: int


def add_arguments(parser: argparse.ArgumentParser) -> None:
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


def options_from(args: argparse.Namespace) -> DemoOptions:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if min(args.layers, args.width, args.vocab, args.context, args.batch, args.steps) < 1:
        raise SystemExit("sizes and --steps must be positive")
    heads = args.heads if args.heads is not None else max(1, args.width // 64)
    if heads < 1 or args.width % heads:
        raise SystemExit(f"--width {args.width} is not a multiple of --heads {heads}")
    return DemoOptions(
        layers=args.layers,
        width=args.width,
        heads=heads,
        vocab=args.vocab,
        context=args.context,
        batch=args.batch,
        steps=args.steps,
        device=device,
        dcp=args.dcp,
        seed=args.seed,
    )


# --- walking a snapshot ----------------------------------------------------------------------


def tensor_paths(obj: Any, path: Path = ()) -> Iterator[tuple[Path, torch.Tensor]]:
    """``(path, tensor)`` for every tensor in nested dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from tensor_paths(value, (*path, key))
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            yield from tensor_paths(value, (*path, index))


def storage_key(tensor: torch.Tensor) -> int:
    storage = tensor.untyped_storage()
    return storage.data_ptr() or id(storage)


def snapshot_size(snapshot: Any) -> tuple[int, int]:
    """Tensors in the snapshot, and bytes of their distinct storages (what staging copies)."""
    storages: dict[int, int] = {}
    tensors = 0
    for _, tensor in tensor_paths(snapshot):
        tensors += 1
        storages[storage_key(tensor)] = tensor.untyped_storage().nbytes()
    return tensors, sum(storages.values())


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
    return f"{nbytes / 1e6:.1f} MB"


# --- the run ---------------------------------------------------------------------------------


class Trainer:
    """The model, its AdamW optimizer and random batches; one call of :meth:`step` trains."""

    def __init__(self, options: DemoOptions) -> None:
        torch.manual_seed(options.seed)
        self.options = options
        self.device = torch.device(options.device)
        self.model = GPT(
            options.vocab, options.width, options.layers, options.heads, options.context
        ).to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=3e-4, weight_decay=0.1)
        self.steps_done = 0

    def step(self) -> float:
        options = self.options
        tokens = torch.randint(
            options.vocab, (options.batch, options.context + 1), device=self.device
        )
        logits = self.model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, options.vocab), tokens[:, 1:].reshape(-1))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.steps_done += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the step's time, not its launch time
        return float(loss.detach())

    def snapshot(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optim": self.optimizer.state_dict(),
            "step": self.steps_done,
        }


async def stage_with_progress(
    stager: Stager, snapshot: Any, label: str, probe: LagProbe, out: TextIO
) -> tuple[dict[Path, torch.Tensor], LagSummary]:
    """Stage through ``stage_iter``, drawing progress; the staged tensors by path, and the lag."""
    _, total = snapshot_size(snapshot)
    progress = Progress(label, total, out)
    staged: dict[Path, torch.Tensor] = {}
    seen: set[int] = set()
    async with probe.window() as window:
        async for path, tensor in stager.stage_iter(snapshot):
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
    sources = dict(tensor_paths(snapshot))
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


def dcp_stager_options(cuda: bool) -> Any:
    from torch.distributed.checkpoint import staging as dcp_staging

    return dcp_staging.StagingOptions(
        use_pinned_memory=cuda,
        use_shared_memory=False,
        use_async_staging=True,
        use_non_blocking_copy=cuda,
    )


async def dcp_rows(snapshot: Any, probe: LagProbe, cuda: bool) -> list[Row]:
    """DCP's DefaultStager on the same snapshot: a first call, then a cached one."""
    from torch.distributed.checkpoint.staging import DefaultStager

    tensors, nbytes = snapshot_size(snapshot)
    stager = DefaultStager(dcp_stager_options(cuda))
    rows = []
    try:
        for label in ("DCP DefaultStager first", "DCP DefaultStager cached"):
            async with probe.window() as window:
                started = time.perf_counter()
                future = stager.stage(snapshot)
                assert not isinstance(future, dict)
                await asyncio.wrap_future(future)
                seconds = time.perf_counter() - started
            rows.append(Row(label, nbytes, tensors, seconds, "n/a", "n/a", window.summary()))
    finally:
        stager.close()
    return rows


async def run_demo(options: DemoOptions, out: TextIO) -> int:
    started = time.perf_counter()
    out.write(
        f"astage demo: GPT with {options.layers} layers, width {options.width}, vocab "
        f"{options.vocab} on {options.device}; AdamW; {options.steps} steps\n"
    )
    trainer = Trainer(options)
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
            loss = await asyncio.to_thread(trainer.step)
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


def main(args: argparse.Namespace) -> int:
    options = options_from(args)
    return asyncio.run(run_demo(options, sys.stdout))


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.demo",
        description="Train a GPT-style model for a few steps on an event loop and stage "
        "{'model', 'optim', 'step'} after each one with astage.Stager while a heartbeat measures "
        "loop lag; then compare with DCP's DefaultStager on the same snapshot.",
    )
    add_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli())
