"""The suite's own plumbing from conftest.py: the cuda marker and the event-loop matrix."""

from __future__ import annotations

import pytest
from conftest import HAS_CUDA, LOOP_FACTORIES


def test_cuda_marker_is_registered(pytestconfig: pytest.Config) -> None:
    assert any(line.startswith("cuda:") for line in pytestconfig.getini("markers"))


def test_cuda_tests_are_skipped_without_cuda(request: pytest.FixtureRequest) -> None:
    cuda_items = [i for i in request.session.items if i.get_closest_marker("cuda") is not None]
    if not any(item.path.name == "test_cuda.py" for item in request.session.items):
        pytest.skip("test_cuda.py is not part of this run")
    assert cuda_items
    for item in cuda_items:
        skipped = any(m.name == "skip" for m in item.iter_markers())
        assert skipped is not HAS_CUDA, item.nodeid


def test_async_tests_are_collected_for_both_loops(request: pytest.FixtureRequest) -> None:
    factories = _loop_factories(request.session.items)
    if not factories:
        pytest.skip("no async tests in this run")
    assert factories == set(LOOP_FACTORIES.values())


def _loop_factories(items: list[pytest.Item]) -> set[object]:
    found = set()
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "_asyncio_loop_factory" in callspec.params:
            found.add(callspec.params["_asyncio_loop_factory"])
    return found
