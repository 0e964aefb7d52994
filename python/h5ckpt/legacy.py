"""Files written by the predecessor (homodyne's ``CheckpointManager``).

They have no h5ckpt header: a plain HDF5 file whose ``optimizer_state`` dataset holds
a pickle, with a SHA-256 hex digest of that pickle in the ``checksum`` attribute. Only
that pickle is covered by their checksum, so nothing here can be verified before
libhdf5 parses the file; what can be checked is checked, and the pickle is only
unpickled when the caller allows it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .errors import CheckpointCorruptError, CheckpointPickleError
from .limits import LoadLimits
from .opening import open_hdf5

__all__ = ["load_legacy", "read_legacy_summary", "validate_legacy"]

_REQUIRED_ATTRS = ("batch_idx", "loss", "checksum")


def _open(path: Path) -> contextlib.AbstractContextManager[h5py.File]:
    return open_hdf5(path)


def _checked_pickle(f: h5py.File, path: Path) -> bytes:
    """The pickled optimizer state, after its own checksum matched."""
    for key in ("parameters", "optimizer_state"):
        if key not in f:
            raise CheckpointCorruptError(
                f"legacy checkpoint {path} has no '{key}' dataset", {"path": str(path)}
            )
    for key in _REQUIRED_ATTRS:
        if key not in f.attrs:
            raise CheckpointCorruptError(
                f"legacy checkpoint {path} has no '{key}' attribute", {"path": str(path)}
            )
    blob = bytes(f["optimizer_state"][()])
    stored = f.attrs["checksum"]
    stored = stored.decode() if isinstance(stored, bytes) else str(stored)
    actual = hashlib.sha256(blob).hexdigest()
    if actual != stored:
        raise CheckpointCorruptError(
            f"legacy checkpoint {path}: checksum mismatch (file changed or corrupted)",
            {"path": str(path), "stored_checksum": stored, "computed_checksum": actual},
        )
    return blob


def validate_legacy(path: Path) -> None:
    """Raise ``CheckpointCorruptError`` unless ``path`` passes the legacy checks."""
    try:
        with _open(path) as f:
            _checked_pickle(f, path)
            f["parameters"].shape  # noqa: B018 - the dataset header must parse
    except CheckpointCorruptError:
        raise
    except Exception as exc:
        raise CheckpointCorruptError(
            f"legacy checkpoint {path} cannot be read: {exc}", {"path": str(path)}
        ) from exc


def read_legacy_summary(path: Path) -> tuple[int, float, float]:
    """``(batch_idx, loss, timestamp)`` from the attributes, nothing unpickled."""
    try:
        with _open(path) as f:
            return (
                int(f.attrs["batch_idx"]),
                float(f.attrs["loss"]),
                float(f.attrs.get("timestamp", 0.0)),
            )
    except Exception as exc:
        raise CheckpointCorruptError(
            f"legacy checkpoint {path} cannot be read: {exc}", {"path": str(path)}
        ) from exc


def load_legacy(path: Path, *, allow_pickle: bool, limits: LoadLimits) -> dict[str, Any]:
    """Load a legacy checkpoint into the same dictionary ``load_checkpoint`` returns."""
    try:
        with _open(path) as f:
            blob = _checked_pickle(f, path)
            if not allow_pickle:
                raise CheckpointPickleError(
                    f"{path} is a legacy checkpoint whose optimizer state is a pickle; "
                    "loading it needs allow_pickle=True (unpickling can run code: only do "
                    "it for files you trust)",
                    {"path": str(path)},
                )
            params_ds = f["parameters"]
            budget = limits.resolved_max_bytes(path.stat().st_size)
            if params_ds.size * params_ds.dtype.itemsize > budget:
                raise CheckpointCorruptError(
                    f"legacy checkpoint {path} declares a parameter array larger than "
                    "the load limit",
                    {"path": str(path)},
                )
            parameters = params_ds[()]
            metadata = _legacy_metadata(f)
            attrs = f.attrs
            batch_idx = int(attrs["batch_idx"])
            loss = float(attrs["loss"])
            version = attrs.get("version", "unknown")
            timestamp = float(attrs.get("timestamp", 0.0))
    except (CheckpointCorruptError, CheckpointPickleError):
        raise
    except Exception as exc:
        raise CheckpointCorruptError(
            f"legacy checkpoint {path} cannot be read: {exc}", {"path": str(path)}
        ) from exc
    try:
        optimizer_state = pickle.loads(blob)
    except Exception as exc:
        raise CheckpointCorruptError(
            f"legacy checkpoint {path}: the pickled optimizer state does not load: {exc}",
            {"path": str(path)},
        ) from exc
    return {
        "batch_idx": batch_idx,
        "parameters": parameters,
        "optimizer_state": optimizer_state,
        "loss": loss,
        "metadata": metadata,
        "version": version.decode() if isinstance(version, bytes) else str(version),
        "timestamp": timestamp,
    }


def _legacy_metadata(f: h5py.File) -> dict[str, Any]:
    """Metadata as the predecessor read it back (JSON strings parsed, arrays loaded)."""
    if "metadata" not in f:
        return {}
    group = f["metadata"]
    out: dict[str, Any] = {}
    for key, value in group.attrs.items():
        if isinstance(value, str):
            try:
                out[key] = json.loads(value)
            except (json.JSONDecodeError, TypeError):
                out[key] = value
        elif isinstance(value, np.generic):
            out[key] = value.item()
        else:
            out[key] = value
    for key in group:
        out[key] = group[key][()]
    return out
