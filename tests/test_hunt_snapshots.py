"""A hunt on snapshots, leases, buffer sets, reserve() and the buffer cache.

Each test here failed (or hung, bounded by a timeout) before its fix; its comment says how.
"""

from __future__ import annotations

import gc

import pytest
import torch

import astage


def _state() -> dict[str, torch.Tensor]:
    return {"w": torch.arange(16, dtype=torch.float32), "b": torch.ones(4)}


# -- leases a consumer dropped ------------------------------------------------------------------


@pytest.mark.parametrize("take", ["snapshot", "hold_buffers"])
def test_a_lease_collected_unreleased_frees_its_set(take: str) -> None:
    # Before: the stager kept every lease itself, so a snapshot (or hold) its consumer dropped
    # without release() (a writer that failed) held its buffer set for good: with buffers=1
    # the next stage() waited forever (here: LeaseTimeoutError) and close() hung. A private
    # lease nobody holds can never be released; collected, it now counts as released.
    state = _state()
    stager = astage.SyncStager()
    if take == "snapshot":
        stager.snapshot(state)
    else:
        stager.stage(state)
        stager.hold_buffers()
    gc.collect()
    staged = stager.stage(state, timeout=2.0)
    assert torch.equal(staged["w"], state["w"])
    stager.close()


def test_a_shared_lease_dropped_here_still_holds_its_set() -> None:
    # The other side of the fix above: a shared lease may have been sent to another process,
    # which releases it there; the parent dropping its own copy must not free the set.
    stager = astage.SyncStager(share_memory=True)
    snapshot = stager.snapshot(_state())
    flag = snapshot.lease._flag  # what a process it was sent to would release
    del snapshot
    gc.collect()
    with pytest.raises(astage.LeaseTimeoutError):
        stager.stage(_state(), timeout=0.05)
    flag.fill_(1)  # the other process's release()
    stager.stage(_state(), timeout=2.0)
    stager.close()
