"""Hunting races in the writer's threads (WriteThreads): lazily started spares, per-thread
wakes, the last thread's commit or cleanup. Each racy scenario runs many times over small data;
every wait has a timeout, so a lost wakeup fails rather than hangs.

Watched throughout (``Watch``): no write runs while the file is finished or closed, nothing is
committed with pieces still queued or in flight, ``_queued`` never goes negative and is 0 at
the end, the temporary file goes, and no ``astage-writer-`` thread outlives its save.
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

import astage
from astage._files import _writer

WAIT_S = 10.0


def big_state(n: int = 12, size: int = 1 << 14) -> dict[str, torch.Tensor]:
    return {f"t{i}": torch.full((size,), float(i)) for i in range(n)}


def writer_threads_alive() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("astage-writer-")]


def assert_no_writer_thread_left() -> None:
    deadline = time.monotonic() + WAIT_S
    while writer_threads_alive() and time.monotonic() < deadline:
        time.sleep(0.001)  # the last thread returns right after setting done()
    assert writer_threads_alive() == []


def assert_saved(path: Path, expected: dict[str, torch.Tensor]) -> None:
    back = astage.load(path)
    assert back.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(back[key], value), key


def assert_committed_or_gone(committed: bool, target: Path, expected: dict[str, Any]) -> None:
    """A committed file holds ``expected`` (and is removed for the next round); then the
    folder is empty either way: no temporary file left behind."""
    if committed:
        assert_saved(target, expected)
        target.unlink()
    assert os.listdir(target.parent) == []


class Watch:
    """Wraps the writer's hot spots; every broken invariant is recorded in ``broken``."""

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, jitter_s: float = 0.0, slow_starts: bool = False
    ) -> None:
        self.broken: list[str] = []
        self.in_flight: dict[int, int] = {}
        self.lock = threading.Lock()
        self.rng = random.Random(1234)
        self.jitter_s = jitter_s
        W, T = _writer.SafetensorsWriter, _writer.WriteThreads
        write_items, close_and_remove = W._write_items, W._close_and_remove
        finish, take = W._finish, T._take
        watch = self

        def flight(writer: Any, step: int) -> int:
            with watch.lock:
                count = watch.in_flight[id(writer)] = watch.in_flight.get(id(writer), 0) + step
                return count

        def slow_write(writer: Any, items: Any, sharing: Any = None) -> None:
            flight(writer, 1)
            try:
                if writer._fd is None or writer._state != "open":
                    watch.broken.append(f"a write into a {writer._state} file")
                watch.nap()
                write_items(writer, items, sharing)
            finally:
                flight(writer, -1)

        def checked_close(writer: Any) -> None:
            if flight(writer, 0):
                watch.broken.append("closed and removed with a write in flight")
            close_and_remove(writer)

        def checked_finish(writer: Any, may_rename: Any = None) -> bool:
            if flight(writer, 0) or writer._background._pieces:
                watch.broken.append("committed before every piece was written")
            return bool(finish(writer, may_rename))

        def checked_take(threads: Any) -> Any:
            items = take(threads)
            if threads._queued < 0:
                watch.broken.append(f"_queued went negative: {threads._queued}")
            return items

        monkeypatch.setattr(W, "_write_items", slow_write)
        monkeypatch.setattr(W, "_close_and_remove", checked_close)
        monkeypatch.setattr(W, "_finish", checked_finish)
        monkeypatch.setattr(T, "_take", checked_take)
        real_start = threading.Thread.start

        def start(thread: threading.Thread) -> None:
            if slow_starts and thread.name.startswith("astage-writer-"):
                watch.nap()
            real_start(thread)

        monkeypatch.setattr(threading.Thread, "start", start)

    def nap(self) -> None:
        if self.jitter_s:
            time.sleep(self.rng.random() * self.jitter_s)

    def check(self, threads: _writer.WriteThreads, tmp_path: Path) -> None:
        assert threads.wait(WAIT_S), "the save hung: done() never came"
        assert self.broken == []
        assert threads._running == 0 and (threads._queued == 0 or threads._stopping())
        assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
        assert_no_writer_thread_left()


@pytest.fixture(autouse=True)
def spares_for_small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """A spare is wanted from 1 KiB a thread queued, in pieces of 256 bytes on average: small
    data starts them all."""
    monkeypatch.setattr(_writer, "SPARE_THREAD_BYTES", 1 << 10)
    monkeypatch.setattr(_writer, "SPARE_THREAD_PIECE_BYTES", 256)


def is_spare(thread: threading.Thread) -> bool:
    return thread.name.startswith("astage-writer-") and not thread.name.startswith(
        "astage-writer-0:"
    )


