"""The walk's handling of the cyclic garbage collector (``pause_gc``): a pause shared by every
stager in the process, that leaves the application's own collector settings as it left them."""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable, Iterator

import pytest
import torch
from conftest import Driver

from astage._drivers import _gc
from astage._drivers._gc import gc_paused


@pytest.fixture(autouse=True, scope="module")
def suite_heap_frozen_again() -> Iterator[None]:
    """The suite froze its long-lived heap (conftest); these tests thaw it, since the pause
    only uses freeze()/unfreeze() in a process that froze nothing. Frozen again once they are
    done, or every later full collection traverses it (0.4 s each, minutes over the suite)."""
    frozen = gc.get_freeze_count() > 0
    yield
    if frozen:
        gc.collect()
        gc.freeze()


@pytest.fixture(autouse=True)
def gc_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[int, int, int]]:
    """The collector's settings before the test, restored after it whatever the test did; and
    a pause that has not yet found the suite's frozen heap (it would ask ever more rarely)."""
    monkeypatch.setattr(_gc, "_pause", _gc._Pause())
    enabled, threshold = gc.isenabled(), gc.get_threshold()
    gc.enable()
    try:
        yield threshold
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
        if enabled:
            gc.enable()
        else:
            gc.disable()


def _paused() -> bool:
    """Whether automatic collection is off while the collector is enabled."""
    return gc.isenabled() and gc.get_threshold()[0] == 0


# -- gc_paused on its own -----------------------------------------------------------------------


def test_the_pause_holds_for_the_block_and_is_undone(gc_settings: tuple[int, int, int]) -> None:
    with gc_paused():
        assert _paused()
    assert gc.isenabled()
    assert gc.get_threshold() == gc_settings


def test_disabled_pause_changes_nothing(gc_settings: tuple[int, int, int]) -> None:
    with gc_paused(enabled=False):
        assert gc.get_threshold() == gc_settings


def test_nested_pauses_resume_when_the_outermost_leaves(gc_settings: tuple[int, int, int]) -> None:
    with gc_paused():
        with gc_paused():
            assert _paused()
        assert _paused()  # the inner block's end did not resume the collector under the outer
    assert gc.get_threshold() == gc_settings


def test_a_pause_left_by_an_error_is_undone(gc_settings: tuple[int, int, int]) -> None:
    with pytest.raises(KeyError), gc_paused():
        raise KeyError("boom")
    assert gc.get_threshold() == gc_settings


def test_overlapping_pauses_in_threads_share_one_depth(gc_settings: tuple[int, int, int]) -> None:
    # Thread i enters, waits until every thread is in, then leaves in turn (0 first). While any
    # thread is still inside, the collector stays paused: the first one out resumes nothing.
    count = 4
    inside = threading.Barrier(count)
    turns = [threading.Event() for _ in range(count)]
    seen: list[bool] = []

    def caller(i: int) -> None:
        with gc_paused():
            inside.wait()
            turns[i].wait()
            seen.append(_paused())
        if i + 1 < count:
            turns[i + 1].set()

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    turns[0].set()
    for thread in threads:
        thread.join()
    assert seen == [True] * count
    assert gc.isenabled()
    assert gc.get_threshold() == gc_settings


def test_application_disables_the_collector_meanwhile() -> None:
    with gc_paused():
        gc.disable()  # the application's own call, made while a stager walks
    assert not gc.isenabled()  # left as the application left it


def test_application_enables_the_collector_meanwhile(gc_settings: tuple[int, int, int]) -> None:
    gc.disable()
    with gc_paused():
        gc.enable()
    assert gc.isenabled()
    assert gc.get_threshold() == gc_settings


def test_nothing_is_paused_while_the_application_has_the_collector_off(
    gc_settings: tuple[int, int, int],
) -> None:
    gc.disable()
    with gc_paused():
        assert gc.get_threshold() == gc_settings
    assert not gc.isenabled()


def test_application_sets_its_own_threshold_meanwhile() -> None:
    with gc_paused():
        gc.set_threshold(1234)
    assert gc.get_threshold()[0] == 1234


def test_application_freezes_meanwhile() -> None:
    gc.collect()
    with gc_paused():
        gc.freeze()  # e.g. before forking workers
        frozen = gc.get_freeze_count()
        assert frozen > 0
    # Not thawed by the pause's own freeze()/unfreeze() (a few frozen objects may have died
    # since), and nothing of the call's added.
    assert frozen - 1000 < gc.get_freeze_count() <= frozen


def in_the_oldest_generation(obj: object) -> bool:
    """Whether ``obj`` was filed into the oldest generation (where the pause files a call's
    objects). After a collection of the young generations (``gc.collect(1)``, or a full one),
    an object left young is still in generation 0 or 1: at most one young collection runs
    before this looks."""
    return any(other is obj for other in gc.get_objects(generation=2))


