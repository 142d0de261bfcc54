"""Shared fixtures and helpers for the astage test suite.

* Async tests (``@pytest.mark.asyncio``) run on three legs: asyncio's default loop, uvloop and
  trio (test ids end in ``[asyncio]``, ``[uvloop]``, ``[trio]``). pytest-asyncio runs all three:
  its ``pytest_asyncio_loop_factories`` hook parametrizes the legs, and on the trio leg this
  conftest hands pytest-asyncio a runner that drives the test and its async fixtures through
  anyio's trio test runner (one trio run per test, in the main thread). A test that checks an
  asyncio-only integration opts out of trio with ``@pytest.mark.asyncio_only(reason)``.
* A blocking-call detector watches every async test: a heartbeat task runs beside it, and the
  test fails when the loop was blocked longer than :data:`BLOCKING_THRESHOLD` (garbage
  collection, and a stall that the hypervisor's steal of a CPU explains, left out). A test that
  blocks on purpose says so with ``@pytest.mark.allow_blocking(reason)``.
* Tests marked ``@pytest.mark.cuda`` are skipped when CUDA is not available.
* ``stager`` / ``make_stager`` give a blocking view of every driver (SyncStager, and Stager on
  asyncio, uvloop and trio), so the semantics tests run against each of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.from_thread
import anyio.pytest_plugin
import pytest
import pytest_asyncio
import torch
import uvloop

import astage
from astage._core import _recording, _replay
from astage._devices._backend import installed

HAS_CUDA = torch.cuda.is_available()
# The GPU machines carry no trio: there the trio legs are left out rather than failing.
HAS_TRIO = importlib.util.find_spec("trio") is not None

# -- the event-loop legs ------------------------------------------------------------------------


def run_on_trio() -> asyncio.AbstractEventLoop:
    """The trio leg's entry in the loop-factory table: a marker, never called for a loop.

    pytest-asyncio only accepts callables there; the runner fixture below sees this marker and
    runs the test on trio instead of building an asyncio loop.
    """
    raise RuntimeError(
        "the trio leg runs on trio, not on an asyncio event loop; it exists for function-scoped "
        "loops only: mark a test with a wider loop_scope asyncio_only(reason)"
    )


LOOP_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
if HAS_TRIO:
    LOOP_FACTORIES["trio"] = run_on_trio

# The same legs for code that starts its own loop (anyio.run, start_blocking_portal).
ANYIO_BACKENDS: dict[str, tuple[str, dict[str, Any]]] = {
    "asyncio": ("asyncio", {}),
    "uvloop": ("asyncio", {"use_uvloop": True}),
}
if HAS_TRIO:
    ANYIO_BACKENDS["trio"] = ("trio", {})

# Longest stretch, in seconds, that an async test may keep its event loop from running other
# tasks. A blocking call in a coroutine shows up as the whole call (hundreds of ms); a loaded
# 2-core CI machine, a GC pass or GIL hand-offs stay well under this.
BLOCKING_THRESHOLD = float(os.environ.get("ASTAGE_BLOCKING_THRESHOLD", "0.25"))
# How often the detector's heartbeat wakes up: fine enough for the threshold, cheap enough to run
# beside every async test.
_WATCHDOG_INTERVAL = 0.01

MARKERS = {
    "cuda": "cuda: needs a CUDA device (skipped without one)",
    "slow": "slow: takes more than a few seconds",
    "stress": (
        "stress: a long repetition of what a quicker test already covers; left out of `make "
        "test` (the suite's 10-minute budget on 2 cores), run by `make stress`"
    ),
    "asyncio_only": (
        "asyncio_only(reason): an async test of an asyncio-specific integration; it runs on "
        "asyncio and uvloop but not on trio"
    ),
    "allow_blocking": (
        "allow_blocking(reason): an async test that blocks its event loop on purpose; the "
        "blocking-call detector leaves it alone"
    ),
}


# -- pytest hooks -------------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    # pyproject.toml registers the markers; keep them registered where it does not (a pytester
    # run that copies this conftest, or a changed list).
    registered = config.getini("markers")
    for name, line in MARKERS.items():
        if not any(entry.split(":")[0].split("(")[0].strip() == name for entry in registered):
            config.addinivalue_line("markers", line)


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """Every ``@pytest.mark.asyncio`` test runs on every leg (trio unless ``asyncio_only``)."""
    if _marker_reason(item, "asyncio_only") is not None:
        return {name: f for name, f in LOOP_FACTORIES.items() if f is not run_on_trio}
    return dict(LOOP_FACTORIES)


def pytest_collection_finish(session: pytest.Session) -> None:
    # A full collection of the heap that collecting built (torch, hypothesis, every test module)
    # takes 0.3-0.5 s on a loaded 2-core machine, and lands inside whichever async test runs
    # when it triggers: the blocking detector then blames that test. What exists now lives for
    # the whole run, so it is moved out of the collector's sight once.
    gc.collect()
    gc.freeze()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="CUDA is not available")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Run every async test beside the blocking-call detector (see :func:`watch_the_loop`)."""
    if not pytest_asyncio.is_async_test(item) or _marker_reason(item, "allow_blocking"):
        return (yield)
    # pytest-asyncio runs `item.obj` (or, for a hypothesis test, each example's inner_test) on
    # the leg's loop; swapping in the watched coroutine function puts the detector on that loop.
    hypothesis = getattr(item.obj, "hypothesis", None)
    target: object = item if hypothesis is None else hypothesis
    name = "obj" if hypothesis is None else "inner_test"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(target, name, watch_the_loop(getattr(target, name)))
        return (yield)


