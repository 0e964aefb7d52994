"""File-system faults: a full disk, a file size limit, a read-only directory, an
unreadable file, the directory removed under a running manager. Each is a real
fault: a size-limited tmpfs mounted by the test (as root where mounting works),
RLIMIT_FSIZE, a read-only remount, mode bits enforced on a process without the
capabilities that let root ignore them. Every failure is a clear CheckpointError,
no temp file is left, and every earlier checkpoint still loads."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest

import faultkit
from h5ckpt import (
    CheckpointError,
    CheckpointManager,
    CheckpointNotFoundError,
    CheckpointPermissionError,
    CheckpointStorageError,
)

CAN_MOUNT_REASON = (
    "mounting a tmpfs needs root and a sandbox that allows mount; the same feature is "
    "tested without mounting by the RLIMIT_FSIZE / permission-bit variants"
)


@pytest.fixture(scope="module")
def mountable(tmp_path_factory: pytest.TempPathFactory) -> bool:
    return faultkit.can_mount(tmp_path_factory.mktemp("probe") / "m")


def _save(m: CheckpointManager, batch: int, kind: str = "small") -> Path:
    if kind == "raw":  # 4 MB, written by the Rust core
        return m.save_checkpoint(batch, faultkit.params_for(batch), {"step": batch}, 0.5)
    if kind == "compressed":  # 16 MB compressing to a few MB, written by HDF5
        return m.save_checkpoint(batch, np.ones(4), faultkit.compressible_state(), 0.5)
    return m.save_checkpoint(batch, faultkit.params_for(batch, 1000), {"step": batch}, 0.5)


def _intact(d: Path, batches: list[int]) -> None:
    """Exactly these checkpoints, all loading with their content, and no temp file."""
    fresh = CheckpointManager(d, keep_last_n=None)
    assert faultkit.temp_names(d) == []
    assert [faultkit.batch_of(n) for n in faultkit.checkpoint_names(d)] == batches
    for b in batches:
        data = fresh.load_checkpoint(fresh.checkpoint_path(b))
        assert data["batch_idx"] == b and data["optimizer_state"].get("step", b) == b
    latest = fresh.find_latest_checkpoint()
    assert latest == fresh.checkpoint_path(batches[-1])


# ---------------------------------------------------------------------- full disk


def test_full_disk_on_a_small_tmpfs(tmp_path: Path, mountable: bool):
    if not mountable:
        faultkit.unavailable(CAN_MOUNT_REASON)
    with faultkit.tmpfs(tmp_path / "mnt", "32m") as mnt:
        d = mnt / "ckpt"
        m = CheckpointManager(d, keep_last_n=None)
        _save(m, 1)
        _save(m, 2)
        # Full to the last byte, a page left, a few chunks left, 1 MiB left: the
        # failure hits HDF5's metadata, its filtered chunks, or the Rust core's
        # writes of raw arrays.
        for leave in (0, 4096, 256 * 1024, 2**20):
            filler = faultkit.fill(mnt, leave)
            for kind in ("raw", "compressed"):
                with pytest.raises(CheckpointStorageError) as info:
                    _save(m, 3, kind)
                assert info.value.error_context.get("errno") in (errno.ENOSPC, None)
                assert "No space left" in str(info.value)
                _intact(d, [1, 2])
            filler.unlink()
        # Space freed: the next saves succeed.
        _save(m, 3, "raw")
        _save(m, 4, "compressed")
        _intact(d, [1, 2, 3, 4])
        assert np.array_equal(
            m.load_checkpoint(d / "checkpoint_batch_0003.h5")["parameters"], faultkit.params_for(3)
        )


def test_save_past_the_file_size_limit():
    """RLIMIT_FSIZE (works without root or mount): the kernel refuses the write
    with EFBIG, whichever writer (HDF5 or the Rust core) hits it."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "ckpt"
        proc = faultkit.run_child("fsize", str(d))
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = json.loads(proc.stdout.strip().splitlines()[-1])
    for kind in ("raw", "compressed", "tiny"):
        assert report[kind] == "CheckpointStorageError", report
        assert report[f"{kind} temp files"] == []
        assert report[f"{kind} names"] == ["checkpoint_batch_0001.h5", "checkpoint_batch_0002.h5"]
        assert report[f"{kind} latest"] == "checkpoint_batch_0002.h5"
        assert report[f"{kind} earlier load"] == [1, 2]
    assert report["after"] == 3  # limit lifted: the save succeeds


# -------------------------------------------------------------------- permissions


