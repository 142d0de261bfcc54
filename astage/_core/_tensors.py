"""The tensor hot path: a tensor into its cached host buffer, and the copy that fills it.

:class:`TensorStager` turns each tensor the walk meets into a CPU tensor on the host buffer of
its source storage, with the source's dtype, shape, stride and storage offset, and adds one copy
per source storage to the plan: all the storage's bytes, whatever dtype the view that first
reaches it has, which is what keeps aliasing (views, tied weights) intact.

Two paths, by cost. A cached call over a plain tensor that spans its storage (the common case,
tens of thousands per optimizer state) takes :meth:`TensorStager._restage`: a dict lookup, a
weak-reference check, a few metadata comparisons and one detach (``_torch.detached``).
Everything else (views, conjugate and negative views, ``Parameter`` and other subclasses,
Python attributes, a first call) takes :meth:`TensorStager._stage`; the rare kinds are in
:mod:`._kinds`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from .._errors import UnstageableError
from .._paths import Attr, Path
from .._torch import dense_strides, detached, make_subclass, neg_view, storage_shortfall
from . import _kinds
from ._cache import BufferCache, HostBuffer
from ._plan import Leaf, Plan
from ._tables import LEAD_AFTER, give_lead

TensorFacts = tuple[torch.Tensor, HostBuffer]
"""What the first call's lean path knows of a plain tensor that spans its new buffer as itself
(offset 0, no conjugate or negative bit, the buffer's view its twin, so the buffer also holds
its storage's ``id()``, its shape and dtype): the tensor and the buffer. Collected for the
replay recorder (see :mod:`._replay`), which would otherwise read them all again, one tensor
at a time.
"""


class FactsSink(Protocol):
    """Where the lean path leaves the :data:`TensorFacts` of the tensor it just staged."""

    last: TensorFacts | None
    """The last tensor's, overwritten by the next: the replay recorder, told of each tensor
    right after it is staged, takes them when ``last[0]`` is that tensor. One attribute rather
    than a dict by ``id()``: with 50,000 tensors each such dict is a 2.5 MiB table, and the
    step where it (and the walk's other per-tensor dicts) grew held the loop 15-20 ms in page
    faults."""


Visit = Callable[[Any, Path], Any]
"""Deep-copies an object hanging off a tensor (an attribute) through the walk's memo."""

Adopted = tuple[dict[int, int], dict[int, HostBuffer]]
"""Storages already copied into a plan when a walk starts (what a replay that stopped midway
leaves): ``id()`` -> the index of its copy (-1: no bytes), and the buffers of those with none."""

_MISSING: Any = object()

_Tensor = torch.Tensor
_Parameter = torch.nn.Parameter
_strided = torch.strided
_SUB_BYTE_NAMES = [f"{sign}int{bits}" for sign in ("u", "") for bits in range(1, 8)]
_BYTE_COPIED: frozenset[torch.dtype] = frozenset(
    {torch.bool}
    | {
        dtype
        for name in _SUB_BYTE_NAMES
        if isinstance(dtype := getattr(torch, name, None), torch.dtype)
    }
)
"""Dtypes whose storages are always copied as bytes, never as tensors of their own dtype.
Copying a bool tensor normalizes every byte to 0 or 1, which corrupts uint8 data that a bool
view reaches first; and torch has no copy kernel at all for the sub-byte shell dtypes
(``uint1``-``uint7``, ``int1``-``int7``, one element per byte): ``copy_`` raises
NotImplementedError, where the bytes copy keeps every bit."""
_QUANTIZED_DTYPES: frozenset[torch.dtype] = frozenset(
    dtype
    for name in ("qint8", "quint8", "qint32", "quint4x2", "quint2x4")
    if isinstance(dtype := getattr(torch, name, None), torch.dtype)
)
"""Quantized dtypes, refused as quantized tensors are. torch makes a plain (not
``is_quantized``) tensor of one by viewing bytes as it; its buffer, allocated by dtype, came out
quantized with no quantizer: torch's copy into it raised, and a negative view's staged twin
ended the process when printed."""
_NOT_LEAN: frozenset[torch.dtype] = _BYTE_COPIED | _QUANTIZED_DTYPES
"""Dtypes the first call's lean path (:meth:`TensorStager._fresh`) leaves to :meth:`_stage`:
one set lookup for both kinds."""


class TensorStager:
    """Stages the tensors of one call into ``plan``, sharing the walk's memo.

    ``memo`` maps ``id()`` of a source object to its staged twin, and ``keep_alive`` holds the
    sources so that their ids stay valid while the walk runs: both belong to the deep-copy walk,
    so that a tensor met twice, or an attribute that refers back to its tensor, is staged once.
    """

    def __init__(
        self,
        cache: BufferCache,
        plan: Plan,
        *,
        memo: dict[int, Any],
        keep_alive: list[Any],
        visit: Visit,
        adopted: Adopted | None = None,
        facts: FactsSink | None = None,
    ) -> None:
        self._cache = cache
        self._plan = plan
        self._copies = plan.copies
        self._buffers = cache.entries
        self._leaves = plan.leaves
        self._memo = memo
        self._keep_alive = keep_alive
        self._visit = visit
        # Source storages met in this call (by id) -> the index of their copy in the plan,
        # whose buffer is the copy's (-1: a storage with no bytes, whose buffer is kept apart).
        # One table per storage, not a second one for the buffers: each of these tables grows
        # in the same walk step (see FactsSink), and the buffer is the copy's anyway.
        # ``adopted``: storages a replay already copied in this call (see _replay.py).
        self.copy_index: dict[int, int] = dict(adopted[0]) if adopted else {}
        self.empty_buffers: dict[int, HostBuffer] = dict(adopted[1]) if adopted else {}
        self._tensor_deps: dict[int, int] = {}
        self._track_leaves = plan.track_leaves
        self.child: Callable[[torch.Tensor, Path, Any], torch.Tensor] = (
            self._tracked_child if plan.track_leaves else self._untracked_child
        )
        """Stage a tensor met directly in a container (``type(x) is torch.Tensor``) under key."""
        self._depth = 0  # > 0 while staging the insides of a tensor
        self._last_copy = -1
        self._facts = facts

    def tables(self) -> tuple[dict[int, Any], ...]:
        """The per-storage and per-tensor dicts, one entry per tensor met: for the caller to
        empty in steps (:func:`~._tables.empty_in_steps`) once the walk no longer needs them."""
        return (self.copy_index, self.empty_buffers, self._tensor_deps)

    def close(self) -> None:
        """Drop the references back to the walk and to this object's own methods (cycles)."""
        del self.child
        del self._visit

    # -- entry points ---------------------------------------------------------------------

    def _tracked_child(self, x: torch.Tensor, path: Path, key: Any) -> torch.Tensor:
        return self.leaf(x, (*path, key))

    def _untracked_child(self, x: torch.Tensor, path: Path, key: Any) -> torch.Tensor:
        """The hot path of stage(): no leaf record, and the path is built only if needed."""
        if not self._depth:
            self._plan.tensors += 1
        y: torch.Tensor = self._memo.get(id(x), _MISSING)
        if y is not _MISSING:
            return y
        restaged = self._restage(x)
        if restaged is not None:
            return restaged
        return self._stage(x, (*path, key))

    def leaf(self, x: torch.Tensor, path: Path) -> torch.Tensor:
        """A tensor at ``path``: staged once per call, and recorded for ``stage_iter``."""
        key = id(x)
        y: torch.Tensor = self._memo.get(key, _MISSING)
        if not self._track_leaves:
            if not self._depth:
                self._plan.tensors += 1
            if y is not _MISSING:
                return y
            self._depth += 1
            try:
                return self._any(x, path)
            finally:
                self._depth -= 1
        if y is _MISSING:
            outer = self._last_copy
            self._last_copy = -1
            self._depth += 1
            try:
                y = self._any(x, path)
            finally:
                self._depth -= 1
            dep = self._last_copy
            self._tensor_deps[key] = dep
            self._last_copy = max(outer, dep)
        else:
            # Not yet recorded when a tensor's own attribute refers back to it (t.me = t).
            dep = self._tensor_deps.get(key, self._last_copy)
            self._last_copy = max(self._last_copy, dep)
        if self._depth == 0:
            self._plan.tensors += 1
            self._leaves.append(Leaf(path, y, dep))
        return y

    def _any(self, x: torch.Tensor, path: Path) -> torch.Tensor:
        if type(x) is _Tensor:
            y = self._restage(x)
            if y is not None:
                return y
        return self._stage(x, path)

    # -- the hot path ---------------------------------------------------------------------

    def _restage(self, x: torch.Tensor) -> torch.Tensor | None:
        """A plain tensor whose buffer already has its staged view: reuse that view.

        A contiguous tensor that spans its storage like the one staged into this buffer last
        time (same dtype, shape and byte count, offset 0) has the same strides too where its
        shape has no size-1 dimension (``is_contiguous()`` pins every stride down); where it
        has one, its strides are compared with the view's, which the buffer keeps
        (``view_strides``), as it keeps the view's dtype and shape, so this never touches the
        view's own metadata. Anything else returns
        None and takes :meth:`_stage`.
        """
        try:
            storage = x.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return None
        buffer = self._buffers.get(id(storage))  # BufferCache.get, inlined: this is per tensor
        if buffer is None or buffer() is not storage:
            return self._fresh(x, storage)
        view = buffer.view
        if view is None:
            return None
        try:
            unlike = (
                id(storage) in self.copy_index
                or buffer.view_dtype is not x.dtype
                or buffer.view_shape != x.shape
                or buffer.nbytes != storage.nbytes()
                or x.storage_offset() != 0
                or not x.is_contiguous()
                or (buffer.view_strides is not None and x.stride() != buffer.view_strides)
                or x.is_conj()
                or x.is_neg()
                or x.__dict__
            )
        except (RuntimeError, NotImplementedError):
            # A nested tensor over a staged storage has no sizes: _stage refuses it by name
            # (a raw RuntimeError escaped here).
            return None
        if unlike:
            return None
        index = self._copies.add(x, view, buffer)  # keeps x alive: its id stays valid in the memo
        self.copy_index[id(storage)] = index
        if index == LEAD_AFTER:  # see _fresh
            give_lead(self.copy_index, 1)
        self._last_copy = index
        # The buffer's own view stays private: consumers get a new tensor object each call,
        # so what they do to its metadata or attributes cannot reach the next call.
        y = detached(view)
        self._memo[id(x)] = y
        return y

    def _fresh(self, x: torch.Tensor, storage: torch.UntypedStorage) -> torch.Tensor | None:
        """A plain tensor on a storage that has no buffer yet, spanning it: the first call's
        lean path.

        The same checks as :meth:`_stage` makes for a buffer that gets a reusable view, in
        one expression, and the buffer allocated as the tensor's twin: a first call over
        tens of thousands of optimizer-state tensors spends its time here. Anything else
        (views, bool data, conjugate or negative bits, attributes, a size-0 or size-1
        dimension, the rare kinds) returns None and takes :meth:`_stage`.
        """
        key = id(storage)
        if (
            key in self.copy_index
            or x.layout is not _strided
            or x.is_nested  # before anything that reads sizes, which a nested tensor refuses
            or x.is_quantized
            or x.is_meta
            or x.dtype in _NOT_LEAN
            or x.storage_offset() != 0
            or not _laid_out_as_empty(x)
            or x.nbytes != storage.nbytes()
            or x.is_conj()
            or x.is_neg()
            or x.__dict__
        ):
            return None
        buffer = self._cache.allocate(storage, like=x)
        facts = self._facts
        if facts is not None:  # read here, where x is at hand, rather than again by the recorder
            facts.last = (x, buffer)
        plan = self._plan
        plan.new_buffers += 1
        plan.new_nbytes += buffer.nbytes
        view = buffer.view
        assert view is not None  # allocated as x's twin
        # No size-0 dimension: the buffer has bytes, so there is always a copy.
        index = self._copies.add(x, view, buffer)  # keeps x (its id in the memo, its storage) alive
        self.copy_index[key] = index
        if index == LEAD_AFTER:  # this table then grows apart from the cache's (give_lead)
            give_lead(self.copy_index, 1)
        self._last_copy = index
        y = detached(view)  # the buffer's own view stays private (see _restage)
        self._memo[id(x)] = y
        return y

    # -- the general path -----------------------------------------------------------------

    def _stage(self, x: torch.Tensor, path: Path) -> torch.Tensor:
        cls = type(x)
        if cls is not _Tensor and cls is not _Parameter:
            special = _kinds.stage_subclass(x, path, self.leaf)
            if special is not None:
                return self._remember(x, special)
        if x.layout is not torch.strided:
            sparse = self._remember(x, _kinds.stage_sparse(x, path, self.leaf))
            self._copy_attributes(x, sparse, path)  # as a strided tensor's (t.tag = "x")
            return sparse
        if x.is_quantized or x.is_nested or x.device.type == "meta" or x.dtype in _QUANTIZED_DTYPES:
            raise _kinds.refusal(x, path)
        try:
            storage = x.untyped_storage()
        except (RuntimeError, NotImplementedError) as error:
            raise UnstageableError(
                f"a {cls.__qualname__} has no storage that can be copied: {error}", path
            ) from error
        shortfall = storage_shortfall(x)
        if shortfall is not None:
            # A storage freed under its tensor (``untyped_storage().resize_(0)``, as FSDP
            # frees unsharded parameters): there are no bytes to stage. Unchecked, the buffer
            # was grown to the tensor's size and staged uninitialised memory.
            what = f"a {cls.__qualname__} of shape {list(x.shape)}"
            raise UnstageableError(f"{what} {shortfall}", path)
        # Whether x can be copied as itself into a buffer allocated as its twin: x must cover
        # its storage in torch.empty's layout. Bool and sub-byte data never are: their storages
        # are copied as bytes (_BYTE_COPIED).
        # With a size-1 dimension the buffer keeps its view's strides (view_strides) for the
        # next calls to compare (see _laid_out_as_empty); a size-0 one has no bytes: no view.
        spans_storage = (
            (cls is _Tensor or cls is _Parameter)
            and x.dtype not in _BYTE_COPIED
            and x.storage_offset() == 0
            and x.nbytes == storage.nbytes()
            and not x.is_conj()
            and not x.is_neg()
            and _laid_out_as_empty(x)
        )
        index = self.copy_index.get(id(storage), -2)
        if index != -2:  # a storage already met in this call: an alias
            buffer = self._copies.buffers[index] if index >= 0 else self.empty_buffers[id(storage)]
            plain = view_on(buffer, x)
        else:
            found = self._cache.lookup(storage, path)
            if found is not None:
                buffer = found
            else:
                buffer = self._cache.allocate(storage, like=x if spans_storage else None)
                self._plan.new_buffers += 1
                self._plan.new_nbytes += buffer.nbytes
            view = buffer.view
            if (
                spans_storage
                and view is not None
                and view.dtype is x.dtype
                and view.shape == x.shape
            ):
                plain = detached(view)  # the buffer's own view stays private (see _restage)
                src, dst = x, view
            else:
                plain = view_on(buffer, x)
                src, dst = bytes_view(storage, x.device), buffer.as_bytes()
            if buffer.nbytes:
                index = self._copies.add(src, dst, buffer)
            else:
                index = -1
                self.empty_buffers[id(storage)] = buffer
            self.copy_index[id(storage)] = index
            if index == LEAD_AFTER:  # see _fresh
                give_lead(self.copy_index, 1)
            self._keep_alive.append(storage)
        self._last_copy = max(self._last_copy, index)
        y = plain
        if x.is_conj():
            y = y.conj()
        if x.is_neg():
            y = neg_view(y)
        if cls is _Parameter:
            y = _Parameter(y, requires_grad=x.requires_grad)
        elif cls is not _Tensor:
            y = make_subclass(cls, y, x.requires_grad)
        self._remember(x, y)
        self._copy_attributes(x, y, path)
        return y

    def _remember(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self._memo[id(x)] = y
        self._keep_alive.append(x)
        return y

    def _copy_attributes(self, x: torch.Tensor, y: torch.Tensor, path: Path) -> None:
        """Python attributes set on a tensor (``__dict__`` and ``__slots__``), staged as well."""
        attributes = x.__dict__
        if attributes:
            for name, value in attributes.items():
                setattr(y, name, self._visit(value, (*path, Attr(name))))
        for klass in type(x).__mro__:
            for name in klass.__dict__.get("__slots__", ()):
                if name in ("__dict__", "__weakref__") or not hasattr(x, name):
                    continue
                setattr(y, name, self._visit(getattr(x, name), (*path, Attr(name))))


def bytes_view(storage: torch.UntypedStorage, device: torch.device) -> torch.Tensor:
    return torch.empty((0,), dtype=torch.uint8, device=device).set_(storage)


def view_on(buffer: HostBuffer, x: torch.Tensor) -> torch.Tensor:
    """A CPU tensor with ``x``'s dtype, shape, stride and offset on ``buffer``."""
    return torch.empty((0,), dtype=x.dtype, device="cpu").set_(
        buffer.storage, x.storage_offset(), x.size(), x.stride()
    )


def _laid_out_as_empty(x: torch.Tensor) -> bool:
    """Whether ``x`` has ``torch.empty``'s strides for its shape, with no size-0 dimension.

    Without a size-0 or size-1 dimension, ``is_contiguous()`` (in C) already means that. A
    size-1 dimension may have any stride in a contiguous tensor, so there the strides are
    compared: such tensors (a depthwise convolution's ``(C, 1, k, k)`` weight, a ``(1,)``
    scalar) took the general path with byte copies on every call before (a cached call over
    50,000 ``(1,)`` tensors 4.6x one over ``(4,)`` ones).
    """
    shape = x.shape
    if 0 in shape:
        return False
    if 1 not in shape:
        return x.is_contiguous()
    return x.stride() == dense_strides(shape)
