"""The deep-copy walk: rebuild a state dict the way ``copy.deepcopy`` would, tensors aside.

:func:`build_plan` walks a state dict into a :class:`~._plan.Plan`. :class:`DeepCopy` rebuilds
every container and object: dicts (their subclasses and instance attributes too), lists, tuples,
namedtuples, sets, bound methods, and anything else through the ``__reduce_ex__`` protocol that
pickle and ``copy.deepcopy`` use (dataclasses, frozen and slotted ones included), but for two
kinds that ``copy.deepcopy`` copies otherwise and so does the walk: the weakref module's
mappings (their ``__deepcopy__``) and ``torch.Generator`` (whose state must be read at once, not
staged). A class's own ``__deepcopy__`` is not called: it would copy the tensors inside without
staging them. An object's own code failing (``__reduce_ex__``, ``__setstate__``, ...) is an
:class:`~astage.UnstageableError` naming its path. A memo keeps
shared references shared and cycles closed. Every tensor goes to a
:class:`~._tensors.TensorStager`, which rebuilds it on a host buffer and records the copy that
fills it. A :class:`Recorder`, when given, is told each tensor and container as it is staged:
that is how a first call writes down the structure that later calls replay (:mod:`._replay`).

Nothing here waits for a device, a thread or an event loop: the walk is a generator that yields
every few dozen objects, so an async driver can hand the loop back between slices while a sync
driver runs it to the end.
"""

from __future__ import annotations

import contextlib
import copy
import copyreg
import dataclasses
import enum
import sys
import types
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Generator, Iterator
from typing import Any, Protocol

import torch

from .._errors import UnstageableError
from .._paths import Attr, Path
from ._cache import BufferCache
from ._plan import Plan
from ._tables import empty_in_steps
from ._tensors import Adopted, FactsSink, TensorStager

Walk = Generator[None, None, Any]

_MISSING: Any = object()
_YIELD_EVERY = 16  # objects visited between two chances for the driver to yield (a first
# call spends 20-30 us on a tensor: 64 of them held the async loop 1.3-2 ms between yields)

SMALL_CONTAINER = 64
"""Containers of at most this many items are recorded at once (:meth:`Recorder.small_mapping`),
larger ones in steps: a recorder's generators cost a first call over 16,000 optimizer-state
dicts of three tensors each 30-40 ms, and 64 items take a few microseconds to summarize."""

_Tensor = torch.Tensor

# Values that are immutable or process-global: staged as themselves, never copied.
ATOMIC_TYPES: frozenset[type] = frozenset(
    {
        type(None),
        int,
        float,
        bool,
        complex,
        str,
        bytes,
        type,
        range,
        slice,
        type(Ellipsis),
        type(NotImplemented),
        types.FunctionType,
        types.BuiltinFunctionType,
        types.BuiltinMethodType,
        types.CodeType,
        types.ModuleType,
        weakref.ref,
        property,
        torch.dtype,
        torch.device,
        torch.Size,
        torch.layout,
        torch.memory_format,
    }
)


# The ``__deepcopy__`` methods of the weakref module's mappings, which the walk follows
# (:meth:`DeepCopy._weak_mapping`); a subclass that defines its own takes the general path.
_WEAK_MAPPING_COPIES = (
    weakref.WeakValueDictionary.__deepcopy__,
    weakref.WeakKeyDictionary.__deepcopy__,
)

_SHOWN_PATH = 8
"""Keys of a too-deep path that its error names: the rest would be a thousand ``['n']``."""


