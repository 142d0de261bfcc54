"""Paths: where an object sits inside a state dict.

A path is a tuple of dict keys, sequence indices and attribute names. Attribute names are
wrapped in :class:`Attr` so that a path prints the way Python code would reach the object:
``['optim']['state'][3].lock``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Path = tuple[Any, ...]


class Attr(str):
    """An attribute name inside a path (as opposed to a dict key that happens to be a str)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Attr({str.__repr__(self)})"


def format_path(path: Path) -> str:
    """Render a path as Python subscripts and attribute accesses; the root is ``<root>``."""
    return _rendered(path, str)


SHOWN_KEY_CHARS = 120
"""The most characters of one key's ``repr`` an error message shows (:func:`shown_path`)."""
SHOWN_PARTS = 12
"""The most keys of a path an error message shows (:func:`shown_path`)."""


def shown_path(path: Path) -> str:
    """:func:`format_path` for a message: a key's ``repr`` cut past :data:`SHOWN_KEY_CHARS`
    characters, a path of more than :data:`SHOWN_PARTS` keys cut in the middle.

    Why: an error under a 1 MB string key carried the whole key in its message, and one at
    the end of 100 nested levels all 100 keys. The error's ``path`` attribute keeps it whole.
    """
    if len(path) > SHOWN_PARTS:
        head, tail = path[: SHOWN_PARTS // 3], path[-(SHOWN_PARTS - SHOWN_PARTS // 3) :]
        hidden = len(path) - len(head) - len(tail)
        return f"{shown_path(head)}...({hidden} more)...{shown_path(tail)}"
    return _rendered(path, _cut)


def _rendered(path: Path, fit: Callable[[str], str]) -> str:
    """The path's parts as Python code, each key's text through ``fit``."""
    if not path:
        return "<root>"
    parts = []
    for part in path:
        if isinstance(part, Attr):
            parts.append(f".{fit(str(part))}")
        else:
            parts.append(f"[{fit(_shown(part))}]")
    return "".join(parts)


def _cut(text: str) -> str:
    if len(text) <= SHOWN_KEY_CHARS:
        return text
    half = SHOWN_KEY_CHARS // 2
    return f"{text[:half]}...({len(text) - 2 * half} characters)...{text[-half:]}"


def _shown(key: Any) -> str:
    """``repr(key)``; a key whose ``repr`` raises must not turn the error that names it (an
    UnstageableError, say) into that exception."""
    try:
        return repr(key)
    except Exception:  # noqa: BLE001 - any failure of foreign code: name its type instead
        return f"<{type(key).__qualname__} object: its repr() failed>"
