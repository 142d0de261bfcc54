"""CheckpointDir under a demanding user's and an attacker's probing: each test a bug once found."""

from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

import astage
from astage._files import _checkpoint_dir


def state_at(step: int) -> dict[str, Any]:
    return {"w": torch.full((4,), float(step)), "step": step}


def saved(root: Path, steps: list[int], *, keep: int | None = None) -> None:
    """A folder holding checkpoints of ``steps`` (saved in this order)."""

    async def main() -> None:
        async with astage.CheckpointDir(root, keep=keep) as ckpts:
            for step in steps:
                await ckpts.save(step, state_at(step))

    anyio.run(main)


# -- step numbers -------------------------------------------------------------------------------


def test_a_huge_negative_step_is_refused_as_a_step(tmp_path: Path) -> None:
    # Printing the int in the message raised Python's raw ValueError (over 4,300 digits).
    ckpts = astage.CheckpointDir(tmp_path)
    with pytest.raises(astage.InvalidOptionsError, match="non-negative"):
        ckpts.path_for(-(10**5000))


def test_a_long_named_step_is_quoted_only_briefly(tmp_path: Path) -> None:
    ckpts = astage.CheckpointDir(tmp_path)
    with pytest.raises(astage.InvalidOptionsError) as caught:
        ckpts.path_for("x" * 100_000)  # type: ignore[arg-type]
    assert len(str(caught.value)) < 500


@pytest.mark.parametrize(
    "step",
    [torch.tensor(True), torch.tensor(False), torch.tensor(7, device="meta")],
    ids=["bool tensor true", "bool tensor false", "meta tensor"],
)
def test_a_tensor_that_is_no_integer_step_is_refused(tmp_path: Path, step: Any) -> None:
    # A bool tensor was taken as step 1 or 0 (a bool is refused); a meta tensor raised a raw
    # RuntimeError (it has no value to read).
    ckpts = astage.CheckpointDir(tmp_path)
    with pytest.raises(astage.InvalidOptionsError, match="step"):
        ckpts.path_for(step)


# -- resuming while saves prune -----------------------------------------------------------------


def test_load_latest_while_a_save_prunes_loads_the_new_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader checked step 1 and is about to load it; a save publishes 2 and prunes 1.

    The reader passed over the vanished file as bad and, having listed nothing newer, resumed
    from nothing (None) with a warning, though step 2 was there.
    """
    saved(tmp_path, [1], keep=1)
    loading, go_on = threading.Event(), threading.Event()
    real_load = astage.load

    def slow_load(path: str, **options: Any) -> Any:
        if path.endswith("step_000000001.safetensors"):
            loading.set()
            go_on.wait(5)
        return real_load(path, **options)

    monkeypatch.setattr(_checkpoint_dir, "load", slow_load)
    reader = astage.CheckpointDir(tmp_path)
    found: list[Any] = []

    def run() -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            found.append(reader.load_latest())
        found.append(caught)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert loading.wait(5)
    saved(tmp_path, [2], keep=1)
    assert astage.CheckpointDir(tmp_path).steps() == [2]
    go_on.set()
    thread.join(5)
    result, caught = found
    assert result is not None and result[0] == 2 == result[1]["step"]
    assert reader.skipped == () and caught == []
