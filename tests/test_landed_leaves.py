"""stage_iter hands out landed tensors a bounded part at a time, each exactly once, in order.

A save's stage_iter over 20,000 small tensors ordered every leaf with a Python key and stepped
over every landed one in a Python loop, in one go on the event loop (4-5 ms): the run now
orders at most ``LEAF_STEP`` more leaves per call and finds the landed ones by bisection.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import astage
from astage._core import _run
from astage._core._plan import Leaf


def state(count: int, empty: bool) -> dict[str, Any]:
    tensors: dict[str, Any] = {"t": [torch.full((3,), float(i)) for i in range(count)]}
    if empty:
        tensors["e"] = torch.empty(0)  # needs no copy: out of copy order
    return tensors


def fake_run(last_copies: list[int], copies: int, landed: int) -> Any:
    """A run over leaves whose last copies are ``last_copies``, ``landed`` of ``copies`` in."""
    run: Any = _run.Run.__new__(_run.Run)
    plan: Any = type("P", (), {})()
    plan.leaves = [Leaf(("t", i), torch.zeros(1), copy) for i, copy in enumerate(last_copies)]
    plan.copies, plan.done = [None] * copies, False
    run.plan, run.landed = plan, landed
    run._leaves, run._last_copies, run._next_leaf = None, [], 0
    return run


@pytest.mark.asyncio
@pytest.mark.parametrize("cached", [False, True], ids=["first", "cached"])
@pytest.mark.parametrize("empty", [False, True], ids=["in-order", "an-empty-tensor"])
async def test_every_tensor_is_handed_out_once_in_small_parts(
    monkeypatch: pytest.MonkeyPatch, cached: bool, empty: bool
) -> None:
    monkeypatch.setattr(_run, "LEAF_STEP", 7)
    parts: list[int] = []
    real = _run.Run.landed_leaves

    def recorded(self: _run.Run[Any]) -> list[Leaf]:
        before = len(self._last_copies)
        leaves = real(self)
        parts.append(len(self._last_copies) - before)  # leaves ordered by this call
        return leaves

    monkeypatch.setattr(_run.Run, "landed_leaves", recorded)
    source = state(100, empty)
    async with astage.Stager() as stager:
        if cached:
            await stager.stage(source)
        parts.clear()
        seen: list[Any] = []
        async with stager.stage_iter(source) as landed:
            async for path, tensor in landed:
                seen.append(path)
                if path != ("e",):
                    assert tensor.tolist() == [float(path[1])] * 3
    expected = [("t", i) for i in range(100)] + ([("e",)] if empty else [])
    assert sorted(seen, key=str) == sorted(expected, key=str) and len(set(seen)) == len(seen)
    if not empty:  # ordered a part at a time (with the empty tensor, mended at once)
        assert max(parts) <= 7 and len([p for p in parts if p]) >= 100 // 7


def test_leaves_in_copy_order_are_ordered_a_part_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_run, "LEAF_STEP", 10)
    run = fake_run([i // 2 for i in range(100)], copies=50, landed=50)
    got: list[Leaf] = []
    sizes = []
    while part := run.landed_leaves():
        sizes.append(len(part))
        got.extend(part)
    assert got == run.plan.leaves and max(sizes) <= 10


def test_leaves_out_of_copy_order_are_sorted_before_they_are_handed_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_run, "LEAF_STEP", 4)
    order = [0, 1, 2, 3, 9, 5, -1, 7, 8, 4, 6, 10]
    run = fake_run(order, copies=11, landed=6)
    got: list[int] = []
    while part := run.landed_leaves():
        got.extend(leaf.last_copy for leaf in part)
    assert sorted(got) == [-1, 0, 1, 2, 3, 4, 5]  # everything under copy 6, once
    run.landed = 11
    while part := run.landed_leaves():
        got.extend(leaf.last_copy for leaf in part)
    assert sorted(got) == sorted(order) and len(got) == len(order)
