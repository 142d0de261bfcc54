"""The demo's driver: the crashed job, the resume, the checks, and the comparison with DCP."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
import warnings
from functools import partial
from typing import Any, TextIO

import anyio
import torch

from astage import CheckpointDir, CheckpointSkippedWarning, format_path

from ..gpt import GPT, Trainer
from ..lag import LagProbe
from ..runner import anyio_backend
from ..state_dicts import tensor_leaves
from .crash import cut_latest, describe_folder, run_and_kill
from .events import LAG_EXPLAINED, PAUSE_EXPLAINED, Event, Printer, mb
from .job import train
from .options import DemoOptions, add_arguments, options_from
from .table import astage_rows, dcp_rows, print_comparison, render_table, row_of

__all__ = ["main", "run_demo"]


async def run_demo(options: DemoOptions, out: TextIO) -> int:
    """Train, crash, resume, check, compare with DCP; 0 when every check passed."""
    started = time.perf_counter()
    printer = Printer(out)
    setup = options.setup
    with contextlib.ExitStack() as stack:
        if options.root is None:
            root = stack.enter_context(tempfile.TemporaryDirectory(prefix="astage-demo-"))
            kept = "a temporary folder, removed at the end; --root DIR keeps it"
        else:
            root = os.path.abspath(options.root)
            os.makedirs(root, exist_ok=True)
            kept = "kept"
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            model = GPT(setup.vocab, setup.width, setup.layers, setup.heads, setup.context)
        params = sum(p.numel() for p in model.parameters())
        printer.line(
            f"astage demo: a GPT with {setup.layers} layers, width {setup.width}, vocab "
            f"{setup.vocab} ({params / 1e6:.1f} M parameters) on {setup.device}; AdamW; "
            f"{options.steps} steps; {options.backend} loop"
        )
        printer.line(f"checkpoints: {root} ({kept})")
        printer.line(LAG_EXPLAINED)
        printer.line(PAUSE_EXPLAINED)

        printer.line(
            f"\n1. a training job (a child process) checkpoints every step with "
            f"CheckpointDir.start_save; it is killed while step {options.crash_at}'s file is "
            "written"
        )
        job = await run_and_kill(
            setup, root, options.steps, options.crash_at, options.backend, printer=printer
        )

        printer.line("\n2. what the crash left in the folder:")
        for line in describe_folder(root, options.crash_at):
            printer.line(line)
        name, before, after = cut_latest(root)
        printer.line(
            f"   and, to show resuming past a damaged file, {name} (what latest names) is cut from "
            f"{mb(before)} to {mb(after)}, as a copy interrupted half-way would leave it"
        )

        async with LagProbe() as probe:
            ok, trainer, events = await _resume(options, root, probe, printer)
            resumed = {event["step"]: event["loss"] for event in events if event["kind"] == "step"}
            ok &= await _check_losses(options, job.losses, resumed, printer)
            ok &= await _check_last_checkpoint(root, trainer, printer)
            staged = [event for event in events if event["kind"] == "staged"]
            rows = [row_of(event, first=i == 0) for i, event in enumerate(staged)]
            if options.dcp:
                printer.line(
                    "\n5. staging compared with DCP's DefaultStager (its thread, its future "
                    "awaited on the loop): both stage the last snapshot, nothing else running; "
                    "the first rows are the resumed run's saves, which also feed the writer"
                )
                snapshot = trainer.snapshot()
                rows += await astage_rows(snapshot, probe)
                rows += await dcp_rows(snapshot, probe, trainer.device.type == "cuda")
    out.write("\n" + render_table(rows) + "\n")
    print_comparison(rows, out)
    out.write(f"\ndone in {time.perf_counter() - started:.1f} s\n")
    return 0 if ok else 1


async def _resume(
    options: DemoOptions, root: str, probe: LagProbe, printer: Printer
) -> tuple[bool, Trainer, list[Event]]:
    """A fresh CheckpointDir: tidy, skip the damaged file, load, train on to the last step."""
    printer.line("\n3. resume: a fresh CheckpointDir on the folder, in this process")
    before = set(os.listdir(root))
    events: list[Event] = []

    def on_event(event: Event) -> None:
        printer.event(event)
        events.append(event)

    trainer = Trainer(options.setup)
    async with CheckpointDir(root, keep=3) as ckpts:
        for name in sorted(before - set(os.listdir(root))):
            printer.line(f"   removed {name} (a crashed save's temporary file)")
        found = await anyio.to_thread.run_sync(_load_latest, ckpts)
        for item in ckpts.skipped:
            reason = item.reason.removeprefix(f"{item.path}: ")  # the reason may name the file
            printer.line(f"   skipped {os.path.basename(item.path)}: {reason}")
        if found is None:
            printer.line("   FAILED: no good checkpoint to resume from")
            return False, trainer, events
        step, state_dict = found
        trainer.restore(state_dict)
        printer.line(f"   resuming from step {step}, the newest good checkpoint")
        await train(trainer, ckpts, probe, options.steps, on_event)
        printer.clear_status()
    return True, trainer, events


def _load_latest(ckpts: CheckpointDir) -> tuple[int, Any] | None:
    # What is skipped is printed from `ckpts.skipped`; the warning would repeat it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointSkippedWarning)
        return ckpts.load_latest()


async def _check_losses(
    options: DemoOptions, job_losses: dict[int, float], resumed: dict[int, float], printer: Printer
) -> bool:
    """Train an uninterrupted run and compare its losses with the crashed and resumed ones."""
    printer.line(f"\n4. an uninterrupted run: the same seed, {options.steps} steps, no checkpoints")
    reference = Trainer(options.setup)
    losses: dict[int, float] = {}
    for step in range(1, options.steps + 1):
        printer.status(f"   step {step}: training...")
        losses[step] = await anyio.to_thread.run_sync(reference.step)
    printer.clear_status()
    return _compare(losses, job_losses, resumed, printer)


def _compare(
    reference: dict[int, float],
    job: dict[int, float],
    resumed: dict[int, float],
    printer: Printer,
) -> bool:
    printer.line(f"   {'step':>4}  {'uninterrupted':>20}  {'killed job':>20}  {'resumed':>20}")
    same = True
    for step, loss in reference.items():
        cells = []
        for run in (job, resumed):
            other = run.get(step)
            cells.append("" if other is None else repr(other))
            same &= other is None or other == loss
        printer.line(f"   {step:>4}  {loss!r:>20}  {cells[0]:>20}  {cells[1]:>20}")
    complete = all(step in job or step in resumed for step in reference)
    verdict = "OK" if same and complete else "FAILED"
    printer.line(
        f"check: the killed job's and the resumed run's losses equal the uninterrupted run's, "
        f"bit for bit: {verdict}"
    )
    return same and complete


async def _check_last_checkpoint(root: str, trainer: Trainer, printer: Printer) -> bool:
    """Load the newest checkpoint back: equal to the live state, tied weights one storage."""
    found = await anyio.to_thread.run_sync(_load_latest, CheckpointDir(root))
    if found is None:
        printer.line("check: the last checkpoint loads back: FAILED (none found)")
        return False
    step, loaded = found
    live = dict(tensor_leaves(trainer.snapshot()))
    back = dict(tensor_leaves(loaded))
    mismatched = [
        format_path(path)
        for path, tensor in live.items()
        if path not in back or not _same_bits(back[path], tensor)
    ]
    equal = not mismatched and step == trainer.steps_done
    printer.line(
        f"check: step {step}'s checkpoint loads back equal to the live training state "
        f"({len(live)} tensors, bit for bit): "
        f"{'OK' if equal else 'FAILED ' + ', '.join(mismatched[:3])}"
    )
    tok, head = back.get(("model", "tok_emb.weight")), back.get(("model", "lm_head.weight"))
    tied = (
        tok is not None
        and head is not None
        and tok.untyped_storage().data_ptr() == head.untyped_storage().data_ptr()
    )
    printer.line(
        f"check: the tied tok_emb and lm_head weights load back as one storage: "
        f"{'OK' if tied else 'FAILED'}"
    )
    return equal and tied


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    b = b.detach().cpu()
    if (a.dtype, a.shape) != (b.dtype, b.shape):
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.demo``: parse the options, run the demo; the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.demo",
        description="Train a GPT-style model on an event loop, checkpointing every step with "
        "astage while training goes on; kill the training job mid-save, resume from the newest "
        "good checkpoint and show that the losses equal an uninterrupted run's; then compare "
        "staging with DCP's DefaultStager.",
    )
    add_arguments(parser)
    options = options_from(parser.parse_args(argv))
    backend, backend_options = anyio_backend(options.backend)
    return anyio.run(
        partial(run_demo, options, sys.stdout), backend=backend, backend_options=backend_options
    )
