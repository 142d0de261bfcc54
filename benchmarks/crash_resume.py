"""Kill a saving process at random moments; the folder must always resume, bit-exact.

``python -m benchmarks.crash_resume [--kills 60] [--seed 0] [--root DIR] [--json]``

A training process saves a small state dict (a few tensors of several dtypes, a view, plain
values, all deterministic per step) into one :class:`astage.CheckpointDir` in a loop (``save``
and ``start_save`` in turn, ``keep=3``), resuming from ``load_latest()`` each time it starts. It
is killed with ``SIGKILL`` at a random moment (before its first save, mid-write, while
``latest`` moves, while pruning), ``--kills`` times. After each kill a fresh ``CheckpointDir``
on the folder must:

* load one of the steps that were saved, bit-exact (every tensor's bytes, dtype and shape,
  every plain value);
* load a step at least as new as the newest ``save()`` that returned (a kill is no power
  loss: what was published is in the page cache);
* leave no temporary file of its naming behind once it has been opened.

Speed: one process imports torch once and forks a worker per round (and a checker, so that
the orchestrating process itself never runs torch or starts a thread: a fork of it is always
clean). ``torch.set_num_threads(1)`` keeps OpenMP's pool from ever starting. The short test in
``tests/test_checkpoint_dir_crash.py`` runs this with 8 kills, and with 50 (marked slow); the
60 here took ~33 s on the busy 2-core VM, where 40 of the 60 kills left a temporary file.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

MAX_DELAY_S = 0.6  # kills land up to this long after the worker starts: ~0.1 s to the
# first save's return here, then ~30 ms a save
_TEMP_PREFIXES = (".step_", ".latest.")


def expected(step: int) -> dict[str, Any]:
    """The state dict a worker saves at ``step``: every byte a function of ``step``."""
    import torch

    generator = torch.Generator().manual_seed(step)
    weight = torch.randn(512, 256, generator=generator)  # 512 KiB
    return {
        "model": {
            "weight": weight,
            "row0": weight[0],  # a view of the weight: stored once, comes back as a view
            "bias": torch.randn(256, generator=generator).to(torch.bfloat16),
            "counts": torch.arange(1000, dtype=torch.int64) * step,
        },
        "optim": {"state": {0: {"exp_avg": torch.randn(512, 256, generator=generator)}}},
        "mask": torch.rand(777, generator=generator) > 0.5,
        "step": step,
        "lr": 0.1 / (step + 1),
        "name": f"run-{step}",
    }


def same(a: Any, b: Any, where: str = "") -> str | None:
    """Where ``a`` and ``b`` differ (bit-exact for tensors), or None when they do not."""
    import torch

    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor):
            return f"{where}: {type(b).__name__}, not a tensor"
        if (a.dtype, a.shape, a.stride()) != (b.dtype, b.shape, b.stride()):
            return f"{where}: {b.dtype} {tuple(b.shape)}, expected {a.dtype} {tuple(a.shape)}"
        if not torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)):
            return f"{where}: other bytes"
        return None
    if isinstance(a, dict):
        if not isinstance(b, dict) or list(a) != list(b):
            return f"{where}: keys {list(b) if isinstance(b, dict) else type(b).__name__}"
        for key in a:
            found = same(a[key], b[key], f"{where}[{key!r}]")
            if found:
                return found
        return None
    return None if type(a) is type(b) and a == b else f"{where}: {b!r}, expected {a!r}"


def _worker(root: str, report: int) -> None:
    """The training process: resume, then save step after step until it is killed."""
    import anyio

    import astage

    def say(line: str) -> None:
        os.write(report, f"{line}\n".encode())

    async def main() -> None:
        async with astage.CheckpointDir(root, keep=3) as ckpts:
            found = ckpts.load_latest()
            step = 0 if found is None else found[0] + 1
            while True:
                say(f"start {step}")
                if step % 2:
                    handle = await ckpts.start_save(step, expected(step))
                    await handle
                else:
                    await ckpts.save(step, expected(step))
                say(f"saved {step}")
                step += 1

    anyio.run(main)


def _check(root: str, report: int) -> None:
    """A fresh folder after a kill: what it resumes from, and whether that is right."""
    import warnings

    import astage

    orphans = _temp_files(root)
    orphan_bytes = sum(os.path.getsize(os.path.join(root, name)) for name in orphans)
    ckpts = astage.CheckpointDir(root, keep=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", astage.CheckpointSkippedWarning)
        found = ckpts.load_latest()
    result: dict[str, Any] = {
        "orphans": len(orphans),
        "orphan_bytes": orphan_bytes,
        "left": _temp_files(root),
        "skipped": [[os.path.basename(p), reason[:120]] for p, reason in ckpts.skipped],
        "step": None if found is None else found[0],
        "mismatch": None if found is None else same(expected(found[0]), found[1]),
    }
    os.write(report, json.dumps(result).encode())


def _temp_files(root: str) -> list[str]:
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(_TEMP_PREFIXES) and n.endswith(".tmp"))


def _fork(target: Any, root: str) -> tuple[int, int]:
    """Run ``target(root, write_end)`` in a forked child; the child's pid and the read end."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's code
        code = 0
        try:
            os.close(read)
            target(root, write)
        except BaseException:  # noqa: BLE001 - reported by the exit status and on stderr
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    os.close(write)
    return pid, read


