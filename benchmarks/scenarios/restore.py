"""The ``restore`` scenario (issue 10, item 7): filling existing tensors from a checkpoint.

Every contender ends with the file's values in the **same** tensors (``into``: a state dict of
the same structure that the trainer already holds), as a resume does:

- ``astage.load(path, into=sd)``: positioned reads straight into ``sd``'s tensors;
- ``astage.load_async(path, into=sd)``: the same, awaited on the event loop;
- ``astage.load(path)``: fresh tensors (context: what a restore saves);
- ``torch.load`` of a ``torch.save`` of the same state (``weights_only=True``), then a
  ``copy_`` of each tensor into ``sd`` (what ``load_state_dict`` does);
- the same with ``mmap=True`` (the copy is then what reads the file);
- ``dcp.load(sd, ...)`` of a ``dcp.save`` of the same state (DCP restores in place too), with
  its ``FileSystemReader``, in this one process (no process group).

The files are written once, before the clock, and read once untimed. Then every contender is
timed from the page cache (warm: the loaders' own cost), then again with its files dropped from
the page cache before each call (cold: ``posix_fadvise(DONTNEED)`` on these files only, as after
a reboot; the disk counts).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

import astage
from astage._files import _restore as astage_restore
from astage._files._safetensors import read_exactly, tensor_memoryview

from ..config import Config, Data
from ..record import Check, ScenarioResult, Table, fmt_bytes, fmt_gbps, fmt_s
from ..runner import LoopRunner
from ..state_dicts import describe, gpt2_with_adamw, map_tensors, tensor_leaves
from ..timing import level_heap, median, rotate

RESTORE = "astage.load(into=)"
RESTORE_ASYNC = "astage.load_async(into=)"
FRESH = "astage.load (fresh tensors)"
TORCH = "torch.load + copy_"
TORCH_MMAP = "torch.load(mmap=True) + copy_"
DCP = "dcp.load (in place)"
READ = "the file read alone (one thread)"
NAMES = [RESTORE, RESTORE_ASYNC, FRESH, TORCH, TORCH_MMAP, DCP, READ]

READ_PIECE = 32 << 20
"""Bytes per ``preadv`` of the floor's sequential read."""
ARGUED_OVER_READ = 1.1
"""A cold restore within this factor of the file's plain read is argued as bound by the disk."""


def copy_into(into: Any, loaded: Any) -> None:
    """``copy_`` each tensor of ``loaded`` into the tensor at the same path of ``into``."""
    with torch.no_grad():
        for (_, target), (_, source) in zip(
            tensor_leaves(into), tensor_leaves(loaded), strict=True
        ):
            target.copy_(source)