def _marker_reason(item: pytest.Item, name: str) -> str | None:
    """The reason given to marker ``name`` on ``item``, or None without the marker."""
    marker = item.get_closest_marker(name)
    if marker is None:
        return None
    reason = marker.args[0] if marker.args else marker.kwargs.get("reason")
    if not isinstance(reason, str) or not reason:
        raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.{name} needs a reason (a string)")
    return reason


# -- the trio leg -------------------------------------------------------------------------------


class TrioLegRunner:
    """Stands in for pytest-asyncio's ``asyncio.Runner`` on the trio leg.

    pytest-asyncio hands each coroutine (async fixture set-up and tear-down, the test) to
    ``runner.run``; this runs them one after the other in one trio run, through anyio's trio test
    runner, so objects that a fixture made on trio are still usable by the test.
    Context variables a fixture sets do not reach the test on this leg (they stay in the trio
    task), unlike on the asyncio legs; no test relies on that.
    """

    def __init__(self, runner: anyio.abc.TestRunner) -> None:
        self._runner = runner

    def run(self, coro: Awaitable[Any], context: object = None) -> Any:
        async def await_it() -> Any:
            return await coro

        return self._runner.run_fixture(await_it, {})

    def get_loop(self) -> asyncio.AbstractEventLoop:
        raise RuntimeError("the trio leg has no asyncio event loop")


@pytest.fixture(name="_function_scoped_runner")
def _leg_runner(_asyncio_loop_factory: object, request: pytest.FixtureRequest) -> Iterator[Any]:
    """pytest-asyncio's runner fixture for function-scoped loops, with a trio leg.

    On the asyncio legs this is the fixture it overrides (pytest-asyncio's asyncio.Runner). Wider
    loop scopes keep pytest-asyncio's own runners, so they have no trio leg (no test uses one).
    """
    if _asyncio_loop_factory is not run_on_trio:
        yield request.getfixturevalue("_function_scoped_runner")
        return
    with anyio.pytest_plugin.get_runner("trio", {}) as trio_runner:
        yield TrioLegRunner(trio_runner)


# -- the blocking-call detector -----------------------------------------------------------------


def watch_the_loop(
    test: Callable[..., Awaitable[Any]], threshold: float | None = None
) -> Callable[..., Coroutine[Any, Any, None]]:
    """``test`` with a heartbeat beside it: fails when the loop was blocked over ``threshold``.

    A coroutine that calls ``time.sleep``, joins a thread or runs a long computation keeps every
    other task waiting; the heartbeat wakes up that much late, and the test fails naming how long
    and when. Errors of the test itself come first: the detector only judges a passing test.
    """
    limit = BLOCKING_THRESHOLD if threshold is None else threshold

    @functools.wraps(test)
    async def watched(*args: Any, **kwargs: Any) -> None:
        async with heartbeat(_WATCHDOG_INTERVAL) as beat:
            await test(*args, **kwargs)
        if beat.max_lag > limit:
            pytest.fail(
                f"the event loop was blocked for {beat.max_lag:.2f} s, "
                f"{beat.worst_at:.2f} s into the test (limit {limit:.2f} s; garbage collection, "
                f"{beat.gc_seconds:.2f} s in all, and CPU time the hypervisor took, "
                f"{beat.steal_seconds:.2f} s, left out): a coroutine made a "
                "blocking call. Move it to a thread (anyio.to_thread.run_sync), or mark a test "
                "that blocks on purpose @pytest.mark.allow_blocking(reason).",
                pytrace=False,
            )

    return watched


# -- event-loop heartbeat -----------------------------------------------------------------------


