"""A hunt on the writer side of astage's DCP storage layer (``astage.compat.FileSystemWriter``)
and its interplay with ``dcp.save`` / ``dcp.async_save`` / ``dcp.load``: each test failed
before the fix it came with."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint import state_dict_loader, state_dict_saver
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.storage import WriteResult

from astage.compat import FileSystemReader, FileSystemWriter

pytestmark = pytest.mark.filterwarnings(
    "ignore:torch.distributed is disabled:UserWarning",
    "ignore:Detected an existing checkpoint:UserWarning",
)


def save(sd: dict[str, Any], writer: FileSystemWriter) -> None:
    state_dict_saver.save(sd, storage_writer=writer, no_dist=True)


def load_into(sd: dict[str, Any], path: Path) -> dict[str, Any]:
    state_dict_loader.load(sd, storage_reader=FileSystemReader(path), no_dist=True)
    return sd


class _Crash(Exception):
    """A process that dies between writing its data files and committing the metadata."""


def test_a_reused_writer_never_overwrites_the_files_of_the_committed_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: DCP calls reset() only when given a checkpoint_id, so a writer reused for saves
    # into its own folder kept one save id, and the third save named its data file as the
    # second (committed) one did and renamed it over it. A crash before the new metadata left
    # the committed .metadata naming the new, uncommitted bytes: it loaded 9s, never committed.
    writer = FileSystemWriter(tmp_path)
    for value in (1.0, 2.0):
        save({"w": torch.full((4,), value)}, writer)

    def crash(self: FileSystemWriter, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        raise _Crash

    monkeypatch.setattr(FileSystemWriter, "finish", crash)
    with pytest.raises(BaseException, match="_Crash"):
        save({"w": torch.full((4,), 9.0)}, writer)
    monkeypatch.undo()
    assert torch.equal(load_into({"w": torch.zeros(4)}, tmp_path)["w"], torch.full((4,), 2.0))
    save({"w": torch.full((4,), 3.0)}, writer)  # and the next save replaces it cleanly
    assert torch.equal(load_into({"w": torch.zeros(4)}, tmp_path)["w"], torch.full((4,), 3.0))
    assert sorted(os.listdir(tmp_path))[0] == ".metadata"
    assert len(os.listdir(tmp_path)) == 2, os.listdir(tmp_path)
