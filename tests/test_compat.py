"""astage.compat: DCP's stagers (StateDictStager, DefaultStager, BlockingAsyncStager) on astage.

Each behaviour of the contract of issue 3, on CPU; CUDA variants are marked ``cuda``. The round
trips through ``dcp.async_save`` and ``dcp.load`` are in test_compat_dcp.py.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import types
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import (
    DTYPES,
    HAS_CUDA,
    assert_staged,
    assert_tree_staged,
    model_state_dict,
    mutate_,
    same_values,
    storage_ptr,
    tensors_of,
)
from torch.distributed.checkpoint import staging as dcp_staging
from torch.distributed.checkpoint._experimental.staging import (
    CheckpointStager,
    CheckpointStagerConfig,
)
from torch.distributed.checkpoint._experimental.staging import (
    DefaultStager as DcpExperimentalDefaultStager,
)
from torch.distributed.checkpoint._state_dict_stager import StateDictStager as DcpStateDictStager

import astage
from astage import compat

cpu_only = pytest.mark.skipif(HAS_CUDA, reason="checks the behaviour without CUDA")


def cpu_config(*, async_staging: bool = False, pinned: bool = False, shared: bool = False) -> Any:
    return compat.StagingOptions(
        use_pinned_memory=pinned,
        use_shared_memory=shared,
        use_async_staging=async_staging,
        use_non_blocking_copy=False,
    )


@pytest.fixture
def state_dict_stager() -> Iterator[compat.StateDictStager]:
    stager = compat.StateDictStager()
    yield stager
    stager.close()


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def default_stager(request: pytest.FixtureRequest) -> Iterator[compat.DefaultStager]:
    with compat.DefaultStager(cpu_config(async_staging=request.param)) as stager:
        yield stager


def resolve(staged: Any) -> Any:
    """The staged dict, whether ``stage()`` returned it or a Future of it."""
    if isinstance(staged, concurrent.futures.Future):
        return staged.result(timeout=30)
    return staged


# -- StateDictStager ----------------------------------------------------------------------------


def test_state_dict_stager_copies_everything_to_cpu(
    state_dict_stager: compat.StateDictStager,
) -> None:
    sd = model_state_dict()
    staged = state_dict_stager.stage(sd)
    assert_tree_staged(staged, sd)  # CPU inputs are copied too: no staged tensor aliases its source


def test_state_dict_stager_matches_dcps(state_dict_stager: compat.StateDictStager) -> None:
    sd = model_state_dict()
    theirs = DcpStateDictStager()
    try:
        expected = theirs.stage(sd)
    finally:
        theirs.close()
    staged = state_dict_stager.stage(sd)
    assert_tree_staged(staged, expected)


def test_state_dict_stager_keeps_aliasing(state_dict_stager: compat.StateDictStager) -> None:
    base = torch.arange(12.0)
    sd = {"a": base, "view": base[2:8].view(2, 3), "tied": {"w": base}, "t": base.view(3, 4).t()}
    staged = state_dict_stager.stage(sd)
    assert staged["tied"]["w"] is staged["a"]
    ptr = storage_ptr(staged["a"])
    assert storage_ptr(staged["view"]) == ptr
    assert storage_ptr(staged["t"]) == ptr
    assert staged["view"].storage_offset() == 2
    assert staged["t"].stride() == (1, 4)
    assert state_dict_stager.cache_info().storages == 1


def test_state_dict_stager_reuses_its_cache_with_fresh_values(
    state_dict_stager: compat.StateDictStager,
) -> None:
    sd = model_state_dict()
    first = state_dict_stager.stage(sd)
    pointers = [storage_ptr(t) for t in tensors_of(first)]
    info = state_dict_stager.cache_info()
    mutate_(sd)
    second = state_dict_stager.stage(sd)
    assert [storage_ptr(t) for t in tensors_of(second)] == pointers  # the same host buffers
    assert_tree_staged(second, sd)  # with the values of now
    assert state_dict_stager.cache_info() == info
    stats = state_dict_stager.last_stats
    assert stats is not None and stats.new_nbytes == 0


def test_state_dict_stager_cache_info_is_astages(
    state_dict_stager: compat.StateDictStager,
) -> None:
    assert state_dict_stager.cache_info() == astage.CacheInfo(0, 0, 0)
    sd = {"w": torch.zeros(16), "b": torch.zeros(4)}  # alive: entries follow their sources
    state_dict_stager.stage(sd)
    info = state_dict_stager.cache_info()
    assert isinstance(info, astage.CacheInfo)
    assert info == astage.CacheInfo(storages=2, nbytes=80, pinned_nbytes=0)


def test_state_dict_stager_keeps_tensor_attributes(
    state_dict_stager: compat.StateDictStager,
) -> None:
    weight = torch.randn(3)
    weight.placement = "shard-0"  # type: ignore[attr-defined]
    weight.meta = {"scale": torch.tensor(2.0)}  # type: ignore[attr-defined]
    param = torch.nn.Parameter(torch.randn(2), requires_grad=True)
    staged = state_dict_stager.stage({"w": weight, "p": param})
    assert staged["w"].placement == "shard-0"
    assert_staged(staged["w"].meta["scale"], weight.meta["scale"])  # type: ignore[attr-defined]
    assert type(staged["p"]) is torch.nn.Parameter
    assert staged["p"].requires_grad


@dataclasses.dataclass
class _Moments:
    exp_avg: torch.Tensor
    step: int


@dataclasses.dataclass(frozen=True)
class _Frozen:
    weight: torch.Tensor
    name: str


def test_state_dict_stager_rebuilds_dataclasses(
    state_dict_stager: compat.StateDictStager,
) -> None:
    moments, frozen = _Moments(torch.randn(4), 3), _Frozen(torch.randn(2, 2), "head")
    staged = state_dict_stager.stage({"m": moments, "f": frozen})
    assert type(staged["m"]) is _Moments and staged["m"].step == 3
    assert_staged(staged["m"].exp_avg, moments.exp_avg)
    assert type(staged["f"]) is _Frozen and staged["f"].name == "head"
    assert_staged(staged["f"].weight, frozen.weight)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_state_dict_stager_every_dtype(
    state_dict_stager: compat.StateDictStager, dtype: torch.dtype
) -> None:
    source = (torch.arange(24, dtype=torch.float32) - 7).reshape(4, 6)
    if dtype.is_complex:
        source = torch.complex(source, -source)
    sd = {"x": source.to(dtype), "scalar": source[1, 1].to(dtype), "empty": source[:0].to(dtype)}
    staged = state_dict_stager.stage(sd)
    assert_tree_staged(staged, sd)
    assert staged["scalar"].dim() == 0
    assert staged["empty"].numel() == 0


def test_state_dict_stager_accepts_non_blocking(
    state_dict_stager: compat.StateDictStager,
) -> None:
    sd = model_state_dict()
    staged = state_dict_stager.stage(sd, non_blocking=True)
    assert_tree_staged(staged, sd)  # landed when stage() returns, even when non-blocking


def test_state_dict_stager_share_memory() -> None:
    with compat.StateDictStager(share_memory=True) as stager:
        staged = stager.stage({"w": torch.randn(64), "s": torch.tensor(1.0)})
        assert staged["w"].is_shared()
        assert staged["s"].is_shared()
        assert stager.share_memory


@cpu_only
def test_state_dict_stager_pin_memory_without_cuda_warns_once_and_does_not_pin() -> None:
    with pytest.warns(UserWarning, match="CUDA is not available") as record:
        stager = compat.StateDictStager(pin_memory=True)
    assert len(record) == 1
    assert record[0].filename == __file__  # the warning points at the caller
    assert stager.pin_memory is False  # as DCP reports it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        staged = stager.stage({"w": torch.randn(1 << 16)})
        stager.stage({"w": torch.randn(1 << 16)})
    assert not staged["w"].is_pinned()
    assert stager.cache_info().pinned_nbytes == 0
    stager.close()


def test_state_dict_stager_without_pinning_does_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stager = compat.StateDictStager(pin_memory=False)
        stager.stage(model_state_dict())
        stager.close()
    assert stager.pin_memory_min_bytes == 5


def test_state_dict_stager_close() -> None:
    stager = compat.StateDictStager()
    sd = model_state_dict()
    staged = stager.stage(sd)
    stager.close()
    assert stager.cache_info() == astage.CacheInfo(0, 0, 0)
    assert_tree_staged(staged, sd)  # results handed out stay valid
    with pytest.raises(astage.StagerClosedError):
        stager.stage(sd)
    stager.close()  # twice is fine


@pytest.mark.cuda
def test_state_dict_stager_pins_above_the_threshold_on_cuda() -> None:
    sd = {"big": torch.randn(1024, device="cuda"), "tiny": torch.ones(1, device="cuda")}
    with compat.StateDictStager(pin_memory=True, pin_memory_min_bytes=64) as stager:
        staged = stager.stage(sd)
        assert staged["big"].is_pinned()
        assert not staged["tiny"].is_pinned()
        assert stager.cache_info().pinned_nbytes == 4096
        assert same_values(staged["big"], sd["big"])
        sd["big"].add_(1)
        staged = stager.stage(sd, non_blocking=True)
        assert same_values(staged["big"], sd["big"])


@pytest.mark.cuda
def test_state_dict_stager_without_pinning_on_cuda() -> None:
    with compat.StateDictStager(pin_memory=False) as stager:
        staged = stager.stage({"w": torch.randn(1024, device="cuda")})
        assert staged["w"].device.type == "cpu"
        assert not staged["w"].is_pinned()


# -- DefaultStager: configuration ---------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        cpu_config(),
        CheckpointStagerConfig(False, False, False, False),
        types.SimpleNamespace(
            use_pinned_memory=False,
            use_shared_memory=True,
            use_async_staging=False,
            use_non_blocking_copy=False,
        ),
    ],
    ids=["StagingOptions", "CheckpointStagerConfig", "any object"],
)
def test_default_stager_takes_any_dcp_config(config: Any) -> None:
    with compat.DefaultStager(config) as stager:
        assert stager.config is config
        sd = model_state_dict()
        assert_tree_staged(stager.stage(sd), sd)


def test_default_stager_refuses_a_config_without_the_flags() -> None:
    with pytest.raises(astage.InvalidOptionsError, match="use_non_blocking_copy"):
        compat.DefaultStager(types.SimpleNamespace(use_pinned_memory=False))


@cpu_only
def test_default_stager_refuses_non_blocking_copies_without_an_accelerator() -> None:
    config = cpu_config()
    config.use_non_blocking_copy = True
    with pytest.raises(astage.InvalidOptionsError, match="use_non_blocking_copy") as error:
        compat.DefaultStager(config)
    assert isinstance(error.value, ValueError)
    with pytest.raises(astage.InvalidOptionsError):
        compat.DefaultStager()  # DCP's defaults ask for non-blocking copies too


@cpu_only
@pytest.mark.parametrize("config", [compat.StagingOptions(), CheckpointStagerConfig()])
def test_non_blocking_copies_without_an_accelerator_raise_what_dcp_raises(config: Any) -> None:
    # DCP's callers catch AssertionError here; astage's error is also one.
    with pytest.raises(AssertionError):
        DcpExperimentalDefaultStager(config)
    with pytest.raises(AssertionError, match="use_non_blocking_copy") as error:
        compat.DefaultStager(config)
    assert isinstance(error.value, astage.AcceleratorUnavailableError)
    assert isinstance(error.value, astage.InvalidOptionsError)


@cpu_only
def test_default_stager_pinning_without_cuda_warns_once() -> None:
    with pytest.warns(UserWarning, match="CUDA is not available") as record:
        stager = compat.DefaultStager(cpu_config(pinned=True))
    assert len(record) == 1
    assert record[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        staged = stager.stage({"w": torch.randn(1 << 16)})
    assert not isinstance(staged, concurrent.futures.Future)  # cpu_config(): synchronous
    assert not staged["w"].is_pinned()
    stager.close()


def test_default_stager_shared_memory() -> None:
    with compat.DefaultStager(cpu_config(shared=True)) as stager:
        staged = stager.stage({"w": torch.randn(8)})
        assert not isinstance(staged, concurrent.futures.Future)
        assert staged["w"].is_shared()


def test_default_stager_overrides_astage_options() -> None:
    with compat.DefaultStager(cpu_config(), chunk_bytes=1 << 20, max_inflight_bytes=1 << 21) as s:
        sd = {"w": torch.randn(1 << 19)}  # 2 MiB: copied in two chunks
        assert_tree_staged(s.stage(sd), sd)
    with pytest.raises(astage.InvalidOptionsError, match="unknown"):
        compat.DefaultStager(cpu_config(), use_magic=True)
    with pytest.raises(astage.InvalidOptionsError, match="chunk_bytes"):
        compat.DefaultStager(cpu_config(), chunk_bytes=0)


@cpu_only
def test_default_stager_refuses_a_non_blocking_override_without_cuda() -> None:
    with pytest.raises(astage.InvalidOptionsError, match="non_blocking"):
        compat.DefaultStager(cpu_config(), non_blocking=True)  # at construction, not staging


def test_default_stager_is_a_dcp_async_stager(default_stager: compat.DefaultStager) -> None:
    assert isinstance(default_stager, dcp_staging.AsyncStager)
    assert default_stager.should_synchronize_after_execute  # as DCP's DefaultStager


def test_default_stager_is_a_dcp_experimental_checkpoint_stager(
    default_stager: compat.DefaultStager,
) -> None:
    # DCP's experimental Checkpointer takes a CheckpointStager (an ABC) with its config.
    assert isinstance(default_stager, CheckpointStager)
    assert issubclass(compat.DefaultStager, CheckpointStager)


def test_default_stager_accepts_and_ignores_extra_keyword_arguments(
    default_stager: compat.DefaultStager,
) -> None:
    sd = model_state_dict()
    assert_tree_staged(resolve(default_stager.stage(sd, extra=1, non_blocking=False)), sd)


# -- DefaultStager: staging ---------------------------------------------------------------------


def test_default_stager_returns_a_dict_or_a_future() -> None:
    sd = model_state_dict()
    with compat.DefaultStager(cpu_config(async_staging=False)) as stager:
        staged = stager.stage(sd)
        assert type(staged) is dict
        assert_tree_staged(staged, sd)
    with compat.DefaultStager(cpu_config(async_staging=True)) as stager:
        future = stager.stage(sd)
        assert isinstance(future, concurrent.futures.Future)
        assert_tree_staged(future.result(timeout=30), sd)


def test_default_stager_stages_in_another_thread() -> None:
    seen: list[str] = []

    class Probe:
        def __reduce_ex__(self, protocol: Any) -> Any:
            seen.append(threading.current_thread().name)
            return (Probe, ())

    with compat.DefaultStager(cpu_config(async_staging=True)) as stager:
        stager.stage({"probe": Probe()}).result(timeout=30)
    assert seen and seen[0].startswith("astage-compat")


def test_synchronize_staging_waits_for_the_last_call() -> None:
    release = threading.Event()

    class Slow:
        def __reduce_ex__(self, protocol: Any) -> Any:
            assert release.wait(timeout=30)
            return (Slow, ())

    with compat.DefaultStager(cpu_config(async_staging=True)) as stager:
        future = stager.stage({"slow": Slow(), "w": torch.randn(4)})
        assert not future.done()
        threading.Timer(0.05, release.set).start()
        stager.synchronize_staging()
        assert future.done()
    with compat.DefaultStager(cpu_config()) as stager:
        stager.synchronize_staging()  # nothing staged, nothing to wait for


def test_async_staging_errors_reach_the_future_and_synchronize() -> None:
    with compat.DefaultStager(cpu_config(async_staging=True)) as stager:
        future = stager.stage({"lock": threading.Lock()})
        with pytest.raises(astage.UnstageableError, match=r"\['lock'\]"):
            future.result(timeout=30)
        with pytest.raises(astage.UnstageableError):
            stager.synchronize_staging()
        sd = model_state_dict()
        assert_tree_staged(stager.stage(sd).result(timeout=30), sd)  # the stager still works


def test_async_staging_keeps_the_order_of_calls() -> None:
    with compat.DefaultStager(cpu_config(async_staging=True)) as stager:
        sds = [{"i": i, "w": torch.full((8,), float(i))} for i in range(5)]
        futures = [stager.stage(sd) for sd in sds]
        results = [f.result(timeout=30) for f in futures]
    assert [r["i"] for r in results] == list(range(5))
    for i, result in enumerate(results):
        assert torch.equal(result["w"], torch.full((8,), float(i)))


def test_default_stager_close_and_context_manager(default_stager: compat.DefaultStager) -> None:
    sd = model_state_dict()
    staged = resolve(default_stager.stage(sd))
    default_stager.close()
    assert default_stager.cache_info() == astage.CacheInfo(0, 0, 0)
    assert_tree_staged(staged, sd)
    with pytest.raises(astage.StagerClosedError):
        default_stager.stage(sd)
    with pytest.raises(astage.StagerClosedError):
        default_stager.__enter__()
    default_stager.close()


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (compat.StateDictStager, "StateDictStager"),
        (lambda: compat.DefaultStager(cpu_config()), "DefaultStager"),
        (lambda: compat.DefaultStager(cpu_config(async_staging=True)), "DefaultStager"),
        (compat.BlockingAsyncStager, "BlockingAsyncStager"),
        (lambda: compat.BlockingAsyncStager(cache_staged_state_dict=True), "BlockingAsyncStager"),
    ],
    ids=["state-dict", "default", "default-async", "blocking", "blocking-cached"],
)
def test_a_closed_stager_names_the_class_the_user_holds(make: Any, name: str) -> None:
    # Regression: the message named astage's inner SyncStager, or "this stager".
    stager = make()
    stager.close()
    with pytest.raises(astage.StagerClosedError, match=rf"^this {name} is closed$"):
        stager.stage({"w": torch.randn(4)})


def test_close_waits_for_staging_in_progress() -> None:
    stager = compat.DefaultStager(cpu_config(async_staging=True))
    futures = [stager.stage(model_state_dict(seed)) for seed in range(3)]
    stager.close()
    assert all(f.done() and f.exception() is None for f in futures)


# -- DefaultStager: many saves with one stager ----------------------------------------------------


def test_many_saves_reuse_the_same_buffers(default_stager: compat.DefaultStager) -> None:
    sd = model_state_dict()
    pointers, infos = [], []
    for _ in range(5):
        staged = resolve(default_stager.stage(sd))
        assert_tree_staged(staged, sd)
        pointers.append([storage_ptr(t) for t in tensors_of(staged)])
        infos.append(default_stager.cache_info())
        del staged  # the upload is done with it
        mutate_(sd)
    assert all(p == pointers[0] for p in pointers)
    assert all(info == infos[0] for info in infos)
    assert default_stager.last_stats is not None
    assert default_stager.last_stats.new_nbytes == 0


@pytest.mark.parametrize(
    ("overrides", "shared"),
    [({}, False), ({"huge_pages": True}, False), ({}, True)],
    ids=["plain", "huge-pages", "shared-memory"],
)
@pytest.mark.parametrize("async_staging", [False, True], ids=["sync", "async"])
def test_saves_of_large_tensors_reuse_the_same_buffers(
    overrides: dict[str, Any], shared: bool, async_staging: bool
) -> None:
    """Buffers of every size and kind come free once the snapshot is dropped.

    Large buffers live on mappings of their own (page-aligned, or huge pages): the pool must
    still see them unused once the upload has let go of the snapshot, or every save pays for a
    new buffer set (fresh memory: a first call's cost, and twice the host memory meanwhile).
    """
    sd = {
        "small": torch.randn(64),
        "page_aligned": torch.randn(3 << 18),  # 3 MiB: a mapping of its own
        "huge": torch.randn(1 << 20).view(512, 2048),  # 4 MiB, 2-D: staged as a typed twin
        "flat_view": torch.randn(1 << 19)[1:],  # a view: staged into a flat uint8 buffer
    }
    config = cpu_config(async_staging=async_staging, shared=shared)
    with compat.DefaultStager(config, **overrides) as stager:
        for step in range(3):
            staged = resolve(stager.stage(sd))
            assert_tree_staged(staged, sd)
            del staged  # the upload is done with it
            mutate_(sd)
            assert stager.last_stats is not None
            if step:
                assert stager.last_stats.new_nbytes == 0, f"save {step + 1} allocated"
        assert stager._pool.sets == 1


def test_a_snapshot_still_read_is_never_overwritten(
    default_stager: compat.DefaultStager,
) -> None:
    sd = model_state_dict()
    expected_1 = {k: v.clone() for k, v in sd["model"].items()}
    snapshot_1 = resolve(default_stager.stage(sd))  # an upload still holds it
    mutate_(sd)
    snapshot_2 = resolve(default_stager.stage(sd))
    for key, value in expected_1.items():
        assert torch.equal(snapshot_1["model"][key], value), key
    assert_tree_staged(snapshot_2, sd)
    assert storage_ptr(snapshot_2["model"]["proj.bias"]) != storage_ptr(
        snapshot_1["model"]["proj.bias"]
    )
    # Once the first snapshot is released, its buffers serve the next save.
    released = storage_ptr(snapshot_1["model"]["proj.bias"])
    del snapshot_1
    snapshot_3 = resolve(default_stager.stage(sd))
    assert storage_ptr(snapshot_3["model"]["proj.bias"]) == released
    assert default_stager.last_stats is not None
    assert default_stager.last_stats.new_nbytes == 0


def test_a_derived_tensor_keeps_its_snapshot_safe(default_stager: compat.DefaultStager) -> None:
    sd = {"w": torch.arange(6.0)}
    staged = resolve(default_stager.stage(sd))
    half = staged["w"][:3].detach()  # e.g. a writer's view of one chunk
    del staged
    sd["w"].add_(10)
    resolve(default_stager.stage(sd))
    assert torch.equal(half, torch.arange(3.0))


def test_buffer_sets_follow_the_snapshots_alive(default_stager: compat.DefaultStager) -> None:
    """No leak: as many buffer sets as snapshots alive plus one, never more."""
    sd = model_state_dict()
    alive: list[Any] = [resolve(default_stager.stage(sd))]
    one_set = default_stager.cache_info().nbytes
    for step in range(12):
        held = step % 3  # zero to two earlier snapshots still being written
        del alive[: len(alive) - held]
        alive.append(resolve(default_stager.stage(sd)))
        assert default_stager.cache_info().nbytes == (held + 1) * one_set
    alive.clear()
    resolve(default_stager.stage(sd))
    assert default_stager.cache_info().nbytes == one_set  # idle sets were let go


def test_buffers_of_dead_sources_are_released(default_stager: compat.DefaultStager) -> None:
    for seed in range(5):
        sd = model_state_dict(seed)  # a new model every time; the last one dies here
        resolve(default_stager.stage(sd))
        assert default_stager.cache_info().storages == 8  # this model's storages only
    del sd
    assert default_stager.cache_info() == astage.CacheInfo(0, 0, 0)


@pytest.mark.cuda
@pytest.mark.parametrize("async_staging", [False, True])
def test_default_stager_on_cuda_keeps_its_pinned_cache(async_staging: bool) -> None:
    config = compat.StagingOptions(True, False, async_staging, True)
    sd = {"w": torch.randn(1 << 16, device="cuda"), "step": torch.tensor(3.0, device="cuda")}
    with compat.DefaultStager(config) as stager:
        pointers = None
        for _ in range(3):
            staged = resolve(stager.stage(sd))
            assert staged["w"].is_pinned()
            assert same_values(staged["w"], sd["w"])
            pointer = storage_ptr(staged["w"])
            assert pointers is None or pointer == pointers
            pointers = pointer
            del staged
            sd["w"].mul_(2)
        assert stager.cache_info().pinned_nbytes >= sd["w"].nbytes


@pytest.mark.cuda
def test_async_staging_waits_for_the_callers_stream() -> None:
    """Values written by kernels still queued on the caller's stream are the ones staged."""
    config = compat.StagingOptions(True, False, True, True)
    side = torch.cuda.Stream()
    source = torch.zeros(1 << 22, device="cuda")
    with compat.DefaultStager(config) as stager, torch.cuda.stream(side):
        for value in (1.0, 2.0, 3.0):
            torch.cuda._sleep(5_000_000)  # keep the stream busy, so the fill is still queued
            source.fill_(value)
            staged = stager.stage({"w": source}).result(timeout=60)
            assert bool((staged["w"] == value).all())
            del staged


# -- BlockingAsyncStager ------------------------------------------------------------------------


@pytest.mark.parametrize("cache", [False, True])
def test_blocking_stager_is_a_dcp_async_stager(cache: bool) -> None:
    stager = compat.BlockingAsyncStager(cache_staged_state_dict=cache)
    assert isinstance(stager, dcp_staging.AsyncStager)
    assert not stager.should_synchronize_after_execute  # as DCP's
    sd = model_state_dict()
    assert_tree_staged(stager.stage(sd), sd)
    stager.synchronize_staging()
    stager.close()


def test_blocking_stager_without_cache_returns_fresh_memory() -> None:
    stager = compat.BlockingAsyncStager()
    sd = model_state_dict()
    first = stager.stage(sd)
    assert stager.cache_info() == astage.CacheInfo(0, 0, 0)  # nothing kept
    mutate_(sd)
    second = stager.stage(sd)
    assert storage_ptr(first["model"]["proj.bias"]) != storage_ptr(second["model"]["proj.bias"])
    assert not torch.equal(first["model"]["proj.bias"], second["model"]["proj.bias"])
    assert_tree_staged(second, sd)
    stager.close()


def test_blocking_stager_caches_on_a_cpu_only_machine_too() -> None:
    stager = compat.BlockingAsyncStager(cache_staged_state_dict=True)
    sd = model_state_dict()
    first = stager.stage(sd)
    kept = first["model"]["proj.bias"].clone()
    mutate_(sd)
    second = stager.stage(sd)  # the first snapshot is alive: not overwritten
    assert torch.equal(first["model"]["proj.bias"], kept)
    pointer = storage_ptr(second["model"]["proj.bias"])
    one_set = stager.cache_info().nbytes // 2
    del first, second
    mutate_(sd)
    third = stager.stage(sd)  # both free: the buffers of the last one are reused
    assert_tree_staged(third, sd)
    assert storage_ptr(third["model"]["proj.bias"]) == pointer
    assert stager.cache_info().nbytes == one_set
    stager.close()
    assert stager.cache_info() == astage.CacheInfo(0, 0, 0)


@pytest.mark.parametrize("cache", [False, True])
def test_blocking_stager_type_check(cache: bool) -> None:
    stager = compat.BlockingAsyncStager(cache_staged_state_dict=cache, type_check=True)
    sd = model_state_dict()
    assert_tree_staged(stager.stage(sd), sd)  # tensors, numbers, strings, lists, tuples
    sd["optim"]["param_groups"][0]["schedule"] = {1, 2}
    with pytest.raises(astage.UnstageableError, match=r"\['param_groups'\]\[0\]\['schedule'\]"):
        stager.stage(sd)
    stager.close()


def test_blocking_stager_without_type_check_copies_any_object() -> None:
    stager = compat.BlockingAsyncStager()
    moments = _Moments(torch.randn(3), 1)
    staged = stager.stage({"m": moments, "s": {1, 2}})
    assert staged["s"] == {1, 2}
    assert_staged(staged["m"].exp_avg, moments.exp_avg)
    stager.close()


@pytest.mark.cuda
def test_blocking_stager_with_cache_pins_on_cuda() -> None:
    stager = compat.BlockingAsyncStager(cache_staged_state_dict=True)
    staged = stager.stage({"w": torch.randn(1 << 16, device="cuda")})
    assert staged["w"].is_pinned()
    stager.close()


# -- _ReplicationStager (its exchanges: tests/test_replication_peers.py) ------------------------


def test_replication_stager_is_importable_with_dcps_constructor() -> None:
    import inspect
    import os
    import tempfile

    import torch.distributed as dist

    ours = inspect.signature(compat._ReplicationStager.__init__).parameters
    theirs = inspect.signature(dcp_staging._ReplicationStager.__init__).parameters
    assert list(ours) == list(theirs)
    assert [p.default for p in ours.values()] == [p.default for p in theirs.values()]
    if dist.is_initialized():  # pragma: no cover - another test left a group behind
        pytest.skip("a process group is initialized in this process")
    stager = compat._ReplicationStager(None)
    try:
        assert isinstance(stager, dcp_staging.AsyncStager)
        assert not stager.should_synchronize_after_execute  # as DCP's
        # no storage_dir: a fresh temporary directory, as DCP's
        assert os.path.dirname(stager.storage_dir) == tempfile.gettempdir()
        assert os.path.basename(stager.storage_dir).startswith("replication_stager_")
        assert os.path.isdir(stager.storage_dir)
        sd = {"w": torch.ones(2)}
        assert stager.stage(sd, extra=1) is sd  # without a process group, as DCP does
    finally:
        stager.close()
        os.rmdir(stager.storage_dir)
    with pytest.raises(astage.StagerClosedError, match="_ReplicationStager"):
        stager.stage(sd)


def test_replication_stager_refuses_a_device_other_than_the_cpu(tmp_path: Any) -> None:
    with pytest.raises(astage.InvalidOptionsError, match="device"):
        compat._ReplicationStager(None, device=torch.device("cuda"), storage_dir=str(tmp_path))
