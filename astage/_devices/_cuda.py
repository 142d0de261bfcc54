"""What CUDA specialises in the generic device backend, and nothing else.

- Completion events are ``torch.cuda.Event(blocking=True)``: a thread waiting on one sleeps
  instead of spinning a core (``torch.Event`` has no working blocking flag).
- Host buffers of CUDA sources are pinned (``pins_host_memory``): exactly, with
  ``cudaHostRegister``, before the first copy into them, in the thread that enqueues, with the
  device selected (:func:`~astage._devices._backend.enqueue_batch` and ``_pinning``).
- Streams and events are ``torch.cuda`` ones, and capture is ``torch.cuda``'s check.
- The host slabs of gathered batches (:mod:`astage._devices._gather`) are page-locked, from
  torch's caching host allocator, allocated in the enqueuing thread with the device selected.

The staging stream is ``torch.cuda.Stream(device=...)``, which PyTorch takes round-robin from
its pool of 32 streams per device and priority, also used by NCCL's process groups and by anyone
calling ``torch.cuda.Stream()``. Aliasing one of them is safe (a stream shared with other work
only adds ordering: our copies may queue behind another user's work, or theirs behind ours;
events recorded before a wait cannot deadlock) but may cost throughput when a collective and a
large copy meet on one stream. A stream of astage's own needs ``cudaStreamCreateWithFlags``
(``cudaStreamNonBlocking``: a plain ``cudaStreamCreate`` stream would serialise with the legacy
default stream, and so with training) wrapped in ``torch.cuda.ExternalStream``; torch's
``cudart()`` bindings lack it, so it is left for a wrapper in ``astage/_torch.py`` once it can
be measured on a GPU. Ran on one H200 (docs/benchmarks-gpu.md); the shared stream was kept.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from ._gather import pageable_slab, pinned_slab
from ._generic import GenericBackend


class CudaBackend(GenericBackend):
    """The generic backend with CUDA's blocking-sync events, pinning and capture check."""

    def __init__(self) -> None:
        super().__init__("cuda")

    def _new_stream(self, device: torch.device) -> Any:
        return torch.cuda.Stream(device=device)

    def _current_stream(self, device: torch.device) -> Any:
        return torch.cuda.current_stream(device)

    def _record_done(self, stream: Any) -> Any:
        done = torch.cuda.Event(blocking=True)  # a waiting thread sleeps instead of spinning
        done.record(stream)
        return done

    def _wait(self, stream: Any, event: Any) -> None:
        if isinstance(event, torch.cuda.Event):
            stream.wait_event(event)
        else:  # a torch.Event from after=: wait through the generic view of the same stream
            torch.Stream(
                stream_id=stream.stream_id,
                device_index=stream.device_index,
                device_type=stream.device_type,
            ).wait_event(event)

    def _use_stream(self, stream: Any) -> contextlib.AbstractContextManager[Any]:
        return torch.cuda.stream(stream)

    def _allocate_slab(self, nbytes: int) -> torch.Tensor:
        try:
            return pinned_slab(nbytes)  # the one transfer of a gathered batch at full link speed
        # torch's host allocator raises RuntimeError when cudaHostAlloc is refused (page-locked
        # memory exhausted). Page-locking only speeds the transfer up, as with a buffer's pin
        # (_pinning.register): the slab is pageable then, and the copy into it still correct
        # (CUDA returns from a device-to-host copy into pageable memory once it has landed;
        # the generic backend's slabs are such). Raised, it failed the call, and every later
        # call that gathered a batch needing a new slab.
        except (RuntimeError, MemoryError) as error:
            warnings.warn(
                f"page-locked host memory for a {nbytes}-byte slab of small device tensors was "
                f"refused ({type(error).__name__}: {error}); the slab is pageable (its "
                "device-to-host copy is slower).",
                RuntimeWarning,
                stacklevel=2,
            )
            return pageable_slab(nbytes)

    def _is_stream(self, item: object) -> bool:
        return isinstance(item, (torch.cuda.Stream, torch.Stream))

    def _is_event(self, item: object) -> bool:
        return isinstance(item, (torch.cuda.Event, torch.Event))

    @contextlib.contextmanager
    def selected(self, device: torch.device) -> Iterator[None]:
        with torch.cuda.device(device):
            yield

    def pins_host_memory(self, device: torch.device) -> bool:
        """CUDA's device-to-host copies run at full link speed only into page-locked memory."""
        return True

    def current_device(self) -> torch.device | None:
        # CUDA tensors exist only once CUDA is initialized, and current_device() would
        # initialize it (a context on device 0) otherwise.
        if not torch.cuda.is_initialized():
            return None
        return torch.device("cuda", torch.cuda.current_device())

    def is_capturing(self, device: torch.device) -> bool:
        with torch.cuda.device(device):
            return bool(torch.cuda.is_current_stream_capturing())
