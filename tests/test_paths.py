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


def test_an_error_shows_a_long_key_and_a_deep_path_cut_short() -> None:
    # Found by the scale hunt: an error under a 1 MB string key carried the whole key in its
    # message (1 MB of log line), and one at the end of 100 nested levels all 100 keys.
    import threading

    import astage

    key = "k" * 1_000_000
    with pytest.raises(astage.UnstageableError) as caught:
        astage.SyncStager().stage({key: threading.Lock()})
    message = str(caught.value)
    assert len(message) < 1000 and "characters)" in message
    assert caught.value.path == (key,)  # kept whole for code that reads it
    deep: dict[str, object] = {"leaf": threading.Lock()}
    for level in range(60):
        deep = {f"level{level}": deep}
    with pytest.raises(astage.UnstageableError) as caught:
        astage.SyncStager().stage(deep)
    message = str(caught.value)
    assert "(49 more)" in message and "['level59']" in message and "['leaf']" in message
    assert caught.value.path is not None and len(caught.value.path) == 61
