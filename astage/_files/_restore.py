"""Restore a checkpoint file into the tensors a state dict already has: ``load(path, into=...)``.

A restore does not build a second copy of the model in fresh tensors: it reads each entry the
state dict asks for straight into the memory of the tensor that is waiting for it.

1. **Match** (nothing written yet). The file's header and skeleton are checked as :func:`load`
   checks them, decoded with a placeholder (:class:`_Slot`) where each tensor is, and walked
   beside ``into``: same containers, same keys (or, with ``strict=False``, a subset of the
   file's), and at each tensor the same shape and dtype. A mismatch is a
   :class:`~astage.InvalidOptionsError` naming the path and the file before any byte of
   ``into`` changes (``into`` is the argument that does not fit; the file may be fine).
2. **Read.** The bytes of each wanted tensor are one range of the file (or, for a strided view
   the file stored inside a bigger storage, the span that view covers). A contiguous CPU
   destination is read with ``os.preadv`` directly into its memory, no intermediate copy; a
   device destination is read into a host buffer (pinned where the device has pinned memory)
   and copied with ``copy_(non_blocking=True)``; anything else (a non-contiguous destination, a
   strided source) goes through a host buffer and ``copy_``. Big tensors are cut into
   :data:`PIECE_BYTES` pieces, taken in the file's order. The first few are read and timed on
   the calling thread: from the page cache, the rest is a job each for :data:`READ_THREADS`
   threads, so a large file is read in parallel whatever its tensor sizes; from a disk (read
   slower than :data:`SEQUENTIAL_BELOW`), one thread reads the rest front to back, as the
   disk reads fastest (see :func:`_run`).
3. **Plain values** of ``into`` (numbers, strings, ``param_groups`` ...) are replaced by the
   file's, after every tensor landed; dicts and lists of ``into`` are updated in place, tuples
   rebuilt. The filled ``into`` is returned.

The reading threads are a plain thread pool, not anyio's: the same reader serves the blocking
:func:`astage.load`, which has no event loop. :func:`load_async` runs that reader in one anyio
worker thread and polls for cancellation while it waits for its pieces.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
import torch

from .._drivers._gc import gc_paused
from .._errors import InvalidOptionsError
from .._paths import Path
from .._torch import dense_strides, neg_view, storage_shortfall
from ._load import (
    Decoder,
    Header,
    Stored,
    abridged,
    load,
    load_device,
    open_checked,
    read_checked,
    skeleton_document,
)
from ._safetensors import METADATA_KEY, fs_path, read_exactly, tensor_memoryview
from ._skeleton import VIEW_DTYPES

READ_THREADS = 4
"""Threads that read one restore's pieces: enough to keep an NVMe queue busy, few enough to
leave the trainer's cores alone."""
PIECE_BYTES = 32 << 20
"""The most bytes one job reads: a 1 GiB tensor is 32 jobs, read in parallel."""
PROBE_BYTES = 8 << 20
"""The file's first pieces, at least this many bytes, are read on the calling thread and
timed, to tell a disk from the page cache (:func:`_run`)."""
PROBED_FROM_BYTES = 4 * PROBE_BYTES
"""Restores of fewer bytes are not probed: all their pieces go to the threads at once."""
SEQUENTIAL_BELOW = 2 << 30
"""Bytes per second under which the probe takes the file for one on a disk: the rest is then
read on one thread, front to back."""
_POLL_SECONDS = 0.05
"""How often :func:`load_async`'s waiting thread looks for a cancellation."""
BATCH_SHARE = 32
"""Jobs smaller than ``PIECE_BYTES // BATCH_SHARE`` (1 MiB) go to the threads together, in
the file's order, up to that many bytes (or :data:`BATCH_JOBS` jobs) at a time
(:func:`_batches`)."""
BATCH_JOBS = 1024
SMALL_JOB_SHARE = 512
"""Jobs of fewer bytes than ``PIECE_BYTES // SMALL_JOB_SHARE`` (64 KiB) on average are read on
one thread (:func:`_run`)."""