class Session:
    """The three files of one state dict, and the target they are restored into."""

    def __init__(self, state_dict: Any, runner: LoopRunner) -> None:
        self.runner = runner
        self.root = tempfile.mkdtemp(prefix="astage-bench-restore-")
        self.astage_path = os.path.join(self.root, "ckpt.safetensors")
        self.torch_path = os.path.join(self.root, "ckpt.pt")
        self.dcp_path = os.path.join(self.root, "ckpt-dcp")
        astage.save_sync(state_dict, self.astage_path)
        torch.save(state_dict, self.torch_path)
        dcp_save(state_dict, checkpoint_id=self.dcp_path, no_dist=True)
        os.sync()  # written back now: evict() can then drop the files' pages
        self.into = map_tensors(state_dict, torch.empty_like)  # the trainer's tensors
        self.expected = state_dict
        self.read_into = torch.ones(os.path.getsize(self.astage_path), dtype=torch.uint8)

    def read_file(self) -> None:
        """The disk's pace: astage's file read front to back into memory of its own, on one thread,
        without parsing or copying anything: what the disk (or the page cache) allows."""
        view = tensor_memoryview(self.read_into)
        fd = os.open(self.astage_path, os.O_RDONLY)
        try:
            for offset in range(0, len(view), READ_PIECE):
                read_exactly(fd, view[offset : offset + READ_PIECE], offset, self.astage_path)
        finally:
            os.close(fd)

    def evict(self) -> None:
        """Drop this session's files from the page cache (theirs only), for a cold read."""
        files = [self.astage_path, self.torch_path]
        files += [os.path.join(self.dcp_path, name) for name in os.listdir(self.dcp_path)]
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def run(self, name: str) -> float:
        into = self.into
        calls: dict[str, Callable[[], object]] = {
            RESTORE: lambda: astage.load(self.astage_path, into=into),
            RESTORE_ASYNC: lambda: self.runner.run(astage.load_async(self.astage_path, into=into)),
            FRESH: lambda: astage.load(self.astage_path),
            TORCH: lambda: copy_into(into, torch.load(self.torch_path, weights_only=True)),
            TORCH_MMAP: lambda: copy_into(
                into, torch.load(self.torch_path, weights_only=True, mmap=True)
            ),
            DCP: lambda: dcp_load(into, checkpoint_id=self.dcp_path, no_dist=True),
            READ: self.read_file,
        }
        started = time.perf_counter()
        result = calls[name]()
        seconds = time.perf_counter() - started
        del result
        level_heap()
        return seconds

    def check(self) -> None:
        """The last restore left the saved values in ``into`` (else the figures are void)."""
        for (path, got), (_, want) in zip(
            tensor_leaves(self.into), tensor_leaves(self.expected), strict=True
        ):
            if not torch.equal(got, want):
                raise AssertionError(f"restore benchmark: {path} differs after the restores")

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _measure(
    state_dict: Any, config: Config, runner: LoopRunner
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Each contender's times from the page cache (warm), then from the disk (cold)."""
    warm: dict[str, list[float]] = {name: [] for name in NAMES}
    cold: dict[str, list[float]] = {name: [] for name in NAMES}
    level_heap()
    session = Session(state_dict, runner)
    try:
        for name in NAMES:  # untimed: the files come into the page cache, the target is touched
            session.run(name)
        for repeat in range(config.repeats):
            for name in rotate(NAMES, repeat):
                warm[name].append(session.run(name))
        session.check()
        for repeat in range(config.repeats):
            for name in rotate(NAMES, repeat):
                session.evict()
                cold[name].append(session.run(name))
        session.check()
    finally:
        session.close()
    level_heap()
    return warm, cold


def _paired(times: dict[str, list[float]], other: str) -> tuple[float, ...]:
    """Per repeat, ``other``'s time over the restore's (> 1: the restore is faster)."""
    return tuple(o / r for o, r in zip(times[other], times[RESTORE], strict=True))


def _checks(label: str, times: dict[str, list[float]], *, cold: bool) -> list[Check]:
    restore = median(times[RESTORE])
    checks = []
    for other, goal in ((TORCH, True), (TORCH_MMAP, True), (DCP, True), (FRESH, None)):
        rounds = _paired(times, other)
        ratio = median(list(rounds))
        why = ""
        if cold and goal and max(rounds) >= 1.0:
            why = _why_cold(times, other, rounds)
        elif other == TORCH_MMAP and max(rounds) >= 1.0:
            why = _WHY_WARM
        checks.append(
            Check(
                f"{label}: {RESTORE} vs {other}",
                fmt_s(restore),
                fmt_s(median(times[other])),
                ratio,
                ">= 1x" if goal else "(context)",
                ratio >= 1.0 if goal else None,
                rounds,
                why,
            )
        )
    checks.append(
        Check(
            f"{label}: {RESTORE} vs {READ}",
            fmt_s(restore),
            fmt_s(median(times[READ])),
            median(list(_paired(times, READ))),
            "(context)",
            None,
            _paired(times, READ),
        )
    )
    return checks


_WHY_WARM = (
    "Both move each byte once into the same tensors, astage with preadv from the file, torch "
    "through a mapping of it and copy_: from the page cache that is a memory copy either way, "
    "and the repeats straddle 1x, their spread wider than the difference between the two."
)


def _why_cold(times: dict[str, list[float]], other: str, rounds: tuple[float, ...]) -> str:
    """A cold restore that straddles 1x against another loader: argued where astage already
    reads at the disk's pace (within :data:`ARGUED_OVER_READ` of the file read alone)."""
    restore, read, theirs = (median(times[name]) for name in (RESTORE, READ, other))
    if restore > ARGUED_OVER_READ * read:
        return ""
    return (
        "Cold, each contender reads every byte from the disk once, and the disk sets the pace: "
        f"astage's file read alone, front to back into memory of its own (no parsing, no "
        f"copy; timed in the same rotation), took {fmt_s(read)}; astage.load(into=) took "
        f"{fmt_s(restore)} ({restore / read:.2f}x that read) and {other} "
        f"{fmt_s(theirs)} ({theirs / read:.2f}x). The repeats straddle 1x "
        f"({min(rounds):.2f}x to {max(rounds):.2f}x): being faster than {other} here would "
        "need reading faster than the disk gives."
    )


def _table(
    label: str, times: dict[str, list[float]], nbytes: int, repeats: int, cache: str
) -> Table:
    restore = median(times[RESTORE])
    rows = []
    for name, values in times.items():
        spread = f"{min(values) * 1e3:.1f}-{max(values) * 1e3:.1f} ms"
        rows.append(
            [
                name,
                fmt_s(median(values)),
                spread,
                fmt_gbps(nbytes, median(values)),
                f"{median(values) / restore:.2f}x",
            ]
        )
    return Table(
        f"{label}: seconds until the file's values are in the trainer's tensors "
        f"(medians over {repeats} repeats, {cache})",
        ["contender", "median", "min-max", "GB/s", "vs astage.load(into=)"],
        rows,
    )


def restore(config: Config, data: Data, runner: LoopRunner) -> ScenarioResult:
    """Restore time: astage.load(into=) vs torch.load (+copy_, mmap or not) and dcp.load."""
    result = ScenarioResult(
        "restore",
        "Restoring a checkpoint into existing tensors: astage.load(into=) vs torch.load and "
        "dcp.load",
        "Each contender ends with the saved values in the same preallocated state dict (the "
        "trainer's tensors): astage reads its safetensors file with positioned reads straight "
        "into them; torch.load (weights_only, with and without mmap) loads fresh tensors that "
        "are then copied in with copy_ (as load_state_dict does); dcp.load fills the state "
        "dict in place from a dcp.save folder (FileSystemReader, no process group). The last "
        "row reads astage's file alone, front to back on one thread in "
        f"{fmt_bytes(READ_PIECE)} reads, into memory of its own. Files are "
        f"on local disk (`{tempfile.gettempdir()}`), written before the clock and read once "
        "untimed. Warm: all contenders read from the page cache (the loaders' own cost). "
        "Cold: before each call the files of all contenders are dropped from the page cache "
        "(`posix_fadvise(DONTNEED)` on those files only), so each reads from the disk, as "
        "after a reboot. Contenders alternate in order from repeat to repeat; ratios are "
        "medians over repeats of the ratio within a repeat.",
    )
    gpt = gpt2_with_adamw(config.dcp_layers, config.dcp_width, config.dcp_vocab)
    shapes = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        warnings.filterwarnings("ignore", category=UserWarning, module="torch.distributed")
        gpt_shape = describe(gpt)
        gpt_label = f"GPT-2-like + AdamW ({fmt_bytes(gpt_shape.nbytes)})"
        shapes.append((gpt_label, *_measure(gpt, config, runner), gpt_shape, "gpt"))
        del gpt
        level_heap()
        bulk = data.bulk()
        bulk_shape = describe(bulk)
        bulk_label = f"{fmt_bytes(bulk_shape.nbytes)} in {bulk_shape.tensors} tensors"
        shapes.append((bulk_label, *_measure(bulk, config, runner), bulk_shape, "bulk"))
    for label, warm, cold, shape, key in shapes:
        result.checks += _checks(label, warm, cold=False)
        result.checks += _checks(f"{label}, cold", cold, cold=True)
        result.tables.append(_table(label, warm, shape.nbytes, config.repeats, "warm page cache"))
        result.tables.append(
            _table(label, cold, shape.nbytes, config.repeats, "cold: files evicted first")
        )
        result.figures[key] = {
            "shape": {"tensors": shape.tensors, "nbytes": shape.nbytes},
            "times_s": warm,
            "cold_times_s": cold,
        }
    result.notes.append(
        f"astage reads with {astage_restore.READ_THREADS} threads in pieces of "
        f"{fmt_bytes(astage_restore.PIECE_BYTES)} on this {os.cpu_count()}-core "
        "machine; torch.load(mmap=True) alone only maps the file: its cost is paid by the "
        "copy_, which faults the pages in one by one on one thread."
    )
    return result