def nesting(obj: Any) -> tuple[int, Path]:
    """How deep containers nest in ``obj`` (dicts, lists, tuples, and objects through their
    attributes), and the path to the deepest one: without recursion, so that it can measure
    what the walk could not."""
    deepest: tuple[int, Path] = (0, ())
    seen: set[int] = set()
    stack: list[tuple[Any, Path]] = [(obj, ())]
    while stack:
        x, path = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, dict):
            children: Any = x.items()
        elif isinstance(x, (list, tuple, deque)):
            children = enumerate(x)
        elif isinstance(x, (set, frozenset)):
            children = ((value, value) for value in x)  # the walk names an item by itself
        else:
            # Objects through their attributes, in __dict__ and in __slots__: a chain of slotted
            # objects (or of sets, or deques) went unmeasured, and the walk's RecursionError
            # came out raw, as if some object's own code had recursed.
            children = list(_attributes_of(x))
            if not children:
                continue
        if len(path) >= deepest[0]:
            deepest = (len(path) + 1, path)
        stack.extend((child, (*path, key)) for key, child in children)
    return deepest


def _attributes_of(x: Any) -> Iterator[tuple[Attr, Any]]:
    """An object's attributes, ``__dict__`` and ``__slots__``, for :func:`nesting`."""
    if type(x) in ATOMIC_TYPES or isinstance(x, type):
        return  # staged as themselves: the walk does not enter them (a module's globals)
    attributes = getattr(x, "__dict__", None)
    if isinstance(attributes, dict):
        for name, value in attributes.items():
            yield Attr(name), value
    for klass in type(x).__mro__:
        slots = klass.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name in ("__dict__", "__weakref__"):
                continue
            value = getattr(x, name, _MISSING)
            if value is not _MISSING:
                yield Attr(name), value


def build_plan(
    cache: BufferCache,
    state_dict: Any,
    plan: Plan | None = None,
    *,
    adopted: Adopted | None = None,
    recorder: Recorder | None = None,
) -> Walk:
    """Walk ``state_dict`` into ``plan`` (a new one by default); the generator returns the plan.

    ``plan.copies`` grows while the walk runs, so a driver may start copying before it ends.
    ``adopted`` names the storages already copied into ``plan`` (:data:`~._tensors.Adopted`),
    which the walk then does not copy again: what a replay that stopped midway
    leaves (see :mod:`._replay`). ``recorder``, when given, is told the structure as the walk
    stages it, and at the end its root (:meth:`Recorder.ended`).
    """
    plan = plan if plan is not None else Plan()
    plan.walking = True
    walk = DeepCopy(recorder)
    tensors = TensorStager(
        cache,
        plan,
        memo=walk.memo,
        keep_alive=walk.keep_alive,
        visit=walk.visit_now,
        adopted=adopted,
        facts=recorder,
    )
    walk.stage_tensors_with(tensors)
    try:
        try:
            plan.result = yield from walk.visit(state_dict, ())
        except RecursionError:
            # The walk follows a container's children by recursion (cheaper than a stack of
            # its own, per object); a state dict nested deeper than the interpreter's limit is
            # refused by name. Raised here, once the recursion has unwound; not chained, as a
            # RecursionError's traceback is a thousand frames long.
            depth, path = nesting(state_dict)
            if depth * 8 < sys.getrecursionlimit():
                raise  # not the state dict's nesting: some object's own code recursed
            shown = path[:_SHOWN_PATH]
            raise UnstageableError(
                f"containers nest {depth} levels deep along this path (its first {len(shown)} "
                "keys shown), more than the walk can follow (Python's recursion limit is "
                f"{sys.getrecursionlimit()})",
                shown,
            ) from None
        # Every copy is in the plan and every buffer allocated: a driver may start host
        # copies while the tables below are emptied and the recording is finished.
        plan.tail = True
        if recorder is not None:
            recorder.ended(walk.node if walk.recorder is recorder else None)
        # Emptied in steps: freed at once, the memo's and the tensor stager's 50,000-entry
        # dicts held the loop 7-12 ms at the end of a walk (measured on this project's 2 cores).
        yield from empty_in_steps(walk.memo, walk.keep_alive, *tensors.tables())
    finally:
        walk.close()
        tensors.close()
    plan.done = True
    return plan


class Unrecordable(Exception):
    """The state dict holds something a replay recording does not cover (see :mod:`._recording`)."""


