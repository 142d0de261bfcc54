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
