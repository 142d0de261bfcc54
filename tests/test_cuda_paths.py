"""The CUDA paths of issue 9 that only a GPU can show: ordering, pinning, cancellation, loop lag.

Every test but the last section is marked ``cuda`` and skipped (by conftest.py) without a CUDA
device; ``benchmarks/gpu_check.sh`` runs them on a GPU machine. They need neither pytest-asyncio
nor trio: async code runs through ``anyio.run`` inside plain test functions, on each backend that
is installed (asyncio, uvloop, trio), because the GPU machine's Python may lack some of them.

None of these tests has run on hardware yet: the session that wrote them had no GPU. The last
section (not marked ``cuda``) dry-runs the ``gpu`` benchmark scenario on CPU tensors, so that a
GPU session does not spend its minutes on a typo in it.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import inspect
import logging
import threading
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.from_thread
import pytest
import torch

import astage
from astage import _torch

MiB = 1 << 20
# A GPU sleep queued on the producer's stream before its writes: about 50 ms at the H200's
# 1.98 GHz, long enough that a copy not ordered after the producer reads the old values.
PRODUCER_SLEEP_CYCLES = 100_000_000
# Long enough (about 0.5 s) that a call cancelled after 50 ms is cut off with copies queued.
LONG_SLEEP_CYCLES = 1_000_000_000
SMALL_TENSORS = 10_000

cuda = pytest.mark.cuda


# -- backends and faces -------------------------------------------------------------------------


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


ANYIO_BACKENDS: dict[str, tuple[str, dict[str, Any]]] = {
    "asyncio": ("asyncio", {}),
    "uvloop": ("asyncio", {"use_uvloop": True}),
    "trio": ("trio", {}),
}
NEEDS = {"uvloop": "uvloop", "trio": "trio"}


def _backend_param(name: str) -> Any:
    module = NEEDS.get(name)
    missing = module is not None and not _installed(module)
    reason = f"{module} is not installed here"
    return pytest.param(name, marks=pytest.mark.skipif(missing, reason=reason))


BACKENDS = [_backend_param(name) for name in ANYIO_BACKENDS]
"""The async Stager's event loops (a backend not installed is skipped)."""
STAGERS = [pytest.param("sync"), *BACKENDS]
"""SyncStager, then the async Stager on each loop."""
FACES = [*STAGERS, pytest.param("compat")]
"""Every face that stages: the two stagers and astage.compat's DefaultStager."""


def run_on(backend: str, main: Callable[[], Awaitable[None]]) -> None:
    """Run ``main()`` on ``backend``'s event loop in this thread (the caller's current stream)."""
    name, options = ANYIO_BACKENDS[backend]
    anyio.run(main, backend=name, backend_options=options)


@dataclass
class Face:
    """One face behind an awaitable ``stage``, run in the thread that calls ``run_with``."""

    name: str
    stage: Callable[[Any], Awaitable[Any]]
    stager: astage.SyncStager | astage.Stager | None
    """The astage stager (for cache_info, clear_cache); None for compat's DefaultStager."""


def run_with(face: str, body: Callable[[Face], Awaitable[None]], **options: Any) -> None:
    """Run ``body`` with a fresh stager of ``face``, in this thread.

    The blocking faces (SyncStager, compat) are called from a coroutine on asyncio: they block
    that loop, which is harmless here and keeps every face under one test body.
    """

    async def main() -> None:
        if face == "sync":
            with astage.SyncStager(**options) as sync:

                async def stage_sync(state_dict: Any) -> Any:
                    return sync.stage(state_dict)

                await body(Face(face, stage_sync, sync))
        elif face == "compat":
            from astage.compat import DefaultStager, StagingOptions

            dcp = DefaultStager(
                StagingOptions(
                    use_pinned_memory=True,
                    use_shared_memory=False,
                    use_async_staging=True,
                    use_non_blocking_copy=True,
                )
            )
            try:

                async def stage_compat(state_dict: Any) -> Any:
                    future = dcp.stage(state_dict)
                    assert not isinstance(future, dict)
                    return future.result()

                await body(Face(face, stage_compat, None))
            finally:
                dcp.close()
        else:
            async with astage.Stager(**options) as stager:
                await body(Face(face, stager.stage, stager))

    run_on(face if face in ANYIO_BACKENDS else "asyncio", main)