class Recorder(FactsSink, Protocol):
    """What a walk reports, as it stages them, of the containers and tensors it meets: the
    replay recorder of :mod:`._recording`, which writes the structure down for later calls.

    Each method returns the node that stands for what the walk just staged, from the nodes of
    its items (``None`` for an atom). Any may raise :class:`Unrecordable`: the walk then goes on
    without recording. Recording in the walk reads every fact once; a pass of its own after
    the walk cost the first call over 50,000 small tensors a third of its time. It is also
    where the tensor stager's lean path leaves what it read (:class:`~._tensors.FactsSink`).
    """

    def leaf(self, x: torch.Tensor, staged: torch.Tensor, path: Path) -> Any:
        """A tensor, already staged (as ``staged``)."""

    def mapping(self, cls: type, x: dict[Any, Any], children: list[Any], attrs: Any) -> Walk:
        """A dict or OrderedDict (``attrs``: the node of its instance attributes, or None)."""

    def sequence(self, children: list[Any]) -> Walk:
        """A list."""

    def small_mapping(self, cls: type, x: dict[Any, Any], children: list[Any], attrs: Any) -> Any:
        """:meth:`mapping` of a container of at most :data:`SMALL_CONTAINER` items, at once."""

    def small_sequence(self, children: list[Any]) -> Any:
        """:meth:`sequence` of a list of at most :data:`SMALL_CONTAINER` items, at once."""

    def items(self, children: list[Any]) -> Any:
        """A tuple."""

    def ended(self, root: Any) -> None:
        """The walk is over: ``root`` is the state dict's node, None if nothing was recorded."""


class Tensors(Protocol):
    """Where the walk hands its tensors (a :class:`~._tensors.TensorStager`)."""

    def leaf(self, x: torch.Tensor, path: Path) -> torch.Tensor:
        """Stage a tensor met at ``path``."""

    def child(self, x: torch.Tensor, path: Path, key: Any) -> torch.Tensor:
        """Stage a plain tensor met under ``key`` of the container at ``path``.

        The hot path: the walk calls it for every ``type(x) is torch.Tensor`` in a dict or a
        list, and the tensor's path is only built if it is needed (an error, a leaf record).
        """


def _no_tensors(*args: Any) -> torch.Tensor:
    raise AssertionError("DeepCopy met a tensor before stage_tensors_with() was called")


