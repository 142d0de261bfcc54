"""Replay: stage a state dict shaped like an earlier one without walking it again.

A cached call spends its time in the deep-copy walk, not in the copies: ~15 C calls, two dict
stores and the memo per tensor. Most callers stage the same structure every time (a model's or an
optimizer's ``state_dict()``, rebuilt each call with the same keys over the same storages), so
a full walk has a recorder (:class:`ReplayRecorder`) write down what it stages, as it goes: every
container's exact type,
keys and length, and for every tensor its type, storage (by the host buffer that mirrors it),
offset, shape, stride, dtype and conjugate/negative bits. No object identity is recorded for
containers or tensors, so a ``state_dict()`` rebuilt each call still matches.

:class:`Replay` then checks a later state dict against a recording as it rebuilds the result
straight from the cached buffers: the same copies, views and containers the walk would make,
without the memo, the per-tensor path or the general tensor path. It is conservative:

* a changed container (type, keys or their types, length, attributes), a container met twice
  (the walk would share its copy), a value that is neither atomic nor of the recorded kind, or a
  tensor whose metadata changed in place over a recorded storage (``t_()``, ``resize_``,
  ``set_`` onto another recorded storage, flags swapped through ``.data =``) is a mismatch: the
  call falls back to the full walk, which records again;
* a plain tensor on a storage the recording does not know (a temporary made fresh each call,
  such as an RNG state, or a storage swapped for a new one) is staged on its own by the tensor
  stager, and the rest of the call is still replayed.

Copies found by a replay are handed to the plan as they are found, so batches start while the
replay runs; a mismatch midway hands the copies made so far to the full walk (``adopted``), which
then does not copy those storages again.
"""

from __future__ import annotations

import operator
from collections.abc import Generator
from functools import partial
from itertools import chain, repeat
from typing import Any, cast

import torch

from .._torch import detached, metadata_guard, neg_view
from ._cache import BufferCache, HostBuffer
from ._plan import Leaf, Plan
from ._recording import Recording, ReplayRecorder
from ._reuse import (
    check_of,
    emptied_unheld,
    reusable,
)
from ._structure import BULK_STEP, CHUNK, DictNode, ListNode, TupleNode, mapped, same_keys
from ._tables import EMPTY_STEP, empty_in_steps
from ._tensors import Adopted, TensorStager, bytes_view, view_on
from ._walk import ATOMIC_TYPES, DeepCopy, Walk, build_plan

SMALL = 64
"""A container with at most this many items below it is replayed without yielding."""


_Tensor = torch.Tensor
_Parameter = torch.nn.Parameter
_strided = torch.strided


class Mismatch(Exception):
    """The state dict no longer has the recorded structure: walk it in full."""


class _BulkMiss(Exception):
    """A tensor differs from the recording: check them one by one instead."""


_detach: Any = detached
_storage = torch.Tensor.untyped_storage
_attributes = operator.attrgetter("__dict__")
_is_nested = operator.attrgetter("is_nested")
_dropped = operator.attrgetter("dropped")
_view = operator.attrgetter("view")
_is_none = partial(operator.is_, None)
_is_not_none = partial(operator.is_not, None)
_new_dict: Any = dict
"""How a group's item dict is made when none is kept (tests count them)."""


def _filled(ready: dict[Any, Any] | None, pairs: Any) -> dict[Any, Any]:
    """``ready`` (an emptied kept dict) filled with ``pairs``, or a new dict where None."""
    if ready is None:
        made: dict[Any, Any] = _new_dict(pairs)
        return made
    ready.update(pairs)
    return ready


_nbytes = torch.UntypedStorage.nbytes
_is = operator.is_
_storage_offset = torch.Tensor.storage_offset
_GETTERS: tuple[Any, ...] = (
    _storage_offset,
    operator.attrgetter("dtype"),
    operator.attrgetter("shape"),
    torch.Tensor.stride,
    torch.Tensor.is_neg,
)


class _SamePlace:
    """Where each checked tensor sits among the collected ones when none was left out."""

    def __getitem__(self, index: int) -> int:
        return index

    def __contains__(self, index: int) -> bool:
        return True


_SAME_PLACE = _SamePlace()


def _mapped_live(function: Any, buffers: list[Any], dead: int) -> Generator[None, None, list[Any]]:
    """:func:`mapped` over buffers of which ``dead`` are ``None`` (evicted): ``None`` for those.

    ``function`` reads an attribute of a buffer, or is a buffer's own call: on ``None``, it
    raises AttributeError or TypeError. With ``dead`` 0 none is expected; one that a source's
    death emptied since it was counted (an eviction in another thread, or on the loop between
    two steps) sends the map the slow way, from the start.
    """
    if not dead:
        try:
            return (yield from mapped(function, buffers))
        except (AttributeError, TypeError):
            pass
    out: list[Any] = []
    for start in range(0, len(buffers), BULK_STEP):
        part = buffers[start : start + BULK_STEP]
        out += [None if buffer is None else function(buffer) for buffer in part]
        yield
    return out


_dereference: Any = HostBuffer.__call__  # a buffer is the weak reference to its source storage


