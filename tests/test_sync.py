"""The blocking driver: no loop needed, usable inside a running loop and from many threads."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import anyio
import pytest
import torch
from conftest import (
    assert_tree_staged,
    big_state_dict,
    in_a_forked_child,
    model_state_dict,
    mutate_,
    storage_ptr,
    tensors_of,
)

import astage
from astage._core._batches import Batch
from astage._devices._backend import Completion, Mark, installed

MiB = 1 << 20


def test_stage_without_a_running_loop() -> None:
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()
    source = model_state_dict()
    with astage.SyncStager() as stager:
        assert_tree_staged(stager.stage(source), source)


def test_starts_no_threads() -> None:
    before = set(threading.enumerate())
    with astage.SyncStager(chunk_bytes=MiB) as stager:
        stager.stage(big_state_dict(4, 2 * MiB, small=100))
        assert set(threading.enumerate()) == before


def _legacy_checkpoint(stager: astage.SyncStager, source: object) -> object:
    """Synchronous library code that knows nothing about event loops."""
    return stager.stage(source)


@pytest.mark.asyncio
@pytest.mark.allow_blocking("a SyncStager blocks the loop it is called from, by design")
async def test_stage_called_from_inside_a_running_loop() -> None:
    source = model_state_dict()
    with astage.SyncStager() as stager:
        assert anyio.get_current_task() is not None  # inside a running loop (any backend)
        staged = _legacy_checkpoint(stager, source)
    assert_tree_staged(staged, source)


def test_stage_inside_asyncio_run() -> None:
    source = model_state_dict()
    stager = astage.SyncStager()

    async def main() -> object:
        return _legacy_checkpoint(stager, source)

    try:
        assert_tree_staged(asyncio.run(main()), source)
    finally:
        stager.close()


def test_concurrent_threads_get_correct_results() -> None:
    sources = [model_state_dict(seed=i) for i in range(6)]
    shared = big_state_dict(4, MiB)
    with astage.SyncStager() as stager:

        def work(index: int) -> None:
            for _ in range(5):
                assert_tree_staged(stager.stage(sources[index]), sources[index])
                assert_tree_staged(stager.stage(shared), shared)

        with ThreadPoolExecutor(6) as pool:
            for future in [pool.submit(work, i) for i in range(6)]:
                future.result()
        # One buffer per distinct source storage, however many threads asked.
        distinct = {t.untyped_storage()._cdata for sd in [*sources, shared] for t in tensors_of(sd)}
        assert stager.cache_info().storages == len(distinct)


def test_close_and_staging_after_close() -> None:
    stager = astage.SyncStager()
    source = {"w": torch.randn(8)}
    staged = stager.stage(source)
    stager.close()
    assert stager.cache_info() == astage.CacheInfo(0, 0, 0)
    assert torch.equal(staged["w"], source["w"])  # results outlive the stager
    with pytest.raises(astage.StagerClosedError):
        stager.stage(source)
    stager.close()  # twice is fine


def test_with_statement_closes() -> None:
    with astage.SyncStager() as stager:
        assert isinstance(stager, astage.SyncStager)
        stager.stage({"w": torch.randn(2)})
    with pytest.raises(astage.AstageError):
        stager.stage({"w": torch.randn(2)})
    with pytest.raises(astage.StagerClosedError), stager:
        pass


def test_with_statement_closes_on_error() -> None:
    with pytest.raises(KeyError), astage.SyncStager() as stager:
        stager.stage({"w": torch.randn(2)})
        raise KeyError("caller's error")
    assert stager.cache_info().storages == 0


def test_reuse_and_fresh_values() -> None:
    source = model_state_dict()
    with astage.SyncStager() as stager:
        first = stager.stage(source)
        mutate_(source)
        second = stager.stage(source)
        assert storage_ptr(first["optim"]["state"][0]["exp_avg"]) == storage_ptr(
            second["optim"]["state"][0]["exp_avg"]
        )
        assert_tree_staged(second, source)
        stats = stager.last_stats
        assert stats is not None and stats.new_nbytes == 0


def test_options_property() -> None:
    opts = astage.StagingOptions(pin_memory=False, chunk_bytes=MiB)
    with astage.SyncStager(opts) as stager:
        assert stager.options is opts


def test_large_tensors_with_small_chunks() -> None:
    source = big_state_dict(3, 3 * MiB + 12)
    with astage.SyncStager(chunk_bytes=256 * 1024, max_inflight_bytes=MiB) as stager:
        assert_tree_staged(stager.stage(source), source)


def test_collector_is_left_enabled_from_many_threads() -> None:
    # Each stager pauses the cyclic collector while it walks; overlapping walks in several
    # threads (several stagers) must still leave it enabled.
    stagers = [astage.SyncStager() for _ in range(3)]
    source = big_state_dict(0, 0, small=2000)

    def work(stager: astage.SyncStager) -> None:
        for _ in range(3):
            stager.stage(source)
        with pytest.raises(astage.UnstageableError):
            stager.stage({"x": torch.empty(1, device="meta")})

    with ThreadPoolExecutor(3) as pool:
        for future in [pool.submit(work, s) for s in stagers]:
            future.result()
    for stager in stagers:
        stager.close()
    assert gc.isenabled()


# -- buffer holds --------------------------------------------------------------------------------


def test_a_hold_blocks_the_next_call_until_released() -> None:
    source = {"w": torch.zeros(16)}
    with astage.SyncStager() as stager:
        staged = stager.stage(source)
        hold = stager.hold_buffers()
        with ThreadPoolExecutor(1) as pool:
            again = pool.submit(stager.stage, {"w": torch.ones(16)})
            time.sleep(0.1)
            assert not again.done()  # waiting for the hold
            assert torch.equal(staged["w"], torch.zeros(16))  # the held buffer is untouched
            hold.release()
            assert torch.equal(again.result(timeout=5)["w"], torch.ones(16))
        hold.release()  # idempotent


def test_close_waits_for_holds() -> None:
    source = {"w": torch.randn(8)}
    stager = astage.SyncStager()
    stager.stage(source)
    hold = stager.hold_buffers()
    timer = threading.Timer(0.1, hold.release)
    timer.start()
    started = time.perf_counter()
    stager.close()
    assert time.perf_counter() - started >= 0.09
    assert hold.released and stager.closed
    assert stager.cache_info().storages == 0


def test_a_hold_as_a_context_manager() -> None:
    with astage.SyncStager() as stager:
        with stager.hold_buffers() as hold:
            assert not hold.released
        assert hold.released
        stager.stage({"w": torch.randn(2)})  # does not wait


def test_clear_cache_is_refused_during_a_call() -> None:
    stager = astage.SyncStager()
    hold = stager.hold_buffers()
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(stager.stage, {"w": torch.randn(2)})
        time.sleep(0.05)
        with pytest.raises(astage.BusyError, match="clear_cache"):
            stager.clear_cache()
        hold.release()
        waiting.result(timeout=5)
    stager.clear_cache()
    stager.close()


# -- the device layer, through an injected backend ------------------------------------------------


class RecordingBackend:
    """A device backend that owns no device: it records where and when it was asked to mark.

    Installed with ``astage._devices._backend.installed``, it is asked for the caller's current
    device at every call (``current_device``), so the ordering and refusals taken at the call
    can be observed on CPU. Its device is ``meta`` (no tensor of the tests is there).
    """

    device = torch.device("meta")

    def __init__(self, *, capturing: bool = False) -> None:
        self.capturing = capturing
        self.marks: list[tuple[torch.device, int]] = []  # (device, thread id)
        self.enqueued = 0

    def handles(self, device: torch.device) -> bool:
        return device == self.device

    def current_device(self) -> torch.device | None:
        return self.device

    def mark(self, device: torch.device) -> Mark:
        self.marks.append((device, threading.get_ident()))
        return Mark(device, object())

    def mark_after(self, source: object) -> Mark:
        return Mark(self.device, source)

    def is_capturing(self, device: torch.device) -> bool:
        return self.capturing

    def enqueue(self, batch: Batch, after: Sequence[Mark], *, non_blocking: bool) -> Completion:
        self.enqueued += 1
        raise AssertionError("no batch is on the meta device")

    def synchronize(self) -> None:
        pass


class FakeStream:
    """What ``after=`` needs of a stream of the recording backend: its device."""

    device = RecordingBackend.device


def test_a_call_marks_the_current_device_in_the_calling_thread() -> None:
    backend = RecordingBackend()
    with installed(backend), astage.SyncStager() as stager:
        stager.stage({"w": torch.ones(3)})
    assert backend.marks == [(RecordingBackend.device, threading.get_ident())]


def test_staging_while_capturing_is_refused_before_any_copy() -> None:
    backend = RecordingBackend(capturing=True)
    source = {"w": torch.ones(3)}
    with installed(backend), astage.SyncStager() as stager:
        with pytest.raises(astage.UsageError, match=r"meta.*capturing a graph"):
            stager.stage(source)
        assert stager.cache_info().storages == 0  # refused before the walk allocated anything
        assert backend.marks == []
        backend.capturing = False
        staged = stager.stage(source)  # the stager stays usable
    assert torch.equal(staged["w"], source["w"])


def test_after_takes_streams_and_events_of_a_device() -> None:
    backend = RecordingBackend()
    with installed(backend), astage.SyncStager() as stager:
        stager.stage({"w": torch.ones(1)}, after=[FakeStream(), FakeStream()])
        for wrong in (torch.ones(1), "stream", [None]):
            with pytest.raises(astage.InvalidOptionsError, match="after="):
                stager.stage({}, after=wrong)


def test_a_stager_from_before_a_fork_refuses_in_the_child() -> None:
    stager = astage.SyncStager()
    stager.stage({"w": torch.ones(3)})

    def child() -> None:
        with pytest.raises(astage.UsageError, match=r"before os\.fork"):
            stager.stage({"w": torch.ones(3)})
        stager.close()  # closing in the child touches nothing of the parent's
        with astage.SyncStager() as fresh:  # one made in the child works
            assert torch.equal(fresh.stage({"w": torch.ones(3)})["w"], torch.ones(3))

    assert in_a_forked_child(child) == 0
    assert torch.equal(stager.stage({"w": torch.ones(3)})["w"], torch.ones(3))  # parent: fine
    stager.close()


def test_a_call_inside_inference_mode_leaves_buffers_later_calls_can_use() -> None:
    """Buffers (and staged tensors) made while the caller runs in ``torch.inference_mode()``
    are normal tensors: a later call outside it copies into them, and its staged tensors take
    in-place updates ("Inplace update to inference tensor outside InferenceMode" before)."""
    source = model_state_dict()
    with astage.SyncStager() as stager:
        with torch.inference_mode():
            stager.reserve(model_state_dict(seed=1))  # another state dict: reserved, then staged
            staged = stager.stage(source)
            assert_tree_staged(staged, source)
        mutate_(source)
        for _ in range(2):  # a walk, then a replay
            staged = stager.stage(source)
            assert_tree_staged(staged, source)
            assert not any(t.is_inference() for t in tensors_of(staged))
            for t in tensors_of(staged):
                t.add_(0)


def test_a_default_device_does_not_move_the_staged_tensors() -> None:
    """``torch.set_default_device(...)`` in the caller's thread (``"cuda"`` in real code; the
    meta device here, which has no data) does not reach the tensors astage makes: staged views
    came back as meta tensors before."""
    source = model_state_dict()
    torch.set_default_device("meta")
    try:
        with astage.SyncStager() as stager:
            stager.reserve(source)
            for _ in range(2):  # a walk, then a replay
                staged = stager.stage(source)
                assert {t.device.type for t in tensors_of(staged)} == {"cpu"}
                assert_tree_staged(staged, source)
    finally:
        torch.set_default_device(None)
