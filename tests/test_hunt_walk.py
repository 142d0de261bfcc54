"""The deep-copy walk against ``copy.deepcopy``: objects the other walk tests do not draw.

Each test runs on every driver (the ``stager`` fixture) and stages twice, a first call and a
cached one, which must agree.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import Driver, assert_staged

import astage


class Holder:
    """A plain object with a tensor in an attribute (weakly referable)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight


# -- errors of an object's own rebuilding code --------------------------------------------------


class RefusesState:
    def __init__(self) -> None:
        self.weight = torch.ones(2)

    def __setstate__(self, state: Any) -> None:
        raise ValueError("this state is not accepted")


class RefusesItems(list[Any]):
    def append(self, item: Any) -> None:
        raise KeyError("no items")


class RefusesKeys(dict[Any, Any]):
    def __setitem__(self, key: Any, value: Any) -> None:
        raise RuntimeError("no keys")


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        (RefusesState(), "this state is not accepted"),
        (RefusesItems([1]), "no items"),
        (RefusesKeys({"a": 1}), "no keys"),
    ],
    ids=["__setstate__", "append", "__setitem__"],
)
def test_an_error_rebuilding_an_object_is_unstageable_by_path(
    stager: Driver, bad: Any, fragment: str
) -> None:
    # It came out raw (ValueError, KeyError, RuntimeError), naming no path.
    for _ in range(2):
        with pytest.raises(astage.UnstageableError, match=fragment) as raised:
            stager.stage({"ok": torch.ones(1), "deep": [{"bad": bad}]})
        assert raised.value.path == ("deep", 0, "bad")
        assert str(raised.value).startswith("at ['deep'][0]['bad']: ")
    weight = torch.randn(2)
    assert_staged(stager.stage({"w": weight})["w"], weight)  # the stager is still usable
