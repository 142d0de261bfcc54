"""A state dict's skeleton as JSON: its containers and plain values, with tagged nodes.

The checkpoint file (its ``__metadata__``, :mod:`astage._safetensors`) and the replication wire
header (:mod:`astage._replication`) both carry a skeleton. A node is

- ``str``, ``int``, ``bool``, ``None`` or a finite ``float``: the value itself;
- ``{"float": "nan" | "inf" | "-inf"}``;
- ``{"list": [...]}``, ``{"tuple": [...]}``, ``{"dict": [[key, value], ...]}``,
  ``{"odict": [[key, value], ...]}``, the last with an optional ``"_metadata"`` (what
  ``Module.state_dict()`` hangs on its OrderedDict: plain values only);
- ``{"set": [...]}``, ``{"frozenset": [...]}`` (hashable plain values only);
- ``{"namespace": [[name, value], ...]}``: an ``argparse.Namespace`` (no tensors inside);
- ``{"torch.Size": [ints]}``, ``{"torch.dtype": "float32"}``;
- ``{"path": ["PurePosixPath" | "PureWindowsPath" | "PosixPath" | "WindowsPath", str]}``;
- ``{"enum": ["module", "Qual.Name", value]}``: an ``Enum`` member by its class and plain value;
- ``{"numpy.scalar": ["<f4", "0000c03f"]}``: a numpy number by its dtype and its bytes in hex;
- whatever a format adds for tensors and arrays (``encode_tensor``, ``encode_array`` /
  ``decode_other``); for DTensors both formats describe the device mesh and the placements
  with the JSON helpers at the end of this module (:func:`mesh_node`, :func:`placement_node`).

Keys are plain values too. A container that contains itself cannot be encoded, and containers
nest at most :data:`MAX_DEPTH` deep, both ways: what is saved can be loaded, and a hostile
skeleton cannot exhaust the stack.

Decoding trusts nothing: every node is checked for its shape and type, and an error names the
node's path. No code of the file's runs: an enum is looked up only in a module that is already
imported (never imported because a file names it), through the class's own ``__dict__``
(no ``__getattr__``), and its member by value without calling ``_missing_``.
"""

from __future__ import annotations

import argparse
import enum
import math
import pathlib
import re
import reprlib
import sys
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .._drivers._gil import GilSharing
from .._errors import AstageError
from .._paths import Attr, Path, format_path

PLAIN_TYPES = (str, int, float, bool, type(None))
"""Values a skeleton holds as themselves (a float that is not finite is tagged)."""

MAX_DEPTH = 100
"""How deep containers may nest inside each other (the root container is depth 1)."""

TORCH_DTYPES: dict[str, torch.dtype] = {
    str(value).removeprefix("torch."): value
    for value in vars(torch).values()
    if isinstance(value, torch.dtype)
}
"""Every torch dtype by the name a skeleton records (``"float32"``, ``"bfloat16"``, ...)."""
_SUB_BYTE_INTS = re.compile(r"u?int[1-7]")
MAX_SIZE = 1 << 62
"""Every size, stride, offset and index that a file or a partner's header gives is below this:
torch takes them as int64 (a larger one escaped ``set_`` as its own ``TypeError``), and no real
storage is indexed past it."""

VIEW_DTYPES = {
    name: d
    for name, d in TORCH_DTYPES.items()
    if not name.startswith("q") and not _SUB_BYTE_INTS.fullmatch(name)
}
"""The dtypes a stored view (a file's, a partner's) may have: every torch dtype but the
quantized ones and the sub-byte integers (``uint1`` ... ``int7``): astage cannot stage
either, and a view of a sub-byte one is a tensor torch cannot read (not even ``clone``,
``copy_`` or ``repr``)."""

_NEG_BIT_REAL_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


def takes_conj_bit(dtype: torch.dtype) -> bool:
    """Whether a view of ``dtype`` may carry the lazy conjugation bit: a complex one only."""
    return dtype.is_complex


def takes_neg_bit(dtype: torch.dtype) -> bool:
    """Whether a view of ``dtype`` may carry the lazy negation bit.

    Why: torch sets it on complex views and on the real views of their parts (a conjugate's
    ``.imag``), and no other way; a decoder that let a file or a partner set it on another
    dtype would hand out a tensor that cannot be read (``neg_cpu`` is not implemented for
    ``bool``, ``uint16`` or the float8 types).
    """
    return dtype.is_complex or dtype in _NEG_BIT_REAL_DTYPES


def unreadable_view(x: torch.Tensor) -> str | None:
    """Why a reader would refuse a stored view of strided ``x`` (a file's, a partner's), or
    None: the decoders' dtype and neg-bit rules, for the encoders to refuse ``x`` first, naming
    its path (what they wrote, no reader took).

    A sub-byte integer dtype (``uint1`` ... ``int7``): torch cannot copy it, nor read a view
    of it. The neg bit on a dtype other than a complex or floating-point one: torch sets it on
    any dtype (``Tensor._neg_view()``), a decoder takes it only where torch makes it itself.
    """
    name = str(x.dtype).removeprefix("torch.")
    if name not in VIEW_DTYPES:
        return f"a tensor of dtype {name}"
    if x.is_neg() and not takes_neg_bit(x.dtype):
        return (
            f"a negative view (is_neg()) of dtype {name}: only complex and floating-point "
            "views keep the bit (resolve_neg() it first, where torch can negate that dtype)"
        )
    return None