class _GcClock:
    """Seconds the garbage collector has run in this process (``gc.callbacks``).

    A full collection of the suite's heap takes 0.3-0.5 s on a loaded 2-core machine and lands in
    whichever test is running: the blocking detector leaves that time out, since no coroutine
    made it (:class:`Heartbeat` subtracts what ran while it slept).
    """

    def __init__(self) -> None:
        self.total = 0.0
        self._since: float | None = None

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        now = time.perf_counter()
        if phase == "start":
            self._since = now
        elif self._since is not None:
            self.total += now - self._since
            self._since = None


GC_CLOCK = _GcClock()
gc.callbacks.append(GC_CLOCK)


class CpuSteal:
    """Time the hypervisor gave each of this VM's CPUs to other guests (``steal``, /proc/stat).

    On a shared cloud host a virtual CPU can be taken away for a third of a second (this 2-core
    VM has measured 31% of its time stolen): the loop's thread wakes that much late although no
    coroutine blocked. A late wake-up that steal on one CPU explains is left out (see
    :meth:`Heartbeat._record`). Without /proc/stat nothing is ever explained.
    """

    def __init__(self, path: str = "/proc/stat") -> None:
        try:
            self._fd: int | None = os.open(path, os.O_RDONLY)
        except OSError:
            self._fd = None
        self._tick = 1 / os.sysconf("SC_CLK_TCK")

    def sample(self) -> bytes:
        """The raw counters now (8 us to read; parsed only when a wake-up was late)."""
        if self._fd is None:
            return b""
        try:
            return os.pread(self._fd, 1 << 16, 0)
        except OSError:
            return b""

    def most_stolen(self, before: bytes, after: bytes) -> float:
        """The most seconds taken from any one CPU between two samples."""
        first, last = self.per_cpu(before), self.per_cpu(after)
        ticks = max((last[cpu] - first[cpu] for cpu in last.keys() & first.keys()), default=0)
        return ticks * self._tick

    @staticmethod
    def per_cpu(sample: bytes) -> dict[bytes, int]:
        """``{b"cpu0": steal ticks, ...}`` from the ``cpuN`` lines of a sample."""
        steal = {}
        for line in sample.splitlines():
            # cpuN user nice system idle iowait irq softirq steal ...; "cpu" alone is the sum
            fields = line.split()
            if fields and fields[0].startswith(b"cpu") and fields[0] != b"cpu" and len(fields) > 8:
                steal[fields[0]] = int(fields[8])
        return steal


CPU_STEAL = CpuSteal()
# A wake-up later than this is checked against the steal counters; most of it must be steal.
_STEAL_CHECKED_FROM = 0.02
_STEAL_SHARE = 0.75


class Heartbeat:
    """Sleeps ``interval`` in a loop and records how late each wake-up was.

    Garbage collection that ran while it slept is not counted as lateness (see
    :class:`_GcClock`), nor is a late wake-up mostly explained by the hypervisor taking a CPU
    away (see :class:`CpuSteal`); :attr:`gc_seconds` and :attr:`steal_seconds` say how much was
    left out.
    """

    def __init__(self, interval: float = 0.001, steal: CpuSteal = CPU_STEAL) -> None:
        self.interval = interval
        self.lateness: list[float] = []
        self.started = time.perf_counter()
        self.worst_at = 0.0  # seconds after the start when the worst lateness ended
        self.gc_seconds = 0.0
        self.steal_seconds = 0.0
        self._asleep_since: float | None = None
        self._gc_at_sleep = GC_CLOCK.total
        self._steal = steal
        self._steal_at_sleep = steal.sample()

    @property
    def max_lag(self) -> float:
        return max(self.lateness, default=0.0)

    def _record(self, woke: float, since: float) -> None:
        collected = GC_CLOCK.total - self._gc_at_sleep
        self.gc_seconds += collected
        late = max(0.0, woke - since - self.interval - collected)
        if late > _STEAL_CHECKED_FROM:
            stolen = self._steal.most_stolen(self._steal_at_sleep, self._steal.sample())
            # Only when steal explains most of it: during a real blocking call the loop's CPU
            # may lose some time too, and the rest is still the call's.
            if stolen >= _STEAL_SHARE * late:
                self.steal_seconds += stolen
                late = max(0.0, late - stolen)
        if late > self.max_lag:
            self.worst_at = woke - self.started
        self.lateness.append(late)

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        while True:
            self._asleep_since = since = time.perf_counter()
            self._gc_at_sleep = GC_CLOCK.total
            self._steal_at_sleep = self._steal.sample()
            await anyio.sleep(self.interval)
            self._record(time.perf_counter(), since)

    def finish(self) -> None:
        """Record the beat asleep now: a blocking stretch at the very end shows up there."""
        if self._asleep_since is not None:
            self._record(time.perf_counter(), self._asleep_since)


