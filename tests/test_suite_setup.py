"""The suite's own plumbing from conftest.py: markers, the event-loop legs, the trio runner, the
Driver's loops, the heartbeat and the blocking-call detector."""

from __future__ import annotations

import asyncio
import os
import textwrap
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import anyio
import anyio.lowlevel
import pytest
import pytest_asyncio
import uvloop
from conftest import (
    CPU_STEAL,
    DRIVERS,
    GC_CLOCK,
    HAS_CUDA,
    LOOP_FACTORIES,
    MARKERS,
    CpuSteal,
    Driver,
    _marker_reason,
    heartbeat,
    run_on_trio,
)

import astage

trio = pytest.importorskip("trio")  # the GPU machines carry no trio

LEGS = {"asyncio", "uvloop", "trio"}


def test_markers_are_registered(pytestconfig: pytest.Config) -> None:
    registered = {line.split(":")[0].split("(")[0] for line in pytestconfig.getini("markers")}
    assert set(MARKERS) <= registered


def test_cuda_tests_are_skipped_without_cuda(request: pytest.FixtureRequest) -> None:
    cuda_items = [i for i in request.session.items if i.get_closest_marker("cuda") is not None]
    if not any(item.path.name == "test_cuda.py" for item in request.session.items):
        pytest.skip("test_cuda.py is not part of this run")
    assert cuda_items
    for item in cuda_items:
        skipped = any(m.name == "skip" for m in item.iter_markers())
        assert skipped is not HAS_CUDA, item.nodeid


# -- the legs -----------------------------------------------------------------------------------


