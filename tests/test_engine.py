"""Copy batches: how a plan's copies are cut into bounded tasks, and running them on the host.

These tests drive the internal API: ``build_plan`` to get real copies, ``make_batches`` to cut
them, ``run_host_batch`` to execute them.
"""

from __future__ import annotations

import operator
import random
from typing import Any

import pytest
import torch
from conftest import assert_staged, assert_tree_staged

from astage._core import _run
from astage._core._batches import MAX_BATCH_COPIES, Batch, make_batches
from astage._core._cache import BufferCache
from astage._core._plan import Plan
from astage._core._run import _CUT_STEP, _SCAN_STEP, Run
from astage._core._walk import build_plan
from astage._devices._host import run_host_batch

KiB = 1024


def _plan(state_dict: Any) -> Plan:
    cache = BufferCache(pin_memory=False, share_memory=False, pin_memory_min_bytes=0)
    walk = build_plan(cache, state_dict)
    while True:
        try:
            next(walk)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]


def _batches(plan: Plan, chunk_bytes: int) -> list[Batch]:
    return list(make_batches(plan.copies, 0, len(plan.copies), chunk_bytes))


def _sizes(*nbytes: int) -> dict[str, torch.Tensor]:
    return {f"t{i}": torch.randn(n // 4) for i, n in enumerate(nbytes)}


def _check_cover(plan: Plan, batches: list[Batch], chunk_bytes: int) -> None:
    """Batches move every byte once, none more than a chunk, and ``end`` only grows."""
    assert sum(b.nbytes for b in batches) == sum(t.nbytes for t in plan.copies.srcs)
    ends = [b.end for b in batches]
    assert ends == sorted(ends)
    assert ends[-1] == len(plan.copies)
    for batch in batches:
        assert batch.nbytes == sum(d.nbytes for d in batch.dsts)
        assert len(batch.srcs) == len(batch.dsts) == len(batch.buffers)
        assert batch.nbytes <= chunk_bytes
        assert len(batch.srcs) <= MAX_BATCH_COPIES


def test_small_copies_are_gathered_up_to_a_chunk() -> None:
    plan = _plan(_sizes(*[4 * KiB] * 10))
    batches = _batches(plan, 16 * KiB)
    assert [len(b.srcs) for b in batches] == [4, 4, 2]
    assert [b.end for b in batches] == [4, 8, 10]
    _check_cover(plan, batches, 16 * KiB)


def test_everything_fits_one_batch() -> None:
    plan = _plan(_sizes(4, 8, 12))
    (batch,) = _batches(plan, 1 << 20)
    assert batch.end == 3 and batch.nbytes == 24


def test_large_copy_is_split_into_slices() -> None:
    plan = _plan(_sizes(4 * KiB, 40 * KiB, 4 * KiB))
    batches = _batches(plan, 16 * KiB)
    assert [b.nbytes for b in batches] == [4 * KiB, 16 * KiB, 16 * KiB, 8 * KiB, 4 * KiB]
    # A slice completes copy 1 only when it is the last one of it.
    assert [b.end for b in batches] == [1, 1, 1, 2, 3]
    _check_cover(plan, batches, 16 * KiB)


def test_copy_of_exactly_one_chunk_is_one_slice() -> None:
    plan = _plan(_sizes(16 * KiB))
    batches = _batches(plan, 16 * KiB)
    assert [(b.nbytes, b.end) for b in batches] == [(16 * KiB, 1)]


def test_batch_count_is_capped() -> None:
    count = MAX_BATCH_COPIES + 10
    plan = _plan([torch.zeros(1) for _ in range(count)])
    batches = _batches(plan, 1 << 30)
    assert [len(b.srcs) for b in batches] == [MAX_BATCH_COPIES, 10]
    _check_cover(plan, batches, 1 << 30)


def test_partial_range() -> None:
    plan = _plan(_sizes(*[4 * KiB] * 6))
    batches = list(make_batches(plan.copies, 2, 5, 1 << 20))
    assert [(len(b.srcs), b.end) for b in batches] == [(3, 5)]
    assert list(make_batches(plan.copies, 3, 3, 1 << 20)) == []


def test_chunk_smaller_than_an_element() -> None:
    plan = _plan({"d": torch.randn(3, dtype=torch.float64)})
    batches = _batches(plan, 1)
    assert [b.nbytes for b in batches] == [8, 8, 8]


def _move(plan: Plan, index: int, device: torch.device) -> None:
    """Pretend copy ``index`` reads from ``device`` (a stand-in for a CUDA tensor on CPU)."""
    plan.copies.buffers[index].device = device
    plan.copies.devices.add(device)


@pytest.mark.parametrize(
    ("order", "chunk"),
    [
        (["cpu", "meta", "cpu"], 1 << 20),
        (["meta", "meta", "cpu", "cpu"], 1 << 20),
    ],
)
def test_batches_never_mix_devices(order: list[str], chunk: int) -> None:
    plan = _plan(_sizes(*[64] * len(order)))
    for index, kind in enumerate(order):
        _move(plan, index, torch.device(kind))
    for batch in _batches(plan, chunk):
        assert {b.device for b in batch.buffers} == {batch.device}


def test_batches_never_mix_devices_after_a_sliced_copy() -> None:
    # Regression: the batch gathered right after a sliced copy did not track its device.
    plan = _plan(_sizes(4 * KiB, 16, 16))
    _move(plan, 0, torch.device("meta"))
    _move(plan, 2, torch.device("meta"))
    for batch in _batches(plan, 1 * KiB):
        assert {b.device for b in batch.buffers} == {batch.device}


def _cut_one_by_one(plan: Plan, start: int, stop: int, chunk: int) -> list[tuple[int, int, int]]:
    """``(first copy, end, nbytes)`` of each batch, by the rule stated copy by copy: a batch
    closes before a copy that would take it past ``chunk`` bytes or ``MAX_BATCH_COPIES``
    copies, or that reads from another device; a copy of ``chunk`` bytes or more is sliced."""
    buffers = plan.copies.buffers
    out: list[tuple[int, int, int]] = []
    first, gathered = start, 0
    for index in range(start, stop):
        nbytes = buffers[index].nbytes
        if first < index and (
            nbytes >= chunk
            or gathered + nbytes > chunk
            or index - first >= MAX_BATCH_COPIES
            or buffers[index].device != buffers[first].device
        ):
            out.append((first, index, gathered))
            first, gathered = index, 0
        if nbytes >= chunk:
            for begin in range(0, nbytes, chunk):
                end = index + 1 if begin + chunk >= nbytes else index
                out.append((index, end, min(chunk, nbytes - begin)))
            first = index + 1
            continue
        gathered += nbytes
    if first < stop:
        out.append((first, stop, gathered))
    return out


@pytest.mark.parametrize("seed", range(40))
def test_batches_follow_the_rule_stated_copy_by_copy(seed: int) -> None:
    """The cuts found in bulk (running totals, bisection) are the cuts of the rule applied
    copy by copy, whatever the sizes, devices and range."""
    rng = random.Random(seed)
    chunk = rng.choice([64, 256, 4 * KiB])
    count = rng.choice([1, 5, 300, MAX_BATCH_COPIES + 300])
    big = rng.random() < 0.5
    most = (chunk // 2 if not big else 2 * chunk) // 4
    sizes = [4 * rng.randint(1, most) for _ in range(count)]  # size 0: no copy
    plan = _plan(_sizes(*sizes))
    if rng.random() < 0.3:
        for index in rng.sample(range(count), k=max(1, count // 10)):
            _move(plan, index, torch.device("meta"))
    start = rng.randrange(count)
    stop = rng.randrange(start, count + 1)
    copies = plan.copies
    place = {id(buffer): index for index, buffer in enumerate(copies.buffers)}
    batches = list(make_batches(copies, start, stop, chunk))
    got = [(place[id(b.buffers[0])], b.end, b.nbytes) for b in batches]
    assert got == _cut_one_by_one(plan, start, stop, chunk)
    for batch, (first, _, _) in zip(batches, got, strict=True):
        assert {buffer.device for buffer in batch.buffers} == {batch.device}
        if batch.srcs[0] is copies.srcs[first]:  # gathered whole copies, not a slice
            ours = copies.srcs[first : first + len(batch.srcs)]
            assert all(map(operator.is_, batch.srcs, ours)) and len(ours) == len(batch.srcs)


# -- running batches on the host ----------------------------------------------------------------


def _run_all(plan: Plan, chunk_bytes: int) -> None:
    for batch in _batches(plan, chunk_bytes):
        run_host_batch(batch)


@pytest.mark.parametrize("chunk", [64, 4 * KiB, 1 << 20], ids=["tiny", "small", "large"])
def test_run_host_batch_lands_every_value(chunk: int) -> None:
    base = torch.randn(32, 32)
    source = {
        "base": base,
        "t": base.t(),
        "slice": base[3:9],
        "ints": torch.arange(100, dtype=torch.int16),
        "conj": torch.randn(5, dtype=torch.complex64).conj(),
        "bf16": torch.randn(77).to(torch.bfloat16),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0),
    }
    plan = _plan(source)
    _run_all(plan, chunk)
    for key, value in source.items():
        assert_staged(plan.result[key], value)


def test_run_host_batch_single_and_many() -> None:
    one_by_one, gathered = _sizes(64, 64, 64), _sizes(64, 64, 64)
    plan = _plan(one_by_one)
    batches = _batches(plan, 64)  # one copy per batch: the single-copy path
    assert all(len(b.srcs) == 1 for b in batches)
    for batch in batches:
        run_host_batch(batch)
    other = _plan(gathered)
    (batch,) = _batches(other, 1 << 20)  # one foreach call over three copies
    run_host_batch(batch)
    for plan_, source in ((plan, one_by_one), (other, gathered)):
        for key, value in source.items():
            assert_staged(plan_.result[key], value)


def test_run_host_batch_does_not_record_autograd() -> None:
    param = torch.nn.Parameter(torch.randn(8))
    plan = _plan({"p": param})
    _run_all(plan, 1 << 20)
    staged = plan.result["p"]
    assert torch.equal(staged.detach(), param.detach())
    assert staged.grad_fn is None


def _tiny_run(tensors: int) -> tuple[dict[int, torch.Tensor], Run[Any]]:
    """``tensors`` tensors of two floats, and a run over them into a fresh cache, with no
    bound on a batch's bytes or on the bytes in flight."""
    cache = BufferCache(pin_memory=False, share_memory=False, pin_memory_min_bytes=0)
    state_dict = {i: torch.full((2,), float(i)) for i in range(tensors)}
    run: Run[Any] = Run(
        cache, state_dict, track_leaves=False, chunk_bytes=1 << 30, max_inflight_bytes=1 << 40
    )
    return state_dict, run


def test_a_run_adds_up_a_bounded_number_of_copies_per_turn() -> None:
    """A replay hands the plan thousands of copies at once; summing all their sizes in one
    turn held the loop 5-8 ms. A turn scans at most _SCAN_STEP; every copy is still cut."""
    tensors = 3 * _SCAN_STEP + 5
    _alive, run = _tiny_run(tensors)  # the sources stay alive while the run copies them
    for _ in run.walk:
        pass
    assert len(run.plan.copies) == tensors
    first = run.next_batch(final=True)
    assert first is not None
    assert run._scanned <= _SCAN_STEP
    batches = [first]
    while (batch := run.next_batch(final=True)) is not None:
        batches.append(batch)
        assert run._scanned - run._cut <= _SCAN_STEP
    assert sum(len(batch.srcs) for batch in batches) == tensors
    assert batches[-1].end == tensors
    assert run.nbytes == tensors * 8
    for batch in batches:
        run_host_batch(batch)
    assert torch.equal(run.plan.result[tensors - 1], torch.full((2,), float(tensors - 1)))


def _cuts(cache: BufferCache, state_dict: Any, every: int) -> list[tuple[int, int]]:
    """The batches one call cuts when batches are asked for after every ``every`` walk steps
    (0: only once the walk has ended), as (first copy, end)."""
    run: Run[Any] = Run(
        cache, state_dict, track_leaves=False, chunk_bytes=1 << 26, max_inflight_bytes=1 << 40
    )
    cuts: list[tuple[int, int]] = []

    def take(final: bool) -> None:
        while (batch := run.next_batch(final)) is not None:
            cuts.append((batch.end - len(batch.srcs), batch.end))
            run_host_batch(batch)

    for step, _ in enumerate(run.walk, 1):
        if every and step % every == 0:
            take(final=False)
    take(final=True)
    return cuts


def test_every_call_over_the_same_structure_cuts_the_same_batches() -> None:
    """A device layer keeps a gathered batch's layout for the next call that cuts the same
    batch: where the walk stood when batches were asked for must not move the cuts."""
    cache = BufferCache(pin_memory=False, share_memory=False, pin_memory_min_bytes=0)
    state_dict = {i: torch.full((3,), float(i)) for i in range(5 * MAX_BATCH_COPIES + 77)}
    first = _cuts(cache, state_dict, every=0)
    for every in (1, 2, 3, 7, 0):
        assert _cuts(cache, state_dict, every) == first, every
    assert [end - start for start, end in first[:5]] == [MAX_BATCH_COPIES] * 5


def _batches_cut_while_walking(
    cache: BufferCache,
    state_dict: Any,
    *,
    track_leaves: bool = False,
    chunk_bytes: int = 1 << 26,
    other_device: torch.device | None = None,
    tail: bool = False,
) -> tuple[int, bool]:
    """One call through a Run the way the async face drives it: after every walk step, start
    whatever batch is ready. How many started before the walk had met every tensor (with
    ``tail``: before the walk's steps ended, its tail included, where it empties its tables
    and finishes the recording); whether it replayed.
    ``other_device``: the plan is told it also copies from there (as if some sources were)."""
    run: Run[Any] = Run(
        cache,
        state_dict,
        track_leaves=track_leaves,
        chunk_bytes=chunk_bytes,
        max_inflight_bytes=1 << 40,
    )
    if other_device is not None:
        run.plan.copies.devices.add(other_device)
    batches = []
    during = 0
    for _ in run.walk:
        while (batch := run.next_batch(final=False)) is not None:
            batches.append(batch)
            # A replay never walks; a full walk counts until its tail unless asked.
            during += tail or not (run.plan.walking and run.plan.tail)
    while (batch := run.next_batch(final=True)) is not None:
        batches.append(batch)
    for batch in batches:
        run_host_batch(batch)
    assert_tree_staged(run.plan.result, state_dict)
    return during, run.plan.replayed


def test_a_first_call_over_small_tensors_starts_its_copies_once_it_met_every_tensor() -> None:
    """Copied beside a walk that allocates, small batches made the async face's walk 10-15%
    slower than they saved (see Run._allocating_walk): none cut until it met every tensor."""
    cache = BufferCache(pin_memory=False, share_memory=False, pin_memory_min_bytes=0)
    state_dict: dict[Any, torch.Tensor] = {
        i: torch.full((4,), float(i)) for i in range(3 * MAX_BATCH_COPIES)
    }
    state_dict["rng"] = torch.zeros(4)  # a temporary, made anew for every call
    assert _batches_cut_while_walking(cache, state_dict) == (0, False)
    # A replay into the same buffers starts batches as its checks go, the overlap pays there;
    # even with a buffer allocated for the temporary.
    state_dict["rng"] = torch.zeros(4)
    during, replayed = _batches_cut_while_walking(cache, state_dict)
    assert replayed and during >= 2


def test_copies_wait_for_the_end_of_an_allocating_walk_even_past_chunk_bytes() -> None:
    """A first call's copies fault in fresh pages while its walk maps new buffers, and each
    slowed the other; a device copy's page-lock held the walk's next mmap on an H200 (see
    Run._allocating_walk): from host memory or a device, nothing starts before the walk met
    every tensor."""
    small = {i: torch.full((4,), float(i)) for i in range(3 * MAX_BATCH_COPIES)}

    def fresh() -> BufferCache:
        return BufferCache(pin_memory=False, share_memory=False, pin_memory_min_bytes=0)

    during, _ = _batches_cut_while_walking(fresh(), small, chunk_bytes=16 * MAX_BATCH_COPIES)
    assert during == 0
    during, _ = _batches_cut_while_walking(
        fresh(), small, chunk_bytes=16 * MAX_BATCH_COPIES, other_device=torch.device("meta")
    )
    assert during == 0
    # Host copies start in the walk's tail (its tables emptied, its recording finished);
    # copies from a device, which pin their buffers first, wait for its end.
    during, _ = _batches_cut_while_walking(
        fresh(), small, chunk_bytes=16 * MAX_BATCH_COPIES, tail=True
    )
    assert during > 0
    during, _ = _batches_cut_while_walking(
        fresh(),
        small,
        chunk_bytes=16 * MAX_BATCH_COPIES,
        other_device=torch.device("meta"),
        tail=True,
    )
    assert during == 0


def test_copies_start_during_an_allocating_walk_when_streamed() -> None:
    small = {i: torch.full((4,), float(i)) for i in range(3 * MAX_BATCH_COPIES)}
    cache = BufferCache(pin_memory=False, share_memory=False, pin_memory_min_bytes=0)
    # stage_iter hands out each tensor once its copy lands: it gets its batches as they fill.
    during, _ = _batches_cut_while_walking(cache, small, track_leaves=True)
    assert during >= 2


def test_copies_left_for_the_end_of_a_walk_are_cut_a_bounded_number_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After an allocating walk, every copy waits to be cut: cutting 50,000 at once (their
    sizes' running total) held the loop 2-5 ms. Each cut takes at most _CUT_STEP copies, and
    that is at most 2,048: a cut's first batch sums them on the loop, and 8,192 took 1.3-1.8 ms
    beside a first call's copies."""
    assert _CUT_STEP <= 2048
    ranges: list[tuple[int, int]] = []

    def recorded(copies: Any, start: int, stop: int, chunk_bytes: int) -> Any:
        ranges.append((start, stop))
        return make_batches(copies, start, stop, chunk_bytes)

    monkeypatch.setattr(_run, "make_batches", recorded)
    tensors = 2 * _CUT_STEP + 5
    state_dict, run = _tiny_run(tensors)
    for _ in run.walk:
        if run.plan.tail:  # its tail may cut batches: left for the loop below here
            continue
        assert run.next_batch(final=False) is None  # see Run._allocating_walk
    batches = []
    while (batch := run.next_batch(final=True)) is not None:
        batches.append(batch)
    assert ranges == [(0, _CUT_STEP), (_CUT_STEP, 2 * _CUT_STEP), (2 * _CUT_STEP, tensors)]
    assert [batch.end for batch in batches] == sorted(batch.end for batch in batches)
    assert sum(len(batch.srcs) for batch in batches) == tensors
    assert run.nbytes == tensors * 8
    for batch in batches:
        run_host_batch(batch)
    assert_tree_staged(run.plan.result, state_dict)
