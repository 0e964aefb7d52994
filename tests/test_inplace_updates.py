"""A save while the caller changes its arrays in place, and what the digest covers.

The digest of a checkpoint must cover exactly the bytes in the file: what the caller
changed during a save may land in the file torn (some chunks from before an update,
some from after), but the committed file always verifies, so neither the saving
manager, a fresh one, nor retention is misled. And ``list_checkpoints(verify=True)``
hashes the files again instead of answering from what the manager remembers.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from h5ckpt import CheckpointManager

#: 64 MB of random int64: incompressible, so stored raw and written by the Rust core.
RAW_INTS = 8_000_000


def _random_ints(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**62, n, dtype=np.int64)


class InPlaceUpdater:
    """Another thread doing ``np.add(arr, 1, out=arr)`` in a loop (the GIL is
    released inside numpy), counting its passes."""

    def __init__(self, arr: np.ndarray) -> None:
        self.arr = arr
        self.passes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            np.add(self.arr, 1, out=self.arr)
            self.passes += 1

    def __enter__(self) -> InPlaceUpdater:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _filter_count(f: h5py.File, name: str) -> int:
    found: list[h5py.Dataset] = []
    f.visititems(lambda key, obj: found.append(obj) if key.endswith(name) else None)
    return found[0].id.get_create_plist().get_nfilters()


def _statuses(m: CheckpointManager) -> dict[int, str]:
    return {i.batch_idx: i.status for i in m.list_checkpoints(verify=True)}


def _assert_whole_updates_of(loaded: np.ndarray, base: np.ndarray, most: int) -> None:
    """Every element is ``base + k`` for a whole number of updates ``0 <= k <= most``:
    torn between updates, never garbage."""
    k = loaded - base
    if k.dtype.kind == "f":
        assert np.allclose(k, np.round(k), atol=1e-6)
    assert k.min() > -0.5 and k.max() < most + 0.5


def test_save_racing_an_in_place_update_commits_files_that_verify(tmp_path: Path):
    directory = tmp_path / "ckpt"
    m = CheckpointManager(directory, keep_last_n=2)
    base = _random_ints(0, RAW_INTS)
    for batch in (1, 2):
        m.save_checkpoint(batch, base, {"step": batch}, 1.0, {"batch": batch})
    params = base.copy()
    with InPlaceUpdater(params) as updater:
        for batch in (3, 4, 5):
            before = updater.passes
            m.save_checkpoint(batch, params, {"step": batch}, 1.0, {"batch": batch})
            # The array really changed while this save read it.
            assert updater.passes > before
    # Every file verifies, for a fresh manager and for the one that saved them, so
    # retention kept the two newest, which load.
    fresh = CheckpointManager(directory, keep_last_n=2)
    assert _statuses(fresh) == {4: "valid", 5: "valid"}
    assert _statuses(m) == {4: "valid", 5: "valid"}
    for batch in (4, 5):
        with h5py.File(fresh.checkpoint_path(batch), "r") as f:
            assert _filter_count(f, "parameters") == 0  # raw: written by the Rust core
        assert fresh.validate_checkpoint(fresh.checkpoint_path(batch))
        data = fresh.load_checkpoint(fresh.checkpoint_path(batch))
        assert data["metadata"] == {"batch": batch}
        _assert_whole_updates_of(data["parameters"], base, updater.passes)
    latest = fresh.load_latest()
    assert latest is not None and latest["batch_idx"] == 5
    assert m.find_latest_checkpoint() == m.checkpoint_path(5)


def test_racing_saves_of_compressed_small_and_nested_arrays_verify_and_load(tmp_path: Path):
    """The other ways array bytes reach the file: chunks compressed by the Rust core
    (float64 and 1-byte elements), arrays written by HDF5, and a large raw array
    inside the optimizer state."""
    directory = tmp_path / "ckpt"
    m = CheckpointManager(directory, keep_last_n=None)
    rng = np.random.default_rng(1)
    smooth = np.cumsum(rng.integers(-2, 3, 2_000_000)).astype(np.float64)
    small = np.arange(1000, dtype=np.float64)
    nested = _random_ints(2, 1_000_000)
    codes = (np.arange(16_000_000) // 4096 % 7).astype(np.uint8)  # compressible, 1-byte
    arrays = (smooth, small, nested, codes)
    originals = [a.copy() for a in arrays]
    updaters = [InPlaceUpdater(a) for a in arrays]
    with contextlib.ExitStack() as stack:
        for u in updaters:
            stack.enter_context(u)
        for batch in (1, 2):
            m.save_checkpoint(
                batch, smooth, {"small": small, "nested": nested, "codes": codes}, 1.0
            )
    fresh = CheckpointManager(directory)
    assert _statuses(fresh) == _statuses(m) == {1: "valid", 2: "valid"}
    for batch in (1, 2):
        path = fresh.checkpoint_path(batch)
        with h5py.File(path, "r") as f:
            # The paths meant: compressed chunks, HDF5-written bytes, raw segments.
            filters = {k: _filter_count(f, k) for k in ("parameters", "codes", "nested")}
        assert filters == {"parameters": 1, "codes": 1, "nested": 0}
        data = fresh.load_checkpoint(path)
        state = data["optimizer_state"]
        loaded = (data["parameters"], state["small"], state["nested"])
        for got, original, u in zip(loaded, originals, updaters, strict=False):
            _assert_whole_updates_of(got, original, u.passes)
        # uint8 wraps around: any byte value can be some number of updates away.
        assert state["codes"].shape == codes.shape and state["codes"].dtype == np.uint8


def test_verify_rehashes_a_file_changed_by_a_write_since_the_save(tmp_path: Path):
    m = CheckpointManager(tmp_path / "ckpt", keep_last_n=None)
    for batch in (1, 2):
        m.save_checkpoint(batch, np.random.default_rng(batch).random(100_000), {}, 1.0)
    path = m.checkpoint_path(2)
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        byte = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([byte[0] ^ 0x01]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size
    infos = {i.batch_idx: i for i in m.list_checkpoints(verify=True)}
    assert infos[2].status == "invalid" and "digest" in (infos[2].error or "")
    assert infos[1].status == "valid"
    assert m.find_latest_checkpoint() == m.checkpoint_path(1)


# ------------------------------------------------------------ bit rot on a real disk


@contextlib.contextmanager
def _ext4_image(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A fresh ext4 file system in an image file, loop-mounted: ``(mount, image)``."""
    image = tmp_path / "disk.img"
    mount = tmp_path / "mnt"
    mount.mkdir()
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "^inline_data", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
    try:
        yield mount, image
    finally:
        # Lazy: a failed test may still hold a file of it open.
        subprocess.run(["umount", "-l", str(mount)], check=True)