# -- producers ----------------------------------------------------------------------------------


def produce_late(*tensors: torch.Tensor, value: float, cycles: int = PRODUCER_SLEEP_CYCLES) -> None:
    """On each device's current stream: a long GPU sleep, then write ``value`` into its tensors."""
    devices = list(dict.fromkeys(tensor.device for tensor in tensors))
    for device in devices:
        with torch.cuda.device(device):
            torch.cuda._sleep(cycles)
            for tensor in tensors:
                if tensor.device == device:
                    tensor.fill_(value)


def assert_all(staged: dict[str, torch.Tensor], value: float) -> None:
    for key, tensor in staged.items():
        assert tensor.device.type == "cpu", key
        assert torch.all(tensor == value), f"{key}: a value other than {value} was staged"


def storage_pointers(staged: dict[str, torch.Tensor]) -> list[int]:
    return [t.untyped_storage().data_ptr() for t in staged.values()]


# -- ordering after the producer ----------------------------------------------------------------


@cuda
@pytest.mark.parametrize("face", FACES)
def test_side_stream_producer_is_in_the_snapshot(face: str) -> None:
    # Kernels queued on a non-default stream, current when stage() is called, are in the
    # snapshot: the first call and a cached one, a large tensor and a small one.
    x = torch.zeros(4 * MiB, device="cuda")
    y = torch.zeros(16, device="cuda")
    torch.cuda.synchronize()
    side = torch.cuda.Stream()

    async def body(f: Face) -> None:
        for value in (7.0, 9.0):
            with torch.cuda.stream(side):
                produce_late(x, y, value=value)
                staged = await f.stage({"x": x, "y": y})
            assert_all(staged, value)

    run_with(face, body)


@cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("face", FACES)
def test_every_device_is_ordered_after_its_producer(face: str) -> None:
    # One state dict on two devices, each written by a side stream of its own device: the
    # snapshot holds both writes (compat's worker once ordered after the current device only).
    tensors = {f"d{i}": torch.zeros(MiB, device=f"cuda:{i}") for i in range(2)}
    for i in range(2):
        torch.cuda.synchronize(i)
    streams = [torch.cuda.Stream(device=i) for i in range(2)]

    async def body(f: Face) -> None:
        for value in (3.0, 4.0):
            with torch.cuda.stream(streams[0]), torch.cuda.stream(streams[1]):
                produce_late(*tensors.values(), value=value)
                staged = await f.stage(tensors)
            assert_all(staged, value)

    run_with(face, body)


@cuda
@pytest.mark.parametrize("face", FACES)
def test_small_tensors_on_the_device_are_ordered_and_exact(face: str) -> None:
    # 10,000 small tensors of mixed dtypes (the path that may gather them on the device), all
    # written by one late multi-tensor kernel on a side stream: every value lands, in place.
    # Values stay below 256, which bfloat16 holds exactly.
    dtypes = [torch.float32, torch.bfloat16, torch.int64, torch.float64]
    shapes: list[tuple[int, ...]] = [(), (64,), (16, 16), (256,), (3, 5)]
    tensors = [
        torch.full(shapes[i % len(shapes)], i % 100, dtype=dtypes[i % len(dtypes)], device="cuda")
        for i in range(SMALL_TENSORS)
    ]
    torch.cuda.synchronize()
    side = torch.cuda.Stream()

    async def body(f: Face) -> None:
        for round_ in (1, 2):
            with torch.cuda.stream(side):
                torch.cuda._sleep(PRODUCER_SLEEP_CYCLES)
                torch._foreach_add_(tensors, 1)
                staged = await f.stage({"state": tensors})
            for i, (got, source) in enumerate(zip(staged["state"], tensors, strict=True)):
                assert got.device.type == "cpu"
                assert got.dtype == source.dtype and got.shape == source.shape, i
                assert torch.all(got == i % 100 + round_), f"tensor {i}, round {round_}"

    run_with(face, body)


