"""Property: a crafted or damaged replication header is decoded to a sound replica or refused.

What a partner sends is checked the way a receiving rank checks it: the first message's
lengths, then :func:`parse_header` against the announced total, then storages of the sizes it
names and :func:`decode` over them. Header fields are replaced with arbitrary JSON, or the
header's bytes flipped, cut or spliced; whatever comes of it, the receiver gets either an
:class:`astage.ReplicationError` or a replica whose every tensor lies inside one of the
storages it allocated (read end to end here), never another exception, and nothing it decodes
runs code. Damage that leaves the header valid JSON of the right shape may still change
values (a dtype, a shape that fits): the wire keeps no checksum of its own, as TCP and NCCL do.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

import pytest
import torch
from conftest import derandomized, tensors_of
from test_load_property import json_values, nodes

import astage
from astage._replication._wire import check_lengths, decode, encode, parse_header

pytest.importorskip("hypothesis")  # not on the GPU machines

from hypothesis import given
from hypothesis import strategies as st

SETTINGS = derandomized("ASTAGE_WIRE_EXAMPLES", 150)


def _states() -> list[Any]:
    base = torch.arange(24, dtype=torch.float32)
    model = torch.nn.Linear(3, 2).state_dict()
    return [
        {
            "model": model,
            "views": [base[2:8], base.view(4, 6).t(), base[::5]],
            "c64": torch.tensor([1 + 2j, 3 - 1j], dtype=torch.complex64).conj(),
            "half": torch.ones(3, dtype=torch.bfloat16),
            "param": torch.nn.Parameter(torch.zeros(2)),
            "step": 7,
            "lr": [0.1, None, True, "text"],
        },
        OrderedDict(w=torch.randn(2, 3), same=base, again=base, flag=torch.tensor([True, False])),
        {"state": {0: {"exp_avg": torch.zeros(4), "step": torch.tensor(3.0)}}, "groups": [1, 2]},
    ]


STATES = _states()
_ENCODED: dict[int, tuple[str, list[bytes]]] = {}


def _encoded(index: int) -> tuple[str, list[bytes]]:
    """State ``index`` as a partner sends it: the header's JSON and each storage's bytes."""
    if index not in _ENCODED:
        encoded = encode(STATES[index], call=1)
        _ENCODED[index] = (
            json.dumps(encoded.header),
            [bytes(s.contiguous().numpy().tobytes()) for s in encoded.storages],
        )
    return _ENCODED[index]


def receive(raw: bytes, sent: list[bytes]) -> Any:
    """What the receiving rank makes of header ``raw`` and the storages' bytes ``sent``: the
    replica, or the ReplicationError; the replica is read end to end."""
    total = sum(map(len, sent))
    assert check_lengths(max(len(raw), 2), total) is None
    try:
        header = parse_header(raw, total)
        # The receiver's own storages, of the sizes the header names (their sum is checked).
        storages = [torch.zeros(size, dtype=torch.uint8) for size in header.sizes]
        for storage, data in zip(storages, sent, strict=False):
            if storage.numel() == len(data) and data:
                storage.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        replica = decode(header.raw, storages, [], source=1)
    except astage.ReplicationError as error:
        assert str(error)
        return error
    bounds = [(s.data_ptr(), s.data_ptr() + s.numel()) for s in storages]
    for tensor in tensors_of(replica):
        if tensor.numel() == 0:
            continue
        start = tensor.untyped_storage().data_ptr()
        end = start + tensor.untyped_storage().nbytes()
        assert any(low <= start and end <= high for low, high in bounds), "outside its storage"
        tensor.clone()  # every element read: none lies past the storage
    return replica


states = st.integers(0, len(STATES) - 1)


def test_every_state_goes_over_the_wire_unchanged() -> None:
    # The reference the properties damage: undamaged, each state decodes to itself.
    for index, state in enumerate(STATES):
        header, sent = _encoded(index)
        replica = receive(header.encode(), sent)
        assert not isinstance(replica, Exception), replica
        assert [t.tolist() for t in tensors_of(replica)] == [t.tolist() for t in tensors_of(state)]


@SETTINGS
@given(states, st.data())
def test_crafted_header_fields_are_decoded_soundly_or_refused(
    index: int, data: st.DataObject
) -> None:
    text, sent = _encoded(index)
    header = json.loads(text)
    places = list(nodes(header))
    for _ in range(data.draw(st.integers(1, 3))):
        container, key = data.draw(st.sampled_from(places))
        container[key] = data.draw(json_values)
        places = list(nodes(header))  # an edit may have replaced a whole subtree
        if not places:
            break
    receive(json.dumps(header).encode(), sent)


def _tensor_nodes(value: Any) -> list[dict[str, Any]]:
    """The header's tensor nodes (those with a 'storage' field)."""
    return [
        container[key]
        for container, key in nodes(value)
        if isinstance(container[key], dict) and "storage" in container[key]
    ]


plausible_fields = {
    "storage": st.integers(-1, 4),
    "offset": st.integers(0, 64),
    "shape": st.lists(st.integers(0, 16), max_size=3),
    "stride": st.lists(st.integers(0, 16), max_size=3),
    "dtype": st.sampled_from(["float32", "float64", "bfloat16", "uint8", "bool", "complex128"]),
    "conj": st.booleans(),
    "neg": st.booleans(),
}


@SETTINGS
@given(states, st.data())
def test_tensor_fields_that_look_right_are_checked_against_their_storage(
    index: int, data: st.DataObject
) -> None:
    # Arbitrary JSON seldom reaches the bounds checks; plausible values (a shape, a stride and
    # an offset of small sizes, a real dtype) do, and must not let a view reach past its
    # storage.
    text, sent = _encoded(index)
    header = json.loads(text)
    targets = _tensor_nodes(header)
    for _ in range(data.draw(st.integers(1, 3))):
        node = data.draw(st.sampled_from(targets))
        field = data.draw(st.sampled_from(sorted(plausible_fields)))
        node[field] = data.draw(plausible_fields[field])
    receive(json.dumps(header).encode(), sent)


@SETTINGS
@given(states, st.data())
def test_damaged_header_bytes_are_decoded_soundly_or_refused(
    index: int, data: st.DataObject
) -> None:
    text, sent = _encoded(index)
    raw = bytearray(text.encode())
    at = data.draw(st.integers(0, len(raw) - 1))
    how = data.draw(st.sampled_from(["flip", "cut", "splice"]))
    if how == "flip":
        raw[at] ^= data.draw(st.integers(1, 255))
    elif how == "cut":
        del raw[at : at + data.draw(st.integers(1, 32))]
    else:
        raw[at:at] = data.draw(st.sampled_from([b"[", b"{", b'"', b"-1", b"1e999", b"null", b","]))
    receive(bytes(raw), sent)
