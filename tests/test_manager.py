"""The public API of CheckpointManager, on real files."""

from __future__ import annotations

import copy
import errno
import logging
import os
import pickle
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

import h5ckpt
from h5ckpt import (
    CheckpointError,
    CheckpointInfo,
    CheckpointManager,
    CheckpointNotFoundError,
    CheckpointStorageError,
)
from h5ckpt.tree import values_equal


def _state(n: int = 8) -> dict:
    return {
        "iteration": 42,
        "lr": 1e-3,
        "momentum": np.linspace(0, 1, n),
        "history": [1.0, 0.5, 0.25],
        "shape": (3, 4),
        "flag": True,
        "note": None,
    }


def test_public_names():
    for name in ("CheckpointManager", "CheckpointError", "CheckpointInfo", "LoadLimits"):
        assert name in h5ckpt.__all__
        assert hasattr(h5ckpt, name)
    assert isinstance(h5ckpt.__version__, str) and h5ckpt.__version__


def test_save_load_round_trip(ckpt_dir: Path):
    m = CheckpointManager(ckpt_dir)
    params = np.arange(12, dtype=np.float32).reshape(3, 4)
    meta = {"run": "xpcs", "q": np.int64(7), "none": None, "pair": (1, "2"), "s": "123"}
    path = m.save_checkpoint(10, params, _state(), 0.125, metadata=meta)
    assert path == ckpt_dir / "checkpoint_batch_0010.h5"
    data = m.load_checkpoint(path)
    assert set(data) == {
        "batch_idx",
        "parameters",
        "optimizer_state",
        "loss",
        "metadata",
        "version",
        "timestamp",
    }
    assert data["batch_idx"] == 10 and type(data["batch_idx"]) is int
    assert data["loss"] == 0.125 and type(data["loss"]) is float
    assert data["parameters"].dtype == np.float32 and data["parameters"].shape == (3, 4)
    np.testing.assert_array_equal(data["parameters"], params)
    assert values_equal(data["optimizer_state"], _state())
    assert values_equal(data["metadata"], meta)
    assert data["version"] == h5ckpt.__version__
    assert abs(data["timestamp"] - os.stat(path).st_mtime) < 60


def test_positional_calls_in_seed_order_and_str_paths(ckpt_dir: Path):
    m = CheckpointManager(str(ckpt_dir), 5, 2, False)
    assert (m.checkpoint_frequency, m.keep_last_n, m.enable_compression) == (5, 2, False)
    path = m.save_checkpoint(3, np.ones(4), {"a": 1}, 1.5, {"m": 1})
    assert m.validate_checkpoint(str(path)) and m.validate_checkpoint(path)
    assert m.load_checkpoint(str(path))["metadata"] == {"m": 1}
    assert m.load_checkpoint(path)["optimizer_state"] == {"a": 1}


def test_metadata_none_loads_as_empty_dict(ckpt_dir: Path):
    m = CheckpointManager(ckpt_dir)
    path = m.save_checkpoint(0, np.zeros(2), {}, 0.0)
    assert m.load_checkpoint(path)["metadata"] == {}


@pytest.mark.parametrize(
    "params",
    [
        [1.0, 2.0, 3.0],
        np.arange(20.0).reshape(4, 5)[:, ::2],  # non-contiguous view
        np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        np.array(3.5),
        np.zeros((0, 3)),
        np.arange(10, dtype=np.int16),
        np.array([True, False]),
        np.array([1 + 2j, 3 - 4j], dtype=np.complex64),
        np.arange(4, dtype=">f8"),
    ],
)
def test_parameters_keep_dtype_and_shape(ckpt_dir: Path, params):
    m = CheckpointManager(ckpt_dir)
    expected = np.asarray(params)
    data = m.load_checkpoint(m.save_checkpoint(1, params, {}, 0.0))
    assert data["parameters"].dtype == expected.dtype
    assert data["parameters"].shape == expected.shape
    np.testing.assert_array_equal(data["parameters"], expected)


