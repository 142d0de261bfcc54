"""Copy threads run with a long scheduler slice (so a waking event loop preempts them), and
hand their thread back with its own slice, policy and nice value."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

import astage
from astage._devices import _host
from astage._drivers import _slices


def _in_thread(function: Callable[[], Any]) -> Any:
    """``function()`` run in a fresh thread: the attributes it changes are that thread's."""
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(function()))
    thread.start()
    thread.join()
    return result[0]


def _custom_slices_supported() -> bool:
    """Whether this kernel keeps a slice of a SCHED_OTHER thread's own (Linux 6.12+)."""
    scheduler = _slices._scheduler()
    if scheduler is None:
        return False

    def probe() -> bool:
        with _slices.copy_slice():
            attr = scheduler.get()
        return attr is not None and attr.sched_runtime == _slices.COPY_SLICE_NS

    return bool(_in_thread(probe))


needs_custom_slices = pytest.mark.skipif(
    not _custom_slices_supported(), reason="needs Linux 6.12+ (sched_setattr slices)"
)


def _attrs() -> tuple[int, int, int]:
    scheduler = _slices._scheduler()
    assert scheduler is not None
    attr = scheduler.get()
    assert attr is not None
    return attr.sched_policy, attr.sched_nice, attr.sched_runtime


@needs_custom_slices
def test_copy_slice_is_long_inside_and_restored_after() -> None:
    def run() -> tuple[tuple[int, int, int], ...]:
        before = _attrs()
        with _slices.copy_slice():
            inside = _attrs()
        return before, inside, _attrs()

    before, inside, after = _in_thread(run)
    assert inside == (before[0], before[1], _slices.COPY_SLICE_NS)
    assert after == before


@needs_custom_slices
def test_copy_slice_keeps_a_raised_nice_value() -> None:
    # Writing the attributes back with the nice value zeroed would lower a nice thread's
    # niceness (refused without privilege) or silently change it (with privilege).
    def run() -> tuple[tuple[int, int, int], ...]:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 5)
        with _slices.copy_slice():
            inside = _attrs()
        return inside, _attrs()

    inside, after = _in_thread(run)
    assert inside[1] == 5 and inside[2] == _slices.COPY_SLICE_NS
    assert after[1] == 5 and after[2] != _slices.COPY_SLICE_NS


@needs_custom_slices
def test_copy_slice_restores_after_an_error() -> None:
    def run() -> tuple[int, int, int]:
        with pytest.raises(ValueError), _slices.copy_slice():
            raise ValueError("copy failed")
        return _attrs()

    assert _in_thread(run)[2] != _slices.COPY_SLICE_NS


@needs_custom_slices
def test_a_longer_slice_of_the_threads_own_is_kept() -> None:
    longer = 2 * _slices.COPY_SLICE_NS

    def run() -> tuple[int, int]:
        with _slices.copy_slice(longer):
            own = _attrs()[2]
            with _slices.copy_slice():
                inside = _attrs()[2]
        return own, inside

    own, inside = _in_thread(run)
    assert inside == own  # the kernel clamps to 100 ms; whatever it kept, it stays


def test_copy_slice_is_a_no_op_without_the_system_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_slices, "_scheduler", lambda: None)
    ran: list[bool] = []
    with _slices.copy_slice():
        ran.append(True)
    assert ran == [True]
    assert _slices.in_copy_slice(sum, [1, 2]) == 3


@needs_custom_slices
@pytest.mark.asyncio
async def test_host_copies_run_with_the_copy_slice(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    copy = _host.foreach_copy_  # type: ignore[attr-defined]

    def watched(dsts: Any, srcs: Any) -> None:
        seen.append(_attrs()[2])
        copy(dsts, srcs)

    monkeypatch.setattr(_host, "foreach_copy_", watched)
    async with astage.Stager() as stager:
        staged = await stager.stage({"a": torch.arange(10.0), "b": torch.ones(3)})
    assert torch.equal(staged["a"], torch.arange(10.0))
    assert seen and all(runtime == _slices.COPY_SLICE_NS for runtime in seen)


@needs_custom_slices
@pytest.mark.asyncio
async def test_worker_threads_get_their_slice_back_after_a_call() -> None:
    import anyio.to_thread

    async with astage.Stager() as stager:
        for _ in range(3):
            await stager.stage({"a": torch.arange(10.0)})
        slices = [await anyio.to_thread.run_sync(lambda: _attrs()[2]) for _ in range(3)]
    assert _slices.COPY_SLICE_NS not in slices
