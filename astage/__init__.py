"""astage: asyncio-native staging of PyTorch state dicts into reusable host buffers."""

from ._cache import CacheInfo
from ._checkpoint_dir import CheckpointDir
from ._core import StageStats
from ._errors import (
    BufferMismatchError,
    CheckpointFormatError,
    CheckpointWriteError,
    InvalidOptionsError,
    ReplicationError,
    ReplicationTimeoutError,
    StagerClosedError,
    StagingError,
    UnsavableError,
    UnstageableError,
)
from ._options import StagingOptions
from ._paths import Attr, Path, format_path
from ._replication import ReplicationStager
from ._safetensors import load
from ._save import SaveHandle, SaveResult, save, start_save
from ._stager import Stager
from ._sync import SyncStager
from ._writer import CheckpointWriter, SafetensorsWriter

__version__ = "0.1.0"

__all__ = [
    "Attr",
    "BufferMismatchError",
    "CacheInfo",
    "CheckpointDir",
    "CheckpointFormatError",
    "CheckpointWriteError",
    "CheckpointWriter",
    "InvalidOptionsError",
    "Path",
    "ReplicationError",
    "ReplicationStager",
    "ReplicationTimeoutError",
    "SafetensorsWriter",
    "SaveHandle",
    "SaveResult",
    "StageStats",
    "Stager",
    "StagerClosedError",
    "StagingError",
    "StagingOptions",
    "SyncStager",
    "UnsavableError",
    "UnstageableError",
    "format_path",
    "load",
    "save",
    "start_save",
]