# Collections paused: the objects a load makes (a tensor and a few dicts per entry) set off
# full-heap collections, 100-165 ms each over 20,000 tensors beside a large live heap, which
# hold the GIL: from load_async's worker thread they stalled the event loop as long.
@gc_paused()
def restore(
    path: str | os.PathLike[str],
    into: Any,
    *,
    strict: bool = True,
    poll: Callable[[], None] | None = None,
) -> Any:
    """Fill ``into``'s tensors and plain values from the checkpoint file at ``path``.

    See :func:`astage.load` (``into=``) for the contract; ``poll`` is called while the pieces
    are read and may raise to stop the restore (cancellation, from :func:`load_async`).
    """
    name = fs_path(path, "path")
    fd, size = open_checked(name)
    try:
        header = read_checked(fd, name, size)
        document = skeleton_document(header.metadata, name)
        if METADATA_KEY not in header.metadata:  # a plain safetensors file: flat {key: tensor}
            file_tree: Any = {
                key: _Slot(entry, entry.dtype, tuple(entry.shape), None, 0)
                for key, entry in header.entries.items()
            }
        else:
            file_tree = _SlotDecoder(header.entries, name).decode(document)
        plan = _Plan(name, fd, header, strict)
        result = plan.match(into, file_tree, ())
        plan.read(poll)
    finally:
        os.close(fd)
    for apply in plan.updates:  # every tensor landed: now the plain values
        apply()
    return result


async def load_async(
    path: str | os.PathLike[str],
    *,
    into: Any = None,
    device: str | torch.device = "cpu",
    strict: bool = True,
    device_mesh: Any = None,
) -> Any:
    """:func:`astage.load` off the event loop: the file is read in worker threads.

    The same arguments and result as :func:`astage.load`. Cancelling it stops the restore
    between pieces: the pieces being read finish first (they write into ``into``'s tensors,
    which must not change after the call is gone), and ``into`` is then partly restored.
    """
    if into is None or load_device(device).type != "cpu":  # load refuses device= with into
        return await anyio.to_thread.run_sync(
            partial(load, path, device=device, into=into, device_mesh=device_mesh)
        )
    return await anyio.to_thread.run_sync(
        partial(restore, path, into, strict=strict, poll=anyio.from_thread.check_cancelled)
    )


# -- matching the file to ``into`` --------------------------------------------------------------


@dataclass(frozen=True)
class _Slot:
    """Where a tensor of the file lies: its entry and, for a view, how it sits in it."""

    entry: Stored
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...] | None
    """None for the whole entry (contiguous)."""
    offset: int
    """In elements of ``dtype``, from the start of the entry."""
    conj: bool = False
    neg: bool = False

    @property
    def contiguous(self) -> bool:
        """Its bytes are one range of the file, in the tensor's own order."""
        if self.conj or self.neg:
            return False
        return self.stride is None or _is_contiguous(self.shape, self.stride)

    @property
    def span(self) -> tuple[int, int]:
        """The bytes it covers, from the start of its entry: ``(begin, end)``."""
        itemsize = self.dtype.itemsize
        begin = self.offset * itemsize
        if 0 in self.shape:
            return begin, begin
        stride = self.stride if self.stride is not None else dense_strides(self.shape)
        last = sum((size - 1) * step for size, step in zip(self.shape, stride, strict=True))
        return begin, begin + (last + 1) * itemsize


@dataclass(frozen=True)
class _ArraySlot:
    """A numpy array of the file, read only when ``into`` takes it as a plain value."""

    node: dict[str, Any]
    entry: Stored


class _SlotDecoder(Decoder):
    """The skeleton with every field checked, placeholders where tensors and arrays are."""

    def __init__(self, entries: dict[str, Stored], name: str) -> None:
        super().__init__(entries, None, name, None)

    def decode_other(self, node: dict[str, Any]) -> Any:
        if "tensor" in node:
            self._tensor(node)  # checks each field and the view against its entry
            entry = self._entries[node["tensor"]]
            if "dtype" not in node:
                return _Slot(entry, entry.dtype, tuple(entry.shape), None, 0)
            return _Slot(
                entry,
                VIEW_DTYPES[node["dtype"]],
                tuple(node["shape"]),
                tuple(node["stride"]),
                node["offset"],
                node.get("conj", False),
                node.get("neg", False),
            )
        if "numpy" in node:
            self._array(node)
            return _ArraySlot(node, self._entries[node["numpy"]])
        if "dtensor" in node:
            raise InvalidOptionsError(
                f"the file holds a DTensor here ({self._name}); load(into=...) restores plain "
                "tensors: load it with astage.load(path, device_mesh=...) instead",
                self.path,
            )
        raise self.bad(node)


