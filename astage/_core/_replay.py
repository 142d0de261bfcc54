"""Replay: stage a state dict shaped like an earlier one without walking it again.

A cached call spends its time in the deep-copy walk, not in the copies: ~15 C calls, two dict
stores and the memo per tensor. Most callers stage the same structure every time (a model's or an
optimizer's ``state_dict()``, rebuilt each call with the same keys over the same storages), so
a full walk has a recorder (:class:`_Recorder`) write down what it stages, as it goes: every
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

import contextlib
import operator
from collections.abc import Generator
from functools import partial
from itertools import chain, repeat
from typing import Any, NamedTuple, cast

import torch

from .._paths import Path
from .._torch import MetadataGuard, detached, metadata_guard, neg_view
from ._cache import BufferCache, HostBuffer
from ._plan import Leaf, Plan
from ._reuse import (
    TwinCheck,
    check_of,
    count_own_uses,
    counts_tell_holders,
    emptied_unheld,
    empty_unheld_dicts,
    reusable,
)
from ._tables import EMPTY_STEP, LEAD_AFTER, empty_in_steps, give_lead
from ._tensors import Adopted, TensorFacts, TensorStager, bytes_view, view_on
from ._walk import ATOMIC_TYPES, DeepCopy, Unrecordable, build_plan

Walk = Generator[None, None, Any]

CHUNK = 64
"""Items (atoms, tensors) replayed between two chances for the driver to yield."""
SMALL = 64
"""A container with at most this many items below it is replayed without yielding."""

_Tensor = torch.Tensor
_Parameter = torch.nn.Parameter
_strided = torch.strided


class Mismatch(Exception):
    """The state dict no longer has the recorded structure: walk it in full."""


class _BulkMiss(Exception):
    """A tensor differs from the recording: check them one by one instead."""


_BULK_STEP = 256
"""Tensors per bulk step. A step holds the loop: 256 detaches or metadata reads take 0.1-0.3 ms
on a quiet machine, 1024 took 8-20 ms on a loaded one (measured on this project's 2 cores)."""
_FRESH_RUN = _BULK_STEP // 2
"""Tensors a first call records at once (see :meth:`_Recorder._record_fresh`): half a bulk step,
since the walk step it falls in reads as many buffers of its own."""
_detach: Any = detached
_storage = torch.Tensor.untyped_storage
_attributes = operator.attrgetter("__dict__")
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


def _mapped(function: Any, items: list[Any]) -> Generator[None, None, list[Any]]:
    """``list(map(function, items))``, yielding every :data:`_BULK_STEP` items."""
    out: list[Any] = []
    for start in range(0, len(items), _BULK_STEP):
        out += map(function, items[start : start + _BULK_STEP])
        yield
    return out


def _mapped_live(function: Any, buffers: list[Any], dead: int) -> Generator[None, None, list[Any]]:
    """:func:`_mapped` over buffers of which ``dead`` are ``None`` (evicted): ``None`` for those.

    ``function`` reads an attribute of a buffer, or is a buffer's own call: on ``None``, it
    raises AttributeError or TypeError. With ``dead`` 0 none is expected; one that a source's
    death emptied since it was counted (an eviction in another thread, or on the loop between
    two steps) sends the map the slow way, from the start.
    """
    if not dead:
        try:
            return (yield from _mapped(function, buffers))
        except (AttributeError, TypeError):
            pass
    out: list[Any] = []
    for start in range(0, len(buffers), _BULK_STEP):
        part = buffers[start : start + _BULK_STEP]
        out += [None if buffer is None else function(buffer) for buffer in part]
        yield
    return out


_dereference: Any = HostBuffer.__call__  # a buffer is the weak reference to its source storage


# -- a recording ---------------------------------------------------------------------------------


class DictNode:
    """A ``dict`` or ``OrderedDict``: its keys (and their types) and what each value was."""

    __slots__ = ("attrs", "children", "cls", "group", "key_types", "keys", "size", "span")

    def __init__(  # noqa: PLR0917 - built in one place, by the recorder
        self,
        cls: type,
        keys: list[Any],
        key_types: list[type],
        children: list[Any],
        attrs: Any,
        size: int,
        span: tuple[int, int] | None,
    ) -> None:
        self.cls: Any = cls
        self.keys = keys
        self.key_types = key_types
        self.children = children
        self.attrs: DictNode | None = attrs
        """The instance attributes (``_metadata`` on ``Module.state_dict()``), as a dict."""
        self.size = size + (attrs.size if attrs is not None else 0)
        self.span = span
        self.group: Group | None = None


class ListNode:
    """A list: what each item was; ``atoms`` when every item is atomic (any length then)."""

    __slots__ = ("atoms", "children", "group", "size", "span")

    def __init__(
        self, children: list[Any], atoms: bool, size: int, span: tuple[int, int] | None
    ) -> None:
        self.atoms = atoms
        self.children = children
        self.span = span
        self.group: Group | None = None
        # A long list of atoms (an optimizer's param ids) counts as its length in chunks, so
        # that a replay checks it in steps (see Replay._atoms).
        self.size = 1 + len(children) // CHUNK if atoms else size


class TupleNode:
    """A tuple; ``rebuilt`` when the walk made a new one (something mutable inside)."""

    __slots__ = ("children", "rebuilt", "size")

    def __init__(self, children: list[Any], rebuilt: bool, size: int) -> None:
        self.children = children
        self.rebuilt = rebuilt
        self.size = size


def _sizes(children: list[Any]) -> int:
    """The items below a container: 1 per atom or tensor, a node's own count for a node."""
    return len(children) + int(sum([child.size - 1 for child in children if type(child) in _NODES]))


_NODES = (DictNode, ListNode, TupleNode)


_SUMMARY_STEP = 1024
"""Children summed up between two yields by :func:`_summary` (a Python pass over 50,000
children in one go held the loop 10-18 ms at the end of a first call)."""


class Summary(NamedTuple):
    atoms: bool
    """Every child is an atom."""
    size: int
    """See :func:`_sizes`."""
    span: tuple[int, int] | None
    """``(first, stop)`` when every child is a tensor and their leaves follow one another.
    Such a container (a ``Module.state_dict()``, an optimizer's per-parameter state) is
    replayed in bulk without a look at each item: its values are the sources of leaves
    ``first..stop-1`` in order, and its staged copy pairs its keys with their twins."""


def _first_leaf(children: list[Any]) -> int:
    """The leaf of the first child when it is a tensor, else -1 (leaves count from 0)."""
    head = children[0] if children else None
    return head if type(head) is int else -1


def _summed(part: list[Any], first: int, start: int) -> tuple[bool, int, bool]:
    """Of children ``start..`` (``part``): all atoms, their size, leaves ``first + start..``
    in a row (never when ``first`` is -1)."""
    in_row = first >= 0 and part == list(range(first + start, first + start + len(part)))
    return part.count(None) == len(part), _sizes(part), in_row


def _summary(children: list[Any]) -> Generator[None, None, Summary]:
    """A container's :class:`Summary`, yielding between every :data:`_SUMMARY_STEP` children."""
    count = len(children)
    first = _first_leaf(children)
    atoms = in_row = True
    size = 0
    for start in range(0, count, _SUMMARY_STEP):
        if start:
            yield
        part_atoms, part_size, part_in_row = _summed(
            children[start : start + _SUMMARY_STEP], first, start
        )
        atoms = atoms and part_atoms
        size += part_size
        in_row = in_row and part_in_row
    span = (first, first + count) if in_row and first >= 0 else None
    return Summary(atoms, size, span)


_tuple_new: Any = tuple.__new__


def _summary_now(children: list[Any]) -> Summary:
    """:func:`_summary` of a small container (at most :data:`~._walk.SMALL_CONTAINER` children)."""
    count = len(children)
    head = children[0] if children else None
    if type(head) is int and children == list(range(head, head + count)):
        # Tensors only, their leaves in a row (a Module.state_dict(), a parameter's optimizer
        # state): 0.4 us rather than the 1.7 us of the general sums. The tuple is made
        # directly: Summary(...) goes through a Python __new__, another 0.3-0.5 us per call
        # over 16,667 optimizer-state dicts.
        summary: Summary = _tuple_new(Summary, (False, count, (head, head + count)))
        return summary
    first = _first_leaf(children)
    atoms, size, in_row = _summed(children, first, 0)
    return Summary(atoms, size, (first, first + count) if in_row else None)


class Group(NamedTuple):
    """A container whose items are all plain dicts with the same keys of one type, each
    holding only tensors, with their leaves in a row (an optimizer's ``state``).

    Replayed in bulk, a few hundred items at a time with a handful of C calls each, rather than
    one Python frame and a dozen calls per item.
    """

    keys: tuple[Any, ...]
    key_type: type
    first: int
    """The first leaf of the first item; item ``i`` holds leaves ``first + i * len(keys)``..."""
    items_at: int = 0
    """Where its items' staged dicts start in :attr:`Recording.items` (set by the recorder)."""


def _group_head(children: list[Any]) -> Group | None:
    """The :class:`Group` that ``children`` form if the others match the first; None when
    the first child cannot head one."""
    if len(children) < 2 or type(children[0]) is not DictNode:
        return None
    head = children[0]
    keys = tuple(head.keys)
    if head.span is None or not keys or len(set(head.key_types)) != 1:
        return None
    return Group(keys, head.key_types[0], head.span[0])


def _in_group(children: list[Any], start: int, stop: int, group: Group) -> bool:
    """Whether children ``start..stop-1`` match the first one as items of ``group``."""
    head = children[0]
    width = len(group.keys)
    first = group.first
    for index in range(start, stop):
        child = children[index]
        if (
            type(child) is not DictNode
            or child.cls is not dict
            or child.attrs is not None
            or child.span != (first + index * width, first + (index + 1) * width)
            or child.key_types != head.key_types
            or child.keys != head.keys
        ):
            return False
    return True


def _group_of(children: list[Any]) -> Walk:
    """The :class:`Group` that ``children`` form, or None; yields every :data:`CHUNK` items."""
    group = _group_head(children)
    if group is None:
        return None
    for start in range(0, len(children), CHUNK):
        yield
        if not _in_group(children, start, min(start + CHUNK, len(children)), group):
            return None
    return group


def _group_now(children: list[Any]) -> Group | None:
    """:func:`_group_of` of a small container (at most :data:`~._walk.SMALL_CONTAINER` children)."""
    group = _group_head(children)
    if group is None or not _in_group(children, 0, len(children), group):
        return None
    return group


class Recording:
    """The structure of one state dict as a full walk staged it, replayable on a later call.

    Children of a node are ``None`` (an atomic value), an ``int`` (the index of a tensor in
    :attr:`leaves`) or a node. Host buffers are held per storage *slot*; a buffer evicted from the
    cache is forgotten here too (:meth:`forget`), so a recording never keeps host memory alive.
    """

    def __init__(self) -> None:
        self.root: Any = None
        self.leaves: list[tuple[Any, ...]] = []
        """Per tensor: type, slot, storage offset, shape, stride, dtype, neg bit, whether the
        conj bit matters (complex), conj bit, requires_grad (a ``Parameter``'s; False for a plain
        tensor, whose staged twin is detached), whether it spans its buffer's
        view, and on a storage that other tensors use too, the index of an earlier tensor that
        was the same object, or -1."""
        self.paths: list[Path] = []
        self.slots: list[HostBuffer | None] = []
        self.slot_by_key: dict[int, int] = {}
        """``id()`` of a recorded source storage -> its slot."""
        self.forgotten: list[int] = []
        """The slots :meth:`forget` emptied, so far. Counted as they are emptied rather than
        by a pass over the slots, made twice a call: ``slots.count(None)`` reads every buffer
        (a weak reference, compared to ``None`` through its rich comparison); dropping the
        passes made a cached call over 50,000 tensors 1-5% faster (CPU time, four paired runs,
        2.6% on average). A list: ``append`` is one atomic step, so evictions in two threads
        at once are both counted."""
        self.src_leaf: list[int] = []
        """Per slot: the tensor whose copy fills the whole buffer as itself, or -1 (bytes)."""
        self.conj_leaves: list[tuple[int, bool]] = []
        """``(leaf, conj bit)`` of every complex tensor: the one bit a bulk check reads apart."""
        self.grad_leaves: list[tuple[int, bool]] = []
        """``(leaf, requires_grad)`` of every ``Parameter``."""
        self.slot_users: list[int] = []
        """Per slot: how many tensors use its storage (1: alone, no identity check needed)."""
        self.first_leaf: list[int] = []
        """Per slot: the first tensor on its storage (the only one where ``slot_users`` is 1)."""
        self.shared_leaves: list[tuple[int, int]] = []
        """``(leaf, same)`` of every tensor on a storage that other tensors use too."""
        self.plain: list[int] = []
        """The tensors whose twin is a ``detach()`` of their buffer's view: plain ``Tensor``,
        spanning their buffer, alone on their storage."""
        self.plain_slots: list[int] = []
        """Their slots, in the same order."""
        self.slot_nbytes: list[int] = []
        """Per slot: its buffer's size."""
        self.devices: set[torch.device] = set()
        """The devices of the recorded storages that have bytes (filled slot by slot)."""
        self.guards: list[MetadataGuard | None] = []
        """Per step of :data:`_BULK_STEP` tensors: a C++ check of their metadata, made once a
        replay checked them the long way (see :meth:`Replay._check_bulk`); None until then."""
        self.twins: list[Any] | None = None
        """The staged tensors of the last call that recorded or replayed this structure, per
        tensor (``None`` for one staged on its own). The next replay makes them the
        :attr:`spare`, the one after hands out those nobody holds (see
        :meth:`Replay._plain_twins`) and lets go of the rest; :meth:`let_go` drops them at once.

        Kept so that a caller who drops a staged result frees only its containers: freeing
        50,000 tensors at once held the loop 19-28 ms there, and left ~50,000 chunks in glibc's
        unsorted bin, which the next malloc of 1 KiB or more sorts 10,000 at a time (1.6 ms
        each, five times over, in the first steps of the next call). Let go a step at a time
        while the replay makes as many new twins, each frees a chunk that the next one reuses.
        They hold no host memory that the cache does not: a buffer that leaves the cache
        (:meth:`forget`) takes the ones on it along."""
        self.spare: list[Any] | None = None
        """The staged tensors of the call before :attr:`twins`' (those a replay did not hand out
        again), per tensor like :attr:`twins`: a caller that keeps each result until the next
        call returns (``staged = stage(sd)`` in a loop) holds the last call's twins, but no
        longer the ones before. A replay hands out those nobody holds (see :mod:`._reuse`)."""
        self.items: list[Any] | None = None
        """The staged item dicts of every :class:`Group` in the last call's result, the groups
        one after the other (see :attr:`Group.items_at`); None where a call made none. Like
        :attr:`twins`: the next replay makes them :attr:`items_spare`, the one after empties
        those nobody holds and fills them with its own twins (:func:`~._reuse.emptied_unheld`),
        so that a cached call over an optimizer's state makes no new dicts."""
        self.items_spare: list[Any] | None = None
        """The item dicts of the call before :attr:`items`' (those not handed out again)."""
        self.shells: list[list[Any]] = []
        """Empty lists that held kept tensors or dicts, for the next replay's own (at most
        :data:`_SHELLS`). A list of 50,000 tensors made anew each call is young: each young
        collection of the cyclic collector then visits every one of its entries (0.3-2 ms),
        until it is promoted; and once a cached call leaves too few new objects to be filed
        into the oldest generation (see ``_drivers/_gc.py``), each call left two such lists.
        A list kept and reused grows old once."""
        self.item_count = 0
        """Items of all the groups: the length of :attr:`items`."""
        self.group_spans: list[tuple[int, int, int, int]] = []
        """Per group: its first leaf, the leaf after its last, :attr:`Group.items_at` and its
        width, to find the kept dict that holds a given leaf's twin (:meth:`forget`)."""
        self.twin_checks: list[TwinCheck | None] = []
        """Per step of :data:`_BULK_STEP` plain twins: what they were when a replay made them
        (None until then), checked before they are handed out again."""
        self.one_to_one = True
        """One tensor per storage, each spanning its buffer, slot ``j`` leaf ``j``'s, none
        empty (many small tensors, each its own storage): the copies are then the sources
        themselves into their buffers' views, in leaf order, with no list to pick them from.
        Kept by the recorder as it goes (False at the first tensor that breaks it): a pass
        over the finished lists to find it out cost a first call over 50,000 tensors ~8 ms."""

    def prepare_bulk(self) -> Walk:
        """The per-tensor expectations as parallel lists, for the bulk check (see Replay).

        A generator: each list takes a few milliseconds over 50,000 tensors, so the driver may
        hand the loop back between them. The sparse lists (complex, ``Parameter``, shared and
        plain tensors) were filled by the recorder as it went.
        """
        leaves = self.leaves
        count = len(leaves)
        self.guards = [None] * -(-count // _BULK_STEP)
        self.twin_checks = [None] * -(-len(self.plain) // _BULK_STEP)
        self.all_plain = len(self.plain) == count
        if self.one_to_one and self.all_plain:
            # Every tensor a plain one spanning a storage of its own, in slot order (many small
            # tensors): only the shapes, strides and dtypes differ from tensor to tensor.
            self.copy_slots = self.copy_src = self.slot_of = self.plain
            self.types = [_Tensor] * count
            self.offsets = [0] * count
            self.negs = [False] * count
            self.shapes = yield from _mapped(operator.itemgetter(3), leaves)
            self.strides = yield from _mapped(operator.itemgetter(4), leaves)
            self.dtypes = yield from _mapped(operator.itemgetter(5), leaves)
            self.all_whole = True
            self.copy_nbytes = self.slot_nbytes
            return
        columns = []
        for column in range(7):
            columns.append((yield from _mapped(operator.itemgetter(column), leaves)))
        (self.types, self.slot_of, self.offsets, self.shapes, self.strides, self.dtypes) = columns[
            :6
        ]
        self.negs = columns[6]
        yield
        slots = self.slots
        if self.one_to_one:  # known from the recorder: the lists below are 0..n-1 and per slot
            self.copy_slots = self.copy_src = list(range(len(slots)))
            self.all_whole = True
            self.copy_nbytes = self.slot_nbytes
            return
        sizes = self.slot_nbytes
        copy_slots: list[int] = []
        for start in range(0, len(slots), _BULK_STEP):
            stop = min(start + _BULK_STEP, len(slots))
            copy_slots += [k for k in range(start, stop) if sizes[k] and slots[k] is not None]
            yield
        self.copy_slots = copy_slots
        self.copy_src = yield from _mapped(self.src_leaf.__getitem__, copy_slots)
        self.all_whole = min(self.copy_src, default=0) >= 0
        self.copy_nbytes = yield from _mapped(sizes.__getitem__, copy_slots)

    def forget(self, buffer: HostBuffer) -> None:
        """``buffer`` left the cache: drop it from its slot (any thread; atomic steps)."""
        slot = self.slot_by_key.get(buffer.key)
        if slot is not None and self.slots[slot] is buffer:
            # Counted before the store: whoever reads a None slot and then the count sees
            # it counted (a replay in progress checks this, see Replay._make_twins).
            self.forgotten.append(slot)
            self.slots[slot] = None
            self._forget_twins(slot)

    def _forget_twins(self, slot: int) -> None:
        """Let go of the kept twins on ``slot``'s buffer: the one tensor alone on it, or (a
        storage several tensors share) all of them. Not all at once in the common case: this
        runs in whatever thread dropped the source (training's, when a per-call temporary such
        as an RNG state dies), where freeing 50,000 tensors took ~20 ms."""
        alone = self.slot_users[slot] == 1
        if not alone:
            self.let_go()
            return
        leaf = self.first_leaf[slot]
        # A list read here may be emptied meanwhile by a replay in another thread that is done
        # with it (give_shell): nothing is then left in it to let go of.
        for twins in (self.twins, self.spare):  # set only on a finished recording
            if twins is not None:
                with contextlib.suppress(IndexError):
                    twins[leaf] = None
        # A kept item dict holds its twins too: the one that holds this leaf's goes with it.
        for first, stop, items_at, width in self.group_spans:
            if first <= leaf < stop:
                for items in (self.items, self.items_spare):
                    if items is not None:
                        with contextlib.suppress(IndexError):
                            items[items_at + (leaf - first) // width] = None
                break

    def keep(
        self,
        twins: list[Any],
        dead: int,
        spare: list[Any] | None = None,
        items: list[Any] | None = None,
        items_spare: list[Any] | None = None,
    ) -> None:
        """Keep ``twins`` as :attr:`twins` (and ``spare``, and the item dicts), unless a slot
        was forgotten since ``dead`` were counted: one of them may then be a view of a buffer
        that left the cache. Checked after the store, since :meth:`forget` counts before it
        lets go."""
        self.twins = twins
        self.spare = spare
        self.items = items
        self.items_spare = items_spare
        if self.dead != dead:
            self.let_go()

    def shell(self) -> list[Any]:
        """An empty list for a replay's kept tensors or dicts: one the recording used before,
        else a new one."""
        shells = self.shells
        return shells.pop() if shells else []

    def give_shell(self, used: list[Any] | None) -> None:
        """Take back ``used`` (a list of kept tensors or dicts that nothing reads any more),
        emptied, for a later :meth:`shell`."""
        if used is not None and len(self.shells) < _SHELLS:
            used.clear()
            self.shells.append(used)

    def let_go(self) -> None:
        """Drop the staged tensors and dicts kept for later calls now."""
        self.twins = self.spare = self.items = self.items_spare = None

    def let_go_of_uncounted(self) -> None:
        """Drop what ``in_use()`` will not discount, before it counts the buffers' uses: the
        call before last's staged tensors and dicts (:attr:`spare`), the last call's tensors
        that are not plain, and, where reference counts tell nothing, all of the last call's.
        Kept dicts nobody else holds are emptied (:func:`~._reuse.empty_unheld_dicts`), so
        that what they held either dies or reads as unheld.

        A caller that finds the buffers free holds nothing of the last call either, so the
        next replay hands out the last call's; a recording whose buffers are polled this way
        then keeps one generation rather than two (half the tensors to count, each call).
        """
        self.spare = self.items_spare = None
        if not counts_tell_holders():
            self.let_go()
            return
        empty_unheld_dicts(self.items)
        twins = self.twins
        if twins is not None and not self.all_plain:
            # Only plain twins are handed out again (Replay._plain_twins); the others are kept
            # to be let go a step at a time. Some of them hold a second use of their storage
            # that no count here would tell from a reader's: a negative or conjugate view
            # keeps, in C++, the base it was made from.
            plain = set(self.plain)
            for j in range(len(twins)):
                if j not in plain:
                    twins[j] = None

    def count_own_uses(self, uses: list[int]) -> None:
        """Add to ``uses`` the storage key of each kept staged tensor of the last call that
        nobody else holds (:func:`~._reuse.count_own_uses`): for ``in_use()``, which must not
        take the recording's own for a holder's."""
        count_own_uses(self.twins, uses)

    @property
    def dead(self) -> int:
        """How many slots are ``None``, or about to be: never fewer."""
        return len(self.forgotten)

    def fits_root(self, state_dict: Any) -> bool:
        """A cheap first look: the root container's type and keys (a list's length)."""
        root = self.root
        kind = type(root)
        if kind is DictNode:
            return type(state_dict) is root.cls and list(state_dict) == root.keys
        if kind is ListNode:
            return type(state_dict) is list and (
                root.atoms or len(state_dict) == len(root.children)
            )
        if kind is TupleNode:
            return type(state_dict) is tuple and len(state_dict) == len(root.children)
        return False


class _Recorder:
    """Writes a :class:`Recording` of the structure a full walk stages, as the walk goes.

    The walk (:class:`~._walk.DeepCopy`) reports each tensor and container once it has staged
    it (the :class:`~._walk.Recorder` protocol); whatever a recording does not cover makes the
    walk stop reporting. The tensors the walk gave new buffers come with what its lean path
    already read of them (:attr:`last`), so a first call reads no tensor twice.
    """

    def __init__(self, cache: BufferCache, *, guards: bool = False) -> None:
        self._entries = cache.entries
        self._sources: list[torch.Tensor] | None = [] if guards else None
        """Per tensor, the source (``guards``: the recording gets its short checks at once)."""
        self.last: TensorFacts | None = None
        self._out = Recording()
        self._root: Any = None
        self._first: dict[int, int] = {}
        """``id()`` of a tensor on a storage that other tensors use too -> its first leaf.
        Only those: a table with an entry per tensor grows in the same walk step as the walk's
        own per-tensor tables, and adds to that step's page faults (see
        :class:`~._tensors.FactsSink`)."""
        self._first_user: list[int] = []  # per slot: id() of the first tensor on it
        self._first_leaf: list[int] = []  # per slot: that tensor's leaf
        self._users: list[int] = []  # per slot: tensors that use it
        self._device: torch.device | None = None  # the last slot's (devices are few)
        self._twins: list[Any] = []  # per tensor: its staged twin (Recording.twins)
        self._fresh: list[tuple[torch.Tensor, HostBuffer, torch.Tensor, Path]] = []
        """The run of tensors the lean path gave new buffers, not yet recorded: (source,
        buffer, staged twin, path) each (see :meth:`_record_fresh`)."""

    def tables(self) -> tuple[dict[int, int] | list[int], ...]:
        """The per-tensor tables, for the caller to empty in steps (not the users per slot:
        the recording keeps those)."""
        return (self._first, self._first_user)

    def ended(self, root: Any) -> None:
        self._root = root

    def finish(self) -> Walk:
        """The recording, or None when the walk met something it does not cover (or the state
        dict was a lone tensor or value: nothing to gain); then the per-tensor tables emptied."""
        root = self._root
        out: Recording | None = None
        if root is not None and type(root) is not int:
            if self._fresh:
                self._record_fresh()
            out = self._out
            out.root = root
            yield from self._list_plain_and_shared(out)
            yield from out.prepare_bulk()
            out.keep(self._twins, 0)
            sources = self._sources
            if sources is not None:  # what a first replay would have made, in steps
                for index, start in enumerate(range(0, len(sources), _BULK_STEP)):
                    out.guards[index] = metadata_guard(sources[start : start + _BULK_STEP])
                    yield
                self._sources = None
                # And the checks of the walk's plain twins (made as a replay makes them), so
                # that the first replay hands those out again rather than make its own.
                twins, plain = self._twins, out.plain
                for index, start in enumerate(range(0, len(plain), _BULK_STEP)):
                    step = list(map(twins.__getitem__, plain[start : start + _BULK_STEP]))
                    out.twin_checks[index] = check_of(step)
                    yield
        self.last = None
        self._fresh = []
        yield from empty_in_steps(*self.tables())  # an entry per tensor: not freed at once
        return out

    def _list_plain_and_shared(self, out: Recording) -> Walk:
        """Fill the recording's sparse lists once every tensor is known: the plain tensors
        alone on their storages (twins made by ``detach()``), and those on shared storages."""
        # Read per leaf, not written: rewriting each alone tensor's tuple cost 24-44 ms of a
        # first call over 50,000 tensors.
        users = out.slot_users = self._users
        out.first_leaf = self._first_leaf
        leaves = out.leaves
        if out.one_to_one and not out.grad_leaves:
            # Every tensor a plain one on a storage of its own (no Parameter among them), in
            # slot order: all are plain, none shared.
            out.plain = out.plain_slots = list(range(len(leaves)))
            return
        shared = out.shared_leaves
        plain = out.plain
        plain_slots = out.plain_slots
        for start in range(0, len(leaves), _BULK_STEP):
            for j in range(start, min(start + _BULK_STEP, len(leaves))):
                leaf = leaves[j]
                slot = leaf[1]
                if users[slot] == 1:
                    if leaf[0] is _Tensor and leaf[10]:
                        plain.append(j)
                        plain_slots.append(slot)
                else:
                    shared.append((j, leaf[11]))
            yield

    def mapping(self, cls: type, x: dict[Any, Any], children: list[Any], attrs: Any) -> Walk:
        summary = yield from _summary(children)
        group = self._placed((yield from _group_of(children)), len(children))
        return _dict_node(cls, x, children, attrs, summary=summary, group=group)

    def small_mapping(
        self, cls: type, x: dict[Any, Any], children: list[Any], attrs: Any
    ) -> DictNode:
        summary = _summary_now(children)
        group = self._placed(_group_now(children), len(children))
        return _dict_node(cls, x, children, attrs, summary=summary, group=group)

    def sequence(self, children: list[Any]) -> Walk:
        summary = yield from _summary(children)
        group = None if summary.atoms else (yield from _group_of(children))
        return _list_node(children, summary, self._placed(group, len(children)))

    def small_sequence(self, children: list[Any]) -> ListNode:
        summary = _summary_now(children)
        group = None if summary.atoms else _group_now(children)
        return _list_node(children, summary, self._placed(group, len(children)))

    def _placed(self, group: Group | None, items: int) -> Group | None:
        """``group`` given its place among the kept item dicts (:attr:`Recording.items`)."""
        if group is None:
            return None
        out = self._out
        group = group._replace(items_at=out.item_count)
        out.item_count += items
        width = len(group.keys)
        out.group_spans.append((group.first, group.first + items * width, group.items_at, width))
        return group

    def items(self, children: list[Any]) -> TupleNode:
        # Rebuilt by the walk when something mutable is inside, at any depth.
        rebuilt = any(
            child is not None and not (type(child) is TupleNode and not child.rebuilt)
            for child in children
        )
        return TupleNode(children, rebuilt, _sizes(children))

    def leaf(self, x: torch.Tensor, staged: torch.Tensor, path: Path) -> int:
        out = self._out
        known = self.last
        if known is not None and known[0] is x:
            # Given a new buffer as its twin by the walk's lean path, which read all the rest:
            # recorded with the others of its run (_record_fresh).
            # Taken once: met again (a tensor under two keys), it is on a storage now known.
            self.last = None
            fresh = self._fresh
            fresh.append((x, known[1], staged, path))
            index = len(out.leaves) + len(fresh) - 1
            if len(fresh) == _FRESH_RUN:
                self._record_fresh()
            return index
        if self._fresh:  # the tensors before this one first: it may share their storages
            self._record_fresh()
        index = len(out.leaves)
        cls = type(x)
        if cls is not _Tensor and cls is not _Parameter:
            raise Unrecordable  # a subclass: the walk's kinds (_kinds) stage it their way
        # One read of each fact, and ``is_meta`` rather than ``device.type`` (0.5 us).
        if x.__dict__ or x.layout is not _strided or x.is_quantized or x.is_nested or x.is_meta:
            raise Unrecordable
        storage = x.untyped_storage()
        key = id(storage)
        cached = self._entries.get(key)  # BufferCache.get, inlined: this is per tensor
        if cached is None or cached() is not storage or cached.nbytes != storage.nbytes():
            raise Unrecordable  # evicted meanwhile, or resized: record another time
        buffer = cached
        offset = int(x.storage_offset())
        shape = x.shape
        stride = x.stride()
        dtype = x.dtype
        conj = x.is_conj()
        neg = x.is_neg()
        view = buffer.view
        spans = (
            view is not None
            and offset == 0
            and not conj
            and not neg
            and dtype is view.dtype
            and shape == view.shape
            and stride == view.stride()
        )
        slot = out.slot_by_key.get(key)
        if slot is None:
            slot = len(out.slots)
            out.slot_by_key[key] = slot
            if slot == LEAD_AFTER:
                give_lead(out.slot_by_key, 2)
            out.slots.append(buffer)
            out.src_leaf.append(index if spans else -1)
            nbytes = buffer.nbytes
            out.slot_nbytes.append(nbytes)
            if nbytes:
                device = buffer.device
                if device is not self._device:  # one device object for most (see allocate)
                    out.devices.add(device)
                    self._device = device
            if slot != index or not spans:  # spanning its buffer's view: it has bytes
                out.one_to_one = False
            self._users.append(1)
            self._first_user.append(id(x))
            self._first_leaf.append(index)
            same = index  # a storage met for the first time: so is the tensor
        else:
            out.one_to_one = False
            users = self._users[slot] = self._users[slot] + 1
            first = self._first
            if users == 2:  # the storage's first tensor joins the table now
                first[self._first_user[slot]] = self._first_leaf[slot]
            same = first.setdefault(id(x), index)
        complex_ = _IS_COMPLEX.get(dtype)
        if complex_ is None:
            complex_ = _IS_COMPLEX[dtype] = dtype.is_complex
        if complex_:
            out.conj_leaves.append((index, conj))
        requires_grad = False
        if cls is _Parameter:
            requires_grad = x.requires_grad
            out.grad_leaves.append((index, requires_grad))
        out.leaves.append(
            (
                cls,
                slot,
                offset,
                shape,
                stride,
                dtype,
                neg,
                complex_,
                conj,
                requires_grad,
                spans,
                same if same != index else -1,
            )
        )
        out.paths.append(path)
        self._twins.append(staged)
        if self._sources is not None:
            self._sources.append(x)
        return index

    def _record_fresh(self) -> None:
        """Record the run of tensors the lean path gave new buffers, in a few C-level passes.

        Each is a plain tensor alone on a storage met for the first time, spanning its new
        buffer's view as itself: its entry follows from the buffer (the storage's ``id()``,
        shape, dtype) and its stride. One at a time, these entries cost a first call over
        50,000 small tensors a quarter of its time; a run is at most :data:`_FRESH_RUN` long,
        so that recording it adds little to the walk step it falls in.
        """
        fresh = self._fresh
        self._fresh = []
        out = self._out
        count = len(fresh)
        xs, buffers, staged, paths = zip(*fresh, strict=True)
        first_index = len(out.leaves)
        first_slot = len(out.slots)
        indices = range(first_index, first_index + count)
        slots = range(first_slot, first_slot + count)
        # Still the cache's entries: allocated just now, for storages that these tensors
        # (which the plan's copies hold) keep alive, and never allocated twice in one call.
        out.slot_by_key.update(zip(map(_buffer_key, buffers), slots, strict=True))
        if first_slot <= LEAD_AFTER < first_slot + count:
            give_lead(out.slot_by_key, 2)
        out.slots += buffers
        out.src_leaf += indices
        out.slot_nbytes += map(_buffer_nbytes, buffers)  # none empty: each has a copy
        out.devices.update(map(_buffer_device, buffers))
        if first_slot != first_index:
            out.one_to_one = False
        self._users += repeat(1, count)
        self._first_user += map(id, xs)
        self._first_leaf += indices
        dtypes = list(map(_buffer_view_dtype, buffers))
        complexes: Any = repeat(False)
        if any(dtype.is_complex for dtype in set(dtypes)):
            complexes = [dtype.is_complex for dtype in dtypes]
            out.conj_leaves += [(j, False) for j, c in zip(indices, complexes, strict=True) if c]
        out.leaves += zip(
            repeat(_Tensor),
            slots,
            repeat(0),
            map(_buffer_view_shape, buffers),
            map(_stride, xs),
            dtypes,
            repeat(False),  # neg
            complexes,
            repeat(False),  # conj
            repeat(False),  # requires_grad
            repeat(True),  # spans
            repeat(-1),  # alone on its storage: no earlier tensor to be the same object
        )
        out.paths += paths
        self._twins += staged
        if self._sources is not None:
            self._sources += xs


_buffer_key = operator.attrgetter("key")
_buffer_nbytes = operator.attrgetter("nbytes")
_buffer_device = operator.attrgetter("device")
_buffer_view_dtype = operator.attrgetter("view_dtype")
_buffer_view_shape = operator.attrgetter("view_shape")
_stride: Any = torch.Tensor.stride

_IS_COMPLEX: dict[torch.dtype, bool] = {}
"""``dtype.is_complex`` by dtype: a dict read is a third of the attribute's cost."""


def _dict_node(
    cls: type,
    x: dict[Any, Any],
    children: list[Any],
    attrs: Any,
    *,
    summary: Summary,
    group: Group | None,
) -> DictNode:
    keys = list(x)  # atomic: the walk checked each
    node = DictNode(cls, keys, list(map(type, keys)), children, attrs, summary.size, summary.span)
    node.group = group
    return node


def _list_node(children: list[Any], summary: Summary, group: Group | None) -> ListNode:
    if summary.atoms:
        return ListNode(children, True, 0, None)
    node = ListNode(children, False, summary.size, summary.span)
    node.group = group
    return node


# -- replaying one ------------------------------------------------------------------------------


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
            gone = yield from _mapped(slots.__getitem__, rec.slot_of)
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
            for start in range(0, len(tracked), _BULK_STEP):
                for j in tracked[start : start + _BULK_STEP]:
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
            if j % _BULK_STEP == 0:
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
        for index, start in enumerate(range(0, len(plain), _BULK_STEP)):
            stop = start + _BULK_STEP
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
                del dropped[-_BULK_STEP:]
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
        step = _BULK_STEP
        for index, start in enumerate(range(0, len(xs), step)):
            part = xs[start : start + step]
            stop = start + len(part)
            guard = None if guards is None else guards[index]
            guarded = guard is not None and guard(*part)
            if not guarded and list(map(type, part)) != types[start:stop]:
                raise _BulkMiss  # the types first: only tensors are asked the rest
            if any(map(_attributes, part)):
                raise _BulkMiss
            yield  # a step is 0.3-0.5 ms on a loaded core: its storages in the next one
            if early:  # slot j is leaf j's storage
                same_storages = map(_is, map(_storage, part), storages[start:stop])
            else:
                same_storages = map(
                    _is, map(_storage, part), map(storages.__getitem__, slot_of[start:stop])
                )
            if not all(same_storages):
                raise _BulkMiss
            if guarded:
                if list(map(_storage_offset, part)) != offsets[start:stop]:
                    raise _BulkMiss
            else:
                for getter, values in zip(_GETTERS, wanted, strict=True):
                    if list(map(getter, part)) != values[start:stop]:
                        raise _BulkMiss
                if guards is not None:  # checked the long way: the next call takes the short
                    guards[index] = metadata_guard(part)
            if early:  # in a step of its own: with the checks, 0.5-0.95 ms on a loaded core
                yield
                self._publish_step(xs, start, stop)
            yield
        where: Any = _SAME_PLACE
        if checked is not None:
            where = {}
            for start in range(0, len(checked), _BULK_STEP):
                part = checked[start : start + _BULK_STEP]
                where.update(zip(part, range(start, start + len(part)), strict=True))
                yield
        for count, (j, conj) in enumerate(rec.conj_leaves, 1):
            if (checked is None or j in where) and xs[where[j]].is_conj() is not conj:
                raise _BulkMiss
            if count % _BULK_STEP == 0:
                yield
        for count, (j, grad) in enumerate(rec.grad_leaves, 1):
            if (checked is None or j in where) and xs[where[j]].requires_grad is not grad:
                raise _BulkMiss
            if count % _BULK_STEP == 0:
                yield
        first: dict[int, int] = {}
        for count, (j, same) in enumerate(rec.shared_leaves, 1):
            if count % _BULK_STEP == 0:
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
        step = _BULK_STEP
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
        for start in range(0, len(slots), _BULK_STEP):
            self._check_slots(start, start + _BULK_STEP)
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
        if type(x) is not node.cls or list(x) != node.keys:
            raise Mismatch
        if list(map(type, x)) != node.key_types:
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
            if not attributes or list(attributes) != attrs.keys:
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
            part = keys[start:stop]
            if part != expected[start:stop] or list(map(type, part)) != expected_types[start:stop]:
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
        for start in range(0, len(values), _BULK_STEP):
            stop = start + _BULK_STEP
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
        step = max(1, _BULK_STEP // len(node.group.keys))
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
        if not all(map(group.keys.__eq__, map(tuple, part))):
            raise Mismatch
        if not all(map(_is, map(type, chain.from_iterable(part)), repeat(group.key_type))):
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
        if (
            x.storage_offset() != offset
            or x.dtype is not dtype
            or x.shape != shape
            or x.stride() != stride
            or x.is_neg() is not neg
            or (complex_ and x.is_conj() is not conj)
            or (cls is _Parameter and x.requires_grad is not grad)
        ):
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


_SHELLS = 4
"""Empty lists a recording keeps for reuse (:attr:`Recording.shells`): two generations of
kept tensors and of kept dicts."""

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
        except Mismatch:
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
    recorder = _Recorder(cache, guards=plan.ahead)
    yield from build_plan(cache, state_dict, plan, adopted=adopted, recorder=recorder)
    recording = yield from recorder.finish()
    if recording is None:
        cache.record_backoff = RECORD_BACKOFF
    else:
        cache.replays = (recording, *cache.replays[: MAX_RECORDINGS - 1])
    return plan
