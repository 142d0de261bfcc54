"""One rank of a multi-process gloo job for tests/test_replication.py.

Run as ``python tests/_dist_worker.py JOB RANK WORLD INIT_FILE OUT_DIR BACKEND``. Every check
runs in turn, its async parts on ``BACKEND`` (``asyncio``, ``uvloop`` or ``trio``, through
anyio); each one's outcome ("ok" or the error) goes into ``OUT_DIR/rank{RANK}.json``, which the
test reads. A check that fails does not stop the others.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from datetime import timedelta
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import anyio
import torch
import torch.distributed as dist

import astage

BIG = (17 << 20) // 4  # float32 elements of a storage big enough to travel alone
BACKEND = "asyncio"  # set by main() from the command line


def run(fn: Callable[..., Any], *args: Any) -> Any:
    """``anyio.run`` on this job's backend (uvloop is asyncio with uvloop's event loop)."""
    if BACKEND == "uvloop":
        return anyio.run(fn, *args, backend="asyncio", backend_options={"use_uvloop": True})
    return anyio.run(fn, *args, backend=BACKEND)


def plain_sd(rank: int) -> dict[str, Any]:
    return {"w": torch.arange(12.0).reshape(3, 4) + 100 * rank, "step": rank, "name": f"r{rank}"}


def nested_sd(rank: int, big: bool) -> dict[str, Any]:
    shared = torch.arange(10, dtype=torch.float64) + rank
    model = OrderedDict(
        [
            ("emb", shared),
            ("head", shared),  # tied weight
            ("half", shared[2:7]),  # a view
            ("t", torch.arange(6, dtype=torch.int32).reshape(2, 3).t() * (rank + 1)),
            ("flag", torch.tensor(rank % 2 == 0)),
            ("bf", torch.full((3,), rank + 0.5, dtype=torch.bfloat16)),
            ("empty", torch.empty(0, 5)),
        ]
    )
    sd: dict[str, Any] = {
        "model": model,
        "optim": {
            "state": {0: {"exp_avg": torch.ones(4) * rank, "step": torch.tensor(3.0 + rank)}},
            "param_groups": [{"lr": 0.1, "params": [0], "betas": (0.9, 0.99), "eps": float("inf")}],
        },
        "extra": [1, "two", None, (3.5, True)],
    }
    if big:
        sd["big"] = torch.full((BIG,), float(rank))
    return sd


def same(a: Any, b: Any) -> None:
    """Assert ``a`` and ``b`` are equal: structure, types, tensors' dtype, shape and values."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        assert torch.equal(a, b), (a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            same(x, y)
    else:
        assert a == b, (a, b)


