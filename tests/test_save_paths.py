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
import pytest

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


def _stored_filters(path: Path, name: str = "parameters") -> tuple:
    import h5py

    with h5py.File(path, "r") as f:
        ds = f[name]
        return ds.chunks, tuple(sorted(ds._filters))


def test_chunks_compressed_by_the_core_read_back_everywhere(ckpt_dir: Path):
    """Arrays whose Blosc chunks the Rust core writes: every dtype, shape and edge."""
    import h5py
    import hdf5plugin  # noqa: F401  (registers the Blosc filter for plain h5py)

    base = np.cumsum(np.random.default_rng(5).standard_normal(700_001))
    cases = {
        "f8": base,
        "f4": base.astype(np.float32),
        "f8_big_endian": base.astype(">f8"),
        "i2": (base * 10).astype(np.int16),
        "u1": (base * 3).astype(np.uint8),
        "bool": base > 0,
        "c16": base[:300_001] + 1j * base[1:300_002],
        "2d": base[:700_000].reshape(7000, 100),
        "3d": base[:699_840].reshape(270, 36, 72),
    }
    m = CheckpointManager(ckpt_dir, compression="lz4", keep_last_n=None)
    for i, (label, arr) in enumerate(cases.items(), start=1):
        path = m.save_checkpoint(i, arr, {"again": arr}, 0.0)
        data = m.load_checkpoint(path)
        for got in (data["parameters"], data["optimizer_state"]["again"]):
            assert got.dtype == arr.dtype and got.shape == arr.shape, label
            np.testing.assert_array_equal(got, arr, err_msg=label)
        chunks, filters = _stored_filters(path)
        assert chunks is not None and "32001" in filters, label  # Blosc
        # A plain h5py + hdf5plugin reader sees the same array (past the user block).
        with h5py.File(path, "r") as f:
            np.testing.assert_array_equal(f["parameters"][()], arr, err_msg=label)


def test_rows_too_long_for_a_chunk_take_the_hdf5_filter_path(ckpt_dir: Path):
    # One row of 2 MiB: chunks split the trailing axis, so they are not whole rows.
    arr = np.cumsum(np.random.default_rng(6).standard_normal((3, 262_144)), axis=1)
    m = CheckpointManager(ckpt_dir, compression="lz4")
    path = m.save_checkpoint(1, arr, {}, 0.0)
    np.testing.assert_array_equal(m.load_checkpoint(path)["parameters"], arr)
    chunks, filters = _stored_filters(path)
    assert chunks[1] < arr.shape[1] and "32001" in filters


def test_auto_compresses_smooth_and_stores_noise_raw(ckpt_dir: Path):
    rng = np.random.default_rng(7)
    smooth = np.cumsum(rng.standard_normal(BIG // 4))
    noise = rng.standard_normal(BIG // 4)
    m = CheckpointManager(ckpt_dir)  # compression "auto"
    path = m.save_checkpoint(1, smooth, {"noise": noise}, 0.0)
    assert _stored_filters(path)[0] is not None  # chunked, compressed
    assert _stored_filters(path, "optimizer_state/noise") == (None, ())  # raw
    data = m.load_checkpoint(path)
    np.testing.assert_array_equal(data["parameters"], smooth)
    np.testing.assert_array_equal(data["optimizer_state"]["noise"], noise)
    assert path.stat().st_size < 0.8 * (smooth.nbytes + noise.nbytes) + 0.5 * noise.nbytes


def test_native_blosc_frames_are_checked(tmp_path: Path):
    from h5ckpt import CheckpointValueError, _native

    data = np.arange(1000, dtype=np.float64)
    slot = _native.blosc_max_frame_len(4096)
    out = np.zeros(2 * slot, np.uint8)
    lengths = _native.blosc_compress_chunks(data[:1024], 4096, 8, out)
    assert len(lengths) == 2 and all(0 < n <= slot for n in lengths)
    with pytest.raises(CheckpointValueError):
        _native.blosc_compress_chunks(data, 4096, 8, np.zeros(10, np.uint8))  # too small
    with pytest.raises(CheckpointValueError):
        _native.blosc_compress_chunks(data, 4096, 8, bytes(3 * slot))  # read-only
    with pytest.raises(CheckpointValueError):
        _native.blosc_compress_chunks(data, 0, 8, out)
    overlap = np.zeros(4 * slot, np.uint8)
    with pytest.raises(CheckpointValueError):
        _native.blosc_compress_chunks(overlap[:100], 4096, 1, overlap[50:])
    assert 0.0 < _native.blosc_ratio(np.cumsum(np.ones(10_000)), 8) < 1.0


def test_loaded_large_arrays_are_independent_writable_arrays(ckpt_dir: Path):
    rng = np.random.default_rng(8)
    params = rng.standard_normal(BIG // 8)
    moments = rng.standard_normal((BIG // 16, 2)).astype(np.float32)
    m = CheckpointManager(ckpt_dir)
    path = m.save_checkpoint(1, params, {"m": moments, "v": params[:10].copy()}, 0.0)
    first = m.load_checkpoint(path)
    second = m.load_checkpoint(path)
    p1, m1 = first["parameters"], first["optimizer_state"]["m"]
    for arr in (p1, m1, first["optimizer_state"]["v"]):
        assert arr.flags.writeable and arr.flags.aligned and arr.flags.c_contiguous
    assert not np.shares_memory(p1, m1)
    assert not np.shares_memory(p1, second["parameters"])
    p1 += 1.0
    m1[:] = 0
    np.testing.assert_array_equal(second["parameters"], params)
    np.testing.assert_array_equal(second["optimizer_state"]["m"], moments)
    np.testing.assert_array_equal(first["optimizer_state"]["v"], params[:10])
    # The file is untouched by changes to loaded arrays.
    assert m.validate_checkpoint(path)


def test_read_payload_still_reads_bytes(ckpt_dir: Path):
    from h5ckpt import LoadLimits, _native
    from h5ckpt.payload import read_payload

    params = np.random.default_rng(9).standard_normal(BIG // 8)
    path = CheckpointManager(ckpt_dir).save_checkpoint(1, params, {"k": 1}, 0.0)
    fd = os.open(path, os.O_RDONLY)
    try:
        data = bytearray(os.fstat(fd).st_size)
        header = _native.read_verified_fd(fd, data, None, path)
    finally:
        os.close(fd)
    out = read_payload(bytes(data), header, allow_pickle=False, limits=LoadLimits())
    np.testing.assert_array_equal(out["parameters"], params)
    assert out["optimizer_state"] == {"k": 1}
