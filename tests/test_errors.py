"""The error tree and how errors carry the path of the object that failed."""

from __future__ import annotations

import pickle
import threading

import pytest

import astage
from astage import Attr

TREE: dict[type[Exception], type[Exception]] = {
    astage.InvalidOptionsError: astage.AstageError,
    astage.AcceleratorUnavailableError: astage.InvalidOptionsError,
    astage.MeshMismatchError: astage.InvalidOptionsError,
    astage.UsageError: astage.AstageError,
    astage.BusyError: astage.UsageError,
    astage.LeaseTimeoutError: astage.BusyError,
    astage.SnapshotReleasedError: astage.UsageError,
    astage.ClosedError: astage.UsageError,
    astage.StagerClosedError: astage.ClosedError,
    astage.StagingError: astage.AstageError,
    astage.UnstageableError: astage.StagingError,
    astage.BufferMismatchError: astage.StagingError,
    astage.CheckpointError: astage.AstageError,
    astage.UnsavableError: astage.CheckpointError,
    astage.CheckpointWriteError: astage.CheckpointError,
    astage.CheckpointFormatError: astage.CheckpointError,
    astage.CheckpointNotFoundError: astage.CheckpointFormatError,
    astage.CheckpointSkippedWarning: astage.CheckpointError,
    astage.ReplicationError: astage.AstageError,
    astage.ReplicationTimeoutError: astage.ReplicationError,
}


@pytest.mark.parametrize(("error", "parent"), TREE.items(), ids=lambda c: c.__name__)
def test_error_tree(error: type[Exception], parent: type[Exception]) -> None:
    assert error.__bases__[0] is parent


@pytest.mark.parametrize(
    ("error", "also"),
    [
        (astage.InvalidOptionsError, ValueError),
        (astage.AcceleratorUnavailableError, AssertionError),
        (astage.LeaseTimeoutError, TimeoutError),
        (astage.UnstageableError, TypeError),
        (astage.UnsavableError, TypeError),
        (astage.CheckpointNotFoundError, FileNotFoundError),
        (astage.ReplicationTimeoutError, TimeoutError),
    ],
)
def test_errors_are_also_builtin_kinds(error: type[Exception], also: type[Exception]) -> None:
    assert issubclass(error, also)  # lets callers catch them the usual way, too


def test_every_error_is_in_the_tree_and_documented() -> None:
    public = {
        obj
        for name in astage.__all__
        if isinstance(obj := getattr(astage, name), type) and issubclass(obj, Exception)
    }
    assert public == {*TREE, astage.AstageError}
    for error in public:
        assert error.__module__ == "astage", error
        doc = (error.__doc__ or "").strip()
        assert doc.startswith("Raised when ") and "\n" not in doc, error


def test_root_is_an_exception() -> None:
    assert issubclass(astage.AstageError, Exception)
    assert not issubclass(astage.AstageError, (ValueError, TypeError, OSError))


def test_not_found_carries_errno() -> None:
    import errno

    error = astage.CheckpointNotFoundError("no such checkpoint: /x")
    assert error.errno == errno.ENOENT
    assert str(error) == "no such checkpoint: /x"


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
        astage.CheckpointNotFoundError("gone", ("w",)),
        astage.BusyError("busy"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_errors_survive_pickling(error: astage.AstageError) -> None:
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
