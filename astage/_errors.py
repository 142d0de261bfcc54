"""Every error astage raises on purpose, under one root.

AstageError                          the root: catch it to catch anything astage raises on purpose
├── InvalidOptionsError              a bad argument or option (also a ValueError)
│   ├── AcceleratorUnavailableError  ... needs an absent accelerator (an AssertionError)
│   └── MeshMismatchError            ... DTensors loaded on another mesh or rank than saved them
├── UsageError                       the API used in a way it does not allow
│   ├── BusyError                    a second concurrent call where only one may run
│   │   └── LeaseTimeoutError        ... a leased buffer set not released in time (a TimeoutError)
│   ├── ClosedError                  a closed object was used
│   │   └── StagerClosedError        ... a closed stager
│   └── SnapshotReleasedError        a snapshot's state dict read after its release
├── StagingError                     copying a state dict into host memory failed
│   ├── UnstageableError             an object in the state dict cannot be staged (a TypeError)
│   └── BufferMismatchError          a cached host buffer no longer fits its source
├── CheckpointError                  a checkpoint file cannot be written or read
│   ├── UnsavableError               an object cannot go into a checkpoint file (a TypeError)
│   ├── CheckpointWriteError         writing or committing a file failed (disk, permission)
│   ├── CheckpointSkippedWarning     resuming passed over a bad file (a UserWarning, warned)
│   └── CheckpointFormatError        a file is not a checkpoint astage can read back
│       └── CheckpointNotFoundError  ... because it is not there (a FileNotFoundError)
└── ReplicationError                 exchanging a snapshot with a partner rank failed
    └── ReplicationTimeoutError      the partner did not take part in time (a TimeoutError)

Every error may carry ``path``, where in the state dict it happened; its message then starts
with that path (``at ['optim']['state'][3].lock: ...``).
"""

from __future__ import annotations

import errno
from typing import Any

from ._paths import Path, shown_path

__all__ = [
    "AcceleratorUnavailableError",
    "AstageError",
    "BufferMismatchError",
    "BusyError",
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointNotFoundError",
    "CheckpointSkippedWarning",
    "CheckpointWriteError",
    "ClosedError",
    "InvalidOptionsError",
    "LeaseTimeoutError",
    "MeshMismatchError",
    "ReplicationError",
    "ReplicationTimeoutError",
    "SnapshotReleasedError",
    "StagerClosedError",
    "StagingError",
    "UnsavableError",
    "UnstageableError",
    "UsageError",
]


class AstageError(Exception):
    """Raised when astage fails on purpose; the root of every error astage raises."""

    def __init__(self, message: str, path: Path | None = None) -> None:
        self.path = path
        if path is not None:
            message = f"at {shown_path(path)}: {message}"
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep the message as built, so the error survives pickling (process pools).
        return (_rebuild, (type(self), self.args[0], self.path))


def _rebuild(cls: type[AstageError], message: str, path: Path | None) -> AstageError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.path = path
    return error


class InvalidOptionsError(AstageError, ValueError):
    """Raised when an argument or option is invalid, contradictory, or needs absent hardware."""


class AcceleratorUnavailableError(InvalidOptionsError, AssertionError):
    """Raised when an option needs an accelerator and none is available (DCP's AssertionError)."""


# Not a CheckpointError: the file is fine, the process loading it is not the one that can use
# it, and resuming must not skip it as a bad file. Resharding is DCP's work.
class MeshMismatchError(InvalidOptionsError):
    """Raised when a file's DTensors are loaded on another device mesh, rank or world size."""


class UsageError(AstageError):
    """Raised when the API is used in a way it does not allow (the base of the misuse errors)."""


class BusyError(UsageError):
    """Raised when a second call starts where only one may run at a time (other thread, loop)."""


class LeaseTimeoutError(BusyError, TimeoutError):
    """Raised when a call waited longer than its timeout for a leased buffer set to be released."""


class ClosedError(UsageError):
    """Raised when an object is used after it was closed."""


class StagerClosedError(ClosedError):
    """Raised when a stager is used after close() or aclose()."""


class SnapshotReleasedError(UsageError):
    """Raised when a snapshot's state dict is read after the snapshot was released."""


class StagingError(AstageError):
    """Raised when copying a state dict into host memory fails."""


class UnstageableError(StagingError, TypeError):
    """Raised when an object in the state dict can be neither copied nor kept as it is."""


class BufferMismatchError(StagingError):
    """Raised when a source storage changed size since its host buffer was cached."""


class CheckpointError(AstageError):
    """Raised when a checkpoint file cannot be written or read (the base of the file errors)."""


class UnsavableError(CheckpointError, TypeError):
    """Raised when a state dict holds an object that a checkpoint file cannot store."""


class CheckpointWriteError(CheckpointError):
    """Raised when writing or committing a checkpoint file fails; names the file and the cause."""


class CheckpointFormatError(CheckpointError):
    """Raised when a checkpoint file is truncated, corrupt or not in a format astage reads."""


class CheckpointNotFoundError(CheckpointFormatError, FileNotFoundError):
    """Raised when a checkpoint file to read is not there."""

    def __init__(self, message: str, path: Path | None = None) -> None:
        super().__init__(message, path)
        self.errno = errno.ENOENT


class CheckpointSkippedWarning(CheckpointError, UserWarning):
    """Raised when resuming passes over a checkpoint file it cannot use (issued as a warning)."""


class ReplicationError(AstageError):
    """Raised when a snapshot cannot be exchanged with, or persisted for, a partner rank."""


class ReplicationTimeoutError(ReplicationError, TimeoutError):
    """Raised when the partner rank does not take part in an exchange before the timeout."""


# Reported as astage.X (in tracebacks, reprs and pickles), where users import them from; set
# here once rather than in every class, and only on astage's own classes (not on subclasses an
# application derives from them).
for _name in __all__:
    globals()[_name].__module__ = "astage"
del _name
