"""Snapshot: a staged state dict and the lease that keeps its buffers from being overwritten.

``stager.snapshot(state_dict)`` stages like ``stage()`` and leases the buffer set it staged
into: no later call on the stager writes into that set until the snapshot is released. After
the release, :attr:`Snapshot.state_dict` raises :class:`~astage.SnapshotReleasedError` rather
than hand out buffers that a later call may be overwriting. What cannot be detected: tensors
(or the dict) already taken out of the snapshot before the release still point into the
buffers and read whatever a later call wrote there.

A snapshot of a stager with ``share_memory=True`` can be sent to another process through
:mod:`torch.multiprocessing` (a ``Queue``, a ``Pipe``, or ``Process`` arguments): its tensors
arrive as views of the same shared memory, its lease as the same shared byte, and ``release()``
in that process frees the set for the stager.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from .._errors import SnapshotReleasedError
from ._leases import Lease

_LET_GO: Any = object()
"""A released snapshot's state dict (``None`` may be a staged value)."""


class Snapshot:
    """A staged state dict held for its consumer until :meth:`release`.

    A context manager that releases itself on exit. ``release()`` is idempotent and may be
    called from any thread, or from another process it was sent to (``share_memory=True``).
    """

    __slots__ = ("_lease", "_state_dict")

    def __init__(self, state_dict: Any, lease: Lease) -> None:
        self._state_dict = state_dict
        self._lease = lease

    @property
    def state_dict(self) -> Any:
        """The staged state dict; raises :class:`~astage.SnapshotReleasedError` once released."""
        state_dict = self._state_dict  # read first: release() in another thread drops it
        if state_dict is _LET_GO or self._lease.released:
            raise SnapshotReleasedError(
                "this snapshot was released: its buffers may already hold a later call's "
                "values; read the state dict before release() (or inside the with block)"
            )
        return state_dict

    @property
    def lease(self) -> Lease:
        """The lease that keeps the snapshot's buffer set from being staged into."""
        return self._lease

    @property
    def released(self) -> bool:
        """Whether the snapshot was released (here or in a process it was sent to)."""
        return self._lease.released

    def release(self) -> None:
        """Hand the buffers back to the stager; the state dict is not to be read afterwards.

        The snapshot lets go of it too: a released snapshot that its consumer keeps (in a
        queue of finished work, say) then no longer holds the staged tensors, which the
        stager's next calls hand out again (see the guide's "Buffer reuse").
        """
        self._lease.release()
        self._state_dict = _LET_GO

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __reduce__(self) -> tuple[Any, ...]:
        # state_dict raises when released: a released snapshot is not sent anywhere.
        return (Snapshot, (self.state_dict, self._lease))

    def __repr__(self) -> str:
        return f"<Snapshot {'released' if self.released else 'held'}>"
