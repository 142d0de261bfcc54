"""ReplicationStager: multi-process gloo jobs on 127.0.0.1, plus the sans-IO parts in process.

Four jobs start once per module, side by side: 2 ranks on asyncio (every check, DCP and the
timeout included), the same 2-rank checks on trio, 4 ranks on asyncio with uvloop (pairs
0<->2, 1<->3; no DTensors, whose import costs each rank 1.4 s of CPU on a 2-core machine that
runs all 11 ranks) and 3 ranks on asyncio (the ring). Each rank runs ``tests/_dist_worker.py`` and
reports every check's outcome; the tests below read them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
import torch

import astage
from astage._replication._pairing import pairing
from astage._replication._stager import _Mailbox, _seconds
from astage._replication._transport import Landed, Transport
from astage._replication._wire import BUCKET_BYTES, buckets, decode, encode

WORKER = Path(__file__).with_name("_dist_worker.py")
JOBS = {  # name: (ranks, the worker's job, backend)
    "main": (2, "main", "asyncio"),
    "trio": (2, "main", "trio"),
    "basic4": (4, "pairs", "uvloop"),
    "ring3": (3, "basic", "asyncio"),
}
MAIN_JOBS = ["main", "trio"]


@dataclass
class Job:
    world: int
    out: Path
    procs: list[subprocess.Popen[bytes]]
    results: list[dict[str, str]] | None = None

    def finish(self) -> list[dict[str, str]]:
        if self.results is None:
            logs = []
            for proc in self.procs:
                try:
                    output, _ = proc.communicate(timeout=180)  # a loaded 2-core CI machine
                except subprocess.TimeoutExpired:
                    proc.kill()
                    output, _ = proc.communicate()
                logs.append(output.decode(errors="replace")[-3000:])
            results = []
            for rank in range(self.world):
                report = self.out / f"rank{rank}.json"
                if not report.exists():
                    pytest.fail(f"rank {rank} of a {self.world}-rank job wrote no report:\n{logs}")
                results.append(json.loads(report.read_text()))
            self.results = results
        return self.results


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Job]]:
    started: dict[str, Job] = {}
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for name, (world, job_kind, backend) in JOBS.items():
        out = tmp_path_factory.mktemp(f"replication-{name}")
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    str(WORKER),
                    job_kind,
                    str(rank),
                    str(world),
                    str(out / "init"),
                    str(out),
                    backend,
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
            )
            for rank in range(world)
        ]
        started[name] = Job(world, out, procs)
    yield started
    for job in started.values():
        for proc in job.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def check(job: Job, name: str) -> None:
    failures = {
        rank: result.get(name, "not run")
        for rank, result in enumerate(job.finish())
        if result.get(name) != "ok"
    }
    assert not failures, "\n".join(f"rank {r}:\n{text}" for r, text in failures.items())


@pytest.mark.parametrize("job_name", list(JOBS))
@pytest.mark.parametrize("name", ["plain", "nested"])
def test_replication(jobs: dict[str, Job], job_name: str, name: str) -> None:
    """The partner's snapshot comes back equal: values, structure, aliasing."""
    check(jobs[job_name], name)


@pytest.mark.parametrize("job_name", [name for name, job in JOBS.items() if job[1] != "pairs"])
def test_replicated_dtensors_keep_their_specs(jobs: dict[str, Job], job_name: str) -> None:
    check(jobs[job_name], "dtensor")


@pytest.mark.parametrize("job_name", list(JOBS))
def test_unsendable_object_fails_both_sides_at_once_and_keeps_them_in_step(
    jobs: dict[str, Job], job_name: str
) -> None:
    check(jobs[job_name], "refusal")


@pytest.mark.parametrize("job_name", ["main", "trio", "basic4"])
def test_explicit_symmetric_partner(jobs: dict[str, Job], job_name: str) -> None:
    check(jobs[job_name], "explicit_partner")


@pytest.mark.parametrize("job_name", MAIN_JOBS)
def test_bad_arguments_are_invalid_options(jobs: dict[str, Job], job_name: str) -> None:
    check(jobs[job_name], "options")


@pytest.mark.parametrize("job_name", MAIN_JOBS)
def test_persisted_replica_loads_back(jobs: dict[str, Job], job_name: str) -> None:
    check(jobs[job_name], "persist")