@dataclass
class _Fill:
    """One destination tensor and the file's tensor that goes into it."""

    tensor: torch.Tensor
    slot: _Slot
    path: Path


@dataclass
class _Plan:
    name: str
    fd: int
    header: Header
    strict: bool
    fills: list[_Fill] = field(default_factory=list)
    updates: list[Callable[[], None]] = field(default_factory=list)
    _filled: dict[int, _Slot] = field(default_factory=dict)

    def mismatch(self, path: Path, problem: str) -> InvalidOptionsError:
        return InvalidOptionsError(f"{problem} (restoring from {self.name})", path)

    def match(self, into: Any, stored: Any, path: Path) -> Any:
        """Check ``stored`` (the file's value at ``path``) against ``into``'s; plan the fills.

        Returns the value ``into`` has at ``path`` after the restore.
        """
        if isinstance(into, torch.Tensor):
            self._tensor(into, stored, path)
            return into
        if isinstance(into, dict):
            if not isinstance(stored, dict):
                raise self.mismatch(path, f"`into` holds a dict, the file {_what(stored)}")
            file_keys = self._keys(into, stored, path)
            for key, value in into.items():
                new = self.match(value, stored[file_keys[id(key)]], (*path, key))
                if new is not value:
                    self.updates.append(partial(into.__setitem__, key, new))
            extra = getattr(stored, "_metadata", None)
            if extra is not None and hasattr(into, "__dict__"):
                # The file's OrderedDict _metadata (module versions, which load_state_dict
                # hands to _load_from_state_dict) is a plain value: the file's wins, as
                # load() returns it. A plain dict of `into` takes no attribute: kept as is.
                self.updates.append(partial(setattr, into, "_metadata", extra))
            return into
        if type(into) in (list, tuple) and _holds_tensor(into):
            if type(stored) not in (list, tuple) or len(stored) != len(into):
                kind = type(into).__name__
                raise self.mismatch(
                    path, f"`into` holds a {kind} of {len(into)}, the file {_what(stored)}"
                )
            values = [
                self.match(v, s, (*path, i))
                for i, (v, s) in enumerate(zip(into, stored, strict=True))
            ]
            if type(into) is tuple:
                return tuple(values)
            for i, (old, new) in enumerate(zip(into, values, strict=True)):
                if new is not old:
                    self.updates.append(partial(into.__setitem__, i, new))
            return into
        # A plain value (a list or tuple without tensors too: ``params: [0, 1]`` may change
        # length): the file's replaces it, and must not hide a tensor.
        return self._plain(stored, path)

    def _keys(self, into: dict[Any, Any], stored: dict[Any, Any], path: Path) -> dict[int, Any]:
        """The file's key for each key of ``into`` (by ``id``), or a mismatch.

        A NaN key equals no other, not even the file's NaN (a fresh float object): the NaN
        keys of ``into`` take the file's NaN keys in their order, as the file was saved.
        """
        file_nans = iter([key for key in stored if _is_nan(key)])
        found: dict[int, Any] = {}
        missing = []
        for key in into:
            if _is_nan(key):
                file_key = next(file_nans, _NO_KEY)
            else:
                file_key = key if key in stored else _NO_KEY
            if file_key is _NO_KEY:
                missing.append(key)
            found[id(key)] = file_key
        if missing:
            raise self.mismatch(
                path, f"the file has no {_keys_shown(missing)} that `into` holds here"
            )
        if self.strict:
            taken = {id(key) for key in found.values()}
            unexpected = [key for key in stored if id(key) not in taken and key not in into]
            if unexpected:
                raise self.mismatch(
                    path,
                    f"the file holds {_keys_shown(unexpected)} that `into` does not; pass "
                    "strict=False to restore only what `into` holds",
                )
        return found

    def _tensor(self, tensor: torch.Tensor, stored: Any, path: Path) -> None:
        if not isinstance(stored, _Slot):
            raise self.mismatch(path, f"`into` holds a tensor, the file {_what(stored)}")
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
            raise InvalidOptionsError(
                f"cannot restore into a {type(tensor).__qualname__}; restore into its plain "
                "tensors",
                path,
            )
        if tensor.is_nested:  # strided layout, but no sizes: tensor.shape is a raw RuntimeError
            raise InvalidOptionsError(
                "cannot restore into a nested tensor; restore into its plain tensors", path
            )
        if tensor.layout is not torch.strided or tensor.device.type == "meta":
            raise InvalidOptionsError(
                f"cannot restore into a {tensor.layout} tensor on {tensor.device}: it must be "
                "a strided tensor with memory",
                path,
            )
        if tuple(tensor.shape) != stored.shape or tensor.dtype != stored.dtype:
            raise self.mismatch(
                path,
                f"`into` holds a {_dtype_name(tensor.dtype)} tensor of shape "
                f"{list(tensor.shape)}, the file a {_dtype_name(stored.dtype)} tensor of shape "
                f"{list(stored.shape)}",
            )
        if tensor.numel() and any(  # with no element, nothing shares memory
            step == 0 and size > 1 for size, step in zip(tensor.shape, tensor.stride(), strict=True)
        ):
            raise InvalidOptionsError(
                "cannot restore into an expanded tensor (several elements share one memory "
                "location)",
                path,
            )
        shortfall = storage_shortfall(tensor)
        if shortfall is not None:
            raise InvalidOptionsError(f"cannot restore into a tensor that {shortfall}", path)
        seen = self._filled.get(id(tensor))
        if seen is not None and seen == stored:  # a tied tensor: its bytes are read once
            return
        self._filled[id(tensor)] = stored
        self.fills.append(_Fill(tensor, stored, path))

    def _plain(self, stored: Any, path: Path) -> Any:
        if isinstance(stored, _Slot):
            raise self.mismatch(path, "the file holds a tensor where `into` holds a plain value")
        if isinstance(stored, _ArraySlot):
            return self._array(stored)
        if type(stored) in (list, tuple) or isinstance(stored, dict):
            items = stored.items() if isinstance(stored, dict) else enumerate(stored)
            new = {key: self._plain(value, (*path, key)) for key, value in items}
            if isinstance(stored, dict):
                stored.update(new)
                return stored
            values = list(new.values())
            return values if type(stored) is list else tuple(values)
        return stored

    def _array(self, slot: _ArraySlot) -> Any:
        data = torch.empty((slot.entry.nbytes,), dtype=torch.uint8, device="cpu")
        at = self._at(slot.entry, 0)
        read_exactly(self.fd, tensor_memoryview(data), at, self.name, slot.entry.key)
        decoder = Decoder(self.header.entries, {slot.entry.key: data}, self.name, None)
        return decoder._array(slot.node)

    def _at(self, entry: Stored, begin: int) -> int:
        return self.header.data_start + entry.begin + begin

    # -- reading ------------------------------------------------------------------------------

    def read(self, poll: Callable[[], None] | None) -> None:
        # In the file's order, which need not be the state dict's (the writer may place
        # entries otherwise): read on one thread (see _run), the disk sees one stream.
        jobs = sorted((job for fill in self.fills for job in self._jobs(fill)), key=_file_offset)
        devices = {fill.tensor.device for fill in self.fills if fill.tensor.device.type != "cpu"}
        _run(jobs, poll)
        for device in devices:  # the non-blocking copies have landed before we return
            _synchronize(device)

    def _jobs(self, fill: _Fill) -> Iterator[_Job]:
        tensor, slot = fill.tensor, fill.slot
        begin, end = slot.span
        start = self._at(slot.entry, begin)
        if begin == end:
            return
        if slot.contiguous and _plain_memory(tensor):
            on_cpu = _host_memory(tensor)
            # as_strided, not reshape(-1): a contiguous tensor's size-1 dimension may have
            # any stride (shape (1,), stride (2,) from t[::2]), which reshape keeps and view
            # then refuses (a raw RuntimeError).
            flat = tensor.detach().as_strided((tensor.numel(),), (1,))
            destination = flat.view(torch.uint8)
            pinned = not on_cpu and _pins(tensor.device)
            for offset in range(0, end - begin, PIECE_BYTES):
                piece = destination[offset : offset + PIECE_BYTES]
                at = start + offset
                if on_cpu:
                    read = partial(self._read_direct, piece, at, slot.entry.key)
                    yield _Job(at, piece.numel(), read)
                else:
                    read = partial(self._read_staged, fill, piece, at, pinned, None)
                    yield _Job(at, piece.numel(), read)
            return
        read = partial(self._read_staged, fill, tensor, start, _pins(tensor.device), slot)
        yield _Job(start, end - begin, read)

    def _read_direct(self, piece: torch.Tensor, offset: int, entry: str) -> None:
        read_exactly(self.fd, tensor_memoryview(piece), offset, self.name, entry)

    def _read_staged(
        self,
        fill: _Fill,
        destination: torch.Tensor,
        offset: int,
        pinned: bool,
        slot: _Slot | None,
    ) -> None:
        """Read into a host buffer, then copy into ``destination``.

        With ``slot`` None, ``destination`` is a byte range of a contiguous tensor; otherwise
        it is the whole tensor and the buffer holds ``slot``'s span, viewed as ``slot`` says.
        """
        nbytes = destination.numel() if slot is None else slot.span[1] - slot.span[0]
        buffer = torch.empty((nbytes,), dtype=torch.uint8, device="cpu", pin_memory=pinned)
        read_exactly(self.fd, tensor_memoryview(buffer), offset, self.name, fill.slot.entry.key)
        source = buffer
        if slot is not None:
            stride = slot.stride if slot.stride is not None else dense_strides(slot.shape)
            source = torch.empty((0,), dtype=slot.dtype, device="cpu").set_(
                buffer.untyped_storage(), 0, slot.shape, stride
            )
            if slot.conj:
                source = source.conj()
            if slot.neg:
                source = neg_view(source)
        try:
            with torch.no_grad():
                # Pinned: the copy runs on the device's stream, and torch's pinned-memory
                # cache keeps the buffer until it has (it records the copy on the block).
                destination.copy_(source, non_blocking=pinned)
        except RuntimeError as error:
            raise InvalidOptionsError(f"cannot copy into this tensor: {error}", fill.path) from None