def dtensor_sd(rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh = init_device_mesh("cpu", (world,))
    local = torch.arange(8.0).reshape(2, 4) + 10 * rank
    sharded = DTensor.from_local(local, mesh, [Shard(0)], run_check=False)
    replicated = DTensor.from_local(torch.ones(3), mesh, [Replicate()], run_check=False)
    return {"sharded": sharded, "replicated": replicated, "plain": torch.tensor([rank])}


async def check_plain(rank: int, world: int, stager: astage.ReplicationStager) -> None:
    replica = await stager.stage(plain_sd(rank))
    same(replica, plain_sd(stager.receive_from))


async def check_nested(rank: int, world: int, stager: astage.ReplicationStager) -> None:
    sd = nested_sd(rank, big=True)
    replica = await stager.stage(sd)
    same(replica, nested_sd(stager.receive_from, big=True))
    model = replica["model"]
    assert model["emb"] is not model["head"]
    assert model["emb"].untyped_storage().data_ptr() == model["head"].untyped_storage().data_ptr()
    assert model["half"].untyped_storage().data_ptr() == model["emb"].untyped_storage().data_ptr()
    assert replica["big"].untyped_storage().data_ptr() != model["emb"].untyped_storage().data_ptr()
    # a second call: the partner's new values arrive, into the same host buffers
    big_ptr = replica["big"].data_ptr()
    sd["model"]["emb"].add_(1)
    sd["big"].add_(1)
    again = await stager.stage(sd)
    expected = nested_sd(stager.receive_from, big=True)
    expected["model"]["emb"].add_(1)
    expected["big"].add_(1)
    same(again, expected)
    assert again["big"].data_ptr() == big_ptr


async def check_dtensor(rank: int, world: int, stager: astage.ReplicationStager) -> None:
    from torch.distributed.tensor import DTensor, Replicate, Shard

    sd = dtensor_sd(rank, world)
    replica = await stager.stage(sd)
    partner = stager.receive_from
    sharded = replica["sharded"]
    assert type(sharded) is DTensor
    assert sharded.placements == (Shard(0),)
    assert sharded.shape == (2 * world, 4)
    assert sharded.device_mesh is sd["sharded"].device_mesh  # this rank's own mesh object
    local = sharded.to_local()
    assert local.device.type == "cpu"
    assert torch.equal(local, torch.arange(8.0).reshape(2, 4) + 10 * partner)
    assert replica["replicated"].placements == (Replicate(),)
    assert torch.equal(replica["plain"], torch.tensor([partner]))


async def check_explicit_partner(rank: int, world: int) -> None:
    partner = rank ^ 1  # 0<->1, 2<->3: not the default half-world pairing when world > 2
    async with astage.ReplicationStager(partner=partner, timeout=30) as stager:
        assert (stager.send_to, stager.receive_from) == (partner, partner)
        same(await stager.stage(plain_sd(rank)), plain_sd(partner))


async def check_refusal(rank: int, world: int, stager: astage.ReplicationStager) -> None:
    """Rank 0 holds an object the wire does not carry: both ranks raise, then go on in step."""
    sd: dict[str, Any] = plain_sd(rank)
    if rank == 0:
        sd["opaque"] = object()
    started = time.monotonic()
    if rank == 0 or stager.receive_from == 0:
        try:
            await stager.stage(sd)
        except astage.ReplicationError as error:
            text = str(error)
            assert "['opaque']" in text, text
            assert f"rank {rank}" in text and f"rank {stager.receive_from}" in text, text
            if rank != 0:
                assert "rank 0 could not send its snapshot" in text, text
        else:
            raise AssertionError("no error")
    else:  # ranks that do not receive from rank 0 get their replica as usual
        same(await stager.stage(sd), plain_sd(stager.receive_from))
    assert time.monotonic() - started < 10  # not a timeout
    same(await stager.stage(plain_sd(rank)), plain_sd(stager.receive_from))


async def check_persist(rank: int, world: int, tmp: str) -> None:
    from torch.distributed.tensor import DTensor

    folder = os.path.join(tmp, "replicas")
    async with astage.ReplicationStager(storage_dir=folder, timeout=30) as stager:
        sd = nested_sd(rank, big=True)  # a storage that travels alone, and buckets
        sd["dt"] = dtensor_sd(rank, world)["sharded"]
        replica = await stager.stage(sd)
        path = stager.replica_path
        assert path is not None
        assert os.path.basename(path) == (
            f"replica-rank{rank}-from-rank{stager.receive_from}.safetensors"
        )
        assert os.path.exists(path)
        loaded = astage.load(path)
        assert isinstance(replica["dt"], DTensor)
        expected = dict(replica)
        expected["dt"] = replica["dt"].to_local()
        same(loaded, expected)
        # the DTensor's spec is in the file's metadata
        with open(path, "rb") as file:  # safetensors: an 8-byte length, then the JSON header
            length = int.from_bytes(file.read(8), "little")
            header = json.loads(file.read(length))
        info = json.loads(header["__metadata__"]["astage.replica"])
        assert info["rank"] == rank and info["partner"] == stager.receive_from
        assert info["dtensors"]["['dt']"]["placements"] == [["shard", 0]]
        # a second exchange replaces the file atomically; no temporary file is left
        await stager.stage(sd)
        # (the folder is shared: the partner may be writing its own temporary file now)
        mine = f".replica-rank{rank}-"
        assert not [n for n in os.listdir(folder) if n.startswith(mine) and n.endswith(".tmp")]


async def check_persist_failure(rank: int, world: int, tmp: str) -> None:
    folder = os.path.join(tmp, f"blocked{rank}")
    stager = astage.ReplicationStager(storage_dir=folder, timeout=30)
    try:
        path = stager.replica_path
        assert path is not None
        os.makedirs(path)  # a folder where the file should go: the rename fails
        try:
            await stager.stage(plain_sd(rank))
        except astage.ReplicationError as error:
            text = str(error)
            assert f"rank {rank}" in text and f"rank {stager.receive_from}" in text, text
        else:
            raise AssertionError("persisting over a folder did not fail")
        assert os.listdir(folder) == [os.path.basename(path)], os.listdir(folder)
    finally:
        await stager.aclose()


def check_dtensor_staging(rank: int, world: int) -> None:
    from torch.distributed.tensor import DTensor, Shard

    sd = dtensor_sd(rank, world)

    def verify(staged: Any) -> None:
        for key in ("sharded", "replicated"):
            source, copy = sd[key], staged[key]
            assert type(copy) is DTensor
            assert copy.placements == source.placements
            assert copy.device_mesh is source.device_mesh
            assert copy.shape == source.shape and copy.stride() == source.stride()
            local = copy.to_local()
            assert local.device.type == "cpu"
            assert torch.equal(local, source.to_local())
            assert local.data_ptr() != source.to_local().data_ptr()
        assert staged["sharded"].placements == (Shard(0),)
        before = staged["sharded"].to_local().clone()
        sd["sharded"].to_local().add_(1)  # the copy is independent of the live tensor
        assert torch.equal(staged["sharded"].to_local(), before)
        sd["sharded"].to_local().sub_(1)

    with astage.SyncStager(pin_memory=False) as sync:
        verify(sync.stage(sd))

    async def stage_async() -> None:
        async with astage.Stager(pin_memory=False) as stager:
            verify(await stager.stage(sd))

    run(stage_async)


def check_sharded_tensor_staging(rank: int, world: int) -> None:
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import init_from_local_shards
    from torch.distributed._shard.sharded_tensor.api import ShardedTensor
    from torch.distributed._shard.sharded_tensor.shard import Shard

    local = torch.arange(8.0).reshape(2, 4) + 10 * rank
    meta = ShardMetadata([2 * rank, 0], [2, 4], f"rank:{rank}/cpu")
    source = init_from_local_shards([Shard(local, meta)], [2 * world, 4])
    sd = {"st": source, "other": torch.ones(2)}

    def verify(staged: Any) -> None:
        copy = staged["st"]
        assert type(copy) is ShardedTensor
        assert copy.metadata() == source.metadata() and copy.size() == (2 * world, 4)
        (shard,) = copy.local_shards()
        assert shard.metadata == meta
        assert shard.tensor.device.type == "cpu" and torch.equal(shard.tensor, local)
        assert shard.tensor.data_ptr() != local.data_ptr()
        local.add_(1)
        assert not torch.equal(shard.tensor, local)
        local.sub_(1)

    with astage.SyncStager(pin_memory=False) as sync:
        verify(sync.stage(sd))

    async def stage_async() -> None:
        async with astage.Stager(pin_memory=False) as stager:
            verify(await stager.stage(sd))

    run(stage_async)


def check_dcp(rank: int, world: int, tmp: str) -> None:
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
    from torch.distributed.checkpoint.state_dict_saver import async_save
    from torch.distributed.tensor import DTensor, Shard

    from astage import compat

    folder = os.path.join(tmp, "dcp")
    sharded = dtensor_sd(rank, world)["sharded"]
    # Plain tensors count as replicated in DCP (one rank writes them); the DTensor is sharded.
    sd = {"w": torch.arange(6.0), "nested": {"b": torch.ones(2, 2)}, "sharded": sharded}
    options = compat.StagingOptions(
        use_pinned_memory=False,
        use_shared_memory=False,
        use_async_staging=True,
        use_non_blocking_copy=False,
    )
    with compat.DefaultStager(options) as stager:
        response: Any = async_save(sd, checkpoint_id=folder, async_stager=stager)
        upload = getattr(response, "upload_completion", response)
        upload.result(timeout=60)
    blank = DTensor.from_local(torch.zeros(2, 4), sharded.device_mesh, [Shard(0)], run_check=False)
    loaded: dict[str, Any] = {
        "w": torch.zeros(6),
        "nested": {"b": torch.zeros(2, 2)},
        "sharded": blank,
    }
    dcp_load(loaded, checkpoint_id=folder)
    assert torch.equal(loaded["w"], sd["w"])
    assert torch.equal(loaded["nested"]["b"], sd["nested"]["b"])
    assert torch.equal(loaded["sharded"].to_local(), sharded.to_local())


async def check_cancel(rank: int, world: int, tmp: str) -> None:
    """Rank 0 cancels a stage() whose partner is late: the loop is free at once, the stager
    refuses further calls, and the exchange still completes in the background for rank 1."""
    async with astage.ReplicationStager(timeout=30) as stager:
        if rank == 0:
            started = time.monotonic()
            with anyio.move_on_after(0.3) as scope:
                await stager.stage(plain_sd(rank))
            assert scope.cancelled_caught, "not cancelled"
            assert time.monotonic() - started < 0.9  # not held until the partner joined
            try:
                await stager.stage(plain_sd(rank))
            except astage.ReplicationError as error:
                text = str(error)
                assert "cancelled midway" in text and "rank 0" in text and "rank 1" in text, text
            else:
                raise AssertionError("a stager whose exchange was cancelled staged again")
        else:
            await anyio.sleep(1.0)  # join late
            same(await stager.stage(plain_sd(rank)), plain_sd(stager.receive_from))


async def check_aclose_cancelled(rank: int, world: int, tmp: str) -> None:
    """A cancelled aclose() (it waits for the exchange in progress) leaves the stager open and
    working; a second aclose() closes it, and a closed stager says so, naming its class."""
    stager = astage.ReplicationStager(timeout=30)
    if rank == 0:
        async with anyio.create_task_group() as tasks:
            replicas: list[Any] = []

            async def stage() -> None:
                replicas.append(await stager.stage(plain_sd(rank)))

            tasks.start_soon(stage)
            await anyio.sleep(0.2)  # the exchange waits for the late partner
            with anyio.move_on_after(0.2) as scope:
                await stager.aclose()
            assert scope.cancelled_caught, "aclose() did not wait for the exchange"
        same(replicas[0], plain_sd(stager.receive_from))
        same(await stager.stage(plain_sd(rank)), plain_sd(stager.receive_from))  # still open
    else:
        await anyio.sleep(1.0)
        for _ in range(2):
            same(await stager.stage(plain_sd(rank)), plain_sd(stager.receive_from))
    await stager.aclose()
    await stager.aclose()  # a second call is a no-op
    for attempt in (stager.stage(plain_sd(rank)), stager.__aenter__()):
        try:
            await attempt
        except astage.StagerClosedError as error:
            assert "ReplicationStager" in str(error), str(error)
        else:
            raise AssertionError("a closed ReplicationStager staged")


def check_busy(rank: int, world: int) -> None:
    """A second thread's event loop calling the stager while a call runs gets BusyError."""
    stager = astage.ReplicationStager(timeout=30)
    try:
        if rank == 0:
            replicas: list[Any] = []
            first = threading.Thread(
                target=lambda: replicas.append(run(stager.stage, plain_sd(rank)))
            )
            first.start()
            time.sleep(0.3)  # the first call waits for the late partner
            try:
                run(stager.stage, plain_sd(rank))
            except astage.BusyError as error:
                assert "ReplicationStager" in str(error), str(error)
            else:
                raise AssertionError("a second loop's call was not refused")
            finally:
                first.join(timeout=30)
            same(replicas[0], plain_sd(stager.receive_from))
        else:
            time.sleep(1.0)
            same(run(stager.stage, plain_sd(rank)), plain_sd(stager.receive_from))
    finally:
        run(stager.aclose)


async def check_options(rank: int, world: int) -> None:
    """Bad arguments are InvalidOptionsErrors; the stager is not built."""
    for kwargs in ({"timeout": 0}, {"timeout": -1.0}, {"timeout": "soon"}, {"partner": rank}):
        try:
            astage.ReplicationStager(**kwargs)
        except astage.InvalidOptionsError:
            pass
        else:
            raise AssertionError(f"{kwargs} accepted")


async def check_timeout(rank: int, world: int, tmp: str) -> None:
    """Rank 0 stages; rank 1 never joins. Rank 0 must time out naming rank 1."""
    done = os.path.join(tmp, "timeout-done")
    if rank != 0:
        deadline = time.monotonic() + 30
        while not os.path.exists(done) and time.monotonic() < deadline:
            await anyio.sleep(0.05)
        return
    stager = astage.ReplicationStager(timeout=1.0)
    try:
        started = time.monotonic()
        loop_ticks = 0

        async def tick() -> None:
            nonlocal loop_ticks
            while True:
                await anyio.sleep(0.01)
                loop_ticks += 1

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(tick)
            try:
                await stager.stage(plain_sd(rank))
            except astage.ReplicationTimeoutError as error:
                text = str(error)
                assert "rank 0" in text and "rank 1" in text and "1 s" in text, text
                assert isinstance(error, TimeoutError)
            else:
                raise AssertionError("no timeout")
            finally:
                tasks.cancel_scope.cancel()
        elapsed = time.monotonic() - started
        assert 0.9 <= elapsed < 10, elapsed
        assert loop_ticks > 20, loop_ticks  # the loop ran while the exchange waited
        try:
            await stager.stage(plain_sd(rank))
        except astage.ReplicationError as error:
            assert "unusable" in str(error), str(error)
        else:
            raise AssertionError("a stager that timed out staged again")
    finally:
        await stager.aclose()
        with open(done, "w"):
            pass


# -- peers that misbehave (tests/test_replication_peers.py) ------------------------------------

PEER_TIMEOUT = 60.0
NOT_A_TIMEOUT = 30.0
"""An error that comes sooner was not a timeout (the test machine may be loaded)."""


def tensor_node(header: dict[str, Any]) -> dict[str, Any]:
    """The node of ``{"w": tensor}``'s tensor in a header's skeleton."""
    node: dict[str, Any] = header["skeleton"]["dict"][0][1]
    return node


def nest(depth: int) -> Any:
    node: Any = 1
    for _ in range(depth):
        node = {"list": [node]}
    return node


# (name, how rank 1 spoils its header, what rank 0's error must say)
CRAFTED: list[tuple[str, Callable[[dict[str, Any]], Any], list[str]]] = [
    (
        "view larger than its storage",
        lambda h: tensor_node(h).update(shape=[1000]),
        ["['w']", "larger than its storage"],
    ),
    ("negative storage index", lambda h: tensor_node(h).update(storage=-1), ["'storage'", "-1"]),
    ("storage index out of range", lambda h: tensor_node(h).update(storage=7), ["'storage'"]),
    ("unknown dtype", lambda h: tensor_node(h).update(dtype="float99"), ["'dtype'", "float99"]),
    ("dtype not a string", lambda h: tensor_node(h).update(dtype=["x"]), ["'dtype'"]),
    ("negative stride", lambda h: tensor_node(h).update(stride=[-1]), ["'stride'"]),
    ("negative offset", lambda h: tensor_node(h).update(offset=-4), ["'offset'"]),
    ("shape of bools", lambda h: tensor_node(h).update(shape=[True]), ["'shape'"]),
    ("unknown tensor field", lambda h: tensor_node(h).update(code="x"), ["tensor node"]),
    ("negative storage size", lambda h: h.update(storages=[-48]), ["'storages'"]),
    ("storage sizes not the total", lambda h: h.update(storages=[24]), ["'storages'", "adds up"]),
    ("wrong version", lambda h: h.update(version=1), ["'version'"]),
    ("call not a number", lambda h: h.update(call="1"), ["'call'"]),
    ("bad mesh", lambda h: h.update(meshes=[["cpu", [[0], [1, 2]], None]]), ["'meshes'"]),
    ("deep skeleton", lambda h: h.update(skeleton=nest(150)), ["deep"]),
    ("not a JSON object", lambda h: b"[1, 2]", ["not an object"]),
    ("JSON nested past the stack", lambda h: b"[" * 200_000 + b"]" * 200_000, ["not JSON"]),
    ("not UTF-8", lambda h: b"\xff\xfe{}", ["not JSON"]),
]


def crafting(mutate: Callable[[dict[str, Any]], Any]) -> Any:
    """Rank 1's next header goes out spoiled by ``mutate`` (the sizes message stays true)."""
    import copy
    import unittest.mock

    from astage._replication import _transport

    def spoiled(encoded: Any) -> bytes:
        header = copy.deepcopy(encoded.header)
        raw = mutate(header)
        return raw if isinstance(raw, bytes) else json.dumps(header).encode()

    return unittest.mock.patch.object(_transport, "header_bytes", spoiled)


async def check_crafted_headers(rank: int, world: int) -> None:
    """Rank 1 sends crafted headers; rank 0 refuses each naming the field, before receiving a
    byte; both raise at once, and the pair stays in step: the next exchange works."""
    canary = torch.arange(1 << 16, dtype=torch.float32)
    expected_canary = canary.clone()
    async with astage.ReplicationStager(timeout=PEER_TIMEOUT) as stager:
        same(await stager.stage(plain_sd(rank)), plain_sd(stager.receive_from))  # warm up
        for name, mutate, says in CRAFTED:
            started = time.monotonic()
            try:
                if rank == 1:
                    with crafting(mutate):
                        await stager.stage({"w": torch.arange(12.0)})
                else:
                    await stager.stage(plain_sd(rank))
            except astage.ReplicationError as error:
                text = str(error)
                if rank == 0:
                    for word in says:
                        assert word in text, (name, word, text)
                    assert "refused the header from rank 1" in text, (name, text)
                else:
                    assert "rank 0 refused the header" in text, (name, text)
            else:
                raise AssertionError(f"{name}: no error")
            assert time.monotonic() - started < NOT_A_TIMEOUT, name
            assert torch.equal(canary, expected_canary), name  # nothing written elsewhere
            # still in step: a plain exchange follows
            same(await stager.stage(plain_sd(rank)), plain_sd(stager.receive_from))


async def check_out_of_step(rank: int, world: int) -> None:
    """A header of another call: both sides break off, and later calls say so at once."""
    async with astage.ReplicationStager(timeout=PEER_TIMEOUT) as stager:
        for expected in ("out of step", "out of step"):
            started = time.monotonic()
            try:
                if rank == 1:
                    with crafting(lambda h: h.update(call=99)):
                        await stager.stage(plain_sd(rank))
                else:
                    await stager.stage(plain_sd(rank))
            except astage.ReplicationError as error:
                assert expected in str(error), str(error)
            else:
                raise AssertionError("no error")
            assert time.monotonic() - started < NOT_A_TIMEOUT


async def check_staging_fails(rank: int, world: int) -> None:
    """Rank 0's local staging fails: it gets the staging error, rank 1 is told at once (not a
    timeout), and both stay in step for the next call."""
    async with astage.ReplicationStager(timeout=PEER_TIMEOUT) as stager:
        sd: dict[str, Any] = plain_sd(rank)
        if rank == 0:
            sd["q"] = torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.quint8)
        started = time.monotonic()
        try:
            await stager.stage(sd)
        except astage.UnstageableError as error:
            assert rank == 0, str(error)
        except astage.ReplicationError as error:
            text = str(error)
            assert rank == 1, text
            assert "rank 0 could not send its snapshot" in text, text
            assert "local staging of call 1 failed" in text and "quantized" in text, text
        else:
            raise AssertionError("no error")
        assert time.monotonic() - started < NOT_A_TIMEOUT
        for _ in range(2):
            same(await stager.stage(plain_sd(rank)), plain_sd(stager.receive_from))


