"""DCP's storage layer: ``dcp.async_save`` + ``dcp.load`` with DCP's writer/reader vs astage's.

Two workloads, each with the same data for every contender:

- ``gpt``: a GPT-2-like model and its AdamW state (:func:`benchmarks.state_dicts.gpt2_with_adamw`,
  about 410 MiB with the defaults below), every tensor a DTensor sharded on dimension 0 over
  ``--ranks`` gloo ranks (2 by default);
- ``bulk``: 1 GiB in 64 float32 tensors on one rank (``no_dist``).

Contenders, alternated from repeat to repeat:

- ``dcp``: DCP's ``FileSystemWriter`` (``sync_files=True``, its default, so its files are
  fsynced too; ``thread_count=1``, its default) and ``FileSystemReader``; ``async_save`` stages
  through the writer itself (DCP's ``BlockingAsyncStager``);
- ``astage``: ``astage.compat.FileSystemWriter`` / ``FileSystemReader`` (4 threads each);
  ``async_save`` stages through the writer itself, as with DCP's (nothing cached), and the
  writer writes each tensor as it lands (``write_while_staging``, its default);
- ``astage-serial``: the same with ``write_while_staging=False``: staging, then writing, one
  after the other (what the overlap gains);
- ``astage+stager``: the same writer, staged by a reused ``astage.compat.DefaultStager``.

Save: the time from ``async_save`` to its future's result, i.e. to a durable, committed
checkpoint (the slowest rank's); each save goes to a fresh folder. Load: ``dcp.load`` of that
checkpoint into a zeroed copy of the state (page cache warm for all contenders alike).

Run: ``.venv/bin/python -m benchmarks.dcp_storage [--repeats 5] [--ranks 2] [--dir /tmp/x]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import Future
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import state_dict_loader, state_dict_saver
from torch.distributed.checkpoint.staging import StagingOptions
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from astage import compat

from .state_dicts import bulk_floats, gpt2_with_adamw

GPT_SIZES = {"layers": 6, "width": 512, "vocab": 32000, "context": 1024}  # ~410 MiB with AdamW
CONTENDERS = ["dcp", "astage", "astage-serial", "astage+stager"]


def shard(tree: Any, mesh: Any) -> Any:
    """Every tensor of ``tree`` as a DTensor sharded on dimension 0 (scalars replicated)."""
    if isinstance(tree, torch.Tensor):
        if tree.dim() == 0:
            return tree
        return distribute_tensor(tree, mesh, [Shard(0)])
    if isinstance(tree, dict):
        return {key: shard(value, mesh) for key, value in tree.items()}
    if isinstance(tree, list):
        return [shard(value, mesh) for value in tree]
    return tree


def zeroed(tree: Any) -> Any:
    """A copy of ``tree`` with every tensor zeroed: the destination of a load."""
    if isinstance(tree, DTensor):
        return DTensor.from_local(
            torch.zeros_like(tree.to_local()),
            tree.device_mesh,
            tree.placements,
            shape=tree.shape,
            stride=tree.stride(),
        )
    if isinstance(tree, torch.Tensor):
        return torch.zeros_like(tree)
    if isinstance(tree, dict):
        return {key: zeroed(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [zeroed(value) for value in tree]
    return tree


def nbytes(tree: Any) -> int:
    if isinstance(tree, DTensor):
        return tree.to_local().nbytes
    if isinstance(tree, torch.Tensor):
        return tree.nbytes
    if isinstance(tree, dict):
        return sum(nbytes(v) for v in tree.values())
    if isinstance(tree, list):
        return sum(nbytes(v) for v in tree)
    return 0


class Bench:
    """One rank's side of a workload: saves and loads by each contender, timed."""

    def __init__(self, state: dict[str, Any], root: str, group: Any, no_dist: bool) -> None:
        self.state = state
        self.root = root
        self.group = group
        self.no_dist = no_dist
        self.stager = compat.DefaultStager(StagingOptions(False, False, False, False))

    def save(self, who: str, folder: str) -> float:
        writer: Any
        options: dict[str, Any] = {}
        if who == "dcp":
            writer = dcp_filesystem.FileSystemWriter(folder, sync_files=True)
        else:
            writer = compat.FileSystemWriter(folder, write_while_staging=who != "astage-serial")
            if who == "astage+stager":
                options["async_stager"] = self.stager
        self.barrier()
        started = time.perf_counter()
        future = state_dict_saver.async_save(
            self.state,
            storage_writer=writer,
            process_group=self.group,
            no_dist=self.no_dist,
            **options,
        )
        assert isinstance(future, Future)
        future.result()
        return time.perf_counter() - started

    def load(self, who: str, folder: str) -> float:
        reader: Any = (
            dcp_filesystem.FileSystemReader(folder)
            if who == "dcp"
            else compat.FileSystemReader(folder)
        )
        target = zeroed(self.state)
        self.barrier()
        started = time.perf_counter()
        state_dict_loader.load(
            target, storage_reader=reader, process_group=self.group, no_dist=self.no_dist
        )
        elapsed = time.perf_counter() - started
        check_equal(target, self.state)
        return elapsed

    def barrier(self) -> None:
        if not self.no_dist:
            dist.barrier(group=self.group)

    def slowest(self, seconds: float) -> float:
        if self.no_dist:
            return seconds
        everyone: list[float] = [0.0] * dist.get_world_size(self.group)
        dist.all_gather_object(everyone, seconds, group=self.group)
        return max(everyone)

    def run(self, repeats: int) -> dict[str, dict[str, list[float]]]:
        times: dict[str, dict[str, list[float]]] = {
            who: {"save": [], "load": []} for who in CONTENDERS
        }
        for repeat in range(repeats + 1):  # the first round warms up and is not counted
            shift = repeat % len(CONTENDERS)
            for who in CONTENDERS[shift:] + CONTENDERS[:shift]:
                folder = os.path.join(self.root, f"{who}-{repeat}")
                saved = self.slowest(self.save(who, folder))
                loaded = self.slowest(self.load(who, folder))
                self.barrier()
                if self.no_dist or dist.get_rank() == 0:
                    shutil.rmtree(folder, ignore_errors=True)
                if repeat:
                    times[who]["save"].append(saved)
                    times[who]["load"].append(loaded)
        self.stager.close()
        return times


