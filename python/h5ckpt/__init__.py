"""h5ckpt: crash-safe, verified HDF5 checkpoints for long-running optimizations.

>>> from h5ckpt import CheckpointManager
>>> manager = CheckpointManager("checkpoints", checkpoint_frequency=10, keep_last_n=3)
"""

from __future__ import annotations

try:
    from . import _native
except ImportError as exc:  # pragma: no cover - depends on how the package was installed
    raise ImportError(
        "h5ckpt's compiled core (h5ckpt._native) is missing. Install the wheel with "
        "`pip install h5ckpt`, or build it from a source checkout with "
        "`pip install -e .` (needs a Rust toolchain) or `make build-dev`."
    ) from exc

from .errors import (
    CheckpointAuthenticationError,
    CheckpointConflictError,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointLimitError,
    CheckpointNotFoundError,
    CheckpointPermissionError,
    CheckpointPickleError,
    CheckpointResourceError,
    CheckpointStorageError,
    CheckpointValueError,
    CheckpointVersionError,
)
from .limits import LoadLimits
from .manager import CheckpointManager
from .options import CheckpointManagerOptions
from .verification import CheckpointInfo

__version__: str = _native.__version__

__all__ = [
    "CheckpointAuthenticationError",
    "CheckpointConflictError",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointLimitError",
    "CheckpointManager",
    "CheckpointManagerOptions",
    "CheckpointNotFoundError",
    "CheckpointPermissionError",
    "CheckpointPickleError",
    "CheckpointResourceError",
    "CheckpointStorageError",
    "CheckpointValueError",
    "CheckpointVersionError",
    "LoadLimits",
    "__version__",
]