@pytest.mark.parametrize("compression", ["auto", "lz4", "zstd", "gzip", None])
@pytest.mark.parametrize("kind", ["smooth", "random"])
def test_large_arrays_every_codec(ckpt_dir: Path, compression, kind):
    rng = np.random.default_rng(1)
    n = 300_000
    arr = np.cumsum(rng.standard_normal(n)) if kind == "smooth" else rng.standard_normal(n)
    state = {"m": arr[::-1].copy(), "v": arr.reshape(600, 500).astype(np.float32)}
    m = CheckpointManager(ckpt_dir, compression=compression)
    path = m.save_checkpoint(2, arr, state, 1.0)
    assert m.validate_checkpoint(path)
    data = m.load_checkpoint(path)
    np.testing.assert_array_equal(data["parameters"], arr)
    assert values_equal(data["optimizer_state"], state)


def test_auto_compression_shrinks_smooth_and_keeps_random_raw(ckpt_dir: Path):
    rng = np.random.default_rng(2)
    smooth = np.cumsum(rng.standard_normal(1_000_000))
    noise = rng.standard_normal(1_000_000)
    m = CheckpointManager(ckpt_dir)
    a = m.save_checkpoint(1, smooth, {}, 0.0)
    b = m.save_checkpoint(2, noise, {}, 0.0)
    assert a.stat().st_size < 0.85 * smooth.nbytes
    assert noise.nbytes <= b.stat().st_size < noise.nbytes * 1.01
    off = CheckpointManager(ckpt_dir / "off", enable_compression=False)
    c = off.save_checkpoint(1, smooth, {}, 0.0)
    assert c.stat().st_size >= smooth.nbytes


def test_files_get_the_umask_mode_and_no_temp_files_remain(ckpt_dir: Path):
    m = CheckpointManager(ckpt_dir)
    path = m.save_checkpoint(7, np.ones(3), {}, 0.0)
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    assert not [p for p in ckpt_dir.iterdir() if p.name.endswith(".tmp")]


def test_saving_over_existing_name_and_symlink(ckpt_dir: Path, tmp_path: Path):
    m = CheckpointManager(ckpt_dir)
    m.save_checkpoint(5, np.ones(3), {}, 1.0)
    path = m.save_checkpoint(5, np.full(3, 2.0), {}, 0.5)
    np.testing.assert_array_equal(m.load_checkpoint(path)["parameters"], np.full(3, 2.0))
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched")
    link = m.checkpoint_path(6)
    link.symlink_to(victim)
    saved = m.save_checkpoint(6, np.ones(2), {}, 0.0)
    assert victim.read_text() == "untouched"
    assert not saved.is_symlink() and m.validate_checkpoint(saved)


def test_should_save():
    m = CheckpointManager.__new__(CheckpointManager)
    m.checkpoint_frequency = 10
    assert [b for b in range(35) if m.should_save(b)] == [0, 10, 20, 30]