@contextlib.asynccontextmanager
async def heartbeat(
    interval: float = 0.001, steal: CpuSteal = CPU_STEAL
) -> AsyncIterator[Heartbeat]:
    """Run a :class:`Heartbeat` on the running loop (any anyio backend) for the block."""
    beat = Heartbeat(interval, steal)
    failure: BaseException | None = None
    async with anyio.create_task_group() as tasks:
        await tasks.start(beat.run)
        try:
            yield beat
        except anyio.get_cancelled_exc_class():
            raise
        except BaseException as exc:  # noqa: BLE001 (re-raised below)
            # Raised again below, outside the task group, so that the block's error reaches the
            # caller as itself (pytest.raises, pytest.skip) and not inside an ExceptionGroup.
            failure = exc
        finally:
            beat.finish()
            tasks.cancel_scope.cancel()
    if failure is not None:
        raise failure


# -- the Lightning plugin -----------------------------------------------------------------------

if TYPE_CHECKING:
    from astage.lightning import AstageCheckpointIO


@pytest.fixture
def plugins() -> Iterator[Callable[..., AstageCheckpointIO]]:
    """Makes Lightning plugins and tears each one down after the test (its writer thread ends);
    skips the test where Lightning is not installed."""
    pytest.importorskip("lightning")
    from astage.lightning import AstageCheckpointIO

    made: list[AstageCheckpointIO] = []

    def make(**kwargs: Any) -> AstageCheckpointIO:
        plugin = AstageCheckpointIO(**kwargs)
        made.append(plugin)
        return plugin

    yield make
    for plugin in made:
        # A test that made a write fail has already checked it; only the threads matter here.
        with contextlib.suppress(astage.CheckpointWriteError):
            plugin.teardown()


# -- property tests -----------------------------------------------------------------------------

if TYPE_CHECKING:
    from hypothesis import settings as Settings


def derandomized(env: str, default: int, *checks: Any) -> Settings:
    """Hypothesis settings for a property test: the same examples on every run (derandomized,
    no database), as many as the environment variable ``env`` says (``default`` otherwise),
    so that a longer hunt is one variable away; ``checks``: health checks to suppress besides
    ``too_slow``. Imported late: the GPU machines have no hypothesis."""
    from hypothesis import HealthCheck, settings

    return settings(
        max_examples=int(os.environ.get(env, str(default))),
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, *checks],
    )


# -- tensor helpers -----------------------------------------------------------------------------


def tensor_bytes(t: torch.Tensor) -> torch.Tensor:
    """The logical values of ``t`` as bytes: exact for every dtype (NaN, float8, conj views)."""
    t = t.detach()
    if t.layout is not torch.strided:
        t = t.to_dense()
    # clone, not contiguous(): contiguous() keeps a size-1 dimension's odd stride, and view() fails
    t = t.cpu().resolve_conj().resolve_neg().clone(memory_format=torch.contiguous_format)
    t = t.reshape(-1)
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


def in_a_forked_child(child: Callable[[], int | None], seconds: int = 5) -> int:
    """Run ``child`` in a forked process that an alarm ends after ``seconds`` (a hang).

    Returns the child's exit code: what ``child`` returned (0 for None), 1 where it raised,
    -SIGALRM where it hung. The alarm's default action ends it, not a handler of pytest's,
    which a thread stuck in C would never let run.
    """
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(seconds)
            code = child() or 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def gate_pwritev(
    monkeypatch: pytest.MonkeyPatch, seconds: float = 5
) -> tuple[threading.Event, threading.Event]:
    """Hold every ``os.pwritev`` past a file's first bytes (the header) until told to go on.

    Returns ``(writing, go_on)``: ``writing`` is set once a write waits, and waiting writes
    proceed once ``go_on`` is set (or after ``seconds``). For tests that act while a save is
    in the middle of its data.
    """
    real = os.pwritev
    writing, go_on = threading.Event(), threading.Event()

    def gated(fd: int, buffers: Any, offset: int) -> int:
        if offset > 0:
            writing.set()
            go_on.wait(seconds)
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", gated)
    return writing, go_on


def outcome_of(call: Callable[[], object]) -> str:
    """What ``call`` did, as text: ``"Name: message"`` of what it raised, or ``"returned"``.

    For a call over a tensor whose memory is gone (a storage resized to 0 under it): a failed
    ``pytest.raises`` reports the frames it came through with their arguments, and printing
    such a tensor reads its memory (a segfault, rather than a failure).
    """
    try:
        call()
    except Exception as error:  # noqa: BLE001 - the outcome is what is asked for
        return f"{type(error).__name__}: {error}"
    return "returned"