class HangingStager:
    """A local stager whose staging never ends (until cancelled)."""

    async def stage(self, state_dict: Any) -> Any:
        await anyio.sleep_forever()

    async def aclose(self) -> None:
        pass


async def check_staging_cancelled(rank: int, world: int) -> None:
    """Rank 0's call is cancelled while staging: rank 1 is told at once; both stagers refuse
    later calls at once instead of pairing replicas of different calls."""
    stager = astage.ReplicationStager(timeout=PEER_TIMEOUT)
    try:
        same(await stager.stage(plain_sd(rank)), plain_sd(stager.receive_from))
        started = time.monotonic()
        if rank == 0:
            real, stager._stager = stager._stager, HangingStager()  # type: ignore[assignment]
            with anyio.move_on_after(0.3) as scope:
                await stager.stage(plain_sd(rank))
            assert scope.cancelled_caught
            stager._stager = real
        else:
            try:
                await stager.stage(plain_sd(rank))
            except astage.ReplicationError as error:
                text = str(error)
                assert "call 2 was cancelled while staging" in text, text
            else:
                raise AssertionError("no error for the partner of a cancelled call")
        assert time.monotonic() - started < NOT_A_TIMEOUT
        started = time.monotonic()
        try:
            await stager.stage(plain_sd(rank))
        except astage.ReplicationError as error:
            assert "out of step" in str(error), str(error)
        else:
            raise AssertionError("a broken pair staged again")
        assert time.monotonic() - started < 1
    finally:
        await stager.aclose()


