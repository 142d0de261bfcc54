"""The rare tensor kinds: wrapper subclasses, ShardedTensor, sparse layouts, and the refused ones.

Each kind is staged the same way: the plain tensors inside it go through ``stage_inner`` (the
tensor stager's entry point, so they are cached, copied and tracked like any other tensor) and
the kind is rebuilt around their staged twins. These are plain functions, off the hot path: a
state dict holds few such tensors, and each one costs a few Python calls more than a plain one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from .._errors import UnstageableError
from .._paths import Attr, Path
from .._torch import (
    is_sharded_tensor,
    is_traceable_wrapper_subclass,
    make_subclass,
    rebuild_sharded_tensor,
    sparse_coo_parts,
)

StageInner = Callable[[torch.Tensor, Path], torch.Tensor]
"""Stages a tensor found inside another one at ``path``, and returns its staged twin."""


def stage_subclass(x: torch.Tensor, path: Path, stage_inner: StageInner) -> torch.Tensor | None:
    """Stage ``x`` if it is a wrapper subclass or a ShardedTensor; None for any other subclass.

    A subclass that is neither (a marker class such as ``Buffer``) has a storage of its own and
    takes the plain path, which keeps its type.
    """
    if is_traceable_wrapper_subclass(x):
        return stage_wrapper_subclass(x, path, stage_inner)
    if is_sharded_tensor(x):
        return stage_sharded_tensor(x, path, stage_inner)
    return None


def stage_wrapper_subclass(x: torch.Tensor, path: Path, stage_inner: StageInner) -> torch.Tensor:
    """Subclasses like DTensor: stage the inner tensors, rebuild the wrapper around them."""
    names, context = x.__tensor_flatten__()  # type: ignore[attr-defined]
    inner = {}
    for name in names:
        value = getattr(x, name)
        # Some subclasses list non-tensors too (DTensor's device_mesh): process-wide objects
        # that the rebuilt wrapper must share, not copies of them.
        if isinstance(value, torch.Tensor):
            value = stage_inner(value, (*path, Attr(name)))
        inner[name] = value
    try:
        y: torch.Tensor = type(x).__tensor_unflatten__(  # type: ignore[attr-defined]
            inner, context, x.size(), x.stride()
        )
    except Exception as error:
        raise UnstageableError(
            f"cannot rebuild {type(x).__qualname__} around staged tensors: {error}", path
        ) from error
    if isinstance(x, torch.nn.Parameter):
        # A Parameter of a wrapper subclass (FSDP2's DTensor parameters) is the subclass with
        # a flag that isinstance() reads; unflattened, it was a plain wrapper that no longer
        # passed for a Parameter, and had lost requires_grad (a dense Parameter keeps both).
        try:
            y = torch.nn.Parameter(y, requires_grad=x.requires_grad)
        except Exception as error:
            raise UnstageableError(
                f"cannot make a Parameter of the staged {type(x).__qualname__}: {error}", path
            ) from error
    return y


def stage_sharded_tensor(x: torch.Tensor, path: Path, stage_inner: StageInner) -> torch.Tensor:
    """A ShardedTensor: stage its local shards, rebuild it around them (no collective).

    Its metadata (global size, every shard's offsets, sizes and placement) is deep-copied; its
    process group is shared, like a DTensor's device mesh.
    """
    sharded: Any = x
    shards = [
        (
            stage_inner(shard.tensor, (*path, Attr("local_shards"), index)),
            copy.deepcopy(shard.metadata),
        )
        for index, shard in enumerate(sharded.local_shards())
    ]
    try:
        y = rebuild_sharded_tensor(sharded, shards, copy.deepcopy(sharded.metadata()))
    except Exception as error:
        raise UnstageableError(
            f"cannot rebuild a ShardedTensor around staged shards: {error}", path
        ) from error
    return y


def stage_sparse(x: torch.Tensor, path: Path, stage_inner: StageInner) -> torch.Tensor:
    """A sparse tensor (COO, CSR, CSC, BSR, BSC): stage its index and value tensors, and give
    the rebuilt tensor the source's class (a sparse ``Parameter`` stays one, as a dense one
    does; it came back a plain tensor)."""
    y = _sparse(x, path, stage_inner)
    cls = type(x)
    if cls is torch.Tensor:
        return y
    try:
        if cls is torch.nn.Parameter:
            return torch.nn.Parameter(y, requires_grad=x.requires_grad)
        return make_subclass(cls, y, x.requires_grad)
    except Exception as error:
        raise UnstageableError(
            f"cannot make a {cls.__qualname__} of the staged sparse tensor: {error}", path
        ) from error


def _sparse(x: torch.Tensor, path: Path, stage_inner: StageInner) -> torch.Tensor:
    layout = x.layout
    if layout is torch.sparse_coo:
        indices, values = sparse_coo_parts(x)  # as they are, coalesced or not
        indices = stage_inner(indices, (*path, Attr("indices")))
        values = stage_inner(values, (*path, Attr("values")))
        return torch.sparse_coo_tensor(indices, values, x.size(), is_coalesced=x.is_coalesced())
    if layout in (torch.sparse_csr, torch.sparse_bsr):
        return torch.sparse_compressed_tensor(
            stage_inner(x.crow_indices(), (*path, Attr("crow_indices"))),
            stage_inner(x.col_indices(), (*path, Attr("col_indices"))),
            stage_inner(x.values(), (*path, Attr("values"))),
            x.size(),
            layout=layout,
        )
    if layout in (torch.sparse_csc, torch.sparse_bsc):
        return torch.sparse_compressed_tensor(
            stage_inner(x.ccol_indices(), (*path, Attr("ccol_indices"))),
            stage_inner(x.row_indices(), (*path, Attr("row_indices"))),
            stage_inner(x.values(), (*path, Attr("values"))),
            x.size(),
            layout=layout,
        )
    raise UnstageableError(f"tensors with layout {layout} are not supported", path)


def refusal(x: torch.Tensor, path: Path) -> UnstageableError:
    """The error for a strided tensor that cannot be staged: quantized (or of a quantized dtype),
    nested or meta."""
    if x.is_quantized:
        return UnstageableError("quantized tensors are not supported; dequantize first", path)
    if x.is_nested:
        return UnstageableError("nested tensors are not supported; unbind first", path)
    if x.device.type != "meta":  # a plain tensor of a quantized dtype (bytes viewed as qint8)
        name = str(x.dtype).removeprefix("torch.")
        return UnstageableError(
            f"a tensor of the quantized dtype {name} is not supported (quantized tensors are "
            "not); view its bytes as an integer dtype first",
            path,
        )
    return UnstageableError(
        "a meta tensor has no data to stage (materialize it, e.g. with to_empty(), first)", path
    )