@pytest.mark.parametrize("job_name", MAIN_JOBS)
def test_persist_failure_names_both_ranks_and_leaves_no_temporary(
    jobs: dict[str, Job], job_name: str
) -> None:
    check(jobs[job_name], "persist_failure")


@pytest.mark.parametrize("job_name", MAIN_JOBS)
def test_cancelled_aclose_leaves_the_stager_open_and_a_second_one_closes_it(
    jobs: dict[str, Job], job_name: str
) -> None:
    check(jobs[job_name], "aclose_cancelled")


def test_a_second_threads_loop_gets_busy_error(jobs: dict[str, Job]) -> None:
    check(jobs["main"], "busy")


def test_dtensor_staging_with_stager_and_sync_stager(jobs: dict[str, Job]) -> None:
    check(jobs["main"], "dtensor_staging")


def test_sharded_tensor_staging_with_stager_and_sync_stager(jobs: dict[str, Job]) -> None:
    check(jobs["main"], "sharded_tensor_staging")


def test_dcp_async_save_with_compat_default_stager_under_gloo(jobs: dict[str, Job]) -> None:
    check(jobs["main"], "dcp")


@pytest.mark.parametrize("job_name", MAIN_JOBS)
def test_cancelled_stage_frees_the_loop_and_marks_the_stager_out_of_step(
    jobs: dict[str, Job], job_name: str
) -> None:
    check(jobs[job_name], "cancel")


@pytest.mark.parametrize("job_name", MAIN_JOBS)
def test_partner_that_never_joins_times_out_naming_it(jobs: dict[str, Job], job_name: str) -> None:
    check(jobs[job_name], "timeout")


# -- in process: pairing, wire encoding, refusals ------------------------------------------------


def test_pairing_even_world_is_symmetric_half_world() -> None:
    assert [pairing(r, 4) for r in range(4)] == [(2, 2), (3, 3), (0, 0), (1, 1)]
    assert [pairing(r, 2) for r in range(2)] == [(1, 1), (0, 0)]


def test_pairing_odd_world_is_a_ring() -> None:
    assert [pairing(r, 3) for r in range(3)] == [(1, 2), (2, 0), (0, 1)]


def test_pairing_refuses_one_rank_and_bad_partners() -> None:
    with pytest.raises(astage.ReplicationError, match="at least 2 ranks"):
        pairing(0, 1)
    with pytest.raises(astage.InvalidOptionsError, match="partner=0"):
        pairing(0, 4, partner=0)
    with pytest.raises(astage.InvalidOptionsError, match="partner=7"):
        pairing(0, 4, partner=7)
    assert pairing(0, 4, partner=1) == (1, 1)


