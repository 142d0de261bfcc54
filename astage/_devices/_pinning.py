"""Page-locking host memory with CUDA: the two calls astage makes, and nothing else.

``cudaHostRegister`` pins memory that astage allocated itself (exactly the bytes needed), where
``torch.empty(pin_memory=True)`` would round each request up to a power of two.
"""

from __future__ import annotations

import contextlib

import torch

_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context, not just the current one


def register(ptr: int, nbytes: int) -> None:
    """Pin ``nbytes`` at ``ptr``; raises RuntimeError with the CUDA error code on failure."""
    code = int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, _PORTABLE))
    if code != 0:
        raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed with CUDA error {code}")


def unregister(ptr: int) -> None:
    """Unpin memory pinned by :func:`register`; quiet at interpreter exit, when CUDA may be gone."""
    with contextlib.suppress(Exception):  # nothing useful to do while tearing down
        torch.cuda.cudart().cudaHostUnregister(ptr)