def _accepts_after(cls: type[Any]) -> bool:
    return "after" in inspect.signature(cls.stage).parameters


@cuda
@pytest.mark.skipif(
    not _accepts_after(astage.Stager),
    reason="Stager.stage() has no after= argument yet (issue 9, item 2)",
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_stage_from_another_thread_with_after(backend: str) -> None:
    # The training thread queues its kernels on a side stream and schedules stage() on an
    # event loop in another thread, whose current stream knows nothing of them: after= (the
    # stream, or an event recorded on it) orders the copies after that work.
    x = torch.zeros(4 * MiB, device="cuda")
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    name, options = ANYIO_BACKENDS[backend]
    with anyio.from_thread.start_blocking_portal(name, options) as portal:
        stager = portal.call(_new_stager)
        stage: Any = stager.stage  # typed loosely: after= may not be in the signature yet
        try:
            with torch.cuda.stream(side):
                produce_late(x, value=7.0)
            staged = portal.call(functools.partial(stage, after=side), {"x": x})
            assert_all(staged, 7.0)
            with torch.cuda.stream(side):
                produce_late(x, value=8.0)
                done = torch.cuda.Event()
                done.record(side)
            staged = portal.call(functools.partial(stage, after=done), {"x": x})
            assert_all(staged, 8.0)
        finally:
            portal.call(stager.aclose)


@cuda
@pytest.mark.skipif(
    not _accepts_after(astage.SyncStager),
    reason="SyncStager.stage() has no after= argument yet (issue 9, item 2)",
)
def test_sync_stage_from_another_thread_with_after() -> None:
    x = torch.zeros(4 * MiB, device="cuda")
    torch.cuda.synchronize()
    side = torch.cuda.Stream()

    async def main() -> None:
        with astage.SyncStager() as stager:
            with torch.cuda.stream(side):
                produce_late(x, value=5.0)
            stage: Any = stager.stage  # typed loosely: after= may not be in the signature yet
            staged = await anyio.to_thread.run_sync(functools.partial(stage, {"x": x}, after=side))
            assert_all(staged, 5.0)

    run_on("asyncio", main)


async def _new_stager() -> astage.Stager:
    return astage.Stager()


# -- pinned memory ------------------------------------------------------------------------------


@cuda
@pytest.mark.parametrize("face", STAGERS)
def test_pinned_buffers_are_reused_across_calls(face: str) -> None:
    # The first call allocates and pins; later calls copy fresh values into the same pinned
    # buffers, allocating and pinning nothing.
    source = {f"w{i}": torch.zeros(MiB, device="cuda") for i in range(4)}
    torch.cuda.synchronize()

    async def body(f: Face) -> None:
        stager = f.stager
        assert stager is not None
        first = await f.stage(source)
        pinned, pointers = stager.cache_info().pinned_nbytes, storage_pointers(first)
        assert pinned == 16 * MiB
        assert all(t.is_pinned() for t in first.values())
        for value in (1.0, 2.0):
            for tensor in source.values():
                tensor.fill_(value)
            staged = await f.stage(source)
            assert_all(staged, value)
            assert storage_pointers(staged) == pointers
            assert stager.cache_info().pinned_nbytes == pinned
            stats = stager.last_stats
            assert stats is not None and stats.new_nbytes == 0

    run_with(face, body, pin_memory=True, pin_memory_min_bytes=0)


@cuda
@pytest.mark.parametrize("backend", BACKENDS)
def test_clear_cache_after_a_cancelled_call_unpins_safely(
    backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A call cancelled while its copies wait behind the producer's long kernel; clear_cache()
    # then unpins the buffers. No copy may still be writing into them (astage unpins only
    # after every copy landed), no unregistration may fail, and CUDA stays usable.
    source = {f"w{i}": torch.zeros(16 * MiB, device="cuda") for i in range(4)}  # 256 MiB
    torch.cuda.synchronize()
    side = torch.cuda.Stream()

    async def cancelled_call(stager: astage.Stager, value: float) -> None:
        with torch.cuda.stream(side):
            produce_late(*source.values(), value=value, cycles=LONG_SLEEP_CYCLES)
            with anyio.move_on_after(0.05) as scope:
                await stager.stage(source)
        assert scope.cancelled_caught, "the call finished before the producer: not cut off"
        side.synchronize()  # the producer's writes, for the calls that follow on another stream

    async def main() -> None:
        async with astage.Stager(pin_memory=True, pin_memory_min_bytes=0) as stager:
            await cancelled_call(stager, 1.0)  # a first call: buffers pinned during it
            stager.clear_cache()
            assert stager.cache_info() == astage.CacheInfo(0, 0, 0)
            assert_all(await stager.stage(source), 1.0)  # pinned afresh
            assert stager.cache_info().pinned_nbytes == 256 * MiB
            await cancelled_call(stager, 2.0)  # a cached call
            stager.clear_cache()
            assert stager.cache_info() == astage.CacheInfo(0, 0, 0)
        torch.cuda.synchronize()
        assert torch.ones(4, device="cuda").add_(1).sum().item() == 8.0  # the next kernel runs

    with caplog.at_level(logging.WARNING, logger="astage"):
        run_on(backend, main)
    failed = [r.getMessage() for r in caplog.records if "Unregister" in r.getMessage()]
    assert not failed


def _cuda_peek_last_error() -> Callable[[], int]:
    """``cudaPeekAtLastError`` of the CUDA runtime torch loaded (read without resetting)."""
    for path in _libraries("libcudart"):
        try:
            function = getattr(ctypes.CDLL(path), "cudaPeekAtLastError", None)
        except OSError:
            continue
        if function is not None:
            function.restype, function.argtypes = ctypes.c_int, []
            return function  # type: ignore[no-any-return]
    pytest.skip("no dynamically loaded CUDA runtime: its last error is out of reach")


def _libraries(stem: str) -> list[str]:
    """Paths of the shared libraries named ``stem*`` mapped into this process (Linux)."""
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
        fields = [line.split(maxsplit=5) for line in maps]
    paths = {f[5].strip() for f in fields if len(f) == 6}
    return [p for p in sorted(paths) if p.rsplit("/", 1)[-1].startswith(stem)]


@cuda
@pytest.mark.parametrize("face", STAGERS)
def test_failed_host_register_leaves_no_cuda_error(
    face: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # cudaHostRegister refused (a NULL pointer: a real CUDA failure, which the runtime also
    # keeps as the thread's last error). astage either falls back to pageable memory with a
    # warning or refuses with StagingError; either way no thread is left with the error: a
    # registration in a thread that failed before must find it cleared (32 buffers on at most
    # 2 copy threads and the caller: some thread registers twice), and so must the caller.
    torch.ones(1, device="cuda").add_(1)  # load the runtime before looking for it
    peek = _cuda_peek_last_error()
    if "cuda_host_register" not in vars(_torch):
        pytest.fail("astage._torch.cuda_host_register is gone: point this test at the new seam")
    leftovers: list[int] = []
    calls: list[int] = []

    def refuse(ptr: int, nbytes: int, *args: Any, **kwargs: Any) -> int:
        leftovers.append(peek())  # an error a failed registration left in this thread
        calls.append(threading.get_ident())
        return int(torch.cuda.cudart().cudaHostRegister(0, nbytes, 0))

    assert refuse(0, MiB) != 0 and peek() != 0  # the fake failure leaves a last error...
    _torch.cuda_clear_last_error()
    assert peek() == 0  # ... which astage's helper clears
    leftovers.clear()
    calls.clear()
    monkeypatch.setattr(_torch, "cuda_host_register", refuse)
    source = {f"w{i}": torch.full((64 * 1024,), float(i), device="cuda") for i in range(32)}
    torch.cuda.synchronize()

    async def body(f: Face) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the fallback's warning
            for _ in range(2):
                try:
                    staged = await f.stage(source)
                except astage.StagingError:
                    continue  # refused, as documented: the thread checks below still apply
                for i in range(32):
                    assert torch.all(staged[f"w{i}"] == float(i))

    run_with(face, body, pin_memory=True, pin_memory_min_bytes=0, copy_threads=2)
    assert calls, "astage never called _torch.cuda_host_register: point this test at the seam"
    assert len(calls) > len(set(calls)), "no thread registered twice: the check proves nothing"
    assert leftovers == [0] * len(leftovers), "a failed registration left its CUDA error"
    assert peek() == 0
    assert torch.ones(2, device="cuda").mul_(2).sum().item() == 4.0  # the next kernel launches


# -- the event loop while staging ---------------------------------------------------------------


@cuda
@pytest.mark.parametrize("backend", BACKENDS)
def test_loop_stays_responsive_while_staging_from_the_device(backend: str) -> None:
    # 1 GiB from the device, a first call and two cached ones, beside a 1 ms heartbeat. The
    # bounds are a test's (a loaded machine must pass); the benchmark measures the goal
    # (p99 <= 1 ms) on a quiet one.
    from conftest import heartbeat

    source = {f"w{i}": torch.randn(4 * MiB, device="cuda") for i in range(64)}  # 1 GiB
    torch.cuda.synchronize()
    lateness: list[float] = []

    async def main() -> None:
        async with astage.Stager() as stager, heartbeat() as beat:
            for _ in range(3):
                staged = await stager.stage(source)
            lateness.extend(beat.lateness)
        assert torch.equal(staged["w63"], source["w63"].cpu())

    run_on(backend, main)
    ordered = sorted(lateness)
    p99 = ordered[int(0.99 * (len(ordered) - 1))]
    assert p99 < 0.005, f"loop lag p99 {p99 * 1e3:.2f} ms"
    assert ordered[-1] < 0.1, f"loop lag max {ordered[-1] * 1e3:.1f} ms"


# -- the gpu benchmark scenario, dry-run on the CPU ---------------------------------------------


@pytest.mark.slow
def test_gpu_scenario_dry_runs_on_cpu() -> None:
    # The scenario's every measurement on CPU tensors: a GPU session (minutes, scarce) must not
    # be the first to run this code. Only the shape of the result is checked; no figure is.
    from benchmarks.config import Config
    from benchmarks.runner import LoopRunner
    from benchmarks.scenarios.gpu import measure

    config = Config(quick=True, repeats=1, cached_calls=1, gpu_bytes=4 * MiB, small_tensors=300)
    with LoopRunner() as runner:
        result = measure(config, runner, torch.device("cpu"))
    assert result.skipped is None
    # bulk, reuse, lag (with its copy floor, measured for host tensors only), small
    assert len(result.checks) == 6 + 2 + 5 + 1 + 8
    assert all(c.metric and c.astage and c.reference and c.goal for c in result.checks)
    reuse = [c for c in result.checks if c.metric.startswith("pinned reuse")]
    assert [c.met for c in reuse] == [True, True]  # CPU sources: reused, nothing pinned
    p99 = [c for c in result.checks if c.metric.endswith("loop lag p99")]
    assert [c.goal for c in p99] == ["<= 1 ms", "<= 1 ms"]
    assert len(result.tables) == 4
    assert set(result.figures) == {"device", "bulk", "reuse", "lag", "lag_floors", "small"}
    assert set(result.figures["lag_floors"]) == {"idle", "woken", "copying"}
    assert [note.split(",")[0] for note in result.notes] == [
        "Idle loop",
        "Woken floor",
        "Copy floor",
    ]
