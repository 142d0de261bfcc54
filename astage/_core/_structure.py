"""The recorded structure of a state dict: a node per container, with what a replay needs.

A full walk's recorder (:mod:`._recording`) builds these nodes as it goes; a replay
(:mod:`._replay`) rebuilds the result from them. A long run of like dicts (the same keys, each
holding tensors: an optimizer's per-parameter state) is summed up as a :class:`Group`, which a
replay checks and fills a few hundred items at a time.
"""

from __future__ import annotations

import operator
from collections.abc import Generator
from typing import Any, NamedTuple

from ._walk import Walk

CHUNK = 64
"""Items (atoms, tensors) replayed between two chances for the driver to yield."""

BULK_STEP = 256
"""Tensors per bulk step. A step holds the loop: 256 detaches or metadata reads take 0.1-0.3 ms
on a quiet machine, 1024 took 8-20 ms on a loaded one (measured on this project's 2 cores)."""


def mapped(function: Any, items: list[Any]) -> Generator[None, None, list[Any]]:
    """``list(map(function, items))``, yielding every :data:`BULK_STEP` items."""
    out: list[Any] = []
    for start in range(0, len(items), BULK_STEP):
        out += map(function, items[start : start + BULK_STEP])
        yield
    return out


_is = operator.is_


def same_keys(keys: list[Any], expected: list[Any], expected_types: list[type]) -> bool:
    """Whether ``keys`` are the recorded ``expected`` ones, of the recorded types.

    The types first, by identity: only keys of the recorded (atomic) types are then compared
    with ``==``. Compared first, a key of another kind ran its own ``__eq__``, which may raise
    (a tensor key, as in ``dict(optimizer.state)``, answers ``== 0`` with a tensor that has no
    truth value): the call failed where a walk stages it. An atom may still run user code
    (a weak reference compares its referents): a failure there is a difference too.
    """
    if len(keys) != len(expected) or not all(map(_is, map(type, keys), expected_types)):
        return False
    try:
        return keys == expected
    except Exception:  # noqa: BLE001 - a key's own __eq__ failed: not the recorded key
        return False


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


def size_of(children: list[Any]) -> int:
    """The items below a container: 1 per atom or tensor, a node's own count for a node."""
    return len(children) + int(sum([child.size - 1 for child in children if type(child) in _NODES]))


_NODES = (DictNode, ListNode, TupleNode)


_SUMMARY_STEP = 1024
"""Children summed up between two yields by :func:`summarize` (a Python pass over 50,000
children in one go held the loop 10-18 ms at the end of a first call)."""


class Summary(NamedTuple):
    atoms: bool
    """Every child is an atom."""
    size: int
    """See :func:`size_of`."""
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
    return part.count(None) == len(part), size_of(part), in_row


def summarize(children: list[Any]) -> Generator[None, None, Summary]:
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


def summarize_now(children: list[Any]) -> Summary:
    """:func:`summarize` of a small container (at most :data:`~._walk.SMALL_CONTAINER` children)."""
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


def group_of(children: list[Any]) -> Walk:
    """The :class:`Group` that ``children`` form, or None; yields every :data:`CHUNK` items."""
    group = _group_head(children)
    if group is None:
        return None
    for start in range(0, len(children), CHUNK):
        yield
        if not _in_group(children, start, min(start + CHUNK, len(children)), group):
            return None
    return group


def group_now(children: list[Any]) -> Group | None:
    """:func:`group_of` of a small container (at most :data:`~._walk.SMALL_CONTAINER` children)."""
    group = _group_head(children)
    if group is None or not _in_group(children, 0, len(children), group):
        return None
    return group


def dict_node(
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


def list_node(children: list[Any], summary: Summary, group: Group | None) -> ListNode:
    if summary.atoms:
        return ListNode(children, True, 0, None)
    node = ListNode(children, False, summary.size, summary.span)
    node.group = group
    return node


# -- replaying one ------------------------------------------------------------------------------
