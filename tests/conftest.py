"""Shared fixtures and helpers for the astage test suite.

* Async tests (``@pytest.mark.asyncio``) run once on asyncio's default loop and once on uvloop,
  through pytest-asyncio's ``pytest_asyncio_loop_factories`` hook (pytest-asyncio >= 1.3; the
  older way, overriding ``event_loop_policy``, is deprecated there).
* Tests marked ``@pytest.mark.cuda`` are skipped when CUDA is not available.
* ``stager`` / ``make_stager`` give a blocking view of every driver (SyncStager, and Stager on
  asyncio and on uvloop), so the semantics tests run against each of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import torch
import uvloop

import astage

LOOP_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}

HAS_CUDA = torch.cuda.is_available()


# -- pytest hooks -------------------------------------------------------------------------------


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """Every ``@pytest.mark.asyncio`` test runs on both event loops."""
    return dict(LOOP_FACTORIES)


def pytest_configure(config: pytest.Config) -> None:
    # pyproject.toml registers the marker; keep it registered even if that list changes.
    if not any(line.startswith("cuda") for line in config.getini("markers")):
        config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="CUDA is not available")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


# -- tensor helpers -----------------------------------------------------------------------------


def tensor_bytes(t: torch.Tensor) -> torch.Tensor:
    """The logical values of ``t`` as bytes: exact for every dtype (NaN, float8, conj views)."""
    t = t.detach()
    if t.layout is not torch.strided:
        t = t.to_dense()
    t = t.cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)
    return t.view(torch.uint8)


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype and a.shape == b.shape and torch.equal(tensor_bytes(a), tensor_bytes(b))
    )


def storage_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def assert_staged(staged: Any, source: torch.Tensor) -> None:
    """``staged`` is a CPU twin of ``source``: same layout and values, and its own memory."""
    assert isinstance(staged, torch.Tensor), type(staged)
    assert staged.device.type == "cpu"
    assert staged.dtype == source.dtype
    assert staged.shape == source.shape
    assert staged.layout == source.layout
    if source.layout is torch.strided:
        assert staged.stride() == source.stride()
        assert staged.storage_offset() == source.storage_offset()
        assert staged.is_conj() == source.is_conj()
        if source.device.type == "cpu" and source.untyped_storage().nbytes() > 0:
            assert storage_ptr(staged) != storage_ptr(source), "staged tensor aliases its source"
    assert same_values(staged, source)


def assert_tree_staged(staged: Any, source: Any) -> None:
    """Walk plain containers side by side and check every tensor."""
    if isinstance(source, torch.Tensor):
        assert_staged(staged, source)
    elif isinstance(source, dict):
        assert type(staged) is type(source)
        assert list(staged) == list(source)
        for key in source:
            assert_tree_staged(staged[key], source[key])
    elif isinstance(source, (list, tuple)):
        assert type(staged) is type(source)
        assert len(staged) == len(source)
        for a, b in zip(staged, source, strict=True):
            assert_tree_staged(a, b)
    else:
        assert staged == source


def iter_tensors(tree: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """``(path, tensor)`` for every tensor in plain dicts, lists and tuples."""
    if isinstance(tree, torch.Tensor):
        yield path, tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from iter_tensors(value, (*path, key))
    elif isinstance(tree, (list, tuple)):
        for index, value in enumerate(tree):
            yield from iter_tensors(value, (*path, index))


def tensors_of(tree: Any) -> list[torch.Tensor]:
    return [t for _, t in iter_tensors(tree)]


def model_state_dict(seed: int = 0) -> dict[str, Any]:
    """A small model + optimizer state dict: nested dicts, ints, floats, tied and strided views."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(8, 4, generator=g)
    return {
        "model": {
            "embed.weight": weight,
            "head.weight": weight,  # tied weights
            "proj.weight": torch.randn(4, 6, generator=g).t(),
            "proj.bias": torch.randn(6, generator=g),
            "norm.scale": torch.ones(()),
        },
        "optim": {
            "state": {
                0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(8, 4, generator=g)},
                1: {"step": torch.tensor(3.0), "exp_avg": torch.randn(6, generator=g)},
            },
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.99), "params": [0, 1]}],
        },
        "epoch": 7,
        "name": "run-1",
    }


