"""Replication throughput over gloo on loopback: astage.ReplicationStager vs DCP's.

Run ``python -m benchmarks.replication``: it starts two ranks (gloo on 127.0.0.1, a FileStore
in a temporary folder), each with ``--mib`` MiB of float32 tensors (256 MiB by default), and
times, on the same data, after warm-up calls, the contenders taking turns round by round:

* ``astage.ReplicationStager.stage`` without ``storage_dir`` (stage into host buffers, swap);
* ``astage.ReplicationStager.stage`` with ``storage_dir`` (the same, then the durable file);
* DCP's ``_ReplicationStager.stage`` (swap with its ``PGTransport``, then ``torch.save`` +
  fsync; it has no in-memory-only mode);
* DCP's ``PGTransport`` exchange alone (its send/receive order, no file).

GB/s per rank = bytes each rank sends (= bytes it receives) / the slowest rank's median time.
astage's calls run on one long-lived event loop per rank, on ``--backend`` (asyncio, uvloop or
trio). The figures go to stdout as a Markdown table and, with ``--json PATH``, to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .runner import BACKENDS, LoopRunner


def _state_dict(rank: int, mib: int, tensors: int) -> dict[str, torch.Tensor]:
    per = (mib << 20) // 4 // tensors
    return {f"layer{i}.weight": torch.full((per,), float(rank * 100 + i)) for i in range(tensors)}


def _slowest(seconds: float) -> float:
    value = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value.item())


def _time_round_robin(
    contenders: dict[str, Callable[[], Any]], rounds: int, warmup: int
) -> dict[str, list[float]]:
    """Each round times every contender once, in turn: machine noise hits them all alike."""
    for _ in range(warmup):  # buffers allocated, connections made, TCP windows grown
        for fn in contenders.values():
            dist.barrier()
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            dist.barrier()
            start = time.perf_counter()
            fn()
            times[name].append(_slowest(time.perf_counter() - start))
    return times


def _rank_main(rank: int, world: int, init: str, args: argparse.Namespace) -> dict[str, Any]:
    from torch.distributed.checkpoint._pg_transport import PGTransport
    from torch.distributed.checkpoint.staging import _ReplicationStager

    import astage

    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(minutes=5)
    )
    sd = _state_dict(rank, args.mib, args.tensors)
    nbytes = sum(t.nbytes for t in sd.values())
    partner = (rank + world // 2) % world
    results: dict[str, list[float]] = {}
    folder = tempfile.mkdtemp(prefix="astage-bench-replication-")
    loop = LoopRunner(args.backend)
    try:
        stager = astage.ReplicationStager(timeout=300, options=astage.StagingOptions())
        persisting = astage.ReplicationStager(
            timeout=300, storage_dir=os.path.join(folder, "astage")
        )

        wire: list[float] = []

        def astage_memory() -> None:
            replica = loop.run(stager.stage(sd))
            assert float(replica["layer0.weight"][0]) == partner * 100
            assert stager.last_seconds is not None
            wire.append(stager.last_seconds)

        def astage_persist() -> None:
            loop.run(persisting.stage(sd))

        world_group = dist.group.WORLD
        assert world_group is not None
        dcp = _ReplicationStager(
            world_group, timeout=timedelta(minutes=5), storage_dir=os.path.join(folder, "dcp")
        )

        def dcp_stage() -> None:
            replica = dcp.stage(sd)
            assert float(replica["layer0.weight"][0]) == partner * 100  # type: ignore[index]

        transport = PGTransport(world_group, timedelta(minutes=5), torch.device("cpu"))

        def dcp_transport() -> None:
            if rank < partner:
                transport.send_checkpoint([partner], sd)
                transport.recv_checkpoint(partner)
            else:
                transport.recv_checkpoint(partner)
                transport.send_checkpoint([partner], sd)

        contenders = {
            "astage ReplicationStager (in memory)": astage_memory,
            "astage ReplicationStager (+ durable file)": astage_persist,
            "DCP _ReplicationStager (+ torch.save file)": dcp_stage,
            "DCP PGTransport exchange only": dcp_transport,
        }
        results = _time_round_robin(contenders, args.rounds, args.warmup)
        # the exchange alone (header and bytes, both ways), from the same timed calls
        exchange = [_slowest(seconds) for seconds in wire[args.warmup :]]
        results = {
            "astage ReplicationStager (in memory)": results.pop(
                "astage ReplicationStager (in memory)"
            ),
            "astage ReplicationStager: its exchange alone (part of the row above)": exchange,
            **results,
        }
        loop.run(stager.aclose())
        loop.run(persisting.aclose())
    finally:
        loop.close()
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
        dist.destroy_process_group()
    return {"nbytes": nbytes, "times": results}


def _report(result: dict[str, Any], args: argparse.Namespace) -> str:
    nbytes = result["nbytes"]
    lines = [
        f"2 ranks, gloo on 127.0.0.1, {args.mib} MiB per rank in {args.tensors} float32 "
        f"tensors, astage on {args.backend}; median of {args.rounds} calls after "
        f"{args.warmup} warm-up calls, contenders taking turns; each call's time is the "
        "slower rank's",
        "",
        "| contender | median | min | GB/s per rank |",
        "|---|---|---|---|",
    ]
    for name, times in result["times"].items():
        median = statistics.median(times)
        lines.append(
            f"| {name} | {median * 1e3:.0f} ms | {min(times) * 1e3:.0f} ms | "
            f"{nbytes / median / 1e9:.2f} |"
        )
    return "\n".join(lines)


ASTAGE_MEMORY = "astage ReplicationStager (in memory)"
ASTAGE_FILE = "astage ReplicationStager (+ durable file)"
DCP_FILE = "DCP _ReplicationStager (+ torch.save file)"
DCP_TRANSPORT = "DCP PGTransport exchange only"


def _page(machine: dict[str, Any], result: dict[str, Any], args: argparse.Namespace) -> str:
    """docs/benchmarks-replication.md: every figure from this run."""
    median = {name: statistics.median(times) for name, times in result["times"].items()}
    gpu = machine.get("gpu") or "none (CUDA not available)"
    before, after = machine["loadavg_before_after"]
    rows = [
        ["date", machine["date"]],
        ["command", f"`{machine['command']}`"],
        ["CPU", f"{machine['cpu']}, {machine['cores']} cores"],
        ["RAM", f"{machine['ram_gib']} GiB"],
        ["GPU", gpu],
        ["software", f"torch {machine['torch']}, Python {machine['python']}, gloo"],
        ["astage revision", f"`{machine['git']}`"],
        ["1-min load average", f"{before} before, {after} after (the run's 2 ranks add ~2)"],
    ]
    ratio_file = median[DCP_FILE] / median[ASTAGE_FILE]
    ratio_memory = median[DCP_TRANSPORT] / median[ASTAGE_MEMORY]
    lines = [
        "# Benchmark: replication across ranks (astage vs DCP)",
        "",
        "Generated by `python -m benchmarks.replication --md docs/benchmarks-replication.md` "
        "from one run; every figure below comes from that run. See "
        "[distributed.md](distributed.md) for what `ReplicationStager` does and "
        "[benchmarks.md](benchmarks.md) for the staging benchmarks.",
        "",
        "| | |",
        "|---|---|",
        *[f"| {key} | {value} |" for key, value in rows],
        "",
        "## Results",
        "",
        _report(result, args),
        "",
        f"- **astage vs DCP's `_ReplicationStager`, both ending with the replica in a durable "
        f"file**: {median[ASTAGE_FILE] * 1e3:.0f} ms vs {median[DCP_FILE] * 1e3:.0f} ms, "
        f"**{ratio_file:.2f}x** (DCP time / astage time; higher is better for astage).",
        f"- **astage in memory vs DCP's bare `PGTransport` exchange** (no file): "
        f"{median[ASTAGE_MEMORY] * 1e3:.0f} ms vs {median[DCP_TRANSPORT] * 1e3:.0f} ms, "
        f"**{ratio_memory:.2f}x**. DCP's row sends the live tensors, with no snapshot; "
        "astage's includes staging the snapshot into its host buffers first.",
        "",
        "## What is measured",
        "",
        "- Two ranks on one machine, gloo over 127.0.0.1; each rank holds "
        f"{args.mib} MiB in {args.tensors} float32 tensors, sends them to its partner and "
        "receives the partner's. GB/s per rank = bytes one rank sends (it receives as many) / "
        "median time; each timed call's time is the slower rank's.",
        "- The contenders take turns within each round (after warm-up calls), so the machine's "
        "noise hits them alike.",
        "- `astage ReplicationStager (in memory)`: `await stage(sd)` without `storage_dir`: "
        "stage into cached host buffers, swap header and bytes with the partner (both "
        "directions at once, one tag per message), rebuild the replica. The next row is the "
        "exchange alone (`last_seconds`) within those same calls.",
        "- `(+ durable file)`: the same with `storage_dir`: the replica is written through "
        "astage's safetensors writer while its bytes arrive (each message's tensors as it "
        "lands), then committed (fsync, rename, folder fsync) once the exchange succeeded.",
        "- `DCP _ReplicationStager`: `stage(sd)`: lower rank sends first, then receives, through "
        "`PGTransport` (pickled metadata, one message per tensor), then `torch.save` + fsync + "
        "rename; it has no in-memory mode. `DCP PGTransport exchange only` is its exchange "
        "without the file.",
        "- Loopback TCP on this machine is CPU-bound (the kernel copies every byte twice), and "
        "other processes shared its cores during the run (load average above): figures vary "
        "by several times between runs; compare rows of one run.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="MiB per rank")
    parser.add_argument("--tensors", type=int, default=16, help="tensors per rank")
    parser.add_argument("--rounds", type=int, default=9, help="timed calls per contender")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per contender")
    parser.add_argument(
        "--backend", choices=BACKENDS, default="asyncio", help="event loop of astage's calls"
    )
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--md", help="also write a Markdown page (docs/benchmarks-replication.md)")
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--init", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank is not None:  # one rank of the job
        result = _rank_main(args.rank, 2, args.init, args)
        if args.rank == 0:
            with open(args.out, "w", encoding="utf-8") as file:
                json.dump(result, file)
        return
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{os.path.join(tmp, 'init')}"
        out = os.path.join(tmp, "result.json")
        common = ["--mib", str(args.mib), "--tensors", str(args.tensors)]
        common += ["--rounds", str(args.rounds), "--warmup", str(args.warmup)]
        common += ["--backend", args.backend]
        common += ["--init", init, "--out", out]
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "benchmarks.replication", "--rank", str(rank), *common]
            )
            for rank in range(2)
        ]
        codes = [proc.wait() for proc in procs]
        if any(codes):
            raise SystemExit(f"a rank failed: exit codes {codes}")
        with open(out, encoding="utf-8") as file:
            result = json.load(file)
    from .machine import describe_machine

    machine = describe_machine(sys.argv[1:])
    # 1-minute load averages (this job's own two ranks add up to about 2 of it)
    machine["loadavg_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    machine["command"] = "python -m benchmarks.replication" + "".join(f" {a}" for a in sys.argv[1:])
    print(_report(result, args))
    if args.md:
        with open(args.md, "w", encoding="utf-8") as file:
            file.write(_page(machine, result, args))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump({"machine": machine, "args": vars(args), **result}, file, indent=1)


if __name__ == "__main__":
    main()
