"""Every error astage raises on purpose.

StagingError                 base of them all
├── InvalidOptionsError      bad StagingOptions (also a ValueError)
├── StagerClosedError        the stager was closed
├── UnstageableError         an object in the state dict cannot be staged
├── BufferMismatchError      a cached host buffer no longer fits its source
├── UnsavableError           an object in the state dict cannot go into a checkpoint file
├── CheckpointWriteError     writing or committing a checkpoint file failed (disk, permission)
├── CheckpointFormatError    a checkpoint file cannot be read back
└── ReplicationError         exchanging a snapshot with a partner rank failed (names both ranks)
    └── ReplicationTimeoutError   the partner rank did not take part in time (also a TimeoutError)
"""

from __future__ import annotations

from typing import Any

from ._paths import Path, format_path

__all__ = [
    "BufferMismatchError",
    "CheckpointFormatError",
    "CheckpointWriteError",
    "InvalidOptionsError",
    "ReplicationError",
    "ReplicationTimeoutError",
    "StagerClosedError",
    "StagingError",
    "UnsavableError",
    "UnstageableError",
]


class StagingError(Exception):
    """Raised when staging fails; the base class of every error astage raises on purpose."""

    def __init__(self, message: str, path: Path | None = None) -> None:
        self.path = path
        if path is not None:
            message = f"at {format_path(path)}: {message}"
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep the message as built, so the error survives pickling (process pools).
        return (_rebuild, (type(self), self.args[0], self.path))


def _rebuild(cls: type[StagingError], message: str, path: Path | None) -> StagingError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.path = path
    return error


class InvalidOptionsError(StagingError, ValueError):
    """Raised when StagingOptions are contradictory or ask for hardware that is not there."""


class StagerClosedError(StagingError):
    """Raised when a stager is used after close() or aclose()."""


class UnstageableError(StagingError, TypeError):
    """Raised when an object in the state dict can be neither copied nor kept as it is."""


class BufferMismatchError(StagingError):
    """Raised when a source storage changed size since its host buffer was cached."""


class UnsavableError(StagingError, TypeError):
    """Raised when a state dict holds an object that a checkpoint file cannot store."""


class CheckpointWriteError(StagingError):
    """Raised when writing or committing a checkpoint file fails; names the file and the cause."""


class CheckpointFormatError(StagingError):
    """Raised when a checkpoint file is missing, truncated or not in a format astage reads."""


class ReplicationError(StagingError):
    """Raised when a snapshot cannot be exchanged with, or persisted for, a partner rank."""


class ReplicationTimeoutError(ReplicationError, TimeoutError):
    """Raised when the partner rank does not take part in an exchange before the timeout."""
