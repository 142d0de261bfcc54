"""Shared-memory buffers (``share_memory=True``): a memfd where torch shares by descriptor.

The memfd is what makes them cheap (no ``fallocate`` of every page up front); what must not change
is that torch.multiprocessing hands them to another process as the same memory, not a copy.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Iterator

import pytest
import torch
import torch.multiprocessing as mp

from astage._core._cache import BufferCache

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="memfd and /proc are Linux's")


def _cache() -> BufferCache:
    return BufferCache(pin_memory=False, share_memory=True, pin_memory_min_bytes=0)


@pytest.fixture
def file_system_strategy() -> Iterator[None]:
    before = mp.get_sharing_strategy()
    mp.set_sharing_strategy("file_system")
    try:
        yield
    finally:
        mp.set_sharing_strategy(before)


@linux_only
@pytest.mark.parametrize("nbytes", [4, 3 << 20])
def test_shared_buffers_are_memfds(nbytes: int) -> None:
    assert mp.get_sharing_strategy() == "file_descriptor"
    buffer = _cache().allocate(torch.empty(nbytes, dtype=torch.uint8).untyped_storage())
    storage = buffer.storage
    assert storage.is_shared() and storage.nbytes() == nbytes
    fd, size = storage._share_fd_cpu_()
    assert size == nbytes
    assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:astage")


def test_shared_buffers_under_the_file_system_strategy(file_system_strategy: None) -> None:
    buffer = _cache().allocate(torch.empty(16).untyped_storage())
    assert buffer.storage.is_shared()
    buffer.storage._share_filename_cpu_()  # torch can name it: it allocated it


def _fill(queue: multiprocessing.SimpleQueue, done: multiprocessing.SimpleQueue) -> None:  # type: ignore[type-arg]
    tensor = queue.get()
    tensor.fill_(7)
    done.put(tensor.data_ptr())


@linux_only
def test_another_process_writes_into_the_same_memory() -> None:
    buffer = _cache().allocate(torch.empty(1024).untyped_storage())
    whole = buffer.as_bytes()
    whole.zero_()
    context = mp.get_context("fork")
    queue, done = context.SimpleQueue(), context.SimpleQueue()
    child = context.Process(target=_fill, args=(queue, done))
    child.start()
    try:
        queue.put(whole)
        done.get()
    finally:
        child.join(30)
    assert child.exitcode == 0
    assert bool((whole == 7).all())  # written over there, seen here: no copy was sent