def _read_all(fd: int) -> str:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks).decode()


def run(kills: int, seed: int, root: str) -> dict[str, Any]:
    """Kill the worker ``kills`` times; the figures, and every failure found."""
    rng = random.Random(seed)
    started: set[int] = set()
    newest_saved = -1
    failures: list[str] = []
    rounds: list[dict[str, Any]] = []
    began = time.perf_counter()
    for kill in range(kills):
        pid, read = _fork(_worker, root)
        time.sleep(rng.uniform(0, MAX_DELAY_S))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        lines = _read_all(read).split()
        if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
            failures.append(f"kill {kill}: the worker ended on its own (status {status})")
        for word, number in zip(lines[::2], lines[1::2], strict=True):
            if word == "start":
                started.add(int(number))
            else:
                newest_saved = max(newest_saved, int(number))
        pid, read = _fork(_check, root)
        text = _read_all(read)
        _, status = os.waitpid(pid, 0)
        if status != 0 or not text:
            failures.append(f"kill {kill}: the check failed (status {status})")
            continue
        checked = json.loads(text)
        checked["saves_in_round"] = lines.count("saved")
        rounds.append(checked)
        step = checked["step"]
        if checked["left"]:
            failures.append(f"kill {kill}: temporary files left after opening: {checked['left']}")
        if step is None:
            if newest_saved >= 0:
                failures.append(f"kill {kill}: nothing to resume from after step {newest_saved}")
            continue
        if step not in started:
            failures.append(f"kill {kill}: resumed from step {step}, which was never saved")
        if step < newest_saved:
            failures.append(f"kill {kill}: resumed from {step}, but {newest_saved} was saved")
        if checked["mismatch"]:
            failures.append(f"kill {kill}: step {step} differs at {checked['mismatch']}")
    return {
        "kills": kills,
        "seed": seed,
        "seconds": round(time.perf_counter() - began, 2),
        "saves": newest_saved + 1,
        "kills_leaving_temp_files": sum(1 for r in rounds if r["orphans"]),
        "temp_bytes_removed": sum(r["orphan_bytes"] for r in rounds),
        "kills_with_skipped_files": sum(1 for r in rounds if r["skipped"]),
        "kills_before_any_save_returned": sum(1 for r in rounds if not r["saves_in_round"]),
        "skipped_examples": sorted({tuple(s) for r in rounds for s in r["skipped"]})[:5],
        "failures": failures,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", help="the checkpoint folder (default: a temporary one)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)  # no OpenMP pool in this process: every fork is clean
    # Imported once here, inherited by every child (anyio imports its backend on first use).
    import anyio._backends._asyncio  # noqa: F401

    import astage  # noqa: F401

    # The children's garbage collector would walk (and so copy, page by page) every object
    # these imports made: frozen, they stay shared, and a child's first save is 4x sooner.
    gc.freeze()

    root = args.root or tempfile.mkdtemp(prefix="astage-crash-")
    try:
        figures = run(args.kills, args.seed, os.path.join(root, "ckpts"))
    finally:
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(figures))
    else:
        for key, value in figures.items():
            if key != "failures":
                print(f"{key}: {value}")
        for failure in figures["failures"]:
            print(f"FAILED {failure}")
        print("ok" if not figures["failures"] else f"{len(figures['failures'])} failures")
    return 1 if figures["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
