"""The hunt on the scale and shape of state dicts: deep nesting, many tensors, many keys, long
keys, big plain values, size-0 tensors, many views of one storage, containers shared by
several paths. Each test here failed before its fix.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

import astage
from astage._files._skeleton import SkeletonEncoder
from astage._replication import _wire


def _shared_chain(levels: int, leaf: Any) -> Any:
    """``levels`` containers, each holding the one below twice: 2**levels paths to ``leaf``."""
    x = leaf
    for _ in range(levels):
        x = [x, x]
    return x


@pytest.mark.parametrize("leaf", ["plain", "tensor"])
def test_containers_sharing_each_other_are_refused_without_expanding_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, leaf: str
) -> None:
    # JSON has no references: each path to a shared container wrote it again, so 40 nested
    # levels of ``x = [x, x]`` (81 objects, which stage() copies at once) asked the file's
    # and the wire's encoders for 2**40 nodes: a save that never ended, memory without bound.
    bottom: Any = {"step": 1, "name": "x"} if leaf == "plain" else {"t": torch.ones(2)}
    state = {"m": _shared_chain(16, bottom)}
    with astage.SyncStager() as stager:
        staged = stager.stage(state)
    assert staged["m"][0] is staged["m"][1]  # staging keeps the sharing, as deepcopy does
    # Under a 1 MB header limit, 2**16 repeats are refused as they are met.
    monkeypatch.setattr(SkeletonEncoder, "max_header_bytes", 1_000_000, raising=False)
    monkeypatch.setattr(_wire._Encoder, "max_header_bytes", 1_000_000, raising=False)
    target = tmp_path / "shared.safetensors"
    with pytest.raises(astage.UnsavableError, match="reached by several paths") as raised:
        astage.save_sync(state, target)
    assert raised.value.path is not None and raised.value.path[0] == "m"
    assert not list(tmp_path.iterdir())
    with pytest.raises(astage.ReplicationError, match="reached by several paths"):
        _wire.encode(staged)
    # At the real limits, 40 levels are refused at once: plain repeats are not encoded again,
    # and at the first repeat holding tensors (encoded again, as its tensor nodes name their
    # path) the whole dict's least size, repeats counted, is weighed in one pass (it was
    # encoded again and again until the limit: 25 s at 30 levels).
    monkeypatch.undo()
    state = {"m": _shared_chain(40, bottom)}
    started = time.perf_counter()
    with pytest.raises(astage.UnsavableError, match="reached by several paths"):
        astage.save_sync(state, target)
    with pytest.raises(astage.ReplicationError, match="reached by several paths"):
        _wire.encode(state)
    assert time.perf_counter() - started < 5


def test_shared_containers_that_fit_still_round_trip(tmp_path: Path) -> None:
    # Shared plain containers (a ``betas`` tuple every param group holds) repeat in the file.
    betas = (0.9, 0.999)
    deep: Any = {"lr": 1e-3}
    for _ in range(95):
        deep = {"d": deep}
    groups = [{"betas": betas, "deep": deep, "params": [i]} for i in range(3)]
    state = {"w": torch.arange(4.0), "groups": groups, "again": _shared_chain(8, betas)}
    target = tmp_path / "ok.safetensors"
    astage.save_sync(state, target)
    loaded = astage.load(target)
    assert loaded["groups"] == groups and loaded["again"] == state["again"]
    # A shared container met deeper than where it was first encoded is checked again.
    too_deep = {"a": deep, "b": {"c": {"d": {"e": {"f": {"g": deep}}}}}}
    with pytest.raises(astage.UnsavableError, match="nested more than 100"):
        astage.save_sync(too_deep, tmp_path / "deep.safetensors")
    header = _wire.header_bytes(_wire.encode(state))
    parsed = _wire.parse_header(header, 16)
    replica = _wire.decode(parsed.raw, [torch.zeros(16, dtype=torch.uint8)], [], 1)
    assert replica["groups"] == groups and replica["again"] == state["again"]
