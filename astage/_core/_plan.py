"""A plan: the staged skeleton of one call, and the copies that fill its tensors.

:func:`astage._core._walk.build_plan` fills a :class:`Plan` while it walks a state dict (the
skeleton from the deep-copy walk, one copy per source storage from the tensor stager in
:mod:`astage._core._tensors`); the drivers cut its :class:`Copies` into batches and run them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from .._paths import Path
from ._cache import HostBuffer


class Copies:
    """The copies of a plan: all bytes of ``srcs[i]``'s storage into ``dsts[i]``'s.

    ``srcs[i]`` and ``dsts[i]`` have the same shape and cover their whole storages: the source
    tensor and its staged twin when the tensor spans its storage contiguously, byte views
    otherwise. Kept as parallel lists so that a cached call adds a copy without allocating an
    object per tensor.

    ``sizes[i]`` is ``buffers[i].nbytes``, and ``devices`` holds (at least) every buffer's
    device: cutting batches reads these, not 50,000 buffers scattered over the heap (two
    attribute reads per buffer, mostly cache misses, were 15-20 ms of a cached call).
    """

    __slots__ = ("buffers", "devices", "dsts", "sizes", "srcs")

    def __init__(self) -> None:
        self.srcs: list[torch.Tensor] = []
        self.dsts: list[torch.Tensor] = []
        self.buffers: list[HostBuffer] = []
        self.sizes: list[int] = []
        self.devices: set[torch.device] = set()

    def __len__(self) -> int:
        return len(self.srcs)

    def add(self, src: torch.Tensor, dst: torch.Tensor, buffer: HostBuffer) -> int:
        """Append a copy and return its index."""
        index = len(self.srcs)
        self.srcs.append(src)
        self.dsts.append(dst)
        self.buffers.append(buffer)
        self.sizes.append(buffer.nbytes)
        self.devices.add(buffer.device)
        return index

    def extend(
        self,
        srcs: list[torch.Tensor],
        dsts: list[torch.Tensor],
        buffers: list[HostBuffer],
        sizes: list[int],
        devices: set[torch.device],
    ) -> None:
        """Append copies in bulk: ``sizes`` their buffers' sizes, ``devices`` (at least) their
        buffers' devices."""
        self.srcs += srcs
        self.dsts += dsts
        self.buffers += buffers
        self.sizes += sizes
        self.devices |= devices

    def lists(self) -> tuple[list[Any], ...]:
        """The parallel lists, for a caller that empties them in steps."""
        return (self.srcs, self.dsts, self.buffers, self.sizes)

    @property
    def nbytes(self) -> int:
        return sum(self.sizes)


class Leaf(NamedTuple):
    """A tensor reached from the containers of the state dict, and what it waits for."""

    path: Path
    tensor: torch.Tensor
    last_copy: int
    """Index of the last copy this tensor's values depend on; -1 when it needs none."""


class Plan:
    """The staged skeleton plus the copies that fill its tensors, built by :func:`build_plan`."""

    def __init__(self, *, track_leaves: bool = True, ahead: bool = False) -> None:
        self.track_leaves = track_leaves
        """Record every tensor's path and dependencies (what ``stage_iter`` needs)."""
        self.ahead = ahead
        """Work ahead of the calls (``reserve()``): a walk that records also prepares what
        the first replay would (the short checks of ``_recording.Recording.guards``)."""
        self.result: Any = None
        self.copies = Copies()
        self.leaves: list[Leaf] = []
        self.tensors = 0
        """Tensors reached from the containers (a tensor at two paths counts twice)."""
        self.new_buffers = 0
        self.new_nbytes = 0
        self.replayed = False
        """Whether the call was replayed from a recording (see :mod:`._replay`), not walked."""
        self.walking = False
        """A full walk (:func:`~._walk.build_plan`) fills the plan, rather than a replay."""
        self.tail = False
        """That walk has met every tensor, and empties its tables and finishes its recording:
        it allocates nothing more."""
        self.done = False
