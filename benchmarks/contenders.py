"""The stagers under test behind one small interface, so every scenario treats them alike.

A contender is started (a fresh stager, empty cache), staged into any number of times (each call
returns its wall time; the first call allocates, later ones reuse), and stopped (its buffers
freed). Async contenders run on the benchmark's one event loop
(:class:`~benchmarks.runner.LoopRunner`), where DCP's ``DefaultStager`` future is awaited the way
an async program awaits it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.distributed.checkpoint import staging as dcp_staging
from torch.distributed.checkpoint._state_dict_stager import StateDictStager

import astage

from .futures import wait_future
from .runner import LoopRunner
from .timing import timed, timed_async

# torch's intra-op thread count as the process started. torch.set_num_threads() called in any
# thread changes the default that threads created later start with; restoring it before each
# contender starts keeps one contender's setting from leaking into the next one's threads.
INTRAOP_THREADS = torch.get_num_threads()


def restore_intraop_threads() -> None:
    """Give torch's intra-op pool the thread count the process started with."""
    torch.set_num_threads(INTRAOP_THREADS)


class Contender:
    """A stager under test: :meth:`start` it, :meth:`stage` into it (timed), :meth:`stop` it."""

    name = "?"
    family = "?"  # "astage", "DCP" or "plain": how the report groups and colours it

    def start(self) -> None:
        """A fresh stager with an empty cache."""
        raise NotImplementedError

    def stage(self, state_dict: Any) -> float:
        """Stage ``state_dict`` once; the call's wall time in seconds."""
        raise NotImplementedError

    def stop(self) -> None:
        """Close the stager and free its buffers."""
        raise NotImplementedError

    def reserve(self, state_dict: Any) -> float:
        """Reserve the buffers ``state_dict`` needs ahead of the first call; its wall time."""
        raise NotImplementedError(f"{self.name} has no reserve()")

    def new_nbytes(self) -> int | None:
        """Host bytes the last call allocated, where the stager reports it."""
        return None


class AstageSync(Contender):
    """astage's blocking face, ``SyncStager.stage``, called from the scenario's thread."""

    name = "astage SyncStager"
    family = "astage"

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._stager: astage.SyncStager | None = None

    def start(self) -> None:
        self._stager = astage.SyncStager(**self._options)

    def stage(self, state_dict: Any) -> float:
        stager = self._stager
        assert stager is not None
        return timed(lambda: stager.stage(state_dict))

    def reserve(self, state_dict: Any) -> float:
        stager = self._stager
        assert stager is not None
        return timed(lambda: stager.reserve(state_dict))

    def stop(self) -> None:
        if self._stager is not None:
            self._stager.close()
            self._stager = None

    def new_nbytes(self) -> int | None:
        stats = self._stager.last_stats if self._stager is not None else None
        return None if stats is None else stats.new_nbytes


class AstageAsync(Contender):
    """astage's async face, ``await Stager.stage``, on the run's event loop."""

    name = "astage Stager (async)"
    family = "astage"

    def __init__(self, runner: LoopRunner, **options: Any) -> None:
        self._runner = runner
        self._options = options
        self.stager: astage.Stager | None = None

    def start(self) -> None:
        self.stager = astage.Stager(**self._options)

    def stage(self, state_dict: Any) -> float:
        stager = self.stager
        assert stager is not None
        return self._runner.run(timed_async(lambda: stager.stage(state_dict)))

    def reserve(self, state_dict: Any) -> float:
        stager = self.stager
        assert stager is not None
        return self._runner.run(timed_async(lambda: stager.reserve(state_dict)))

    def stop(self) -> None:
        if self.stager is not None:
            self._runner.run(self.stager.aclose())
            self.stager = None

    def new_nbytes(self) -> int | None:
        stats = self.stager.last_stats if self.stager is not None else None
        return None if stats is None else stats.new_nbytes


class DcpStateDictStager(Contender):
    """DCP's synchronous core, ``StateDictStager.stage``: the deep copy with a storage cache."""

    name = "DCP StateDictStager"
    family = "DCP"

    def __init__(self, pin_memory: bool = False) -> None:
        self._pin_memory = pin_memory
        self._stager: StateDictStager | None = None

    def start(self) -> None:
        self._stager = StateDictStager(pin_memory=self._pin_memory)

    def stage(self, state_dict: Any) -> float:
        stager = self._stager
        assert stager is not None
        return timed(lambda: stager.stage(state_dict))

    def stop(self) -> None:
        if self._stager is not None:
            self._stager.close()
            self._stager = None


