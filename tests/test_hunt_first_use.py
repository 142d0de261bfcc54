"""The event loop on a call's first use, and on every use: work that ran on the loop's thread
(or held the GIL from a worker thread) for tens of milliseconds at a time.

Found by running each async entry point once, then again, in a fresh interpreter, on a
GPT-2-like state dict and on an optimizer state of 20,000 small tensors, with a 1 ms heartbeat
task beside it and a watchdog thread that took the loop thread's stack whenever the heartbeat
was 5 ms late. Each test here failed before its fix; they assert what ran where, not
milliseconds.
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import random
import threading
import time
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import torch

import astage
from astage._files import _layout, _safetensors, _writer


def _small_tensors(count: int) -> dict[str, Any]:
    return {
        "state": {i: {"exp_avg": torch.ones(4), "step": torch.tensor(1.0)} for i in range(count)}
    }


def _thresholds_when_called(
    monkeypatch: pytest.MonkeyPatch, real: Any, *where: tuple[Any, str]
) -> list[int]:
    """Put a wrapper of ``real`` at each ``(module, name)`` that records the collector's first
    threshold (0: paused) whenever it is called; the list it records into."""
    seen: list[int] = []

    def recording(*args: Any, **kwargs: Any) -> Any:
        seen.append(gc.get_threshold()[0])
        return real(*args, **kwargs)

    for module, name in where:
        monkeypatch.setattr(module, name, recording)
    return seen


@pytest.mark.asyncio
async def test_a_save_plans_its_file_with_the_collector_paused(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer's plan (a worker thread) allocates a few objects per tensor, which set off
    oldest-generation collections over the whole heap: over 20,000 small tensors, passes of
    60-170 ms per save, and a collection holds the GIL, so the event loop stalled with it."""
    thresholds = _thresholds_when_called(monkeypatch, _layout.plan_layout, (_writer, "plan_layout"))
    if not gc.isenabled() or gc.get_threshold()[0] == 0:
        pytest.skip("the collector is off: nothing to pause")
    await astage.save(_small_tensors(10), os.fspath(tmp_path / "a.safetensors"))
    assert thresholds == [0]
    assert gc.get_threshold()[0] != 0  # resumed after


