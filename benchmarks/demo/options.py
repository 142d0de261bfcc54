"""The demo's command line, checked."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import torch

from ..gpt import Setup
from ..runner import BACKENDS

__all__ = ["DemoOptions", "add_arguments", "options_from"]


@dataclass(frozen=True)
class DemoOptions:
    """What to train, where the checkpoints go, when the job is killed, which loop runs."""

    setup: Setup
    steps: int
    crash_at: int
    """The step whose save is in flight when the training job is killed."""
    root: str | None
    """The checkpoint folder to keep, or None for a temporary one removed at the end."""
    dcp: bool
    backend: str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options, on ``parser``."""
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks (default 4)")
    parser.add_argument("--width", type=int, default=384, help="model width (default 384)")
    parser.add_argument(
        "--heads", type=int, default=None, help="attention heads (default: width / 64)"
    )
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary (default 8192)")
    parser.add_argument("--context", type=int, default=64, help="tokens per sequence (64)")
    parser.add_argument("--batch", type=int, default=2, help="sequences per step (default 2)")
    parser.add_argument("--steps", type=int, default=6, help="training steps (default 6)")
    parser.add_argument(
        "--crash-at",
        type=int,
        default=None,
        help="kill the training job while this step's checkpoint is written "
        "(3 to --steps; default: the middle step)",
    )
    parser.add_argument(
        "--root",
        default=None,
        help="checkpoint folder to keep, empty or new (default: a temporary folder)",
    )
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
    # The job is killed while step `crash_at` is written and the newest checkpoint is then
    # damaged, so two durable checkpoints must come before it: one to damage, one to resume.
    if args.steps < 3:
        raise SystemExit("--steps must be at least 3 (two checkpoints before the crash)")
    crash_at = args.crash_at if args.crash_at is not None else args.steps // 2 + 1
    if not 3 <= crash_at <= args.steps:
        raise SystemExit(f"--crash-at must be between 3 and --steps ({args.steps})")
    root = args.root
    if root is not None and os.path.exists(root) and (not os.path.isdir(root) or os.listdir(root)):
        raise SystemExit(f"--root {root}: not an empty folder (the demo starts from step 0)")
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
    return DemoOptions(
        setup=setup,
        steps=args.steps,
        crash_at=crash_at,
        root=root,
        dcp=args.dcp,
        backend=args.backend,
    )
