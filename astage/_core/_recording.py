"""Recording: what a full walk writes down, as it goes, for later calls to replay.

:class:`ReplayRecorder` hears from the walk (:mod:`._walk`) about every container and staged tensor;
:meth:`ReplayRecorder.finish` turns that into a :class:`Recording`: the structure
(:mod:`._structure`), and per tensor its type, storage slot, offset, shape, stride, dtype and
flags, in lists that a replay (:mod:`._replay`) compares in bulk. A recording also keeps the
last calls' staged tensors and dicts, to hand them out again where nobody holds them
(:mod:`._reuse`).
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable
from functools import partial
from itertools import repeat
from typing import Any

import torch

from .._paths import Path
from .._torch import MetadataGuard, metadata_guard
from ._cache import BufferCache, HostBuffer
from ._reuse import (
    TwinCheck,
    check_of,
    count_own_uses,
    counts_tell_holders,
    empty_unheld_dicts,
)
from ._structure import (
    BULK_STEP,
    DictNode,
    Group,
    ListNode,
    TupleNode,
    dict_node,
    group_now,
    group_of,
    list_node,
    mapped,
    same_keys,
    size_of,
    summarize,
    summarize_now,
)
from ._tables import LEAD_AFTER, empty_in_steps, give_lead
from ._tensors import TensorFacts
from ._walk import Unrecordable, Walk

_Tensor = torch.Tensor
_Parameter = torch.nn.Parameter
_strided = torch.strided

FRESH_RUN = BULK_STEP // 2
"""Tensors a first call records at once (see :meth:`ReplayRecorder._record_fresh`): half a bulk
step, since the walk step it falls in reads as many buffers of its own."""


_SHELLS = 4
"""Empty lists a recording keeps for reuse (:attr:`Recording.shells`): two generations of
kept tensors and of kept dicts."""


_IS_COMPLEX: dict[torch.dtype, bool] = {}
"""``dtype.is_complex`` by dtype: a dict read is a third of the attribute's cost."""


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
        """Per step of :data:`BULK_STEP` tensors: a C++ check of their metadata, made once a
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
        """Per step of :data:`BULK_STEP` plain twins: what they were when a replay made them
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
        self.guards = [None] * -(-count // BULK_STEP)
        self.twin_checks = [None] * -(-len(self.plain) // BULK_STEP)
        self.all_plain = len(self.plain) == count
        if self.one_to_one and self.all_plain:
            # Every tensor a plain one spanning a storage of its own, in slot order (many small
            # tensors): only the shapes, strides and dtypes differ from tensor to tensor.
            self.copy_slots = self.copy_src = self.slot_of = self.plain
            self.types = [_Tensor] * count
            self.offsets = [0] * count
            self.negs = [False] * count
            self.shapes = yield from mapped(operator.itemgetter(3), leaves)
            self.strides = yield from mapped(operator.itemgetter(4), leaves)
            self.dtypes = yield from mapped(operator.itemgetter(5), leaves)
            self.all_whole = True
            self.copy_nbytes = self.slot_nbytes
            return
        columns = []
        for column in range(7):
            columns.append((yield from mapped(operator.itemgetter(column), leaves)))
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
        for start in range(0, len(slots), BULK_STEP):
            stop = min(start + BULK_STEP, len(slots))
            copy_slots += [k for k in range(start, stop) if sizes[k] and slots[k] is not None]
            yield
        self.copy_slots = copy_slots
        self.copy_src = yield from mapped(self.src_leaf.__getitem__, copy_slots)
        self.all_whole = min(self.copy_src, default=0) >= 0
        self.copy_nbytes = yield from mapped(sizes.__getitem__, copy_slots)

    def step_guard(
        self,
        index: int,
        tensors: list[torch.Tensor],
        make: Callable[[list[torch.Tensor]], MetadataGuard | None],
    ) -> MetadataGuard | None:
        """The metadata guard of bulk step ``index``, made by ``make`` from its tensors as they
        are now (checked against the recording); None where this torch has no guard.

        The guard (dynamo's ``TensorGuards``) refuses an object it is given twice: a step
        that held one tensor under two keys (tied weights of ``state_dict(keep_vars=True)``)
        never passed it, so each call checked that step the long way and made its guard
        again (~10% of a cached call over 1,000 small tensors). Such a step's guard is given
        only the first place of each object
        the recording knows (a tensor's ``same`` leaf), and passes only where each other
        place holds the very object of its first place, which the guard checks.
        """
        if not self.shared_leaves:  # each tensor alone on its storage: none is met twice
            return make(tensors)
        start = index * BULK_STEP
        leaves = self.leaves
        firsts: list[int] = []
        again: list[int] = []
        their_firsts: list[int] = []
        place_of: dict[int, int] = {}  # the first leaf of an object -> its first place here
        for place in range(len(tensors)):
            same = leaves[start + place][11]
            first = place_of.setdefault(same if same >= 0 else start + place, place)
            if first == place:
                firsts.append(place)
            else:
                again.append(place)
                their_firsts.append(first)
        if not again:
            return make(tensors)
        guard = make([tensors[place] for place in firsts])
        if guard is None:
            return None
        return partial(_firsts_checked, guard, firsts, again, their_firsts)

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
            return type(state_dict) is root.cls and same_keys(
                list(state_dict), root.keys, root.key_types
            )
        if kind is ListNode:
            return type(state_dict) is list and (
                root.atoms or len(state_dict) == len(root.children)
            )
        if kind is TupleNode:
            return type(state_dict) is tuple and len(state_dict) == len(root.children)
        return False


class ReplayRecorder:
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
                for index, start in enumerate(range(0, len(sources), BULK_STEP)):
                    out.guards[index] = out.step_guard(
                        index, sources[start : start + BULK_STEP], metadata_guard
                    )
                    yield
                self._sources = None
                # And the checks of the walk's plain twins (made as a replay makes them), so
                # that the first replay hands those out again rather than make its own.
                twins, plain = self._twins, out.plain
                for index, start in enumerate(range(0, len(plain), BULK_STEP)):
                    step = list(map(twins.__getitem__, plain[start : start + BULK_STEP]))
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
        for start in range(0, len(leaves), BULK_STEP):
            for j in range(start, min(start + BULK_STEP, len(leaves))):
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
        summary = yield from summarize(children)
        group = self._placed((yield from group_of(children)), len(children))
        return dict_node(cls, x, children, attrs, summary=summary, group=group)

    def small_mapping(
        self, cls: type, x: dict[Any, Any], children: list[Any], attrs: Any
    ) -> DictNode:
        summary = summarize_now(children)
        group = self._placed(group_now(children), len(children))
        return dict_node(cls, x, children, attrs, summary=summary, group=group)

    def sequence(self, children: list[Any]) -> Walk:
        summary = yield from summarize(children)
        group = None if summary.atoms else (yield from group_of(children))
        return list_node(children, summary, self._placed(group, len(children)))

    def small_sequence(self, children: list[Any]) -> ListNode:
        summary = summarize_now(children)
        group = None if summary.atoms else group_now(children)
        return list_node(children, summary, self._placed(group, len(children)))

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
        return TupleNode(children, rebuilt, size_of(children))

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
            if len(fresh) == FRESH_RUN:
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
        50,000 small tensors a quarter of its time; a run is at most :data:`FRESH_RUN` long,
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


def _firsts_checked(
    guard: MetadataGuard,
    firsts: list[int],
    again: list[int],
    their_firsts: list[int],
    *tensors: Any,
) -> bool:
    """Whether the places ``again`` of ``tensors`` hold the objects of their first places, and
    ``guard`` (made from the tensors at ``firsts``) passes those. The identities first: a
    place the guard is not given may hold anything (a float where a tied tensor was), and
    what passes is read as a tensor."""
    get = tensors.__getitem__
    return all(map(operator.is_, map(get, again), map(get, their_firsts))) and guard(
        *map(get, firsts)
    )


_buffer_key = operator.attrgetter("key")
_buffer_nbytes = operator.attrgetter("nbytes")
_buffer_device = operator.attrgetter("device")
_buffer_view_dtype = operator.attrgetter("view_dtype")
_buffer_view_shape = operator.attrgetter("view_shape")
_stride: Any = torch.Tensor.stride
