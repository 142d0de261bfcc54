"""The safetensors file format as astage writes and reads it: its constants, the header's text
and digest, and byte views of tensors for the writer and the readers.

Planning a file is :mod:`._layout`; reading one, trusting nothing in it, is :mod:`._load`.

A safetensors file is an 8-byte little-endian header length, a JSON header, then the tensors'
bytes back to back. The header maps each key to ``dtype``, ``shape`` and ``data_offsets``
(relative to the end of the header), plus ``__metadata__``: a str -> str map.

How a nested state dict maps onto it:

* **Keys** are paths rendered by :func:`astage.format_path`: ``['model']['layers.0.weight']``,
  ``['optim']['state'][3]['exp_avg']``. Dict keys are printed with ``repr``, so a dot or a quote
  inside a key never makes two paths look alike. A tensor that is the whole state dict is
  ``<root>``. Where two paths still print alike (two NaN keys), the second tensor is stored
  under a ``<storage N>`` name instead: no tensor is lost.
* **One entry per storage.** safetensors forbids overlapping entries, so each storage is stored
  once. When a tensor spans its storage (offset 0, contiguous, a dtype safetensors knows), the
  entry *is* that tensor under its path. Otherwise the storage's bytes are stored as a ``U8``
  entry named ``<storage N>`` (a name no path can take). A numpy array is an entry too (its
  bytes, little-endian, captured when the layout is planned).
* **The skeleton** (containers, plain values, and for each tensor the entry it lives in and, for
  views, its dtype, shape, stride and offset) is JSON in ``__metadata__["astage"]``; tied
  weights refer to the same entry twice, so :func:`~._load.load` gives them one storage again. An
  ``OrderedDict``'s ``_metadata`` attribute (``Module.state_dict()`` sets it, with each
  submodule's version, and ``load_state_dict`` reads it) is kept too, as plain JSON, and so are
  Python attributes set on a tensor (plain values only).
* **A digest** of the header (``__metadata__["astage.sha256"]``: the SHA-256 of the header's
  JSON text, taken with the digest's own digits zeroed) makes any later edit of the header a
  :class:`CheckpointFormatError`. The skeleton says ``"sealed": true``, so a header whose
  digest entry was damaged away is refused too, where one written before the digest existed
  (neither) still loads.
  It guards against corruption, not against an attacker, who can recompute it: the loader
  checks every field regardless.

Only plain data goes in (see :mod:`._skeleton`): containers, plain values, numpy arrays and
numbers, ``torch.Size``, ``torch.dtype``, enums, paths, ``argparse.Namespace``, sets, and strided
CPU or device tensors. Anything else is an :class:`~astage.UnsavableError` naming its path: a
checkpoint holds no pickle, so opening one runs no code.

Reading trusts nothing in a file: every field is checked (:mod:`._load`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Any

import torch

from .._drivers._gil import GilSharing
from .._errors import (
    CheckpointError,
    CheckpointFormatError,
    InvalidOptionsError,
)
from .._torch import (
    dtensor_local,
)
from ._skeleton import (
    is_dtensor,
    shown,
)

FORMAT_VERSION = 1
METADATA_KEY = "astage"
"""The ``__metadata__`` entry that holds the skeleton."""
DIGEST_KEY = "astage.sha256"
"""The ``__metadata__`` entry that holds the header's digest."""
MAX_HEADER_BYTES = 100_000_000
"""safetensors' limit on the JSON header: a longer one opens in no reader."""
DATA_ALIGN = 4096
"""The data section starts at a multiple of this (a page; what direct I/O asks on Linux)."""

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
    torch.complex64: "C64",
}
"""Dtypes stored under their own safetensors name; others are stored as bytes plus a view."""

if sys.byteorder != "little":  # pragma: no cover - safetensors is little-endian
    raise ImportError("astage writes safetensors files on little-endian machines only")


_UNSEALED = f'"{DIGEST_KEY}":"{"0" * 64}"'.encode()


JSON_PIECE = 256
"""The most items of one list or dict that :func:`json_text` hands to one ``json.dumps``."""
JSON_OPEN_DEPTH = 8
"""How deep :func:`json_text` opens small containers to look for big ones inside."""


JSON_STR_PIECE = 1 << 16
"""The most characters of one str that :func:`json_text` hands to one ``json.dumps``."""


