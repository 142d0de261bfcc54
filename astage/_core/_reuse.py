"""Staged tensors of an earlier call, reused when nobody holds them any more.

A replay over 50,000 small tensors made 50,000 new staged tensors (``view.detach()``) and let go
of as many from the call before: 1.3 us per tensor, a quarter of a cached call, and 50,000 new
objects for the cyclic collector each call (in an application that froze its heap, the young
collections that traverse them held the loop ~40 ms per call: ``benchmarks.frozen_heap_lag``).
The twins depend only on the recording (a view of a cached buffer, detached), so a twin that
nobody else holds can be handed out again, as long as nothing about it changed while it was
held.

"Nobody else holds it" is read from the reference count: a twin referenced only by the
recording's list (and the list being checked) has no other holder in Python, so no one can tell
it was reused. "Nothing changed" is a bulk check against what the twins were when made: exact
type, dtype, device, shape, strides, dispatch keys and ``requires_grad`` (one C++ call, see
:func:`~astage._torch.metadata_guard`), data pointer (``set_``, ``.data =``), no ``.grad``, no
Python attributes, no weak reference (a weak-keyed cache would see the old object come back).
Any difference, or a holder, makes the replay create fresh twins for those tensors, as before.
"""

from __future__ import annotations

import operator
import sys
import weakref
from functools import partial
from typing import Any, NamedTuple

import torch

from .._torch import MetadataGuard, metadata_guard

_data_ptr = torch.Tensor.data_ptr
_grad = operator.attrgetter("grad")
_attributes = operator.attrgetter("__dict__")
_is_none = partial(operator.is_, None)


class TwinCheck(NamedTuple):
    """What a step of twins was when made: checked before the step is handed out again."""

    guard: MetadataGuard
    data_ptrs: list[int]


def _refs_when_unheld() -> int | None:
    """The reference count :func:`reusable` reads for an object that only its pool list holds
    (the pool, the slice taken of it, the argument), or None where counts do not tell holders
    apart (a build without the GIL defers and biases its counts)."""
    if getattr(sys, "_is_gil_enabled", lambda: True)() is False:
        return None
    pool = [torch.empty(0, device="cpu")]
    unheld = next(map(sys.getrefcount, pool[0:1]))
    holder = pool[0]
    held = next(map(sys.getrefcount, pool[0:1]))
    del holder
    return unheld if held == unheld + 1 else None


REFS_WHEN_UNHELD = _refs_when_unheld()
"""None: reuse is off (reference counts cannot be trusted on this interpreter)."""


def check_of(twins: list[Any]) -> TwinCheck | None:
    """The check for ``twins`` as they are now (just made): None where there is none to make
    (a step with a temporary's hole in it, or a torch without the bulk metadata check)."""
    if REFS_WHEN_UNHELD is None or any(map(_is_none, twins)):  # not `in`: that asks ==
        return None
    guard = metadata_guard(twins)
    if guard is None:
        return None
    return TwinCheck(guard, list(map(_data_ptr, twins)))


def reusable(candidates: list[Any], check: TwinCheck) -> bool:
    """Whether every one of ``candidates`` (a list taken from the pool that alone holds them)
    has no other holder and is still what ``check`` saw."""
    refs = REFS_WHEN_UNHELD
    return (
        refs is not None
        and all(map(refs.__eq__, map(sys.getrefcount, candidates)))
        and not any(map(weakref.getweakrefcount, candidates))
        and check.guard(*candidates)
        and list(map(_data_ptr, candidates)) == check.data_ptrs
        and all(map(_is_none, map(_grad, candidates)))
        and not any(map(_attributes, candidates))
    )