async def check_partner_killed(rank: int, world: int, tmp: str) -> None:
    """Rank 1 dies mid-exchange (after the headers, before its bytes): rank 0 gets a
    ReplicationError (not gloo's RuntimeError) and its stager refuses later calls."""
    import unittest.mock

    from astage._replication import _transport

    stager = astage.ReplicationStager(timeout=PEER_TIMEOUT)
    same(await stager.stage(plain_sd(rank)), plain_sd(stager.receive_from))
    sd = nested_sd(rank, big=True)
    if rank == 1:

        def die(*args: Any) -> Any:
            os._exit(3)

        with unittest.mock.patch.object(_transport, "pack", die):
            await stager.stage(sd)
        raise AssertionError("still alive")
    started = time.monotonic()
    try:
        await stager.stage(sd)
    except astage.ReplicationError as error:
        text = str(error)
        assert "rank 0" in text and "rank 1" in text, text
    else:
        raise AssertionError("no error from a dead partner")
    assert time.monotonic() - started < NOT_A_TIMEOUT
    try:
        await stager.stage(plain_sd(rank))
    except astage.ReplicationError as error:
        assert "rank 1" in str(error), str(error)
    else:
        raise AssertionError("a stager whose partner died staged again")
    # a new stager over the same group: posting to the dead rank fails at once, as astage's error
    fresh = astage.ReplicationStager(timeout=PEER_TIMEOUT)
    for attempt in range(2):
        started = time.monotonic()
        try:
            await fresh.stage(plain_sd(rank))
        except astage.ReplicationError as error:
            assert "rank 1" in str(error), (attempt, str(error))
        else:
            raise AssertionError("a stager staged with a dead partner")
        assert time.monotonic() - started < NOT_A_TIMEOUT


