"""A writer process for tests/test_snapshots.py: receives snapshots, saves them, releases them.

Started once per test module with torch.multiprocessing's spawn context (nothing inherited
from the parent but what is sent): each message on ``jobs`` is ``(snapshot, path, delay_s)``;
the writer waits ``delay_s`` (a slow disk), ``torch.save``s the snapshot's state dict to
``path``, releases the snapshot (which frees the parent's buffer set), and answers on ``done``
with ``path``, or with the error's text. ``None`` ends it.
"""

from __future__ import annotations

import time
from typing import Any

import torch


def serve(jobs: Any, done: Any) -> None:
    while True:
        job = jobs.get()
        if job is None:
            return
        snapshot, path, delay_s = job
        try:
            time.sleep(delay_s)
            torch.save(snapshot.state_dict, path)
            snapshot.release()
        except Exception as exc:  # noqa: BLE001 - reported to the test
            done.put(f"{type(exc).__name__}: {exc}")
        else:
            done.put(path)