class Replay:
    """One call replayed from a :class:`Recording` into ``plan``."""

    def __init__(self, recording: Recording, cache: BufferCache, plan: Plan) -> None:
        self._rec = recording
        self._cache = cache
        self._plan = plan
        self._leaves = recording.leaves
        self._slots = recording.slots
        self._src_leaf = recording.src_leaf
        self._slot_users = recording.slot_users
        self._copy_of: list[int] = []
        """Per slot: its copy this call (-1: none; -2: not met yet); filled by :meth:`run`."""
        # Per tensor: the last copy it depends on, for stage_iter's leaves only (a 50,000-entry
        # list is a loop hold of 1-2 ms on its own, for nothing when no leaf is tracked).
        self._last_copy = [-1] * len(recording.leaves) if plan.track_leaves else []
        self._same: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # shared slots' tensors
        self._seen: set[int] = set()
        self._tensors = 0
        self._work = 0
        self._track = plan.track_leaves
        self._fallback: TensorStager | None = None
        self._fallback_walk: DeepCopy | None = None
        self._staged_leaves: list[tuple[int, torch.Tensor]] = []
        self._on_leaf: Any = self._leaf
        self._volatile: list[bool] | None = None
        self._twins: list[Any] | None = None
        self._spare: list[Any] | None = None
        self._ready: list[Any] | None = None
        """Kept item dicts emptied for this call to fill (None where there is none)."""
        self._items: list[Any] | None = None
        """This call's item dicts, to keep (see :attr:`Recording.items`)."""
        self._items_spare: list[Any] | None = None
        self._xs: list[Any] = []
        self._ys: list[Any] = []
        self._views: list[Any] = []
        self._early = False
        self._storages: list[Any] = []
        self._dead = 0
        self._published: list[int] = []
        """The slots whose copies a bulk replay handed to the plan, in the plan's order."""
        self._published_positions: list[int] = []
        """Per slot: the position of its copy among those (tracked leaves only)."""

    # -- the driver's view ---------------------------------------------------------------------

    def run(self, state_dict: Any) -> Walk:
        """Replay ``state_dict``; raises :class:`Mismatch` (copies found so far stay valid).

        First in bulk (:meth:`_run_bulk`); if a tensor differs there, tensor by tensor
        (:meth:`_run_each`), which stages tensors on storages no call has met on their own.
        """
        # In a step of its own: with the set-up above, 50,000 slots held the loop 3.7-4.6 ms.
        yield
        self._copy_of = [-2] * len(self._slots)
        yield
        try:
            return (yield from self._run_bulk(state_dict))
        except _BulkMiss:
            if self._fallback is not None:
                raise Mismatch from None  # some tensors were staged on their own already
        self._seen.clear()
        self._on_leaf = self._leaf
        self._twins = None
        self._xs = []
        return (yield from self._run_each(state_dict))

    def _traverse(self, state_dict: Any) -> Walk:
        root = self._rec.root
        if root.size <= SMALL:
            return self._build(root, state_dict)
        return (yield from self._build_big(root, state_dict))

    def _run_each(self, state_dict: Any) -> Walk:
        result = yield from self._traverse(state_dict)
        self._check_identities()
        plan = self._plan
        plan.tensors += self._tensors
        if self._track:
            paths = self._rec.paths
            last_copy = self._last_copy
            leaves = plan.leaves
            for index, y in self._staged_leaves:
                leaves.append(Leaf(paths[index], y, last_copy[index]))
        return result

    # -- in bulk ---------------------------------------------------------------------------------

    def _run_bulk(self, state_dict: Any) -> Walk:
        """Rebuild the containers with staged twins made ahead, then check every tensor at once.

        The staged twins depend only on the recording (the checks make sure the sources still
        match it), so they are made before the walk over the containers, by ``map()``; the
        walk only collects the sources; the checks compare lists of metadata in C. Nothing
        reaches the plan until every check has passed.
        """
        rec = self._rec
        slots = self._slots
        self._dead = dead = rec.dead
        if dead * 2 > len(slots):
            raise Mismatch  # mostly new storages (a new model): walk, and record those
        if dead:  # some recorded storages died (temporaries): their tensors go on their own
            gone = yield from mapped(slots.__getitem__, rec.slot_of)
            self._volatile = [buffer is None for buffer in gone]
            yield
        if self._volatile is None:
            yield from self._ready_items()
        else:  # the groups are replayed item by item (see _build): nothing to fill
            rec.items = rec.items_spare = None
        ys = yield from self._make_twins()
        self._ys = ys
        self._on_leaf = self._collect
        if self._volatile is None:
            self._twins = ys
        result = yield from self._traverse(state_dict)
        self._twins = None
        xs = self._xs
        checked = None
        if self._volatile is not None:
            checked = [j for j, gone in enumerate(self._volatile) if not gone]
            yield
        yield from self._check_bulk(xs, checked)
        yield from self._publish_bulk(xs, checked)
        plan = self._plan
        plan.tensors += len(xs)
        if self._track:
            paths = rec.paths
            base = len(plan.copies.srcs) - len(self._published)
            positions = self._published_positions
            leaves = plan.leaves
            tracked = range(len(rec.leaves)) if checked is None else checked
            for start in range(0, len(tracked), BULK_STEP):
                for j in tracked[start : start + BULK_STEP]:
                    copy = positions[rec.slot_of[j]]
                    leaves.append(Leaf(paths[j], ys[j], base + copy if copy >= 0 else -1))
                yield
        # Every group was filled in bulk (twins made ahead: _group_items); a hole would only
        # mean no kept dict there, which the next call counts as held.
        # Kept in a list of the recording's own, not in ys: a list made this call is young
        # (see Recording.shells), and another thread that dropped a source may still write a
        # None into a kept list it read before this call took it (Recording.forget).
        kept = rec.shell()
        for start in range(0, len(ys), EMPTY_STEP):  # at once, 0.2-0.9 ms over 50,000
            kept += ys[start : start + EMPTY_STEP]
            yield
        rec.keep(kept, self._dead, self._spare, self._items, self._items_spare)
        self._spare = self._items = self._items_spare = None
        self._ys = []  # the recording's now: release() must not empty it
        return result

    def _ready_items(self) -> Walk:
        """Empty the kept item dicts nobody holds, for :meth:`_group_items` to fill; before the
        twins are made, since a kept dict holds its twins (see :func:`~._reuse.emptied_unheld`).

        Per item, the call before last's dict, else the last call's. What is left of the last
        call's (held by the caller's result: ``staged = stage(sd)`` in a loop) is the next
        call's older pool.
        """
        rec = self._rec
        count = rec.item_count
        last, spare = rec.items, rec.items_spare
        rec.items = rec.items_spare = None
        if not count:
            return
        self._items = items = rec.shell()
        items += repeat(None, count)
        if spare is not None or last is not None:
            self._ready = yield from emptied_unheld(spare, last, count)
            rec.give_shell(spare)  # emptied_unheld let go of all it did not take
        if last is not None and len(last) == count and any(map(_is_not_none, last)):
            self._items_spare = last
        else:
            rec.give_shell(last)

    def _collect(self, index: int, x: Any) -> Any:
        volatile = self._volatile
        if volatile is not None and volatile[index]:
            return self._unknown(index, x)
        self._xs.append(x)
        return self._ys[index]

    def _make_twins(self) -> Walk:
        rec = self._rec
        slots = self._slots
        views = yield from _mapped_live(_view, slots, self._dead)
        if self._rec.dead != self._dead:
            # A slot emptied since the replay began (see Recording.forget): its tensors are
            # not among the volatile ones made apart, and its view may be None here.
            raise _BulkMiss
        self._views = views
        detached = yield from self._plain_twins(views)
        if rec.all_plain:
            return detached
        ys: list[Any] = [None] * len(rec.leaves)
        for j, y in zip(rec.plain, detached, strict=True):
            ys[j] = y
        leaves = rec.leaves
        for j, leaf in enumerate(leaves):
            if j % BULK_STEP == 0:
                yield
            if ys[j] is not None:
                continue
            cls, slot, offset, shape, stride, dtype, neg, _, conj, grad, spans, same = leaf
            if same >= 0:
                ys[j] = ys[same]
                continue
            buffer = slots[slot]
            if buffer is None:
                continue  # a temporary: staged on its own
            if spans:
                y = _detach(views[slot])  # type: ignore[union-attr]
            else:
                y = torch.empty((0,), dtype=dtype, device="cpu").set_(
                    buffer.storage, offset, shape, stride
                )
                if conj:
                    y = y.conj()
                if neg:
                    y = neg_view(y)
            if cls is _Parameter:
                y = _Parameter(y, requires_grad=grad)
            ys[j] = y
        return ys

    def _plain_twins(self, views: list[Any]) -> Walk:
        """The twins of the plain tensors (``rec.plain``), a step at a time: handed out again
        from an earlier call where nobody holds them and nothing changed (:mod:`._reuse`),
        else made fresh.

        The pool is the call before last's twins (:attr:`Recording.spare`), or the last
        call's when there is none yet. A spare step is let go once passed, reused or not: where
        the caller dropped that result, each step frees as many tensors as the next makes (at
        once, 50,000 frees held the loop ~20 ms). The last call's twins become the spare.
        """
        rec = self._rec
        last = rec.twins or []
        spare = rec.spare
        rec.twins = rec.spare = None
        pool = spare if spare is not None else last
        if len(pool) != len(rec.leaves):
            pool = []  # none kept (a first replay, a let_go): nothing to reuse
        checks = rec.twin_checks
        plain = rec.plain
        in_order = rec.one_to_one and rec.all_plain  # leaf j's view is views[j]
        detached: list[Any] = []
        fresh_steps = 0
        for index, start in enumerate(range(0, len(plain), BULK_STEP)):
            stop = start + BULK_STEP
            leaves: Any = (
                range(start, min(stop, len(plain))) if rec.all_plain else plain[start:stop]
            )
            check = checks[index]
            candidates: list[Any] = []
            if pool and check is not None:
                candidates = (
                    pool[start:stop] if rec.all_plain else list(map(pool.__getitem__, leaves))
                )
            if check is not None and candidates and reusable(candidates, check):
                detached += candidates
                made = False
            else:
                picked: Any = (
                    views[start:stop]
                    if in_order
                    else map(views.__getitem__, rec.plain_slots[start:stop])
                )
                if self._volatile is None:
                    fresh = list(map(_detach, picked))
                else:  # a dead storage has no view: its tensor is staged on its own
                    fresh = [None if view is None else _detach(view) for view in picked]
                if check is None:  # its guard is built in a step of its own (1-1.5 ms with these)
                    yield
                    checks[index] = check_of(fresh)
                detached += fresh
                made = True
                fresh_steps += 1
            del candidates
            if pool and (pool is spare or not made):  # let go of it, or take it out of the pool
                if rec.all_plain:
                    pool[start:stop] = repeat(None, len(leaves))
                else:
                    for j in leaves:
                        pool[j] = None
            yield
        # The last call's twins are the next pool, unless every one of them was handed out.
        keep_last = len(last) == len(rec.leaves) and (pool is not last or fresh_steps > 0)
        # What is not kept goes a step at a time too: the twins no step covers (a Parameter's,
        # a view's, one on a shared storage), 50,000 of them where every tensor is one.
        for dropped in (spare, None if keep_last else last):
            if dropped is pool and rec.all_plain:
                rec.give_shell(dropped)
                continue  # every entry was let go above, step by step
            while dropped:
                del dropped[-BULK_STEP:]
                yield
            rec.give_shell(dropped)
        self._spare = last if keep_last else None
        return detached

    def _check_bulk(self, xs: list[Any], checked: list[int] | None) -> Walk:
        rec = self._rec
        # Counted again: a storage may have died since _run_bulk counted.
        dead = rec.dead
        storages = yield from _mapped_live(_dereference, self._slots, dead)
        self._storages = storages

        def expected(values: list[Any]) -> list[Any]:
            return values if checked is None else [values[j] for j in checked]

        slot_of = expected(rec.slot_of)
        types = expected(rec.types)
        wanted = (
            expected(rec.offsets),
            expected(rec.dtypes),
            expected(rec.shapes),
            expected(rec.strides),
            expected(rec.negs),
        )
        # One tensor per storage, none complex (whose copy depends on the conj bit, checked
        # below): each step's copies reach the plan as soon as the step is checked, so that
        # the async face's worker threads copy while the loop checks the next ones.
        self._early = early = checked is None and rec.one_to_one and not rec.conj_leaves
        # Per step, once its tensors passed the checks below: one C++ call that checks their
        # types, dtypes, shapes, strides and neg bits (see metadata_guard). Steps line up with
        # the recording's only when every tensor is checked.
        guards = rec.guards if checked is None else None
        offsets = wanted[0]
        step = BULK_STEP
        for index, start in enumerate(range(0, len(xs), step)):
            part = xs[start : start + step]
            stop = start + len(part)
            guard = None if guards is None else guards[index]
            if guard is None and list(map(type, part)) != types[start:stop]:
                raise _BulkMiss  # the types first: only tensors are asked the rest
            if early:  # slot j is leaf j's storage
                expected_storages: Any = storages[start:stop]
            else:
                expected_storages = list(map(storages.__getitem__, slot_of[start:stop]))
            # Storages and nestedness before the guard: a nested tensor makes dynamo's guard
            # throw in C++ (it reads the strides, which a nested tensor has none of), which
            # ends the process (std::terminate). One that replaced a recorded tensor has a
            # storage of its own; one viewing the recorded storage itself
            # (torch.nested.as_nested_tensor(t, layout=torch.strided)) passes the storage
            # check, so each step asks is_nested too: 2% of a cached call over 50,000 small
            # tensors (2.5 ms), the price of never aborting the caller's process.
            try:  # a sparse or mkldnn tensor has none, nor has a non-tensor: it raises
                # Lists compared: identity first, then UntypedStorage's own (identity) __eq__;
                # 15 ns a tensor less than all(map(is_, ...)).
                same_storages = list(map(_storage, part)) == expected_storages
            except (RuntimeError, NotImplementedError, TypeError):
                raise _BulkMiss from None
            if not same_storages:
                raise _BulkMiss
            if any(map(_is_nested, part)):
                raise _BulkMiss
            yield  # a step is 0.3-0.5 ms on a loaded core: its guard in the next one
            guarded = guard is not None and guard(*part)
            if guard is not None and not guarded and list(map(type, part)) != types[start:stop]:
                raise _BulkMiss
            if any(map(_attributes, part)):
                raise _BulkMiss
            if guarded:
                if list(map(_storage_offset, part)) != offsets[start:stop]:
                    raise _BulkMiss
            else:
                for getter, values in zip(_GETTERS, wanted, strict=True):
                    if list(map(getter, part)) != values[start:stop]:
                        raise _BulkMiss
                if guards is not None:  # checked the long way: the next call takes the short
                    guards[index] = rec.step_guard(index, part, metadata_guard)
            if early:  # in a step of its own: with the checks, 0.5-0.95 ms on a loaded core
                yield
                self._publish_step(xs, start, stop)
            yield
        where: Any = _SAME_PLACE
        if checked is not None:
            where = {}
            for start in range(0, len(checked), BULK_STEP):
                part = checked[start : start + BULK_STEP]
                where.update(zip(part, range(start, start + len(part)), strict=True))
                yield
        for count, (j, conj) in enumerate(rec.conj_leaves, 1):
            if (checked is None or j in where) and xs[where[j]].is_conj() is not conj:
                raise _BulkMiss
            if count % BULK_STEP == 0:
                yield
        for count, (j, grad) in enumerate(rec.grad_leaves, 1):
            if (checked is None or j in where) and xs[where[j]].requires_grad is not grad:
                raise _BulkMiss
            if count % BULK_STEP == 0:
                yield
        first: dict[int, int] = {}
        for count, (j, same) in enumerate(rec.shared_leaves, 1):
            if count % BULK_STEP == 0:
                yield
            if j not in where:
                continue  # a dead storage's tensors: the tensor stager's memo shares them
            x = xs[where[j]]
            if same >= 0:
                if xs[where[same]] is not x:
                    raise _BulkMiss
            elif first.setdefault(id(x), j) != j:
                raise _BulkMiss
        self._where = where

    def _publish_bulk(self, xs: list[Any], checked: list[int] | None) -> Walk:
        """Hand the copies to the plan, in steps that yield, all at once at the end: a check
        that fails on the way leaves the plan as it was."""
        rec = self._rec
        if self._early:  # published step by step as they were checked
            self._published = rec.copy_slots
            self._published_positions = rec.copy_slots  # slot k is copy k
            return
        if checked is None and rec.one_to_one:
            return (yield from self._publish_one_to_one(xs))
        slots = self._slots
        storages = self._storages
        copy_slots = rec.copy_slots
        copy_src = rec.copy_src
        if checked is not None:  # leave out the storages that died
            keep = [i for i, k in enumerate(copy_slots) if slots[k] is not None]
            copy_slots = [copy_slots[i] for i in keep]
            copy_src = [copy_src[i] for i in keep]
            nbytes = [rec.copy_nbytes[i] for i in keep]
            yield
        else:
            nbytes = rec.copy_nbytes
        where = self._where
        whole = checked is None and rec.all_whole  # every storage copied as its first tensor
        srcs: list[Any] = []
        dsts: list[Any] = []
        buffers: list[Any] = []
        step = BULK_STEP
        for start in range(0, len(copy_slots), step):
            stop = start + step
            part = copy_slots[start:stop]
            picked: list[Any] = list(map(slots.__getitem__, part))
            if any(map(_dropped, picked)):
                raise _BulkMiss
            sources: list[Any] = list(map(storages.__getitem__, part))
            if list(map(_nbytes, sources)) != nbytes[start:stop]:
                raise Mismatch  # a storage resized in place: the walk names it
            if whole:
                srcs += map(xs.__getitem__, copy_src[start:stop])
                dsts += map(_view, picked)
            else:
                for src, buffer, storage in zip(copy_src[start:stop], picked, sources, strict=True):
                    if src >= 0:
                        srcs.append(xs[where[src]])
                        dsts.append(buffer.view)
                    else:
                        srcs.append(bytes_view(storage, buffer.device))
                        dsts.append(buffer.as_bytes())
            buffers += picked
            yield
        # Every check passed: the copies reach the plan in steps too (the driver may start
        # batches between them; nothing can fail any more).
        yield from self._hand_over(srcs, dsts, buffers, nbytes)
        yield from empty_in_steps(srcs, dsts, buffers)
        self._published = copy_slots
        if self._track:
            positions = [-1] * len(slots)
            for index, k in enumerate(copy_slots):
                positions[k] = index
            self._published_positions = positions

    def _publish_step(self, xs: list[Any], start: int, stop: int) -> None:
        """Hand the copies of leaves ``start:stop`` to the plan, in a one-to-one recording
        (slot ``j`` is leaf ``j``'s storage, copied as ``xs[j]``), once they are checked.

        A check that fails later leaves these copies in the plan, valid: ``_copy_of`` says
        where they are, for the tensor-by-tensor replay and the full walk (:meth:`adopted`).
        """
        slots = cast("list[HostBuffer]", self._slots)  # not None: see _publish_one_to_one
        part = slots[start:stop]
        self._check_slots(start, stop)
        copies = self._plan.copies
        first = len(copies)
        rec = self._rec
        # Slot k is copy k: the recording's sizes are in the same order.
        copies.extend(
            xs[start:stop], self._views[start:stop], part, rec.copy_nbytes[start:stop], rec.devices
        )
        self._copy_of[start:stop] = range(first, first + len(part))

    def _check_slots(self, start: int, stop: int) -> None:
        """Slots ``start:stop`` of a one-to-one recording still hold their buffers, and their
        storages still have the recorded sizes."""
        slots = self._slots[start:stop]
        if any(map(_dropped, slots)):
            raise _BulkMiss
        if list(map(_nbytes, self._storages[start:stop])) != self._rec.copy_nbytes[start:stop]:
            raise Mismatch  # a storage resized in place: the walk names it

    def _hand_over(
        self, srcs: list[Any], dsts: list[Any], buffers: list[Any], sizes: list[int]
    ) -> Walk:
        """Append checked copies to the plan ``EMPTY_STEP`` at a time (the driver may start
        batches between the steps; nothing can fail any more)."""
        copies = self._plan.copies
        devices = self._rec.devices
        for start in range(0, len(srcs), EMPTY_STEP):
            stop = start + EMPTY_STEP
            copies.extend(
                srcs[start:stop], dsts[start:stop], buffers[start:stop], sizes[start:stop], devices
            )
            yield

    def _publish_one_to_one(self, xs: list[Any]) -> Walk:
        """:meth:`_publish_bulk` when every tensor is a storage of its own, copied as itself
        (``Recording.one_to_one``): the copies are ``xs`` into the buffers' views."""
        rec = self._rec
        # No slot is None: _check_bulk found every storage alive and holds them (a buffer
        # leaves its slot only when its storage dies, or on clear(), refused during a call).
        slots = cast("list[HostBuffer]", self._slots)
        for start in range(0, len(slots), BULK_STEP):
            self._check_slots(start, start + BULK_STEP)
            yield
        yield from self._hand_over(xs, self._views, slots, rec.copy_nbytes)
        self._published = rec.copy_slots
        if self._track:
            self._published_positions = rec.copy_slots  # slot k is copy k

    def adopted(self) -> Adopted:
        """The storages copied so far (by ``id()``) -> their copy; the buffers of those with
        no bytes (only the tensor stager of a fallback has any: a replay copies none)."""
        empty: dict[int, HostBuffer] = {}
        copies: dict[int, int] = {}
        plan_copies = self._plan.copies
        for slot, index in enumerate(self._copy_of):
            buffer = self._slots[slot]
            if index < 0 or buffer is None:
                continue
            storage = buffer()
            if storage is None:
                continue
            copies[id(storage)] = index
            assert plan_copies.buffers[index] is buffer
        fallback = self._fallback
        if fallback is not None:
            copies.update(fallback.copy_index)
            empty.update(fallback.empty_buffers)
        return copies, empty

    def release(self) -> Walk:
        """Empty the per-tensor lists in steps: at once, the sources and twins held the loop
        2-3 ms, and the rest (50,000 copy indices, views, the ids of the containers met) 2-3 ms
        more when the replay was dropped, in the call's last step."""
        yield from empty_in_steps(
            self._xs,
            self._ys,
            self._storages,
            self._copy_of,
            self._views,
            self._seen,
            self._last_copy,
            self._same,
            self._staged_leaves,
            self._ready or [],
        )
        # Lists of copy positions, unless they are the recording's own (kept for later calls).
        for positions in (self._published, self._published_positions):
            if positions is not self._rec.copy_slots:
                yield from empty_in_steps(positions)

    def close(self) -> None:
        """Let go of the call's sources and staged twins, and break the cycle through
        ``_on_leaf`` (a bound method of this object): otherwise they would live until the
        cyclic collector ran, and the buffers would look in use (``BufferCache.in_use``)."""
        if self._fallback is not None and self._fallback_walk is not None:
            self._fallback.close()
            self._fallback_walk.close()
            self._fallback = None
            self._fallback_walk = None
        self._on_leaf = None
        self._xs = []
        self._ys = []
        self._views = []
        self._twins = None
        self._spare = None
        self._ready = self._items = self._items_spare = None
        self._storages = []
        self._staged_leaves = []
        self._same.clear()
        self._seen.clear()

    # -- containers ----------------------------------------------------------------------------

    def _register(self, x: Any) -> None:
        seen = self._seen
        before = len(seen)
        seen.add(id(x))
        if len(seen) == before:
            raise Mismatch

    def _dict_header(self, node: DictNode, x: Any) -> Any:
        if type(x) is not node.cls or not same_keys(list(x), node.keys, node.key_types):
            raise Mismatch
        return self._dict_opened(node, x)

    def _dict_opened(self, node: DictNode, x: Any) -> Any:
        """:meth:`_dict_header` once the keys are checked: the staged dict, still empty."""
        self._register(x)
        y = node.cls()
        if node.cls is dict:
            return y  # a plain dict has no instance attributes
        attributes = getattr(x, "__dict__", None)
        attrs = node.attrs
        if attrs is None:
            if attributes:
                raise Mismatch
        else:
            if not attributes or not same_keys(list(attributes), attrs.keys, attrs.key_types):
                raise Mismatch
            staged = {}
            for (name, value), child in zip(attributes.items(), attrs.children, strict=True):
                staged[name] = self._item(child, value)
            y.__dict__.update(staged)
        return y

    def _item(self, child: Any, value: Any) -> Any:
        if child is None:
            if type(value) not in ATOMIC_TYPES:
                raise Mismatch
            return value
        if type(child) is int:
            return self._on_leaf(child, value)
        return self._build(child, value)

    def _build(self, node: Any, x: Any) -> Any:
        """A small container, in one go."""
        kind = type(node)
        atomic = ATOMIC_TYPES
        leaf = self._on_leaf
        twins = self._twins  # in bulk, with no temporary: collect the source, place its twin
        if twins is not None and kind is not TupleNode and (node.span or node.group):
            return self._small_in_bulk(node, x, twins)
        collect = self._xs.append
        if kind is DictNode:
            y = self._dict_header(node, x)
            for (key, value), child in zip(x.items(), node.children, strict=True):
                if child is None:
                    if type(value) not in atomic:
                        raise Mismatch
                    y[key] = value
                elif type(child) is int:
                    if twins is None:
                        y[key] = leaf(child, value)
                    else:
                        collect(value)
                        y[key] = twins[child]
                else:
                    y[key] = self._build(child, value)
            return y
        if kind is ListNode:
            if type(x) is not list:
                raise Mismatch
            self._register(x)
            if node.atoms:
                if not set(map(type, x)) <= atomic:
                    raise Mismatch
                return list(x)
            if len(x) != len(node.children):
                raise Mismatch
            return [self._item(child, value) for child, value in zip(node.children, x, strict=True)]
        if type(x) is not tuple or len(x) != len(node.children):
            raise Mismatch
        items = [self._item(child, value) for child, value in zip(node.children, x, strict=True)]
        if not node.rebuilt:
            return x  # atoms only: the tuple is its own copy, as in the walk
        self._register(x)
        return tuple(items)

    # -- containers in bulk (every tensor alive: twins made ahead, checked afterwards) --------

    def _open_in_bulk(self, node: Any, x: Any) -> tuple[Any, list[Any], list[Any]]:
        """Check a container's own shape; its staged copy (empty), its keys and its values."""
        if type(node) is DictNode:
            y = self._dict_header(node, x)
            return y, list(x), list(x.values())
        if type(x) is not list or len(x) != len(node.children):
            raise Mismatch
        self._register(x)
        return [], [], list(x)

    def _open_big_in_bulk(self, node: Any, x: Any) -> Walk:
        """:meth:`_open_in_bulk` for a large container, its keys checked in steps: over 16,667
        keys, the checks held the loop ~0.9 ms in one go."""
        if type(node) is not DictNode:
            return self._open_in_bulk(node, x)
        if type(x) is not node.cls:
            raise Mismatch
        keys, values = list(x), list(x.values())  # in one step: the same dict
        yield
        expected, expected_types = node.keys, node.key_types
        if len(keys) != len(expected):
            raise Mismatch
        for start in range(0, len(keys), EMPTY_STEP):
            stop = start + EMPTY_STEP
            if not same_keys(keys[start:stop], expected[start:stop], expected_types[start:stop]):
                raise Mismatch
            yield
        return self._dict_opened(node, x), keys, values

    def _small_in_bulk(self, node: Any, x: Any, twins: list[Any]) -> Any:
        """A small container of tensors only (its values are the sources, in leaf order: their
        types and metadata are checked with all the others, by :meth:`_check_bulk`), or of
        like dicts of tensors only (a :class:`Group`)."""
        y, keys, values = self._open_in_bulk(node, x)
        if node.group is not None:
            self._group_items(node, y, keys, values, 0, len(values), twins)
            return y
        first, stop = node.span
        self._xs += values
        if type(node) is DictNode:
            y.update(zip(keys, twins[first:stop], strict=True))
            return y
        return twins[first:stop]

    def _big_span_in_bulk(self, node: Any, x: Any, twins: list[Any]) -> Walk:
        """:meth:`_span_in_bulk` for a large one, in steps."""
        y, keys, values = yield from self._open_big_in_bulk(node, x)
        first = node.span[0]
        xs = self._xs
        dict_node = type(node) is DictNode
        for start in range(0, len(values), BULK_STEP):
            stop = start + BULK_STEP
            xs += values[start:stop]
            placed = twins[first + start : first + min(stop, len(values))]
            if dict_node:
                y.update(zip(keys[start:stop], placed, strict=True))
            else:
                y += placed
            yield
        self._work = 0
        return y

    def _group_in_bulk(self, node: Any, x: Any, twins: list[Any]) -> Walk:
        """A large container of like dicts (see :class:`Group`), a few hundred at a time."""
        y, keys, values = yield from self._open_big_in_bulk(node, x)
        step = max(1, BULK_STEP // len(node.group.keys))
        for start in range(0, len(values), step):
            self._group_items(node, y, keys, values, start, start + step, twins)
            yield
        self._work = 0
        return y

    def _group_items(  # noqa: PLR0917 - one step of _group_in_bulk
        self,
        node: Any,
        y: Any,
        keys: list[Any],
        values: list[Any],
        start: int,
        stop: int,
        twins: list[Any],
    ) -> None:
        """Items ``start:stop`` of a :class:`Group`, into ``y``.

        Per item, the checks :meth:`_build` makes, a handful of C calls for all of them:
        exactly a ``dict``, the recorded keys in order and of the recorded type, met once in
        the call. Its values are the sources, in leaf order; its staged copy pairs its own keys
        with their twins.
        """
        group = node.group
        width = len(group.keys)
        part = values[start:stop]
        if not all(map(_is, map(type, part), repeat(dict))):
            raise Mismatch
        # The keys' types before the keys (see same_keys): then only atoms are compared.
        if not all(map(_is, map(type, chain.from_iterable(part)), repeat(group.key_type))):
            raise Mismatch
        try:
            same = all(map(group.keys.__eq__, map(tuple, part)))
        except Exception:  # noqa: BLE001 - an atom's own __eq__ failed (see same_keys)
            same = False
        if not same:
            raise Mismatch
        seen = self._seen
        before = len(seen)
        seen.update(map(id, part))
        if len(seen) - before != len(part):
            raise Mismatch  # an item met twice: the walk would share its copy
        self._xs += chain.from_iterable(map(dict.values, part))
        low = group.first + start * width
        placed = twins[low : low + len(part) * width]
        pairs = map(zip, part, zip(*[iter(placed)] * width, strict=True))
        at = group.items_at + start
        ready = self._ready[at : at + len(part)] if self._ready is not None else None
        if not ready:
            built: list[Any] = list(map(_new_dict, pairs))
        elif not any(map(_is_none, ready)):  # kept dicts nobody holds, emptied
            for _ in map(dict.update, ready, pairs):
                pass
            built = ready
        else:  # some held by the caller (or let go): new ones in their place
            built = list(map(_filled, ready, pairs))
        items = self._items
        if items is not None:
            items[at : at + len(part)] = built
        if type(node) is DictNode:
            y.update(zip(keys[start:stop], built, strict=True))
        else:
            y += built

    def _atoms(self, x: Any) -> Walk:
        """A long list of atoms: copied, then its items' types checked in steps."""
        if type(x) is not list:
            raise Mismatch
        self._register(x)
        y = list(x)  # checked on our copy: what is returned is what was checked
        atomic = ATOMIC_TYPES
        for start in range(0, len(y), EMPTY_STEP):
            if not set(map(type, y[start : start + EMPTY_STEP])) <= atomic:
                raise Mismatch
            yield
        return y

    def _build_big(self, node: Any, x: Any) -> Walk:
        """A large container: yields every :data:`CHUNK` items."""
        kind = type(node)
        if kind is ListNode and node.atoms:
            return (yield from self._atoms(x))
        twins = self._twins
        if twins is not None and kind is not TupleNode:
            if node.group is not None:
                return (yield from self._group_in_bulk(node, x, twins))
            if node.span is not None:
                return (yield from self._big_span_in_bulk(node, x, twins))
        if kind is DictNode:
            y: Any = self._dict_header(node, x)
            pairs: Any = zip(x.items(), node.children, strict=True)
        else:
            if type(x) is not (list if kind is ListNode else tuple):
                raise Mismatch
            if len(x) != len(node.children):
                raise Mismatch
            if kind is ListNode:
                self._register(x)
            y = []
            pairs = zip(enumerate(x), node.children, strict=True)
        atomic = ATOMIC_TYPES
        leaf = self._on_leaf
        build = self._build
        work = self._work
        for (key, value), child in pairs:
            # Inlined _item(): a small child is built without a generator of its own.
            if child is None:
                if type(value) not in atomic:
                    raise Mismatch
                staged = value
                work += 1
            elif type(child) is int:
                staged = leaf(child, value)
                work += 1
            elif child.size <= SMALL:
                staged = build(child, value)
                work += child.size
            else:
                self._work = work
                staged = yield from self._build_big(child, value)
                work = self._work
            if kind is DictNode:
                y[key] = staged
            else:
                y.append(staged)
            if work >= CHUNK:
                work = 0
                yield
        self._work = work
        if kind is DictNode or kind is ListNode:
            return y
        if not node.rebuilt:
            return x  # atoms only: the tuple is its own copy, as in the walk
        self._register(x)
        return tuple(y)

    # -- tensors -------------------------------------------------------------------------------

    def _leaf(self, index: int, x: Any) -> torch.Tensor:
        (cls, slot, offset, shape, stride, dtype, neg, complex_, conj, grad, spans, same) = (
            self._leaves[index]
        )
        if type(x) is not cls or x.__dict__:
            return self._unknown(index, x)
        try:
            storage = x.untyped_storage()
        except (RuntimeError, NotImplementedError):
            raise Mismatch from None
        buffer = self._slots[slot]
        if buffer is None or buffer() is not storage:
            return self._unknown(index, x)
        try:
            changed = (
                x.storage_offset() != offset
                or x.dtype is not dtype
                or x.shape != shape
                or x.stride() != stride
                or x.is_neg() is not neg
                or (complex_ and x.is_conj() is not conj)
                or (cls is _Parameter and x.requires_grad is not grad)
            )
        except (RuntimeError, NotImplementedError):
            # A nested tensor over the recorded storage has no sizes to read: the walk
            # refuses it, naming its path (a raw RuntimeError escaped here).
            raise Mismatch from None
        if changed:
            raise Mismatch  # changed in place over a recorded storage
        copy_of = self._copy_of
        copy = copy_of[slot]
        if copy == -2:  # the first tensor of this storage in this call: add its copy
            if storage.nbytes() != buffer.nbytes or buffer.dropped:
                raise Mismatch  # resized in place (the walk names it), or evicted
            if buffer.nbytes:
                if self._src_leaf[slot] == index:
                    src, dst = x, buffer.view
                else:
                    src, dst = bytes_view(storage, x.device), buffer.as_bytes()
                copy = self._plan.copies.add(src, dst, buffer)  # type: ignore[arg-type]
            else:
                copy = -1
            copy_of[slot] = copy
        self._tensors += 1
        if self._slot_users[slot] > 1:
            return self._shared_leaf(index, x, same, buffer, spans, copy)
        y = _detach(buffer.view) if spans else self._view(x, buffer, neg, conj)  # type: ignore[arg-type]
        if cls is _Parameter:
            y = _Parameter(y, requires_grad=grad)
        if self._track:
            self._last_copy[index] = copy
            self._staged_leaves.append((index, y))
        return y

    def _view(self, x: torch.Tensor, buffer: HostBuffer, neg: bool, conj: bool) -> torch.Tensor:
        y = view_on(buffer, x)
        if conj:
            y = y.conj()
        if neg:
            y = neg_view(y)
        return y

    def _shared_leaf(  # noqa: PLR0917 - the hot path's locals, passed on
        self, index: int, x: torch.Tensor, same: int, buffer: HostBuffer, spans: bool, copy: int
    ) -> torch.Tensor:
        """A tensor on a storage other tensors use too: the same object gives the same copy."""
        if same >= 0:
            earlier = self._same.get(same)
            if earlier is None or earlier[0] is not x:
                raise Mismatch
            y = earlier[1]
        else:
            (cls, _, _, _, _, _, neg, _, conj, grad, _, _) = self._leaves[index]
            y = _detach(buffer.view) if spans else self._view(x, buffer, neg, conj)  # type: ignore[arg-type]
            if cls is _Parameter:
                y = _Parameter(y, requires_grad=grad)
        self._same[index] = (x, y)
        if self._track:
            self._last_copy[index] = copy
            self._staged_leaves.append((index, y))
        return y

    def _check_identities(self) -> None:
        """Tensors recorded as distinct objects on a shared storage must still be distinct."""
        leaves = self._leaves
        distinct = [x for index, (x, _) in self._same.items() if leaves[index][11] < 0]
        if len({id(x) for x in distinct}) != len(distinct):
            raise Mismatch

    def _unknown(self, index: int, x: Any) -> torch.Tensor:
        """A tensor that is not the recorded one: staged on its own if its storage is new."""
        if type(x) is not _Tensor and type(x) is not _Parameter:
            raise Mismatch
        if x.layout is not _strided or x.__dict__:
            raise Mismatch
        try:
            storage = x.untyped_storage()
        except (RuntimeError, NotImplementedError):
            raise Mismatch from None
        stager = self._fallback
        # Only a storage no call has staged yet (a temporary) is staged on its own: one that
        # has a buffer is a recorded one, or a swap that outlived a call (then the walk records
        # the new structure).
        met = stager is not None and id(storage) in stager.copy_index
        if not met and self._cache.get(storage) is not None:
            raise Mismatch
        if stager is None:
            stager = self._make_fallback()
        return stager.leaf(x, self._rec.paths[index])

    def _make_fallback(self) -> TensorStager:
        walk = DeepCopy()
        stager = TensorStager(
            self._cache,
            self._plan,
            memo=walk.memo,
            keep_alive=walk.keep_alive,
            visit=walk.visit_now,
        )
        walk.stage_tensors_with(stager)
        self._fallback, self._fallback_walk = stager, walk
        return stager


MAX_RECORDINGS = 4
"""Structures remembered per cache: a stager that alternates a few state dicts replays each."""
RECORD_BACKOFF = 8
"""Full walks that skip recording after a state dict could not be recorded."""


def walk_or_replay(cache: BufferCache, state_dict: Any, plan: Plan) -> Walk:
    """Fill ``plan`` from ``state_dict``: replayed when a recording fits, else walked in full.

    A full walk records the structure for the next call, unless the cache records none
    (``StagingOptions.replay``). The generator returns the plan.
    """
    adopted = None
    for recording in cache.replays:
        if not recording.fits_root(state_dict):
            continue
        replayed = Replay(recording, cache, plan)
        try:
            plan.result = yield from replayed.run(state_dict)
            yield from replayed.release()
        except (Mismatch, RecursionError):  # the full walk names a nesting too deep for it
            adopted = replayed.adopted()
            plan.leaves.clear()
            plan.tensors = 0
            cache.replays = tuple(r for r in cache.replays if r is not recording)
            break
        finally:
            replayed.close()
        plan.replayed = plan.done = True
        replays = cache.replays
        if recording in replays[1:]:  # newest first; one that clear() dropped stays dropped
            cache.replays = (recording, *(r for r in replays if r is not recording))
        return plan
    if not cache.record or cache.record_backoff > 0:  # a walk that records nothing
        yield from build_plan(cache, state_dict, plan, adopted=adopted)
        if cache.record_backoff > 0:  # only a recording cache backs off
            cache.record_backoff -= 1
        return plan
    recorder = ReplayRecorder(cache, guards=plan.ahead)
    yield from build_plan(cache, state_dict, plan, adopted=adopted, recorder=recorder)
    recording = yield from recorder.finish()
    if recording is None:
        cache.record_backoff = RECORD_BACKOFF
    else:
        cache.replays = (recording, *cache.replays[: MAX_RECORDINGS - 1])
    return plan
