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

The like dicts of a group (an optimizer's per-parameter state) are handed out again the same
way (:func:`emptied_unheld`): 16,667 new dicts per call over 50,000 tensors were the objects
left for the collector once the tensors were reused; in an application that froze its heap,
the young collections that traverse them held the loop a median 20 ms per call (now ~5 ms), and
once in 20 calls a middle-generation collection held it 230-320 ms. A dict that nobody else
holds is emptied and filled with the call's twins; a dict has no weak references, no attributes
and no metadata, so its reference count is the whole check.
"""

from __future__ import annotations

import operator
import sys
import weakref
from collections import Counter
from collections.abc import Generator
from functools import partial
from itertools import compress, repeat
from typing import Any, NamedTuple

import torch

from .._torch import MetadataGuard, metadata_guard, storage_keys_of

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
    apart: a build without the GIL defers and biases its counts, and a torch whose tensors do
    not count their C++ holders (a view's link to its base) in their Python reference count
    would let a tensor reachable through such a holder (``view._base``) read as unheld."""
    if getattr(sys, "_is_gil_enabled", lambda: True)() is False:
        return None
    pool = [torch.empty(2, device="cpu")]
    unheld = next(map(sys.getrefcount, pool[0:1]))
    holder = pool[0]
    held = next(map(sys.getrefcount, pool[0:1]))
    del holder
    view = pool[0][1:]  # held in C++ only: the view's autograd link to its base
    held_in_cxx = next(map(sys.getrefcount, pool[0:1]))
    del view
    if held != unheld + 1 or held_in_cxx != unheld + 1:
        return None
    return unheld


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
        and list(map(sys.getrefcount, candidates)).count(refs) == len(candidates)  # ints
        and not any(map(weakref.getweakrefcount, candidates))
        and check.guard(*candidates)
        and list(map(_data_ptr, candidates)) == check.data_ptrs
        and all(map(_is_none, map(_grad, candidates)))
        and not any(map(_attributes, candidates))
    )


DICT_STEP = 1024
"""Kept dicts checked and emptied between two yields (a step of 1,024 took ~0.2 ms)."""


def emptied_unheld(
    older: list[Any] | None, newer: list[Any] | None, count: int
) -> Generator[None, None, list[Any]]:
    """Per item, a kept dict that nobody else holds, emptied for the caller to fill again (None
    where there is none), a step at a time.

    ``older`` and ``newer`` are the dicts kept from the call before last and from the last call
    (None where none were kept, or where an entry was let go); the older is taken first, since
    a caller that holds each result until the next call returns (``staged = stage(sd)`` in a
    loop) still holds the newer. ``older`` comes out empty: what was not taken is let go. A
    dict of ``newer`` that was not taken stays there, untouched. Emptied, a dict no longer
    holds its tensors, so the twins' own reuse check (:func:`reusable`) can find them unheld:
    run this first.
    """
    refs = REFS_WHEN_UNHELD
    ready: list[Any] = [None] * count
    if refs is None:
        return ready

    def if_unheld(d: Any, refcount: int) -> Any:
        return d if refcount == refs else None

    for start in range(0, count, DICT_STEP):
        stop = min(start + DICT_STEP, count)
        taken: list[Any] = [None] * (stop - start)
        for pool in (older, newer):
            if pool is None or len(pool) != count:
                continue
            part = pool[start:stop]
            # Counted apart: the pool, the part and the argument; a None, or a dict held
            # elsewhere (the caller's result, an item of it kept), counts more.
            refcounts = list(map(sys.getrefcount, part))
            found = list(map(if_unheld, part, refcounts))
            if pool is older:
                taken = found
                pool[start:stop] = repeat(None, len(part))  # taken, or let go
            else:
                taken = list(map(_first_found, taken, found))
                pool[start:stop] = map(_left, part, taken)
            del part, found
        for _ in map(dict.clear, filter(None, taken)):
            pass
        ready[start:stop] = taken
        del taken
        yield
    return ready


def _unheld_repeats(part: list[Any], refcounts: list[int], refs: int) -> list[Any]:
    """The objects that ``part`` (a copy of a pool) holds more than once and nobody else holds,
    once each: a tensor tied to itself in the state dict (the same object under two keys) is
    the same staged tensor twice, counted once more per entry by the pool and by ``part``."""
    rest = [(x, n) for x, n in zip(part, refcounts, strict=True) if n != refs and x is not None]
    times = Counter(id(x) for x, _ in rest)
    found: dict[int, Any] = {}
    for x, n in rest:
        repeats = times[id(x)] - 1
        if repeats and n == refs + 2 * repeats:
            found[id(x)] = x
    return list(found.values())


def _first_found(first: Any, second: Any) -> Any:
    return first if first is not None else second


def _left(kept: Any, taken: Any) -> Any:
    """What stays in the newer pool: its dict, unless that one was taken."""
    return None if kept is taken else kept


def counts_tell_holders() -> bool:
    """Whether reference counts tell a kept object nobody else holds apart (see
    :data:`REFS_WHEN_UNHELD`)."""
    return REFS_WHEN_UNHELD is not None


def empty_unheld_dicts(dicts: list[Any] | None) -> None:
    """Empty the kept ``dicts`` that nobody else holds, as the next replay would empty them
    (:func:`emptied_unheld`): their tensors then read as unheld, or die. Nothing where
    reference counts tell nothing."""
    refs = REFS_WHEN_UNHELD
    if refs is None or dicts is None:
        return
    part = dicts[:]
    refcounts = list(map(sys.getrefcount, part))  # as emptied_unheld counts them
    for _ in map(dict.clear, compress(part, map(refs.__eq__, refcounts))):
        pass


def count_own_uses(tensors: list[Any] | None, uses: list[int]) -> None:
    """Add to ``uses`` the storage key of each staged tensor kept in ``tensors`` that nobody
    but that list holds (once per tensor): uses of a buffer that are the cache's own, not a
    holder's. Nothing is counted where reference counts tell nothing
    (:func:`counts_tell_holders`).

    A tensor with a weak reference is let go of instead (its entry becomes None): its weak
    reference could hand it back to a reader after the buffer was written again, and kept, it
    would keep the buffer in use for as long as the recording lives. One that someone else
    holds is not counted: its holder still uses the buffer. Each pass is C-level (``map``,
    ``compress``): this runs on every save of a DCP user, over every tensor.
    """
    refs = REFS_WHEN_UNHELD
    if refs is None or tensors is None:
        return
    part = tensors[:]
    refcounts = list(map(sys.getrefcount, part))  # a None counts far more
    unheld = list(compress(part, map(refs.__eq__, refcounts)))
    if len(unheld) + sum(map(_is_none, part)) < len(part):
        unheld += _unheld_repeats(part, refcounts, refs)
    if any(map(weakref.getweakrefcount, unheld)):
        weak = set(map(id, filter(weakref.getweakrefcount, unheld)))
        for index, tensor in enumerate(part):
            if id(tensor) in weak:
                tensors[index] = None
    del part
    # Those let go of are counted too: the caller read the buffers' counts while they lived,
    # and nothing else held them, so they die with this list.
    uses += storage_keys_of(unheld)
