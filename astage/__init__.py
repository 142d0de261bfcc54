"""astage: staging of PyTorch state dicts into reusable host buffers, for checkpointing.

``Stager`` copies a live state dict (GPU or CPU tensors in nested containers) into cached,
pinned-where-useful host buffers without blocking the event loop; it runs on asyncio (with or
without uvloop) and on trio, through anyio. ``SyncStager`` is the blocking face of the same core.
``save`` / ``load`` / ``CheckpointDir`` stream staged tensors into safetensors files,
``ReplicationStager`` keeps each rank's snapshot on a partner rank, and ``astage.compat`` offers
drop-in stagers for ``torch.distributed.checkpoint``.
"""

from ._core._cache import CacheInfo
from ._core._stats import StageStats
from ._drivers._async import Stager
from ._drivers._base import Reservation
from ._drivers._holds import BufferHold
from ._drivers._leases import Lease
from ._drivers._snapshots import Snapshot
from ._drivers._sync import SyncStager
from ._errors import (
    AcceleratorUnavailableError,
    AstageError,
    BufferMismatchError,
    BusyError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    CheckpointSkippedWarning,
    CheckpointWriteError,
    ClosedError,
    InvalidOptionsError,
    LeaseTimeoutError,
    MeshMismatchError,
    ReplicationError,
    ReplicationTimeoutError,
    SnapshotReleasedError,
    StagerClosedError,
    StagingError,
    UnsavableError,
    UnstageableError,
    UsageError,
)
from ._files._checkpoint_dir import CheckpointDir, SkippedCheckpoint
from ._files._load import load
from ._files._restore import load_async
from ._files._save import SaveHandle, SaveResult, save, start_save
from ._files._save_sync import SyncSaveHandle, save_sync, start_save_sync
from ._files._writer import CheckpointWriter, SafetensorsWriter
from ._options import StagingOptions
from ._paths import Attr, Path, format_path
from ._replication._stager import ReplicationStager

__version__ = "0.2.0"

__all__ = [
    "AcceleratorUnavailableError",
    "AstageError",
    "Attr",
    "BufferHold",
    "BufferMismatchError",
    "BusyError",
    "CacheInfo",
    "CheckpointDir",
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointNotFoundError",
    "CheckpointSkippedWarning",
    "CheckpointWriteError",
    "CheckpointWriter",
    "ClosedError",
    "InvalidOptionsError",
    "Lease",
    "LeaseTimeoutError",
    "MeshMismatchError",
    "Path",
    "ReplicationError",
    "ReplicationStager",
    "ReplicationTimeoutError",
    "Reservation",
    "SafetensorsWriter",
    "SaveHandle",
    "SaveResult",
    "SkippedCheckpoint",
    "Snapshot",
    "SnapshotReleasedError",
    "StageStats",
    "Stager",
    "StagerClosedError",
    "StagingError",
    "StagingOptions",
    "SyncSaveHandle",
    "SyncStager",
    "UnsavableError",
    "UnstageableError",
    "UsageError",
    "format_path",
    "load",
    "load_async",
    "save",
    "save_sync",
    "start_save",
    "start_save_sync",
]
