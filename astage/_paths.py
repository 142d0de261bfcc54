"""Paths: where an object sits inside a state dict.

A path is a tuple of dict keys, sequence indices and attribute names. Attribute names are
wrapped in :class:`Attr` so that a path prints the way Python code would reach the object:
``['optim']['state'][3].lock``.
"""

from __future__ import annotations

from typing import Any

Path = tuple[Any, ...]


class Attr(str):
    """An attribute name inside a path (as opposed to a dict key that happens to be a str)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Attr({str.__repr__(self)})"


def format_path(path: Path) -> str:
    """Render a path as Python subscripts and attribute accesses; the root is ``<root>``."""
    if not path:
        return "<root>"
    parts = []
    for part in path:
        if isinstance(part, Attr):
            parts.append(f".{part}")
        else:
            parts.append(f"[{_shown(part)}]")
    return "".join(parts)


def _shown(key: Any) -> str:
    """``repr(key)``; a key whose ``repr`` raises must not turn the error that names it (an
    UnstageableError, say) into that exception."""
    try:
        return repr(key)
    except Exception:  # noqa: BLE001 - any failure of foreign code: name its type instead
        return f"<{type(key).__qualname__} object: its repr() failed>"