def check_equal(a: Any, b: Any) -> None:
    if isinstance(a, DTensor):
        assert torch.equal(a.to_local(), b.to_local())
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        for key in a:
            check_equal(a[key], b[key])
    elif isinstance(a, list):
        for x, y in zip(a, b, strict=True):
            check_equal(x, y)


def summary(name: str, megabytes: float, times: dict[str, dict[str, list[float]]]) -> list[str]:
    def figure(values: list[float]) -> str:
        ordered = sorted(values)
        median = ordered[len(ordered) // 2]
        return f"{median * 1e3:7.0f} ms ({ordered[0] * 1e3:.0f}-{ordered[-1] * 1e3:.0f})"

    def med(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    lines = [f"{name}: {megabytes:.0f} MiB per rank; median (min-max) over repeats"]
    base = times["dcp"]
    for who, by in times.items():
        save_x = med(base["save"]) / med(by["save"])
        load_x = med(base["load"]) / med(by["load"])
        lines.append(
            f"  {who:14s} save {figure(by['save'])} {save_x:4.1f}x   "
            f"load {figure(by['load'])} {load_x:4.1f}x"
        )
    return lines


def rank_main(  # noqa: PLR0917 - the command line's values, in its order
    rank: int, world: int, init: str, root: str, repeats: int, out: str
) -> None:
    warnings.filterwarnings("ignore")
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=600),
    )
    mesh = init_device_mesh("cpu", (world,))
    full = gpt2_with_adamw(**GPT_SIZES)
    full["model"].pop("lm_head.weight")  # tied to wte: DCP saves it once either way
    state = shard(full, mesh)
    del full
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=600))  # the uploads' own
    times = Bench(state, root, group, no_dist=False).run(repeats)
    if rank == 0:
        lines = summary(f"GPT-2-like + AdamW on {world} gloo ranks", nbytes(state) / 2**20, times)
        with open(out, "w") as file:
            json.dump({"lines": lines, "times": times}, file)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--dir", default=None, help="where the checkpoints go (default: a temp)")
    parser.add_argument("--skip-bulk", action="store_true")
    parser.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--init", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank is not None:
        rank_main(args.rank, args.ranks, args.init, args.dir, args.repeats, args.out)
        return
    root = tempfile.mkdtemp(prefix="astage-dcp-storage-", dir=args.dir)
    try:
        out = os.path.join(root, "result.json")
        command = [sys.executable, "-m", "benchmarks.dcp_storage", "--ranks", str(args.ranks)]
        command += ["--repeats", str(args.repeats), "--dir", root, "--out", out]
        command += ["--init", os.path.join(root, "init")]
        procs = [subprocess.Popen([*command, "--rank", str(r)]) for r in range(args.ranks)]
        if any(proc.wait() for proc in procs):
            raise SystemExit("a rank failed")
        with open(out) as file:
            print("\n".join(json.load(file)["lines"]))
        if not args.skip_bulk:
            warnings.filterwarnings("ignore")
            state = bulk_floats()
            times = Bench(state, root, None, no_dist=True).run(args.repeats)
            print("\n".join(summary("1 GiB in 64 tensors on 1 rank", nbytes(state) / 2**20, times)))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
