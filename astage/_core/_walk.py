"""The sans-IO core: rebuild a state dict around host buffers and list the copies to make.

``build_plan`` walks the state dict the way ``copy.deepcopy`` would (a memo keeps shared
references shared and cycles closed), but every tensor is rebuilt on CPU as a view of a host
buffer from the cache, with its dtype, shape, stride and offset. Each source storage is visited
once per call and adds exactly one entry to :class:`Copies` (all bytes of the storage, which is
what keeps aliasing intact). Nothing here waits for a device or an event loop: the walk is a
generator that yields every few dozen objects, so an async driver can hand the loop back while
a sync driver just runs it to the end.
"""

from __future__ import annotations

import copyreg
import enum
import sys
import types
import weakref
from collections import OrderedDict
from collections.abc import Callable, Generator
from typing import Any

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from .._errors import UnstageableError
from .._paths import Attr, Path
from ._cache import BufferCache, HostBuffer
from ._plan import Leaf, Plan

Walk = Generator[None, None, Any]

_MISSING: Any = object()
_YIELD_EVERY = 64  # objects visited between two chances for the driver to yield

_Tensor = torch.Tensor
_Parameter = torch.nn.Parameter

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


def build_plan(cache: BufferCache, state_dict: Any, plan: Plan | None = None) -> Walk:
    """Walk ``state_dict`` into ``plan`` (a new one by default); the generator returns the plan.

    ``plan.copies`` grows while the walk runs, so a driver may start copying before it ends.
    """
    plan = plan if plan is not None else Plan()
    walker = _Walker(cache, plan)
    try:
        plan.result = yield from walker.visit(state_dict, ())
    finally:
        walker.close()
    plan.done = True
    return plan


def _bytes_view(storage: torch.UntypedStorage, device: torch.device) -> torch.Tensor:
    return torch.empty((0,), dtype=torch.uint8, device=device).set_(storage)


def _view_on(buffer: HostBuffer, x: torch.Tensor) -> torch.Tensor:
    """A CPU tensor with ``x``'s dtype, shape, stride and offset on ``buffer``."""
    return torch.empty((0,), dtype=x.dtype).set_(
        buffer.storage, x.storage_offset(), x.size(), x.stride()
    )


