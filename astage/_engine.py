"""Copy engines: turn a plan's copies into bounded batches and execute them.

A batch is either many small copies (one ``torch._foreach_copy_`` call, which drops the GIL for
the whole list) or one slice of a large copy, so no single task moves more than ``chunk_bytes``.
Host batches run synchronously wherever they are called (a worker thread under the async
driver, the caller's thread under the sync driver). CUDA batches are enqueued on a staging
stream of their device and return a completion event; the CUDA-specific code is the
:class:`CudaStreams` class and nothing else.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import torch

from ._plan import Copy

MAX_BATCH_COPIES = 2048  # small copies per foreach call: bounds the time one task takes


class Batch:
    """A unit of copy work: small whole copies, or one slice of a large copy."""

    __slots__ = ("buffers", "device", "dsts", "end", "nbytes", "srcs")

    def __init__(self, device: torch.device, end: int) -> None:
        self.device = device
        self.srcs: list[torch.Tensor] = []
        self.dsts: list[torch.Tensor] = []
        self.buffers: list[object] = []
        self.nbytes = 0
        self.end = end
        """Copies ``[0, end)`` of the plan are complete once this batch and all before it are."""


def make_batches(copies: list[Copy], start: int, stop: int, chunk_bytes: int) -> Iterator[Batch]:
    """Split ``copies[start:stop]`` into batches of at most about ``chunk_bytes`` each."""
    batch: Batch | None = None
    for index in range(start, stop):
        copy = copies[index]
        if copy.nbytes >= chunk_bytes:
            if batch is not None:
                yield batch
                batch = None
            yield from _slices(copy, index, chunk_bytes)
            continue
        if batch is not None and (
            batch.device != copy.device
            or batch.nbytes + copy.nbytes > chunk_bytes
            or len(batch.srcs) >= MAX_BATCH_COPIES
        ):
            yield batch
            batch = None
        if batch is None:
            batch = Batch(copy.device, index + 1)
        batch.srcs.append(copy.src)
        batch.dsts.append(copy.dst)
        batch.buffers.append(copy.buffer)
        batch.nbytes += copy.nbytes
        batch.end = index + 1
    if batch is not None:
        yield batch


def _slices(copy: Copy, index: int, chunk_bytes: int) -> Iterator[Batch]:
    src = copy.src.view(-1)
    dst = copy.dst.view(-1)
    step = max(1, chunk_bytes // src.element_size())
    total = src.numel()
    for begin in range(0, total, step):
        end = min(begin + step, total)
        batch = Batch(copy.device, index + 1 if end == total else index)
        batch.srcs.append(src[begin:end])
        batch.dsts.append(dst[begin:end])
        batch.buffers.append(copy.buffer)
        batch.nbytes = (end - begin) * src.element_size()
        yield batch


def _pin(batch: Batch) -> None:
    for buffer in batch.buffers:
        buffer.ensure_pinned()  # type: ignore[attr-defined]


def run_host_batch(batch: Batch) -> None:
    """Copy a batch whose sources are not CUDA tensors; returns when the bytes have landed."""
    with torch.no_grad():
        _pin(batch)
        if len(batch.srcs) == 1:
            batch.dsts[0].copy_(batch.srcs[0])
        else:
            torch._foreach_copy_(batch.dsts, batch.srcs)


class CudaStreams:
    """One staging stream per CUDA device, and the two operations astage performs on it."""

    def __init__(self, non_blocking: bool) -> None:
        self._non_blocking = non_blocking
        self._streams: dict[int, torch.cuda.Stream] = {}
        self._lock = threading.Lock()

    def stream(self, device: torch.device) -> torch.cuda.Stream:
        index = device.index if device.index is not None else torch.cuda.current_device()
        with self._lock:
            stream = self._streams.get(index)
            if stream is None:
                stream = self._streams[index] = torch.cuda.Stream(device=index)
            return stream

    def follow_producer(self, device: torch.device) -> None:
        """Order the staging stream after all work queued so far on the caller's current stream.

        Must run in the thread that called stage(): the current stream is per thread.
        """
        producer = torch.cuda.current_stream(device)
        ready = torch.cuda.Event()
        ready.record(producer)
        self.stream(device).wait_event(ready)

    def enqueue(self, batch: Batch) -> torch.cuda.Event:
        """Enqueue the batch's device-to-host copies; the returned event marks their completion.

        The plan keeps the source tensors alive until that event has completed, so the caching
        allocator cannot hand their memory to another tensor while the copy still reads it.
        """
        stream = self.stream(batch.device)
        with torch.no_grad(), torch.cuda.stream(stream):
            _pin(batch)
            torch._foreach_copy_(batch.dsts, batch.srcs, non_blocking=self._non_blocking)
            done = torch.cuda.Event(blocking=True)  # a waiting thread sleeps instead of spinning
            done.record(stream)
        return done

    def synchronize(self) -> None:
        with self._lock:
            streams = list(self._streams.values())
        for stream in streams:
            stream.synchronize()