def test_buckets_send_big_storages_alone_and_pack_small_ones() -> None:
    big = BUCKET_BYTES
    sizes = [10, big, 0, 20, big + 1, 30]
    assert buckets(sizes) == [[1], [4], [0, 3, 5]]
    assert buckets([big // 2, big // 2, 5]) == [[0, 1], [2]]


def test_encode_decode_round_trip_without_a_process_group() -> None:
    shared = torch.arange(10.0)
    state: dict[Any, Any] = {
        "model": OrderedDict(
            [("a", shared), ("b", shared[3:5]), ("p", torch.nn.Parameter(torch.ones(2)))]
        ),
        "values": [1, 2.5, float("nan"), "x", None, True, (1, 2)],
        3: torch.tensor([1 + 2j], dtype=torch.complex64),
    }
    encoded = encode(state)
    header = json.loads(json.dumps(encoded.header))
    storages = [s.clone() for s in encoded.storages]
    replica: Any = decode(header, storages, [], source=1)
    assert type(replica["model"]) is OrderedDict
    assert torch.equal(replica["model"]["a"], shared)
    assert torch.equal(replica["model"]["b"], shared[3:5])
    assert replica["model"]["b"].untyped_storage().data_ptr() == (
        replica["model"]["a"].untyped_storage().data_ptr()
    )
    assert type(replica["model"]["p"]) is torch.nn.Parameter
    values = replica["values"]
    assert values[:2] == [1, 2.5] and values[2] != values[2] and values[3:] == state["values"][3:]
    assert torch.equal(replica[3], state[3])
    assert header["storages"] == [40, 8, 8]


def test_module_state_dict_metadata_travels_with_the_replica() -> None:
    # Module.state_dict() versions (read by load_state_dict) reach the partner too.
    state = torch.nn.Linear(2, 2).state_dict()
    encoded = encode(state)
    header = json.loads(json.dumps(encoded.header))
    storages = [s.clone() for s in encoded.storages]
    replica: Any = decode(header, storages, [], source=1)
    assert replica._metadata == state._metadata  # type: ignore[attr-defined]
    torch.nn.Linear(2, 2).load_state_dict(replica)


def test_encode_refuses_objects_the_wire_does_not_carry() -> None:
    class Opaque:
        pass

    with pytest.raises(astage.ReplicationError, match=r"\['optim'\]\['lock'\]"):
        encode({"optim": {"lock": Opaque()}})
    with pytest.raises(astage.ReplicationError, match="dict key"):
        encode({("a", 1): torch.ones(1)})


def test_stager_needs_an_initialized_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():  # pragma: no cover - another test left a group behind
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(astage.ReplicationError, match="init_process_group"):
        astage.ReplicationStager()


def test_timeout_must_be_positive_seconds_or_a_timedelta() -> None:
    assert _seconds(2) == 2.0
    assert _seconds(timedelta(minutes=1)) == 60.0
    assert _seconds(np.float32(2.5)) == 2.5  # type: ignore[arg-type] # a number of another type
    # True and "5" were taken as 1 and 5 seconds (float() of them), where every other option
    # of astage refuses a bool and a string.
    for bad in (0, -1, float("nan"), "soon", timedelta(0), True, "5", b"5"):
        with pytest.raises(astage.InvalidOptionsError, match="timeout"):
            _seconds(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_mailbox_hands_progress_from_a_thread_to_the_loop_in_order(backend: str) -> None:
    async def main() -> list[Any]:
        mailbox = _Mailbox()

        def produce() -> None:
            for i in range(50):
                if i % 10 == 0:
                    time.sleep(0.01)  # the reader waits in its thread now and then
                mailbox.put(Landed([i]))
            mailbox.close()

        seen: list[Any] = []
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(anyio.to_thread.run_sync, produce)
            async for progress in mailbox:
                seen.append(progress)
        return seen

    seen = anyio.run(main, backend=backend)
    assert seen == [Landed([i]) for i in range(50)]


def test_mailbox_writer_never_waits_for_the_loop() -> None:
    # An exchange thread outliving its caller (cancelled; its loop gone) must run to its end.
    async def abandon() -> _Mailbox:
        mailbox = _Mailbox()
        with anyio.move_on_after(0.05):
            async for _ in mailbox:
                pass
        return mailbox

    mailbox = anyio.run(abandon)
    finished = threading.Event()
    mailbox.close()  # (what leaving its block does) frees the abandoned reader thread

    def exchange_thread() -> None:
        for i in range(3):
            mailbox.put(Landed([i]))
        mailbox.close()
        finished.set()

    threading.Thread(target=exchange_thread, daemon=True).start()
    assert finished.wait(5)


def _anyio_workers() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "AnyIO worker thread"}


def test_mailbox_reader_abandoned_by_a_cancelled_call_ends_with_the_block() -> None:
    # The call was cancelled before its exchange thread ran: nobody else will close the box.
    before = _anyio_workers()

    async def cancelled_call() -> None:
        with _Mailbox() as mailbox, anyio.move_on_after(0.05):
            async for _ in mailbox:
                pass

    anyio.run(cancelled_call)
    deadline = time.monotonic() + 5
    while _anyio_workers() - before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _anyio_workers() - before, "a reader thread still waits on the mailbox"


def test_a_refused_snapshot_names_both_ranks_and_keeps_its_path() -> None:
    ring = Transport(None, rank=0, send_to=1, receive_from=2, timeout=1.0)
    with pytest.raises(astage.ReplicationError) as refused:
        encode({"optim": {"lock": threading.Lock()}})
    error = ring._refusal(refused.value)
    assert error.path == ("optim", "lock")
    assert str(error).startswith("at ['optim']['lock']: rank 0 (sending to rank 1, receiving")
    assert "rank 2" in str(error) and "cannot replicate" in str(error)
