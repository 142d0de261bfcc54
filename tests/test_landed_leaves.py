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


def state(count: int) -> dict[str, Any]:
    return {"t": [torch.full((3,), float(i)) for i in range(count)], "e": torch.empty(0)}


@pytest.mark.asyncio
@pytest.mark.parametrize("cached", [False, True], ids=["first", "cached"])
async def test_every_tensor_is_handed_out_once_in_small_parts(
    monkeypatch: pytest.MonkeyPatch, cached: bool
) -> None:
    monkeypatch.setattr(_run, "LEAF_STEP", 7)
    parts: list[int] = []
    real = _run.Run.landed_leaves

    def recorded(self: _run.Run[Any]) -> list[Leaf]:
        leaves = real(self)
        parts.append(len(leaves))
        return leaves

    monkeypatch.setattr(_run.Run, "landed_leaves", recorded)
    source = state(100)
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
    assert sorted(seen, key=str) == sorted([("t", i) for i in range(100)] + [("e",)], key=str)
    assert len(set(seen)) == 101
    # Ordered a part at a time: no call handed out more than the part it ordered allows,
    # except where the order had to be mended at once (the empty tensor needs no copy).
    assert max(parts) <= 101 and len([p for p in parts if p]) > 1


def test_leaves_in_copy_order_are_ordered_a_part_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_run, "LEAF_STEP", 10)
    run: Any = _run.Run.__new__(_run.Run)
    plan: Any = type("P", (), {})()
    plan.leaves = [Leaf(("t", i), torch.zeros(1), i // 2) for i in range(100)]
    plan.copies = [None] * 50
    run.plan, run.landed = plan, 50
    run._leaves, run._last_copies, run._next_leaf = None, [], 0
    got: list[Leaf] = []
    sizes = []
    while part := run.landed_leaves():
        sizes.append(len(part))
        got.extend(part)
    assert got == plan.leaves and max(sizes) <= 10


def test_leaves_out_of_copy_order_are_sorted_before_they_are_handed_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_run, "LEAF_STEP", 4)
    run: Any = _run.Run.__new__(_run.Run)
    plan: Any = type("P", (), {})()
    order = [0, 1, 2, 3, 9, 5, -1, 7, 8, 4, 6, 10]
    plan.leaves = [Leaf(("t", i), torch.zeros(1), copy) for i, copy in enumerate(order)]
    plan.copies, plan.done = [None] * 11, False
    run.plan, run.landed, run._leaves, run._last_copies, run._next_leaf = plan, 6, None, [], 0
    got: list[int] = []
    while part := run.landed_leaves():
        got.extend(leaf.last_copy for leaf in part)
    assert sorted(got) == [-1, 0, 1, 2, 3, 4, 5]  # everything under copy 6, once
    run.landed = 11
    while part := run.landed_leaves():
        got.extend(leaf.last_copy for leaf in part)
    assert sorted(got) == sorted(order) and len(got) == len(order)
