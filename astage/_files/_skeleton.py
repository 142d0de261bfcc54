"""A state dict's skeleton as JSON: its containers and plain values, with tagged nodes.

The checkpoint file (its ``__metadata__``, :mod:`astage._safetensors`) and the replication wire
header (:mod:`astage._replication`) both carry a skeleton. A node is

- ``str``, ``int``, ``bool``, ``None`` or a finite ``float``: the value itself;
- ``{"float": "nan" | "inf" | "-inf"}``;
- ``{"list": [...]}``, ``{"tuple": [...]}``, ``{"dict": [[key, value], ...]}``,
  ``{"odict": [[key, value], ...]}``, the last with an optional ``"_metadata"`` (what
  ``Module.state_dict()`` hangs on its OrderedDict: plain values only);
- whatever a format adds for tensors (``encode_tensor`` / ``decode_other``).

Keys are plain values too. A container that contains itself cannot be encoded.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch

from .._errors import AstageError
from .._paths import Attr, Path

PLAIN_TYPES = (str, int, float, bool, type(None))
"""Values a skeleton holds as themselves (a float that is not finite is tagged)."""

TORCH_DTYPES: dict[str, torch.dtype] = {
    str(value).removeprefix("torch."): value
    for value in vars(torch).values()
    if isinstance(value, torch.dtype)
}
"""Every torch dtype by the name a skeleton records (``"float32"``, ``"bfloat16"``, ...)."""


class SkeletonEncoder:
    """Encodes everything but tensors; a format's subclass encodes those.

    ``error`` is the AstageError subclass raised for what cannot be encoded, ``verb`` how its
    messages say it (``"saved"``, ``"sent"``), ``refusal`` the message for an object of another
    type (``{type}`` is replaced by its qualified name).
    """

    error: type[AstageError] = AstageError
    verb = "encoded"
    refusal = "cannot encode a {type} object"

    def __init__(self) -> None:
        self._active: set[int] = set()  # containers on the current path: a cycle is an error
        self._plain_only = False  # inside an OrderedDict's _metadata: no tensors there

    def encode(self, x: Any, path: Path) -> Any:
        """The JSON node for ``x``: plain values as themselves, the rest as a tagged object."""
        cls = type(x)
        if cls is float:
            return x if math.isfinite(x) else {"float": repr(x)}
        if cls in (str, int, bool, type(None)):
            return x
        if isinstance(x, torch.Tensor):
            if self._plain_only:
                raise self.error("an OrderedDict's _metadata cannot hold tensors", path)
            return self.encode_tensor(x, path)
        if cls in (dict, OrderedDict, list, tuple):
            if id(x) in self._active:
                raise self.error(f"a container that contains itself cannot be {self.verb}", path)
            self._active.add(id(x))
            try:
                return self._container(x, cls, path)
            finally:
                self._active.discard(id(x))
        raise self.error(self.refusal.format(type=f"{cls.__module__}.{cls.__qualname__}"), path)

    def _container(self, x: Any, cls: type, path: Path) -> Any:
        if cls is list or cls is tuple:
            return {cls.__name__: [self.encode(value, (*path, i)) for i, value in enumerate(x)]}
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
            outer, self._plain_only = self._plain_only, True
            try:
                node["_metadata"] = self.encode(extra, (*path, Attr("_metadata")))
            finally:
                self._plain_only = outer
        return node

    def encode_tensor(self, x: torch.Tensor, path: Path) -> Any:
        raise NotImplementedError


class SkeletonDecoder:
    """Decodes what :class:`SkeletonEncoder` wrote; a format's subclass decodes its tensors."""

    def decode(self, node: Any) -> Any:
        if not isinstance(node, dict):
            if isinstance(node, list):
                raise self.bad(node)
            return node
        if len(node) == 1:
            ((tag, value),) = node.items()
            if tag == "float":
                return float(value)
            if tag == "list":
                return [self.decode(item) for item in value]
            if tag == "tuple":
                return tuple(self.decode(item) for item in value)
            if tag == "dict":
                return {self.decode(k): self.decode(v) for k, v in value}
            if tag == "odict":
                return OrderedDict((self.decode(k), self.decode(v)) for k, v in value)
        if len(node) == 2 and "odict" in node and "_metadata" in node:
            restored = self.decode({"odict": node["odict"]})
            restored._metadata = self.decode(node["_metadata"])
            return restored
        return self.decode_other(node)

    def decode_other(self, node: dict[str, Any]) -> Any:
        """A node that is none of the common ones (a tensor, for instance)."""
        raise self.bad(node)

    def bad(self, node: Any) -> AstageError:
        """The error for a node that cannot be decoded."""
        raise NotImplementedError