def test_the_calls_objects_skip_the_young_generations() -> None:
    gc.collect()
    with gc_paused():
        allocated = [{"i": i} for i in range(5000)]
    # Not the young count: the context manager's own exit allocates, which sets off a young
    # collection right away when nothing was filed, and the count reads low either way.
    assert in_the_oldest_generation(allocated)
    assert len(allocated) == 5000


@pytest.fixture
def freeze_count_asks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per ``gc.get_freeze_count()`` call from now on: each walks the frozen heap."""
    asks: list[int] = []
    real_freeze_count = gc.get_freeze_count

    def counting_freeze_count() -> int:
        asks.append(1)
        return real_freeze_count()

    monkeypatch.setattr(gc, "get_freeze_count", counting_freeze_count)
    return asks


def test_a_small_call_does_not_walk_the_frozen_heap(freeze_count_asks: list[int]) -> None:
    # gc.get_freeze_count() walks every frozen object: 18 ms per call with the ~200,000 objects
    # this suite freezes, which made each small stage call cost that much.
    counted = freeze_count_asks
    gc.collect()
    with gc_paused():
        allocated = [{"i": i} for i in range(_gc.FILE_AWAY_FROM // 4)]
    assert counted == []
    with gc_paused():
        allocated += [{"i": i} for i in range(2 * _gc.FILE_AWAY_FROM)]
    assert counted == [1]  # a large call is still filed away (where nothing was frozen)


def large_calls(count: int) -> list[bool]:
    """For each of ``count`` pauses that allocate a lot, whether its objects were filed away."""
    filed, kept = [], []
    for _ in range(count):
        gc.collect(1)  # not a full collection: this heap is the whole suite's, thawed
        with gc_paused():
            # Kept alive: the young count is allocations less deallocations, and freeing the
            # last call's objects here would cancel this call's out.
            kept.append([[i] for i in range(2 * _gc.FILE_AWAY_FROM)])
        filed.append(in_the_oldest_generation(kept[-1]))
    return filed


def test_a_frozen_heap_is_asked_about_ever_more_rarely(
    app_frozen_objects: int, freeze_count_asks: list[int]
) -> None:
    asked = freeze_count_asks
    filed = large_calls(12)
    assert len(asked) == 4  # calls 1, 3, 6 and 11: each answer walks the whole frozen heap
    assert not any(filed)  # filing away would have thawed the heap
    assert app_frozen_objects - 1000 < gc.get_freeze_count() <= app_frozen_objects
    gc.unfreeze()  # the application lets its heap go: the calls file away again, soon
    filed = large_calls(2 * 8)
    assert filed[-1]


# -- through the stagers ------------------------------------------------------------------------


def _optimizer_like(n: int) -> dict[str, object]:
    return {"state": {i: {"step": torch.tensor(1.0), "m": torch.randn(4)} for i in range(n)}}


@pytest.fixture
def app_frozen_objects() -> Iterator[int]:
    """An application that froze its long-lived heap (as after fork-safe set-up)."""
    gc.collect()
    gc.freeze()
    try:
        yield gc.get_freeze_count()
    finally:
        gc.unfreeze()


def test_a_call_leaves_no_young_objects_to_traverse(make_stager: Callable[..., Driver]) -> None:
    stager = make_stager()
    source = _optimizer_like(2000)
    stager.stage(source)
    gc.collect()
    result = stager.stage(source)  # a cached call: allocates the result (~6000 objects)
    # The result went straight to the oldest generation: the next young collection has
    # (next to) nothing to traverse.
    assert in_the_oldest_generation(result)
    assert in_the_oldest_generation(result["state"][0])
    assert len(result["state"]) == 2000
    assert gc.isenabled()


def test_pause_gc_false_leaves_the_collector_alone(make_stager: Callable[..., Driver]) -> None:
    stager = make_stager(pause_gc=False)
    source = _optimizer_like(2000)
    stager.stage(source)
    before = gc.get_stats()[0]["collections"]
    stager.stage(source)
    assert gc.get_stats()[0]["collections"] > before  # young collections ran during the call
    assert gc.isenabled()


def test_objects_the_application_froze_stay_frozen(
    make_stager: Callable[..., Driver], app_frozen_objects: int
) -> None:
    stager = make_stager()
    stager.stage(_optimizer_like(500))
    # Not unfrozen (a few frozen objects may have died meanwhile), and nothing of ours added.
    assert app_frozen_objects - 1000 < gc.get_freeze_count() <= app_frozen_objects
    assert gc.isenabled()


def test_a_disabled_collector_stays_disabled(make_stager: Callable[..., Driver]) -> None:
    stager = make_stager()
    gc.disable()
    try:
        stager.stage(_optimizer_like(100))
        assert not gc.isenabled()
    finally:
        gc.enable()
