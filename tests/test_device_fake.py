"""The fake asynchronous accelerator (``tests/fake_accelerator.py``) behaves like a device.

The ordering, completion and pinning tests of the device path are only as good as the fake's
"later": these tests pin down that work runs when its stream reaches it and not before, that
events and cross-stream waits order work as CUDA's do, and that the ledgers see what they must.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import torch
from conftest import collect
from fake_accelerator import FakeAccelerator, FakeEvent


@pytest.fixture
def acc() -> Iterator[FakeAccelerator]:
    accelerator = FakeAccelerator(devices=2)
    yield accelerator
    accelerator.close()
    assert accelerator.errors == []


def test_work_runs_later_on_the_streams_thread(acc: FakeAccelerator) -> None:
    x = acc.devices[0].zeros(4)
    stream = acc.devices[0].new_stream("producer")
    ran_on: list[str] = []
    with stream.held():
        stream.enqueue(lambda: acc.host(x).fill_(7.0))
        stream.enqueue(lambda: ran_on.append(threading.current_thread().name))
        time.sleep(0.02)
        assert torch.all(acc.host(x) == 0.0)  # queued, not run
        assert not stream.query()
        assert stream.pending() == ["kernel", "kernel"]
    stream.synchronize()
    assert torch.all(acc.host(x) == 7.0)
    assert ran_on == [stream.thread.name] != [threading.current_thread().name]


def test_an_event_completes_when_its_stream_reaches_it(acc: FakeAccelerator) -> None:
    stream = acc.devices[1].new_stream()
    assert FakeEvent(acc.devices[1]).query()  # never recorded: complete, like CUDA's
    with stream.held():
        event = stream.record_event()
        assert not event.query()
    event.synchronize()
    assert event.query()
    assert acc.records_on(stream) == [event]


def test_a_stream_waits_for_an_event_of_another_device(acc: FakeAccelerator) -> None:
    x = acc.devices[0].zeros(4)
    host = torch.zeros(4)
    producer = acc.devices[0].new_stream("producer")
    staging = acc.devices[1].new_stream("staging")
    with producer.held():
        producer.enqueue(lambda: acc.host(x).fill_(3.0))
        staging.wait_event(producer.record_event())
        staging.enqueue_copies([host], [x])
        time.sleep(0.02)
        assert torch.all(host == 0.0)
        assert len(acc.copies.pending()) == 1  # the copy waits behind the producer's mark
    staging.synchronize()
    assert torch.all(host == 3.0)
    assert acc.copies.pending() == []


def test_a_wait_keeps_the_point_recorded_at_the_time(acc: FakeAccelerator) -> None:
    producer = acc.devices[0].new_stream()
    staging = acc.devices[0].new_stream()
    event = producer.record_event()
    producer.synchronize()
    with staging.held():
        staging.wait_event(event)
        with producer.held():
            event.record(producer)  # re-recorded behind a held producer
            staging.gate.release()
            staging.synchronize()  # returns: the earlier wait kept the point it was given
            assert not event.query()


def test_the_current_stream_is_per_thread(acc: FakeAccelerator) -> None:
    device = acc.devices[0]
    side = device.new_stream("side")
    seen: list[object] = []
    with device.stream(side):
        thread = threading.Thread(target=lambda: seen.append(device.current_stream()))
        thread.start()
        thread.join()
        assert device.current_stream() is side
    assert seen == [device.default_stream]
    assert device.current_stream() is device.default_stream


def test_pin_ledger_sees_pending_copies_and_threads(acc: FakeAccelerator) -> None:
    buffer = torch.zeros(16)
    source = acc.host(acc.devices[0].tensor(torch.ones(16)))
    staging = acc.devices[0].new_stream()
    ptr = buffer.data_ptr()
    acc.set_device(0)
    assert acc.pins.register(ptr, buffer.nbytes) == 0
    with staging.held():
        staging.enqueue_copies([buffer[4:8]], [source[4:8]])
        acc.pins.unregister(ptr)
    staging.synchronize()
    (pin, unpin) = acc.pins.records
    assert (pin.op, pin.device, pin.pending_copies) == ("pin", 0, 0)
    assert unpin.pending_copies == 1
    assert acc.pins.unpinned_under_copies() == [unpin]
    assert acc.pins.on_threads({threading.get_ident()}) == [pin, unpin]


def test_a_claim_dies_with_its_storage(acc: FakeAccelerator) -> None:
    x = acc.devices[1].zeros(8)
    assert x.device == torch.device("privateuseone", 1) == x.untyped_storage().device
    assert acc.owner(x.untyped_storage()) is acc.devices[1]
    assert not acc.owns(torch.zeros(8))
    del x
    collect()
    assert acc._twins == {}


def test_errors_of_work_are_kept(acc: FakeAccelerator) -> None:
    stream = acc.devices[0].new_stream()
    stream.enqueue(lambda: 1 / 0, label="boom")
    stream.synchronize()
    ((where, label, error),) = acc.errors
    assert (where, label, type(error)) == (stream, "boom", ZeroDivisionError)
    acc.errors.clear()