def sharded_sd(rank: int, world: int) -> dict[str, Any]:
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import init_from_local_shards
    from torch.distributed._shard.sharded_tensor.shard import Shard

    local = torch.arange(8.0).reshape(2, 4) + 10 * rank
    meta = ShardMetadata([2 * rank, 0], [2, 4], f"rank:{rank}/cpu")
    source = init_from_local_shards([Shard(local, meta)], [2 * world, 4])
    return {"st": source, "plain": torch.tensor([rank])}


def check_replica_of_sharded(replica: Any, rank: int, partner: int, world: int) -> None:
    from torch.distributed._shard.sharded_tensor.api import ShardedTensor

    st = replica["st"]
    assert type(st) is ShardedTensor
    assert st.size() == (2 * world, 4)
    (shard,) = st.local_shards()
    assert torch.equal(shard.tensor, torch.arange(8.0).reshape(2, 4) + 10 * partner)
    assert shard.metadata.shard_offsets == [2 * partner, 0]
    assert str(shard.metadata.placement) == f"rank:{rank}/cpu"  # held here now, as in DCP
    assert torch.equal(replica["plain"], torch.tensor([partner]))


async def check_sharded_tensor(rank: int, world: int) -> None:
    async with astage.ReplicationStager(timeout=30) as stager:
        replica = await stager.stage(sharded_sd(rank, world))
        check_replica_of_sharded(replica, rank, stager.receive_from, world)


