"""Paths: tuples of keys, indices and attribute names, printed as Python would reach them."""

from __future__ import annotations

import pytest

from astage import Attr, format_path


@pytest.mark.parametrize(
    ("path", "text"),
    [
        ((), "<root>"),
        (("model",), "['model']"),
        (("optim", "state", 3, "lock"), "['optim']['state'][3]['lock']"),
        (("cfg", Attr("lr")), "['cfg'].lr"),
        ((Attr("inner"), Attr("weight"), 0), ".inner.weight[0]"),
        (((1, 2), None, 1.5), "[(1, 2)][None][1.5]"),
        (("it's",), '["it\'s"]'),
    ],
)
def test_format_path(path: tuple[object, ...], text: str) -> None:
    assert format_path(path) == text


def test_attr_is_a_str_that_prints_distinctly() -> None:
    name = Attr("weight")
    assert isinstance(name, str)
    assert name == "weight"
    assert hash(name) == hash("weight")
    assert repr(name) == "Attr('weight')"


def test_a_str_key_is_not_an_attribute() -> None:
    assert format_path(("weight",)) != format_path((Attr("weight"),))


def test_attr_has_no_instance_dict() -> None:
    with pytest.raises(AttributeError):
        Attr("x").extra = 1  # type: ignore[attr-defined]
