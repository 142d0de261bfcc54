"""The walk's handling of the cyclic garbage collector (``pause_gc``)."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator

import pytest
import torch
from conftest import Driver


def _optimizer_like(n: int) -> dict[str, object]:
    return {"state": {i: {"step": torch.tensor(1.0), "m": torch.randn(4)} for i in range(n)}}


@pytest.fixture
def app_frozen_objects() -> Iterator[int]:
    """An application that froze its long-lived heap (as after fork-safe set-up)."""
    gc.collect()
    gc.freeze()
    try:
        yield gc.get_freeze_count()
    finally:
        gc.unfreeze()


def test_a_call_leaves_no_young_objects_to_traverse(make_stager: Callable[..., Driver]) -> None:
    stager = make_stager()
    source = _optimizer_like(2000)
    stager.stage(source)
    gc.collect()
    result = stager.stage(source)  # a cached call: allocates the result (~6000 objects)
    # The result went straight to the oldest generation: the next young collection has
    # (next to) nothing to traverse.
    assert gc.get_count()[0] < 100
    assert len(result["state"]) == 2000
    assert gc.isenabled()


def test_pause_gc_false_leaves_the_collector_alone(make_stager: Callable[..., Driver]) -> None:
    stager = make_stager(pause_gc=False)
    source = _optimizer_like(2000)
    stager.stage(source)
    before = gc.get_stats()[0]["collections"]
    stager.stage(source)
    assert gc.get_stats()[0]["collections"] > before  # young collections ran during the call
    assert gc.isenabled()


def test_objects_the_application_froze_stay_frozen(
    make_stager: Callable[..., Driver], app_frozen_objects: int
) -> None:
    stager = make_stager()
    stager.stage(_optimizer_like(500))
    # Not unfrozen (a few frozen objects may have died meanwhile), and nothing of ours added.
    assert app_frozen_objects - 1000 < gc.get_freeze_count() <= app_frozen_objects
    assert gc.isenabled()


def test_a_disabled_collector_stays_disabled(make_stager: Callable[..., Driver]) -> None:
    stager = make_stager()
    gc.disable()
    try:
        stager.stage(_optimizer_like(100))
        assert not gc.isenabled()
    finally:
        gc.enable()