_PATH_TYPES: dict[str, type[pathlib.PurePath]] = {
    cls.__name__: cls
    for cls in (
        pathlib.PurePosixPath,
        pathlib.PureWindowsPath,
        pathlib.PosixPath,
        pathlib.WindowsPath,
    )
}
_PURE_FLAVOUR = {"PosixPath": pathlib.PurePosixPath, "WindowsPath": pathlib.PureWindowsPath}
_NUMPY_DTYPE = re.compile(r"[<>|][biufc][0-9]{1,2}")
"""numpy dtype strings of plain numbers (``"<f4"``, ``"|b1"``): the only ones decoded."""
_FLOAT_TAGS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_SET_TYPES: dict[str, type] = {"set": set, "frozenset": frozenset}


def tensor_attribute_allowed(name: str) -> bool:
    """Whether a Python attribute of a tensor may be named ``name`` in a file.

    Why: a loader sets it with ``setattr`` on the tensor it builds, so the name must be an
    identifier that shadows nothing of a tensor's (``T``, ``data``, ``name`` ...) and no dunder.
    The saver refuses what the loader would refuse: a file that astage writes must load.
    """
    return (
        name.isidentifier() and not name.startswith("__") and not hasattr(torch.nn.Parameter, name)
    )


def _max_digits() -> int:
    """The most decimal digits an int in a skeleton may have: Python converts at most
    ``sys.get_int_max_str_digits()`` digits (4300 by default) to and from text, and a loader
    runs with the default, whatever this process set."""
    digits: int = sys.int_info.default_max_str_digits
    current = sys.get_int_max_str_digits()
    if current:  # 0: no limit in this process; a loader still has the default
        digits = min(digits, current)
    return digits


def _int_limit() -> int:
    """Ints whose absolute value reaches this have more than :func:`_max_digits` digits."""
    digits = _max_digits()
    limit = _INT_LIMITS.get(digits)
    if limit is None:
        limit = _INT_LIMITS[digits] = 10**digits
    return limit


_INT_LIMITS: dict[int, int] = {}


def _int_digits(bits: int) -> int:
    """A lower bound on the decimal digits of an int of ``bits`` bits (log10(2) > 0.3)."""
    return bits * 3 // 10


def _numpy() -> Any:
    """The numpy module if something already imported it (a numpy value implies it was)."""
    return sys.modules.get("numpy")


_CONTAINERS = (dict, OrderedDict, list, tuple, set, frozenset, argparse.Namespace)
"""The container types an encoder writes as nodes of their own (and sizes, repeats counted)."""