def test_read_only_mount(tmp_path: Path, mountable: bool):
    if not mountable:
        faultkit.unavailable(CAN_MOUNT_REASON)
    with faultkit.tmpfs(tmp_path / "mnt", "16m") as mnt:
        d = mnt / "ckpt"
        m = CheckpointManager(d, keep_last_n=1)
        _save(m, 1)
        m2 = CheckpointManager(d, keep_last_n=None)
        _save(m2, 2)
        faultkit.remount(mnt, "ro")
        try:
            with pytest.raises(CheckpointPermissionError) as info:
                _save(m, 3)
            assert "Read-only" in str(info.value)
            with pytest.raises(CheckpointPermissionError):
                m.cleanup_old_checkpoints()  # would delete batch 1: refused, not half done
            reader = CheckpointManager(d, keep_last_n=1)  # opening a read-only directory works
            assert [i.status for i in reader.list_checkpoints(verify=True)] == ["valid"] * 2
            assert reader.load_latest()["batch_idx"] == 2
            assert reader.validate_checkpoint(d / "checkpoint_batch_0001.h5")
        finally:
            faultkit.remount(mnt, "rw")
        _intact(d, [1, 2])
        _save(m, 3)
        assert faultkit.checkpoint_names(d) == ["checkpoint_batch_0003.h5"]


@pytest.fixture
def enforced(tmp_path: Path) -> Path:
    """A directory of three checkpoints and an unreadable probe file beside it."""
    d = tmp_path / "ckpt"
    m = CheckpointManager(d, keep_last_n=None)
    for b in (1, 2, 3):
        _save(m, b)
    probe = tmp_path / "probe"
    probe.write_text("secret")
    probe.chmod(0)
    return d


def test_read_only_directory_by_mode_bits(enforced: Path):
    d = enforced
    d.chmod(0o555)
    try:
        report = faultkit.run_unprivileged("perm", "readonly", str(d))
    finally:
        d.chmod(0o755)
    assert report["enforced"], report
    assert report["save"] == "CheckpointPermissionError"
    assert report["cleanup"] in ("ok", "CheckpointPermissionError")
    assert set(report["validate"].values()) == {True}
    assert set(report["listed"].values()) == {"valid"}
    assert report["latest"] == "checkpoint_batch_0003.h5"
    assert report["load_latest"] == 3
    _intact(d, [1, 2, 3])


def test_unreadable_file(enforced: Path):
    d = enforced
    newest = d / "checkpoint_batch_0003.h5"
    newest.chmod(0)
    report = faultkit.run_unprivileged("perm", newest.name, str(d))
    assert report["enforced"], report
    assert report["load unreadable"] == "CheckpointPermissionError"
    assert report["save"] == "ok"
    assert report["cleanup"] == "ok"
    assert report["validate"] == {
        "checkpoint_batch_0001.h5": True,
        "checkpoint_batch_0002.h5": True,
        "checkpoint_batch_0003.h5": False,
        "checkpoint_batch_0009.h5": True,
    }
    # A file that cannot be read is not known to be bad: not invalid (retention
    # with delete_invalid would delete it), just not verified.
    assert report["listed"]["checkpoint_batch_0003.h5"] == "unverified"
    assert report["latest"] == "checkpoint_batch_0009.h5"
    newest.chmod(0o600)
    _intact(d, [1, 2, 3, 9])  # the unreadable file was kept, nothing else lost


def test_directory_removed_under_a_running_manager(tmp_path: Path):
    d = tmp_path / "ckpt"
    other = CheckpointManager(tmp_path / "other")
    _save(other, 1)
    m = CheckpointManager(d, keep_last_n=2)
    path = _save(m, 1)
    shutil.rmtree(d)
    for call in (
        lambda: _save(m, 2),
        m.list_checkpoints,
        m.find_latest_checkpoint,
        m.load_latest,
        m.cleanup_old_checkpoints,
        lambda: m.load_checkpoint(path),
    ):
        with pytest.raises(CheckpointNotFoundError) as info:
            call()
        assert str(d) in str(info.value)
    assert m.validate_checkpoint(path) is False
    _intact(tmp_path / "other", [1])
    # A manager opened again recreates the directory and works.
    _save(CheckpointManager(d), 2)
    _intact(d, [2])


def test_directory_removed_while_saves_run(tmp_path: Path):
    """A saver thread meets its directory vanishing mid-save: only CheckpointErrors."""
    d = tmp_path / "ckpt"
    m = CheckpointManager(d, keep_last_n=2)
    _save(m, 0)
    unexpected: list[BaseException] = []
    errors: list[CheckpointError] = []
    stop = threading.Event()

    def saver() -> None:
        batch = 1
        while not stop.is_set():
            try:
                _save(m, batch, "raw")
            except CheckpointError as exc:
                errors.append(exc)
            except BaseException as exc:
                unexpected.append(exc)
            batch += 1

    t = threading.Thread(target=saver)
    t.start()
    while len(errors) < 3 and t.is_alive():
        if d.exists():
            shutil.rmtree(d, ignore_errors=True)
    stop.set()
    t.join()
    assert unexpected == []
    assert all(isinstance(e, (CheckpointNotFoundError, CheckpointStorageError)) for e in errors)
    os.makedirs(d, exist_ok=True)
    _save(CheckpointManager(d), 99)
    assert faultkit.temp_names(d) == []