def json_text(value: Any, sharing: GilSharing | None = None) -> str:
    """``json.dumps(value, separators=(",", ":"))``, the same text, made in pieces; but for a
    newline after each comma between two runs of a big top-level container, where a reader
    may cut it (``_load.object_in_pieces``).

    Why: the C encoder holds the GIL for all of a call. A save's header over 20,000 tensors
    took two calls of 17 and 29 ms, in a worker thread: the event loop could not run
    meanwhile, the longest stall of such a save. Here a list or dict of more than
    :data:`JSON_PIECE` items is encoded that many items at a time (an item that is itself such
    a container in pieces of its own), the small containers of the top
    :data:`JSON_OPEN_DEPTH` levels, where a skeleton nests its big ones, item by item, and a
    str of more than :data:`JSON_STR_PIECE` characters (the header's skeleton, 1.8 MB of JSON
    over 20,000 tensors, whose quotes are all escaped: 5-8 ms a call) in pieces of that many
    (each character is escaped on its own, so the pieces' texts join into the whole's).

    Pieces alone only let CPython's forced switch (after 5 ms) happen between them;
    ``sharing`` (in a worker thread beside an event loop) is ticked after each piece, so that
    the loop takes the GIL sooner.
    """
    parts: list[str] = []
    _JsonPieces(parts, sharing).add(value, 0)
    return "".join(parts)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


class _JsonPieces:
    """Appends a value's JSON text to ``parts`` in pieces, ticking ``sharing`` after each."""

    def __init__(self, parts: list[str], sharing: GilSharing | None) -> None:
        self.parts = parts
        self.sharing = sharing

    def dumps(self, value: Any) -> str:
        if type(value) is str and len(value) > JSON_STR_PIECE:
            pieces = ['"']
            for start in range(0, len(value), JSON_STR_PIECE):
                pieces.append(_dumps(value[start : start + JSON_STR_PIECE])[1:-1])
                self.tick()
            pieces.append('"')
            return "".join(pieces)
        text = _dumps(value)
        self.tick()
        return text

    def tick(self) -> None:
        if self.sharing is not None:
            self.sharing.tick()

    def add(self, value: Any, depth: int) -> None:
        parts = self.parts
        kind = type(value)
        if kind is not dict and kind is not list:
            parts.append(self.dumps(value))
            return
        count = len(value)
        if count > JSON_PIECE:
            self.chunked(value, depth)
        elif count and depth < JSON_OPEN_DEPTH:
            if kind is list:
                parts.append("[")
                for index, item in enumerate(value):
                    if index:
                        parts.append(",")
                    self.add(item, depth + 1)
                parts.append("]")
            else:
                parts.append("{")
                for index, (key, item) in enumerate(value.items()):
                    if index:
                        parts.append(",")
                    parts.append(_json_key(key))
                    parts.append(":")
                    self.add(item, depth + 1)
                parts.append("}")
        else:
            parts.append(self.dumps(value))

    def chunked(self, value: dict[Any, Any] | list[Any], depth: int) -> None:
        """A big list or dict: runs of small items in one ``json.dumps`` each, big items alone."""
        parts = self.parts
        is_list = isinstance(value, list)
        items = value if isinstance(value, list) else list(value.items())
        parts.append("[" if is_list else "{")
        run: list[Any] = []
        first = True

        # At the top level, a newline after the comma between two runs: whitespace to JSON,
        # and never raw inside a JSON string, so a reader can cut the text there and parse
        # the runs one at a time (``_load.object_in_pieces``).
        separator = ",\n" if depth == 0 else ","

        def flush() -> None:
            nonlocal first
            if run:
                text = self.dumps(run if is_list else dict(run))
                parts.append(text[1:-1] if first else separator + text[1:-1])
                first = False
                run.clear()

        for item in items:
            if _is_big(item if is_list else item[1]):
                flush()
                if not first:
                    parts.append(separator)
                first = False
                if not is_list:
                    parts.append(_json_key(item[0]))
                    parts.append(":")
                self.add(item if is_list else item[1], depth + 1)
                continue
            run.append(item)
            if len(run) == JSON_PIECE:
                flush()
        flush()
        parts.append("]" if is_list else "}")


def _json_key(key: Any) -> str:
    """A dict key as ``json.dumps`` writes it (an int, float, bool or None key as a string)."""
    return _dumps({key: 0})[1:-3]


def _is_big(item: Any) -> bool:
    return (type(item) is dict or type(item) is list) and len(item) > JSON_PIECE


HEADER_PIECE = 1 << 20
"""Header text is encoded, hashed and written in pieces of about this many bytes."""


def header_text(header: dict[str, Any], align: int = 8, then: int = 0, members: str = "") -> bytes:
    """The bytes :func:`header_pieces` would write, joined."""
    return b"".join(header_pieces(header, align, then, members))