class SkeletonEncoder:
    """Encodes everything but tensors and arrays; a format's subclass encodes those.

    ``error`` is the AstageError subclass raised for what cannot be encoded, ``verb`` how its
    messages say it (``"saved"``, ``"sent"``), ``refusal`` the message for an object of another
    type (``{type}`` is replaced by its qualified name).
    """

    error: type[AstageError] = AstageError
    verb = "encoded"
    refusal = "cannot encode a {type} object"
    max_header_bytes = 100_000_000
    """The most a format's header may take (safetensors' limit by default): a skeleton whose
    shared containers would repeat past it is refused as the encoder meets the repeat."""

    def __init__(self) -> None:
        self._active: set[int] = set()  # containers on the current path: a cycle is an error
        self._no_tensors: str | None = None  # why no tensor may appear here, inside what
        self._depth = 0
        self._reach = 0  # the deepest self._depth since the container being encoded began
        self._header_bytes = 0  # a lower bound on the JSON so far, repeats counted in full
        self._entries = 0  # tensors and arrays encoded (their nodes are a format's own)
        self._done: dict[int, tuple[Any, int, int, int, Any]] = {}
        """Containers encoded, by id: the container (kept alive, so its id stays its own),
        the header bytes, text characters and height of its subtree, and its node when no
        tensor or array is inside (then the same whatever the path)."""
        self._root: Any = None  # the outermost container encoded
        self._projected = False  # the root's least size was weighed (at a repeat with tensors)
        self.text_chars = 0
        """Characters of every str encoded: a lower bound on the skeleton's JSON size."""
        self.longest_text: tuple[int, Path] = (0, ())
        """The longest str encoded, and its path."""
        self.sharing: GilSharing | None = None
        """Set where the encoder runs in a worker thread beside an event loop: ticked at each
        tensor and container, it lets the loop take the GIL (:mod:`astage._drivers._gil`)."""

    def forget(self) -> None:
        """Let go of the containers met and their nodes (the encoder is done)."""
        self._done.clear()
        self._active.clear()
        self._root = None

    def encode(self, x: Any, path: Path) -> Any:
        """The JSON node for ``x``: plain values as themselves, the rest as a tagged object."""
        cls = type(x)
        self._header_bytes += 2  # a value and its separator, at least
        if cls is float:
            return x if math.isfinite(x) else {"float": repr(x)}
        if cls is str:
            self._header_bytes += len(x)
            self.text_chars += len(x)
            if len(x) > self.longest_text[0]:
                self.longest_text = (len(x), path)
            return x
        if cls is int:
            bits = x.bit_length()
            # 2000 bits: under 640 digits, the least limit Python allows (a cheap first test).
            if bits > 2000 and not -_int_limit() < x < _int_limit():
                # json.dumps would raise a raw ValueError; json.loads refuses it as well.
                raise self.error(
                    f"an int of {bits} bits (over {_max_digits()} decimal digits) "
                    f"cannot be {self.verb}: Python converts no longer int to or from JSON "
                    "text; store it as a str",
                    path,
                )
            # Its digits, at least 3 per 10 bits: counted as 2, an int of 4,000 digits let a
            # few shared lists of them pass as 30 MB of header where they wrote 4 GB.
            self._header_bytes += _int_digits(bits)
            return x
        if cls in (bool, type(None)):
            return x
        if isinstance(x, torch.Tensor):
            if self._no_tensors is not None:
                raise self.error(f"{self._no_tensors} cannot hold tensors", path)
            self._entries += 1
            self._header_bytes += 8  # {"tensor":"..."} and more
            if self.sharing is not None:
                self.sharing.tick()
            return self.encode_tensor(x, path)
        if cls in _CONTAINERS:
            if self.sharing is not None:
                self.sharing.tick()
            return self._shared_or_new(x, cls, path)
        node = self._value(x, cls, path)
        if node is not None:
            return node
        raise self.error(self.refusal.format(type=f"{cls.__module__}.{cls.__qualname__}"), path)

    def _shared_or_new(self, x: Any, cls: type, path: Path) -> Any:
        """A container's node. One met again (reached by several paths) is written again in
        full, as JSON has no references: a few containers sharing each other, nested, made a
        header exponential in their number (30 levels of ``x = [x, x]``: 2**30 nodes, a save
        that never ended), so a repeat is weighed before it is encoded again."""
        key = id(x)
        if key in self._active:
            raise self.error(f"a container that contains itself cannot be {self.verb}", path)
        done = self._done.get(key)
        if done is not None:
            _, size, chars, height, node = done
            if node is None and not self._projected:
                # A repeat holding tensors is encoded again (its tensor nodes name this path):
                # containers sharing each other so were encoded until the header passed the
                # limit (25 s at 30 levels). Its least size, repeats counted, in one pass over
                # the distinct containers, tells it at once.
                self._projected = True
                if least_json_bytes(self._root, self.tensor_weigher()) > self.max_header_bytes:
                    raise self._repeat_too_big(path)
            if self._header_bytes + size > self.max_header_bytes:
                raise self._repeat_too_big(path)
            if node is not None and self._depth + height <= MAX_DEPTH:
                self._header_bytes += size
                self.text_chars += chars
                self._reach = max(self._reach, self._depth + height)
                return node
        if self._depth == 0:
            self._root = x  # the container being encoded: what a projection sizes
        if self._depth >= MAX_DEPTH:
            raise self.error(
                f"containers nested more than {MAX_DEPTH} deep cannot be {self.verb}", path
            )
        size, chars, reach = self._header_bytes, self.text_chars, self._reach
        entries = self._entries
        self._header_bytes += 8  # with the 2 above, the least a container takes: {"list":[]},
        self._active.add(key)
        self._depth += 1
        self._reach = self._depth
        try:
            node = self._container(x, cls, path)
        finally:
            self._depth -= 1
            self._active.discard(key)
        height, self._reach = self._reach - self._depth, max(reach, self._reach)
        self._done[key] = (
            x,
            self._header_bytes - size,
            self.text_chars - chars,
            height,
            node if self._entries == entries else None,
        )
        return node

    def _repeat_too_big(self, path: Path) -> AstageError:
        return self.error(
            f"a container reached by several paths is written again at each of them, "
            f"which takes the header past {self.max_header_bytes} bytes here (containers "
            "that share each other repeat exponentially); share fewer containers, or "
            f"copy them, before they are {self.verb}",
            path,
        )

    def _value(self, x: Any, cls: type, path: Path) -> Any:
        """The node of a value that is not a container, or None if it has no node."""
        if cls is torch.Size:
            return {"torch.Size": list(x)}
        if cls is torch.dtype:
            return {"torch.dtype": str(x).removeprefix("torch.")}
        if cls in _PATH_TYPES.values():
            return {"path": [cls.__name__, str(x)]}
        if isinstance(x, enum.Enum):
            return self._enum(x, cls, path)
        numpy = _numpy()
        if numpy is not None:
            if cls is numpy.ndarray:
                if self._no_tensors is not None:
                    raise self.error(f"{self._no_tensors} cannot hold arrays", path)
                self._entries += 1
                return self.encode_array(x, path)
            if isinstance(x, numpy.generic) and cls.__module__ == "numpy":
                dtype = x.dtype
                if dtype.kind in "biufc" and _NUMPY_DTYPE.fullmatch(dtype.str):
                    return {"numpy.scalar": [dtype.str, x.tobytes().hex()]}
        return None

    def _enum(self, x: enum.Enum, cls: type, path: Path) -> Any:
        if find_class(cls.__module__, cls.__qualname__) is not cls:
            raise self.error(
                f"cannot save the enum {cls.__qualname__}: a loader finds an enum class by its "
                f"module and name, and {cls.__module__}.{cls.__qualname__} cannot be found so",
                path,
            )
        outer, self._no_tensors = self._no_tensors, "an enum value"
        try:
            value = self.encode(x.value, path)
        finally:
            self._no_tensors = outer
        return {"enum": [cls.__module__, cls.__qualname__, value]}

    def _container(self, x: Any, cls: type, path: Path) -> Any:
        if cls is list or cls is tuple:
            return {cls.__name__: [self.encode(value, (*path, i)) for i, value in enumerate(x)]}
        if cls is set or cls is frozenset:
            return {cls.__name__: self._plain_items(x, path, f"a {cls.__name__}")}
        if cls is argparse.Namespace:
            outer, self._no_tensors = self._no_tensors, "an argparse.Namespace"
            try:
                items = [
                    [name, self.encode(value, (*path, Attr(name)))]
                    for name, value in vars(x).items()
                ]
            finally:
                self._no_tensors = outer
            return {"namespace": items}
        pairs = []
        for key, value in x.items():
            if type(key) not in PLAIN_TYPES:
                raise self.error(
                    f"a dict key of type {type(key).__qualname__} cannot be {self.verb} "
                    "(keys must be str, int, float, bool or None)",
                    (*path, key),
                )
            pairs.append([self.encode(key, path), self.encode(value, (*path, key))])
        if cls is not OrderedDict:
            return {"dict": pairs}
        node: dict[str, Any] = {"odict": pairs}
        extra = getattr(x, "_metadata", None)
        if extra is not None:
            outer, self._no_tensors = self._no_tensors, "an OrderedDict's _metadata"
            try:
                node["_metadata"] = self.encode(extra, (*path, Attr("_metadata")))
            finally:
                self._no_tensors = outer
        return node

    def _plain_items(self, x: Any, path: Path, inside: str) -> list[Any]:
        outer, self._no_tensors = self._no_tensors, inside
        try:
            return [self.encode(value, (*path, Attr(f"<{inside} item>"))) for value in x]
        finally:
            self._no_tensors = outer

    def encode_tensor(self, x: torch.Tensor, path: Path) -> Any:
        raise NotImplementedError

    def tensor_weigher(self) -> TensorWeigher:
        """For :func:`least_json_bytes`: the least JSON a tensor's node takes here, from the
        tensor and the least length of its path's text (a format whose node names the path
        weighs more than the 10 bytes this one counts)."""
        return _ten_bytes

    def encode_array(self, x: Any, path: Path) -> Any:
        """The node of a numpy array; refused unless a format stores arrays."""
        raise self.error(self.refusal.format(type="numpy.ndarray"), path)