def dcp_default_options(cuda: bool) -> dcp_staging.StagingOptions:
    """DefaultStager's options: its background thread always; pinned, non-blocking on a GPU."""
    return dcp_staging.StagingOptions(
        use_pinned_memory=cuda,
        use_shared_memory=False,
        use_async_staging=True,
        use_non_blocking_copy=cuda,
    )


def dcp_default_stager(options: dcp_staging.StagingOptions) -> dcp_staging.DefaultStager:
    """DCP's ``DefaultStager``, its cache kept from one call to the next until it is closed.

    torch 2.11's ``DefaultStager`` closes its ``StateDictStager`` at the end of every call: the
    cache is dropped, and the next call fails (``KeyError: <class 'type'>``, its deep-copy table
    cleared), as a GPU run of this benchmark found. Later torch (2.13 here) dropped that close.
    The benchmark measures DCP's design as torch now ships it: a close from inside a call is
    skipped, and ``DefaultStager.close()`` still closes the cache (on every torch version).
    """
    stager = dcp_staging.DefaultStager(options)
    inner = getattr(stager, "_state_dict_stager", None)
    if inner is None:
        return stager
    close_cache = inner.close
    close_executor = stager.close

    def close_stager() -> None:
        close_executor()
        close_cache()

    inner.close = lambda: None
    stager.close = close_stager  # type: ignore[method-assign]
    return stager


class DcpDefaultStager(Contender):
    """DCP's ``DefaultStager`` staging in its thread; its future awaited from the event loop."""

    name = "DCP DefaultStager (thread)"
    family = "DCP"

    def __init__(self, runner: LoopRunner, cuda: bool = False) -> None:
        self._runner = runner
        self._options = dcp_default_options(cuda)
        self.stager: dcp_staging.DefaultStager | None = None

    def start(self) -> None:
        self.stager = dcp_default_stager(self._options)

    async def stage_async(self, state_dict: Any) -> Any:
        stager = self.stager
        assert stager is not None
        future = stager.stage(state_dict)
        assert not isinstance(future, dict)
        return await wait_future(future)

    def stage(self, state_dict: Any) -> float:
        return self._runner.run(timed_async(lambda: self.stage_async(state_dict)))

    def stop(self) -> None:
        if self.stager is not None:
            self.stager.close()
            self.stager = None


class PlainCopy(Contender):
    """The same bytes copied tensor by tensor into preallocated twins: the bandwidth ceiling.

    The first call allocates the twins (``torch.empty_like``) and copies; later calls only copy.
    It rebuilds no structure and keeps no aliasing, so it is a floor for the time, not a stager.
    """

    family = "plain"

    def __init__(self, tensors: Sequence[torch.Tensor], foreach: bool = False) -> None:
        self._sources = list(tensors)
        self._foreach = foreach
        self._targets: list[torch.Tensor] | None = None
        self.name = "plain torch._foreach_copy_" if foreach else "plain dst.copy_(src)"

    def start(self) -> None:
        self._targets = None

    def _copy(self) -> None:
        targets = self._targets
        if targets is None:
            targets = self._targets = [torch.empty_like(src) for src in self._sources]
        if self._foreach:
            torch._foreach_copy_(targets, self._sources)
        else:
            for dst, src in zip(targets, self._sources, strict=True):
                dst.copy_(src)

    def stage(self, state_dict: Any) -> float:
        return timed(self._copy)

    def touch_targets(self) -> None:
        """Write the twins (zeros), untimed, leaving the sources as they are."""
        for target in self._targets or ():
            target.zero_()

    def stop(self) -> None:
        self._targets = None


def flat_tensors(state_dict: Any) -> list[torch.Tensor]:
    """Every tensor of a nested state dict, in traversal order (shared ones once)."""
    found: list[torch.Tensor] = []
    seen: set[int] = set()
    stack = [state_dict]
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            if id(obj) not in seen:
                seen.add(id(obj))
                found.append(obj)
        elif isinstance(obj, dict):
            stack.extend(reversed(list(obj.values())))
        elif isinstance(obj, (list, tuple)):
            stack.extend(reversed(obj))
    return found