def header_pieces(
    header: dict[str, Any],
    align: int = 8,
    then: int = 0,
    members: str = "",
    sharing: GilSharing | None = None,
) -> list[bytes]:
    """The JSON text of ``header``, padded with spaces (which safetensors allows after the
    JSON) so that the 8-byte length prefix, the text and ``then`` bytes after it end at a
    multiple of ``align``, with its digest: the SHA-256 of the very text, taken while the
    digest's 64 hex digits are zeros (cheap: one hash, no canonical form).

    ``members``: more members of the top-level object, as JSON text (``"a":{...},"b":{...}``)
    already made, placed after those of ``header``: a save's entries kept from its last one.

    In pieces, to be written one after the other: over 20,000 tensors the header is 3 MB, and
    each whole-text step (join, encode, hash, replace, prefix) was a copy or a scan of 1.5-2.5
    ms holding the GIL, 10 ms in all during which a worker thread kept an event loop from
    running. The digest's member comes first in ``__metadata__``, so that the one piece that
    changes once the digest is known is a small one. ``sharing`` as in :func:`json_text`.
    """
    meta = header["__metadata__"]
    header["__metadata__"] = {
        DIGEST_KEY: "0" * 64,
        **{key: value for key, value in meta.items() if key != DIGEST_KEY},
    }
    texts: list[str] = []
    pieces = _JsonPieces(texts, sharing)
    pieces.add(header, 0)
    if members:
        texts[-1:-1] = [",\n", members]  # before the top-level object's closing brace
    encoded: list[bytes] = []
    run: list[str] = []
    size = 0
    for text in texts:
        run.append(text)
        size += len(text)
        if size >= HEADER_PIECE:
            encoded.append("".join(run).encode())
            pieces.tick()
            run, size = [], 0
    total = sum(map(len, encoded)) + sum(map(len, run))
    run.append(" " * (-(8 + total + then) % align))
    encoded.append("".join(run).encode())
    # Inside a JSON string a quote is escaped: nothing else looks like the placeholder.
    counts = [piece.count(_UNSEALED) for piece in encoded]
    assert sum(counts) == 1
    hasher = hashlib.sha256()
    for piece in encoded:
        hasher.update(piece)
        pieces.tick()
    digest = hasher.hexdigest()
    header["__metadata__"][DIGEST_KEY] = digest
    sealed = counts.index(1)
    encoded[sealed] = encoded[sealed].replace(_UNSEALED, f'"{DIGEST_KEY}":"{digest}"'.encode())
    return encoded


def digest_matches(raw: bytes, digest: str) -> bool:
    sealed = f'"{DIGEST_KEY}":"{digest}"'.encode()
    if len(digest) != 64 or raw.count(sealed) != 1:
        return False
    return hashlib.sha256(raw.replace(sealed, _UNSEALED)).hexdigest() == digest


def fs_path(path: Any, what: str) -> str:
    """``path`` (a str, bytes or ``os.PathLike``) as the str the OS calls take, or
    :class:`InvalidOptionsError` naming ``what``: no path may reach them as a raw ``TypeError``
    or, with a NUL byte (which no file name holds), a raw ``ValueError``."""
    try:
        name = os.fsdecode(path)
    except TypeError:
        raise InvalidOptionsError(
            f"{what} must be a str or os.PathLike path, not {type(path).__qualname__}"
        ) from None
    if "\0" in name:
        raise InvalidOptionsError(f"{what} {name!r} holds a NUL byte, which no file name holds")
    return name


def read_exactly(
    fd: int, view: memoryview, offset: int, path: str, entry: str | None = None
) -> None:
    """Fill ``view`` from ``fd`` at ``offset``; a file that ends first is a format error.

    ``entry``, the header entry being read, is named in the error: a file cut short after
    its header was checked (truncated while it loads) tells which tensor it failed in."""
    done = 0
    while done < len(view):
        try:
            got = os.preadv(fd, [view[done:]], offset + done)
        except OSError as error:
            raise CheckpointError(f"cannot read {path}: {error.strerror or error}") from error
        if got <= 0:
            field = "" if entry is None else f" (header entry {shown(entry)})"
            raise CheckpointFormatError(f"{path}: the file ends before its data does{field}")
        done += got


def tensor_memoryview(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory, without a copy."""
    nbytes = tensor.nbytes
    if nbytes == 0:
        return memoryview(bytearray())
    import ctypes

    array = (ctypes.c_ubyte * nbytes).from_address(tensor.data_ptr())
    return memoryview(array).cast("B")


def storage_memoryview(tensor: torch.Tensor) -> memoryview:
    """All bytes of a CPU tensor's storage, without a copy (keep ``tensor`` alive meanwhile).

    A DTensor's are its local shard's: that is what its entry in the file holds.
    """
    if is_dtensor(tensor):
        tensor = dtensor_local(tensor)
    storage = tensor.untyped_storage()
    nbytes = storage.nbytes()
    if nbytes == 0:
        return memoryview(b"")
    import ctypes

    array = (ctypes.c_ubyte * nbytes).from_address(storage.data_ptr())
    return memoryview(array).cast("B")
