"""_ReplicationStager: DCP's replicating stager, on astage's replication.

DCP's ``torch.distributed.checkpoint.staging._ReplicationStager`` swaps each rank's state
dict with a partner rank (``(rank + world // 2) % world``) over a process group and persists
the replica it receives. This one keeps its constructor and its blocking ``stage()`` and runs
:class:`astage.ReplicationStager` underneath: the snapshot is staged into cached host buffers,
sent with pickle-free headers, checked on arrival, and persisted as a safetensors file while
its bytes arrive.

``stage()`` is synchronous, as DCP's callers expect; the asynchronous stager runs on an event
loop in a thread of its own (an anyio blocking portal), so ``stage()`` may be called from any
thread, even one whose own event loop is running.
"""

from __future__ import annotations

import tempfile
import threading
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from anyio.from_thread import BlockingPortal, start_blocking_portal
from torch.distributed.checkpoint.staging import AsyncStager

from .._errors import InvalidOptionsError, StagerClosedError
from .._files._safetensors import fs_path
from .._replication._stager import ReplicationStager, replica_folder

__all__ = ["_ReplicationStager"]


class _ReplicationStager(AsyncStager):
    """Drop-in for ``torch.distributed.checkpoint.staging._ReplicationStager``.

    ``pg``: the process group to exchange over (a gloo group: the snapshot travels from host
    memory); ``timeout``: how long the partner may take; ``device``: DCP's transfer device,
    which must be the CPU here; ``storage_dir``: where each received replica is persisted, by
    default a fresh temporary directory (``replication_stager_*``), as in DCP.

    ``stage()`` returns the partner's replica, which lives in buffers this stager reuses: a
    later ``stage()`` overwrites them unless the previous replica is still referenced, in
    which case it gets fresh ones (DCP allocates fresh tensors every call). The file is
    ``replica-rank{rank}-from-rank{partner}.safetensors`` (:attr:`replica_path`), readable with
    :func:`astage.load`; DCP writes a pickle (``torch.save``) instead.
    """

    _synchronize_after_execute: bool = False

    def __init__(
        self,
        pg: Any,
        timeout: timedelta = timedelta(minutes=30),
        device: torch.device = torch.device("cpu"),  # noqa: B008 - DCP's signature
        storage_dir: str | None = None,
    ) -> None:
        if torch.device(device).type != "cpu":
            raise InvalidOptionsError(
                f"device={device}: astage replicates from host memory over a gloo group; "
                "pass device=torch.device('cpu')"
            )
        self._pg = pg
        self._timeout = timeout
        self._device = torch.device(device)
        if storage_dir is None:
            self._storage_dir = tempfile.mkdtemp(prefix="replication_stager_")
        else:
            # Made now (as DCP does), a bytes path decoded: see replica_folder.
            self._storage_dir = fs_path(storage_dir, "storage_dir")
            replica_folder(self._storage_dir)
        self._stager: ReplicationStager | None = None
        self._portal: BlockingPortal | None = None
        self._portal_cm: Any = None
        self._closed = False
        # Held while the portal and the stager are started or stopped: two threads' first
        # stage() calls would otherwise each start a portal and a ReplicationStager (two
        # stagers exchanging on one group, each counting its calls from 1; one portal never
        # stopped), and a close() meanwhile would miss the portal being started.
        self._starting = threading.Lock()

    @property
    def storage_dir(self) -> str:
        """Where the received replicas are persisted."""
        return self._storage_dir

    @property
    def replica_path(self) -> str | None:
        """The file of the last replica received (None before the first call)."""
        return self._stager.replica_path if self._stager is not None else None

    def stage(self, state_dict: Any, **kwargs: Any) -> Any:
        """Swap ``state_dict`` with the partner rank; return the partner's replica (blocking).

        Without an initialized process group, ``state_dict`` is returned as it is (as DCP
        does). Extra keyword arguments are accepted and ignored.
        """
        if not dist.is_initialized():
            if self._closed:
                raise StagerClosedError("this _ReplicationStager is closed")
            return state_dict
        with self._starting:
            if self._closed:
                raise StagerClosedError("this _ReplicationStager is closed")
            portal = self._started()
            stager = self._stager
        assert stager is not None
        return portal.call(stager.stage, state_dict)

    def _started(self) -> BlockingPortal:
        if self._portal is None:
            self._portal_cm = start_blocking_portal()
            self._portal = self._portal_cm.__enter__()
            try:
                self._stager = ReplicationStager(
                    self._pg, storage_dir=self._storage_dir, timeout=self._timeout
                )
                # DCP hands out fresh tensors each call; an upload may still read the last.
                self._stager._transport.fresh_when_in_use = True
            except BaseException:
                self._stop_portal()
                raise
        return self._portal

    def synchronize_staging(self) -> None:
        """A no-op: staging is complete when ``stage()`` returns."""

    def close(self) -> None:
        """Release the buffers and the portal's thread; persisted files stay (as in DCP)."""
        with self._starting:
            if self._closed:
                return
            self._closed = True
        # The portal can no longer change: stage() starts none once _closed is set.
        if self._portal is not None and self._stager is not None:
            self._portal.call(self._stager.aclose)
        self._stop_portal()

    def _stop_portal(self) -> None:
        portal_cm, self._portal_cm, self._portal = self._portal_cm, None, None
        if portal_cm is not None:
            portal_cm.__exit__(None, None, None)
