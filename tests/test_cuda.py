"""CUDA staging: device tensors, pinned buffers, stream ordering, unpinning.

Every test here is marked ``cuda`` and is skipped (by conftest.py) where CUDA is not available.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread
import pytest
import torch
from conftest import Driver, assert_staged, collect

import astage

pytestmark = pytest.mark.cuda

MiB = 1 << 20
GPU_SLEEP_CYCLES = 100_000_000  # tens of ms of queued GPU work before the producer's write


def test_cuda_marker_runs_only_with_cuda() -> None:
    assert torch.cuda.is_available()


def _cuda_state_dict() -> dict[str, Any]:
    w = torch.randn(64, 64, device="cuda")
    return {
        "w": w,
        "w.t": w.t(),
        "w.rows": w[3:9],
        "ints": torch.arange(10, device="cuda"),
        "bf16": torch.randn(33, device="cuda").to(torch.bfloat16),
        "scalar": torch.tensor(1.5, device="cuda"),
        "empty": torch.empty(0, device="cuda"),
        "big": torch.randn(2 * MiB, device="cuda"),  # 8 MiB
        "cpu": torch.randn(5),
    }


def test_cuda_tensors_are_staged_to_cpu(stager: Driver) -> None:
    source = _cuda_state_dict()
    staged = stager.stage(source)
    for key, value in source.items():
        assert_staged(staged[key], value)  # on CPU, same layout, equal values
    assert staged["w.t"].untyped_storage().data_ptr() == staged["w"].untyped_storage().data_ptr()


def test_cached_cuda_call_copies_fresh_values(stager: Driver) -> None:
    source = _cuda_state_dict()
    first = stager.stage(source)
    ptr = first["big"].untyped_storage().data_ptr()
    source["big"].mul_(2)
    second = stager.stage(source)
    assert second["big"].untyped_storage().data_ptr() == ptr
    assert_staged(second["big"], source["big"])
    stats = stager.last_stats
    assert stats is not None and stats.new_nbytes == 0


def test_small_chunks_split_cuda_copies(make_stager: Callable[..., Driver]) -> None:
    stager = make_stager(chunk_bytes=MiB, max_inflight_bytes=4 * MiB)
    source = _cuda_state_dict()
    staged = stager.stage(source)
    for key, value in source.items():
        assert_staged(staged[key], value)


def test_pinned_buffers_respect_the_minimum(make_stager: Callable[..., Driver]) -> None:
    stager = make_stager(pin_memory=True, pin_memory_min_bytes=MiB)
    big = torch.randn(MiB, device="cuda")  # 4 MiB: pinned
    small = torch.randn(1024, device="cuda")  # 4 KiB: below the minimum
    staged = stager.stage({"big": big, "small": small})
    assert staged["big"].is_pinned()
    assert not staged["small"].is_pinned()
    assert stager.cache_info().pinned_nbytes == big.untyped_storage().nbytes()
    assert torch.equal(staged["big"], big.cpu())


def test_buffer_at_the_minimum_is_pinned(make_stager: Callable[..., Driver]) -> None:
    stager = make_stager(pin_memory=True, pin_memory_min_bytes=MiB)
    exact = torch.randn(MiB // 4, device="cuda")  # exactly 1 MiB
    staged = stager.stage({"exact": exact})
    assert staged["exact"].is_pinned()


def test_pinning_is_automatic_with_cuda(stager: Driver) -> None:
    source = {"big": torch.randn(MiB, device="cuda"), "tiny": torch.randn(4, device="cuda")}
    staged = stager.stage(source)
    assert staged["big"].is_pinned()  # default: pin_memory=None -> on with CUDA, 4 MiB >= 64 KiB
    assert not staged["tiny"].is_pinned()


def test_pin_memory_false_pins_nothing(make_stager: Callable[..., Driver]) -> None:
    stager = make_stager(pin_memory=False)
    staged = stager.stage({"big": torch.randn(MiB, device="cuda")})
    assert not staged["big"].is_pinned()
    assert stager.cache_info().pinned_nbytes == 0


def test_cpu_sources_with_pinning_on(make_stager: Callable[..., Driver]) -> None:
    stager = make_stager(pin_memory=True, pin_memory_min_bytes=0)
    source = {"cpu": torch.randn(MiB), "gpu": torch.randn(MiB, device="cuda")}
    staged = stager.stage(source)
    for key, value in source.items():
        assert_staged(staged[key], value)
    assert staged["gpu"].is_pinned()


def test_close_unpins(make_stager: Callable[..., Driver]) -> None:
    stager = make_stager(pin_memory=True, pin_memory_min_bytes=0)
    source = {"w": torch.randn(MiB, device="cuda")}
    staged = stager.stage(source)
    assert stager.cache_info().pinned_nbytes == 4 * MiB
    stager.close()
    assert stager.cache_info().pinned_nbytes == 0
    assert not staged["w"].is_pinned()  # unregistered, but still readable
    assert torch.equal(staged["w"], source["w"].cpu())


def test_dead_source_unpins_its_buffer(make_stager: Callable[..., Driver]) -> None:
    stager = make_stager(pin_memory=True, pin_memory_min_bytes=0)
    keep = torch.randn(MiB, device="cuda")
    source = {"keep": keep, "drop": torch.randn(MiB, device="cuda")}
    stager.stage(source)
    assert stager.cache_info().pinned_nbytes == 8 * MiB
    del source
    collect()
    assert stager.cache_info() == astage.CacheInfo(
        storages=1, nbytes=4 * MiB, pinned_nbytes=4 * MiB
    )


def test_clear_cache_unpins(make_stager: Callable[..., Driver]) -> None:
    stager = make_stager(pin_memory=True, pin_memory_min_bytes=0)
    stager.stage({"w": torch.randn(MiB, device="cuda")})
    stager.clear_cache()
    assert stager.cache_info() == astage.CacheInfo(0, 0, 0)


def _produce_late(*tensors: torch.Tensor, value: float) -> None:
    """On the current stream: a long GPU sleep, then write ``value`` into every tensor."""
    torch.cuda._sleep(GPU_SLEEP_CYCLES)
    for tensor in tensors:
        tensor.fill_(value)


def test_staging_waits_for_the_producer_stream(stager: Driver) -> None:
    # The values are written by kernels queued on a side stream that is the current stream when
    # stage() is called; the copy must be ordered after them (DCP's DefaultStager is not).
    x = torch.zeros(4 * MiB, device="cuda")
    y = torch.zeros(16, device="cuda")
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        _produce_late(x, y, value=7.0)
        staged = stager.stage({"x": x, "y": y})
    assert torch.all(staged["x"] == 7.0)
    assert torch.all(staged["y"] == 7.0)
    # A cached call is ordered after the producer too.
    with torch.cuda.stream(side):
        _produce_late(x, y, value=9.0)
        staged = stager.stage({"x": x, "y": y})
    assert torch.all(staged["x"] == 9.0)
    assert torch.all(staged["y"] == 9.0)


@pytest.mark.asyncio
async def test_producer_ordering_with_mixed_devices() -> None:
    # Adam's state on GPU: a large CUDA tensor, a CPU "step", then a small CUDA tensor.
    # Regression: the small CUDA copy once joined the CPU batch after the sliced one and ran in
    # a copy thread on its default stream, before the producer's write. (SyncStager runs host
    # batches on the caller's, producer's, stream, so only the async driver showed it.)
    big = torch.zeros(MiB, device="cuda")  # 4 MiB: sliced
    step = torch.tensor(3.0)
    small = torch.zeros(16, device="cuda")
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    async with astage.Stager(chunk_bytes=MiB, max_inflight_bytes=4 * MiB) as stager:
        with torch.cuda.stream(side):
            _produce_late(big, small, value=5.0)
            staged = await stager.stage({"exp_avg_sq": big, "step": step, "exp_avg": small})
    assert torch.all(staged["exp_avg_sq"] == 5.0)
    assert torch.all(staged["exp_avg"] == 5.0)


def test_mixed_cpu_and_cuda_state_dict(stager: Driver) -> None:
    source = {"big": torch.randn(MiB, device="cuda"), "step": torch.tensor(2.0)}
    source["small"] = torch.randn(16, device="cuda")
    torch.cuda.synchronize()  # no producer race here: only the values matter
    staged = stager.stage(source)
    for key, value in source.items():
        assert_staged(staged[key], value)


def test_state_dict_on_two_streams_in_turn(stager: Driver) -> None:
    a = torch.zeros(MiB, device="cuda")
    torch.cuda.synchronize()
    for value in (1.0, 2.0, 3.0):
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            _produce_late(a, value=value)
            staged = stager.stage({"a": a})
        assert torch.all(staged["a"] == value)


def test_non_blocking_true_is_accepted_with_cuda(make_stager: Callable[..., Driver]) -> None:
    stager = make_stager(non_blocking=True)
    source = {"w": torch.randn(MiB, device="cuda")}
    assert torch.equal(stager.stage(source)["w"], source["w"].cpu())


def test_non_blocking_false_with_cuda(make_stager: Callable[..., Driver]) -> None:
    stager = make_stager(non_blocking=False)
    source = {"w": torch.randn(MiB, device="cuda")}
    assert torch.equal(stager.stage(source)["w"], source["w"].cpu())


def test_cuda_parameters_and_subclass_attributes(stager: Driver) -> None:
    p = torch.nn.Parameter(torch.randn(8, device="cuda"))
    p.tag = "w"  # type: ignore[attr-defined]
    staged = stager.stage({"p": p})["p"]
    assert type(staged) is torch.nn.Parameter
    assert staged.device.type == "cpu"
    assert staged.requires_grad
    assert staged.tag == "w"  # type: ignore[attr-defined]
    assert torch.equal(staged.detach(), p.detach().cpu())


@pytest.mark.filterwarnings("ignore:Sparse")
def test_cuda_sparse(stager: Driver) -> None:
    dense = torch.randn(6, 5, device="cuda").relu()
    staged = stager.stage({"coo": dense.to_sparse(), "csr": dense.to_sparse_csr()})
    for key in ("coo", "csr"):
        assert staged[key].device.type == "cpu"
        assert torch.equal(staged[key].to_dense(), dense.cpu())


@pytest.mark.asyncio
async def test_stage_iter_from_cuda() -> None:
    source = _cuda_state_dict()
    stager = astage.Stager(chunk_bytes=MiB, max_inflight_bytes=4 * MiB)
    async with stager, stager.stage_iter(source) as landed:
        items = {path: t async for path, t in landed}
    assert set(items) == {(key,) for key in source}
    for (key,), staged in items.items():
        assert_staged(staged, source[key])


@pytest.mark.asyncio
async def test_async_stage_keeps_the_loop_responsive_on_cuda() -> None:
    from conftest import heartbeat

    source = {f"w{i}": torch.randn(16 * MiB, device="cuda") for i in range(4)}  # 256 MiB
    async with astage.Stager() as stager, heartbeat() as beat:
        staged = await stager.stage(source)
    assert torch.equal(staged["w3"], source["w3"].cpu())
    assert beat.max_lag < 0.1


def test_after_orders_a_call_made_for_another_thread() -> None:
    # The producer runs on a side stream that is NOT current where stage() is called: only
    # after= can order the copy after it.
    x = torch.zeros(4 * MiB, device="cuda")
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with astage.SyncStager() as stager:
        with torch.cuda.stream(side):
            _produce_late(x, value=4.0)
        staged = stager.stage({"x": x}, after=side)
        assert torch.all(staged["x"] == 4.0)
        with torch.cuda.stream(side):
            _produce_late(x, value=6.0)
            done = torch.cuda.Event()
            done.record(side)
        staged = stager.stage({"x": x}, after=[done])
        assert torch.all(staged["x"] == 6.0)


@pytest.mark.asyncio
async def test_async_stage_made_in_a_training_thread_is_ordered_after_it() -> None:
    # run_coroutine_threadsafe's shape: the coroutine is made in the training thread, whose
    # current stream is a side stream with the producer on it, and awaited on the loop.
    x = torch.zeros(4 * MiB, device="cuda")
    torch.cuda.synchronize()
    made: list[Any] = []

    def training() -> None:
        with torch.cuda.stream(torch.cuda.Stream()):
            _produce_late(x, value=3.0)
            made.append(stager.stage({"x": x}))

    async with astage.Stager() as stager:
        await anyio.to_thread.run_sync(training)
        staged = await made[0]
    assert torch.all(staged["x"] == 3.0)


def test_staging_during_graph_capture_is_refused() -> None:
    x = torch.ones(16, device="cuda")
    with astage.SyncStager() as stager:
        stager.stage({"x": x})
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = x * 2
            with pytest.raises(astage.UsageError, match="capturing a graph"):
                stager.stage({"y": y})
        graph.replay()
        assert torch.equal(stager.stage({"y": y})["y"], x.cpu() * 2)
