"""The error tree and how errors carry the path of the object that failed."""

from __future__ import annotations

import pickle
import threading

import pytest

import astage
from astage import Attr


@pytest.mark.parametrize(
    ("error", "also"),
    [
        (astage.InvalidOptionsError, ValueError),
        (astage.UnstageableError, TypeError),
        (astage.StagerClosedError, astage.StagingError),
        (astage.BufferMismatchError, astage.StagingError),
    ],
)
def test_error_tree(error: type[Exception], also: type[Exception]) -> None:
    assert issubclass(error, astage.StagingError)
    assert issubclass(error, also)  # lets callers catch them the usual way, too


def test_staging_error_is_an_exception() -> None:
    assert issubclass(astage.StagingError, Exception)


def test_message_without_path() -> None:
    error = astage.StagingError("boom")
    assert str(error) == "boom"
    assert error.path is None


def test_message_names_the_path() -> None:
    error = astage.UnstageableError("cannot stage", ("optim", "state", 3, Attr("lock")))
    assert str(error) == "at ['optim']['state'][3].lock: cannot stage"
    assert error.path == ("optim", "state", 3, "lock")


def test_root_path_is_named() -> None:
    assert str(astage.StagingError("bad", ())) == "at <root>: bad"


@pytest.mark.parametrize(
    "error",
    [
        astage.StagingError("plain"),
        astage.UnstageableError("no", ("a", 0, Attr("b"))),
        astage.BufferMismatchError("size", ("w",)),
        astage.InvalidOptionsError("bad option"),
        astage.StagerClosedError("closed"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_errors_survive_pickling(error: astage.StagingError) -> None:
    # Errors cross process pools: type, message and path must come back unchanged.
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert copy.path == error.path


def test_unstageable_error_from_staging_carries_path(sync_stager: astage.SyncStager) -> None:
    with pytest.raises(astage.UnstageableError) as info:
        sync_stager.stage({"a": [1, threading.Lock()]})
    assert info.value.path == ("a", 1)
    assert "['a'][1]" in str(info.value)
