"""The cyclic collector's time around DCP saves, in an application that froze its heap.

``python -m benchmarks.dcp_pool_gc [--tensors 50000] [--saves 20]``

DCP's ``async_save`` stages through a stager, hands the snapshot to an upload, and drops it once
written. Here, in one process and on the same optimizer-shaped state dict, astage's
``compat.DefaultStager`` and DCP's own ``DefaultStager`` take turns: each save stages, drops the
snapshot (the upload done), and lets the application allocate a little, as a training step
does. The heap was frozen (``gc.freeze()``) after the state dict was built, as before forking
workers. Every collection the interpreter runs is timed (``gc.callbacks``) and charged to the
contender whose save came just before: a collection holds the GIL, so it stalls training and
any event loop in the process for that long.

Why: a save whose snapshot is made of new objects leaves them to the young generations, where
astage cannot file them away in a frozen heap (see ``astage/_drivers/_gc.py``); astage's pool
hands the same tensors, dicts and lists out again each save (``astage/_core/_reuse.py``).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch.distributed.checkpoint import staging as dcp_staging

from astage import compat
from benchmarks.state_dicts import small_optimizer_state

APPLICATION_OBJECTS = 2000
"""Objects the application allocates (and drops) between two saves: a few young collections."""


@dataclass
class Charged:
    """What one contender's saves cost, collections included."""

    name: str
    save_s: list[float] = field(default_factory=list)
    collections: int = 0
    collected_s: list[float] = field(default_factory=list)

    def line(self) -> str:
        collected = self.collected_s or [0.0]
        median_ms = statistics.median(self.save_s) * 1e3
        return (
            f"{self.name}: {len(self.save_s)} saves, median {median_ms:.1f} ms a save;"
            f" {self.collections} collections, {sum(collected) * 1e3:.1f} ms in all,"
            f" longest {max(collected) * 1e3:.1f} ms"
        )


def _staged(stager: Any, state_dict: Any) -> Any:
    out = stager.stage(state_dict)
    return out.result() if hasattr(out, "result") else out


def charge(
    contenders: dict[str, Callable[[Any], Any]], state_dict: Any, saves: int, warmup: int = 3
) -> list[Charged]:
    """Save ``saves`` times with each contender in turn; the collections that follow a save
    are charged to it."""
    for stage in contenders.values():
        for _ in range(warmup):
            _ = stage(state_dict)
    charged = {name: Charged(name) for name in contenders}
    current: list[Charged] = []
    started = [0.0]

    def timed(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        elif current:
            current[0].collections += 1
            current[0].collected_s.append(time.perf_counter() - started[0])

    gc.callbacks.append(timed)
    try:
        for _ in range(saves):
            for name, stage in contenders.items():
                current[:] = [charged[name]]
                began = time.perf_counter()
                snapshot = stage(state_dict)
                charged[name].save_s.append(time.perf_counter() - began)
                del snapshot  # the upload is done
                application: list[list[int]] = [[] for _ in range(APPLICATION_OBJECTS)]
                del application
    finally:
        gc.callbacks.remove(timed)
    return list(charged.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tensors", type=int, default=50_000)
    parser.add_argument("--saves", type=int, default=20)
    args = parser.parse_args()
    state_dict = small_optimizer_state(args.tensors)
    options = dcp_staging.StagingOptions(False, False, False, False)
    ours, theirs = compat.DefaultStager(options), dcp_staging.DefaultStager(options)
    gc.collect()
    gc.freeze()
    contenders = {
        "astage compat.DefaultStager": lambda sd: _staged(ours, sd),
        "DCP DefaultStager": lambda sd: _staged(theirs, sd),
    }
    print(f"{args.tensors} tensors, heap frozen ({gc.get_freeze_count()} objects)", flush=True)
    for result in charge(contenders, state_dict, args.saves):
        print(result.line(), flush=True)
    ours.close()
    theirs.close()


if __name__ == "__main__":
    main()
