"""astage.compat through DCP itself: ``dcp.async_save`` with astage's stagers, then ``dcp.load``.

On a machine without a process group DCP saves and loads in a single process (``no_dist=True``);
one test runs the same round trip under a single-process gloo group instead.
"""

from __future__ import annotations

import copy
import pathlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import pytest
import torch
import torch.distributed as dist
from conftest import iter_tensors, model_state_dict, mutate_, same_values
from torch._C._distributed_c10d import HashStore
from torch.distributed.checkpoint.filesystem import FileSystemWriter
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse, async_save

from astage import compat
from astage.compat import _pool as compat_pool

pytestmark = pytest.mark.filterwarnings(
    "ignore:torch.distributed is disabled:UserWarning",
)


def options(async_staging: bool, device: str = "cpu") -> Any:
    cuda = device == "cuda"
    return compat.StagingOptions(
        use_pinned_memory=cuda,
        use_shared_memory=False,
        use_async_staging=async_staging,
        use_non_blocking_copy=cuda,
    )


def blank_like(tree: Any) -> Any:
    """A template for dcp.load: the same structure, every tensor zeroed, other values spoiled."""
    if isinstance(tree, torch.Tensor):
        return torch.zeros_like(tree, device="cpu")
    if isinstance(tree, dict):
        return {key: blank_like(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [blank_like(value) for value in tree]
    return None


def assert_loaded(loaded: Any, expected: Any) -> None:
    """Every tensor of ``expected`` has its values in ``loaded``; other values are equal."""
    expected_tensors = dict(iter_tensors(expected))
    loaded_tensors = dict(iter_tensors(loaded))
    assert loaded_tensors.keys() == expected_tensors.keys()
    for path, tensor in expected_tensors.items():
        assert same_values(loaded_tensors[path], tensor.cpu()), path
    if isinstance(expected, dict):
        for key, value in expected.items():
            if not isinstance(value, (torch.Tensor, dict, list)):
                assert loaded[key] == value, key


def wait(response: Future[Any] | AsyncSaveResponse) -> None:
    if isinstance(response, AsyncSaveResponse):
        response.staging_completion.result(timeout=60)
        response.upload_completion.result(timeout=60)
    else:
        response.result(timeout=60)


def upload_let_go(stager: compat.DefaultStager, timeout_s: float = 10.0) -> None:
    """Wait until a buffer set is free again after an upload's future resolved.

    DCP resolves the upload's future before its worker thread drops the work item that holds the
    snapshot. The pool looks again for a few milliseconds (``_pool.GRACE_S``) before it pays for
    a new set, but on a loaded 2-core machine the thread was once slower than that (a full
    suite run: the third save allocated a new set). The tests that check reuse wait for it.
    """
    deadline = time.monotonic() + timeout_s
    while all(compat_pool._in_use(s) for s in stager._pool._sets):
        assert time.monotonic() < deadline, "the upload thread never let go of its snapshot"
        time.sleep(0.001)


def load(template: Any, path: pathlib.Path, no_dist: bool = True) -> Any:
    dcp_load(template, checkpoint_id=str(path), no_dist=no_dist)
    return template


# -- one save, one load ---------------------------------------------------------------------------


@pytest.mark.parametrize("async_staging", [False, True], ids=["sync staging", "async staging"])
def test_async_save_then_load(tmp_path: pathlib.Path, async_staging: bool) -> None:
    sd = model_state_dict()
    with compat.DefaultStager(options(async_staging)) as stager:
        response = async_save(sd, checkpoint_id=str(tmp_path), async_stager=stager, no_dist=True)
        assert isinstance(response, AsyncSaveResponse) == async_staging
        wait(response)
    loaded = load(blank_like(sd), tmp_path)
    assert_loaded(loaded, sd)
    assert loaded["epoch"] == 7 and loaded["name"] == "run-1"


def test_async_save_with_the_blocking_stager(tmp_path: pathlib.Path) -> None:
    sd = model_state_dict()
    stager = compat.BlockingAsyncStager(cache_staged_state_dict=True, type_check=True)
    for index in range(2):
        path = tmp_path / str(index)
        wait(async_save(sd, checkpoint_id=str(path), async_stager=stager, no_dist=True))
        assert_loaded(load(blank_like(sd), path), sd)
        mutate_(sd)
    stager.close()


@pytest.fixture
def gloo_group() -> Iterator[None]:
    dist.init_process_group("gloo", rank=0, world_size=1, store=HashStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("async_staging", [False, True], ids=["sync staging", "async staging"])
def test_async_save_under_a_process_group(
    tmp_path: pathlib.Path, gloo_group: None, async_staging: bool
) -> None:
    sd = model_state_dict()
    with compat.DefaultStager(options(async_staging)) as stager:
        wait(async_save(sd, checkpoint_id=str(tmp_path), async_stager=stager))
    assert_loaded(load(blank_like(sd), tmp_path, no_dist=False), sd)


# -- three saves while training -------------------------------------------------------------------


class GatedWriter(FileSystemWriter):
    """A file system writer whose uploads wait at a gate: a slow storage, made deterministic.

    While an upload waits, it holds its snapshot, as a real upload does while it writes.
    """

    def __init__(self, path: pathlib.Path, gate: threading.Event) -> None:
        super().__init__(str(path), sync_files=False)
        self.gate = gate

    def write_data(self, plan: Any, planner: Any) -> Any:
        assert self.gate.wait(timeout=60), "the test never opened the gate"
        return super().write_data(plan, planner)


def small_model(device: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    # One weight of 1 MiB (and its two AdamW moments): buffers that large live on mappings of
    # their own, and must come free after an upload as the small ones do.
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 512),
        torch.nn.ReLU(),
        torch.nn.Linear(512, 512),
        torch.nn.LayerNorm(512),
        torch.nn.Linear(512, 4),
    ).to(device)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, optim


def train_step(model: torch.nn.Module, optim: torch.optim.Optimizer, device: str) -> None:
    inputs = torch.randn(8, 16, device=device)
    loss = model(inputs).square().mean()
    loss.backward()
    optim.step()
    optim.zero_grad()


def checkpoint_state(model: torch.nn.Module, optim: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": model.state_dict(), "optim": optim.state_dict()}


def three_saves_while_training(
    tmp_path: pathlib.Path, async_staging: bool, device: str, uploads_overlap: bool
) -> tuple[compat.DefaultStager, dict[str, Any]]:
    """Save at steps 1, 2 and 3 with one stager, training in between; check every checkpoint.

    With ``uploads_overlap`` every upload waits at a gate until all three saves have staged
    and training has moved on: each later save stages while the earlier uploads still read
    their snapshots. Otherwise each upload completes before training goes on.
    """
    model, optim = small_model(device)
    gate = threading.Event()
    if not uploads_overlap:
        gate.set()
    stager = compat.DefaultStager(options(async_staging, device))
    expected, responses = [], []
    for step in range(1, 4):
        train_step(model, optim, device)
        state = checkpoint_state(model, optim)
        expected.append(copy.deepcopy(state))
        response = async_save(
            state,
            storage_writer=GatedWriter(tmp_path / f"step-{step}", gate),
            async_stager=stager,
            no_dist=True,
        )
        if isinstance(response, AsyncSaveResponse):
            response.staging_completion.result(timeout=60)  # DCP's rule before training on
        if not uploads_overlap:
            wait(response)
            upload_let_go(stager)
        responses.append(response)
        del state
    train_step(model, optim, device)  # training goes on while the uploads are pending
    gate.set()
    for response in responses:
        wait(response)
    for step, state in enumerate(expected, start=1):
        template = blank_like(checkpoint_state(*small_model(device)))
        # the fresh optimizer has no state yet: take the structure from the expected one
        template["optim"] = blank_like(state["optim"])
        assert_loaded(load(template, tmp_path / f"step-{step}"), state)
    return stager, checkpoint_state(model, optim)


@pytest.mark.parametrize("async_staging", [False, True], ids=["sync staging", "async staging"])
def test_three_saves_while_uploads_are_still_running(
    tmp_path: pathlib.Path, async_staging: bool
) -> None:
    stager, state = three_saves_while_training(tmp_path, async_staging, "cpu", uploads_overlap=True)
    one_snapshot = stager.last_stats
    assert one_snapshot is not None
    # Three snapshots were alive at once: three buffer sets. Once the uploads are done, the
    # next save reuses one of them and lets the others go.
    assert stager.cache_info().nbytes == 3 * one_snapshot.nbytes
    stager.stage(state)
    stager.synchronize_staging()
    assert stager.last_stats is not None and stager.last_stats.new_nbytes == 0
    assert stager.cache_info().nbytes == one_snapshot.nbytes
    stager.close()


@pytest.mark.parametrize("async_staging", [False, True], ids=["sync staging", "async staging"])
def test_three_saves_with_uploads_in_turn_reuse_one_cache(
    tmp_path: pathlib.Path, async_staging: bool
) -> None:
    stager, _ = three_saves_while_training(tmp_path, async_staging, "cpu", uploads_overlap=False)
    stats = stager.last_stats
    assert stats is not None
    assert stats.new_nbytes == 0  # the third save allocated nothing
    assert stager.cache_info().nbytes == stats.nbytes  # one buffer set, kept from save to save
    stager.close()


@pytest.mark.cuda
@pytest.mark.parametrize("uploads_overlap", [False, True])
@pytest.mark.parametrize("async_staging", [False, True], ids=["sync staging", "async staging"])
def test_three_saves_while_training_on_cuda(
    tmp_path: pathlib.Path, async_staging: bool, uploads_overlap: bool
) -> None:
    stager, _ = three_saves_while_training(tmp_path, async_staging, "cuda", uploads_overlap)
    assert stager.cache_info().pinned_nbytes > 0
    stager.close()


def test_the_three_saves_check_catches_an_overwritten_snapshot(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control: with one buffer set reused regardless (what DCP's stagers do), the
    overlapping saves write wrong checkpoints and the check above sees it."""
    monkeypatch.setattr(compat_pool, "_in_use", lambda stager: False)
    with pytest.raises(AssertionError, match="model"):
        three_saves_while_training(tmp_path, False, "cpu", uploads_overlap=True)