def in_a_fresh_interpreter(code: str, seconds: int = 120) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a new Python process (this repository importable); its result.

    For a test whose failure is a crash (a segfault, an abort): the suite sees a return code
    instead of dying. A fresh process rather than a fork: a child forked from a pytest process
    that earlier tests left with threads may wait forever on a lock one of them held.
    """
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        check=False,
        capture_output=True,
        text=True,
        timeout=seconds,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )


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


def count_recorders(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """From now on, every recorder a walk makes (``_recording.ReplayRecorder``), in a list."""
    made: list[object] = []
    base = _recording.ReplayRecorder

    class Counted(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(_replay, "ReplayRecorder", Counted)
    return made


def big_state_dict(count: int, nbytes: int, small: int = 0) -> dict[str, Any]:
    """``count`` float32 tensors of ``nbytes`` each (filled, not random: fast to build) plus
    ``small`` tiny tensors, the shape of an optimizer state."""
    sd: dict[str, Any] = {
        f"big.{i}": torch.full((nbytes // 4,), float(i), dtype=torch.float32) for i in range(count)
    }
    if small:
        sd["small"] = [torch.full((4,), float(i)) for i in range(small)]
    return sd


def bytes_of(storage: torch.UntypedStorage) -> torch.Tensor:
    """The storage's bytes as a uint8 tensor over the same memory (not ``bytes(storage)``,
    which reads it one element at a time through Python)."""
    return torch.empty((0,), dtype=torch.uint8, device=storage.device).set_(storage)


def collect() -> None:
    """Run the cyclic collector until weak references of dead storages have fired."""
    for _ in range(3):
        gc.collect()


# -- drivers behind one blocking interface ------------------------------------------------------


class Driver:
    """One stager behind a blocking interface.

    The async Stager lives on an event loop of its own kind (asyncio, uvloop or trio) that runs in
    a portal thread for the Driver's whole life, so every call of one Driver meets the same loop.
    """

    def __init__(self, kind: str, **overrides: Any) -> None:
        self.kind = kind
        self.closed = False
        self._exits = contextlib.ExitStack()
        self._portal: anyio.from_thread.BlockingPortal | None = None
        if kind == "sync":
            self.stager: Any = astage.SyncStager(**overrides)
            return
        backend, options = ANYIO_BACKENDS[kind]
        self._portal = self._exits.enter_context(
            anyio.from_thread.start_blocking_portal(backend, options)
        )
        try:
            self.stager = self._portal.call(_construct, overrides)
        except BaseException:
            self._exits.close()
            raise

    def run(self, func: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """Run ``await func(*args)`` on this Driver's event loop and return its result."""
        if self._portal is None:
            raise TypeError("a sync Driver has no event loop")
        return self._portal.call(func, *args)

    def stage(self, state_dict: Any) -> Any:
        if self._portal is None:
            return self.stager.stage(state_dict)
        # Made here, in the calling thread: stage() takes its producer marks when called, and
        # the caller's streams are this thread's, not the portal's.
        call = self.stager.stage(state_dict)
        return self.run(_awaited, call)

    def cache_info(self) -> astage.CacheInfo:
        info: astage.CacheInfo = self.stager.cache_info()
        return info

    def clear_cache(self) -> None:
        self.stager.clear_cache()

    @property
    def last_stats(self) -> astage.StageStats | None:
        stats: astage.StageStats | None = self.stager.last_stats
        return stats

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with self._exits:
            if self._portal is None:
                self.stager.close()
            else:
                self.run(self.stager.aclose)


async def _construct(overrides: dict[str, Any]) -> astage.Stager:
    return astage.Stager(**overrides)


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


DRIVERS = ["sync", "asyncio", "uvloop", *(["trio"] if HAS_TRIO else [])]


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


if TYPE_CHECKING:
    from fake_accelerator import FakeAccelerator


@pytest.fixture
def fake() -> Iterator[FakeAccelerator]:
    """A fake asynchronous accelerator of two devices, installed as astage's device backend
    for the test; a test module may define its own (test_hunt_devices patches more)."""
    # Imported here: test_suite_setup runs this conftest in a folder of its own.
    from fake_accelerator import FakeAccelerator, FakeBackend

    accelerator = FakeAccelerator(devices=2)
    with installed(FakeBackend(accelerator)):
        yield accelerator
    accelerator.close()
    assert accelerator.errors == []
