"""Every bad input gets a CheckpointError with context, and loses nothing."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from h5ckpt import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointManager,
    CheckpointNotFoundError,
    CheckpointValueError,
    CheckpointVersionError,
)


def _files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name != ".h5ckpt.lock")


@pytest.mark.parametrize("batch_idx", [-1, 1.5, "3", None, True, np.float64(2.0), 2**63])
def test_bad_batch_idx(ckpt_dir: Path, batch_idx):
    m = CheckpointManager(ckpt_dir)
    with pytest.raises(CheckpointValueError) as info:
        m.save_checkpoint(batch_idx, np.ones(2), {}, 0.0)
    assert "batch_idx" in str(info.value)
    assert isinstance(info.value.error_context, dict)
    assert _files(ckpt_dir) == []


def test_numpy_integer_batch_idx_is_fine(ckpt_dir: Path):
    m = CheckpointManager(ckpt_dir)
    assert m.save_checkpoint(np.int32(4), np.ones(2), {}, 0.0).name == "checkpoint_batch_0004.h5"


@pytest.mark.parametrize(
    "params",
    [np.array([object(), 1], dtype=object), np.array(["a", "b"]), {"a": 1}, "text"],
)
def test_bad_parameters(ckpt_dir: Path, params):
    m = CheckpointManager(ckpt_dir)
    m.save_checkpoint(1, np.ones(2), {}, 0.0)
    with pytest.raises(CheckpointValueError) as info:
        m.save_checkpoint(2, params, {}, 0.0)
    assert "parameters" in str(info.value)
    assert _files(ckpt_dir) == ["checkpoint_batch_0001.h5"]


@pytest.mark.parametrize(
    ("state", "where"),
    [
        ({"a": {"b": object()}}, "['a']['b']"),
        ({1: 2}, "optimizer_state"),
        ({"x": [1, {2, 3}]}, "['x'][1]"),
        ({"arr": np.array([None, 1], dtype=object)}, "['arr']"),
    ],
)
def test_unsupported_state_names_key_path(ckpt_dir: Path, state, where):
    m = CheckpointManager(ckpt_dir)
    with pytest.raises(CheckpointValueError) as info:
        m.save_checkpoint(1, np.ones(2), state, 0.0)
    assert where in str(info.value)
    assert _files(ckpt_dir) == []


def test_bad_loss(ckpt_dir: Path):
    m = CheckpointManager(ckpt_dir)
    with pytest.raises(CheckpointValueError):
        m.save_checkpoint(1, np.ones(2), {}, "low")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"checkpoint_frequency": 0},
        {"keep_last_n": 0},
        {"keep_last_n": -2},
        {"keep_every": 0},
        {"keep_best_n": -1},
        {"best_mode": "median"},
        {"prefix": ""},
        {"prefix": "a/b"},
        {"compression": "brotli"},
        {"hmac_key": b""},
        {"hmac_key": 5},
    ],
)
def test_bad_manager_arguments(ckpt_dir: Path, kwargs):
    with pytest.raises(CheckpointValueError):
        CheckpointManager(ckpt_dir, **kwargs)


def test_directory_that_cannot_be_created(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError) as info:
        CheckpointManager(blocker / "sub")
    assert "sub" in str(info.value)
    with pytest.raises(CheckpointError):
        CheckpointManager(blocker)


def test_directory_that_cannot_be_written(tmp_path: Path):
    d = tmp_path / "ro"
    d.mkdir()
    m = CheckpointManager(d)
    m.save_checkpoint(1, np.ones(2), {}, 0.0)
    # A read-only file system refuses even root; a bind-free way to get one is a
    # directory that is replaced by a file under the manager.
    os.rename(d, tmp_path / "moved")
    d.write_text("now a file")
    with pytest.raises(CheckpointError):
        m.save_checkpoint(2, np.ones(2), {}, 0.0)
    assert (tmp_path / "moved" / "checkpoint_batch_0001.h5").exists()


def test_missing_file(ckpt_dir: Path):
    m = CheckpointManager(ckpt_dir)
    with pytest.raises(CheckpointNotFoundError) as info:
        m.load_checkpoint(ckpt_dir / "nope.h5")
    assert isinstance(info.value, FileNotFoundError)
    assert info.value.error_context["path"].endswith("nope.h5")
    assert m.validate_checkpoint(ckpt_dir / "nope.h5") is False


@pytest.mark.parametrize(
    "content", [b"", b"hello world", b"\x00" * 4096, b"PK\x03\x04" + bytes(600)]
)
def test_foreign_file(ckpt_dir: Path, content):
    m = CheckpointManager(ckpt_dir)
    p = ckpt_dir / "checkpoint_batch_0001.h5"
    p.write_bytes(content)
    with pytest.raises(CheckpointCorruptError):
        m.load_checkpoint(p)
    assert m.validate_checkpoint(p) is False


def test_path_of_wrong_type_and_directory(ckpt_dir: Path):
    m = CheckpointManager(ckpt_dir)
    with pytest.raises(CheckpointValueError):
        m.load_checkpoint(12)
    with pytest.raises(CheckpointError):
        m.load_checkpoint(ckpt_dir)
    assert m.validate_checkpoint(12) is False
    assert m.validate_checkpoint(ckpt_dir) is False


def test_newer_major_format_version(ckpt_dir: Path):
    m = CheckpointManager(ckpt_dir)
    p = m.save_checkpoint(1, np.ones(2), {}, 0.0)
    raw = bytearray(p.read_bytes())
    raw[8:10] = (2).to_bytes(2, "little")
    p.write_bytes(bytes(raw))
    with pytest.raises(CheckpointVersionError) as info:
        m.load_checkpoint(p)
    assert "version" in str(info.value).lower()
    assert m.validate_checkpoint(p) is False
