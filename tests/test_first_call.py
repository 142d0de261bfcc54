"""A first call: plain tensors take the lean path (TensorStager._fresh), everything else the
general one, and both leave the cache as a cached call expects it."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch
from conftest import Driver

from astage._core._cache import BufferCache
from astage._core._plan import Plan
from astage._core._recording import ReplayRecorder
from astage._core._replay import walk_or_replay
from astage._core._tables import LEAD_AFTER
from astage._core._tensors import TensorStager
from astage._core._walk import build_plan


def _walk(cache: BufferCache, state_dict: object) -> Plan:
    walk = build_plan(cache, state_dict)
    try:
        while True:
            next(walk)
    except StopIteration as stop:
        plan: Plan = stop.value
        return plan


def _copy(plan: Plan) -> None:
    """What a driver does with the plan's copies."""
    for src, dst in zip(plan.copies.srcs, plan.copies.dsts, strict=True):
        dst.copy_(src)


def _cache() -> BufferCache:
    return BufferCache(pin_memory=False, share_memory=False, pin_memory_min_bytes=0)


def test_plain_tensors_get_their_twin_as_the_buffers_private_view() -> None:
    sd = {"a": torch.randn(4, 3), "b": torch.tensor(2.0), "c": torch.arange(6)}
    cache = _cache()
    plan = _walk(cache, sd)
    assert plan.new_buffers == 3 and len(plan.copies) == 3
    for key, source in sd.items():
        buffer = cache.get(source.untyped_storage())
        assert buffer is not None and buffer.view is not None
        staged = plan.result[key]
        assert staged is not buffer.view  # handed out: a tensor of its own on the same memory
        assert staged.data_ptr() == buffer.view.data_ptr()
        assert (staged.dtype, staged.shape, staged.stride()) == (
            source.dtype,
            source.shape,
            source.stride(),
        )
        assert (buffer.view_dtype, buffer.view_shape) == (source.dtype, source.shape)


@pytest.mark.parametrize(
    "source",
    [
        torch.ones(3, 1).as_strided((3, 1), (1, 5)),  # a size-1 dimension, other strides
        torch.zeros(0, 4),  # no bytes
        torch.tensor([True, False]),  # bool: copied as bytes
        torch.randn(4, 4).t(),  # not contiguous
        torch.randn(8)[2:],  # a view past the start of its storage
        torch.randn(3, dtype=torch.complex64).conj(),
    ],
    ids=["size-1 strided", "empty", "bool", "transposed", "offset", "conj"],
)
def test_other_tensors_take_the_general_path(source: torch.Tensor) -> None:
    cache = _cache()
    plan = _walk(cache, {"x": source})
    buffer = cache.get(source.untyped_storage())
    assert buffer is not None and buffer.view is None  # no reusable twin for these
    staged = plan.result["x"]
    assert (staged.shape, staged.stride(), staged.storage_offset()) == (
        source.shape,
        source.stride(),
        source.storage_offset(),
    )


@pytest.mark.parametrize("shape", [(3, 1), (1,), (2, 1, 3, 3), (1, 1, 4)])
def test_a_size_1_dimension_gets_a_view_whose_strides_the_next_calls_compare(
    shape: tuple[int, ...],
) -> None:
    # A size-1 dimension may have any stride in a contiguous tensor, so such tensors took the
    # general path, with byte copies, on every call (a depthwise convolution's (C, 1, k, k)
    # weight; a cached call over 50,000 (1,) tensors took 4.6x one over (4,) ones). Now they
    # get a view when they have torch.empty's strides, which the next calls compare.
    source = torch.randn(shape)
    cache = _cache()
    plan = _walk(cache, {"x": source})
    buffer = cache.get(source.untyped_storage())
    assert buffer is not None and buffer.view is not None
    assert buffer.view_strides == source.stride()
    (dst,) = plan.copies.dsts
    assert dst is buffer.view  # copied as itself, not as bytes
    again = _walk(cache, {"x": source})
    (dst,) = again.copies.dsts
    assert dst is buffer.view and again.new_buffers == 0
    _copy(again)
    assert torch.equal(again.result["x"], source)
    # The same storage, shape and dtype, contiguous too, with other strides for the size-1
    # dimensions: staged with its own strides, through the bytes.
    odd = [s + 7 if n == 1 else s for n, s in zip(shape, source.stride(), strict=True)]
    other = torch.empty(0).set_(source.untyped_storage(), 0, shape, odd)
    assert other.is_contiguous() and other.stride() != source.stride()
    third = _walk(cache, {"x": other})
    _copy(third)
    staged = third.result["x"]
    assert staged.stride() == other.stride() and torch.equal(staged, other)
    (dst,) = third.copies.dsts
    assert dst is not buffer.view


