"""Replication against a partner that misbehaves: 2-rank gloo jobs on 127.0.0.1.

What a partner sends is untrusted, and the pair must stay in step. The jobs (started once per
module, side by side; ``tests/_dist_worker.py`` runs each rank):

- ``peers`` (asyncio) and ``peers-trio``: rank 1 sends crafted headers, which rank 0 refuses
  naming the field, before receiving a byte, with the pair still in step; a rank whose local
  staging fails, or is cancelled; a header of another call; ShardedTensors; DCP's
  ``_ReplicationStager`` through ``astage.compat`` (asyncio only: it is synchronous);
- ``killed``: rank 1 dies mid-exchange.

The header checks themselves (lengths, fields) are also tested in process, below.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
from test_replication import WORKER, Job, check

import astage
from astage._replication._wire import (
    MAX_HEADER_BYTES,
    check_lengths,
    decode,
    encode,
    parse_header,
)

JOBS = {  # name: (the worker's job, backend)
    "peers": ("peers", "asyncio"),
    "peers-trio": ("peers", "trio"),
    "killed": ("killed", "asyncio"),
}
PEER_JOBS = ["peers", "peers-trio"]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Job]]:
    started: dict[str, Job] = {}
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for name, (job_kind, backend) in JOBS.items():
        out = tmp_path_factory.mktemp(f"peers-{name}")
        args = [str(out / "init"), str(out), backend]
        procs = [
            subprocess.Popen(
                [sys.executable, str(WORKER), job_kind, str(rank), "2", *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
            )
            for rank in range(2)
        ]
        started[name] = Job(2, out, procs)
    yield started
    for job in started.values():
        for proc in job.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.parametrize("job_name", PEER_JOBS)
def test_crafted_headers_are_refused_naming_the_field_and_the_pair_stays_in_step(
    jobs: dict[str, Job], job_name: str
) -> None:
    check(jobs[job_name], "crafted_headers")


@pytest.mark.parametrize("job_name", PEER_JOBS)
def test_a_failed_local_staging_is_announced_and_the_pair_stays_in_step(
    jobs: dict[str, Job], job_name: str
) -> None:
    check(jobs[job_name], "staging_fails")


@pytest.mark.parametrize("job_name", PEER_JOBS)
def test_a_cancelled_local_staging_is_announced_and_breaks_the_pair_on_both_sides(
    jobs: dict[str, Job], job_name: str
) -> None:
    check(jobs[job_name], "staging_cancelled")


@pytest.mark.parametrize("job_name", PEER_JOBS)
def test_a_header_of_another_call_breaks_the_pair_on_both_sides(
    jobs: dict[str, Job], job_name: str
) -> None:
    check(jobs[job_name], "out_of_step")


@pytest.mark.parametrize("job_name", PEER_JOBS)
def test_sharded_tensors_are_replicated(jobs: dict[str, Job], job_name: str) -> None:
    check(jobs[job_name], "sharded_tensor")


def test_compat_replication_stager_replicates_and_persists_like_dcps(
    jobs: dict[str, Job],
) -> None:
    check(jobs["peers"], "compat_replication")


def test_a_partner_killed_mid_exchange_is_a_replication_error_and_breaks_the_stager(
    jobs: dict[str, Job],
) -> None:
    job = jobs["killed"]
    rank1 = job.procs[1]
    rank1.wait(timeout=120)
    assert rank1.returncode == 3  # it did die mid-exchange
    job.procs = job.procs[:1]  # rank 1 wrote no report
    job.world = 1
    check(job, "partner_killed")


# -- in process: the checks of the first message and the header ---------------------------------


def test_first_message_lengths_are_checked() -> None:
    assert check_lengths(100, 0) is None
    assert check_lengths(100, -1) is None  # a refusal
    assert "header length" in (check_lengths(-5, 10) or "")
    assert "header length" in (check_lengths(0, 10) or "")
    assert "header length" in (check_lengths(MAX_HEADER_BYTES + 1, 10) or "")
    assert "negative" in (check_lengths(10, -2) or "")


def header_of(state: object) -> tuple[dict[str, object], list[torch.Tensor]]:
    encoded = encode(state, call=1)
    return json.loads(json.dumps(encoded.header)), [s.clone() for s in encoded.storages]


def test_parse_header_checks_sizes_against_the_total() -> None:
    header, _ = header_of({"w": torch.arange(4.0)})
    raw = json.dumps(header).encode()
    parsed = parse_header(raw, 16)
    assert parsed.sizes == [16] and parsed.call == 1
    with pytest.raises(astage.ReplicationError, match="adds up to 16 bytes"):
        parse_header(raw, 17)
    header["storages"] = [True]
    with pytest.raises(astage.ReplicationError, match="'storages'"):
        parse_header(json.dumps(header).encode(), 1)


@pytest.mark.parametrize(
    ("spoil", "says"),
    [
        ({"shape": [5]}, "larger than its storage"),
        ({"offset": 1}, "larger than its storage"),
        ({"stride": [2]}, "larger than its storage"),
        ({"storage": -1}, "field 'storage'"),
        ({"storage": 1}, "field 'storage'"),
        ({"dtype": "float99"}, "field 'dtype'"),
        ({"dtype": "float64", "shape": [3]}, "larger than its storage"),
        ({"shape": [2, 2]}, "'shape' and 'stride'"),
        ({"param": "yes"}, "'param'"),
        # Lazy bits torch never sets on such a view, and cannot read back (neg_cpu on Bool).
        ({"dtype": "bool", "neg": True}, "field 'neg'"),
        ({"dtype": "int32", "neg": True}, "field 'neg'"),
        ({"conj": True}, "field 'conj'"),
        # requires_grad on an integer view: torch refuses to make such a Parameter.
        ({"dtype": "int32", "param": True}, "field 'param'"),
    ],
)
def test_decode_checks_every_tensor_field_before_making_a_view(
    spoil: dict[str, object], says: str
) -> None:
    header, storages = header_of({"w": torch.arange(4.0)})
    node = header["skeleton"]["dict"][0][1]  # type: ignore[index]
    node.update(spoil)
    with pytest.raises(astage.ReplicationError, match=r"\['w'\]") as error:
        decode(header, storages, [], source=1)
    assert says in str(error.value)


def test_a_mesh_this_process_cannot_build_is_refused_naming_the_field() -> None:
    # Well-formed, so parse_header lets it by; rebuilding it needs a process group (none in
    # this process): torch's ValueError escaped decode(), and in the transport it skipped the
    # verdict exchange, leaving the partner to wait for its deadline.
    header, storages = header_of({"w": torch.arange(4.0)})
    header["meshes"] = [["cpu", [0, 1], None]]
    parse_header(json.dumps(header).encode(), 16)
    with pytest.raises(astage.ReplicationError, match=r"'meshes'\[0\].*cannot be rebuilt here"):
        decode(header, storages, [], source=1)


class _StandInMesh:
    """What the decoder reads of a mesh (its ndim), without a process group."""

    ndim = 1


@pytest.mark.parametrize(
    ("shape", "placement", "says"),
    [
        ([5], ["replicate"], "does not fit"),  # replicated: the local shard is the whole
        ([3], ["shard", 0], "does not fit"),  # a shard larger than the whole
        ([4, 1], ["replicate"], "the DTensor 2"),
        ([4], ["replicate"], None),  # fits: rebuilt
        ([8], ["shard", 0], None),
    ],
)
def test_a_dtensor_node_is_checked_against_its_local_shard(
    monkeypatch: pytest.MonkeyPatch, shape: list[int], placement: list[object], says: str | None
) -> None:
    # The file loader checked the local shard's shape against the DTensor's; the wire did not,
    # and handed torch a DTensor whose global shape its local tensor contradicts.
    from astage._replication import _wire

    made: list[object] = []

    def make_dtensor(*args: object, **kwargs: object) -> str:
        made.append(args)
        return "D"

    monkeypatch.setattr(_wire, "device_mesh_without_backend", lambda *args: _StandInMesh())
    monkeypatch.setattr(_wire, "make_dtensor", make_dtensor)
    header, storages = header_of({"w": torch.arange(4.0)})
    local = header["skeleton"]["dict"][0][1]  # type: ignore[index]
    header["meshes"] = [["cpu", [0, 1], None]]
    node = {"local": local, "mesh": 0, "placements": [placement], "shape": shape}
    node |= {"stride": [1] * len(shape), "requires_grad": False}
    header["skeleton"]["dict"][0][1] = {"dtensor": node}  # type: ignore[index]
    if says is None:
        assert decode(header, storages, [], source=1) == {"w": "D"} and made
        return
    with pytest.raises(astage.ReplicationError, match=rf"\['w'\].*{says}"):
        decode(header, storages, [], source=1)
    assert not made


def test_decode_rebuilds_a_view_that_fits_exactly() -> None:
    header, storages = header_of({"w": torch.arange(4.0)[1:]})
    replica = decode(header, storages, [], source=1)
    assert torch.equal(replica["w"], torch.tensor([1.0, 2.0, 3.0]))  # type: ignore[index]


def test_strided_shard_placements_go_over_the_wire() -> None:
    from torch.distributed.tensor.placement_types import _StridedShard

    from astage._replication._wire import placement_to_json

    assert placement_to_json(_StridedShard(0, split_factor=2), ()) == ["strided_shard", 0, 2]


@pytest.mark.parametrize(
    "placement", [["partial", ["sum"]], ["partial", "nope"], ["shard", -1], ["shard", True]]
)
def test_a_crafted_placement_is_refused_not_raised_raw(placement: list[object]) -> None:
    from astage._files._skeleton import placement_from_node

    assert placement_from_node(placement, 1) is None