def check_compat_replication(rank: int, world: int) -> None:
    """DCP's _ReplicationStager, by one import: ShardedTensor replicated, the replica persisted
    into a fresh temporary directory, a replica still held never overwritten."""
    import tempfile

    from astage.compat import _ReplicationStager

    stager = _ReplicationStager(dist.group.WORLD, timeout=timedelta(seconds=30))
    try:
        partner = (rank + world // 2) % world
        sd = sharded_sd(rank, world)
        replica = stager.stage(sd, extra=1)
        check_replica_of_sharded(replica, rank, partner, world)
        path = stager.replica_path
        assert path is not None and os.path.exists(path), path
        folder = os.path.dirname(path)
        assert os.path.dirname(folder) == tempfile.gettempdir(), folder
        assert os.path.basename(folder).startswith("replication_stager_"), folder
        loaded = astage.load(path)
        assert torch.equal(loaded["st"][0], torch.arange(8.0).reshape(2, 4) + 10 * partner)
        sd["st"].local_shards()[0].tensor.add_(100)
        again = stager.stage(sd)
        check_replica_of_sharded(replica, rank, partner, world)  # the first one is intact
        shard = again["st"].local_shards()[0].tensor
        assert torch.equal(shard, torch.arange(8.0).reshape(2, 4) + 10 * partner + 100)
    finally:
        stager.close()


def main() -> None:
    global BACKEND
    job, rank_s, world_s, init_file, out, BACKEND = sys.argv[1:7]
    rank, world = int(rank_s), int(world_s)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    results: dict[str, str] = {}

    def record(name: str, fn: Callable[[], Any], barrier: bool = True) -> None:
        try:
            fn()
            results[name] = "ok"
        except BaseException:  # noqa: BLE001 - reported to the test
            results[name] = traceback.format_exc()
        if barrier:
            dist.barrier()

    async def with_stager(check: Any) -> None:
        async with astage.ReplicationStager(timeout=30) as stager:
            await check(rank, world, stager)

    if job == "peers":
        record("crafted_headers", lambda: run(check_crafted_headers, rank, world))
        record("staging_fails", lambda: run(check_staging_fails, rank, world))
        record("sharded_tensor", lambda: run(check_sharded_tensor, rank, world))
        if BACKEND == "asyncio":
            record("compat_replication", lambda: check_compat_replication(rank, world))
        record("out_of_step", lambda: run(check_out_of_step, rank, world))
        record("staging_cancelled", lambda: run(check_staging_cancelled, rank, world))
        finish(rank, out, results)
        return
    if job == "killed":
        record("partner_killed", lambda: run(check_partner_killed, rank, world, out), False)
        finish(rank, out, results)
        os._exit(0)  # the group lost a rank: tearing it down could hang
    record("plain", lambda: run(with_stager, check_plain))
    record("nested", lambda: run(with_stager, check_nested))
    if job != "pairs":  # the 4-rank job leaves DTensors (an import of 1.4 s CPU) to the others
        record("dtensor", lambda: run(with_stager, check_dtensor))
    record("refusal", lambda: run(with_stager, check_refusal))
    if world % 2 == 0:
        record("explicit_partner", lambda: run(check_explicit_partner, rank, world))
    if job == "main":
        record("options", lambda: run(check_options, rank, world))
        record("persist", lambda: run(check_persist, rank, world, out))
        record("persist_failure", lambda: run(check_persist_failure, rank, world, out))
        record("aclose_cancelled", lambda: run(check_aclose_cancelled, rank, world, out))
        if BACKEND == "asyncio":  # not replication: the staging faces, DCP, threads' loops
            record("dtensor_staging", lambda: check_dtensor_staging(rank, world))
            record("sharded_tensor_staging", lambda: check_sharded_tensor_staging(rank, world))
            record("dcp", lambda: check_dcp(rank, world, out))
            record("busy", lambda: check_busy(rank, world))
        record("cancel", lambda: run(check_cancel, rank, world, out))
        # Last: a timeout closes the gloo connection between the pair, so no barrier after it.
        record("timeout", lambda: run(check_timeout, rank, world, out), barrier=False)
    finish(rank, out, results)
    if job != "main":
        dist.destroy_process_group()


def finish(rank: int, out: str, results: dict[str, str]) -> None:
    with open(os.path.join(out, f"rank{rank}.json"), "w") as file:
        json.dump(results, file)


if __name__ == "__main__":
    main()
