"""``python -m benchmarks.demo`` (``make demo``): train, checkpoint, crash, resume, compare.

A small GPT (:mod:`benchmarks.gpt`) trains with AdamW on an event loop, the compute in a worker
thread so the loop stays live. The demo, step by step:

1. **Train and checkpoint** (:mod:`.job`): a training job, a child process, saves every step
   into a :class:`astage.CheckpointDir` with ``start_save``: training pauses only while the
   snapshot is staged into host memory; the file is written while the next step trains. Each
   snapshot's figures are printed: bytes staged, stage time, loop lag, time until durable.
2. **Crash** (:mod:`.crash`): the job is killed with ``SIGKILL`` while a save is in flight,
   which leaves a torn temporary file; the newest checkpoint is then cut short, as an
   interrupted copy would leave it, so that resuming has to pass over a damaged file.
3. **Resume** (:mod:`.run`): a fresh ``CheckpointDir`` on the folder removes the torn file,
   skips the damaged one, loads the newest good checkpoint, and training goes on (still
   checkpointing) to the last step.
4. **Check**: an uninterrupted run with the same seed gives the same losses, bit for bit
   (the data of step ``n`` depends on the seed and ``n`` only), and the last checkpoint
   loads back equal to the live state.
5. **Compare** (:mod:`.table`): DCP's ``DefaultStager`` stages the same snapshot; a table sets
   its stage time and loop lag next to astage's.

``--backend`` picks the loop (asyncio, uvloop or trio); ``--help`` lists the sizes.
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.demo``: parse the options, run the demo; the exit status."""
    # Imported here: the training job (``python -m benchmarks.demo.job``) imports this package
    # too, and needs none of DCP's modules that the demo's driver imports.
    from .run import main as run_main

    return run_main(argv)
