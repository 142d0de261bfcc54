"""One rank of the multi-process gloo jobs of tests/test_dcp_storage.py.

Run as ``python tests/_dcp_storage_worker.py RANK WORLD INIT_FILE ROOT``; the test runs a 4-rank
and a 2-rank job side by side, sharing ROOT. Each job, in turn:

- ``save``: an FSDP2 (``fully_shard``) model and its AdamW state (through ``get_state_dict``),
  trained one step, saved with ``astage.compat.FileSystemWriter`` into ``ROOT/ckpt{WORLD}``: by
  ``dcp.async_save`` on a dedicated gloo group while training goes on (4 ranks), by
  ``dcp.save`` (2 ranks); rank 0 writes the full state as reference;
- ``load``: a fresh model and optimizer on the same ranks load it back: equal to the reference;
- ``reshard``: once the other job's checkpoint is there, load it (saved on 2, loaded on 4, and
  the reverse): equal to that job's reference;
- ``kill`` (2 ranks, last): a committed save into ``ROOT/kill``, then a second save into the
  same folder during which rank 1 dies (``os._exit``) in the middle of writing its bytes; the
  test then checks the folder.

Each rank writes every check's outcome ("ok" or the traceback) into
``ROOT/rank{RANK}-of-{WORLD}.json`` after each check (a rank may die in the last one).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from datetime import timedelta
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import state_dict_loader, state_dict_saver
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from astage.compat import FileSystemReader, FileSystemWriter, _storage_writer

warnings.filterwarnings("ignore")
TIMEOUT = timedelta(seconds=60)


def model_and_optimizer(world: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The same model on every rank (same seed), its parameters sharded over ``world`` ranks."""
    torch.manual_seed(0)
    # Sizes not divisible by 4 or 2 on purpose: uneven shards, padded by FSDP.
    model = torch.nn.Sequential(
        torch.nn.Linear(13, 34), torch.nn.ReLU(), torch.nn.Linear(34, 7, bias=False)
    )
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    return model, optimizer


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    generator = torch.Generator().manual_seed(100 + step)  # the same batch on every rank
    batch = torch.randn(8, 13, generator=generator)
    model(batch).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd, "extra": {"step": 3, "name": "run"}}


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    return {"model": model_sd, "optim": optim_sd}


