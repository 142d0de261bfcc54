"""The run's event loop (LoopRunner) and awaiting DCP's futures on it (wait_future)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import anyio
import pytest

from benchmarks.futures import wait_future
from benchmarks.lag import LagProbe
from benchmarks.runner import BACKENDS, LoopRunner, anyio_backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_runner_runs_coroutines_on_its_backend(backend: str) -> None:
    async def answer(value: int) -> int:
        await anyio.sleep(0)
        return value

    with LoopRunner(backend) as runner:
        assert runner.run(answer(1)) == 1
        assert runner.run(answer(2)) == 2


def test_runner_raises_the_coroutines_exception() -> None:
    async def fail() -> None:
        raise KeyError("boom")

    with LoopRunner() as runner, pytest.raises(KeyError):
        runner.run(fail())


@pytest.mark.parametrize("backend", BACKENDS)
def test_worker_threads_live_across_calls(backend: str) -> None:
    """One loop for the run: a call does not start anyio's worker threads afresh.

    A loop driven by ``run_until_complete`` per call stops anyio's workers when each call's
    task ends, so every timed call of an anyio-based stager paid for new threads.
    """

    async def worker() -> threading.Thread:
        return await anyio.to_thread.run_sync(threading.current_thread)

    with LoopRunner(backend) as runner:
        first = runner.run(worker())  # (a thread's ident may be reused; its object is not)
        time.sleep(0.01)
        assert runner.run(worker()) is first
        assert first.is_alive()


def test_runner_rejects_an_unknown_backend() -> None:
    with pytest.raises(ValueError, match="backend"):
        LoopRunner("curio")


def _resolve_later(pool: ThreadPoolExecutor, seconds: float, value: str) -> Future[str]:
    def work() -> str:
        time.sleep(seconds)
        return value

    return pool.submit(work)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wait_future_keeps_the_loop_live(backend: str) -> None:
    async def wait() -> tuple[str, int]:
        with ThreadPoolExecutor(1) as pool:
            async with LagProbe() as probe, probe.window() as window:
                value = await wait_future(_resolve_later(pool, 0.1, "done"))
        return value, len(window.lateness_s)

    name, options = anyio_backend(backend)
    value, beats = anyio.run(wait, backend=name, backend_options=options)
    assert value == "done"
    # The loop kept beating while the future was pending: a wait that held the loop for the
    # future's 100 ms would leave one late beat.
    assert beats >= 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_wait_future_done_and_failed(backend: str) -> None:
    async def wait() -> None:
        done: Future[int] = Future()
        done.set_result(3)
        assert await wait_future(done) == 3
        with ThreadPoolExecutor(1) as pool:
            failed = pool.submit(lambda: 1 // 0)
            with pytest.raises(ZeroDivisionError):
                await wait_future(failed)

    name, options = anyio_backend(backend)
    anyio.run(wait, backend=name, backend_options=options)


def test_a_cancelled_wait_leaves_the_future_running() -> None:
    async def cancelled() -> Future[str]:
        with ThreadPoolExecutor(1) as pool:
            future = _resolve_later(pool, 0.05, "late")
            with anyio.move_on_after(0.01):
                await wait_future(future)
            assert not future.done()
        return future

    future = anyio.run(cancelled)
    assert future.result() == "late"
