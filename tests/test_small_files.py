"""Small checkpoints: built in memory (HDF5's in-memory driver), written whole by the
Rust core, loaded and validated from one in-memory image. The values, the HDF5 tree
and the verdicts are those of a checkpoint written through a file by HDF5."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from h5ckpt import (
    CheckpointCorruptError,
    CheckpointLimitError,
    CheckpointManager,
    LoadLimits,
    _native,
)
from h5ckpt.tree import TYPE_ATTR, values_equal
from test_format import independent_verify, small_state


def every_kind() -> dict:
    """One small value of every kind the tree stores."""
    return {
        "none": None,
        "flags": [True, False],
        "int": -(2**63),
        "bigint": 2**70,
        "float": -0.0,
        "nan": float("nan"),
        "text": "naïve ∑",
        "empty text": "",
        "surrogate": "a\ud800b",
        "nul": "a\x00b",
        "bytes": b"\x00\xff",
        "empty bytes": b"",
        "bytearray": bytearray(b"xyz"),
        "scalars": (np.float32(1.5), np.int8(-3), np.bool_(True), np.complex64(1 - 2j)),
        "arrays": {
            "f8": np.linspace(0, 1, 5),
            "0-d": np.array(3.25),
            "empty": np.zeros((0, 3)),
            "big-endian": np.arange(4, dtype=">i4"),
            "complex": np.array([1 + 1j, -2j]),
            "half": np.array([0.5, -1], dtype=np.float16),
            "bool": np.array([[True, False]]),
            "3-d": np.arange(24, dtype=np.uint16).reshape(2, 3, 4),
            "4 KiB": np.ones(512),
            "8 KiB": np.ones(1024),  # past the compact layout
        },
        "nested": [[], (), {}, {"a/b": {".hidden": [1, (2, 3)]}}, "%"],
    }


def hdf5_tree(path: Path) -> list[tuple]:
    """(path, kind, tag, dtype, shape) of every object of a checkpoint's payload."""
    out = []
    with h5py.File(path, "r") as f:
        out.append(("/", "root", sorted(f.attrs)))

        def visit(name, obj):
            tag = obj.attrs[TYPE_ATTR]
            if isinstance(obj, h5py.Dataset):
                out.append((name, "dataset", tag, obj.dtype.str, obj.shape, obj.compression))
            else:
                out.append((name, "group", tag, list(obj)))

        f.visititems(visit)
    return out


def layout(path: Path, name: str) -> int:
    with h5py.File(path, "r") as f:
        return f[name].id.get_create_plist().get_layout()


def test_every_kind_of_value_round_trips_as_through_the_file_writer(tmp_path: Path):
    params = np.arange(7.0)
    state, meta = every_kind(), {"run": "a", "labels": ["x", "y"]}
    in_memory = CheckpointManager(tmp_path / "memory")
    # With allow_pickle (none is needed here), HDF5 writes the file itself.
    through_file = CheckpointManager(tmp_path / "file", allow_pickle=True)
    small = in_memory.save_checkpoint(3, params, state, 0.5, meta)
    written = through_file.save_checkpoint(3, params, state, 0.5, meta)
    # The small one was built in memory: its parameters sit in their object header.
    assert layout(small, "parameters") == h5py.h5d.COMPACT
    assert layout(written, "parameters") == h5py.h5d.CONTIGUOUS
    assert layout(small, "optimizer_state/arrays/8 KiB") == h5py.h5d.CONTIGUOUS
    for path, manager in ((small, in_memory), (written, through_file)):
        independent_verify(path)
        assert manager.validate_checkpoint(path)
        data = manager.load_checkpoint(path)
        assert values_equal(data["parameters"], params)
        assert values_equal(data["optimizer_state"], state)
        assert values_equal(data["metadata"], meta)
        assert (data["batch_idx"], data["loss"]) == (3, 0.5)
        # Each reads the other's file the same way.
        other = through_file if manager is in_memory else in_memory
        assert values_equal(other.load_checkpoint(path)["optimizer_state"], state)
    # The same self-describing HDF5 tree, object for object.
    assert hdf5_tree(small) == hdf5_tree(written)


def test_fit_state_loads_exactly(tmp_path: Path):
    m = CheckpointManager(tmp_path, keep_last_n=3)
    for batch in range(1, 6):
        params, state, loss, meta = small_state(batch)
        path = m.save_checkpoint(batch, params, state, loss, meta)
        assert path.stat().st_size < 16384
        data = CheckpointManager(tmp_path).load_latest()
        assert data is not None and data["batch_idx"] == batch
        assert values_equal(data["parameters"], params)
        assert values_equal(data["optimizer_state"], state)
        assert values_equal(data["metadata"], meta)
    assert [i.batch_idx for i in m.list_checkpoints(verify=True)] == [3, 4, 5]


@pytest.mark.parametrize(
    "state",
    [
        {"big": np.arange(8192.0)},  # one array of 64 KiB
        {f"a{i}": np.full(7000, float(i)) for i in range(20)},  # 1.1 MB in all
    ],
    ids=["one large array", "many arrays past 1 MiB"],
)
def test_larger_states_are_written_by_hdf5_into_the_file(tmp_path: Path, state: dict):
    m = CheckpointManager(tmp_path, compression=None)
    path = m.save_checkpoint(1, np.ones(3), state, 0.0)
    assert layout(path, "parameters") == h5py.h5d.CONTIGUOUS  # not built in memory
    assert values_equal(m.load_checkpoint(path)["optimizer_state"], state)
    independent_verify(path)


def test_small_file_past_the_limits_is_refused_as_before(tmp_path: Path):
    """Loading a small file from memory checks the same limits as any other."""
    m = CheckpointManager(tmp_path)
    path = m.save_checkpoint(1, np.ones(3), {"deep": [[[[1]]]], "n": list(range(50))}, 0.0)
    for limits in (
        LoadLimits(max_depth=3),
        LoadLimits(max_nodes=20),
        LoadLimits(max_array_bytes=8),
    ):
        strict = CheckpointManager(tmp_path, load_limits=limits, read_only=True)
        assert not strict.validate_checkpoint(path)
        with pytest.raises(CheckpointLimitError):
            strict.load_checkpoint(path)
    assert m.validate_checkpoint(path)


def test_a_payload_that_does_not_parse_is_invalid(tmp_path: Path):
    """A small file whose digests are right but whose HDF5 image is not (rewritten
    and sealed again, as a tool without h5ckpt could) is invalid and does not load,
    parsed from memory as from a file."""
    m = CheckpointManager(tmp_path)
    path = m.save_checkpoint(2, np.ones(3), {"x": 1}, 0.0)
    image = bytearray(path.read_bytes()[512:])
    image[60:120] = bytes(60)  # inside the root group's object header
    header = _native.read_header(path)
    path.unlink()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        _native.seal_image(fd, bytes(image), 2, header.loss, header.timestamp)
    finally:
        os.close(fd)
    independent_verify(path)  # the digests are those of the bytes
    assert not m.validate_checkpoint(path)
    with pytest.raises(CheckpointCorruptError):
        m.load_checkpoint(path)
