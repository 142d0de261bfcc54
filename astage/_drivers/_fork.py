"""Stagers made before a ``fork()`` refuse to work in the child.

A forked child inherits the parent's stagers but not their threads (anyio's worker threads,
compat's staging thread) nor a usable CUDA context: a call there would hang on a thread that
does not exist or fail deep inside the driver. An ``os.register_at_fork`` hook counts forks in
the child; a stager remembers the count when it is made and, when the count moved, refuses
with :class:`~astage.UsageError`. A counter rather than a registry of live stagers: nothing to
reference (weakly or not), and a stager made in the child works as usual.
"""

from __future__ import annotations

import os

from .._errors import UsageError


class _Forks:
    count = 0


def _after_fork_in_child() -> None:
    _Forks.count += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


def generation() -> int:
    """How many forks separate this process from the first one that imported astage."""
    return _Forks.count


def check_not_forked(born: int, owner: str) -> None:
    """Raise :class:`~astage.UsageError` if the object made at ``born`` is in a forked child."""
    if born != _Forks.count:
        raise UsageError(
            f"this {owner} was created before os.fork() and cannot be used in the child "
            f"process (pid {os.getpid()}): its threads and device state stayed in the parent; "
            f"create a new {owner} in the child"
        )
