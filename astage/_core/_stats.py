"""StageStats: the figures of one completed stage() call."""

from __future__ import annotations

from typing import NamedTuple


class StageStats(NamedTuple):
    """Figures of one completed stage() call."""

    tensors: int
    """Tensors reached from the containers (a tensor at two paths counts twice)."""
    storages: int
    """Distinct source storages copied (shared storages are copied once)."""
    nbytes: int
    """Bytes copied."""
    new_nbytes: int
    """Bytes of host buffers allocated by this call; 0 when every buffer came from the cache."""
    seconds: float
    """Wall time of the call."""

    @property
    def reused_fraction(self) -> float:
        """Share of the copied bytes that went into cached buffers."""
        return 1.0 - self.new_nbytes / self.nbytes if self.nbytes else 1.0

    @property
    def gb_per_s(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0
