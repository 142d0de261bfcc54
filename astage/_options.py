"""StagingOptions: what the user asks for, and the concrete settings it resolves to."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import torch

from ._errors import InvalidOptionsError

_MiB = 1 << 20


def cuda_available() -> bool:
    """Whether CUDA can be used; False on CPU-only builds, never a warning."""
    return torch.cuda.is_available()


def accelerator_available() -> bool:
    """Whether an accelerator that astage's device layer serves is present (CUDA, XPU, MPS, HPU,
    a PrivateUse1 device: ``torch.accelerator``); never a warning.

    Initialises no device: ``torch.accelerator.is_available`` asks the device module's own
    ``is_available`` (CUDA's counts devices without creating a context), and a build without an
    accelerator answers False at once.
    """
    return torch.accelerator.is_available()


@dataclass(frozen=True, kw_only=True)
class StagingOptions:
    """How a stager copies a state dict to host memory.

    ``None`` for ``pin_memory`` and ``non_blocking`` means "decide for me": on when an
    accelerator (``torch.accelerator``: CUDA, XPU, MPS, ...) is available, off otherwise.
    """

    pin_memory: bool | None = None
    """Page-lock (``cudaHostRegister``) host buffers so device copies run at full link speed.

    Only buffers whose source is on a device whose copies gain from it are pinned (CUDA's), and
    never those of CPU sources: ``True`` without CUDA is accepted and pins nothing, so the same
    code runs on a laptop and on a GPU node."""

    share_memory: bool = False
    """Allocate host buffers in shared memory, so another process (a writer) can map them."""

    non_blocking: bool | None = None
    """Enqueue device-to-host copies asynchronously on a staging stream. ``True`` needs an
    accelerator."""

    pin_memory_min_bytes: int = 64 * 1024
    """Buffers smaller than this are never pinned: registering them costs more than it saves."""

    chunk_bytes: int = 64 * _MiB
    """Most bytes one copy task moves: large tensors are split, small ones are batched up to it."""

    max_inflight_bytes: int = 512 * _MiB
    """Most bytes of device copies enqueued and not yet known to be complete."""

    copy_threads: int = 0
    """Host copies the async stager runs at once, each in an anyio worker thread (the tokens of
    its host :class:`anyio.CapacityLimiter`); 0 means one per core but one (1 to 4).

    Host copies are memory-bound (and torch parallelizes a large copy by itself), so fewer
    workers cost little bandwidth and leave the event loop a core."""

    max_loop_hold_s: float = 0.0005
    """Longest stretch the async stager keeps the event loop before it yields."""

    buffers: int = 1
    """Buffer sets the stager stages into, in turn. A set leased by a snapshot (or a buffer
    hold) is never staged into: with 1, the next call waits for the release; with N, it takes
    another free set and waits only when all N are leased. Host memory: up to ``buffers`` x the
    staged bytes (each set is allocated when first used, then reused)."""

    huge_pages: bool | None = False
    """Allocate host buffers of 2 MiB or more on transparent huge pages (``madvise``), which
    the kernel maps 2 MiB at a time: a first call into fresh memory runs up to 3x faster where
    the machine has huge pages at hand. ``None`` lets a one-off probe (per process, ~10-150 ms,
    at the first large allocation) decide; off by default, because on some VMs freed huge pages
    go back to the host within seconds and populating them again costs several times more.
    Ignored with ``share_memory=True`` and where the kernel offers no transparent huge pages."""

    pause_gc: bool = True
    """Pause the cyclic garbage collector during the walk, and file the call's new objects
    into the oldest generation afterwards, so that collections neither slow the walk down nor
    stall the loop after it. ``False`` leaves the collector alone."""

    replay: bool = True
    """Record a state dict's structure while a call walks it, so that later calls over the
    same structure replay it (checked in bulk) instead of walking it again. Recording makes a
    first call over many small tensors about a third longer, and is only worth it when
    the stager stages again: ``False`` skips it, and every call walks in full. ``astage.save``
    and ``astage.save_sync`` turn it off in the stager they make when given none."""

    def __post_init__(self) -> None:
        for name in ("pin_memory", "non_blocking", "huge_pages"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise InvalidOptionsError(f"{name} must be True, False or None, got {value!r}")
        for name in ("share_memory", "pause_gc", "replay"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise InvalidOptionsError(f"{name} must be a bool, got {value!r}")
        for name in ("pin_memory_min_bytes", "copy_threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidOptionsError(f"{name} must be a non-negative int, got {value!r}")
        for name in ("chunk_bytes", "max_inflight_bytes", "buffers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InvalidOptionsError(f"{name} must be a positive int, got {value!r}")
        if self.max_inflight_bytes < self.chunk_bytes:
            raise InvalidOptionsError("max_inflight_bytes must be at least chunk_bytes")
        hold = self.max_loop_hold_s
        # Finite too: with inf the async face never yielded during a walk, holding the event
        # loop for the whole call, which this option exists to bound.
        if not isinstance(hold, (int, float)) or isinstance(hold, bool) or not 0 < hold < math.inf:
            raise InvalidOptionsError(
                f"max_loop_hold_s must be a positive, finite number of seconds, got {hold!r}"
            )

    def replace(self, **changes: object) -> StagingOptions:
        """A copy with some fields changed (unknown names are an error)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise InvalidOptionsError(f"unknown staging options: {sorted(unknown)}")
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def resolve(self) -> ResolvedOptions:
        """Turn the auto flags into booleans for this machine; refuse impossible requests."""
        has_accelerator = accelerator_available()
        if self.non_blocking and not has_accelerator:
            raise InvalidOptionsError(
                "non_blocking=True needs an accelerator (torch.accelerator), and none is "
                "available; leave it as None to decide automatically"
            )
        # Leave a core to the event loop: copies are memory-bound, so one thread less costs
        # little bandwidth, while a loop that competes for a core shows lag.
        threads = self.copy_threads or max(1, min(4, (os.cpu_count() or 1) - 1))
        return ResolvedOptions(
            # True stays True without an accelerator: the device layer pins only buffers of
            # sources whose backend asks for it, and there are none then.
            pin_memory=has_accelerator if self.pin_memory is None else self.pin_memory,
            share_memory=self.share_memory,
            non_blocking=has_accelerator if self.non_blocking is None else self.non_blocking,
            pin_memory_min_bytes=self.pin_memory_min_bytes,
            chunk_bytes=self.chunk_bytes,
            max_inflight_bytes=self.max_inflight_bytes,
            copy_threads=threads,
            max_loop_hold_s=self.max_loop_hold_s,
            pause_gc=self.pause_gc,
            replay=self.replay,
            buffers=self.buffers,
            huge_pages=self.huge_pages,
        )


@dataclass(frozen=True)
class ResolvedOptions:
    """StagingOptions with every automatic choice made; what the core reads."""

    pin_memory: bool
    share_memory: bool
    non_blocking: bool
    pin_memory_min_bytes: int
    chunk_bytes: int
    max_inflight_bytes: int
    copy_threads: int
    max_loop_hold_s: float
    pause_gc: bool
    replay: bool = True
    buffers: int = 1
    huge_pages: bool | None = False
    """None: decided by the arena's probe at the first large allocation (see ``_core._arena``)."""


def make_options(options: StagingOptions | None, overrides: dict[str, object]) -> StagingOptions:
    """The options a stager was built with: the given ones (or defaults) plus keyword overrides."""
    base = options if options is not None else StagingOptions()
    if not isinstance(base, StagingOptions):
        raise InvalidOptionsError(f"expected astage.StagingOptions, got {type(base).__name__}")
    return base.replace(**overrides) if overrides else base
