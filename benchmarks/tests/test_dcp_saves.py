"""The dcp scenario's floor: a plain copy that async_save drives as a stager."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict_loader import load
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse, async_save

from benchmarks.scenarios.dcp_saves import PlainCopyStager


def _state() -> dict[str, object]:
    return {
        "model": {"w": torch.randn(4, 3), "b": torch.arange(5.0)},
        "optim": {"state": {0: {"step": torch.tensor(3.0)}}, "groups": [{"lr": 0.1}]},
    }


def test_the_floor_copies_into_twins_it_keeps_from_save_to_save() -> None:
    state = _state()
    stager = PlainCopyStager()
    try:
        first = stager.stage(state).result()
        assert stager.last_stats is not None and stager.last_stats.new_nbytes == 4 * 12 + 4 * 6
        model = state["model"]
        assert isinstance(model, dict)
        model["w"].add_(1.0)
        second = stager.stage(state).result()
        assert stager.last_stats.new_nbytes == 0 and stager.last_stats.seconds > 0
    finally:
        stager.close()
    assert second["model"]["w"].data_ptr() == first["model"]["w"].data_ptr()
    assert second["model"]["w"].data_ptr() != model["w"].data_ptr()
    assert torch.equal(second["model"]["w"], model["w"])
    assert torch.equal(second["optim"]["state"][0]["step"], torch.tensor(3.0))
    assert second["optim"]["groups"] == [{"lr": 0.1}]


def test_async_save_writes_what_the_floor_staged(tmp_path: Path) -> None:
    state = _state()
    stager = PlainCopyStager()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            response = async_save(
                state, checkpoint_id=str(tmp_path), async_stager=stager, no_dist=True
            )
            assert isinstance(response, AsyncSaveResponse)
            response.upload_completion.result()
            loaded = _state()
            for tensor in (loaded["model"]["w"], loaded["model"]["b"]):  # type: ignore[index]
                tensor.zero_()
            load(loaded, checkpoint_id=str(tmp_path), no_dist=True)
    finally:
        stager.close()
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])  # type: ignore[index]
    assert torch.equal(loaded["model"]["b"], state["model"]["b"])  # type: ignore[index]
