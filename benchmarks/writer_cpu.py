"""Focused: the writer's CPU time against its wall time, direct I/O on and off (issue 11).

    .venv/bin/python -m benchmarks.writer_cpu [--mib 256 1024] [--repeats 5]
        [--folders /work /dev/shm] [--huge-pages]

For each size, folder and ``direct`` setting, with one cached ``Stager`` and 64 float32
tensors: the write alone (a ``SafetensorsWriter`` inside ``async with`` fed the staged dict,
until durable), the stage alone, and ``astage.save`` with the same writer settings. The writer's
CPU is ``WriteThreads.cpu_seconds`` (``time.thread_time`` of its own threads, fsync and rename
included). ``--huge-pages`` stages into 2 MiB-aligned buffers (page-aligned, as direct I/O
wants them); without it the cache's buffers are malloc'ed (64 bytes past a page: bounced).
Medians with [min-max] over the repeats, and the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

import anyio
import torch

import astage


def _spread(values: list[float], scale: float = 1e3) -> str:
    low, high = min(values) * scale, max(values) * scale
    return f"{statistics.median(values) * scale:6.0f} [{low:.0f}-{high:.0f}]"


async def _write_alone(staged: dict[str, Any], path: str, direct: bool) -> tuple[float, float]:
    started = time.perf_counter()
    writer = astage.SafetensorsWriter(path, direct=direct)
    async with writer:
        await writer.begin(staged)
        for key, tensor in staged.items():
            await writer.write((key,), tensor)
        await writer.commit()
    wall = time.perf_counter() - started
    assert writer.write_threads is not None
    return wall, writer.write_threads.cpu_seconds


async def _one(
    mib: int, folder: str, direct: bool, repeats: int, huge_pages: bool
) -> dict[str, list[float]]:
    numel = (mib << 20) // 64 // 4
    sd = {f"t{i}": torch.randn(numel) for i in range(64)}
    out: dict[str, list[float]] = {k: [] for k in ("write", "cpu", "stage", "save", "save_cpu")}
    async with astage.Stager(huge_pages=huge_pages) as stager:
        staged = await stager.stage(sd)
        with tempfile.TemporaryDirectory(dir=folder, prefix="astage-wcpu-") as root:
            for repeat in range(repeats):
                path = os.path.join(root, f"w{repeat}.safetensors")
                wall, cpu = await _write_alone(staged, path, direct)
                out["write"].append(wall)
                out["cpu"].append(cpu)
                os.unlink(path)
                os.sync()
                started = time.perf_counter()
                await stager.stage(sd)
                out["stage"].append(time.perf_counter() - started)
                writer = astage.SafetensorsWriter(path, direct=direct)
                started = time.perf_counter()
                await astage.save(sd, writer, stager=stager)
                out["save"].append(time.perf_counter() - started)
                assert writer.write_threads is not None
                out["save_cpu"].append(writer.write_threads.cpu_seconds)
                os.unlink(path)
                os.sync()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--folders", nargs="+", default=["/work", "/dev/shm"])
    parser.add_argument("--huge-pages", action="store_true")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()}, {os.cpu_count()} CPUs")
    print(
        "size folder direct | write alone ms | writer CPU ms (% of wall) | stage alone ms |"
        " astage.save ms (x max(stage, write)) | save's writer CPU ms (% of the save's wall)"
    )
    for mib in args.mib:
        for folder in args.folders:
            for direct in (False, True):
                r = anyio.run(_one, mib, folder, direct, args.repeats, args.huge_pages)
                share = statistics.median(c / w for c, w in zip(r["cpu"], r["write"], strict=True))
                save_share = statistics.median(
                    c / w for c, w in zip(r["save_cpu"], r["save"], strict=True)
                )
                ratio = statistics.median(
                    s / max(a, b) for s, a, b in zip(r["save"], r["stage"], r["write"], strict=True)
                )
                print(
                    f"{mib:5d} {folder:9s} {direct!s:5s} | {_spread(r['write'])} | "
                    f"{_spread(r['cpu'])} ({share:.0%}) | {_spread(r['stage'])} | "
                    f"{_spread(r['save'])} ({ratio:.2f}x) | {_spread(r['save_cpu'])} "
                    f"({save_share:.0%})",
                    flush=True,
                )
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
