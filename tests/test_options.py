"""StagingOptions: a frozen keyword dataclass, validated, resolved per machine."""

from __future__ import annotations

import asyncio
import dataclasses
import warnings

import pytest
import torch
from conftest import HAS_CUDA

import astage
from astage._options import make_options


def test_is_a_frozen_dataclass() -> None:
    opts = astage.StagingOptions()
    assert dataclasses.is_dataclass(opts)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.pin_memory = False  # type: ignore[misc]


def test_contract_fields_and_defaults() -> None:
    # DESIGN.md section 1: the four documented fields and their documented defaults.
    opts = astage.StagingOptions()
    assert opts.pin_memory is None
    assert opts.share_memory is False
    assert opts.non_blocking is None
    assert isinstance(opts.pin_memory_min_bytes, int)
    assert opts.pin_memory_min_bytes > 0


def test_keyword_construction() -> None:
    opts = astage.StagingOptions(pin_memory=False, share_memory=True, pin_memory_min_bytes=1)
    assert (opts.pin_memory, opts.share_memory, opts.pin_memory_min_bytes) == (False, True, 1)


def test_options_are_hashable_and_compare_by_value() -> None:
    assert astage.StagingOptions(pin_memory=False) == astage.StagingOptions(pin_memory=False)
    assert len({astage.StagingOptions(), astage.StagingOptions()}) == 1


def test_fields_are_keyword_only() -> None:
    # DESIGN.md: a keyword dataclass; positional use would break when fields are added.
    with pytest.raises(TypeError):
        astage.StagingOptions(True)  # type: ignore[misc]


def test_defaults_resolve_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolved = astage.StagingOptions().resolve()
    assert resolved.pin_memory is torch.accelerator.is_available()
    assert resolved.non_blocking is torch.accelerator.is_available()
    assert resolved.copy_threads >= 1


def test_auto_flags_follow_any_accelerator_not_only_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    # An XPU or MPS machine: torch.accelerator has one, torch.cuda does not. Regression: the
    # flags resolved off there (pageable buffers, blocking copies), and non_blocking=True was
    # refused as "needs CUDA".
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    resolved = astage.StagingOptions().resolve()
    assert resolved.pin_memory is True and resolved.non_blocking is True
    assert astage.StagingOptions(non_blocking=True).resolve().non_blocking is True
    assert astage.StagingOptions(pin_memory=False).resolve().pin_memory is False