# -- bugs ---------------------------------------------------------------------------------------


def test_a_spare_that_fails_to_start_with_a_memory_error_does_not_hang_the_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # _thread.start_new_thread raises MemoryError where it cannot allocate the new thread's
    # boot state (the same exhaustion that gives "can't start new thread"). _start_spare only
    # handles RuntimeError: the MemoryError escapes _work from outside its try, so the thread
    # that started the spare dies with its taken pieces unwritten, and neither it nor the spare
    # it counted as running is ever uncounted: _running never reaches 0, done() never comes.
    real_start = threading.Thread.start

    def start(thread: threading.Thread) -> None:
        if is_spare(thread):
            raise MemoryError
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the dying thread's report
    expected = big_state()
    writer = astage.SafetensorsWriter(tmp_path / "c.safetensors", threads=4, chunk_bytes=1 << 12)
    handle = astage.start_save_sync(expected, writer)
    threads = writer.write_threads
    assert threads is not None
    ended = threads.wait(2.0)
    if not ended:  # unstick it, so that the test leaves no temporary file behind
        threads.abort()
        threads._running = 0
        threads._end()
    assert ended, "a spare's failed start left the save hanging (done() never set)"
    handle.wait(0)  # the spare is done without, as a refused one is
    assert_saved(tmp_path / "c.safetensors", expected)


# -- what held ----------------------------------------------------------------------------------

CASES = [(1, 1 << 10, 20), (2, 1 << 12, 40), (4, 1 << 12, 60), (16, 1 << 10, 40), (4, 1 << 30, 30)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"threads{c[0]}-chunk{c[1]}")
def test_saves_with_slowed_writes_and_thread_starts_write_every_piece_then_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: tuple[int, int, int]
) -> None:
    threads, chunk_bytes, rounds = case
    watch = Watch(monkeypatch, jitter_s=2e-4, slow_starts=True)
    small = {f"s{i}": torch.full((3,), i + 0.5) for i in range(20)}
    for round_ in range(rounds):
        # Big pieces first (spares wanted), then small ones (not wanted: the spares wait,
        # then exit at the seal while the first thread drains).
        expected = big_state(6 + round_ % 5) | small
        target = tmp_path / f"c{round_ % 3}.safetensors"
        writer = astage.SafetensorsWriter(target, threads=threads, chunk_bytes=chunk_bytes)
        handle = astage.start_save_sync(expected, writer)
        assert writer.write_threads is not None
        watch.check(writer.write_threads, tmp_path)
        handle.wait(0)
        assert_saved(target, expected)


def test_an_abort_as_a_spare_starts_ends_the_file_once_and_leaves_no_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    watch = Watch(monkeypatch, jitter_s=2e-4)
    real_start = threading.Thread.start
    made: list[_writer.WriteThreads] = []
    rng = random.Random(7)

    def start(thread: threading.Thread) -> None:
        if is_spare(thread) and rng.random() < 0.3:
            made[-1].abort()  # before the spare runs: it must see the abort, and count out
        real_start(thread)
        if is_spare(thread) and rng.random() < 0.3:
            made[-1].abort()  # after: the spare may be taking pieces meanwhile

    monkeypatch.setattr(threading.Thread, "start", start)
    target = tmp_path / "c.safetensors"
    for round_ in range(80):
        writer = astage.SafetensorsWriter(target, threads=4, chunk_bytes=4096)
        threads = writer.open_in_threads(big_state(8))
        made.append(threads)
        try:
            for key, tensor in big_state(8).items():
                writer.queue((key,), tensor)
            if round_ % 2:
                writer.commit_in_threads()
        except astage.AstageError:
            pass  # aborted already: the writer says so
        won = threads.abort()  # too late (False) only once the commit is decided
        watch.check(threads, tmp_path)
        assert writer._fd is None and writer._direct_fd is None
        assert threads.committed == (not won and round_ % 2 == 1 and target.exists())
        assert_committed_or_gone(threads.committed, target, big_state(8))


def test_an_interrupted_save_sync_cancels_or_commits_and_leaves_no_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    watch = Watch(monkeypatch, jitter_s=3e-4)
    real_wait = _writer.WriteThreads.wait
    made: list[_writer.WriteThreads] = []
    delay = [0.0]

    def interrupted_wait(threads: _writer.WriteThreads, timeout: float | None = None) -> bool:
        if threads not in made:  # save_sync's first wait: ^C after a while
            made.append(threads)
            real_wait(threads, delay[0])
            raise KeyboardInterrupt
        return real_wait(threads, WAIT_S if timeout is None else timeout)

    monkeypatch.setattr(_writer.WriteThreads, "wait", interrupted_wait)
    target = tmp_path / "c.safetensors"
    for round_ in range(40):
        delay[0] = (round_ % 8) * 5e-4
        expected = big_state(8, 1 << 12 + round_ % 3)
        with pytest.raises(KeyboardInterrupt):
            astage.save_sync(expected, target, threads=4)
        watch.check(made[-1], tmp_path)
        assert_committed_or_gone(made[-1].committed, target, expected)


