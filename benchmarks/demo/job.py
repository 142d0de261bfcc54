"""The training loop: train a step in a worker thread, then checkpoint it in the background.

:func:`train` is the whole loop, used both by the training job that the demo kills (this
module run as ``python -m benchmarks.demo.job``, reporting its events as JSON lines on stdout)
and by the resumed run in the demo's own process. After each step the loop calls
``CheckpointDir.start_save``, which returns once the snapshot is in host memory: the next step
trains while astage's threads write the file, and a task reports when it is durable.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from functools import partial

import anyio
import anyio.abc

from astage import CheckpointDir, SaveHandle

from ..gpt import Setup, Trainer
from ..lag import LagProbe
from ..runner import anyio_backend
from .events import Event

__all__ = ["CRASH_POINT", "job_command", "train"]

CRASH_POINT = "crash_point"
"""The job's event once the save of its ``--crash-at`` step is in flight: kill it now."""

Emit = Callable[[Event], None]


async def train(
    trainer: Trainer,
    ckpts: CheckpointDir,
    probe: LagProbe,
    last_step: int,
    emit: Emit,
    *,
    crash_at: int | None = None,
) -> list[float]:
    """Train up to ``last_step``, saving each step with ``ckpts``; the losses, in order.

    ``ckpts`` must be entered (``async with``): it owns the writes, and leaving it waits for
    them. With ``crash_at``, the :data:`CRASH_POINT` event follows the start of that step's
    save, while its file is being written.
    """
    losses: list[float] = []
    async with anyio.create_task_group() as reporters:
        while trainer.steps_done < last_step:
            step = trainer.steps_done + 1
            started = time.perf_counter()
            # The compute runs in a worker thread: the loop, and its heartbeat, stay live.
            loss = await anyio.to_thread.run_sync(trainer.step)
            losses.append(loss)
            emit(
                {
                    "kind": "step",
                    "step": step,
                    "loss": loss,
                    "seconds": time.perf_counter() - started,
                }
            )
            snapshot = trainer.snapshot()
            save_started = time.perf_counter()
            async with probe.window() as lag:
                # Returns once the snapshot is in host memory; the write goes on after it.
                handle = await ckpts.start_save(step, snapshot)
            paused = time.perf_counter() - save_started
            stats = ckpts.stager.last_stats
            assert stats is not None
            emit(
                {
                    "kind": "staged",
                    "step": step,
                    "nbytes": stats.nbytes,
                    "tensors": stats.tensors,
                    "seconds": stats.seconds,
                    # Staging, and waiting for the previous write if it still holds the
                    # stager's buffers: how long the training loop stood still.
                    "paused_seconds": paused,
                    "reused": stats.reused_fraction,
                    "new_nbytes": stats.new_nbytes,
                    "lag_p99_ms": lag.summary().p99_ms,
                    "lag_max_ms": lag.summary().max_ms,
                    "last": step == last_step,
                }
            )
            reporters.start_soon(_report_durable, handle, step, emit)
            if step == crash_at:
                emit({"kind": CRASH_POINT, "step": step, "path": handle.path})
    return losses


async def _report_durable(handle: SaveHandle, step: int, emit: Emit) -> None:
    result = await handle
    emit({"kind": "durable", "step": step, "seconds": result.seconds, "path": result.path})


# --- the job, in a process of its own ------------------------------------------------------


def job_command(setup: Setup, root: str, steps: int, crash_at: int, backend: str) -> list[str]:
    """The command line of a training job (run with the demo's interpreter)."""
    return [
        sys.executable,
        "-m",
        "benchmarks.demo.job",
        "--setup",
        json.dumps(asdict(setup)),
        "--root",
        root,
        "--steps",
        str(steps),
        "--crash-at",
        str(crash_at),
        "--backend",
        backend,
    ]


async def _job(setup: Setup, root: str, steps: int, crash_at: int) -> None:
    def emit(event: Event) -> None:
        # One JSON line per event, flushed at once: the demo reads them as they come, and
        # kills this process on the crash point. JSON keeps a float's every bit.
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()

    trainer = Trainer(setup)
    async with LagProbe() as probe, CheckpointDir(root, keep=3) as ckpts:
        await train(trainer, ckpts, probe, steps, emit, crash_at=crash_at)
        # The demo kills the job at its crash point: a job whose crash point is its last
        # step waits for that here rather than end before the kill lands.
        await anyio.sleep_forever()


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks.demo.job``: the demo's training job (not meant to be run by hand)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.demo.job")
    parser.add_argument("--setup", required=True, help="benchmarks.gpt.Setup as JSON")
    parser.add_argument("--root", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--crash-at", type=int, required=True)
    parser.add_argument("--backend", required=True)
    args = parser.parse_args(argv)
    setup = Setup(**json.loads(args.setup))
    backend, backend_options = anyio_backend(args.backend)
    anyio.run(
        partial(_job, setup, args.root, args.steps, args.crash_at),
        backend=backend,
        backend_options=backend_options,
    )


if __name__ == "__main__":
    main()