class DeepCopy:
    """One walk's deep copy: the memo, and a rebuild for each kind of container and object."""

    def __init__(self, recorder: Recorder | None = None) -> None:
        self.recorder = recorder
        """Told the structure as the walk goes; None once something could not be recorded."""
        self.node: Any = None
        """The recorder's node for what the last visit staged (read by the container above)."""
        self.memo: dict[int, Any] = {}
        """``id()`` of every source object met so far -> its staged twin."""
        self.keep_alive: list[Any] = []
        """The sources in the memo: their ids stay valid (unreused) while the walk runs."""
        self._tensor: Callable[[torch.Tensor, Path], torch.Tensor] = _no_tensors
        self._child_tensor: Callable[[torch.Tensor, Path, Any], torch.Tensor] = _no_tensors
        self._countdown = _YIELD_EVERY
        self._dispatch: dict[type, Callable[[Any, Path], Walk]] = {
            dict: self._dict,
            OrderedDict: self._dict,
            list: self._list,
            tuple: self._tuple,
            set: self._set,
            frozenset: self._set,
            types.MethodType: self._method,
        }

    def stage_tensors_with(self, tensors: Tensors) -> None:
        """Hand every tensor the walk meets to ``tensors``."""
        self._tensor = tensors.leaf
        # Bound once: the dict and list loops call it per tensor without an attribute lookup
        # on ``tensors``.
        self._child_tensor = tensors.child

    def close(self) -> None:
        """Break the walk's references to its own bound methods and to the tensor stager.

        Without this the walk is a reference cycle, and its memo (every staged object of the
        call) would stay alive until the cyclic collector ran: the staged result would outlive
        its last user, and its host buffers would look in use (``BufferCache.in_use``).
        """
        self._dispatch.clear()
        self.recorder = self.node = None
        self._tensor = self._child_tensor = _no_tensors
        self.memo.clear()
        self.keep_alive.clear()

    # -- containers -----------------------------------------------------------------------

    def visit(self, x: Any, path: Path) -> Walk:
        cls = type(x)
        if cls in ATOMIC_TYPES:
            self.node = None
            return x
        found = self.memo.get(id(x), _MISSING)
        if found is not _MISSING:
            if isinstance(x, _Tensor):
                return self._visit_tensor(x, path)
            self.recorder = None  # an object met twice: the walk shares its copy
            return found
        if isinstance(x, _Tensor):
            return self._visit_tensor(x, path)
        handler = self._dispatch.get(cls)
        if handler is not None:
            return (yield from handler(x, path))
        self.recorder = None  # recordings cover dicts, lists, tuples and tensors
        if issubclass(cls, (type, enum.Enum)):
            return x
        if issubclass(cls, tuple) and hasattr(cls, "_fields"):
            return (yield from self._namedtuple(x, path))
        return (yield from self._reduce(x, path))

    def _visit_tensor(self, x: torch.Tensor, path: Path) -> torch.Tensor:
        y = self._tensor(x, path)
        self.node = self._record_leaf(x, y, path)
        return y

    def _record_leaf(self, x: torch.Tensor, y: torch.Tensor, path: Path) -> Any:
        recorder = self.recorder
        if recorder is None:
            return None
        try:
            return recorder.leaf(x, y, path)
        except Unrecordable:
            self.recorder = None
            return None

    def _record(self, recorder: Recorder | None, node: Walk) -> Walk:
        """Keep the node ``node`` makes, if ``recorder`` (this container's) is still on."""
        if recorder is None or self.recorder is not recorder:
            node.close()
            return None
        try:
            self.node = yield from node
        except Unrecordable:
            self.recorder = None
        return None

    def _tick(self) -> bool:
        self._countdown -= 1
        if self._countdown > 0:
            return False
        self._countdown = _YIELD_EVERY
        return True

    def _remember(self, x: Any, y: Any) -> None:
        self.memo[id(x)] = y
        self.keep_alive.append(x)

    def _dict(self, x: dict[Any, Any], path: Path) -> Walk:
        y: dict[Any, Any] = type(x)()
        self._remember(x, y)
        recorder = self.recorder
        attributes = getattr(x, "__dict__", None)
        attrs = None
        if attributes:  # e.g. the _metadata that Module.state_dict() hangs on its OrderedDict
            y.__dict__.update((yield from self._attributes(attributes, path)))
            attrs = self.node
        atomic = ATOMIC_TYPES
        memo = self.memo
        children: list[Any] = []  # the recorder's nodes of the values
        for old_key, value in x.items():
            key = old_key
            if type(key) not in atomic:
                key = yield from self.visit(old_key, (*path, old_key))
                self.recorder = None  # recordings hold atomic keys only
                # A copy whose __hash__ fails (it reads an attribute a cycle has not set yet)
                # raised raw below; hashed here, off the loop's path for atomic keys.
                with _rebuilding(type(x), path):
                    hash(key)
            vtype = type(value)
            if vtype in atomic:
                y[key] = value
                node = None
            elif vtype is _Tensor:
                staged = y[key] = self._child_tensor(value, path, old_key)
                node = (
                    None if recorder is None else self._record_leaf(value, staged, (*path, old_key))
                )
            elif vtype is dict:  # nested dicts are common: skip visit()'s generator
                found = memo.get(id(value), _MISSING)
                if found is _MISSING:
                    found = yield from self._dict(value, (*path, old_key))
                else:
                    self.recorder = None  # met twice: the walk shares its copy
                y[key] = found
                node = self.node
            else:
                y[key] = yield from self.visit(value, (*path, old_key))
                node = self.node
            children.append(node)
            self._countdown -= 1
            if self._countdown <= 0:
                self._countdown = _YIELD_EVERY
                yield
        if recorder is None:
            return y
        if len(children) > SMALL_CONTAINER:
            yield from self._record(recorder, recorder.mapping(type(x), x, children, attrs))
        elif self.recorder is recorder:
            try:
                self.node = recorder.small_mapping(type(x), x, children, attrs)
            except Unrecordable:
                self.recorder = None
        return y

    def _list(self, x: list[Any], path: Path) -> Walk:
        y: list[Any] = []
        self._remember(x, y)
        recorder = self.recorder
        atomic = ATOMIC_TYPES
        append = y.append
        children: list[Any] = []  # the recorder's nodes of the items
        for index, value in enumerate(x):
            vtype = type(value)
            if vtype in atomic:
                append(value)
                node = None
            elif vtype is _Tensor:
                staged = self._child_tensor(value, path, index)
                append(staged)
                node = (
                    None if recorder is None else self._record_leaf(value, staged, (*path, index))
                )
            else:
                append((yield from self.visit(value, (*path, index))))
                node = self.node
            children.append(node)
            if self._tick():
                yield
        if recorder is None:
            return y
        if len(children) > SMALL_CONTAINER:
            yield from self._record(recorder, recorder.sequence(children))
        elif self.recorder is recorder:
            try:
                self.node = recorder.small_sequence(children)
            except Unrecordable:
                self.recorder = None
        return y

    def _items(
        self, x: tuple[Any, ...], path: Path
    ) -> Generator[None, None, tuple[list[Any], list[Any]]]:
        """The items' copies, and the recorder's nodes of them."""
        items = []
        children = []
        for index, value in enumerate(x):
            items.append((yield from self.visit(value, (*path, index))))
            children.append(self.node)
            if self._tick():
                yield
        return items, children

    def _tuple(self, x: tuple[Any, ...], path: Path) -> Walk:
        recorder = self.recorder
        items, children = yield from self._items(x, path)
        # A tuple inside a cycle was rebuilt while visiting its own items: use that one.
        found = self.memo.get(id(x), _MISSING)
        if found is not _MISSING:
            self.recorder = None  # a cycle: recordings have none
            return found
        if recorder is not None and self.recorder is recorder:
            self.node = recorder.items(children)
        if all(a is b for a, b in zip(x, items, strict=True)):
            return x  # nothing mutable inside: the tuple is its own copy, like copy.deepcopy
        y = tuple(items)
        self._remember(x, y)
        return y

    def _namedtuple(self, x: Any, path: Path) -> Walk:
        """A namedtuple: always a new one, as ``copy.deepcopy`` makes (unlike a plain tuple)."""
        items, _ = yield from self._items(x, path)
        found = self.memo.get(id(x), _MISSING)
        if found is not _MISSING:
            return found
        y = type(x)._make(items)
        self._remember(x, y)
        attributes = getattr(x, "__dict__", None)
        if attributes:  # a subclass without __slots__ may carry instance attributes
            y.__dict__.update((yield from self._attributes(attributes, path)))
        return y

    def _set(self, x: set[Any] | frozenset[Any], path: Path) -> Walk:
        self.recorder = None  # recordings cover dicts, lists, tuples and tensors
        items = []
        for value in x:
            items.append((yield from self.visit(value, (*path, value))))
        with _rebuilding(type(x), path):  # the copies' __hash__ runs here
            y = type(x)(items)
        self._remember(x, y)
        return y

    def _method(self, x: types.MethodType, path: Path) -> Walk:
        self.recorder = None  # recordings cover dicts, lists, tuples and tensors
        owner = yield from self.visit(x.__self__, (*path, Attr("__self__")))
        y = types.MethodType(x.__func__, owner)
        self._remember(x, y)
        return y

    def _reduce(self, x: Any, path: Path) -> Walk:
        """Objects in general: rebuild from ``__reduce_ex__(4)``, as pickle and deepcopy do."""
        cls = type(x)
        if cls is torch.Generator:
            return self._generator(x, path)
        if getattr(cls, "__deepcopy__", None) in _WEAK_MAPPING_COPIES:
            return (yield from self._weak_mapping(x, path))
        try:
            reductor = copyreg.dispatch_table.get(cls)
            rv = reductor(x) if reductor is not None else x.__reduce_ex__(4)
        except Exception as error:
            raise UnstageableError(
                f"cannot stage a {cls.__module__}.{cls.__qualname__} object: {error}", path
            ) from error
        if isinstance(rv, str):
            return x  # a module-level singleton, named by its global name
        # What pickle accepts: a tuple of 2 to 6 items, the arguments a tuple. Anything else
        # failed below as a raw TypeError or ValueError, with no path.
        if not (isinstance(rv, tuple) and 2 <= len(rv) <= 6 and isinstance(rv[1], tuple)):
            raise UnstageableError(
                f"cannot stage a {cls.__module__}.{cls.__qualname__} object: its "
                f"__reduce_ex__ gave {_shown(rv)}, not a string or a tuple of 2 to 6 items "
                "whose second is a tuple of arguments",
                path,
            )
        func, args, state, list_items, dict_items, state_setter = (*rv, None, None, None, None)[:6]
        if args:
            new_args = []
            for index, arg in enumerate(args):
                new_args.append((yield from self.visit(arg, (*path, Attr(f"<arg {index}>")))))
            args = tuple(new_args)
        try:
            y = func(*args)
        except Exception as error:
            raise UnstageableError(
                f"cannot rebuild a {cls.__module__}.{cls.__qualname__} object: {error}", path
            ) from error
        self._remember(x, y)
        if state is not None and state_setter is not None:
            # pickle's sixth item (protocol 5): it sets the state in place of __setstate__.
            # Ignored, the state went into __dict__ as if the class had given none.
            new_state = yield from self.visit(state, path)
            with _rebuilding(cls, path):
                state_setter(y, new_state)
        elif state is not None:
            yield from self._set_state(y, state, path)
        if list_items is not None:
            for index, item in enumerate(list_items):
                new_item = yield from self.visit(item, (*path, index))
                with _rebuilding(cls, path):
                    y.append(new_item)
        if dict_items is not None:
            for old_key, value in dict_items:
                key = yield from self.visit(old_key, (*path, old_key))
                new_value = yield from self.visit(value, (*path, old_key))
                with _rebuilding(cls, path):
                    y[key] = new_value
        return y

    def _weak_mapping(self, x: Any, path: Path) -> Walk:
        """A ``WeakValueDictionary`` or ``WeakKeyDictionary``, as their ``__deepcopy__`` copies
        them: a new one of the class, its weakly held objects the same (not copied), the rest
        (the keys of the first, the values of the second) deep-copied.

        ``__reduce_ex__`` gives their internals instead: a ``WeakValueDictionary``'s weak
        references cannot be rebuilt (it was refused), and a ``WeakKeyDictionary`` came back
        with the source's removal callback, so a key that died left the copy's entry behind.
        """
        self.recorder = None  # recordings cover dicts, lists, tuples and tensors
        with _rebuilding(type(x), path):
            y: Any = type(x)()
        self._remember(x, y)  # a cycle through the mapping stays closed
        # A list first: the loop yields to the driver, and an entry whose object dies meanwhile
        # would change the dict being iterated (and the source's pending removals stay as they
        # were: the walk never mutates the source).
        entries = list(x.data.items())
        weak_values = isinstance(x, weakref.WeakValueDictionary)
        for key, value in entries:
            if weak_values:
                held = value()
                if held is not None:
                    new_key = yield from self.visit(key, (*path, key))
                    with _rebuilding(type(x), path):
                        y[new_key] = held
            else:
                held = key()
                if held is not None:
                    new_value = yield from self.visit(value, (*path, held))
                    with _rebuilding(type(x), path):
                        y[held] = new_value
            if self._tick():
                yield
        return y

    def _generator(self, x: torch.Generator, path: Path) -> Any:
        """A ``torch.Generator``: a copy of it, its state cloned rather than staged.

        ``__reduce_ex__`` gives its state as a tensor that ``__setstate__`` reads at once; a
        staged twin's bytes land only after the walk, so the rebuilt generator read a buffer
        not yet filled (every call raised "Invalid mt19937 state"). ``copy.deepcopy`` clones
        that state (a few KB, on the CPU whatever the generator's device), so this does too.
        """
        self.recorder = None  # recordings cover dicts, lists, tuples and tensors
        with _rebuilding(type(x), path):
            y = copy.deepcopy(x)
        self._remember(x, y)
        return y

    def _set_state(self, y: Any, state: Any, path: Path) -> Walk:
        if hasattr(y, "__setstate__"):
            if _is_dataclass_field_list(y, state):
                state = yield from self._field_values(y, state, path)
            else:
                state = yield from self.visit(state, path)
            with _rebuilding(type(y), path):
                y.__setstate__(state)
            return None
        slots = None
        if isinstance(state, tuple) and len(state) == 2:
            state, slots = state
        # Without __setstate__, pickle sets the state's items as attributes: anything without
        # items() failed in the loop below as a raw AttributeError.
        for part in (state, slots):
            if part and not callable(getattr(part, "items", None)):
                cls = type(y)
                raise UnstageableError(
                    f"cannot rebuild a {cls.__module__}.{cls.__qualname__} object: its state "
                    f"is {_shown(part)}, not a dict of attributes, and it has no __setstate__",
                    path,
                )
        if state:
            new_state = yield from self._attributes(state, path)
            with _rebuilding(type(y), path):
                y.__dict__.update(new_state)
        if slots:
            new_slots = yield from self._attributes(slots, path)
            with _rebuilding(type(y), path):
                for name, value in new_slots.items():
                    object.__setattr__(y, name, value)  # frozen dataclasses with slots, too
        return None

    def _field_values(self, y: Any, values: list[Any], path: Path) -> Walk:
        """A frozen slotted dataclass's state: its field values, each at its field's name."""
        new = []
        for field, value in zip(dataclasses.fields(y), values, strict=True):
            new.append((yield from self.visit(value, (*path, Attr(field.name)))))
        return new

    def _attributes(self, attributes: dict[str, Any], path: Path) -> Walk:
        recorder = self.recorder
        new = {}
        children = []
        for name, value in attributes.items():
            new[name] = yield from self.visit(value, (*path, Attr(name)))
            children.append(self.node)
            if self._tick():
                yield
        if recorder is not None:  # recorded as a plain dict of the attributes
            yield from self._record(recorder, recorder.mapping(dict, attributes, children, None))
        return new

    def visit_now(self, x: Any, path: Path) -> Any:
        """Visit without yielding: for the few objects hanging off a tensor."""
        walk = self.visit(x, path)
        try:
            while True:
                next(walk)
        except StopIteration as stop:
            return stop.value