@pytest.mark.asyncio
async def test_cancelling_a_started_save_at_any_point_commits_or_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    watch = Watch(monkeypatch, jitter_s=2e-4, slow_starts=True)
    target = tmp_path / "c.safetensors"
    for round_ in range(30):
        expected = big_state(6) | {f"s{i}": torch.full((2,), float(i)) for i in range(50)}
        async with anyio.create_task_group() as tg:
            handle = await astage.start_save(expected, target, threads=4, task_group=tg)
            await anyio.sleep((round_ % 6) * 5e-4)
            cancelled = handle.cancel()
        with anyio.fail_after(WAIT_S):
            await handle.wait_quietly()
        if cancelled:
            with pytest.raises(astage.CheckpointWriteError, match="cancelled"):
                await handle
        else:
            await handle
            assert_saved(target, expected)
            target.unlink()
        assert watch.broken == []
        assert_no_writer_thread_left()
        assert os.listdir(tmp_path) == []


@pytest.mark.asyncio
async def test_many_small_writes_from_the_loop_while_big_pieces_are_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    watch = Watch(monkeypatch, jitter_s=1e-3, slow_starts=True)
    big = big_state(8, 1 << 15)
    small = {f"s{i}": torch.full((4,), float(i)) for i in range(2000)}
    for round_ in range(3):
        target = tmp_path / f"c{round_}.safetensors"
        async with astage.SafetensorsWriter(target, threads=8, chunk_bytes=1 << 13) as writer:
            await writer.begin(big | small)
            for key, tensor in big.items():
                await writer.write((key,), tensor)
            await anyio.sleep(0.005)  # the first thread takes a big piece: spares are wanted
            for key, tensor in small.items():
                await writer.write((key,), tensor)
            await writer.commit()
        assert writer.write_threads is not None
        watch.check(writer.write_threads, tmp_path)
        assert writer.write_threads._started > 1  # the big pieces had spares
        assert_saved(target, big | small)


@pytest.mark.parametrize("until", ["drained", "failed", "aborted"])
def test_a_spare_whose_start_is_held_until_the_rest_is_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, until: str
) -> None:
    # The third thread's start (by the first or second, counted running) is held until the
    # other threads have drained the sealed queue, or one has failed, or the caller aborted.
    watch = Watch(monkeypatch)
    box: list[_writer.WriteThreads] = []
    held, failing = threading.Event(), threading.Event()
    real_start, real_pwritev = threading.Thread.start, os.pwritev

    def over(threads: _writer.WriteThreads) -> bool:
        with threads._lock:
            done = {"drained": threads._sealed and not threads._pieces, "failed": threads.error}
            return bool(done.get(until, threads._aborted))

    def start(thread: threading.Thread) -> None:
        if thread.name.startswith("astage-writer-2:"):
            held.set()
            if until == "failed":
                failing.set()
            deadline = time.monotonic() + 0.5  # (no thread left to drain: go on after a while)
            while not over(box[0]) and time.monotonic() < deadline:
                time.sleep(1e-3)
        real_start(thread)

    def pwritev(fd: int, buffers: Any, offset: int) -> int:
        if failing.is_set():
            raise OSError(5, "Input/output error")
        return real_pwritev(fd, buffers, offset)

    monkeypatch.setattr(threading.Thread, "start", start)
    monkeypatch.setattr(os, "pwritev", pwritev)
    target = tmp_path / "c.safetensors"
    for _ in range(10):
        held.clear()
        failing.clear()
        expected = big_state(12)
        writer = astage.SafetensorsWriter(target, threads=4, chunk_bytes=2048)
        box[:] = [writer.open_in_threads(expected)]
        for key, tensor in expected.items():
            writer.queue((key,), tensor)
        writer.commit_in_threads()
        assert held.wait(WAIT_S)
        if until == "aborted":
            assert box[0].abort()
        watch.check(box[0], tmp_path)
        assert box[0].committed == (until == "drained")
        if until == "drained":
            assert_saved(target, expected)
        else:
            assert not target.exists() and (until == "aborted") == (box[0].error is None)
