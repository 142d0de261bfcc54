"""The dcp scenario's floor (a plain copy that async_save drives as a stager), and DCP's stager."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint import staging as dcp_staging
from torch.distributed.checkpoint.state_dict_loader import load
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse, async_save

from benchmarks.contenders import dcp_default_options, dcp_default_stager
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


def _closing_after_every_call(self: Any, state_dict: Any, **kwargs: Any) -> Any:
    """``DefaultStager._stage`` as torch 2.11 ships it: its cache closed after every call."""
    staged = ORIGINAL_STAGE(self, state_dict, **kwargs)
    self._state_dict_stager.close()
    return staged


ORIGINAL_STAGE = dcp_staging.DefaultStager._stage


def test_dcp_keeps_its_cache_across_calls_where_torch_closed_it_after_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Found on a GPU machine (torch 2.11): DCP's second call failed with KeyError: <class 'type'>.
    monkeypatch.setattr(dcp_staging.DefaultStager, "_stage", _closing_after_every_call)
    state_dict: dict[str, Any] = {"w": torch.arange(8.0), "nested": {"b": torch.ones(3)}}
    stager = dcp_default_stager(dcp_default_options(cuda=False))
    first = stager.stage(state_dict)
    assert not isinstance(first, dict)
    first_w = first.result()["w"]
    second = stager.stage(state_dict)
    assert not isinstance(second, dict)
    staged = second.result()
    assert torch.equal(staged["w"], state_dict["w"])
    assert torch.equal(staged["nested"]["b"], torch.ones(3))
    assert staged["w"].data_ptr() == first_w.data_ptr()  # DCP's cached storage, reused
    stager.close()
    assert len(stager._state_dict_stager._cached_storage_mapping) == 0  # closed for real
