"""Shared fixtures: seed-format files, built with h5py the way the predecessor writes."""

from __future__ import annotations

import hashlib
import json
import pickle
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest


def write_seed_checkpoint(
    directory: Path,
    batch_idx: int,
    parameters: np.ndarray,
    optimizer_state: Any,
    loss: float,
    metadata: dict[str, Any] | None = None,
    *,
    prefix: str = "homodyne_state",
    pickled: bytes | None = None,
) -> Path:
    """A file in the predecessor's layout: gzip parameters, pickled state, attrs."""
    path = Path(directory) / f"{prefix}_batch_{batch_idx:04d}.h5"
    blob = pickle.dumps(optimizer_state) if pickled is None else pickled
    with h5py.File(path, "w") as f:
        f.create_dataset("parameters", data=parameters, compression="gzip", compression_opts=4)
        f.create_dataset("optimizer_state", data=np.void(blob))
        f.attrs["batch_idx"] = batch_idx
        f.attrs["loss"] = loss
        f.attrs["checksum"] = hashlib.sha256(blob).hexdigest()
        f.attrs["version"] = "2.4.0"
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
    path.chmod(0o600)
    return path


@pytest.fixture
def seed_writer():
    return write_seed_checkpoint


@pytest.fixture
def ckpt_dir(tmp_path: Path) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    return d


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``jax`` run last: JAX starts threads in the test process, and a
    later test that forks (the fault and fork tests do) could deadlock."""
    items.sort(key=lambda item: item.get_closest_marker("jax") is not None)