@pytest.mark.asyncio
async def test_a_save_hands_the_loop_back_while_it_queues_landed_tensors(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tensors that land during one of the stager's turns are handed out with no checkpoint
    between them, and a write queued for the writer's threads awaits nothing: the save's loop
    over them held the event loop for 150-185 ms over 20,000 small tensors (every call)."""
    ticks = 0
    queued_at: list[int] = []
    write = _writer.SafetensorsWriter.write

    async def slow_write(self: Any, path: Any, tensor: torch.Tensor) -> None:
        queued_at.append(ticks)
        time.sleep(0.001)  # each longer than a turn (max_loop_hold_s, 0.5 ms)
        await write(self, path, tensor)

    monkeypatch.setattr(_writer.SafetensorsWriter, "write", slow_write)

    async def tick() -> None:
        nonlocal ticks
        while True:
            await anyio.lowlevel.checkpoint()
            ticks += 1

    async with astage.Stager() as stager, anyio.create_task_group() as tasks:
        tasks.start_soon(tick)
        await astage.save(_small_tensors(200), os.fspath(tmp_path / "a.safetensors"), stager=stager)
        tasks.cancel_scope.cancel()
    assert len(queued_at) == 400
    # Writes queued with no other task run in between (before: hundreds in a row).
    longest = run = 1
    for before, after in itertools.pairwise(queued_at):
        run = run + 1 if after == before else 1
        longest = max(longest, run)
    assert longest <= 2, longest


@pytest.mark.asyncio
async def test_a_replica_file_sorts_its_tensors_in_a_worker_thread(tmp_path: Any) -> None:
    """A persisting ReplicationStager walked the received replica and sorted its tensors by
    storage on the event loop (``ReplicaFile._begin``): 330-550 ms per call over 20,000 small
    tensors. Now in a worker thread, with the collector paused."""
    from astage._replication import _persist
    from astage._replication._transport import Landed, ReplicaReady

    loop_thread = threading.get_ident()
    seen: list[tuple[bool, int]] = []
    plain = _persist._plain

    def recording(*args: Any) -> Any:
        seen.append((threading.get_ident() == loop_thread, gc.get_threshold()[0]))
        return plain(*args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_persist, "_plain", recording)
        storage = torch.arange(12.0)
        path = os.fspath(tmp_path / "replica.safetensors")
        async with _persist.ReplicaFile(path, 0, 1) as file:
            await file.follow(ReplicaReady({"w": storage, "view": storage[2:5]}, [storage]))
            await file.follow(Landed([0]))
            await file.commit()
    assert seen[0][0] is False  # not on the loop's thread
    if gc.isenabled() and gc.get_threshold()[0] != 0:
        assert seen[0][1] == 0
    assert torch.equal(astage.load(path)["w"], storage)


def test_a_replication_exchange_encodes_and_decodes_with_the_collector_paused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The exchange thread's encoding and decoding allocate a few objects per tensor, which set
    off oldest-generation collections of 230-380 ms over 20,000 small tensors, twice a call:
    a collection holds the GIL, so the caller's event loop stalled with it."""
    if not gc.isenabled() or gc.get_threshold()[0] == 0:
        pytest.skip("the collector is off: nothing to pause")
    from test_hunt_replication import exchange_with_an_honest_partner

    from astage._replication import _transport

    thresholds: dict[str, int] = {}
    for name in ("encode", "decode"):
        real = getattr(_transport, name)

        def recording(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            thresholds[_name] = gc.get_threshold()[0]
            return _real(*args, **kwargs)

        monkeypatch.setattr(_transport, name, recording)
    w = torch.arange(12.0)
    _, replica = exchange_with_an_honest_partner(monkeypatch, {"w": w})
    assert torch.equal(replica["w"], w)
    assert thresholds == {"encode": 0, "decode": 0}


@pytest.mark.asyncio
async def test_aclose_drops_the_buffers_in_a_worker_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``aclose()`` dropped every buffer (and the recordings with them) on the loop's thread:
    50-70 ms over 20,000 buffers, on every close (a CheckpointDir's exit, a replication
    stager's close too)."""
    from astage._core._cache import BufferCache

    threads: list[threading.Thread] = []
    clear = BufferCache.clear

    def recorded(cache: BufferCache) -> None:
        threads.append(threading.current_thread())
        clear(cache)

    monkeypatch.setattr(BufferCache, "clear", recorded)
    stager = astage.Stager()
    await stager.stage(_small_tensors(100))
    await stager.aclose()
    assert threads and threading.current_thread() not in threads


@pytest.mark.asyncio
@pytest.mark.parametrize("into", [False, True])
async def test_a_load_reads_with_the_collector_paused(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, into: bool
) -> None:
    """A load makes a tensor and a few dicts per entry, which set off oldest-generation
    collections of 100-165 ms over 20,000 small tensors beside a large live heap, twice a
    call: from load_async's worker thread they held the GIL, and so the event loop."""
    from astage._files import _load, _restore

    if not gc.isenabled() or gc.get_threshold()[0] == 0:
        pytest.skip("the collector is off: nothing to pause")
    path = os.fspath(tmp_path / "a.safetensors")
    source = _small_tensors(10)
    await astage.save(source, path)
    thresholds = _thresholds_when_called(
        monkeypatch, _load.read_checked, (_load, "read_checked"), (_restore, "read_checked")
    )
    await astage.load_async(path, into=source if into else None)
    assert thresholds == [0]
    assert gc.get_threshold()[0] != 0  # resumed after


def test_a_restore_of_small_tensors_hands_its_threads_a_few_jobs(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each tensor's read was a future of the restore's thread pool: ~30 us of hand-over per
    tensor, so restoring 20,000 small optimizer tensors took 0.95 s where load() of the same
    file took 0.26 s."""
    import concurrent.futures

    path = os.fspath(tmp_path / "a.safetensors")
    source = _small_tensors(2000)
    astage.save_sync(source, path)
    submitted = 0
    submit = concurrent.futures.ThreadPoolExecutor.submit

    def counted(pool: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal submitted
        submitted += 1
        return submit(pool, *args, **kwargs)

    monkeypatch.setattr(concurrent.futures.ThreadPoolExecutor, "submit", counted)
    into = _small_tensors(2000)
    for entry in into["state"].values():
        entry["exp_avg"].zero_()
    astage.load(path, into=into)
    assert into["state"][1999]["exp_avg"].tolist() == [1.0] * 4
    assert submitted <= 4, submitted


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth > 5 or roll < 0.3:
        return rng.choice([1, -2.5, 'x"y', None, True, float("nan"), "é\n", 10**20, []])
    if roll < 0.65:
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(0, 7))]
    keys = ["a", "b\n", 3, 2.5, None, True, False, "z", "é"]
    return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randrange(0, 7))}


def test_json_in_pieces_is_json_dumps(monkeypatch: pytest.MonkeyPatch) -> None:
    """The header's text, made in pieces (below), is exactly ``json.dumps``'s, but for the
    newline after each comma between two runs of the top level (whitespace to JSON, and never
    raw in json.dumps's output): keys of every JSON type, big items inside big containers,
    empty ones, NaN, escapes."""
    monkeypatch.setattr(_safetensors, "JSON_PIECE", 2)
    monkeypatch.setattr(_safetensors, "JSON_OPEN_DEPTH", 3)
    rng = random.Random(0)
    for _ in range(2000):
        value = _random_json(rng)
        text = _safetensors.json_text(value)
        assert text.replace(",\n", ",") == json.dumps(value, separators=(",", ":"))


def _container_sizes_encoded(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """From now on, the item count of each list or dict handed to one ``json.dumps`` of
    ``json_text``'s."""
    sizes: list[int] = []
    dumps = _safetensors._dumps

    def recorded(value: Any) -> str:
        if isinstance(value, (dict, list)):
            sizes.append(len(value))
        return dumps(value)

    monkeypatch.setattr(_safetensors, "_dumps", recorded)
    return sizes


def test_a_saves_header_is_encoded_in_pieces(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``json.dumps`` holds the GIL for all of a call: the skeleton and the header of a save
    over 20,000 tensors took calls of 17 and 29 ms in a worker thread, the event loop stalled
    meanwhile (the longest stall of such a save, 30-33 ms; 10-15 ms after)."""
    sizes = _container_sizes_encoded(monkeypatch)
    path = tmp_path / "a.safetensors"
    source = _small_tensors(2 * _safetensors.JSON_PIECE)
    astage.save_sync(source, path)
    assert sizes and max(sizes) <= _safetensors.JSON_PIECE
    loaded = astage.load(path)
    assert loaded["state"][7]["exp_avg"].tolist() == [1.0] * 4


def test_a_replication_header_is_encoded_in_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """The wire header of an exchange is a few MB over 20,000 tensors, which ``json.dumps``
    encoded in one call holding the GIL (the exchange thread's, beside the caller's loop)."""
    from astage._replication import _wire

    encoded = _wire.encode(_small_tensors(2 * _safetensors.JSON_PIECE), call=1)
    sizes = _container_sizes_encoded(monkeypatch)
    text = _wire.header_bytes(encoded)
    assert sizes and max(sizes) <= _safetensors.JSON_PIECE
    assert text == json.dumps(encoded.header, separators=(",", ":")).encode()