def same(a: Any, b: Any, where: str = "") -> None:
    """Assert ``a`` equals ``b`` exactly: structure, dtypes, shapes and values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, (where, a.dtype, b.dtype)
        assert torch.equal(a, b), (where, (a - b).abs().max())
    elif isinstance(a, dict):
        assert isinstance(b, dict), where
        assert sorted(a, key=str) == sorted(b, key=str), (where, sorted(a), sorted(b))
        for key in a:
            same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, repr(a)[:200], repr(b)[:200])


def count_reused_items() -> list[int]:
    """The items each committed early data file supplied (the writer wrote while staging)."""
    counts: list[int] = []
    commit = _storage_writer._Prewrite.commit

    def counting(prewrite: Any, *args: Any, **kwargs: Any) -> Any:
        results = commit(prewrite, *args, **kwargs)
        counts.append(prewrite.reused)
        return results

    _storage_writer._Prewrite.commit = counting  # type: ignore[method-assign,assignment]
    return counts


def save(rank: int, world: int, ckpt: str, reference: str, how: str) -> None:
    """Train one step, save the sharded state into ``ckpt``, the full one into ``reference``."""
    model, optimizer = model_and_optimizer(world)
    train_step(model, optimizer, 0)
    state = sharded_state(model, optimizer)
    full = full_state(model, optimizer)
    if rank == 0:  # now: it shares tensors (the optimizer's step) with the live state
        torch.save(full, reference)
    writer = FileSystemWriter(ckpt)
    if how == "sync":
        state_dict_saver.save(state, storage_writer=writer)
    else:
        # A dedicated gloo group: the upload runs its collectives (plan gather, result gather)
        # in another thread while training goes on; on the training group they would interleave
        # with the training's own collectives and gloo aborts with a size mismatch.
        upload_group = dist.new_group(backend="gloo", timeout=TIMEOUT)
        kind = AsyncCheckpointerType.PROCESS if how == "process" else AsyncCheckpointerType.THREAD
        reused = count_reused_items()
        future = state_dict_saver.async_save(
            state, storage_writer=writer, process_group=upload_group, async_checkpointer_type=kind
        )
        train_step(model, optimizer, 1)  # training (and its collectives) goes on meanwhile
        assert isinstance(future, Future)  # not an AsyncSaveResponse: staging is synchronous
        future.result()
        if how != "process":  # the local shards were written while staging, and used
            assert reused and reused[0] > 0, reused
        dist.destroy_process_group(upload_group)
    dist.barrier()


def load(rank: int, world: int, ckpt: str, reference: str) -> None:
    """A fresh model and optimizer on ``world`` ranks load ``ckpt``: equal to ``reference``."""
    model, optimizer = model_and_optimizer(world)
    state = sharded_state(model, optimizer)
    state["extra"] = {"step": 0, "name": ""}
    state_dict_loader.load(state, storage_reader=FileSystemReader(ckpt))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    loaded = full_state(model, optimizer)
    assert state["extra"] == {"step": 3, "name": "run"}, state["extra"]
    if rank == 0:  # a full state dict gathered with cpu_offload lives on rank 0 only
        same(loaded, torch.load(reference, weights_only=True))
        assert loaded["optim"]["state"], "no optimizer state loaded"


def wait_for(path: str, seconds: float = 240) -> None:
    """Wait until the other job (running beside this one) says its checkpoint is saved."""
    deadline = time.monotonic() + seconds
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.1)
    with open(path) as file:
        assert file.read() == "ok", "the other job's save failed"


def kill(rank: int, root: str) -> None:
    """A committed save, then a second one into the same folder during which rank 1 dies."""
    folder = os.path.join(root, "kill")
    first = {f"r{rank}": {"w": torch.arange(1000.0) + rank, "b": torch.full((77,), 1.0 + rank)}}
    state_dict_saver.save(first, storage_writer=FileSystemWriter(folder))
    torch.save(first, os.path.join(root, f"kill-reference{rank}.pt"))
    dist.barrier()
    if rank == 1:
        real = vars(_storage_writer)["pwritev_all"]
        calls = 0

        def die_midway(fd: int, buffers: list[memoryview], offset: int) -> None:
            nonlocal calls
            calls += 1
            if calls == 3:
                os._exit(17)  # killed mid-save: no cleanup, no goodbye
            real(fd, buffers, offset)

        vars(_storage_writer)["pwritev_all"] = die_midway
    second = {f"r{rank}": {"w": torch.arange(1000.0) * -2, "b": torch.zeros(77)}}
    try:
        # small chunks: rank 1 has written some of its bytes when it dies
        state_dict_saver.save(second, storage_writer=FileSystemWriter(folder, chunk_bytes=512))
    except BaseException:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
        pass
    else:
        raise AssertionError("the second save completed although rank 1 died")


def main() -> None:
    rank_s, world_s, init_file, root = sys.argv[1:5]
    rank, world = int(rank_s), int(world_s)
    other = 2 if world == 4 else 4
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=TIMEOUT
    )
    results: dict[str, str] = {}
    report = os.path.join(root, f"rank{rank}-of-{world}.json")

    def record(name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
            results[name] = "ok"
        except BaseException:  # noqa: BLE001 - reported to the test
            results[name] = traceback.format_exc()
        with open(report, "w") as file:  # after every check: a rank may die in the last one
            json.dump(results, file)

    ckpt = os.path.join(root, f"ckpt{world}")
    reference = os.path.join(root, f"reference{world}.pt")
    how = "thread" if world == 4 else "sync"
    record("save", lambda: save(rank, world, ckpt, reference, how))
    record("load", lambda: load(rank, world, ckpt, reference))
    if rank == 0:
        with open(os.path.join(root, f"ready{world}.tmp"), "w") as file:
            file.write("ok" if results["save"] == "ok" else "failed")
        os.replace(os.path.join(root, f"ready{world}.tmp"), os.path.join(root, f"ready{world}"))
    other_ckpt = os.path.join(root, f"ckpt{other}")
    other_reference = os.path.join(root, f"reference{other}.pt")
    record("wait", lambda: wait_for(os.path.join(root, f"ready{other}")))
    record("reshard", lambda: load(rank, world, other_ckpt, other_reference))
    if world == 2:
        dist.barrier()
        record("kill", lambda: kill(rank, root))
    else:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
