"""Files on disk match docs/format.md, checked by an independent hashlib reader,
and any changed, missing or extra byte is caught before HDF5 sees the file."""

from __future__ import annotations

import hashlib
import hmac
import random
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest

from h5ckpt import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointManager,
    CheckpointVersionError,
)

MAGIC = b"\x89H5C\r\n\x1a\n"


def independent_verify(path: Path, key: bytes | None = None) -> dict:
    """docs/format.md, implemented from the text with hashlib alone."""
    raw = path.read_bytes()
    header = raw[:512]
    assert header[:8] == MAGIC
    major, minor, header_size = struct.unpack_from("<HHI", header, 8)
    offset, length, chunk_log2, flags, count = struct.unpack_from("<QQIIQ", header, 16)
    batch_idx, loss, timestamp = struct.unpack_from("<Qdd", header, 48)
    payload_digest, tag = header[72:104], header[104:136]
    assert (major, header_size, offset) == (1, 512, 512)
    assert header[136:480] == bytes(344)
    assert hashlib.sha256(header[:480]).digest() == header[480:512]
    assert len(raw) == offset + length
    size = 1 << chunk_log2
    assert count == -(-length // size)
    payload = raw[offset:]
    root = hashlib.sha256(struct.pack("<QQ", size, count))
    for i in range(count):
        root.update(hashlib.sha256(payload[i * size : (i + 1) * size]).digest())
    assert root.digest() == payload_digest
    if key is not None:
        assert flags & 1
        assert hmac.compare_digest(hmac.new(key, header[:104], hashlib.sha256).digest(), tag)
    else:
        assert flags & 1 or tag == bytes(32)
    return {"batch_idx": batch_idx, "loss": loss, "timestamp": timestamp, "minor": minor}


def small_state(batch: int) -> tuple[np.ndarray, dict, float, dict]:
    """The state of a streaming least-squares fit (7 parameters): a checkpoint of a
    few KB, which is built in memory and written whole."""
    rng = np.random.default_rng(batch)
    j = rng.standard_normal((64, 7))
    state = {
        "jtj": j.T @ j,
        "jtr": j.T @ rng.standard_normal(64),
        "n_points": 64 * (batch + 1),
        "step": batch,
        "lm_lambda": 1e-3,
        "history": rng.standard_normal(256),
    }
    meta = {"run": "xpcs-fit", "q_bins": 7, "batch_size": 4096, "started": 1.7e9}
    return rng.standard_normal(7), state, 0.375, meta


@pytest.fixture(params=["large", "small"])
def sample_file(ckpt_dir: Path, request: pytest.FixtureRequest) -> Path:
    m = CheckpointManager(ckpt_dir)
    if request.param == "small":
        params, state, _, meta = small_state(3)
        return m.save_checkpoint(42, params, state, 0.375, meta)
    rng = np.random.default_rng(5)
    params = rng.standard_normal(300_000)  # > 1 chunk, written raw by the Rust core
    state = {
        "smooth": np.cumsum(rng.standard_normal(200_000)),  # compressed
        "small": np.arange(10),
        "step": 3,
        "name": "adam",
    }
    return m.save_checkpoint(42, params, state, 0.375, {"run": "fmt"})


def test_file_matches_the_documented_format(sample_file: Path):
    fields = independent_verify(sample_file)
    assert fields["batch_idx"] == 42 and fields["loss"] == 0.375
    assert fields["minor"] == 0
    with h5py.File(sample_file, "r") as f:  # an ordinary HDF5 file for h5py
        assert f.userblock_size == 512
        assert int(f.attrs["batch_idx"]) == 42
        assert f["parameters"].shape in ((300_000,), (7,))


def test_keyed_file_matches_the_documented_format(ckpt_dir: Path):
    m = CheckpointManager(ckpt_dir, hmac_key=b"secret")
    p = m.save_checkpoint(1, np.ones(1000), {"a": 1}, 0.5)
    independent_verify(p, key=b"secret")
    with pytest.raises(AssertionError):
        independent_verify(p, key=b"other")


def _regions(path: Path) -> dict[str, tuple[int, int]]:
    """Byte ranges of the parts of a checkpoint file."""
    regions = {"header": (0, 512), "superblock": (512, 512 + 48)}
    raw = path.read_bytes()
    with h5py.File(path, "r") as f:

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and obj.id.get_storage_size():
                if obj.id.get_create_plist().get_layout() == h5py.h5d.COMPACT:
                    # In the object header: found by its bytes.
                    data = obj[()].tobytes()
                    off = raw.find(data, 512) if len(data) >= 16 else -1
                    if off > 0:
                        regions[f"compact dataset {name}"] = (off, off + len(data))
                elif obj.chunks is None:
                    off = obj.id.get_offset()
                    if off is not None:
                        regions[f"dataset {name}"] = (off, off + obj.id.get_storage_size())
                else:
                    info = obj.id.get_chunk_info(0)
                    regions[f"dataset {name} chunk 0"] = (
                        info.byte_offset,
                        info.byte_offset + info.size,
                    )

        f.visititems(visit)
    for attr in (b"h5ckpt_version", b"batch_idx", b"timestamp"):
        pos = raw.find(attr, 512)
        assert pos > 0
        regions[f"attribute {attr.decode()}"] = (pos - 16, pos + len(attr) + 16)
    regions["everything"] = (0, len(raw))
    return regions


def test_every_region_detects_a_flipped_bit(sample_file: Path, tmp_path: Path):
    rng = random.Random(11)
    original = sample_file.read_bytes()
    m = CheckpointManager(sample_file.parent, keep_last_n=None)
    checked = 0
    for name, (lo, hi) in _regions(sample_file).items():
        offsets = {lo, hi - 1, *(rng.randrange(lo, hi) for _ in range(6))}
        for off in sorted(offsets):
            bad = bytearray(original)
            bad[off] ^= 1 << rng.randrange(8)
            sample_file.write_bytes(bytes(bad))
            assert m.validate_checkpoint(sample_file) is False, (name, off)
            with pytest.raises(CheckpointCorruptError):
                m.load_checkpoint(sample_file)
            checked += 1
    sample_file.write_bytes(original)
    assert m.validate_checkpoint(sample_file)
    assert checked > 50


def test_every_byte_of_a_small_file_is_covered(ckpt_dir: Path):
    """A small checkpoint is built in memory and written whole: a flipped bit in any
    byte of it, header or payload, makes it invalid, and it does not load."""
    m = CheckpointManager(ckpt_dir, keep_last_n=None)
    path = m.save_checkpoint(5, *small_state(5))
    original = path.read_bytes()
    assert 512 < len(original) < 16384
    for off in range(len(original)):
        bad = bytearray(original)
        bad[off] ^= 1 << (off % 8)
        path.write_bytes(bytes(bad))
        assert m.validate_checkpoint(path) is False, off
        # A changed major version (bytes 8-9) may read as a newer format.
        expected = (CheckpointCorruptError, CheckpointVersionError) if off in (8, 9) else None
        with pytest.raises(expected or CheckpointCorruptError):
            m.load_checkpoint(path)
    path.write_bytes(original)
    assert m.validate_checkpoint(path)
    independent_verify(path)


@pytest.mark.parametrize("change", ["truncate", "append", "delete_byte", "insert_byte"])
def test_length_changes_are_detected(sample_file: Path, change: str):
    original = sample_file.read_bytes()
    m = CheckpointManager(sample_file.parent)
    rng = random.Random(change)
    cases = []
    if change == "truncate":
        cases = [original[: len(original) * k // 20] for k in range(20)]
    elif change == "append":
        cases = [original + b"\x00", original + bytes(4096), original + original[:100]]
    elif change == "delete_byte":
        for off in (0, 100, 511, 512, 2000, len(original) // 2, len(original) - 1):
            cases.append(original[:off] + original[off + 1 :])
    else:
        for off in (0, 511, 512, 3000, len(original) // 3, len(original)):
            cases.append(original[:off] + bytes([rng.randrange(256)]) + original[off:])
    for data in cases:
        sample_file.write_bytes(data)
        assert m.validate_checkpoint(sample_file) is False
        with pytest.raises(CheckpointError):
            m.load_checkpoint(sample_file)
