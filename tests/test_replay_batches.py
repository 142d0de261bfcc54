"""Batches cut from a replayed call: ``make_batches`` finds runs of small copies in bulk.

A replay hands the plan tens of thousands of small copies at once; cutting them one Python step
per copy cost 17-21 ms for 50,000. The bulk search must cut exactly where the copy-by-copy rule
does: at ``chunk_bytes``, at ``MAX_BATCH_COPIES`` copies, at a change of device, and around a
copy of ``chunk_bytes`` or more (sliced on its own).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from astage._core._batches import MAX_BATCH_COPIES, make_batches
from astage._core._plan import Copies


def reference(copies: Any, start: int, stop: int, chunk_bytes: int) -> Iterator[tuple[Any, ...]]:
    """The copy-by-copy rule, as ``make_batches`` was written before the bulk search:
    ``(first, end, nbytes)`` of each gathered batch, ``("slices", index)`` for a large copy."""
    buffers = copies.buffers
    first = start
    gathered = 0
    device = None
    for index in range(start, stop):
        buffer = buffers[index]
        nbytes = buffer.nbytes
        if first < index and (
            nbytes >= chunk_bytes
            or gathered + nbytes > chunk_bytes
            or index - first >= MAX_BATCH_COPIES
            or buffer.device != device
        ):
            yield (first, index, gathered)
            first, gathered = index, 0
        if nbytes >= chunk_bytes:
            yield ("slices", index)
            first = index + 1
            continue
        if first == index:
            device = buffer.device
        gathered += nbytes
    if first < stop:
        yield (first, stop, gathered)


def cut(copies: Copies, start: int, stop: int, chunk_bytes: int) -> list[tuple[Any, ...]]:
    """What ``make_batches`` did, in the reference's terms."""
    out: list[tuple[Any, ...]] = []
    index = {id(src): i for i, src in enumerate(copies.srcs)}
    for batch in make_batches(copies, start, stop, chunk_bytes):
        src = batch.srcs[0]
        first = index.get(id(src))
        if first is None:  # a slice of a large copy: a view, not one of the plan's sources
            where = src.untyped_storage().data_ptr()
            large = next(
                i for i, s in enumerate(copies.srcs) if s.untyped_storage().data_ptr() == where
            )
            if not out or out[-1] != ("slices", large):
                out.append(("slices", large))
            continue
        assert batch.end == first + len(batch.srcs)
        assert [id(s) for s in batch.srcs] == [id(s) for s in copies.srcs[first : batch.end]]
        assert all(b.device == batch.device for b in batch.buffers)
        out.append((first, batch.end, batch.nbytes))
    return out


def plan_of(sizes: list[int], devices: list[str]) -> Copies:
    copies = Copies()
    for nbytes, device in zip(sizes, devices, strict=True):
        src = torch.empty(max(nbytes, 1), dtype=torch.uint8)[:nbytes]
        buffer: Any = SimpleNamespace(nbytes=nbytes, device=torch.device(device))
        copies.add(src, src, buffer)
    return copies


@pytest.mark.parametrize("seed", range(40))
def test_bulk_cuts_match_the_copy_by_copy_rule(seed: int) -> None:
    rng = random.Random(seed)
    count = rng.choice([1, 5, 300, MAX_BATCH_COPIES + 7, 3 * MAX_BATCH_COPIES])
    chunk_bytes = rng.choice([64, 1000, 1 << 20])
    small = rng.choice([0, 1, 8, 64, 512])
    sizes = [rng.randint(0, small) for _ in range(count)]
    for _ in range(rng.randint(0, 3)):  # a few large copies, sliced on their own
        sizes[rng.randrange(count)] = chunk_bytes + rng.randint(0, 3 * chunk_bytes)
    devices = ["cpu"] * count
    if rng.random() < 0.5:  # a change of device somewhere
        for index in rng.sample(range(count), min(count, 3)):
            devices[index] = "meta"
    copies = plan_of(sizes, devices)
    start = rng.randint(0, count // 3)
    stop = rng.randint(start, count)
    assert cut(copies, start, stop, chunk_bytes) == list(
        reference(copies, start, stop, chunk_bytes)
    )