def mutate_(tree: Any) -> None:
    """Change every float tensor in place (a training step): staged copies must not follow."""
    with torch.no_grad():
        for _, t in iter_tensors(tree):
            if t.is_floating_point():
                t.add_(1.0)


def big_state_dict(count: int, nbytes: int, small: int = 0) -> dict[str, Any]:
    """``count`` float32 tensors of ``nbytes`` each (filled, not random: fast to build) plus
    ``small`` tiny tensors, the shape of an optimizer state."""
    sd: dict[str, Any] = {
        f"big.{i}": torch.full((nbytes // 4,), float(i), dtype=torch.float32) for i in range(count)
    }
    if small:
        sd["small"] = [torch.full((4,), float(i)) for i in range(small)]
    return sd


def collect() -> None:
    """Run the cyclic collector until weak references of dead storages have fired."""
    for _ in range(3):
        gc.collect()


# -- drivers behind one blocking interface ------------------------------------------------------


class Driver:
    """One stager behind a blocking interface; the async Stager runs on its own event loop."""

    def __init__(self, kind: str, **overrides: Any) -> None:
        self.kind = kind
        self.closed = False
        self._runner: asyncio.Runner | None = None
        if kind == "sync":
            self.stager: Any = astage.SyncStager(**overrides)
        else:
            self._runner = asyncio.Runner(loop_factory=LOOP_FACTORIES[kind])
            self.stager = self._run(_construct(overrides))

    def _run(self, coro: Any) -> Any:
        assert self._runner is not None
        return self._runner.run(coro)

    def stage(self, state_dict: Any) -> Any:
        if self._runner is None:
            return self.stager.stage(state_dict)
        return self._run(self.stager.stage(state_dict))

    def cache_info(self) -> astage.CacheInfo:
        return self.stager.cache_info()

    def clear_cache(self) -> None:
        self.stager.clear_cache()

    @property
    def last_stats(self) -> astage.StageStats | None:
        return self.stager.last_stats

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._runner is None:
            self.stager.close()
            return
        try:
            self._run(self.stager.aclose())
        finally:
            self._runner.close()


async def _construct(overrides: dict[str, Any]) -> astage.Stager:
    return astage.Stager(**overrides)


DRIVERS = ["sync", "asyncio", "uvloop"]


@pytest.fixture(params=DRIVERS)
def make_stager(request: pytest.FixtureRequest) -> Iterator[Callable[..., Driver]]:
    """Build stagers of the parametrized driver kind; all are closed after the test."""
    made: list[Driver] = []

    def make(**overrides: Any) -> Driver:
        driver = Driver(request.param, **overrides)
        made.append(driver)
        return driver

    yield make
    for driver in made:
        driver.close()


@pytest.fixture
def stager(make_stager: Callable[..., Driver]) -> Driver:
    """A stager with default options, of each driver kind."""
    return make_stager()


@pytest.fixture
def sync_stager() -> Iterator[astage.SyncStager]:
    with astage.SyncStager() as s:
        yield s


# -- event-loop heartbeat -----------------------------------------------------------------------


class Heartbeat:
    """Sleeps ``interval`` in a loop and records how late each wake-up was."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.lateness: list[float] = []

    @property
    def max_lag(self) -> float:
        return max(self.lateness, default=0.0)

    async def _beat(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(self.interval)
            self.lateness.append(max(0.0, time.perf_counter() - before - self.interval))


@contextlib.asynccontextmanager
async def heartbeat(interval: float = 0.001) -> AsyncIterator[Heartbeat]:
    """Run a :class:`Heartbeat` on the running loop for the duration of the block."""
    beat = Heartbeat(interval)
    task = asyncio.create_task(beat._beat())
    await asyncio.sleep(0)  # let the first beat start
    try:
        yield beat
    finally:
        # Let the beat that is asleep now record: a final blocking stretch shows up there.
        seen = len(beat.lateness)
        deadline = time.perf_counter() + 1.0
        while len(beat.lateness) == seen and time.perf_counter() < deadline:
            await asyncio.sleep(0.0005)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# Every dtype a state dict may hold: the dtype tests of the stagers and of compat share it.
DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.complex64,
    torch.complex128,
]
