"""DCP's staging flags, translated into astage's :class:`~astage.StagingOptions`.

DCP configures its stagers with four booleans (``StagingOptions`` in
``torch.distributed.checkpoint.staging``, ``CheckpointStagerConfig`` in its experimental module).
They map onto astage's options as follows; what astage adds (chunking, in-flight bound, the
pinning threshold) keeps astage's defaults unless the caller overrides it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from .._errors import AcceleratorUnavailableError, InvalidOptionsError
from .._options import StagingOptions, accelerator_available, cuda_available

FLAGS = ("use_pinned_memory", "use_shared_memory", "use_async_staging", "use_non_blocking_copy")


def pinning(pin_memory: Any, *, stacklevel: int) -> bool:
    """DCP's pinning policy: asking for pinned memory without CUDA warns and pins nothing.

    The warning is given here, once per stager, where DCP gives it: at construction.
    """
    if pin_memory and not cuda_available():  # astage pins CUDA sources' buffers only
        warnings.warn(
            "pin_memory is ignored for checkpoint staging: pinning host memory needs CUDA, "
            "and CUDA is not available",
            UserWarning,
            stacklevel=stacklevel + 1,
        )
        return False
    return bool(pin_memory)


@dataclass(frozen=True)
class DcpFlags:
    """The four flags of a DCP staging config, read from any object that has them."""

    use_pinned_memory: bool
    use_shared_memory: bool
    use_async_staging: bool
    use_non_blocking_copy: bool

    @classmethod
    def of(cls, config: Any) -> DcpFlags:
        missing = [name for name in FLAGS if not hasattr(config, name)]
        if missing:
            raise InvalidOptionsError(
                f"a staging config needs the attributes {', '.join(FLAGS)}; "
                f"{type(config).__name__} lacks {', '.join(missing)}"
            )
        return cls(*(bool(getattr(config, name)) for name in FLAGS))

    def options(self, overrides: dict[str, Any], *, stacklevel: int) -> StagingOptions:
        """The astage options these flags ask for; refuses what this machine cannot do."""
        if self.use_non_blocking_copy and not accelerator_available():
            # Also an AssertionError: what DCP raises here, and what its callers catch.
            raise AcceleratorUnavailableError(
                "use_non_blocking_copy=True needs an accelerator, and none is available; "
                "set use_non_blocking_copy=False"
            )
        options = StagingOptions(
            pin_memory=pinning(self.use_pinned_memory, stacklevel=stacklevel + 1),
            share_memory=self.use_shared_memory,
            non_blocking=self.use_non_blocking_copy,
        )
        options = options.replace(**overrides) if overrides else options
        options.resolve()  # refuse now what staging would refuse later
        return options