def test_a_consumers_change_to_a_first_result_does_not_reach_the_next_call(
    stager: Driver,
) -> None:
    sd = {"w": torch.randn(4, 3)}
    first = stager.stage(sd)
    first["w"].t_()  # on the handed-out tensor only
    first["w"].extra = 1
    second = stager.stage(sd)
    assert second["w"].shape == (4, 3)
    assert torch.equal(second["w"], sd["w"])
    assert not hasattr(second["w"], "extra")


def test_a_first_call_shares_one_buffer_between_aliases() -> None:
    weight = torch.randn(4, 4)
    sd = {"w": weight, "tied": weight, "row": weight[1], "again": weight.view(16)}
    cache = _cache()
    plan = _walk(cache, sd)
    assert plan.new_buffers == 1 and len(plan.copies) == 1
    assert plan.result["tied"] is plan.result["w"]
    storages = {plan.result[k].untyped_storage().data_ptr() for k in sd}
    assert len(storages) == 1


def test_the_per_storage_tables_of_a_first_call_grow_in_different_steps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A first call keeps three dicts with an entry per storage (the call's copy index, the
    cache's buffers, the recording's slots). Without leads they reach the size at which
    CPython grows a dict at the same tensor, and grew in one step (4-6 ms of page faults over
    50,000 storages): past LEAD_AFTER storages, no two of them may grow in the same step."""
    stagers: list[TensorStager] = []
    recorders: list[ReplayRecorder] = []
    init_stager, init_recorder = TensorStager.__init__, ReplayRecorder.__init__

    def keep_stager(self: TensorStager, *args: Any, **kwargs: Any) -> None:
        init_stager(self, *args, **kwargs)
        stagers.append(self)

    def keep_recorder(self: ReplayRecorder, *args: Any, **kwargs: Any) -> None:
        init_recorder(self, *args, **kwargs)
        recorders.append(self)

    monkeypatch.setattr(TensorStager, "__init__", keep_stager)
    monkeypatch.setattr(ReplayRecorder, "__init__", keep_recorder)
    storages = 3 * LEAD_AFTER
    state_dict = {
        "state": {i: {"m": torch.ones(1), "v": torch.ones(1)} for i in range(storages // 2)}
    }
    cache = _cache()
    walk = walk_or_replay(cache, state_dict, Plan())
    grew: dict[str, list[int]] = {"copies": [], "buffers": [], "slots": []}
    sizes: dict[str, int] = {}
    step = 0
    for step, _ in enumerate(walk):
        if not stagers or not recorders:
            continue
        tables = {
            "copies": stagers[0].copy_index,
            "buffers": cache.entries,
            "slots": recorders[0]._out.slot_by_key,
        }
        for name, table in tables.items():
            size = sys.getsizeof(table)
            if name in sizes and size > sizes[name] and len(cache.entries) > LEAD_AFTER:
                grew[name].append(step)
            sizes[name] = size
    assert len(cache.entries) == storages and step > 0
    assert all(grew.values()), grew  # each grew past LEAD_AFTER (the check saw it happen)
    steps = [s for name in grew for s in grew[name]]
    assert len(steps) == len(set(steps)), grew
