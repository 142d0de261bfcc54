"""astage: asyncio-native staging of PyTorch state dicts into reusable host buffers."""

from ._cache import CacheInfo
from ._core import StageStats
from ._errors import (
    BufferMismatchError,
    InvalidOptionsError,
    StagerClosedError,
    StagingError,
    UnstageableError,
)
from ._options import StagingOptions
from ._paths import Attr, Path, format_path
from ._stager import Stager
from ._sync import SyncStager

__version__ = "0.1.0"

__all__ = [
    "Attr",
    "BufferMismatchError",
    "CacheInfo",
    "InvalidOptionsError",
    "Path",
    "StageStats",
    "Stager",
    "StagerClosedError",
    "StagingError",
    "StagingOptions",
    "SyncStager",
    "UnstageableError",
    "format_path",
]