@dataclass(frozen=True)
class _Job:
    """One read of the restore: ``nbytes`` of the file from ``offset``, and where they go."""

    offset: int
    nbytes: int
    run: Callable[[], None]


def _file_offset(job: _Job) -> int:
    return job.offset


def _run(jobs: list[_Job], poll: Callable[[], None] | None) -> None:
    """Run ``jobs`` (in the file's order) on :data:`READ_THREADS` threads, or on one where the
    file comes from a disk or the jobs are small (:data:`SMALL_JOB_SHARE`); the
    first error stops the rest.

    Why one thread from a disk: pieces read by four threads at once reach the disk as four
    streams at four places of the file. On this project's VM disk, a cold restore of 1 GiB
    took 1,067 ms that way and 927 ms on one thread front to back, as long as the file read
    alone (907 ms; medians of 8 rounds in turns, one thread faster in 7), while from the page
    cache, where a read is a memory copy, four threads took 178 ms and one 327 ms. So the
    first pieces (:data:`PROBE_BYTES`) are read and timed on the calling thread, and the rest
    goes to one thread if they came in slower than :data:`SEQUENTIAL_BELOW`, else to all.
    """
    if not jobs:
        return
    if len(jobs) == 1 and poll is None:
        jobs[0].run()
        return
    threads = READ_THREADS
    total = sum(job.nbytes for job in jobs)
    if total >= PROBED_FROM_BYTES:
        probed, nbytes = 0, 0
        started = time.perf_counter()
        while nbytes < PROBE_BYTES:
            jobs[probed].run()
            nbytes += jobs[probed].nbytes
            probed += 1
        if nbytes < SEQUENTIAL_BELOW * (time.perf_counter() - started):
            threads = 1
        jobs = jobs[probed:]
        total -= nbytes
        if poll is not None:
            poll()
    if total < len(jobs) * (PIECE_BYTES // SMALL_JOB_SHARE):
        # Small pieces cost Python per piece, under the GIL: more threads only take turns
        # at it (20,000 small tensors: 690-718 ms on four, 620-653 ms on one).
        threads = 1
    stop = threading.Event()
    batches = list(_batches(jobs))

    def guarded(batch: list[_Job]) -> None:
        for job in batch:
            if stop.is_set():
                return
            job.run()

    with concurrent.futures.ThreadPoolExecutor(
        max_workers=min(threads, max(1, len(batches))), thread_name_prefix="astage-restore"
    ) as pool:
        # One worker takes them in order: the pool's queue is first in, first out.
        pending = {pool.submit(guarded, batch) for batch in batches}
        try:
            while pending:
                done, pending = concurrent.futures.wait(
                    pending,
                    timeout=_POLL_SECONDS if poll is not None else None,
                    return_when=concurrent.futures.FIRST_EXCEPTION,
                )
                for future in done:
                    future.result()  # raises the job's error
                if poll is not None:
                    poll()
        finally:
            # On an error or a cancellation: start nothing new, and leave only once the
            # pieces being read are done (the pool's exit waits for them).
            stop.set()


def _batches(jobs: list[_Job]) -> Iterator[list[_Job]]:
    """``jobs`` in runs for one thread each, in order: a large job alone, small ones together.

    Why: a job a future of its own cost the pool's hand-over (~30 us) per small tensor; a
    restore of 20,000 small optimizer tensors took 0.95 s, where load() of the same file
    took 0.26 s.
    """
    most = PIECE_BYTES // BATCH_SHARE
    batch: list[_Job] = []
    nbytes = 0
    for job in jobs:
        if job.nbytes >= most:
            if batch:
                yield batch
                batch, nbytes = [], 0
            yield [job]
            continue
        batch.append(job)
        nbytes += job.nbytes
        if nbytes >= most or len(batch) >= BATCH_JOBS:
            yield batch
            batch, nbytes = [], 0
    if batch:
        yield batch


def _host_memory(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s memory is this process's, for ``preadv`` to write into."""
    return tensor.device.type == "cpu"


def _plain_memory(tensor: torch.Tensor) -> bool:
    """Its bytes, in order, are its values: a byte-wise write fills it (no conj or neg bit)."""
    return tensor.is_contiguous() and not tensor.is_conj() and not tensor.is_neg()


def _pins(device: torch.device) -> bool:
    """Whether host buffers for copies to ``device`` should be pinned."""
    if device.type == "cpu":
        return False
    accelerator = torch.accelerator.current_accelerator()
    return accelerator is not None and accelerator.type == device.type


def _synchronize(device: torch.device) -> None:
    module = getattr(torch, device.type, None)
    synchronize = getattr(module, "synchronize", None)
    if callable(synchronize):
        synchronize(device)


_NO_KEY = object()


def _is_nan(key: Any) -> bool:
    return type(key) is float and math.isnan(key)


def _is_contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = 1
    for size, step in zip(reversed(shape), reversed(stride), strict=True):
        if size != 1 and step != expected:
            return False
        expected *= size
    return True


def _holds_tensor(tree: Any) -> bool:
    if isinstance(tree, torch.Tensor):
        return True
    if isinstance(tree, dict):
        return any(_holds_tensor(value) for value in tree.values())
    if type(tree) in (list, tuple):
        return any(_holds_tensor(value) for value in tree)
    return False


def _what(stored: Any) -> str:
    if isinstance(stored, _Slot):
        return "holds a tensor"
    if isinstance(stored, _ArraySlot):
        return "holds a numpy array"
    if type(stored) in (list, tuple):
        return f"holds a {type(stored).__name__} of {len(stored)}"
    return f"holds a {type(stored).__name__}"


def _keys_shown(keys: list[Any], limit: int = 3) -> str:
    shown = ", ".join(abridged(key) for key in keys[:limit])
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"key{'s' if len(keys) > 1 else ''} {shown}{more}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
