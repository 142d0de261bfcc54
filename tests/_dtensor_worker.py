"""One rank of the 2-rank gloo job of tests/test_dtensor_save.py.

Run as ``python tests/_dtensor_worker.py RANK WORLD INIT_FILE ROOT``. Each rank builds an FSDP2
(``fully_shard``) model, trains it one step with AdamW, and adds a tensor-parallel style DTensor
on a 2-D mesh (``("dp", "tp")``, sharded on ``tp``) and a ``Partial`` one. Then, in turn:

- ``save``: ``astage.save`` (async, asyncio), ``astage.save_sync`` and ``CheckpointDir.save``
  write this rank's state into its own files under ROOT;
- ``load``: a fresh model and optimizer load the file back (``load_state_dict``) without
  ``device_mesh=``: equal to the state that was saved, placements and all;
- ``load_mesh``: with ``device_mesh=`` the DTensors are on the job's own meshes, so a
  collective (``full_tensor()``) works on them and gives the saved global tensors;
- ``sync`` and ``dir``: the files of ``save_sync`` and ``CheckpointDir`` load back equal;
- ``other_rank``: loading the other rank's file is refused (MeshMismatchError naming DCP);
- ``other_mesh``: ``device_mesh=`` a mesh with other dim names is refused;
- ``stage``: ``Stager.stage`` of the DTensor state dict still gives DTensors on the same mesh.

Each check's outcome ("ok" or the traceback) goes into ``ROOT/rank{RANK}.json``.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import anyio
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

import astage


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=0.1)


def state(
    model: torch.nn.Module, optim: torch.optim.Optimizer, mesh2d: DeviceMesh
) -> dict[str, Any]:
    rank = dist.get_rank()
    weight = torch.arange(20.0).reshape(4, 5) * 10
    return {
        "model": model.state_dict(),
        "optim": optim.state_dict(),
        "tp": {
            # Shard(1) over tp (5 columns on 2 ranks: 3 and 2, uneven), replicated over dp
            "weight": distribute_tensor(weight, mesh2d, [Replicate(), Shard(1)]),
            "partial": DTensor.from_local(
                torch.full((2,), float(rank + 1)), mesh2d, [Replicate(), Partial()]
            ),
        },
        "step": 1,
    }


def same(a: Any, b: Any, where: str = "") -> None:
    """Equal structure and values; DTensors equal in placements, mesh and local shard."""
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, DTensor):
        assert a.placements == b.placements, (where, a.placements, b.placements)
        assert a.device_mesh == b.device_mesh, where
        assert a.shape == b.shape and a.stride() == b.stride(), where
        same(a.to_local(), b.to_local(), where)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, (where, a, b)
        assert torch.equal(a, b), (where, a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b), (where, list(a), list(b))
        for key in a:
            same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def snapshot(sd: Any) -> Any:
    """A deep copy of ``sd`` (DTensors copied as DTensors) to compare against later."""
    if isinstance(sd, DTensor):  # not clone(): on a Partial one that is an all-reduce
        local = sd.to_local().detach().clone()
        return DTensor.from_local(
            local, sd.device_mesh, sd.placements, shape=sd.shape, stride=sd.stride()
        )
    if isinstance(sd, torch.Tensor):
        return sd.detach().clone()
    if isinstance(sd, dict):
        copied = type(sd)((key, snapshot(value)) for key, value in sd.items())
        if hasattr(sd, "_metadata"):
            copied._metadata = sd._metadata  # type: ignore[attr-defined]
        return copied
    if isinstance(sd, list):
        return [snapshot(value) for value in sd]
    return sd


def main() -> None:
    rank_s, world_s, init_file, root = sys.argv[1:5]
    rank, world = int(rank_s), int(world_s)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    results: dict[str, str] = {}
    report = os.path.join(root, f"rank{rank}.json")

    def record(name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
            results[name] = "ok"
        except BaseException:  # noqa: BLE001 - reported to the test
            results[name] = traceback.format_exc()
        with open(report, "w") as file:
            json.dump(results, file)

    model, optim = build()
    model(torch.randn(4, 8)).square().mean().backward()
    optim.step()
    optim.zero_grad()
    mesh2d = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp"))
    sd = state(model, optim, mesh2d)
    reference = snapshot(sd)
    fsdp_mesh = sd["model"]["0.weight"].device_mesh
    mine = os.path.join(root, f"rank{rank}.safetensors")

    def save() -> None:
        async def run() -> None:
            await astage.save(sd, mine)
            async with astage.CheckpointDir(os.path.join(root, f"dir{rank}")) as folder:
                await folder.save(1, sd)

        anyio.run(run)
        astage.save_sync(sd, os.path.join(root, f"sync{rank}.safetensors"))

    def load() -> None:
        fresh, fresh_optim = build()
        loaded = astage.load(mine)
        same(reference, loaded)
        # AdamW's state appears at its first step: take one (zero gradients) to create it,
        # then load the model and the optimizer over what it changed.
        for param in fresh.parameters():
            param.grad = torch.zeros_like(param)
        fresh_optim.step()
        fresh.load_state_dict(loaded["model"])
        fresh_optim.load_state_dict(loaded["optim"])
        same(reference["model"], fresh.state_dict())
        same(reference["optim"], fresh_optim.state_dict())

    def load_mesh() -> None:
        loaded = astage.load(mine, device_mesh=[fsdp_mesh, mesh2d])
        assert loaded["model"]["0.weight"].device_mesh is fsdp_mesh
        assert loaded["tp"]["weight"].device_mesh is mesh2d
        same(reference, loaded)
        full = loaded["tp"]["weight"].full_tensor()  # a collective on the job's own mesh
        assert torch.equal(full, torch.arange(20.0).reshape(4, 5) * 10), full
        total = loaded["tp"]["partial"].full_tensor()  # Partial: the sum over tp
        assert torch.equal(total, torch.full((2,), float(sum(range(1, world + 1))))), total
        weight = loaded["model"]["0.weight"].full_tensor()
        assert torch.equal(weight, sd["model"]["0.weight"].full_tensor())

    def sync() -> None:
        same(reference, astage.load(os.path.join(root, f"sync{rank}.safetensors")))

    def folder() -> None:
        found = astage.CheckpointDir(os.path.join(root, f"dir{rank}")).load_latest()
        assert found is not None
        step, loaded = found
        assert step == 1
        same(reference, loaded)

    def other_rank() -> None:
        theirs = os.path.join(root, f"rank{1 - rank}.safetensors")
        try:
            astage.load(theirs)
        except astage.MeshMismatchError as error:
            message = str(error)
            assert f"saved by rank {1 - rank} of a world of {world}" in message, message
            assert f"this process is rank {rank} of {world}" in message, message
            assert "dcp.load" in message and "astage.compat.FileSystemWriter" in message
        else:
            raise AssertionError("the other rank's file loaded")

    def other_mesh() -> None:
        renamed = init_device_mesh("cpu", (1, world), mesh_dim_names=("replica", "shard"))
        try:
            astage.load(mine, device_mesh=[fsdp_mesh, renamed])
        except astage.MeshMismatchError as error:
            message = str(error)
            assert "['tp']['weight']" in message and "('dp', 'tp')" in message, message
            assert "('replica', 'shard')" in message and "dcp.load" in message, message
        else:
            raise AssertionError("a file saved on another mesh loaded")

    def stage() -> None:
        async def run() -> Any:
            async with astage.Stager() as stager:
                staged = await stager.stage(sd)
                same(reference, staged)
                assert staged["tp"]["weight"].device_mesh is mesh2d

        anyio.run(run)

    record("save", save)
    dist.barrier()  # both files are there
    record("load", load)
    record("load_mesh", load_mesh)
    record("sync", sync)
    record("dir", folder)
    record("other_rank", other_rank)
    record("other_mesh", other_mesh)
    record("stage", stage)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
