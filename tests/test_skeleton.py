"""The JSON skeleton shared by checkpoint files and the replication wire header."""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from typing import Any

import pytest
import torch

import astage
from astage._files._skeleton import TORCH_DTYPES, SkeletonDecoder, SkeletonEncoder


class _Encoder(SkeletonEncoder):
    error = astage.UnstageableError
    verb = "written"
    refusal = "cannot write a {type} object"

    def encode_tensor(self, x: torch.Tensor, path: astage.Path) -> Any:
        return {"t": x.tolist()}


class _Decoder(SkeletonDecoder):
    def decode_other(self, node: dict[str, Any]) -> Any:
        if "t" in node:
            return torch.tensor(node["t"])
        raise self.bad(node)

    def bad(self, node: Any) -> astage.AstageError:
        return astage.AstageError(f"bad node {node!r}")


def _round_trip(value: Any) -> Any:
    text = json.dumps(_Encoder().encode(value, ()))
    return _Decoder().decode(json.loads(text))


def test_plain_values_and_containers_round_trip() -> None:
    value = {
        "a": [1, 2.5, "x", None, True, (3, (4,))],
        7: {"nested": {"deep": [[]]}},
        None: (),
        1.5: "float key",
    }
    assert _round_trip(value) == value
    assert type(_round_trip((1, 2))) is tuple


def test_floats_that_json_cannot_hold() -> None:
    back = _round_trip([math.inf, -math.inf, math.nan])
    assert back[:2] == [math.inf, -math.inf] and math.isnan(back[2])


def test_ordered_dict_keeps_its_metadata_and_refuses_tensors_in_it() -> None:
    state = OrderedDict(w=torch.ones(2))
    state._metadata = OrderedDict({"": {"version": 1}})  # type: ignore[attr-defined]
    back = _round_trip(state)
    assert type(back) is OrderedDict
    assert back._metadata == {"": {"version": 1}}  # type: ignore[attr-defined]
    assert torch.equal(back["w"], state["w"])
    state._metadata = {"": {"scale": torch.ones(1)}}  # type: ignore[attr-defined]
    with pytest.raises(astage.UnstageableError, match=r"\._metadata\[''\]\['scale'\]"):
        _Encoder().encode(state, ())


def test_what_cannot_be_encoded_is_named_by_path() -> None:
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    with pytest.raises(astage.UnstageableError, match="contains itself cannot be written"):
        _Encoder().encode({"c": cyclic}, ())
    with pytest.raises(astage.UnstageableError, match=r"at \['k'\]: cannot write a builtins.bytes"):
        _Encoder().encode({"k": b"x"}, ())
    with pytest.raises(astage.UnstageableError, match="dict key of type tuple"):
        _Encoder().encode({(1, 2): 0}, ())


def test_malformed_nodes_are_refused() -> None:
    with pytest.raises(astage.AstageError, match="bad node"):
        _Decoder().decode({"mystery": 1, "other": 2})
    with pytest.raises(astage.AstageError, match="bad node"):
        _Decoder().decode([1, 2])


def test_dtype_names() -> None:
    assert TORCH_DTYPES["bfloat16"] is torch.bfloat16
    assert TORCH_DTYPES["float8_e4m3fn"] is torch.float8_e4m3fn
