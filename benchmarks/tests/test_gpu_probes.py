"""The GPU probes run on CPU too (most of what they time then does not happen): a GPU session,
minutes long and rare, must not be the first to run their code."""

from __future__ import annotations

import asyncio
import asyncio.events

import pytest

from astage._devices import _generic, _pinning
from benchmarks import gpu_lag_probe, gpu_pin_probe


def test_the_lag_probe_reports_every_call_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_lag_probe, "SPANS", [])
    monkeypatch.setattr(gpu_lag_probe, "SAMPLES", [])
    # instrument() wraps these for good: each is put back after the test.
    for owner, name in (
        (asyncio.events.Handle, "_run"),
        (_generic.DeviceCompletion, "query"),
        (_generic.DeviceCompletion, "synchronize"),
        (_generic.GenericBackend, "enqueue"),
        (_pinning, "register"),
        (_pinning, "unregister"),
    ):
        monkeypatch.setattr(owner, name, getattr(owner, name))
    gpu_lag_probe.instrument()
    report = asyncio.run(gpu_lag_probe.probe("cpu", 16 << 20, 3, late_ms=0.0))
    assert [call["call"] for call in report["calls"]] == ["first", "cached 1", "cached 2"]
    for call in report["calls"]:
        assert call["seconds"] > 0 and call["loop"]["beats"] >= 0
        for late in call["late"]:  # every beat is "late" at 0 ms: each names what overlapped
            assert isinstance(late["spans"], list) and isinstance(late["loop_thread_at"], list)
    assert gpu_lag_probe.SAMPLES  # the loop thread was sampled


def test_the_pin_probe_says_it_needs_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_pin_probe.main() == 0
    assert "no CUDA device" in capsys.readouterr().out


def test_the_small_profile_times_interleaved_calls_on_cpu(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import torch

    from benchmarks import gpu_small_profile
    from benchmarks.state_dicts import small_optimizer_state

    gpu_small_profile.interleaved(small_optimizer_state(20), torch.device("cpu"), calls=2)
    out = capsys.readouterr().out
    assert "back to back" in out and "each after a DCP cached call" in out


def test_the_arena_probe_checks_its_pieces_on_cpu() -> None:
    import torch

    from benchmarks import gpu_arena_probe

    report = gpu_arena_probe.probe(60, torch.device("cpu"))
    assert report["tensors"] == 60 and report["nbytes"] > 0
    assert set(report["seconds"]) == {"scatter", "arena", "arena, pageable"}
    assert all(report["checks"].values()), report["checks"]
