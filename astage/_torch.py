"""Every private torch API astage touches, in one place.

torch's private names (a leading underscore, ``torch._C``, ``torch.utils._*``, the CUDA runtime
bindings) carry no compatibility promise. Each is reached here through a thin, typed wrapper with
a line on why astage needs it, so a torch upgrade that moves one breaks this module and nothing
else, and the rest of the package reads as ordinary torch. Importing this module imports neither
``torch.distributed`` nor CUDA: the wrappers that need them import or initialize them on use.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import operator
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.multiprocessing  # imported by torch itself: costs nothing
from torch.utils._python_dispatch import is_traceable_wrapper_subclass as _is_wrapper

__all__ = [
    "FOREACH_STEP",
    "cuda_clear_last_error",
    "cuda_host_register",
    "cuda_host_unregister",
    "cuda_selected_device",
    "detached",
    "dense_strides",
    "device_mesh_without_backend",
    "dtensor_local",
    "dtensor_spec",
    "foreach_copy_",
    "is_sharded_tensor",
    "is_traceable_wrapper_subclass",
    "make_dtensor",
    "make_subclass",
    "metadata_guard",
    "neg_view",
    "new_shared_storage",
    "rebuild_sharded_tensor",
    "sparse_coo_parts",
    "storage_bytes_reached",
    "storage_key",
    "storage_keys",
    "storage_keys_of",
    "storage_shortfall",
    "storage_use_count",
    "storage_use_counts",
    "view_end",
]

# -- tensors and storages -------------------------------------------------------------------------


FOREACH_STEP = 256
"""Most tensors one ``torch._foreach_copy_`` call gets from :func:`foreach_copy_`."""


def foreach_copy_(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
    """Copy ``srcs[i]`` into ``dsts[i]`` for every i, :data:`FOREACH_STEP` tensors a call.

    Why one call for many: a C++ call that releases the GIL for the whole list; copying many
    small tensors one ``copy_`` at a time costs a Python round trip (and a GIL hand-off) per
    tensor.

    Why not one call for all: the binding turns both lists into C++ tensor lists before it
    releases the GIL, about 0.13 us a tensor on a quiet core. A worker thread's call over
    1,024 tensors held the GIL that long, and an event loop that had just let go of the GIL
    for a moment (its ``select``) waited for it: 0.3 ms a hand-off quiet, up to 0.9 ms on a
    loaded core, 0.15 ms with 256 tensors a call. Cut into calls of 256, the p99 of a 1 ms
    heartbeat's lateness during cached calls over 50,000 small tensors went from 1.13-2.04 ms
    to 0.80-0.93 ms (three paired runs of 10 calls), the calls as fast as before.
    """
    if len(srcs) <= FOREACH_STEP:
        torch._foreach_copy_(dsts, srcs)
        return
    for start in range(0, len(srcs), FOREACH_STEP):
        stop = start + FOREACH_STEP
        torch._foreach_copy_(dsts[start:stop], srcs[start:stop])


def dense_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """The strides ``torch.empty(shape)`` gives: row-major, a size-0 dimension counted as 1."""
    strides = [1] * len(shape)
    step = 1
    for dim in range(len(shape) - 1, -1, -1):
        strides[dim] = step
        step *= max(shape[dim], 1)
    return tuple(strides)


def view_end(shape: Sequence[int], stride: Sequence[int], offset: int) -> int:
    """The index after the last element that a strided view with no size-0 dimension reaches
    in its storage: ``offset + sum((size - 1) * step) + 1``, summed in C."""
    return int(offset + sum(map(operator.mul, shape, stride)) - sum(stride) + 1)


def storage_bytes_reached(x: torch.Tensor) -> int:
    """Bytes of its storage, from the start, that strided ``x`` reads: 0 for an empty tensor.

    Why: torch keeps a tensor whose storage was resized under it (``resize_(0)`` frees the
    memory of a tensor still in use); its metadata then claims bytes the storage lacks.
    """
    if x.numel() == 0:
        return 0
    return view_end(x.shape, x.stride(), int(x.storage_offset())) * x.element_size()


def storage_shortfall(x: torch.Tensor) -> str | None:
    """Why strided ``x`` cannot be read or written whole, or None: its storage was freed or
    shrunk under it and lacks bytes its metadata reaches (said so: "reaches N bytes of its
    storage, which holds M ..."). Reading those bytes would go past the storage's end.
    """
    if x.layout is not torch.strided or x.is_nested:
        return None
    reached, held = storage_bytes_reached(x), x.untyped_storage().nbytes()
    if reached <= held:
        return None
    return (
        f"reaches {reached} bytes of its storage, which holds {held} (was the storage freed "
        "with untyped_storage().resize_(0)?)"
    )


def storage_use_count(storage: torch.UntypedStorage) -> int:
    """References to ``storage``'s memory held by tensors and storage objects (C++ side).

    Why: the only way to tell whether a staged snapshot (or anything derived from it: views,
    ``detach()``, ``numpy()``) still uses a host buffer, without tracking every tensor handed out.
    """
    return int(torch._C._storage_Use_Count(storage._cdata))


_cdata = operator.attrgetter("_cdata")


def storage_use_counts(storages: Iterable[torch.UntypedStorage]) -> Iterator[int]:
    """:func:`storage_use_count` of each storage, for a loop over many (C-level: no Python step
    per storage)."""
    return map(torch._C._storage_Use_Count, map(_cdata, storages))


def storage_key(storage: torch.UntypedStorage) -> int:
    """An integer that identifies the C++ storage behind ``storage`` while it lives.

    Why: two Python storage objects (``t.untyped_storage()`` called twice, or on two views) can
    wrap the same memory; their ``_cdata`` (the StorageImpl's address) is equal, their ``id()``
    need not be. Used to find tensors that share a storage.
    """
    return int(storage._cdata)


detached: Callable[[torch.Tensor], torch.Tensor] = functools.partial(
    torch.Tensor._make_subclass, torch.Tensor
)
"""``x.detach()``, made without letting go of the GIL.

Why: ``detach()`` is a torch operator, and torch's Python bindings drop the GIL around every
operator call. Beside another thread that keeps running Python (a training loop beside an event
loop, a data loader's pin-memory thread), that thread may take the GIL then and keep it for a
whole switch interval: called back to back there, each ``detach()`` took 4-9 ms
(``python -m benchmarks.busy_thread``). ``Tensor._make_subclass``, which ``nn.Parameter`` is
made with, detaches in C++ under the GIL (1-4 us there): a plain ``torch.Tensor`` on the same
storage, offset, sizes and strides, sharing the version counter, with the conjugate and
negative bits, no autograd history and ``requires_grad`` False, as ``detach()`` gives.
"""


def storage_keys(storages: Iterable[torch.UntypedStorage]) -> Iterator[int]:
    """:func:`storage_key` of each storage (C-level: no Python step per storage)."""
    return map(_cdata, storages)


def storage_keys_of(tensors: Iterable[torch.Tensor]) -> Iterator[int]:
    """:func:`storage_key` of each tensor's storage, without a Python storage object each.

    Why: ``untyped_storage()`` makes a storage object where the storage has none yet, and torch
    keeps it while the storage lives; over tens of thousands of tensors that is as many objects
    for the cyclic collector, to read one integer (``map`` over torch's own reader: C-level).
    """
    address = getattr(torch._C, "_storage_address", None)
    if address is None:  # not in every torch: the storage object's own key
        return (int(tensor.untyped_storage()._cdata) for tensor in tensors)
    return map(address, tensors)


def new_shared_storage(nbytes: int) -> torch.UntypedStorage:
    """A CPU storage of ``nbytes`` in shared memory, allocated there directly.

    Why: ``share_memory_()`` on an ordinary storage allocates, then copies into shared memory;
    the private constructors allocate once, and no public API does.

    Where torch shares storages by file descriptor (Linux's default), the memory is an
    anonymous ``memfd`` sized by ``ftruncate`` and mapped by torch as a shared storage that
    keeps its descriptor (``_new_shared_fd_cpu``, what a receiving process uses): pages are
    allocated on first write, by the copy. ``_new_shared`` makes a file in ``/dev/shm`` and
    ``fallocate``s all of it up front (~0.3 s/GiB here); first write included, the memfd
    measured 1.33x faster for 1 GiB in 64 storages and 1.8x for 3,000 small ones. It also
    escapes a small ``/dev/shm`` (a container's 64 MiB default), which the ``fallocate``
    guards against. Under the ``file_system`` strategy torch shares only storages it
    allocated by name, so ``_new_shared`` stays.
    """
    if _HAS_MEMFD and nbytes and _sharing_strategy() == "file_descriptor":
        fd = os.memfd_create("astage", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, nbytes)
            return _new_shared_fd(fd, nbytes)
        finally:
            os.close(fd)  # the storage keeps a descriptor of its own (a dup)
    storage: torch.UntypedStorage = torch.UntypedStorage._new_shared(nbytes)
    return storage


_HAS_MEMFD = hasattr(os, "memfd_create") and hasattr(torch.UntypedStorage, "_new_shared_fd_cpu")


def _new_shared_fd(fd: int, nbytes: int) -> torch.UntypedStorage:
    storage: torch.UntypedStorage = torch.UntypedStorage._new_shared_fd_cpu(fd, nbytes)  # type: ignore[attr-defined]
    return storage


def _sharing_strategy() -> str:
    # Read at each allocation: an application may set the strategy at any time.
    return str(torch.multiprocessing.get_sharing_strategy())


MetadataGuard = Callable[..., bool]


def metadata_guard(tensors: Sequence[torch.Tensor]) -> MetadataGuard | None:
    """A check, in one C++ call, that other tensors have the metadata ``tensors`` have now:
    ``guard(*others)`` is True when each has the same exact type, dtype, device, shape,
    strides, dispatch keys (the conj and neg bits among them) and requires_grad as its
    counterpart; False otherwise, or for a non-tensor. None where this torch has no such check.

    Why: a replay reads these per tensor, one Python-level call each (0.1-0.4 us apiece over
    50,000 small tensors, the largest part of a cached call); dynamo's ``TensorGuards`` reads
    them all in C++ (~0.3 us per tensor). It checks neither the storage nor the storage offset.
    Its private constructor has changed before: it is probed once, on tensors that differ in
    each of those facts, and not used unless it tells every one apart.
    """
    tensor_guards = _tensor_guards()
    if tensor_guards is None:
        return None
    guard = tensor_guards(*tensors, dynamic_dims_sizes=None, dynamic_dims_strides=None)
    return guard.check  # type: ignore[no-any-return]


@functools.cache
def _tensor_guards() -> Any:
    """``torch._C._dynamo.guards.TensorGuards`` if it tells apart every fact
    :func:`metadata_guard` promises, else None (probed once)."""
    try:
        from torch._C._dynamo import guards

        # Typed Any: its stub leaves out the example tensors that the constructor takes.
        tensor_guards: Any = guards.TensorGuards
        cpu = torch.device("cpu")  # not the caller's default device or dtype, if any
        base = torch.zeros(4, 3, dtype=torch.float32, device=cpu)
        guard = tensor_guards(base, dynamic_dims_sizes=None, dynamic_dims_strides=None).check
        others = (
            base.t().contiguous().t(),  # strides
            torch.zeros(3, 4, dtype=torch.float32, device=cpu),  # shape
            base.double(),  # dtype
            neg_view(base),  # neg bit
            torch.nn.Parameter(base),  # exact type
            base.clone().requires_grad_(),  # requires_grad
            torch.zeros(4, 3, device="meta"),  # device
            torch.zeros(4, 3, dtype=torch.complex64, device=cpu).conj(),  # dtype and conj bit
        )
        alike = torch.zeros(4, 3, dtype=torch.float32, device=cpu)
        works = guard(alike) is True and not any(guard(x) for x in others)
        complex_ = torch.zeros(2, dtype=torch.complex64, device=cpu)
        conj = tensor_guards(complex_, dynamic_dims_sizes=None, dynamic_dims_strides=None).check
        works = works and conj(complex_.clone()) is True and conj(complex_.conj()) is False
        works = works and guard(3) is False
    except Exception:  # noqa: BLE001 - any failure means: do without it
        return None
    return tensor_guards if works else None


def neg_view(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with the lazy negation bit set, sharing its memory.

    Why: a staged tensor must keep its source's ``is_neg()`` view (a conjugate's imaginary part
    is one) over the same bytes; there is no public way to set the bit without a copy.
    """
    return tensor._neg_view()


def make_subclass(cls: type[torch.Tensor], data: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    """An instance of tensor subclass ``cls`` sharing ``data``'s memory and metadata.

    Why: the walk rebuilds plain tensor subclasses (``Buffer``-like marker classes) around a
    staged view without calling their ``__new__``, which may expect other arguments.
    """
    return torch.Tensor._make_subclass(cls, data, requires_grad)


def is_traceable_wrapper_subclass(tensor: object) -> bool:
    """Whether ``tensor`` is a wrapper subclass (DTensor and the like) with flatten/unflatten.

    Why: such a tensor has no storage of its own; the walk stages its inner tensors and rebuilds
    the wrapper with ``__tensor_unflatten__``, and this is torch's test for that protocol.
    """
    return bool(_is_wrapper(tensor))


def sparse_coo_parts(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The indices and values of a sparse COO tensor, coalesced or not.

    Why: ``indices()`` and ``values()`` refuse an uncoalesced tensor, and coalescing would copy
    and change what the walk must reproduce; ``_indices()``/``_values()`` return them as they are.
    """
    return tensor._indices(), tensor._values()


# -- ShardedTensor (torch.distributed._shard, deprecated but still in use) ------------------------

_SHARDED_TENSOR_MODULE = "torch.distributed._shard.sharded_tensor.api"


def is_sharded_tensor(tensor: object) -> bool:
    """Whether ``tensor`` is a ShardedTensor; never imports torch.distributed itself.

    Why: ShardedTensor lives in a private module; if nobody imported it, nothing is one.
    """
    module = sys.modules.get(_SHARDED_TENSOR_MODULE)
    return module is not None and isinstance(tensor, module.ShardedTensor)


def rebuild_sharded_tensor(
    sharded: Any, local_shards: Sequence[tuple[torch.Tensor, Any]], metadata: Any
) -> torch.Tensor:
    """A ShardedTensor like ``sharded`` around new local shards, without a collective.

    ``local_shards`` pairs each new shard tensor with its (copied) shard metadata; ``metadata``
    is the (copied) global metadata. The new tensor shares ``sharded``'s process group.

    Why: the public constructors run a collective to agree on the metadata; staging already has
    it and must not talk to other ranks. ``Shard``, ``_init_from_local_shards_and_global_metadata``
    and ``_process_group`` are all private.
    """
    from torch.distributed._shard.sharded_tensor.api import ShardedTensor
    from torch.distributed._shard.sharded_tensor.shard import Shard

    shards = [Shard(tensor, shard_metadata) for tensor, shard_metadata in local_shards]
    rebuilt: torch.Tensor = ShardedTensor._init_from_local_shards_and_global_metadata(
        shards, metadata, process_group=sharded._process_group, init_rrefs=False
    )
    return rebuilt


# -- DTensor internals (replication rebuilds DTensors from a wire header) -------------------------


def dtensor_spec(dtensor: Any) -> Any:
    """The ``DTensorSpec`` (mesh, placements, tensor meta) of a DTensor.

    Why: a replica must describe a DTensor's layout exactly; ``_spec`` holds all of it at once.
    """
    return dtensor._spec


def dtensor_local(dtensor: Any) -> torch.Tensor:
    """A DTensor's local shard, the very tensor object, not a copy or an autograd view.

    Why: ``to_local()`` returns a new autograd-tracked view; replication sends the storage itself.
    """
    local: torch.Tensor = dtensor._local_tensor
    return local


def make_dtensor(
    local: torch.Tensor,
    mesh: Any,
    placements: Sequence[Any],
    shape: Sequence[int],
    stride: Sequence[int],
    *,
    requires_grad: bool,
) -> torch.Tensor:
    """A DTensor around ``local`` with the given layout, without a collective or a copy.

    Why: ``DTensor.from_local`` may redistribute and checks shapes across ranks; a received
    replica already has its exact spec. ``DTensorSpec``, ``TensorMeta`` and the DTensor
    constructor are private.
    """
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

    spec = DTensorSpec(
        mesh,
        tuple(placements),
        tensor_meta=TensorMeta(torch.Size(shape), tuple(stride), local.dtype),
    )
    dtensor: torch.Tensor = DTensor(local, spec, requires_grad=requires_grad)  # type: ignore[call-arg]
    return dtensor


def device_mesh_without_backend(
    device_type: str, grid: torch.Tensor, dim_names: tuple[str, ...] | None
) -> Any:
    """A ``DeviceMesh`` over ``grid`` that creates no process groups.

    Why: a replica's mesh is only a description for the rebuilt DTensors; creating its process
    groups would be a collective. ``_init_backend=False`` is the private switch for that.
    """
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh(device_type, grid, mesh_dim_names=dim_names, _init_backend=False)


# -- the CUDA runtime -----------------------------------------------------------------------------

HOST_REGISTER_PORTABLE = 1
"""``cudaHostRegisterPortable``: the memory is pinned for every CUDA context, not just one."""


def cuda_host_register(ptr: int, nbytes: int, flags: int = HOST_REGISTER_PORTABLE) -> int:
    """``cudaHostRegister``: page-lock ``nbytes`` at ``ptr``; returns the CUDA error code.

    Why: pinning memory astage allocated itself takes exactly the bytes needed, where
    ``torch.empty(pin_memory=True)`` rounds each request up to a power of two. torch exposes
    the call only through the private ``torch.cuda.cudart()`` bindings.
    """
    return int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, flags))


def cuda_host_unregister(ptr: int) -> int:
    """``cudaHostUnregister``: undo :func:`cuda_host_register`; returns the CUDA error code."""
    return int(torch.cuda.cudart().cudaHostUnregister(ptr))


def cuda_selected_device(index: int) -> contextlib.AbstractContextManager[object]:
    """Make CUDA device ``index`` this thread's current device inside the block, then restore.

    Why: every runtime call acts on the thread's current device, and a thread that never chose
    one is on device 0, where the call would create a CUDA context (hundreds of MB) on a GPU
    that belongs to another rank. Public API (``torch.cuda.device``), kept here next to the
    runtime calls it frames so that a test replaces the runtime in one module; on leaving,
    torch restores the previous device only where a context exists already, creating none.
    """
    return torch.cuda.device(index)


def cuda_clear_last_error() -> int | None:
    """``cudaGetLastError``: read and reset this thread's last CUDA runtime error.

    Why: a failed runtime call (``cudaHostRegister`` of memory CUDA will not lock) also leaves
    its code as the thread's "last error", and torch checks that after every kernel launch: the
    next, unrelated kernel in this thread would fail with the old error. torch's bindings lack
    the call, so it is made through ctypes on the CUDA runtime library torch loaded. Returns
    the code read, or None when no such library is loaded (a build with the runtime linked in
    statically keeps its own state, out of reach).
    """
    get_last_error = _cuda_get_last_error()
    if get_last_error is None:
        return None
    return int(get_last_error())


@functools.cache
def _cuda_get_last_error() -> Callable[[], int] | None:
    # Only a runtime already loaded (by torch): another copy would keep another last error,
    # and loading one would start a second CUDA runtime in the process.
    for name in _loaded_libraries("libcudart"):
        try:
            library = ctypes.CDLL(name)
        except OSError:
            continue
        function = getattr(library, "cudaGetLastError", None)
        if function is not None:
            function.restype = ctypes.c_int
            function.argtypes = []
            return function  # type: ignore[no-any-return]
    return None


def _loaded_libraries(stem: str) -> list[str]:
    """Paths of the shared libraries named ``stem*`` mapped into this process (Linux)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            lines = maps.read().splitlines()
    except OSError:
        return []
    paths: list[str] = []
    for line in lines:
        fields = line.split(maxsplit=5)  # address, perms, offset, device, inode, [path]
        path = fields[5] if len(fields) == 6 else ""
        if path.rsplit("/", 1)[-1].startswith(stem) and path not in paths:
            paths.append(path)
    return paths


def make_sharded_tensor(
    local_shards: Sequence[tuple[torch.Tensor, list[int], list[int], str | None]],
    shards_metadata: Sequence[tuple[list[int], list[int], str | None]],
    size: Sequence[int],
    dtype: torch.dtype,
    *,
    requires_grad: bool,
    process_group: Any,
) -> torch.Tensor:
    """A ShardedTensor from plain descriptions of its shards, without a collective.

    ``local_shards``: (tensor, offsets, sizes, placement) of each shard held here;
    ``shards_metadata``: (offsets, sizes, placement) of every shard of the global tensor.

    Why: a received replica has no ShardedTensor to copy metadata from; ``ShardMetadata``,
    ``ShardedTensorMetadata``, ``TensorProperties`` and ``Shard`` live in private modules, and
    the public constructors run a collective.
    """
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor.api import ShardedTensor
    from torch.distributed._shard.sharded_tensor.metadata import (
        ShardedTensorMetadata,
        TensorProperties,
    )
    from torch.distributed._shard.sharded_tensor.shard import Shard

    shards = [
        Shard(tensor, ShardMetadata(offsets, sizes, placement))
        for tensor, offsets, sizes, placement in local_shards
    ]
    metadata = ShardedTensorMetadata(
        [ShardMetadata(offsets, sizes, placement) for offsets, sizes, placement in shards_metadata],
        torch.Size(size),
        TensorProperties(dtype=dtype, layout=torch.strided, requires_grad=requires_grad),
    )
    rebuilt: torch.Tensor = ShardedTensor._init_from_local_shards_and_global_metadata(
        shards, metadata, process_group=process_group, init_rrefs=False
    )
    return rebuilt


def register_checkpoint_stager(cls: type) -> None:
    """Register ``cls`` as a virtual subclass of DCP's experimental ``CheckpointStager``.

    Why: the ABC lives in the private ``torch.distributed.checkpoint._experimental`` package.
    """
    from torch.distributed.checkpoint._experimental.staging import CheckpointStager

    CheckpointStager.register(cls)


def staging_defaults() -> contextlib.AbstractContextManager[object]:
    """A block whose new tensors are normal CPU tensors, whatever torch defaults the caller's
    thread has set: outside ``torch.inference_mode()``, and on the CPU where a default device
    (``torch.set_default_device("cuda")``) or another function mode is active.

    Why: a cached buffer lives across calls. Allocated as an inference tensor by a call made in
    inference mode, it refused the copy of any later call made outside it ("Inplace update to
    inference tensor outside InferenceMode is not allowed"), and its staged tensors refused
    in-place use there. Under a default device, the views astage builds with
    ``torch.empty((0,), dtype=...).set_(storage, ...)`` were made on that device: a staged
    partial view came back a meta (or CUDA) tensor. Both are entered only when needed: a
    ``torch.inference_mode(False)`` block costs a few microseconds per slice of the async walk,
    and ``torch.get_default_device()`` 8 us, so the function-mode stack's length (a C call) is
    what is asked.
    """
    inference = torch.is_inference_mode_enabled()
    moded = _function_modes() > 0
    if not inference and not moded:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    if inference:
        stack.enter_context(torch.inference_mode(False))
    if moded:
        stack.enter_context(torch.device("cpu"))
    return stack


def _function_modes() -> int:
    """How many torch function modes the thread has pushed (a default device is one)."""
    length = getattr(torch._C, "_len_torch_function_stack", None)
    if length is None:  # not in this torch: the slower public question
        return int(torch.get_default_device().type != "cpu")
    return int(length())
