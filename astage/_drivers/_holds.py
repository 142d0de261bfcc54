"""Buffer holds, the older name of leases: ``hold_buffers()`` leases the current buffer set.

Kept so that ``astage.BufferHold`` and ``from astage._drivers._holds import BufferHold`` go on
working; see :mod:`astage._drivers._leases`.
"""

from __future__ import annotations

from ._leases import Lease

BufferHold = Lease
"""What ``hold_buffers()`` returns: a :class:`~astage._drivers._leases.Lease`."""

__all__ = ["BufferHold"]
