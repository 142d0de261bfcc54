"""astage.compat: drop-in replacements for the stagers of ``torch.distributed.checkpoint``.

Switch by changing one import; ``dcp.async_save(..., async_stager=...)`` calls stay as they are::

    # from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    from astage.compat import DefaultStager, StagingOptions

The classes keep DCP's constructors and methods and run on astage's core: its walk, its host
buffer cache and its copy engine. What differs, and why, is in ``docs/dcp.md``. ``AsyncStager``
and ``StagingOptions`` are DCP's own classes, re-exported so that the import above is complete.
"""

from torch.distributed.checkpoint.staging import AsyncStager, StagingOptions

from ._blocking import BlockingAsyncStager
from ._default import DefaultStager
from ._replication import _ReplicationStager as _ReplicationStager  # DCP keeps it private
from ._state_dict_stager import StateDictStager
from ._storage_reader import FileSystemReader
from ._storage_writer import FileSystemWriter

__all__ = [
    "AsyncStager",
    "BlockingAsyncStager",
    "DefaultStager",
    "FileSystemReader",
    "FileSystemWriter",
    "StagingOptions",
    "StateDictStager",
]