_FS_IOC_FIEMAP = 0xC020660B
_FIEMAP_FLAG_SYNC = 1
_EXTENT = struct.Struct("=QQQ2QI3I")


def _physical_offset(path: Path, logical: int) -> int:
    """Where byte ``logical`` of ``path`` lies on its block device (FIEMAP)."""
    count = 32
    request = struct.pack("=QQIIII", 0, 2**64 - 1, _FIEMAP_FLAG_SYNC, 0, count, 0)
    request += bytes(_EXTENT.size * count)
    answer = bytearray(request)
    with open(path, "rb") as f:
        fcntl.ioctl(f.fileno(), _FS_IOC_FIEMAP, answer, True)
    mapped = struct.unpack_from("=QQIIII", answer)[3]
    for k in range(mapped):
        fe_logical, fe_physical, fe_length, *_ = _EXTENT.unpack_from(answer, 32 + k * _EXTENT.size)
        if fe_logical <= logical < fe_logical + fe_length:
            return fe_physical + logical - fe_logical
    raise AssertionError(f"byte {logical} of {path} is not mapped")


def test_verify_rehashes_after_bit_rot_that_leaves_the_file_identity_alone(tmp_path: Path):
    """A byte changed on the disk under the file system (as bit rot changes it): size,
    mtime and ctime stay, so only hashing again finds it."""
    assert shutil.which("mkfs.ext4") and os.geteuid() == 0
    with _ext4_image(tmp_path) as (mount, image):
        m = CheckpointManager(mount / "ckpt", keep_last_n=None)
        for batch in (1, 2):
            m.save_checkpoint(batch, np.random.default_rng(batch).random(100_000), {}, 1.0)
        assert _statuses(m) == {1: "valid", 2: "valid"}
        path = m.checkpoint_path(2)
        before = os.stat(path)
        where = _physical_offset(path, before.st_size // 2)
        with open(image, "r+b") as disk:
            disk.seek(where)
            byte = disk.read(1)
            disk.seek(where)
            disk.write(bytes([byte[0] ^ 0x01]))
            disk.flush()
            os.fsync(disk.fileno())
        fd = os.open(path, os.O_RDONLY)
        try:
            # The file's cached pages are clean (the save fsynced): drop them, so that
            # the next read comes from the changed disk.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            assert os.pread(fd, 1, before.st_size // 2) != byte
        finally:
            os.close(fd)
        after = os.stat(path)
        assert (after.st_size, after.st_mtime_ns, after.st_ctime_ns, after.st_ino) == (
            before.st_size,
            before.st_mtime_ns,
            before.st_ctime_ns,
            before.st_ino,
        )
        infos = {i.batch_idx: i for i in m.list_checkpoints(verify=True)}
        assert infos[2].status == "invalid", infos[2]
        assert infos[1].status == "valid"
        # Once found, the verdict is remembered for the other uses.
        assert m.find_latest_checkpoint() == m.checkpoint_path(1)
        del m
