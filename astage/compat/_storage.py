"""astage as DCP's storage layer: a ``StorageWriter`` (:mod:`._storage_writer`) and a
``StorageReader`` (:mod:`._storage_reader`) for ``torch.distributed.checkpoint``; this module
holds what both share (the format's names, the thread pool's run, byte views).

DCP keeps its planner, its metadata and its resharding; these two classes only move bytes.
:class:`~._storage_writer.FileSystemWriter` writes each rank's items into its file(s) with
positioned vectored writes (``os.pwritev``) from a small thread pool, so one rank's file fills from
several threads at once, and commits durably: every data file is written under a temporary name,
fsynced and renamed, the folder fsynced, and the ``.metadata`` file, the one that makes a
checkpoint look complete, is committed last (temporary name, fsync, atomic rename, folder fsync).
Saving over a committed checkpoint writes the new data files under fresh names, so a crash before
the new ``.metadata`` lands leaves the previous checkpoint whole; its files go once the new one is
committed. A rank never renames its files over names it was not given for this very save (DCP's
plan cache hands out an earlier save's), and saves into one folder that overlap in a process
(``dcp.async_save`` uploads) name their files apart and remove none of each other's.

On-disk format: DCP's folder layout and its pickled ``.metadata`` (DCP's own format, written as
DCP writes it), but a tensor item is its raw bytes (C order, the dtype of the metadata), not a
``torch.save`` pickle. Each such item's storage record carries the transform descriptor
:data:`RAW_DESCRIPTOR`, so DCP's own ``FileSystemReader`` refuses the files with
``ValueError: Unknown extension name='astage.raw@astage.compat.FileSystemReader'`` instead of
misreading them.

Writing while staging: when ``dcp.async_save`` stages through the writer, each staged tensor's
bytes go to the rank's data file (a temporary name) as soon as they land, from the writer's
threads, with the disk's writeback started at once; ``write_data`` maps the plan's items onto
those bytes only where an item's tensor is the very memory that was written (see
:class:`~._storage_writer._Prewrite`) and appends everything else.

:class:`~._storage_reader.FileSystemReader` reads both formats: raw items straight into their
destination (``os.preadv``, no copy when the destination is a matching CPU tensor), and items of
DCP's own checkpoints through DCP's reader. It unpickles ``.metadata`` with an allow-list of
DCP's metadata classes, so a crafted metadata file cannot run code. Bytes items (objects DCP
serialises with ``torch.save``) are DCP's business: written and read back as given.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any

import torch

from .._errors import (
    InvalidOptionsError,
)

RAW_DESCRIPTOR = "astage.raw@astage.compat.FileSystemReader/1"
"""Transform descriptor of a tensor item stored as its raw bytes."""

METADATA_NAME = ".metadata"
DATA_SUFFIX = ".distcp"
DEFAULT_THREADS = 4
MAX_OPEN_FILES = 64
"""Data files a writer or reader keeps open at once, at most: one file per item may mean
thousands, past the process's limit (1,024 by default on Linux)."""
DEFAULT_CHUNK_BYTES = 8 << 20  # one pwritev moves at most this much: the disk starts early


def run_all(pool: ThreadPoolExecutor, jobs: list[Callable[[], object]]) -> None:
    """Run ``jobs`` on ``pool``; on the first failure cancel what has not started, wait for
    what has (no thread may still use a descriptor the caller closes next), and raise it."""
    wait_all([pool.submit(job) for job in jobs])


def wait_all(futures: list[Future[Any]]) -> None:
    """Wait for every one of ``futures``; on the first failure cancel the rest, wait for those
    that had started, and raise it."""
    _, pending = wait(futures, return_when=FIRST_EXCEPTION)
    for future in pending:
        future.cancel()
    wait(futures)
    for future in futures:
        if not future.cancelled() and future.exception() is not None:
            raise future.exception()  # type: ignore[misc]


def bytes_of(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (keep ``tensor`` alive meanwhile)."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(bytearray())
    array = (ctypes.c_ubyte * nbytes).from_address(tensor.data_ptr())
    return memoryview(array).cast("B")


def holds_plain_bytes(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s memory holds its values as they are, in C order, on the CPU: what
    :func:`bytes_of` may read or fill. A conjugated or negated view's memory holds the values
    before the conjugation or negation (its bit applies them on every read)."""
    return (
        tensor.device.type == "cpu"
        and tensor.is_contiguous()
        and not tensor.is_conj()
        and not tensor.is_neg()
    )


def folder_path(name: str, value: object) -> str:
    """``value`` as the path of a checkpoint folder: a ``str`` or a path-like of one, not empty
    (an unset variable, most likely; DCP's writer would write into the working directory)."""
    if not isinstance(value, (str, os.PathLike)):
        raise InvalidOptionsError(f"{name} must be a str or os.PathLike, got {value!r}")
    path = os.fspath(value)
    if not isinstance(path, str):  # a path-like of bytes: every name joined to it is a str
        raise InvalidOptionsError(f"{name} must be a path of str, not {path!r}")
    if not path:
        raise InvalidOptionsError(f"{name} is empty: pass '.' for the working directory")
    return path


def boolean(name: str, value: object) -> bool:
    """``value`` if it is a bool: a string such as ``"False"`` is true, None is false, and
    either would turn an option on or off silently."""
    if not isinstance(value, bool):
        raise InvalidOptionsError(f"{name} must be True or False, got {value!r}")
    return value
