"""``python -m benchmarks``: run the scenarios, write the report, the plots and the JSON."""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from . import plots, report
from .config import Config, Data
from .machine import CpuShare, describe_machine, wait_for_quiet
from .record import ScenarioResult
from .runner import BACKENDS, LoopRunner
from .scenarios import SCENARIOS
from .timing import prefault

OWN_PAGE = ("writers",)
"""Scenarios left out of a full run: their figures live on a page of their own."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line, with the quick run's and the writers page's default paths filled in."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="astage vs torch DCP staging, side by side in one process on the same data.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes, one repeat: a smoke run (writes under benchmarks/results/ by default)",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(SCENARIOS),
        metavar="NAME",
        help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}; without it, all "
        f"but {', '.join(OWN_PAGE)}, which have their own page (--only writers writes "
        "docs/benchmarks-writers.md)",
    )
    parser.add_argument("--out", help="markdown report (default docs/benchmarks.md)")
    parser.add_argument("--json", help="raw figures (default benchmarks/results/latest.json)")
    parser.add_argument("--img-dir", help="folder for the PNG plots (default docs/img)")
    parser.add_argument(
        "--repeats", type=int, help="repeats per contender (default 5, the writers' too)"
    )
    parser.add_argument("--no-plots", action="store_true", help="skip matplotlib")
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="asyncio",
        help="the event loop the async contenders run on (default asyncio)",
    )
    parser.add_argument(
        "--max-wait",
        type=float,
        default=60.0,
        help="seconds in all to wait, before scenarios, for other processes to go quiet (60)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.out = args.out or "benchmarks/results/quick.md"
        args.json = args.json or "benchmarks/results/quick.json"
        args.img_dir = args.img_dir or "benchmarks/results/img-quick"
    if args.only == ["writers"]:  # its own page: a full run's figures stay in benchmarks.md
        args.out = args.out or "docs/benchmarks-writers.md"
        args.json = args.json or "benchmarks/results/writers.json"
    args.out = args.out or "docs/benchmarks.md"
    args.json = args.json or "benchmarks/results/latest.json"
    args.img_dir = args.img_dir or "docs/img"
    return args


def log(message: str) -> None:
    """Progress goes to stderr: stdout stays free for whoever pipes the run."""
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the chosen scenarios and write the report; the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    config = Config.smoke() if args.quick else Config()
    if args.repeats:
        config = config.with_repeats(args.repeats)
    names = args.only or [name for name in SCENARIOS if name not in OWN_PAGE]
    machine = describe_machine(argv)
    machine["loop"] = args.backend
    cores, cpu = machine["cores"], machine["cpu"]
    log(f"astage benchmarks on {cpu}, {cores} cores, torch {torch.__version__}")

    started = time.perf_counter()
    # Touch fresh memory once so no contender alone pays the hypervisor's first-touch faults.
    prefault(2 * config.bulk_bytes)
    data = Data(config)
    results: list[ScenarioResult] = []
    wait_left = args.max_wait
    with LoopRunner(args.backend) as runner:
        for name in names:
            log(f"- {name} ...")
            if name != "gpu" or torch.cuda.is_available():  # a skipped scenario needs no quiet
                waited = time.perf_counter()
                wait_for_quiet(min(wait_left, 30.0), log=log)
                wait_left = max(0.0, wait_left - (time.perf_counter() - waited))
            scenario_started = time.perf_counter()
            with CpuShare() as share:
                result = SCENARIOS[name](config, data, runner)
            result.seconds = time.perf_counter() - scenario_started
            result.others_cores = share.others_cores
            result.steal_cores = share.steal_cores
            results.append(result)
            status = result.skipped or ", ".join(
                f"{c.metric}: {c.astage} vs {c.reference}" for c in result.checks[:2]
            )
            log(
                f"  done in {result.seconds:.1f} s (other processes: "
                f"{result.others_cores:.2f} cores); {status}"
            )
    total = time.perf_counter() - started

    link_dir = os.path.dirname(os.path.abspath(args.out))
    images = {} if args.no_plots else plots.render_plots(results, args.img_dir, link_dir)
    title = (
        "Benchmarks: astage.save vs DCP async_save and torch.save (durable checkpoints)"
        if names == ["writers"]
        else report.TITLE
    )
    see_also = (
        "The staging benchmarks are in [benchmarks.md](benchmarks.md); the writer and its file "
        "format are described in [writers.md](writers.md). A full run (`python -m benchmarks`) "
        "leaves this scenario out; `--only writers` writes this page."
        if names == ["writers"]
        else "The checkpoint writers (`astage.save` vs `dcp.async_save` and `torch.save`, "
        "time to a durable file) have a page of their own, "
        "[benchmarks-writers.md](benchmarks-writers.md), from "
        "`python -m benchmarks --only writers`.\n\n"
        "Replication across ranks (`astage.ReplicationStager` vs DCP's `_ReplicationStager`, "
        "2 gloo ranks on loopback, 256 MiB per rank) has a page of its own, "
        "[benchmarks-replication.md](benchmarks-replication.md), from "
        "`python -m benchmarks.replication`.\n\n"
        "Device-to-host staging on a GPU (against a raw pinned copy and DCP's DefaultStager) "
        "has a page of its own, [benchmarks-gpu.md](benchmarks-gpu.md), from "
        "`bash benchmarks/gpu_check.sh` on a GPU machine."
    )
    markdown = report.render_markdown(
        machine, results, images, total, title=title, see_also=see_also
    )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as out:
        out.write(markdown)
    report.write_json(args.json, machine, config, results)
    log(f"wrote {args.out}, {args.json}" + (f" and {len(images)} plots" if images else ""))
    met = [c.met for r in results for c in r.checks if c.met is not None]
    log(f"{sum(met)} of {len(met)} goals met; total {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