def test_no_accelerator_resolves_off_and_refuses_non_blocking(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    resolved = astage.StagingOptions().resolve()
    assert resolved.pin_memory is False and resolved.non_blocking is False
    with pytest.raises(astage.InvalidOptionsError, match="non_blocking=True needs an accelerator"):
        astage.StagingOptions(non_blocking=True).resolve()
    # pin_memory=True stays asked for: the device layer pins only buffers of sources whose
    # backend asks for it, and without an accelerator there are none (see the tests below).
    assert astage.StagingOptions(pin_memory=True).resolve().pin_memory is True


@pytest.mark.skipif(HAS_CUDA, reason="checks that nothing initialises CUDA")
def test_resolving_initialises_no_device() -> None:
    astage.StagingOptions().resolve()
    assert not torch.cuda.is_initialized()


def test_stagers_construct_without_warnings() -> None:
    async def build() -> None:
        await astage.Stager().aclose()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        astage.SyncStager().close()
        asyncio.run(build())


@pytest.mark.skipif(HAS_CUDA, reason="checks the behaviour without CUDA")
def test_non_blocking_without_cuda_is_refused_at_construction() -> None:
    opts = astage.StagingOptions(non_blocking=True)  # the dataclass itself is hardware-agnostic
    with pytest.raises(astage.InvalidOptionsError, match="non_blocking"):
        astage.SyncStager(opts)
    with pytest.raises(astage.InvalidOptionsError, match="non_blocking"):
        astage.Stager(opts)
    with pytest.raises(astage.InvalidOptionsError):
        astage.SyncStager(non_blocking=True)
    with pytest.raises(astage.AstageError):
        astage.Stager(non_blocking=True)


@pytest.mark.skipif(HAS_CUDA, reason="checks the behaviour without CUDA")
def test_non_blocking_false_without_cuda_is_fine() -> None:
    astage.SyncStager(non_blocking=False).close()


@pytest.mark.skipif(HAS_CUDA, reason="checks the behaviour without CUDA")
def test_pin_memory_true_without_cuda_is_accepted() -> None:
    with astage.SyncStager(pin_memory=True) as stager:
        assert stager.options.pin_memory is True
        assert stager.cache_info().pinned_nbytes == 0


@pytest.mark.skipif(HAS_CUDA, reason="checks the behaviour without CUDA")
def test_pin_memory_true_without_cuda_pins_nothing() -> None:
    # Regression: the first buffer >= pin_memory_min_bytes called cudaHostRegister and failed.
    with astage.SyncStager(pin_memory=True, pin_memory_min_bytes=1024) as stager:
        source = torch.arange(1 << 16, dtype=torch.float32)
        staged = stager.stage({"w": source})
        assert torch.equal(staged["w"], source)
        assert stager.cache_info().pinned_nbytes == 0

    async def stage_async() -> int:
        async with astage.Stager(pin_memory=True, pin_memory_min_bytes=1024) as stager:
            staged = await stager.stage({"w": source})
            assert torch.equal(staged["w"], source)
            return stager.cache_info().pinned_nbytes

    assert asyncio.run(stage_async()) == 0


def test_keyword_overrides_on_stagers() -> None:
    base = astage.StagingOptions(share_memory=True, pin_memory_min_bytes=123)
    with astage.SyncStager(base, pin_memory=False) as stager:
        assert stager.options.pin_memory is False
        assert stager.options.share_memory is True  # the rest comes from ``base``
        assert stager.options.pin_memory_min_bytes == 123
    assert base.pin_memory is None  # the given options are not changed

    async def build() -> astage.StagingOptions:
        async with astage.Stager(pin_memory=False, chunk_bytes=1 << 20) as stager:
            return stager.options

    opts = asyncio.run(build())
    assert (opts.pin_memory, opts.chunk_bytes) == (False, 1 << 20)


def test_stager_without_options_uses_defaults() -> None:
    with astage.SyncStager() as stager:
        assert stager.options == astage.StagingOptions()


@pytest.mark.parametrize("factory", [astage.SyncStager, astage.Stager], ids=["sync", "async"])
def test_unknown_override_is_refused(factory: type) -> None:
    with pytest.raises(astage.InvalidOptionsError, match="pin_memroy"):
        factory(pin_memroy=False)


def test_replace_rejects_unknown_names() -> None:
    with pytest.raises(astage.InvalidOptionsError):
        astage.StagingOptions().replace(nope=1)
    assert astage.StagingOptions().replace(chunk_bytes=1 << 20).chunk_bytes == 1 << 20


def test_options_must_be_staging_options() -> None:
    with pytest.raises(astage.InvalidOptionsError):
        make_options({"pin_memory": False}, {})  # type: ignore[arg-type]
    with pytest.raises(astage.InvalidOptionsError):
        astage.SyncStager({"pin_memory": False})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "changes",
    [
        {"chunk_bytes": -1},
        {"chunk_bytes": 0},
        {"chunk_bytes": 1.5},
        {"chunk_bytes": True},  # a bool is not a byte count
        {"max_inflight_bytes": 0},
        {"max_inflight_bytes": 1 << 20, "chunk_bytes": 2 << 20},  # less than one chunk
        {"pin_memory_min_bytes": -1},
        {"pin_memory_min_bytes": "64k"},
        {"copy_threads": -2},
        {"max_loop_hold_s": 0},
        {"max_loop_hold_s": -0.1},
        {"max_loop_hold_s": float("nan")},
    ],
    ids=repr,
)
def test_invalid_values_are_refused(changes: dict[str, object]) -> None:
    with pytest.raises(astage.InvalidOptionsError):
        astage.StagingOptions(**changes)  # type: ignore[arg-type]
    with pytest.raises(astage.InvalidOptionsError):
        astage.SyncStager(None, **changes)


def test_non_number_loop_hold_is_an_options_error() -> None:
    # Regression: the comparison in __post_init__ used to raise a bare TypeError.
    with pytest.raises(astage.InvalidOptionsError):
        astage.StagingOptions(max_loop_hold_s="fast")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name", ["pin_memory", "non_blocking", "share_memory", "pause_gc", "replay"]
)
def test_non_bool_flags_are_refused(name: str) -> None:
    # Regression: pin_memory='no' was accepted and resolved to a truthy 'no'.
    with pytest.raises(astage.InvalidOptionsError):
        astage.StagingOptions(**{name: "no"})  # type: ignore[arg-type]


def test_valid_extremes_are_accepted() -> None:
    opts = astage.StagingOptions(
        chunk_bytes=1, max_inflight_bytes=1, pin_memory_min_bytes=0, copy_threads=1
    )
    assert opts.resolve().copy_threads == 1


def test_buffers_is_a_positive_int_carried_into_the_resolved_options() -> None:
    assert astage.StagingOptions().buffers == 1
    assert astage.StagingOptions(buffers=3).resolve().buffers == 3
    for bad in (0, -2, 2.0, True, None):
        with pytest.raises(astage.InvalidOptionsError, match="buffers"):
            astage.StagingOptions(buffers=bad)  # type: ignore[arg-type]


def test_replay_is_on_by_default_and_carried_into_the_resolved_options() -> None:
    assert astage.StagingOptions().replay is True
    assert astage.StagingOptions().resolve().replay is True
    assert astage.StagingOptions(replay=False).resolve().replay is False