TensorWeigher = Callable[[torch.Tensor, int], int]
"""The least JSON a tensor's node takes, from the tensor and the least length of the text of
the path it is met at (see :meth:`SkeletonEncoder.tensor_weigher`)."""


def _ten_bytes(x: torch.Tensor, path_chars: int) -> int:
    return 10  # {"tensor":...} and its separator, at least, whatever the format puts in it


def least_json_bytes(root: Any, weigh_tensor: TensorWeigher = _ten_bytes) -> int:
    """A lower bound on the JSON an encoder writes for ``root``, every path to a shared
    container counted in full, found in one pass over the distinct containers (each sized
    once, by id): what :class:`SkeletonEncoder` counts as it goes (2 a value, a str's length,
    an int's least digits, 8 more a container), a tensor what ``weigh_tensor`` says (it is
    told the least length of the path's text, :func:`~astage._paths.format_path`'s, the first
    time it is met there; the same container met again weighs the same), below
    :data:`MAX_DEPTH` levels only."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def least(x: Any, depth: int, path_chars: int) -> int:
        cls = type(x)
        if cls is str:
            return 2 + len(x)
        if cls is int:
            return 2 + _int_digits(x.bit_length())  # as the encoder counts it
        if isinstance(x, torch.Tensor):
            return weigh_tensor(x, path_chars)
        if cls not in _CONTAINERS or depth >= MAX_DEPTH:
            return 2
        key = id(x)
        known = sizes.get(key)
        if known is not None:
            return known
        if key in active:  # a cycle: the encoder refuses it; nothing more to count
            return 0
        active.add(key)
        total = 10
        if cls is argparse.Namespace:
            items: Any = vars(x).items()
        elif cls is dict or cls is OrderedDict:
            items = x.items()
        else:
            items = None
        if items is not None:
            for name, value in items:
                total += least(name, depth + 1, 0)
                total += least(value, depth + 1, path_chars + _least_key_chars(name))
        else:
            for index, value in enumerate(x):
                total += least(value, depth + 1, path_chars + 2 + len(str(index)))
        active.discard(key)
        sizes[key] = total
        return total

    return least(root, 0, 0)


def _least_key_chars(key: Any) -> int:
    """The least characters a key adds to a path's text: ``[repr(key)]``, a str's quotes at
    least (its escapes would add more); a key of another type (a Namespace's name, no
    tensor under it) weighs nothing, which is never too much."""
    cls = type(key)
    if cls is str:
        return 4 + len(key)
    if cls is int:
        return 2 + _int_digits(key.bit_length())
    if cls in (float, bool, type(None)):
        return 2 + len(repr(key))
    return 0


class SkeletonDecoder:
    """Decodes what :class:`SkeletonEncoder` wrote; a format's subclass decodes its tensors.

    A node that is malformed raises :meth:`invalid` (by default :meth:`bad`), never a raw
    ``TypeError`` or ``KeyError``; :attr:`path` is where the decoder is, for messages.
    """

    def decode(self, node: Any) -> Any:
        """The value of ``node``."""
        if "_path" not in vars(self):
            self._path: list[Any] = []
            self._depth = 0
            self._plain_only: str | None = None  # inside what no tensor or array may be
            self._enums = 0  # enum nodes inside each other here (their values are nodes too)
        cls = type(node)
        if cls in (str, int, bool, type(None)) or (cls is float and math.isfinite(node)):
            return node
        if cls is not dict:
            raise self.bad(node)
        if len(node) == 1:
            ((tag, value),) = node.items()
            decode = _DECODERS.get(tag)
            if decode is not None:
                if tag in _NESTING:
                    if self._depth >= MAX_DEPTH:
                        raise self.invalid(f"containers nested more than {MAX_DEPTH} deep")
                    self._depth += 1
                    try:
                        return decode(self, value)
                    finally:
                        self._depth -= 1
                return decode(self, value)
        if len(node) == 2 and "odict" in node and "_metadata" in node:
            restored = self.decode({"odict": node["odict"]})
            self._path.append(Attr("_metadata"))
            # One level deeper, as the encoder counts it (inside its OrderedDict): a chain of
            # _metadata nodes must not recurse past the limit (a raw RecursionError).
            self._depth += 1
            try:
                restored._metadata = self.decode_plain(
                    node["_metadata"], "an OrderedDict's _metadata"
                )
            finally:
                self._depth -= 1
                self._path.pop()
            return restored
        if self._plain_only is not None:
            # The encoder puts no tensor or array there (nor any other node of a format's):
            # a file or peer that does must not hand one, or a decoder's placeholder, out.
            raise self.invalid(
                f"{self._plain_only} holds plain values only, not {shown(sorted(node))}"
            )
        return self.decode_other(node)

    def decode_plain(self, node: Any, inside: str) -> Any:
        """The value of ``node`` where the encoder allows plain values only (``inside`` says
        where: "an argparse.Namespace"); a tensor or array node there is invalid."""
        outer = self._plain_only
        self._plain_only = outer or inside
        try:
            return self.decode(node)
        finally:
            self._plain_only = outer

    @property
    def path(self) -> Path:
        """The path of the node being decoded."""
        return tuple(vars(self).get("_path", ()))

    def decode_other(self, node: dict[str, Any]) -> Any:
        """A node that is none of the common ones (a tensor, for instance)."""
        raise self.bad(node)

    def bad(self, node: Any) -> AstageError:
        """The error for a node that cannot be decoded."""
        raise NotImplementedError

    def invalid(self, problem: str) -> AstageError:
        """The error for a node whose content is wrong; ``problem`` says how."""
        return AstageError(f"bad skeleton node at {format_path(self.path)}: {problem}")

    # -- the common nodes ---------------------------------------------------------------------

    def _float(self, value: Any) -> float:
        if not isinstance(value, str) or value not in _FLOAT_TAGS:
            raise self.invalid(f"'float' must be 'nan', 'inf' or '-inf', not {shown(value)}")
        return float(value)  # a new object: two NaN keys stay two keys

    def _items(self, value: Any, tag: str) -> list[Any]:
        if type(value) is not list:
            raise self.invalid(f"{tag!r} must hold a list, not {shown(value)}")
        items = []
        for i, item in enumerate(value):
            self._path.append(i)
            try:
                items.append(self.decode(item))
            finally:
                self._path.pop()
        return items

    def _list(self, value: Any) -> list[Any]:
        return self._items(value, "list")

    def _tuple(self, value: Any) -> tuple[Any, ...]:
        return tuple(self._items(value, "tuple"))

    def _pairs(self, value: Any, tag: str) -> list[tuple[Any, Any]]:
        if type(value) is not list:
            raise self.invalid(f"{tag!r} must hold a list of [key, value] pairs")
        pairs = []
        seen: set[Any] = set()
        for pair in value:
            if type(pair) is not list or len(pair) != 2:
                raise self.invalid(f"{tag!r} must hold [key, value] pairs, not {shown(pair)}")
            key = self.decode(pair[0])
            if type(key) not in PLAIN_TYPES:
                raise self.invalid(f"a dict key must be a plain value, not {shown(pair[0])}")
            if key in seen:
                raise self.invalid(f"the dict key {key!r} appears twice")
            seen.add(key)
            self._path.append(key)
            try:
                pairs.append((key, self.decode(pair[1])))
            finally:
                self._path.pop()
        return pairs

    def _dict(self, value: Any) -> dict[Any, Any]:
        return dict(self._pairs(value, "dict"))

    def _odict(self, value: Any) -> OrderedDict[Any, Any]:
        return OrderedDict(self._pairs(value, "odict"))

    def _set(self, value: Any, tag: str) -> Any:
        outer = self._plain_only
        self._plain_only = outer or f"a {tag}"
        try:
            items = self._items(value, tag)
        finally:
            self._plain_only = outer
        for item in items:
            if not _hashable(item):
                raise self.invalid(f"a {tag} item must be hashable, not {type(item).__name__}")
        result = _SET_TYPES[tag](items)
        if len(result) != len(items) and not any(_has_nan(item) for item in items):
            raise self.invalid(f"a {tag} holds an item twice")
        return result

    def _namespace(self, value: Any) -> argparse.Namespace:
        if type(value) is not list:
            raise self.invalid("'namespace' must hold a list of [name, value] pairs")
        result = argparse.Namespace()
        names = set()
        for pair in value:
            if type(pair) is not list or len(pair) != 2 or type(pair[0]) is not str:
                raise self.invalid(f"'namespace' must hold [name, value] pairs, not {shown(pair)}")
            name = pair[0]
            if name in names:
                raise self.invalid(f"the namespace attribute {name!r} appears twice")
            names.add(name)
            self._path.append(Attr(name))
            try:
                vars(result)[name] = self.decode_plain(pair[1], "an argparse.Namespace")
            finally:
                self._path.pop()
        return result

    def _size(self, value: Any) -> torch.Size:
        if type(value) is not list or not all(type(n) is int and n >= 0 for n in value):
            raise self.invalid(f"'torch.Size' must hold sizes (ints >= 0), not {shown(value)}")
        try:
            return torch.Size(value)
        except (RuntimeError, TypeError, OverflowError) as error:  # a size beyond int64
            raise self.invalid(f"'torch.Size' {shown(value)}: {error}") from None

    def _dtype(self, value: Any) -> torch.dtype:
        dtype = TORCH_DTYPES.get(value) if isinstance(value, str) else None
        if dtype is None:
            raise self.invalid(f"unknown 'torch.dtype' {shown(value)}")
        return dtype

    def _pathlib(self, value: Any) -> pathlib.PurePath:
        if (
            type(value) is not list
            or len(value) != 2
            or not isinstance(value[0], str)
            or value[0] not in _PATH_TYPES
            or type(value[1]) is not str
        ):
            raise self.invalid(f"'path' must hold [a pathlib class name, str], not {shown(value)}")
        kind, text = value
        try:
            return _PATH_TYPES[kind](text)
        except (NotImplementedError, OSError, ValueError):
            # A WindowsPath read on POSIX (or the reverse) cannot exist here: its pure flavour.
            return _PURE_FLAVOUR[kind](text)

    def _enum(self, value: Any) -> enum.Enum | None:
        if (
            type(value) is not list
            or len(value) != 3
            or type(value[0]) is not str
            or type(value[1]) is not str
        ):
            raise self.invalid(f"'enum' must hold [module, qualname, value], not {shown(value)}")
        module_name, qualname, raw = value
        where = f"{module_name}.{qualname}"
        # Never import: a file must not choose which code runs. Look the class up in a module
        # the program imported itself, through plain __dict__ lookups (no __getattr__).
        if sys.modules.get(module_name) is None:
            return self.unimported_enum(where, module_name, raw)
        found = find_class(module_name, qualname)
        if not (isinstance(found, type) and issubclass(found, enum.Enum)):
            raise self.invalid(f"{where} is not an enum class")
        member_value = self.decode_enum_value(raw)
        for member in found.__members__.values():
            if _same_value(member.value, member_value):
                return member
        if issubclass(found, enum.Flag) and type(member_value) is int:
            try:
                return found(member_value)  # a combination of flags
            except (ValueError, TypeError):
                pass
        raise self.invalid(f"{where} has no member of value {shown(member_value, 200)}")

    def unimported_enum(self, where: str, module_name: str, raw: Any) -> enum.Enum | None:
        """An enum whose class's module the program has not imported: refused. A checker
        that never imports the user's modules (``astage inspect``) checks its value only."""
        raise self.invalid(
            f"the enum class {where} is not available: its module {module_name!r} is not "
            "imported (astage never imports a module a file names; import it first)"
        )

    def decode_enum_value(self, raw: Any) -> Any:
        """The plain value of an enum node (which may be an enum node again)."""
        # No container counts these levels, so they have a limit of their own (else a raw
        # RecursionError).
        if self._enums >= MAX_DEPTH:
            raise self.invalid(f"enum values nested more than {MAX_DEPTH} deep")
        self._enums += 1
        try:
            return self.decode_plain(raw, "an enum value")
        finally:
            self._enums -= 1

    def _numpy_scalar(self, value: Any) -> Any:
        if (
            type(value) is not list
            or len(value) != 2
            or type(value[0]) is not str
            or not _NUMPY_DTYPE.fullmatch(value[0])
            or type(value[1]) is not str
        ):
            raise self.invalid(f"'numpy.scalar' must hold [dtype, hex], not {shown(value)}")
        numpy = numpy_or_none()
        if numpy is None:
            raise self.invalid("a numpy scalar needs numpy, which is not installed")
        try:
            dtype = numpy.dtype(value[0])
            data = bytes.fromhex(value[1])
        except (TypeError, ValueError):
            raise self.invalid(f"bad 'numpy.scalar' {shown(value)}") from None
        if dtype.kind not in "biufc" or len(data) != dtype.itemsize:
            raise self.invalid(f"bad 'numpy.scalar' {shown(value)}")
        return numpy.frombuffer(data, dtype=dtype)[0]


