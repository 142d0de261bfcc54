"""Every tensor dtype, end to end: what a hunt over dtypes x shapes x paths found.

The hunt staged every dtype this torch can make (bool, every int and uint, float16/32/64,
bfloat16, complex32/64/128, every float8, float4, bits, the sub-byte shells and the quantized
dtypes) in every shape it can take (0-d, empty, size-1 dimensions, non-contiguous views, a
storage offset, two views of one storage, conjugate and negative views, ``Parameter``, Python
attributes) through both stagers (first, replayed and reserved calls, snapshots, shared and
huge-page buffers, ``astage.compat``'s stagers), ``astage.save`` / ``load`` / ``load(into=)``,
``astage inspect``, ``safetensors.torch.load_file``, ``CheckpointDir`` and DCP's storage layer.
Each is expected to come back bit for bit, or be refused by an astage error naming its path
before anything is written. One focused test per defect, each failing before its fix.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import astage

QUANTIZED_DTYPES = [torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4]


def _random_bytes(nbytes: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=generator)


def _quantized_dtype_tensor(dtype: torch.dtype) -> torch.Tensor:
    """A plain (not ``is_quantized``) tensor whose dtype is a quantized one: torch makes it by
    viewing bytes as that dtype."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates the quantized dtypes
        return _random_bytes(8).view(dtype)


# -- staging ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", QUANTIZED_DTYPES, ids=str)
@pytest.mark.parametrize("neg", [False, True], ids=["plain", "neg"])
def test_a_tensor_of_a_quantized_dtype_is_refused_naming_its_path(
    dtype: torch.dtype, neg: bool
) -> None:
    # Staged into a buffer made by torch.empty(dtype=qint8), the copy failed with torch's raw
    # "Quantized copy only works with kFloat" (a plain view), or the staged tensor came back
    # is_quantized with no quantizer, whose repr() ended the process (a negative view; through
    # dcp.async_save a segfault).
    x = _quantized_dtype_tensor(dtype)
    if neg:
        x = x._neg_view()
    with astage.SyncStager() as stager, pytest.raises(astage.UnstageableError) as caught:
        stager.stage({"model": {"q": x}, "w": torch.ones(3)})
    assert caught.value.path == ("model", "q")
    assert "quantized" in str(caught.value)


# -- files -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype",
    [torch.int32, torch.int8, torch.uint16, torch.bool, torch.float8_e4m3fn, torch.bits8],
    ids=str,
)
@pytest.mark.parametrize("via", ["save_sync", "writer"])
def test_a_negative_view_no_loader_reads_is_refused_at_save(
    tmp_path: Path, dtype: torch.dtype, via: str
) -> None:
    # torch sets the lazy negation bit on any dtype (Tensor._neg_view()), staging keeps it, and
    # the file recorded it; the loader takes it on complex and float views only (a neg view of
    # uint16, bool or a float8 cannot be read), so astage.load, load(into=), inspect and
    # CheckpointDir.load_latest all refused the file save had written.
    x = _random_bytes(4 * dtype.itemsize).view(dtype)._neg_view()
    path = tmp_path / "a.safetensors"
    state = {"w": torch.ones(2), "model": {"n": x}}
    with pytest.raises(astage.UnsavableError, match="negat") as caught:
        if via == "save_sync":
            astage.save_sync(state, path)
        else:
            import anyio

            anyio.run(astage.save, state, astage.SafetensorsWriter(path))
    assert caught.value.path == ("model", "n")
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_negative_views_torch_makes_still_round_trip(tmp_path: Path) -> None:
    # What the refusal above leaves alone: a conjugate's imaginary part (a float view with the
    # negation bit) and negative complex and float views.
    base = _random_bytes(6 * 8).view(torch.complex64)
    state = {
        "imag": base.conj().imag,
        "neg": base._neg_view(),
        "neg_f16": _random_bytes(8, seed=1).view(torch.float16)._neg_view(),
        "neg_c32": _random_bytes(8, seed=2).view(torch.complex32)._neg_view(),
    }
    path = tmp_path / "a.safetensors"
    astage.save_sync(state, path)
    back = astage.load(path)
    for key, x in state.items():
        y = back[key]
        assert (y.dtype, y.shape, y.stride(), y.storage_offset(), y.is_neg()) == (
            x.dtype,
            x.shape,
            x.stride(),
            x.storage_offset(),
            x.is_neg(),
        ), key
        assert y.untyped_storage().tolist() == x.untyped_storage().tolist(), key
