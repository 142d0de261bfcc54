"""The collector-time benchmark charges each collection to the save that came before it."""

from __future__ import annotations

import gc
from typing import Any

from benchmarks.dcp_pool_gc import charge


def test_collections_are_charged_to_the_save_that_left_the_objects() -> None:
    def many_new_objects(state_dict: Any) -> Any:
        return [{} for _ in range(20_000)]  # young, and kept until the save returns

    def none(state_dict: Any) -> Any:
        return state_dict

    enabled = gc.isenabled()
    gc.enable()
    try:
        charged = charge({"many": many_new_objects, "none": none}, {}, saves=3, warmup=1)
    finally:
        if not enabled:
            gc.disable()
    many, few = charged
    assert [len(many.save_s), len(few.save_s)] == [3, 3]
    assert many.collections > few.collections
    assert len(many.collected_s) == many.collections
    assert "3 saves" in many.line()
