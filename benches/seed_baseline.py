"""The predecessor's checkpoint approach, re-implemented for benchmarking only.

homodyne's ``CheckpointManager`` (the class h5ckpt succeeds) documents this
behaviour, and this module reproduces it so the harness can time it side by side
with h5ckpt on the same machine, in the same run:

* save: ``pickle.dumps`` of the optimizer state, ``hashlib.sha256`` of that pickle
  (the only checksum), then one ``h5py.File(path, "w")`` written straight to the
  final name: ``parameters`` with gzip level 4 when compression is enabled, the
  pickle as an opaque ``np.void`` scalar, ``batch_idx`` / ``loss`` / ``checksum`` /
  ``version`` / ``timestamp`` attributes, scalar metadata as attributes of a
  ``metadata`` group (lists and dicts as JSON, arrays as datasets), then
  ``chmod 0600``. No temp file, no fsync.
* load: read everything back, recompute the pickle's checksum, unpickle.
* validate: open the file, check the required names, recompute the pickle's
  checksum (``parameters`` is never checked).
* find-latest: glob ``homodyne_state_batch_*.h5``, newest batch first, return the
  first that validates.
* cleanup: glob, keep the ``keep_last_n`` highest batch indices, delete the rest
  (valid or not).
* list: the seed has no listing; its equivalent is the glob and sort that
  find-latest and cleanup start with.

It is not part of h5ckpt and is not imported by it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

__all__ = ["SeedCheckpointManager"]

_VERSION = "seed-baseline"


def _batch_of(path: Path) -> int:
    try:
        return int(path.stem.rsplit("_", 1)[-1])
    except ValueError:
        return -1


class SeedCheckpointManager:
    """The seed's save / load / validate / find-latest / cleanup, without logging."""

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike[str],
        checkpoint_frequency: int = 10,
        keep_last_n: int = 3,
        enable_compression: bool = True,
    ) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self.checkpoint_frequency = checkpoint_frequency
        self.keep_last_n = keep_last_n
        self.enable_compression = enable_compression
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)

    def checkpoint_path(self, batch_idx: int) -> Path:
        return self.checkpoint_dir / f"homodyne_state_batch_{batch_idx:04d}.h5"

    @staticmethod
    def _checksum(blob: bytes) -> str:
        return hashlib.sha256(blob).hexdigest()

    def save_checkpoint(
        self,
        batch_idx: int,
        parameters: np.ndarray,
        optimizer_state: dict[str, Any],
        loss: float,
        metadata: dict[str, Any] | None = None,
    ) -> Path:
        path = self.checkpoint_path(batch_idx)
        blob = pickle.dumps(optimizer_state)
        checksum = self._checksum(blob)
        with h5py.File(path, "w") as f:
            if self.enable_compression:
                f.create_dataset(
                    "parameters", data=parameters, compression="gzip", compression_opts=4
                )
            else:
                f.create_dataset("parameters", data=parameters)
            f.create_dataset("optimizer_state", data=np.void(blob))
            f.attrs["batch_idx"] = batch_idx
            f.attrs["loss"] = loss
            f.attrs["checksum"] = checksum
            f.attrs["version"] = _VERSION
            f.attrs["timestamp"] = time.time()
            if metadata is not None:
                group = f.create_group("metadata")
                for key, value in metadata.items():
                    if isinstance(value, (int, float, str, bool)):
                        group.attrs[key] = value
                    elif isinstance(value, (list, dict)):
                        group.attrs[key] = json.dumps(value)
                    elif isinstance(value, np.ndarray):
                        group.create_dataset(key, data=value)
        os.chmod(path, 0o600)
        return path

    def load_checkpoint(self, checkpoint_path: Path) -> dict[str, Any]:
        checkpoint_path = Path(checkpoint_path)
        if not checkpoint_path.exists():
            raise FileNotFoundError(checkpoint_path)
        with h5py.File(checkpoint_path, "r") as f:
            parameters = f["parameters"][:]
            blob = bytes(f["optimizer_state"][()])
            batch_idx = f.attrs["batch_idx"]
            loss = f.attrs["loss"]
            stored = f.attrs["checksum"]
            version = f.attrs.get("version", "unknown")
            timestamp = f.attrs.get("timestamp", 0.0)
            if self._checksum(blob) != stored:
                raise ValueError(f"checksum mismatch in {checkpoint_path}")
            optimizer_state = pickle.loads(blob)
            metadata: dict[str, Any] = {}
            if "metadata" in f:
                group = f["metadata"]
                for key in group.attrs:
                    value = group.attrs[key]
                    if isinstance(value, str):
                        try:
                            metadata[key] = json.loads(value)
                        except (json.JSONDecodeError, TypeError):
                            metadata[key] = value
                    else:
                        metadata[key] = value
                for key in group:
                    metadata[key] = group[key][:]
        return {
            "batch_idx": int(batch_idx),
            "parameters": parameters,
            "optimizer_state": optimizer_state,
            "loss": float(loss),
            "metadata": metadata,
            "version": version,
            "timestamp": float(timestamp),
        }

    def validate_checkpoint(self, checkpoint_path: Path) -> bool:
        checkpoint_path = Path(checkpoint_path)
        if not checkpoint_path.exists():
            return False
        try:
            with h5py.File(checkpoint_path, "r") as f:
                if any(name not in f for name in ("parameters", "optimizer_state")):
                    return False
                if any(a not in f.attrs for a in ("batch_idx", "loss", "checksum")):
                    return False
                blob = bytes(f["optimizer_state"][()])
                return self._checksum(blob) == f.attrs["checksum"]
        except (OSError, KeyError, ValueError):
            return False

    def list_checkpoints(self) -> list[Path]:
        """The glob-and-sort every directory operation of the seed starts with."""
        return sorted(self.checkpoint_dir.glob("homodyne_state_batch_*.h5"), key=_batch_of)

    def find_latest_checkpoint(self) -> Path | None:
        for path in reversed(self.list_checkpoints()):
            if self.validate_checkpoint(path):
                return path
        return None

    def cleanup_old_checkpoints(self) -> list[Path]:
        files = self.list_checkpoints()
        if len(files) <= self.keep_last_n:
            return []
        deleted = []
        for path in files[: len(files) - self.keep_last_n]:
            try:
                path.unlink()
            except OSError:
                continue
            deleted.append(path)
        return deleted
