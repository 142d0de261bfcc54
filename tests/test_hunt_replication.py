"""Replication, hunted: a partner's header and the pairing, at the edges the other tests miss.

In process (no process group): :func:`parse_header` and :func:`decode` are what a receiving
rank runs on a partner's header, before it posts a receive; whatever a partner writes there
must come back as an :class:`astage.ReplicationError` naming the field, or as a replica every
tensor of which torch can read.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any, ClassVar

import pytest
import torch
import torch.distributed as dist
from conftest import in_a_fresh_interpreter

import astage
from astage._replication._pairing import pairing
from astage._replication._wire import decode, encode, parse_header


def _receive(mutate: Any) -> Any:
    """Decode the header of ``{"w": arange(12.0)}`` after ``mutate`` edits its tensor node."""
    header = encode({"w": torch.arange(12.0)}, call=1).header
    mutate(header["skeleton"]["dict"][0][1])
    checked = parse_header(json.dumps(header).encode(), 48)
    storages = [torch.zeros(size, dtype=torch.uint8) for size in checked.sizes]
    return decode(checked.raw, storages, [], source=1)


# (what the partner sends, the field the error must name)
HUGE_OR_UNREADABLE = [
    ({"shape": [0, 1 << 64], "stride": [1, 1]}, "'shape'"),  # past int64: torch cannot unpack
    ({"shape": [1 << 63], "stride": [0]}, "'shape'"),
    ({"shape": [1], "stride": [1 << 70]}, "'stride'"),
    ({"shape": [0], "stride": [1], "offset": 1 << 64}, "'offset'"),
    ({"shape": [1 << 61, 1 << 61], "stride": [0, 0]}, "'shape'"),  # numel overflows int64
    ({"shape": [0], "stride": [1], "offset": 1000}, "offset"),  # an empty view past its storage
    ({"dtype": "qint8"}, "'dtype'"),  # quantized: a tensor torch cannot read or clone
    ({"dtype": "quint4x2"}, "'dtype'"),
]


@pytest.mark.parametrize(("fields", "names"), HUGE_OR_UNREADABLE)
def test_tensor_fields_torch_cannot_take_are_refused_naming_the_field(
    fields: dict[str, Any], names: str
) -> None:
    # Before: TypeError/ValueError/RuntimeError escaped decode() (the transport's catch-all hid
    # them behind torch's words), and a quantized dtype decoded into an unreadable tensor.
    with pytest.raises(astage.ReplicationError, match=names) as caught:
        _receive(lambda node: node.update(fields))
    assert "['w']" in str(caught.value)


_SUB_BYTE: torch.dtype = getattr(torch, "uint1")  # noqa: B009 - not in torch's stubs


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: torch.arange(6, dtype=torch.int32)._neg_view(), "negative view"),
        (lambda: torch.zeros(4, dtype=torch.bool)._neg_view(), "negative view"),
        (lambda: torch.zeros(4, dtype=torch.uint8).view(_SUB_BYTE), "dtype uint1"),
    ],
)
def test_a_tensor_the_partner_would_refuse_is_refused_by_its_sender(make: Any, words: str) -> None:
    # Before: encoded and sent; the partner's decoder refused the field ('neg' set on an
    # int32 view, 'dtype' uint1 "not a torch dtype"), so the error blamed the partner's header
    # rather than naming the sender's tensor.
    with pytest.raises(astage.ReplicationError, match=words) as caught:
        encode({"w": make()}, call=1)
    assert "['w']" in str(caught.value)


def test_negative_views_torch_makes_are_still_sent() -> None:
    z = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)
    state = {"imag": z.conj().imag, "neg": z._neg_view(), "half": torch.ones(2).half()._neg_view()}
    header = encode(state, call=1).header
    checked = parse_header(json.dumps(header).encode(), sum(header["storages"]))
    storages = [torch.zeros(size, dtype=torch.uint8) for size in checked.sizes]
    replica = decode(checked.raw, storages, [], source=1)
    assert all(replica[key].is_neg() for key in state)


def test_a_storage_no_tensor_views_is_refused_naming_the_field() -> None:
    # An encoder sends a storage only for a tensor that views it; one nobody views is a
    # crafted header (and a buffer the receiver would make for nothing).
    header = encode({"w": torch.arange(12.0)}, call=1).header
    header["storages"] = [48, 0, 0]
    checked = parse_header(json.dumps(header).encode(), 48)
    storages = [torch.zeros(size, dtype=torch.uint8) for size in checked.sizes]
    with pytest.raises(astage.ReplicationError, match=r"'storages'\[1\].*viewed by no tensor"):
        decode(checked.raw, storages, [], source=1)


# -- the transport against a scripted partner (no process group) ------------------------------


class _Done:
    """A torch.distributed work that has completed."""

    def wait(self, timeout: Any = None) -> bool:
        return True


class ScriptedPartner:
    """Stands in for rank 1 in ``torch.distributed``'s isend/irecv: what it sends, by tag, is
    scripted; what rank 0 sends it is kept, by tag."""

    def __init__(self, header: bytes, total: int) -> None:
        self.sends: dict[int, torch.Tensor] = {
            0: torch.tensor([len(header), total], dtype=torch.int64),
            1: torch.frombuffer(bytearray(header), dtype=torch.uint8),
            2: torch.tensor([1], dtype=torch.int64),  # it accepts rank 0's header
        }
        self.received: dict[int, torch.Tensor] = {}

    def isend(self, tensor: torch.Tensor, group: Any, group_dst: int, tag: int) -> _Done:
        self.received[tag] = tensor.clone()
        return _Done()

    def irecv(self, tensor: torch.Tensor, group: Any, group_src: int, tag: int) -> _Done:
        tensor.copy_(self.sends[tag])
        return _Done()


def test_a_header_listing_storages_by_the_thousand_makes_no_buffer_for_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: the transport made one receive buffer per listed storage before the skeleton was
    # decoded: a header of 100,000 "0," entries (200 kB) cost 100,000 tensors (about 40 MB and
    # 0.3 s; 1 GiB of header, hours and terabytes), and the header was accepted.
    from astage._replication import _transport

    header = encode({"w": torch.arange(12.0)}, call=1).header
    header["storages"] = [48] + [0] * 100_000
    partner = ScriptedPartner(json.dumps(header).encode(), 48)
    monkeypatch.setattr(dist, "isend", partner.isend)
    monkeypatch.setattr(dist, "irecv", partner.irecv)
    made: list[int] = []
    real_empty = torch.empty

    def counted_empty(*args: Any, **kwargs: Any) -> torch.Tensor:
        made.append(1)
        return real_empty(*args, **kwargs)

    from astage._core._arena import host_empty as real_host_empty

    def counted_host_empty(*args: Any, **kwargs: Any) -> torch.Tensor:
        made.append(1)
        return real_host_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", counted_empty)
    monkeypatch.setattr(_transport, "host_empty", counted_host_empty)  # the receive buffers
    transport = _transport.Transport(None, rank=0, send_to=1, receive_from=1, timeout=30.0)
    with pytest.raises(astage.ReplicationError, match=r"refused the header.*'storages'\[1\]"):
        transport.exchange({"w": torch.arange(3.0)}, call=1)
    assert len(made) < 100, len(made)
    assert partner.received[2].tolist() == [0]  # rank 1 is told: refused, so it sends no bytes
    assert transport.broken is None  # still in step


def exchange_with_an_honest_partner(
    monkeypatch: pytest.MonkeyPatch, sent: dict[str, torch.Tensor]
) -> tuple[Any, Any]:
    """Rank 0's exchange with a scripted rank 1 that sends ``sent`` (views of one storage),
    honestly: the transport, and the replica it received."""
    from astage._replication import _transport

    encoded = encode(sent, call=1)
    (storage,) = encoded.storages  # the one bucket of bytes
    partner = ScriptedPartner(json.dumps(encoded.header).encode(), storage.numel())
    partner.sends[3] = storage.clone()
    monkeypatch.setattr(dist, "isend", partner.isend)
    monkeypatch.setattr(dist, "irecv", partner.irecv)
    transport = _transport.Transport(None, rank=0, send_to=1, receive_from=1, timeout=30.0)
    return transport, transport.exchange({"x": torch.ones(2)}, call=1)


def test_the_scripted_partner_exchanges_an_honest_snapshot(monkeypatch: pytest.MonkeyPatch) -> None:
    # The harness above, honest: the replica arrives, built on buffers made one by one.
    w = torch.arange(12.0)
    transport, replica = exchange_with_an_honest_partner(monkeypatch, {"w": w, "view": w[2:5]})
    assert torch.equal(replica["w"], torch.arange(12.0))
    assert torch.equal(replica["view"], torch.arange(2.0, 5.0))
    assert replica["view"].untyped_storage().data_ptr() == replica["w"].untyped_storage().data_ptr()
    again = transport.exchange({"x": torch.ones(2)}, call=1)  # same sizes: the same buffers
    assert again["w"].untyped_storage().data_ptr() == replica["w"].untyped_storage().data_ptr()


def test_a_replica_cannot_be_freed_under_the_next_exchange(monkeypatch: pytest.MonkeyPatch) -> None:
    # The receive buffers are reused by the next exchange of the same sizes (their numel()
    # compared, not their storages'). A caller freeing a replica's memory the usual way,
    # `replica["w"].untyped_storage().resize_(0)`, shrank the buffer, and the next exchange
    # received its bytes past the end. Its storages now refuse resize_ (as the stagers' do).
    w = torch.arange(12.0)
    transport, replica = exchange_with_an_honest_partner(monkeypatch, {"w": w, "view": w[2:5]})
    storage = replica["w"].untyped_storage()
    assert not storage.resizable()
    with pytest.raises(RuntimeError, match="not resizable"):
        storage.resize_(0)
    again = transport.exchange({"x": torch.ones(2)}, call=1)
    assert again["w"].untyped_storage().data_ptr() == storage.data_ptr()  # reused, whole
    assert torch.equal(again["w"], torch.arange(12.0))


# -- pairing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("partner", [True, 1.0, "1", 1.5])
def test_a_partner_that_is_not_an_integer_is_an_invalid_option(partner: Any) -> None:
    # Before: pairing(0, 4, partner=True) and partner=1.0 were accepted and handed to
    # torch.distributed's sends as they were.
    with pytest.raises(astage.InvalidOptionsError, match="partner="):
        pairing(0, 4, partner=partner)


def test_an_integer_partner_of_another_type_is_taken_as_an_int() -> None:
    numpy = pytest.importorskip("numpy")
    assert pairing(0, 4, partner=numpy.int64(1)) == (1, 1)
    assert all(type(r) is int for r in pairing(0, 4, partner=numpy.int64(1)))


@pytest.mark.parametrize(("rank", "world"), [(-1, -1), (-1, 4), (4, 4), (7, 3)])
def test_a_rank_outside_the_group_has_no_partner(rank: int, world: int) -> None:
    # torch.distributed says rank -1 (world -1) in a process outside the group; before,
    # pairing(-1, 4) named rank 1 as its partner, and pairing(4, 4) rank 2.
    with pytest.raises(astage.ReplicationError, match=r"not a member|not a rank of") as caught:
        pairing(rank, world)
    assert f"rank {rank}" in str(caught.value)


def test_a_header_too_long_for_the_partner_is_refused_by_its_sender(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The receiver refuses a header longer than MAX_HEADER_BYTES at its first message and
    # breaks off without a verdict; the sender sent it all the same, and then waited for the
    # header exchange until its deadline. Now the sender announces a refusal instead, so
    # both sides raise at once, still in step.
    from astage._replication import _transport, _wire

    monkeypatch.setattr(_wire, "MAX_HEADER_BYTES", 400)
    partner = ScriptedPartner(_wire.refusal_bytes("rank 1 has nothing", call=1), -1)
    monkeypatch.setattr(dist, "isend", partner.isend)
    monkeypatch.setattr(dist, "irecv", partner.irecv)
    transport = _transport.Transport(None, rank=0, send_to=1, receive_from=1, timeout=30.0)
    snapshot = {f"weight{i}": torch.ones(1) for i in range(20)}  # a header of ~1,600 bytes
    with pytest.raises(astage.ReplicationError, match=r"cannot send this snapshot.*header length"):
        transport.exchange(snapshot, call=1)
    length, total = partner.received[0].tolist()
    assert total == -1 and length <= 400  # a refusal, which the partner takes
    assert transport.broken is None


# -- DCP's _ReplicationStager (astage.compat) -----------------------------------------------------


class _SlowToBuild:
    """Stands in for ReplicationStager: slow to build (as a real one's first call is), counted."""

    built: ClassVar[list[_SlowToBuild]] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        import time

        time.sleep(0.3)  # both callers are inside _started() by now
        self._transport = type("T", (), {"fresh_when_in_use": False})()
        self.replica_path = None
        _SlowToBuild.built.append(self)

    async def stage(self, state_dict: Any) -> Any:
        return state_dict

    async def aclose(self) -> None:
        pass


def test_first_calls_from_two_threads_build_one_stager_and_one_portal(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    # Before: each of two first stage() calls saw no portal yet and started its own, with a
    # ReplicationStager of its own: two stagers then exchanged on one group, each counting
    # its calls from 1, and the first portal's thread was never stopped.
    import threading

    from astage.compat import _replication as compat_replication

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(compat_replication, "ReplicationStager", _SlowToBuild)
    _SlowToBuild.built.clear()
    stager = compat_replication._ReplicationStager(None, storage_dir=str(tmp_path))
    portals_before = {t.ident for t in threading.enumerate()}
    results: list[Any] = []
    callers = [
        threading.Thread(target=lambda i=i: results.append(stager.stage({"i": i})))
        for i in range(2)
    ]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(timeout=30)
    try:
        assert sorted(r["i"] for r in results) == [0, 1]
        assert len(_SlowToBuild.built) == 1
    finally:
        stager.close()
    leftover = [t for t in threading.enumerate() if t.ident not in portals_before and t.is_alive()]
    assert not leftover, leftover  # every portal thread stopped by close()


# -- the replica file ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_the_replica_file_keeps_a_state_dicts_metadata(tmp_path: Any) -> None:
    # The replica itself keeps a module state dict's _metadata (the wire carries it), and so
    # does a file astage.save writes; the replica file dropped it (its OrderedDict was rebuilt
    # without it), so a model restored from the partner's file lost its version info.
    import anyio

    from astage._replication._persist import ReplicaFile
    from astage._replication._transport import Landed, ReplicaReady

    state: Any = torch.nn.BatchNorm1d(3).state_dict()  # an OrderedDict with _metadata
    encoded = encode(state, call=1)
    storages = [s.clone() for s in encoded.storages]
    replica = decode(json.loads(json.dumps(encoded.header)), storages, [], source=1)
    assert replica._metadata == state._metadata  # the wire's part
    path = tmp_path / "replica.safetensors"
    async with ReplicaFile(str(path), 0, 1) as file:
        await file.follow(ReplicaReady(replica, storages))
        await file.follow(Landed(list(range(len(storages)))))
        await file.commit()
    loaded = await anyio.to_thread.run_sync(astage.load, path)
    assert list(loaded) == list(state)
    assert getattr(loaded, "_metadata", None) == state._metadata


def test_encoding_or_persisting_a_replica_imports_no_dtensor_module() -> None:
    # The wire encoder imported torch.distributed.tensor to ask whether each tensor was a
    # DTensor: 0.3-0.5 s (sympy with it) on the event loop, in a replication stager's first
    # exchange (the test above tripped the blocking detector when it ran first). A fresh
    # interpreter: this one has imported it already.
    done = in_a_fresh_interpreter(
        """
        import sys, torch
        from astage._replication._wire import encode
        from astage._replication._persist import _plain
        state = torch.nn.BatchNorm1d(3).state_dict()
        encode(state, call=1)
        _plain(state, (), [], {})
        print("torch.distributed.tensor" in sys.modules)
        """
    )
    assert done.stdout.strip() == "False", done.stdout + done.stderr


# -- deadlines ------------------------------------------------------------------------------------


class _RecordedWork:
    """A work that completes at once and records the timeout it was waited with."""

    def __init__(self) -> None:
        self.timeouts: list[timedelta] = []

    def wait(self, timeout: timedelta) -> bool:
        self.timeouts.append(timeout)
        return True


class _StoppedClock:
    """``time`` for the transport: monotonic() stands still, at 100 s."""

    @staticmethod
    def monotonic() -> float:
        return 100.0


@pytest.mark.parametrize("left", [0.0005, 0.0000001, 0.0015])
def test_a_deadline_under_a_millisecond_away_is_still_a_deadline(
    monkeypatch: pytest.MonkeyPatch, left: float
) -> None:
    # torch.distributed takes a wait's timeout in whole milliseconds, and gloo reads 0 ms as
    # "no timeout": its process group's own (30 minutes by default). A wait begun with less
    # than 1 ms left blocked that long instead of raising at the deadline (measured: a wait of
    # 500 us on a receive never sent returned after the group's full 8 s, one of 2 ms after
    # 10 ms).
    from astage._replication import _transport

    monkeypatch.setattr("astage._replication._transport.time", _StoppedClock)
    transport = _transport.Transport(None, rank=0, send_to=1, receive_from=1, timeout=30.0)
    work = _RecordedWork()
    transport._wait([work], 100.0 + left, "the header exchange")
    (timeout,) = work.timeouts
    assert timeout >= timedelta(milliseconds=1), timeout
    assert timeout <= timedelta(seconds=left) + timedelta(milliseconds=1)


@pytest.mark.parametrize("timeout", [float("inf"), 1e300, 10**400], ids=["inf", "1e300", "10**400"])
def test_a_timeout_no_wait_can_take_is_an_invalid_option(timeout: Any) -> None:
    # Before: infinity and 1e300 were accepted, and every exchange then failed at its first
    # wait (a timedelta of whole milliseconds cannot hold them: OverflowError, the transport
    # broken, the partner left to wait); 10**400 escaped as OverflowError.
    from astage._replication._stager import _seconds

    with pytest.raises(astage.InvalidOptionsError, match="timeout"):
        _seconds(timeout)


def test_the_longest_timeout_is_one_a_wait_can_take(monkeypatch: pytest.MonkeyPatch) -> None:
    from astage._replication import _stager, _transport

    monkeypatch.setattr("astage._replication._transport.time", _StoppedClock)
    seconds = _stager._seconds(_stager._MOST_SECONDS)
    transport = _transport.Transport(None, rank=0, send_to=1, receive_from=1, timeout=seconds)
    work = _RecordedWork()
    transport._wait([work], _StoppedClock.monotonic() + seconds, "the header exchange")
    assert work.timeouts[0] >= timedelta(seconds=seconds)


# -- storage_dir -----------------------------------------------------------------------------------


@pytest.fixture
def a_two_rank_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.distributed as a ReplicationStager's constructor sees rank 0 of a 2-rank gloo
    group (no exchange is made)."""
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)


def test_a_bytes_storage_dir_gives_a_str_replica_path(
    a_two_rank_group: None, tmp_path: Any
) -> None:
    # Before: the stager kept b"...": replica_path (read by stage() after the local staging,
    # before the exchange) raised a raw TypeError joining it to the file name, and the
    # partner was left to wait for the exchange until its deadline.
    import os

    import anyio

    folder = tmp_path / "replicas"
    stager = astage.ReplicationStager(storage_dir=os.fsencode(folder))  # type: ignore[arg-type]
    try:
        assert stager.replica_path == os.path.join(folder, "replica-rank0-from-rank1.safetensors")
        assert folder.is_dir()
    finally:
        anyio.run(stager.aclose)


@pytest.mark.parametrize(
    ("where", "error", "says"),
    [
        ("a file", astage.ReplicationError, "cannot make the folder"),
        ("a NUL byte", astage.InvalidOptionsError, "NUL byte"),
        ("an int", astage.InvalidOptionsError, "must be a str"),
    ],
)
def test_a_storage_dir_that_cannot_be_a_folder_is_an_astage_error(
    a_two_rank_group: None, tmp_path: Any, where: str, error: type[Exception], says: str
) -> None:
    # Before: raw FileExistsError, ValueError and TypeError from the constructors (the int one
    # from os.fspath), for ReplicationStager and DCP's _ReplicationStager alike.
    from astage.compat import _ReplicationStager

    (tmp_path / "file").write_text("")
    storage_dir = {"a file": str(tmp_path / "file"), "a NUL byte": "x\0y", "an int": 7}[where]
    with pytest.raises(error, match=says) as caught:
        astage.ReplicationStager(storage_dir=storage_dir)  # type: ignore[arg-type]
    assert "storage_dir" in str(caught.value)
    with pytest.raises(error, match=says):
        _ReplicationStager(None, storage_dir=storage_dir)  # type: ignore[arg-type]


# -- two gloo ranks: the refusals above, both sides raising at once --------------------------------
#
# This module is also the worker: ``python tests/test_hunt_replication.py RANK INIT_FILE OUT_DIR``
# runs one rank of the job below (the helpers come from tests/_dist_worker.py).

FAST = 10.0
"""An exchange that raises sooner than this did not wait for a deadline (20 s)."""


async def _refused_at_once(rank: int, work: Any, says: dict[int, str]) -> None:
    """``work`` raises a ReplicationError on both ranks, each saying ``says[rank]``, at once."""
    import time

    started = time.monotonic()
    try:
        await work()
    except astage.ReplicationError as error:
        assert says[rank] in str(error), str(error)
    else:
        raise AssertionError("no error")
    assert time.monotonic() - started < FAST, time.monotonic() - started


async def _check_many_storages(rank: int, out: str) -> None:
    """Rank 1's header lists 50,000 storages no tensor views: rank 0 refuses it naming the
    field, both raise at once, no temporary file is left, and the pair stays in step."""
    import os

    from _dist_worker import crafting, plain_sd, same

    folder = os.path.join(out, f"replicas{rank}")
    async with astage.ReplicationStager(timeout=20, storage_dir=folder) as stager:
        same(await stager.stage(plain_sd(rank)), plain_sd(1 - rank))

        async def spoiled() -> None:
            if rank == 1:
                with crafting(lambda h: h.update(storages=h["storages"] + [0] * 50_000)):
                    await stager.stage(plain_sd(rank))
            else:
                await stager.stage(plain_sd(rank))

        says = {0: "'storages'[1]", 1: "rank 0 refused the header"}
        await _refused_at_once(rank, spoiled, says)
        assert stager.replica_path is not None
        assert os.listdir(folder) == [os.path.basename(stager.replica_path)]
        same(await stager.stage(plain_sd(rank)), plain_sd(1 - rank))


async def _check_header_too_long(rank: int, out: str) -> None:
    """Rank 1's header is longer than the limit: it refuses to send it, both raise at once,
    and the pair stays in step."""
    import unittest.mock

    from _dist_worker import plain_sd, same

    from astage._replication import _wire

    async with astage.ReplicationStager(timeout=20) as stager:
        with unittest.mock.patch.object(_wire, "MAX_HEADER_BYTES", 2000):  # both ranks
            big = {f"w{i}": torch.ones(1) for i in range(100)}  # a header of ~8 kB
            says = {0: "rank 1 could not send its snapshot", 1: "header length"}
            await _refused_at_once(
                rank, lambda: stager.stage(big if rank == 1 else plain_sd(rank)), says
            )
        same(await stager.stage(plain_sd(rank)), plain_sd(1 - rank))


def _rank_main(rank: int, init_file: str, out: str) -> None:
    import os
    import traceback

    from _dist_worker import run

    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=60),
    )
    results: dict[str, str] = {}
    for name, check in [
        ("many_storages", _check_many_storages),
        ("header_too_long", _check_header_too_long),
    ]:
        try:
            run(check, rank, out)
            results[name] = "ok"
        except BaseException:  # noqa: BLE001 - reported to the test
            results[name] = traceback.format_exc()
        dist.barrier()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as file:
        json.dump(results, file)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Any:
    import os
    import subprocess
    import sys

    from test_replication import Job

    out = tmp_path_factory.mktemp("hunt-replication")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(rank), str(out / "init"), str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        for rank in range(2)
    ]
    yield Job(2, out, procs)
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("name", ["many_storages", "header_too_long"])
def test_refusals_reach_both_ranks_at_once_over_gloo(two_ranks: Any, name: str) -> None:
    from test_replication import check

    check(two_ranks, name)


if __name__ == "__main__":
    import sys

    _rank_main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
