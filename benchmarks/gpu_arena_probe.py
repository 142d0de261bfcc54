"""What a scatter-free gather of small device tensors would gain: ``python -m
benchmarks.gpu_arena_probe``.

astage gathers a batch of small device tensors into a device scratch, sends it to a host slab
in one transfer, and scatters the slab into each tensor's own buffer: the scatter is one
multi-tensor copy on the host, ~1 us a tensor on the H200 (docs/benchmarks-gpu.md). Without
it, the small buffers would lie side by side in one pinned arena, each with a storage of its
own (``torch.frombuffer`` over the arena, so that per-buffer use counts still tell who holds
what), and the transfer would land in them directly. This probe measures, on the same 10,002
tensors, with every view and buffer made once:

- ``scatter``: gather, one transfer into a pinned slab, one multi-tensor scatter into a host
  tensor per source (the floor of astage's path today, the ``gpu`` scenario's raw gather);
- ``arena``: gather, one transfer straight into the arena's pieces (pinned);
- ``arena, pageable``: the same into an arena of ordinary memory (what a transfer costs when
  the arena is not page-locked);

and checks what the design needs: that a piece made by ``torch.frombuffer`` over a pinned
tensor has a storage of its own, at the arena's address, seen as pinned, with the transferred
bytes in it.
"""

from __future__ import annotations

import sys
import time
from statistics import median
from typing import Any

import torch

from .contenders import flat_tensors
from .scenarios.gpu import (
    GPU_SMALL_TENSORS,
    _to_device,
    aligned_offsets,
    gathers_by_dtype,
    synchronize,
    typed_piece,
)
from .state_dicts import small_optimizer_state

ALIGNMENT = 16
"""Bytes each piece is aligned to: what CUDA's vectorised multi-tensor copy needs."""
ROUNDS = 15


def _pieces(
    arena: torch.Tensor, offsets: list[int], like: list[torch.Tensor]
) -> list[torch.Tensor]:
    """One tensor per source over the arena's memory, each on a storage of its own."""
    array = arena.numpy()  # the buffer protocol; the pieces keep it (and the arena) alive
    return [
        torch.frombuffer(array, dtype=torch.uint8, count=t.nbytes, offset=o)
        .view(t.dtype)
        .view(t.shape)
        if t.nbytes
        else torch.empty(t.shape, dtype=t.dtype)
        for o, t in zip(offsets, like, strict=True)
    ]


def _timed(call: Any, device: torch.device) -> float:
    times = []
    for _ in range(ROUNDS):
        synchronize(device)
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return median(times)


def probe(count: int, device: torch.device) -> dict[str, Any]:
    """The three paths' medians (seconds) and the design's checks, on ``count`` small tensors."""
    sources = flat_tensors(_to_device(small_optimizer_state(count), device))
    synchronize(device)
    pin = device.type != "cpu"
    offsets, total = aligned_offsets(sources, ALIGNMENT)
    scratch = torch.empty(total, dtype=torch.uint8, device=device)
    gathers = gathers_by_dtype(scratch, offsets, sources)
    slab = torch.empty(total, dtype=torch.uint8, pin_memory=pin)
    slab_views = [typed_piece(slab, o, s) for o, s in zip(offsets, sources, strict=True)]
    targets = [torch.empty_like(s, device="cpu") for s in sources]
    arena = torch.empty(total, dtype=torch.uint8, pin_memory=pin)
    pieces = _pieces(arena, offsets, sources)
    pageable = torch.empty(total, dtype=torch.uint8)

    def gather() -> None:
        for views, srcs in gathers:
            torch._foreach_copy_(views, srcs)

    def scatter_path() -> None:
        gather()
        slab.copy_(scratch, non_blocking=pin)
        synchronize(device)
        torch._foreach_copy_(targets, slab_views)

    def arena_path() -> None:
        gather()
        arena.copy_(scratch, non_blocking=pin)
        synchronize(device)

    def pageable_path() -> None:
        gather()
        pageable.copy_(scratch, non_blocking=pin)
        synchronize(device)

    with torch.no_grad():
        seconds = {
            "scatter": _timed(scatter_path, device),
            "arena": _timed(arena_path, device),
            "arena, pageable": _timed(pageable_path, device),
        }
        arena_path()
    base = arena.data_ptr()
    storages = {p.untyped_storage().data_ptr() for p in pieces if p.nbytes}
    checks = {
        "pieces at the arena's offsets": all(
            p.data_ptr() == base + o for p, o in zip(pieces, offsets, strict=True) if p.nbytes
        ),
        "a storage each": len(storages) == sum(1 for p in pieces if p.nbytes),
        "pieces seen as pinned": (not pin) or all(p.is_pinned() for p in pieces if p.nbytes),
        "every value landed": all(
            torch.equal(p, s.cpu()) for p, s in zip(pieces, sources, strict=True)
        ),
        "scatter path correct": all(
            torch.equal(t, s.cpu()) for t, s in zip(targets, sources, strict=True)
        ),
    }
    return {"tensors": len(sources), "nbytes": total, "seconds": seconds, "checks": checks}


def main() -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = probe(GPU_SMALL_TENSORS, device)
    print(f"{report['tensors']:,} small tensors on {device}, {report['nbytes'] / 2**20:.2f} MiB")
    for name, seconds in report["seconds"].items():
        per_tensor = seconds / report["tensors"] * 1e6
        print(f"  {name:16s} {seconds * 1e3:7.2f} ms  ({per_tensor:.2f} us/tensor)")
    for name, ok in report["checks"].items():
        print(f"  {'ok ' if ok else 'NO '} {name}")
    return 0 if all(report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
