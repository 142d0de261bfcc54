"""Replication, hunted: a partner's header and the pairing, at the edges the other tests miss.

In process (no process group): :func:`parse_header` and :func:`decode` are what a receiving
rank runs on a partner's header, before it posts a receive; whatever a partner writes there
must come back as an :class:`astage.ReplicationError` naming the field, or as a replica every
tensor of which torch can read.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

import astage
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
