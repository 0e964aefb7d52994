"""Sharded checkpoints of MPI jobs: one shard per rank, one atomic, verified commit.

>>> from h5ckpt.mpi import ShardedCheckpointManager, Sharded
>>> m = ShardedCheckpointManager("ckpt", checkpoint_frequency=10, keep_last_n=3)

Needs ``mpi4py`` (``pip install "h5ckpt[mpi]"``) for the manager; :func:`load_global`
and :func:`list_steps` work on one process without MPI.
"""

from __future__ import annotations

from pathlib import Path

from .manager import ShardedCheckpointManager, load_global
from .manifest import StepInfo, list_step_infos, step_info
from .protocol import DEFAULT_TIMEOUT, CheckpointTimeoutError
from .values import Sharded

__all__ = [
    "DEFAULT_TIMEOUT",
    "CheckpointTimeoutError",
    "Sharded",
    "ShardedCheckpointManager",
    "StepInfo",
    "list_steps",
    "load_global",
    "validate_step",
]


def list_steps(
    checkpoint_dir: str | Path,
    prefix: str = "checkpoint",
    *,
    hmac_key: bytes | None = None,
    verify: bool = False,
) -> list[StepInfo]:
    """Every step directory of ``prefix`` in ``checkpoint_dir``, by batch index."""
    from ..arguments import resolve_hmac_key

    return list_step_infos(Path(checkpoint_dir), prefix, resolve_hmac_key(hmac_key), verify)


def validate_step(path: str | Path, *, hmac_key: bytes | None = None) -> StepInfo:
    """A step directory with its manifest and every shard verified."""
    from ..arguments import resolve_hmac_key

    return step_info(Path(path), resolve_hmac_key(hmac_key), True)
