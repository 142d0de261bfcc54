"""``astage.save`` / ``save_sync`` / ``CheckpointDir`` of DTensor state dicts, per rank.

A 2-rank gloo job (``tests/_dtensor_worker.py``) saves an FSDP2 model, its AdamW state and
tensor-parallel style DTensors (a 2-D mesh, an uneven ``Shard``, a ``Partial``), each rank into
its own files, and loads them back on the same mesh; another rank's file and another mesh are
refused. In this process: the files are checked without a process group, loading them in a
world of another size is refused, and crafted DTensor nodes are refused naming the field.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch._C._distributed_c10d import HashStore

import astage
from astage._files._load import check_file
from astage._files._safetensors import header_text

WORKER = Path(__file__).with_name("_dtensor_worker.py")
WORLD = 2
CHECKS = ["save", "load", "load_mesh", "sync", "dir", "other_rank", "other_mesh", "stage"]


@dataclass
class Job:
    root: Path
    logs: dict[int, str]

    def result(self, rank: int) -> dict[str, str]:
        report = self.root / f"rank{rank}.json"
        if not report.exists():
            pytest.fail(f"rank {rank} wrote no report:\n{self.logs[rank]}")
        result: dict[str, str] = json.loads(report.read_text())
        return result


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Job]:
    root = tmp_path_factory.mktemp("dtensor-save")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = {
        rank: subprocess.Popen(
            [sys.executable, str(WORKER), str(rank), str(WORLD), str(root / "init"), str(root)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        for rank in range(WORLD)
    }
    logs = {}
    try:
        for rank, proc in procs.items():
            try:
                output, _ = proc.communicate(timeout=300)  # a loaded 2-core CI machine
            except subprocess.TimeoutExpired:
                proc.kill()
                output, _ = proc.communicate()
            logs[rank] = output.decode(errors="replace")[-3000:]
        yield Job(root, logs)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("check", CHECKS)
def test_dtensor_state_dicts_per_rank(job: Job, check: str) -> None:
    failures = {
        rank: job.result(rank).get(check, "not run")
        for rank in range(WORLD)
        if job.result(rank).get(check) != "ok"
    }
    assert not failures, "\n".join(f"rank {r}:\n{text}" for r, text in failures.items())


@pytest.mark.slow
def test_a_rank_file_stores_its_local_shards_under_the_dtensor_paths(job: Job) -> None:
    """Any safetensors reader sees this rank's shards, under the state dict's paths."""
    from safetensors.torch import load_file

    flat = load_file(str(job.root / "rank1.safetensors"))
    weight = flat["['tp']['weight']"]  # columns 3..4 of 5: rank 1's uneven Shard(1)
    assert torch.equal(weight, (torch.arange(20.0).reshape(4, 5) * 10)[:, 3:])


@pytest.mark.slow
def test_without_a_process_group_the_file_checks_but_does_not_load(job: Job) -> None:
    path = job.root / "rank0.safetensors"
    check_file(path)  # the DTensor nodes are checked without building a mesh
    with pytest.raises(astage.MeshMismatchError, match="saved by rank 0 of a world of 2"):
        astage.load(path)


@pytest.fixture
def world_of_one() -> Iterator[None]:
    dist.init_process_group("gloo", rank=0, world_size=1, store=HashStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_world_of_another_size_is_refused_and_pointed_at_dcp(
    job: Job, world_of_one: None
) -> None:
    with pytest.raises(astage.MeshMismatchError) as caught:
        astage.load(job.root / "rank0.safetensors")
    message = str(caught.value)
    assert "saved by rank 0 of a world of 2" in message
    assert "this process is rank 0 of 1" in message
    assert "dcp.load" in message and "astage.compat.FileSystemWriter" in message
    assert isinstance(caught.value, astage.InvalidOptionsError)
    assert not isinstance(caught.value, astage.CheckpointError)  # resuming must not skip it


def test_device_mesh_must_be_meshes(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    astage.save_sync({"w": torch.ones(2)}, path)
    with pytest.raises(astage.InvalidOptionsError, match="device_mesh must be a DeviceMesh"):
        astage.load(path, device_mesh="cpu")


def test_in_one_rank_dtensors_round_trip_every_placement(
    tmp_path: Path, world_of_one: None
) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("dp",))
    local = torch.arange(6.0).reshape(2, 3)
    placements = {
        "shard": Shard(1),
        "replicate": Replicate(),
        "partial": Partial("max"),
        "strided": _StridedShard(0, split_factor=2),
    }
    sd = {
        name: DTensor.from_local(local, mesh, [placement], run_check=False)
        for name, placement in placements.items()
    }
    sd["tied"] = sd["replicate"]
    path = tmp_path / "one.safetensors"
    astage.save_sync(sd, path)
    loaded = astage.load(path)
    for key, value in sd.items():
        assert loaded[key].placements == value.placements, key
        assert loaded[key].device_mesh == mesh
        assert torch.equal(loaded[key].to_local(), local)
    assert loaded["tied"] is loaded["replicate"]  # one DTensor at two paths, as saved
    assert loaded["shard"].to_local().untyped_storage().data_ptr() == (
        loaded["replicate"].to_local().untyped_storage().data_ptr()  # one local, as saved
    )
    with pytest.raises(astage.MeshMismatchError, match="lives on a 'cpu' mesh"):
        astage.load(path, device="meta")


# -- crafted DTensor nodes ------------------------------------------------------------------------


def edit_dtensor(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite the first DTensor node of ``path``'s skeleton (digest recomputed, as an attacker
    would: the checks must hold on their own)."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + length]), raw[8 + length :]
    document = json.loads(header["__metadata__"]["astage"])
    pairs = document["skeleton"]["dict"]
    change(pairs[0][1]["dtensor"])
    header["__metadata__"]["astage"] = json.dumps(document)
    text = header_text(header)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


@pytest.fixture
def dtensor_file(tmp_path: Path) -> Iterator[Path]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", rank=0, world_size=1, store=HashStore())
    try:
        mesh = init_device_mesh("cpu", (1,))
        path = tmp_path / "d.safetensors"
        astage.save_sync({"w": distribute_tensor(torch.ones(4, 3), mesh, [Shard(0)])}, path)
        yield path
    finally:
        dist.destroy_process_group()


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda node: node.__setitem__(key, value)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (_set("shape", [2, 3]), "does not fit the DTensor's [2, 3]"),  # local [4, 3] > global
        (_set("shape", [4, 5]), "does not fit"),  # an unsharded dim that differs
        (lambda node: node.update(shape=[12], stride=[1]), "has 2 dims, the DTensor 1"),
        (_set("stride", [3]), "must be lists of as many"),
        (_set("placements", [["shard", 2]]), "placement ['shard', 2] is not one"),
        (_set("placements", [["partial", ["sum"]]]), "is not one astage reads"),
        (_set("placements", []), "must be a list of 1"),
        (_set("mesh", ["cpu", [[0, 0]], None]), "distinct ranks"),
        (_set("mesh", ["cpu", [0, -1], None]), "distinct ranks"),
        (_set("mesh", ["cp u", [0], None]), "not a device type"),
        (_set("mesh", ["cpu", [0], ["a", "b"]]), "one string per grid dimension"),
        (_set("rank", 3), "'rank' 3 must be an int in [0, 'world' 1)"),
        (_set("rank", True), "must be an int"),
        (_set("coordinate", [1]), "is not where rank 0 sits"),
        (_set("requires_grad", 1), "'requires_grad' must be a bool"),
        (_set("extra", 1), "a 'dtensor' node must hold"),
        (_set("local", {"numpy": "x"}), "'local' must be a tensor node"),
    ],
)
def test_a_crafted_dtensor_node_is_refused(
    dtensor_file: Path, change: Callable[[dict[str, Any]], None], fragment: str
) -> None:
    edit_dtensor(dtensor_file, change)
    with pytest.raises(astage.CheckpointFormatError) as caught:
        astage.load(dtensor_file)
    message = str(caught.value)
    assert str(dtensor_file) in message and "['w']" in message and fragment in message, message
    with pytest.raises(astage.CheckpointFormatError):
        check_file(dtensor_file)