def _shown(value: Any) -> str:
    """A value in an error message: its type, and a short repr."""
    text = repr(value)
    return f"a {type(value).__qualname__} ({text[:60]}{'...' if len(text) > 60 else ''})"


@contextlib.contextmanager
def _rebuilding(cls: type, path: Path) -> Iterator[None]:
    """Turn an error of an object's own rebuilding code (``__setstate__``, ``append``,
    ``__setitem__``) into an :class:`UnstageableError` naming the object's path: raw, it
    reached the caller as whatever the class raised, with no word of where."""
    try:
        yield
    except UnstageableError:
        raise
    except Exception as error:
        raise UnstageableError(
            f"cannot rebuild a {cls.__module__}.{cls.__qualname__} object: {error}", path
        ) from error


def _is_dataclass_field_list(y: Any, state: Any) -> bool:
    """Whether ``state`` is what a frozen ``slots=True`` dataclass pickles: its field values.

    Such a class cannot be rebuilt by setting attributes (it is frozen and has no ``__dict__``),
    so ``dataclasses`` gives it a ``__getstate__`` that returns a plain list of the values of
    ``fields()``, in order. Knowing that, the walk can name each value's path by its field.
    """
    cls = type(y)
    getstate = getattr(cls, "__getstate__", None)
    return (
        type(state) is list
        and getattr(getstate, "__module__", None) == "dataclasses"
        and dataclasses.is_dataclass(cls)
        and len(state) == len(dataclasses.fields(cls))
    )