def find_class(module_name: str, qualname: str) -> Any:
    """What ``module_name.qualname`` names in an already imported module, or None.

    Plain ``__dict__`` lookups only: no import, no module ``__getattr__``, no descriptor.
    """
    found: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        namespace = getattr(found, "__dict__", None) if found is not None else None
        found = namespace.get(part) if isinstance(namespace, Mapping) else None
    return found


def numpy_or_none() -> Any:
    """numpy, imported now if needed (a known library, never a name a file chose), or None."""
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy is installed with torch in practice
        return None
    return numpy


def _bounded_repr() -> reprlib.Repr:
    bounded = reprlib.Repr()
    bounded.maxlevel = 8
    bounded.maxstring = bounded.maxother = bounded.maxlong = 200
    bounded.maxlist = bounded.maxtuple = bounded.maxdict = 50
    bounded.maxset = bounded.maxfrozenset = bounded.maxdeque = bounded.maxarray = 50
    return bounded


_BOUNDED_REPR = _bounded_repr()


def shown(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for a value that came from a file or a
    peer: built by :mod:`reprlib`, whose nesting and length limits keep a deeply nested JSON
    value from raising a raw RecursionError, and a huge one from being copied whole first.
    Small values read as ``repr`` writes them (a dict's or set's items sorted)."""
    text = _BOUNDED_REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _same_value(a: Any, b: Any) -> bool:
    """Whether a decoded plain value is an enum member's value: of the same type and equal,
    a NaN (also inside a tuple) matching a NaN, which ``==`` never does."""
    if type(a) is not type(b):
        return False
    if type(a) is float:
        return a == b or (math.isnan(a) and math.isnan(b))
    if type(a) is tuple or type(a) is list:
        return len(a) == len(b) and all(map(_same_value, a, b))
    return bool(a == b)


def _has_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


_DECODERS: dict[str, Any] = {
    "float": SkeletonDecoder._float,
    "list": SkeletonDecoder._list,
    "tuple": SkeletonDecoder._tuple,
    "dict": SkeletonDecoder._dict,
    "odict": SkeletonDecoder._odict,
    "set": lambda self, value: self._set(value, "set"),
    "frozenset": lambda self, value: self._set(value, "frozenset"),
    "namespace": SkeletonDecoder._namespace,
    "torch.Size": SkeletonDecoder._size,
    "torch.dtype": SkeletonDecoder._dtype,
    "path": SkeletonDecoder._pathlib,
    "enum": SkeletonDecoder._enum,
    "numpy.scalar": SkeletonDecoder._numpy_scalar,
}
"""The decoder of each one-key node, by its key."""
_NESTING = frozenset({"list", "tuple", "dict", "odict", "set", "frozenset", "namespace"})


# -- DTensors: placements and device meshes as JSON (no process group, no collective) ------------

MAX_MESH_RANKS = 1 << 24
"""The most ranks a device mesh read from a skeleton may have."""
_RANK_LIMIT = 1 << 63  # ranks and split factors are int64 in torch


def is_dtensor(x: Any) -> bool:
    """Whether ``x`` is a DTensor (without importing torch.distributed when nothing did)."""
    module = sys.modules.get("torch.distributed.tensor")
    dtensor = getattr(module, "DTensor", None) if module is not None else None
    return dtensor is not None and isinstance(x, dtensor)


def mesh_node(mesh: Any) -> list[Any]:
    """A device mesh as JSON: ``[device type, rank grid, dim names or None]``."""
    names = getattr(mesh, "mesh_dim_names", None)
    return [mesh.device_type, mesh.mesh.tolist(), list(names) if names else None]


def mesh_problem(node: Any) -> str | None:
    """What is wrong with a mesh node read from a file or a peer, or None."""
    if type(node) is not list or len(node) != 3:
        return "must be [device type, rank grid, dim names]"
    device_type, grid, names = node
    if type(device_type) is not str or not device_type.isidentifier() or len(device_type) > 32:
        return f"device type {shown(device_type)} is not a device type"
    shape: list[int] = []
    level = grid
    while type(level) is list:
        if len(shape) >= MAX_DEPTH or not level:
            return "the rank grid is empty or too deep"
        shape.append(len(level))
        level = level[0]
    if not shape or math.prod(shape) > MAX_MESH_RANKS:
        return f"the rank grid must be a non-empty nested list of at most {MAX_MESH_RANKS} ranks"
    flat = _grid_ranks(grid, shape)
    if flat is None or len(set(flat)) != len(flat):
        return (
            "the rank grid must hold distinct ranks (ints >= 0 that fit in int64) in a "
            "rectangular nested list"
        )
    if names is not None and (
        type(names) is not list
        or len(names) != len(shape)
        or not all(type(name) is str for name in names)
    ):
        return "the dim names must be None or one string per grid dimension"
    return None


def local_shape_problem(
    local_shape: list[int], shape: list[int], placements: list[Any]
) -> str | None:
    """What is wrong with a DTensor's local shard shape against its global ``shape`` and
    ``placements``, or None: as many dims, none larger than the global one, and the dims no
    placement shards equal to it."""
    if len(local_shape) != len(shape):
        return f"the local shard has {len(local_shape)} dims, the DTensor {len(shape)}"
    sharded = {getattr(p, "dim", None) for p in placements if hasattr(p, "dim")}
    for dim, (mine, whole) in enumerate(zip(local_shape, shape, strict=True)):
        if mine > whole or (dim not in sharded and mine != whole):
            return (
                f"the local shard's shape {local_shape} does not fit the DTensor's {shape} "
                "and placements"
            )
    return None


def _grid_ranks(grid: Any, shape: list[int]) -> list[int] | None:
    """The ranks of a rectangular nested list of ``shape``, flattened; None if it is not one."""
    if not shape:
        # Below 2**63: the grid becomes an int64 tensor (torch.tensor would raise a raw
        # ValueError, "Overflow when unpacking long long", for a larger rank).
        return [grid] if type(grid) is int and 0 <= grid < _RANK_LIMIT else None
    if type(grid) is not list or len(grid) != shape[0]:
        return None
    flat: list[int] = []
    for row in grid:
        ranks = _grid_ranks(row, shape[1:])
        if ranks is None:
            return None
        flat.extend(ranks)
    return flat


def mesh_shape(node: list[Any]) -> list[int]:
    """The shape of a checked mesh node's rank grid."""
    shape = []
    level = node[1]
    while type(level) is list:
        shape.append(len(level))
        level = level[0]
    return shape


def placement_node(placement: Any) -> list[Any] | None:
    """A DTensor placement as JSON, or None for a kind that cannot be rebuilt from JSON."""
    from torch.distributed.tensor.placement_types import Partial, Replicate, Shard, _StridedShard

    kind = type(placement).__name__
    # Exact kinds only (a subclass may carry more than JSON keeps). _StridedShard is no
    # Shard in recent torch (a C++ class of its own): checked on its own.
    if isinstance(placement, _StridedShard) and kind == "_StridedShard":
        return ["strided_shard", placement.dim, placement.split_factor]
    if isinstance(placement, Shard) and kind == "Shard":
        return ["shard", placement.dim]
    if isinstance(placement, Replicate) and kind == "Replicate":
        return ["replicate"]
    elif isinstance(placement, Partial) and kind == "Partial":
        return ["partial", placement.reduce_op]
    return None


PARTIAL_OPS = frozenset({"sum", "avg", "product", "min", "max", "band", "bor", "bxor"})
"""The reduce ops a ``Partial`` placement read from JSON may name."""


def placement_from_node(node: Any, ndim: int) -> Any:
    """A DTensor placement from JSON for a tensor of ``ndim`` dims; None if malformed."""
    from torch.distributed.tensor.placement_types import Partial, Replicate, Shard, _StridedShard

    if type(node) is not list or not node or type(node[0]) is not str:
        return None
    kind, args = node[0], node[1:]

    def is_dim(value: Any) -> bool:
        return type(value) is int and 0 <= value < ndim

    if kind == "shard" and len(args) == 1 and is_dim(args[0]):
        return Shard(args[0])
    if kind == "strided_shard" and len(args) == 2 and is_dim(args[0]):
        split = args[1]
        # Below 2**63: torch keeps it as an int64 (a larger one is a raw TypeError there).
        if type(split) is int and 1 <= split < _RANK_LIMIT:
            return _StridedShard(args[0], split_factor=split)
    if kind == "replicate" and not args:
        return Replicate()
    if kind == "partial" and len(args) == 1 and type(args[0]) is str and args[0] in PARTIAL_OPS:
        return Partial(args[0])
    return None