class _Walker:
    def __init__(self, cache: BufferCache, plan: Plan) -> None:
        self._cache = cache
        self._plan = plan
        self._copies = plan.copies
        self._buffers = cache.entries
        self._leaves = plan.leaves
        self._memo: dict[int, Any] = {}
        self._keep_alive: list[Any] = []  # ids in the memo stay valid while the walk runs
        # Source storages met in this call (by id) -> their buffer, and -> their copy's index.
        # Two dicts rather than one of tuples: no allocation per tensor on the hot path.
        self._storages: dict[int, HostBuffer] = {}
        self._copy_index: dict[int, int] = {}
        self._tensor_deps: dict[int, int] = {}
        self._track_leaves = plan.track_leaves
        # A tensor met directly in a dict or list (``type(x) is torch.Tensor``).
        self._child_tensor = self._tracked_child if plan.track_leaves else self._untracked_child
        self._tensor_depth = 0  # > 0 while staging the insides of a tensor
        self._last_copy = -1
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

    def close(self) -> None:
        """Break the walker's references to its own bound methods.

        Without this the walker is a reference cycle, and its memo (every staged object of the
        call) would stay alive until the cyclic collector ran: the staged result would outlive
        its last user, and its host buffers would look in use (``BufferCache.in_use``).
        """
        self._dispatch.clear()
        del self._child_tensor
        self._memo.clear()
        self._keep_alive.clear()

    # -- containers -----------------------------------------------------------------------

    def visit(self, x: Any, path: Path) -> Walk:
        cls = type(x)
        if cls in ATOMIC_TYPES:
            return x
        found = self._memo.get(id(x), _MISSING)
        if found is not _MISSING:
            if isinstance(x, _Tensor):
                return self._tensor_leaf(x, path)
            return found
        if isinstance(x, _Tensor):
            return self._tensor_leaf(x, path)
        handler = self._dispatch.get(cls)
        if handler is not None:
            return (yield from handler(x, path))
        if issubclass(cls, (type, enum.Enum)):
            return x
        if issubclass(cls, tuple) and hasattr(cls, "_fields"):
            return (yield from self._namedtuple(x, path))
        return (yield from self._reduce(x, path))

    def _tick(self) -> bool:
        self._countdown -= 1
        if self._countdown > 0:
            return False
        self._countdown = _YIELD_EVERY
        return True

    def _remember(self, x: Any, y: Any) -> None:
        self._memo[id(x)] = y
        self._keep_alive.append(x)

    def _dict(self, x: dict[Any, Any], path: Path) -> Walk:
        y: dict[Any, Any] = type(x)()
        self._remember(x, y)
        attributes = getattr(x, "__dict__", None)
        if attributes:  # e.g. the _metadata that Module.state_dict() hangs on its OrderedDict
            y.__dict__.update((yield from self._attributes(attributes, path)))
        atomic = ATOMIC_TYPES
        memo = self._memo
        for old_key, value in x.items():
            key = old_key
            if type(key) not in atomic:
                key = yield from self.visit(old_key, (*path, old_key))
            vtype = type(value)
            if vtype in atomic:
                y[key] = value
            elif vtype is _Tensor:
                y[key] = self._child_tensor(value, path, old_key)
            elif vtype is dict:  # nested dicts are common: skip visit()'s generator
                found = memo.get(id(value), _MISSING)
                if found is _MISSING:
                    found = yield from self._dict(value, (*path, old_key))
                y[key] = found
            else:
                y[key] = yield from self.visit(value, (*path, old_key))
            self._countdown -= 1
            if self._countdown <= 0:
                self._countdown = _YIELD_EVERY
                yield
        return y

    def _list(self, x: list[Any], path: Path) -> Walk:
        y: list[Any] = []
        self._remember(x, y)
        atomic = ATOMIC_TYPES
        append = y.append
        for index, value in enumerate(x):
            vtype = type(value)
            if vtype in atomic:
                append(value)
            elif vtype is _Tensor:
                append(self._child_tensor(value, path, index))
            else:
                append((yield from self.visit(value, (*path, index))))
            if self._tick():
                yield
        return y

    def _items(self, x: tuple[Any, ...], path: Path) -> Generator[None, None, list[Any]]:
        items = []
        for index, value in enumerate(x):
            items.append((yield from self.visit(value, (*path, index))))
            if self._tick():
                yield
        return items

    def _tuple(self, x: tuple[Any, ...], path: Path) -> Walk:
        items = yield from self._items(x, path)
        # A tuple inside a cycle was rebuilt while visiting its own items: use that one.
        found = self._memo.get(id(x), _MISSING)
        if found is not _MISSING:
            return found
        if all(a is b for a, b in zip(x, items, strict=True)):
            return x  # nothing mutable inside: the tuple is its own copy, like copy.deepcopy
        y = tuple(items)
        self._remember(x, y)
        return y

    def _namedtuple(self, x: Any, path: Path) -> Walk:
        items = yield from self._items(x, path)
        found = self._memo.get(id(x), _MISSING)
        if found is not _MISSING:
            return found
        if all(a is b for a, b in zip(x, items, strict=True)):
            return x
        y = type(x)._make(items)
        self._remember(x, y)
        return y

    def _set(self, x: set[Any] | frozenset[Any], path: Path) -> Walk:
        items = []
        for value in x:
            items.append((yield from self.visit(value, (*path, value))))
        y = type(x)(items)
        self._remember(x, y)
        return y

    def _method(self, x: types.MethodType, path: Path) -> Walk:
        owner = yield from self.visit(x.__self__, (*path, Attr("__self__")))
        y = types.MethodType(x.__func__, owner)
        self._remember(x, y)
        return y

    def _reduce(self, x: Any, path: Path) -> Walk:
        """Objects in general: rebuild from ``__reduce_ex__(4)``, as pickle and deepcopy do."""
        cls = type(x)
        try:
            reductor = copyreg.dispatch_table.get(cls)
            rv = reductor(x) if reductor is not None else x.__reduce_ex__(4)
        except Exception as error:
            raise UnstageableError(
                f"cannot stage a {cls.__module__}.{cls.__qualname__} object: {error}", path
            ) from error
        if isinstance(rv, str):
            return x  # a module-level singleton, named by its global name
        func, args, state, list_items, dict_items = (*rv, None, None, None)[:5]
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
        if state is not None:
            yield from self._set_state(y, state, path)
        if list_items is not None:
            for index, item in enumerate(list_items):
                y.append((yield from self.visit(item, (*path, index))))
        if dict_items is not None:
            for old_key, value in dict_items:
                key = yield from self.visit(old_key, (*path, old_key))
                y[key] = yield from self.visit(value, (*path, old_key))
        return y

    def _set_state(self, y: Any, state: Any, path: Path) -> Walk:
        if hasattr(y, "__setstate__"):
            state = yield from self.visit(state, path)
            y.__setstate__(state)
            return None
        slots = None
        if isinstance(state, tuple) and len(state) == 2:
            state, slots = state
        if state:
            new_state = yield from self._attributes(state, path)
            y.__dict__.update(new_state)
        if slots:
            new_slots = yield from self._attributes(slots, path)
            for name, value in new_slots.items():
                object.__setattr__(y, name, value)  # frozen dataclasses with slots, too
        return None

    def _attributes(self, attributes: dict[str, Any], path: Path) -> Walk:
        new = {}
        for name, value in attributes.items():
            new[name] = yield from self.visit(value, (*path, Attr(name)))
            if self._tick():
                yield
        return new

    def _visit_now(self, x: Any, path: Path) -> Any:
        """Visit without yielding: for the few objects hanging off a tensor."""
        walk = self.visit(x, path)
        try:
            while True:
                next(walk)
        except StopIteration as stop:
            return stop.value

    # -- tensors --------------------------------------------------------------------------

    def _tracked_child(self, x: torch.Tensor, path: Path, key: Any) -> torch.Tensor:
        return self._tensor_leaf(x, (*path, key))

    def _untracked_child(self, x: torch.Tensor, path: Path, key: Any) -> torch.Tensor:
        """The hot path of stage(): no leaf record, and the path is built only if needed."""
        if not self._tensor_depth:
            self._plan.tensors += 1
        y: torch.Tensor = self._memo.get(id(x), _MISSING)
        if y is not _MISSING:
            return y
        restaged = self._restage(x)
        if restaged is not None:
            return restaged
        return self._stage_tensor(x, (*path, key))

    def _tensor_leaf(self, x: torch.Tensor, path: Path) -> torch.Tensor:
        """A tensor at ``path``: staged once per call, and recorded for ``stage_iter``."""
        key = id(x)
        y: torch.Tensor = self._memo.get(key, _MISSING)
        if not self._track_leaves:
            if not self._tensor_depth:
                self._plan.tensors += 1
            if y is not _MISSING:
                return y
            self._tensor_depth += 1
            try:
                return self._tensor(x, path)
            finally:
                self._tensor_depth -= 1
        if y is _MISSING:
            outer = self._last_copy
            self._last_copy = -1
            self._tensor_depth += 1
            try:
                y = self._tensor(x, path)
            finally:
                self._tensor_depth -= 1
            dep = self._last_copy
            self._tensor_deps[key] = dep
            self._last_copy = max(outer, dep)
        else:
            # Not yet recorded when a tensor's own attribute refers back to it (t.me = t).
            dep = self._tensor_deps.get(key, self._last_copy)
            self._last_copy = max(self._last_copy, dep)
        if self._tensor_depth == 0:
            self._plan.tensors += 1
            self._leaves.append(Leaf(path, y, dep))
        return y

    def _tensor(self, x: torch.Tensor, path: Path) -> torch.Tensor:
        if type(x) is _Tensor:
            y = self._restage(x)
            if y is not None:
                return y
        return self._stage_tensor(x, path)

    def _restage(self, x: torch.Tensor) -> torch.Tensor | None:
        """The hot path of a cached call: a plain tensor whose buffer already has its view.

        A tensor that spans its storage contiguously, like the one staged into this buffer
        last time, reuses that staged view: same dtype, shape, storage and byte count imply
        the same strides and offset. Anything else takes the general path.
        """
        try:
            storage = x.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return None
        buffer = self._buffers.get(id(storage))  # BufferCache.get, inlined: this is per tensor
        if buffer is None or buffer() is not storage:
            return None
        view = buffer.view
        if (
            view is None
            or id(storage) in self._storages
            or buffer.view_dtype is not x.dtype
            or buffer.view_shape != x.shape
            or buffer.nbytes != storage.nbytes()
            or x.storage_offset() != 0
            or not x.is_contiguous()
            or x.is_conj()
            or x.is_neg()
            or x.__dict__
        ):
            return None
        copies = self._copies
        index = len(copies.srcs)
        copies.srcs.append(x)  # keeps x alive, so its id stays valid in the memo
        copies.dsts.append(view)
        copies.buffers.append(buffer)
        self._storages[id(storage)] = buffer
        self._copy_index[id(storage)] = index
        self._last_copy = index
        # The buffer's own view stays private: consumers get a new tensor object each call,
        # so what they do to its metadata or attributes cannot reach the next call.
        y = view.detach()
        self._memo[id(x)] = y
        return y

    def _stage_tensor(self, x: torch.Tensor, path: Path) -> torch.Tensor:
        cls = type(x)
        if cls is not _Tensor and cls is not _Parameter:
            if is_traceable_wrapper_subclass(x):
                return self._wrapper_subclass(x, path)
            if _is_sharded_tensor(x):
                return self._sharded_tensor(x, path)
        layout = x.layout
        if layout is not torch.strided:
            return self._sparse(x, path, layout)
        if x.is_quantized or x.is_nested:
            kind = "quantized" if x.is_quantized else "nested"
            raise UnstageableError(
                f"{kind} tensors are not supported; dequantize or unbind first", path
            )
        device = x.device
        if device.type == "meta":
            raise UnstageableError(
                "a meta tensor has no data to stage (materialize it, e.g. with to_empty(), first)",
                path,
            )
        try:
            storage = x.untyped_storage()
        except (RuntimeError, NotImplementedError) as error:
            raise UnstageableError(
                f"a {cls.__qualname__} has no storage that can be copied: {error}", path
            ) from error
        spans_storage = (
            (cls is _Tensor or cls is _Parameter)
            and x.storage_offset() == 0
            and x.nbytes == storage.nbytes()
            and x.is_contiguous()
            and not x.is_conj()
            and not x.is_neg()
        )
        buffer = self._storages.get(id(storage))
        if buffer is not None:  # a storage already met in this call: an alias
            index = self._copy_index[id(storage)]
            plain = _view_on(buffer, x)
        else:
            buffer = self._cache.lookup(storage, path)
            if buffer is None:
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
                plain = view.detach()  # the buffer's own view stays private (see _restage)
                src, dst = x, view
            else:
                plain = _view_on(buffer, x)
                src, dst = _bytes_view(storage, device), buffer.as_bytes()
            index = self._copies.add(src, dst, buffer) if buffer.nbytes else -1
            self._storages[id(storage)] = buffer
            self._copy_index[id(storage)] = index
            self._keep_alive.append(storage)
        self._last_copy = max(self._last_copy, index)
        y = plain
        if x.is_conj():
            y = y.conj()
        if x.is_neg():
            y = y._neg_view()
        if cls is _Parameter:
            y = _Parameter(y, requires_grad=x.requires_grad)
        elif cls is not _Tensor:
            y = _Tensor._make_subclass(cls, y, x.requires_grad)
        self._remember(x, y)
        self._copy_attributes(x, y, path)
        return y

    def _copy_attributes(self, x: torch.Tensor, y: torch.Tensor, path: Path) -> None:
        """Python attributes set on a tensor (``__dict__`` and ``__slots__``), staged as well."""
        attributes = x.__dict__
        if attributes:
            for name, value in attributes.items():
                setattr(y, name, self._visit_now(value, (*path, Attr(name))))
        for klass in type(x).__mro__:
            for name in klass.__dict__.get("__slots__", ()):
                if name in ("__dict__", "__weakref__") or not hasattr(x, name):
                    continue
                setattr(y, name, self._visit_now(getattr(x, name), (*path, Attr(name))))

    def _wrapper_subclass(self, x: torch.Tensor, path: Path) -> torch.Tensor:
        """Subclasses like DTensor: stage the inner tensors, rebuild the wrapper around them."""
        names, context = x.__tensor_flatten__()  # type: ignore[attr-defined]
        inner = {}
        for name in names:
            value = getattr(x, name)
            # Some subclasses list non-tensors too (DTensor's device_mesh): process-wide
            # objects that the rebuilt wrapper must share, not copies of them.
            if isinstance(value, _Tensor):
                value = self._tensor_leaf(value, (*path, Attr(name)))
            inner[name] = value
        try:
            y: torch.Tensor = type(x).__tensor_unflatten__(inner, context, x.size(), x.stride())  # type: ignore[attr-defined]
        except Exception as error:
            raise UnstageableError(
                f"cannot rebuild {type(x).__qualname__} around staged tensors: {error}", path
            ) from error
        self._remember(x, y)
        return y

    def _sharded_tensor(self, x: torch.Tensor, path: Path) -> torch.Tensor:
        """A ShardedTensor: stage its local shards, rebuild it around them (no collective).

        Its metadata (global size, every shard's offsets, sizes and placement) is deep-copied;
        its process group is shared, like a DTensor's device mesh.
        """
        import copy

        from torch.distributed._shard.sharded_tensor.api import ShardedTensor
        from torch.distributed._shard.sharded_tensor.shard import Shard

        sharded: Any = x
        shards = [
            Shard(
                self._tensor_leaf(shard.tensor, (*path, Attr("local_shards"), i)),
                copy.deepcopy(shard.metadata),
            )
            for i, shard in enumerate(sharded.local_shards())
        ]
        try:
            y: torch.Tensor = ShardedTensor._init_from_local_shards_and_global_metadata(
                shards,
                copy.deepcopy(sharded.metadata()),
                process_group=sharded._process_group,
                init_rrefs=False,
            )
        except Exception as error:
            raise UnstageableError(
                f"cannot rebuild a ShardedTensor around staged shards: {error}", path
            ) from error
        self._remember(x, y)
        return y

    def _sparse(self, x: torch.Tensor, path: Path, layout: torch.layout) -> torch.Tensor:
        if layout is torch.sparse_coo:
            indices = self._tensor_leaf(x._indices(), (*path, Attr("indices")))
            values = self._tensor_leaf(x._values(), (*path, Attr("values")))
            y = torch.sparse_coo_tensor(indices, values, x.size(), is_coalesced=x.is_coalesced())
        elif layout in (torch.sparse_csr, torch.sparse_bsr):
            y = torch.sparse_compressed_tensor(
                self._tensor_leaf(x.crow_indices(), (*path, Attr("crow_indices"))),
                self._tensor_leaf(x.col_indices(), (*path, Attr("col_indices"))),
                self._tensor_leaf(x.values(), (*path, Attr("values"))),
                x.size(),
                layout=layout,
            )
        elif layout in (torch.sparse_csc, torch.sparse_bsc):
            y = torch.sparse_compressed_tensor(
                self._tensor_leaf(x.ccol_indices(), (*path, Attr("ccol_indices"))),
                self._tensor_leaf(x.row_indices(), (*path, Attr("row_indices"))),
                self._tensor_leaf(x.values(), (*path, Attr("values"))),
                x.size(),
                layout=layout,
            )
        else:
            raise UnstageableError(f"tensors with layout {layout} are not supported", path)
        self._remember(x, y)
        return y


def _is_sharded_tensor(x: torch.Tensor) -> bool:
    """Whether ``x`` is a (deprecated) ShardedTensor; never imports torch.distributed itself."""
    module = sys.modules.get("torch.distributed._shard.sharded_tensor.api")
    return module is not None and isinstance(x, module.ShardedTensor)