def test_find_latest_and_load_latest(ckpt_dir: Path):
    m = CheckpointManager(ckpt_dir, keep_last_n=None)
    assert m.find_latest_checkpoint() is None and m.load_latest() is None
    for b in (10, 20, 30):
        m.save_checkpoint(b, np.full(2, float(b)), {"b": b}, float(b))
    assert m.find_latest_checkpoint() == m.checkpoint_path(30)
    # Corrupt the two newest: the latest valid is batch 10.
    for b in (20, 30):
        p = m.checkpoint_path(b)
        raw = bytearray(p.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        p.write_bytes(bytes(raw))
    fresh = CheckpointManager(ckpt_dir, keep_last_n=None)
    assert fresh.find_latest_checkpoint() == m.checkpoint_path(10)
    assert fresh.load_latest()["optimizer_state"] == {"b": 10}


def test_list_checkpoints(ckpt_dir: Path):
    m = CheckpointManager(ckpt_dir, keep_last_n=None)
    for b, loss in ((1, 0.75), (2, 0.5), (3, 0.25)):
        m.save_checkpoint(b, np.ones(4), {}, loss)
    (ckpt_dir / "checkpoint_batch_0004.h5").write_bytes(b"not a checkpoint")
    (ckpt_dir / "other_batch_0001.h5").write_bytes(b"ignored")
    infos = CheckpointManager(ckpt_dir, keep_last_n=None).list_checkpoints()
    assert all(isinstance(i, CheckpointInfo) for i in infos)
    assert [i.batch_idx for i in infos] == [1, 2, 3, 4]
    assert [i.status for i in infos] == ["unverified"] * 3 + ["invalid"]
    assert [i.loss for i in infos[:3]] == [0.75, 0.5, 0.25]
    assert all(i.size_bytes == i.path.stat().st_size for i in infos)
    verified = m.list_checkpoints(verify=True)
    assert [i.status for i in verified] == ["valid"] * 3 + ["invalid"]
    assert verified[0].is_valid and not verified[3].is_valid


def test_listing_goes_by_batch_number_and_the_whole_prefix(tmp_path: Path):
    d = tmp_path / "d"
    run = CheckpointManager(d, prefix="run", keep_last_n=None)
    for b in (5, 9999, 10_000):
        run.save_checkpoint(b, np.full(2, float(b)), {}, float(b))
    # Prefixes that "run" starts, or that start with "run" (one of them even with
    # "run_batch_1", as "run_batch_10000.h5" does), name other managers' files.
    others = {}
    for b, prefix in enumerate(("ru", "runx", "run_batch_1", "my run é"), start=1):
        others[prefix] = CheckpointManager(d, prefix=prefix, keep_last_n=None)
        others[prefix].save_checkpoint(b, np.ones(2), {}, 0.0)
    # By number: by name, "run_batch_10000.h5" comes before "run_batch_9999.h5".
    fresh = CheckpointManager(d, prefix="run", keep_last_n=None)
    for m in (run, fresh):
        assert [i.batch_idx for i in m.list_checkpoints()] == [5, 9999, 10_000]
        assert m.find_latest_checkpoint() == run.checkpoint_path(10_000)
    assert fresh.load_latest()["batch_idx"] == 10_000
    for b, m in enumerate(others.values(), start=1):
        assert [i.path for i in m.list_checkpoints(verify=True)] == [m.checkpoint_path(b)]


def test_listing_under_names_that_are_not_utf8(tmp_path: Path):
    d = tmp_path / os.fsdecode(b"run-\xff")
    m = CheckpointManager(d, keep_last_n=None)
    saved = m.save_checkpoint(3, np.ones(2), {}, 0.5)
    # A file name that is not UTF-8 is no checkpoint's and does not stop the listing.
    (d / os.fsdecode(b"checkpoint_batch_0004\xff.h5")).write_bytes(saved.read_bytes())
    fresh = CheckpointManager(d, keep_last_n=None)
    (info,) = fresh.list_checkpoints(verify=True)
    assert (info.path, info.status) == (saved, "valid")
    assert os.fsencode(info.path) == os.fsencode(tmp_path) + b"/run-\xff/checkpoint_batch_0003.h5"
    assert fresh.find_latest_checkpoint() == saved


def test_listing_a_directory_that_vanished_or_became_a_file(tmp_path: Path):
    d = tmp_path / "d"
    m = CheckpointManager(d)
    m.save_checkpoint(1, np.ones(2), {}, 0.0)
    shutil.rmtree(d)
    for call in (m.list_checkpoints, m.find_latest_checkpoint):
        with pytest.raises(CheckpointNotFoundError) as info:
            call()
        assert info.value.error_context["path"] == str(d)
    d.write_bytes(b"")
    with pytest.raises(CheckpointStorageError) as info:
        m.list_checkpoints()
    assert info.value.error_context["errno"] == errno.ENOTDIR


def test_checkpoint_info_is_an_immutable_value(ckpt_dir: Path):
    m = CheckpointManager(ckpt_dir, keep_last_n=None)
    m.save_checkpoint(5, np.ones(4), {}, 0.5)
    (info,) = m.list_checkpoints()
    assert isinstance(info.path, Path) and info.path == m.checkpoint_path(5)
    assert info.path is info.path  # made once
    assert (info.status, info.verified, info.error, info.is_valid) == ("valid", True, None, True)
    with pytest.raises(AttributeError):
        info.status = "invalid"  # type: ignore[misc]
    same = CheckpointInfo(
        str(info.path), 5, 0.5, info.timestamp, info.size_bytes, "valid", True, None
    )
    assert same == info and hash(same) == hash(info)
    assert (same != info) is False  # __ne__ follows __eq__
    assert same != CheckpointInfo(info.path, 5, 0.5, info.timestamp, 1, "valid", True)
    assert info != "checkpoint_batch_0005.h5"
    nan = CheckpointInfo("x_batch_1.h5", 1, float("nan"), float("nan"), 0, "unverified")
    assert nan == CheckpointInfo("x_batch_1.h5", 1, float("nan"), float("nan"), 0, "unverified")
    assert not nan.is_valid and not nan.verified
    assert repr(nan) == (
        "CheckpointInfo(path=PosixPath('x_batch_1.h5'), batch_idx=1, loss=nan, "
        "timestamp=nan, size_bytes=0, status='unverified', verified=False, error=None)"
    )
    assert CheckpointInfo.__module__ == "h5ckpt"
    for copied in (pickle.loads(pickle.dumps(info)), copy.copy(info), copy.deepcopy(nan)):
        assert isinstance(copied, CheckpointInfo) and isinstance(copied.path, Path)
    assert pickle.loads(pickle.dumps(info)) == info
    assert pickle.loads(pickle.dumps(nan)) == nan
    with pytest.raises(CheckpointError, match="status must be"):
        CheckpointInfo("x_batch_1.h5", 1, 0.0, 0.0, 0, "ok")
    with pytest.raises(CheckpointError, match="batch_idx"):
        CheckpointInfo("x_batch_1.h5", -1, 0.0, 0.0, 0, "valid")


def test_cleanup_keeps_last_n_valid(ckpt_dir: Path):
    m = CheckpointManager(ckpt_dir, keep_last_n=2, auto_cleanup=False)
    for b in range(5):
        m.save_checkpoint(b, np.ones(2), {}, 1.0)
    deleted = m.cleanup_old_checkpoints()
    assert sorted(p.name for p in deleted) == [f"checkpoint_batch_000{b}.h5" for b in (0, 1, 2)]
    assert sorted(p.name for p in ckpt_dir.glob("*.h5")) == [
        "checkpoint_batch_0003.h5",
        "checkpoint_batch_0004.h5",
    ]


def test_auto_cleanup_after_save(ckpt_dir: Path):
    m = CheckpointManager(ckpt_dir, keep_last_n=2)
    for b in range(6):
        m.save_checkpoint(b, np.ones(2), {}, 1.0)
    assert [i.batch_idx for i in m.list_checkpoints()] == [4, 5]


def test_context_manager(ckpt_dir: Path):
    with CheckpointManager(ckpt_dir) as m:
        m.save_checkpoint(1, np.ones(2), {}, 0.0)
    assert m.validate_checkpoint(m.checkpoint_path(1))


def test_async_save_snapshots_and_orders(ckpt_dir: Path):
    params = np.zeros(100_000)
    with CheckpointManager(ckpt_dir, keep_last_n=None) as m:
        futures = []
        for b in range(4):
            params[:] = b
            futures.append(m.save_checkpoint_async(b, params, {"m": params}, float(b)))
            params[:] = -1  # changed right after the call: the snapshot must not see it
        m.wait_until_finished()
        assert [f.result() for f in futures] == [m.checkpoint_path(b) for b in range(4)]
    for b in range(4):
        data = m.load_checkpoint(m.checkpoint_path(b))
        assert np.all(data["parameters"] == b) and np.all(data["optimizer_state"]["m"] == b)


def test_async_error_surfaces(ckpt_dir: Path):
    m = CheckpointManager(ckpt_dir)
    fut = m.save_checkpoint_async(1, np.ones(2), {}, 0.0)
    assert fut.result() == m.checkpoint_path(1)
    shutil.rmtree(ckpt_dir)  # the directory vanishes under a running manager
    fut = m.save_checkpoint_async(2, np.ones(2), {}, 0.0)
    with pytest.raises(CheckpointError) as info:
        fut.result()
    assert isinstance(info.value.error_context, dict)
    with pytest.raises(CheckpointError):
        m.wait_until_finished()


def test_logging_goes_to_h5ckpt_logger(ckpt_dir: Path, caplog, capsys):
    with caplog.at_level(logging.INFO, logger="h5ckpt"):
        m = CheckpointManager(ckpt_dir)
        m.load_checkpoint(m.save_checkpoint(1, np.ones(2), {}, 0.0))
    assert any(r.name == "h5ckpt" and "saved" in r.getMessage() for r in caplog.records)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
