"""Staging beside a Python thread that keeps the interpreter busy (the GIL convoy).

``python -m benchmarks.busy_thread [--params 1000] [--rounds 3] [--switch-interval S]``

A training program often runs Python in another thread while a checkpoint is staged: a data
loader's pin-memory thread, a logger, or the training loop itself beside an event loop in a
thread of its own. Every torch operator call drops the GIL while it runs in C++ (``empty_like``,
``detach``, ``copy_``: anything that goes through the dispatcher), and a thread that was
waiting for the GIL may take it then and keep it for a whole switch interval
(``sys.getswitchinterval()``, 5 ms by default) before it is asked to give it back. A stager that
makes a few such calls per tensor can then lose milliseconds per tensor.

Here astage's ``SyncStager`` and DCP's ``StateDictStager`` stage the same optimizer-shaped
state dict (``--params`` parameters, three tensors each), first call and second call, in
rounds that alternate which goes first, with a thread counting in a Python loop meanwhile;
then the same once more with that thread stopped, as the quiet reference. No goal is set: the
figures describe how far the convoy reaches on this machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch.distributed.checkpoint._state_dict_stager import StateDictStager

import astage
from benchmarks.state_dicts import small_optimizer_state
from benchmarks.timing import timed


@dataclass
class Calls:
    """One contender's first and second calls, in seconds, over the rounds."""

    name: str
    first_s: list[float] = field(default_factory=list)
    second_s: list[float] = field(default_factory=list)

    def line(self, label: str) -> str:
        first = statistics.median(self.first_s) * 1e3
        second = statistics.median(self.second_s) * 1e3
        spread = ", ".join(f"{x * 1e3:.0f}" for x in self.first_s)
        return (
            f"{label:>5} {self.name:<24} first {first:9.1f} ms (each: {spread})"
            f"  second {second:9.1f} ms"
        )


@contextmanager
def busy_thread() -> Iterator[None]:
    """A thread that runs Python (and so wants the GIL) until the block exits."""
    stop = threading.Event()

    def count() -> None:
        n = 0
        while not stop.is_set():
            n += 1

    thread = threading.Thread(target=count, name="busy", daemon=True)
    thread.start()
    time.sleep(0.05)  # running before the first call starts
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _astage_calls(state_dict: Any) -> tuple[float, float]:
    with astage.SyncStager() as stager:
        first = timed(lambda: stager.stage(state_dict))
        second = timed(lambda: stager.stage(state_dict))
    return first, second


def _dcp_calls(state_dict: Any) -> tuple[float, float]:
    stager = StateDictStager()
    first = timed(lambda: stager.stage(state_dict))
    second = timed(lambda: stager.stage(state_dict))
    return first, second


CONTENDERS: dict[str, Callable[[Any], tuple[float, float]]] = {
    "astage SyncStager": _astage_calls,
    "DCP StateDictStager": _dcp_calls,
}


def measure(state_dict: Any, rounds: int, *, busy: bool) -> list[Calls]:
    """Every contender's calls over ``rounds``, the order alternating from round to round."""
    calls = {name: Calls(name) for name in CONTENDERS}
    names = list(CONTENDERS)
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            if busy:
                with busy_thread():
                    first, second = CONTENDERS[name](state_dict)
            else:
                first, second = CONTENDERS[name](state_dict)
            calls[name].first_s.append(first)
            calls[name].second_s.append(second)
    return list(calls.values())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=int, default=1000, help="parameters (3 tensors each)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--switch-interval",
        type=float,
        default=None,
        help="sys.setswitchinterval() for the run (default: leave it, 5 ms)",
    )
    args = parser.parse_args(argv)
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    state_dict = small_optimizer_state(args.params)
    interval_ms = sys.getswitchinterval() * 1e3
    print(
        f"{args.params * 3 + 1:,} tensors; switch interval {interval_ms:g} ms; "
        f"{args.rounds} rounds; medians"
    )
    for busy in (True, False):
        for calls in measure(state_dict, args.rounds, busy=busy):
            print(calls.line("busy" if busy else "quiet"))


if __name__ == "__main__":
    main()