def _leg_of(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    if callspec is None or "_asyncio_loop_factory" not in callspec.params:
        return None
    factory = callspec.params["_asyncio_loop_factory"]
    return next(name for name, f in LOOP_FACTORIES.items() if f is factory)


def test_async_tests_are_collected_for_every_leg(request: pytest.FixtureRequest) -> None:
    legs: dict[str, set[str]] = {}
    for item in request.session.items:
        leg = _leg_of(item)
        if leg is not None:
            assert isinstance(item, pytest.Function)
            ids = item.callspec.id.split("-")
            assert leg in ids, item.nodeid  # the leg shows in the test id: test_x[trio]
            ids.remove(leg)
            legs.setdefault(f"{item.nodeid.partition('[')[0]}{ids}", set()).add(leg)
    if not legs:
        pytest.skip("no async tests in this run")
    for test, found in legs.items():
        asyncio_only = found == {"asyncio", "uvloop"}
        assert found == LEGS or asyncio_only, (test, found)


def test_asyncio_only_tests_skip_trio(request: pytest.FixtureRequest) -> None:
    marked = [i for i in request.session.items if i.get_closest_marker("asyncio_only")]
    assert any(i.name == "test_asyncio_only_runs_on_asyncio_loops[asyncio]" for i in marked)
    assert [i.nodeid for i in marked if _leg_of(i) == "trio"] == []


@pytest.mark.asyncio
async def test_each_leg_runs_on_its_own_loop(request: pytest.FixtureRequest) -> None:
    leg = _leg_of(request.node)
    assert trio.lowlevel.in_trio_run() == (leg == "trio")
    if leg != "trio":
        loop = asyncio.get_running_loop()
        assert isinstance(loop, uvloop.Loop) == (leg == "uvloop")


@pytest.mark.asyncio
@pytest.mark.asyncio_only("checks the asyncio loop object itself")
async def test_asyncio_only_runs_on_asyncio_loops() -> None:
    assert asyncio.get_running_loop() is not None


def test_the_trio_marker_is_never_called_for_a_loop() -> None:
    with pytest.raises(RuntimeError, match="trio"):
        run_on_trio()


@pytest_asyncio.fixture
async def fixture_loop() -> AsyncIterator[object]:
    # An async generator fixture that holds something bound to its loop across the test.
    event = anyio.Event()
    yield anyio.lowlevel.current_token(), event
    event.set()
    await event.wait()


@pytest.mark.asyncio
async def test_async_fixtures_share_the_tests_loop(
    fixture_loop: tuple[object, anyio.Event],
) -> None:
    token, event = fixture_loop
    assert anyio.lowlevel.current_token() == token
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(event.wait)
            event.set()


# -- Driver -------------------------------------------------------------------------------------


async def _where() -> tuple[str, str, object]:
    """The library and loop class that run this coroutine, and the loop's identity."""
    if trio.lowlevel.in_trio_run():
        return "trio", "", anyio.lowlevel.current_token()
    return "asyncio", str(type(asyncio.get_running_loop())), anyio.lowlevel.current_token()


def test_drivers_cover_sync_and_every_leg() -> None:
    assert ["sync", *LOOP_FACTORIES] == DRIVERS


@pytest.mark.parametrize("kind", sorted(LEGS))
def test_a_driver_keeps_one_loop_of_its_kind(kind: str) -> None:
    driver = Driver(kind)
    try:
        library, loop, token = driver.run(_where)
        assert library == ("trio" if kind == "trio" else "asyncio")
        assert ("uvloop" in loop) == (kind == "uvloop")
        assert driver.run(_where)[2] == token  # every call meets the same loop
        assert isinstance(driver.stager, astage.Stager)
    finally:
        driver.close()
    assert driver.closed


def test_a_sync_driver_has_no_loop() -> None:
    driver = Driver("sync")
    try:
        with pytest.raises(TypeError):
            driver.run(_where)
    finally:
        driver.close()


def test_a_driver_that_fails_to_construct_leaves_no_loop() -> None:
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(astage.InvalidOptionsError):
        Driver("trio", pin_memory_min_bytes=-1)
    after = {t.name for t in threading.enumerate()}
    assert after <= before


# -- heartbeat ----------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.allow_blocking("measures a blocking stretch on purpose")
async def test_heartbeat_sees_a_blocking_stretch_at_the_end() -> None:
    async with heartbeat() as beat:
        await anyio.sleep(0.01)
        time.sleep(0.1)  # the last thing in the block: the beat asleep now must record it
    assert beat.max_lag >= 0.08
    assert len(beat.lateness) > 1


@pytest.mark.asyncio
@pytest.mark.allow_blocking("stands in for a garbage collection that holds the loop")
async def test_heartbeat_leaves_garbage_collection_out() -> None:
    async with heartbeat() as beat:
        await anyio.sleep(0.01)
        # What the collector's callbacks see during a long collection: its time is no
        # coroutine's blocking call.
        GC_CLOCK("start", {})
        time.sleep(0.1)
        GC_CLOCK("stop", {})
        await anyio.sleep(0.01)
    assert beat.max_lag < 0.05
    assert beat.gc_seconds >= 0.09


class _ScriptedSteal(CpuSteal):
    """Steal counters the test moves by hand: one CPU, in seconds."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds = 0.0

    def sample(self) -> bytes:
        return repr(self.seconds).encode()

    def most_stolen(self, before: bytes, after: bytes) -> float:
        return float(after) - float(before)


@pytest.mark.asyncio
@pytest.mark.allow_blocking("stands in for the hypervisor taking the loop's CPU away")
@pytest.mark.parametrize(
    ("stolen", "left_out"),
    [
        (0.1, True),  # what the loop's thread sees while its CPU runs another guest
        (0.03, False),  # the CPU was taken away for part of a real blocking call
    ],
)
async def test_heartbeat_leaves_out_a_stall_only_when_steal_explains_most_of_it(
    stolen: float, left_out: bool
) -> None:
    steal = _ScriptedSteal()
    async with heartbeat(steal=steal) as beat:
        await anyio.sleep(0.01)
        time.sleep(0.1)
        steal.seconds += stolen
        await anyio.sleep(0.01)
    if left_out:
        assert beat.max_lag < 0.05
        assert beat.steal_seconds >= 0.09
    else:
        assert beat.max_lag >= 0.08
        assert beat.steal_seconds == 0.0


def test_steal_is_read_per_cpu_from_proc_stat() -> None:
    sample = (
        b"cpu  1119114 0 116012 5504344 18375 0 9709 143213 0 0\n"
        b"cpu0 501595 0 57096 2809250 10399 0 4828 72001 0 0\n"
        b"cpu1 617519 0 58915 2695094 7976 0 4881 71212 0 0\n"
        b"intr 20328085 0 0 0\n"
    )
    assert CpuSteal.per_cpu(sample) == {b"cpu0": 72001, b"cpu1": 71212}
    later = sample.replace(b"4881 71212", b"4881 71246")
    assert CPU_STEAL.most_stolen(sample, later) == pytest.approx(34 / os.sysconf("SC_CLK_TCK"))
    assert CPU_STEAL.most_stolen(b"", later) == 0.0


@pytest.mark.asyncio
async def test_heartbeat_is_quiet_when_the_loop_is_free() -> None:
    async with heartbeat(0.005) as beat:
        await anyio.sleep(0.05)
    assert beat.max_lag < 0.25


@pytest.mark.asyncio
async def test_errors_leave_the_heartbeat_as_themselves() -> None:
    with pytest.raises(ValueError, match="boom"):
        async with heartbeat():
            raise ValueError("boom")


# -- the blocking-call detector -----------------------------------------------------------------

# Blocking calls last 0.35 s: over the 0.25 s limit by more than a heartbeat interval.
_DETECTOR_TESTS = """
    import time

    import anyio
    import pytest
    from hypothesis import given, settings
    from hypothesis import strategies as st


    @pytest.mark.asyncio
    async def test_blocks_at_the_end():
        await anyio.sleep(0)
        time.sleep(0.35)


    @pytest.mark.asyncio
    async def test_blocks_in_the_middle():
        time.sleep(0.35)
        await anyio.sleep(0.05)


    @pytest.mark.asyncio
    @pytest.mark.allow_blocking("blocks on purpose")
    async def test_blocks_on_purpose():
        time.sleep(0.35)


    @pytest.mark.asyncio
    async def test_sleeps_without_blocking():
        await anyio.sleep(0.1)


    @pytest.mark.asyncio
    async def test_own_failure_comes_first():
        time.sleep(0.35)
        assert False, "the test's own failure"


    @pytest.mark.asyncio
    async def test_skip_is_a_skip():
        pytest.skip("skipped from inside the loop")


    @pytest.mark.asyncio
    @pytest.mark.asyncio_only("uses asyncio itself")
    async def test_asyncio_only():
        pass


    @settings(max_examples=1, deadline=None, database=None)
    @given(st.booleans())
    @pytest.mark.asyncio
    async def test_hypothesis_example_blocks(block):
        await anyio.sleep(0)
        time.sleep(0.35)


    @settings(max_examples=1, deadline=None, database=None)
    @given(st.booleans())
    @pytest.mark.asyncio
    async def test_hypothesis_example_sleeps(flag):
        await anyio.sleep(0.01)
"""


@pytest.fixture
def inner_suite(pytester: pytest.Pytester) -> pytest.Pytester:
    """A pytester directory with this suite's conftest and pytest-asyncio settings."""
    pytester.makeconftest(Path(__file__).with_name("conftest.py").read_text())
    pytester.makeini(
        "[pytest]\nasyncio_mode = strict\nasyncio_default_fixture_loop_scope = function\n"
    )
    return pytester


@pytest.mark.slow
def test_the_detector_fails_a_test_that_blocks_its_loop(inner_suite: pytest.Pytester) -> None:
    inner_suite.makepyfile(test_inner=textwrap.dedent(_DETECTOR_TESTS))
    result = inner_suite.runpytest_subprocess("-p", "no:cacheprovider", "-rA")
    outcomes = {}
    for line in result.outlines:
        word, _, rest = line.partition(" ")
        if word in {"PASSED", "FAILED", "SKIPPED"} and "::" in rest:
            outcomes[rest.split("::")[1].split(" ")[0]] = word
    legs = ("asyncio", "uvloop", "trio")
    expected = {
        **{f"test_blocks_at_the_end[{leg}]": "FAILED" for leg in legs},
        **{f"test_blocks_in_the_middle[{leg}]": "FAILED" for leg in legs},
        **{f"test_blocks_on_purpose[{leg}]": "PASSED" for leg in legs},
        **{f"test_sleeps_without_blocking[{leg}]": "PASSED" for leg in legs},
        **{f"test_own_failure_comes_first[{leg}]": "FAILED" for leg in legs},
        **{f"test_asyncio_only[{leg}]": "PASSED" for leg in ("asyncio", "uvloop")},
        **{f"test_hypothesis_example_blocks[{leg}]": "FAILED" for leg in legs},
        **{f"test_hypothesis_example_sleeps[{leg}]": "PASSED" for leg in legs},
    }
    assert {k: v for k, v in outcomes.items() if not k.startswith("test_skip")} == expected
    assert result.parseoutcomes()["skipped"] == 3
    text = result.stdout.str()
    assert text.count("the event loop was blocked for") >= 9
    assert text.count("the test's own failure") >= 3


class _MarkedItem:
    """Just enough of a pytest.Item for the marker check."""

    nodeid = "test_inner.py::test_x"

    def __init__(self, mark: pytest.MarkDecorator) -> None:
        self._mark = mark.mark

    def get_closest_marker(self, name: str) -> pytest.Mark | None:
        return self._mark if self._mark.name == name else None


@pytest.mark.parametrize("name", ["asyncio_only", "allow_blocking"])
def test_a_marker_needs_a_reason(name: str) -> None:
    with pytest.raises(pytest.UsageError, match=f"{name} needs a reason"):
        _marker_reason(cast(pytest.Item, _MarkedItem(getattr(pytest.mark, name))), name)
    reason = getattr(pytest.mark, name)("why")
    assert _marker_reason(cast(pytest.Item, _MarkedItem(reason)), name) == "why"
    assert _marker_reason(cast(pytest.Item, _MarkedItem(pytest.mark.slow)), name) is None
