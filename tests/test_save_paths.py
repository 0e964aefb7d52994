"""The fast paths of saving and loading large states, on real files.

Large raw arrays are written by the Rust core in pieces with early writeback,
large files are read into huge-page backed memory, and retention frees the space
of large deleted files in the background. None of that may change what is saved,
loaded or deleted.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from h5ckpt import CheckpointManager

BIG = 3 * 1024 * 1024  # float64 elements: 24 MiB, above every fast-path threshold


def _deleted_fds_into(directory: Path) -> list[str]:
    """Descriptors of this process that point at deleted files of ``directory``."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(directory)) and target.endswith("(deleted)"):
            found.append(target)
    return found


def test_large_raw_and_compressible_arrays_round_trip(ckpt_dir: Path):
    rng = np.random.default_rng(0)
    params = rng.standard_normal(BIG)  # incompressible: written by the Rust core
    smooth = np.cumsum(rng.standard_normal(BIG // 2))  # compressible: chunked + filter
    ints = np.arange(BIG // 4, dtype=np.int32).reshape(-1, 3)
    for durable in (True, False):
        m = CheckpointManager(ckpt_dir / str(durable), durable=durable)
        path = m.save_checkpoint(1, params, {"smooth": smooth, "ints": ints}, 0.5)
        assert m.validate_checkpoint(path)
        data = m.load_checkpoint(path)
        np.testing.assert_array_equal(data["parameters"], params)
        np.testing.assert_array_equal(data["optimizer_state"]["smooth"], smooth)
        np.testing.assert_array_equal(data["optimizer_state"]["ints"], ints)
        assert data["parameters"].flags.writeable


def test_retention_deletes_large_files_at_once_and_frees_them(ckpt_dir: Path):
    params = np.random.default_rng(1).standard_normal(BIG)
    m = CheckpointManager(ckpt_dir, keep_last_n=1)
    for b in range(1, 5):
        m.save_checkpoint(b, params + b, {}, float(b))
        # The names are gone as soon as the save returns.
        assert sorted(p.name for p in ckpt_dir.glob("*.h5")) == [m.checkpoint_path(b).name]
    deleted = m.cleanup_old_checkpoints()
    assert deleted == []
    m.close()
    # Once the manager is closed, nothing of the deleted files is held open.
    assert _deleted_fds_into(ckpt_dir) == []
    np.testing.assert_array_equal(m.load_checkpoint(m.checkpoint_path(4))["parameters"], params + 4)


def test_next_save_waits_for_the_space_of_deleted_files(ckpt_dir: Path):
    params = np.random.default_rng(2).standard_normal(BIG)
    m = CheckpointManager(ckpt_dir, keep_last_n=1)
    m.save_checkpoint(1, params, {}, 1.0)
    m.save_checkpoint(2, params, {}, 2.0)  # deletes batch 1
    m.save_checkpoint(3, params, {}, 3.0)  # first waits until batch 1 is freed
    held = _deleted_fds_into(ckpt_dir)
    assert all("batch_0001" not in t for t in held), held
    m.close()
    assert _deleted_fds_into(ckpt_dir) == []


def test_cleanup_of_large_files_by_a_fresh_manager(ckpt_dir: Path):
    params = np.random.default_rng(3).standard_normal(BIG)
    writer = CheckpointManager(ckpt_dir, keep_last_n=None)
    for b in range(1, 5):
        writer.save_checkpoint(b, params, {}, float(b))
    with CheckpointManager(ckpt_dir, keep_last_n=2) as m:
        deleted = m.cleanup_old_checkpoints()
        assert [p.name for p in deleted] == [m.checkpoint_path(b).name for b in (1, 2)]
        assert not any(p.exists() for p in deleted)
        assert [i.batch_idx for i in m.list_checkpoints(verify=True)] == [3, 4]
    assert _deleted_fds_into(ckpt_dir) == []


def test_start_writeback_is_only_a_hint(tmp_path: Path):
    from h5ckpt import _native

    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"x" * 100_000)
        assert _native.start_writeback(fd) is None
        assert _native.start_writeback(fd, 4096, 8192) is None
        assert _native.start_writeback(fd, 1 << 40, 0) is None  # past the end
    finally:
        os.close(fd)
    assert _native.start_writeback(-1) is None  # invalid descriptors are ignored
    assert path.read_bytes() == b"x" * 100_000


def test_durable_and_fast_saves_write_the_same_payload(ckpt_dir: Path):
    smooth = np.cumsum(np.random.default_rng(4).standard_normal(BIG))
    loaded = []
    for durable in (True, False):
        m = CheckpointManager(ckpt_dir / str(durable), durable=durable)
        loaded.append(m.load_checkpoint(m.save_checkpoint(1, smooth, {}, 0.0))["parameters"])
    np.testing.assert_array_equal(loaded[0], smooth)
    np.testing.assert_array_equal(loaded[1], smooth)
