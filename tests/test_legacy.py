"""Files written by the predecessor load through the legacy path, pickle only on request."""

from __future__ import annotations

import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest

from h5ckpt import (
    CheckpointAuthenticationError,
    CheckpointCorruptError,
    CheckpointManager,
    CheckpointPickleError,
)


class _Boom:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_legacy_load_needs_allow_pickle(ckpt_dir: Path, seed_writer):
    state = {"iteration": 7, "m": np.arange(3.0)}
    p = seed_writer(ckpt_dir, 10, np.arange(4.0), state, 0.5, {"n": 3, "tags": ["a", "b"]})
    strict = CheckpointManager(ckpt_dir, prefix="homodyne_state")
    assert strict.validate_checkpoint(p)
    with pytest.raises(CheckpointPickleError) as info:
        strict.load_checkpoint(p)
    assert "allow_pickle=True" in str(info.value)
    trusting = CheckpointManager(ckpt_dir, prefix="homodyne_state", allow_pickle=True)
    data = trusting.load_checkpoint(p)
    assert data["batch_idx"] == 10 and data["loss"] == 0.5
    np.testing.assert_array_equal(data["parameters"], np.arange(4.0))
    assert data["optimizer_state"]["iteration"] == 7
    np.testing.assert_array_equal(data["optimizer_state"]["m"], np.arange(3.0))
    assert data["metadata"] == {"n": 3, "tags": ["a", "b"]}
    assert data["version"] == "2.4.0"


def test_legacy_listing_and_latest_never_unpickle(ckpt_dir: Path, seed_writer, tmp_path: Path):
    marker = tmp_path / "marker"
    blob = pickle.dumps(_Boom(marker))
    for b in (10, 20):
        seed_writer(ckpt_dir, b, np.ones(2), None, float(b), pickled=blob)
    m = CheckpointManager(ckpt_dir, prefix="homodyne_state", keep_last_n=None)
    infos = m.list_checkpoints(verify=True)
    assert [(i.batch_idx, i.status, i.loss) for i in infos] == [
        (10, "legacy", 10.0),
        (20, "legacy", 20.0),
    ]
    assert m.find_latest_checkpoint() == ckpt_dir / "homodyne_state_batch_0020.h5"
    assert m.validate_checkpoint(ckpt_dir / "homodyne_state_batch_0020.h5")
    with pytest.raises(CheckpointPickleError):
        m.load_latest()
    assert not marker.exists()


def test_legacy_checksum_mismatch(ckpt_dir: Path, seed_writer):
    p = seed_writer(ckpt_dir, 1, np.ones(2), {"a": 1}, 0.1)
    with h5py.File(p, "r+") as f:
        f.attrs["checksum"] = "0" * 64
    m = CheckpointManager(ckpt_dir, prefix="homodyne_state", allow_pickle=True)
    assert m.validate_checkpoint(p) is False
    with pytest.raises(CheckpointCorruptError):
        m.load_checkpoint(p)


def test_legacy_falls_back_past_invalid(ckpt_dir: Path, seed_writer):
    seed_writer(ckpt_dir, 1, np.ones(2), {"a": 1}, 0.1)
    bad = seed_writer(ckpt_dir, 2, np.ones(2), {"a": 2}, 0.1)
    raw = bad.read_bytes()
    bad.write_bytes(raw[: len(raw) // 2])  # truncated
    m = CheckpointManager(ckpt_dir, prefix="homodyne_state", allow_pickle=True)
    assert m.load_latest()["optimizer_state"] == {"a": 1}


def test_mixed_directory_new_saves_after_legacy(ckpt_dir: Path, seed_writer):
    seed_writer(ckpt_dir, 10, np.ones(2), {"a": 1}, 0.1)
    m = CheckpointManager(ckpt_dir, prefix="homodyne_state", keep_last_n=None)
    m.save_checkpoint(20, np.ones(2), {"a": 2}, 0.05)
    infos = m.list_checkpoints(verify=True)
    assert [(i.batch_idx, i.status) for i in infos] == [(10, "legacy"), (20, "valid")]
    assert m.load_latest()["optimizer_state"] == {"a": 2}


def test_keyed_manager_refuses_legacy(ckpt_dir: Path, seed_writer):
    p = seed_writer(ckpt_dir, 1, np.ones(2), {"a": 1}, 0.1)
    m = CheckpointManager(ckpt_dir, prefix="homodyne_state", hmac_key=b"k", allow_pickle=True)
    assert m.validate_checkpoint(p) is False
    assert m.find_latest_checkpoint() is None
    with pytest.raises(CheckpointAuthenticationError):
        m.load_checkpoint(p)
