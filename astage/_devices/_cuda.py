"""The CUDA staging streams: ordering after the producer, enqueueing copies, completion events."""

from __future__ import annotations

import threading

import torch

from .._core._batches import Batch
from ._host import _pin


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
        non_blocking = self._non_blocking
        with torch.no_grad(), torch.cuda.stream(stream):
            _pin(batch)
            # One launch per copy either way; a plain loop keeps to copy_'s documented
            # cross-device semantics rather than relying on foreach's fallback.
            for dst, src in zip(batch.dsts, batch.srcs, strict=True):
                dst.copy_(src, non_blocking=non_blocking)
            done = torch.cuda.Event(blocking=True)  # a waiting thread sleeps instead of spinning
            done.record(stream)
        return done

    def synchronize(self) -> None:
        with self._lock:
            streams = list(self._streams.values())
        for stream in streams:
            stream.synchronize()
