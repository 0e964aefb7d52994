"""``describe_file`` (``h5ckpt show``) reads a checkpoint as loading does: opened once,
read once, verified, and described from the verified bytes only.

The kernel holds each open of the file until the test lets it go (fanotify
permission events, which are never merged): the opens are counted exactly, and the
name can be swapped at an exact point of the reader's work, for real.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import shutil
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from h5ckpt import CheckpointManager, LoadLimits
from h5ckpt.inspection import describe_file
from h5ckpt.reading import verified_copy

_libc = ctypes.CDLL(None, use_errno=True)
_FAN_CLASS_CONTENT, _FAN_CLOEXEC, _FAN_MARK_ADD = 0x04, 0x01, 0x01
_FAN_OPEN_PERM, _FAN_ALLOW = 0x00010000, 0x01
_AT_FDCWD = -100
_libc.fanotify_mark.argtypes = [
    ctypes.c_int,
    ctypes.c_uint,
    ctypes.c_uint64,
    ctypes.c_int,
    ctypes.c_char_p,
]


def _checked(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _fanotify() -> int:
    return _checked(_libc.fanotify_init(_FAN_CLASS_CONTENT | _FAN_CLOEXEC, os.O_RDONLY), "fanotify")


def _fanotify_missing() -> str | None:
    try:
        os.close(_fanotify())
    except OSError as exc:  # not root, or a container that withholds it
        return str(exc)
    return None


@contextmanager
def gate(path: Path, on_open: Callable[[int], None]) -> Iterator[list[int]]:
    """Every open of ``path``'s file waits in the kernel while ``on_open(n)`` runs
    (``n``: 1 for the first open); yields the list of ``n`` seen."""
    fan = _fanotify()
    seen: list[int] = []
    stop = threading.Event()

    def answer() -> None:
        while not stop.is_set():
            ready, _, _ = select.select([fan], [], [], 0.05)
            if not ready:
                continue
            data = os.read(fan, 4096)
            offset = 0
            while offset < len(data):
                length, _ver, _res, _mlen, _mask, event_fd, _pid = struct.unpack_from(
                    "=IBBHQii", data, offset
                )
                offset += length
                seen.append(len(seen) + 1)
                try:
                    on_open(seen[-1])
                finally:  # the opener waits for this answer
                    os.write(fan, struct.pack("=iI", event_fd, _FAN_ALLOW))
                    os.close(event_fd)

    try:
        marked = _libc.fanotify_mark(
            fan, _FAN_MARK_ADD, _FAN_OPEN_PERM, _AT_FDCWD, os.fsencode(path)
        )
        _checked(marked, "fanotify_mark")
        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        try:
            yield seen
        finally:
            stop.set()
            thread.join()
    finally:
        os.close(fan)  # lets any open still waiting go


def describe_elsewhere(path: Path, key: bytes) -> dict:
    """``describe_file(path, key)`` in another process: a reader blocked in an open
    that holds its GIL (h5py does) must not stop the gate from answering."""
    code = (
        "import json, sys; from h5ckpt.inspection import describe_file; "
        "print(json.dumps(describe_file(sys.argv[1], sys.argv[2].encode())))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path), key.decode()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _save(directory: Path, key: bytes, value: float, **kwargs) -> Path:
    m = CheckpointManager(directory, hmac_key=key, **kwargs)
    return m.save_checkpoint(7, np.full(4, value), {"marker": value}, value)


needs_fanotify = pytest.mark.skipif(
    _fanotify_missing() is not None, reason=f"fanotify: {_fanotify_missing()}"
)


@needs_fanotify
def test_a_checkpoint_is_opened_once(tmp_path: Path):
    path = _save(tmp_path / "run", b"key", 1.0)
    with gate(path, lambda n: None) as seen:
        info = describe_elsewhere(path, b"key")
    assert seen == [1]
    assert info["status"] == "valid"
    assert info["tree"]["parameters"]["values"] == [1.0] * 4


@needs_fanotify
def test_a_file_replaced_at_any_open_is_never_described_unverified(tmp_path: Path):
    """The name is replaced, at the first, second, ... open of the file, by a file
    that HDF5 reads just as well but that is signed with another key: what is
    described is always the file that was opened and verified."""
    good = _save(tmp_path / "good", b"key", 1.0)
    impostor = _save(tmp_path / "impostor", b"other key", 2.0)
    path = tmp_path / "shown" / good.name
    path.parent.mkdir()
    for k in range(1, 7):
        path.unlink(missing_ok=True)  # a new inode each round: the marks were on the old
        shutil.copy(good, path)
        shutil.copy(impostor, tmp_path / "next.h5")

        def swap(n: int, k: int = k) -> None:
            if n == k:
                os.replace(tmp_path / "next.h5", path)

        with gate(path, swap) as seen:
            info = describe_elsewhere(path, b"key")
        assert seen == [1], (k, seen)  # read once, through one open
        assert info["status"] == "valid", (k, info["error"])
        assert info["tree"]["parameters"]["values"] == [1.0] * 4, k
        assert info["tree"]["optimizer_state"]["children"]["marker"]["value"] == 1.0, k
        assert info["header"]["loss"] == 1.0, k


def test_a_tampered_file_is_invalid_and_its_payload_is_not_parsed(tmp_path: Path):
    path = _save(tmp_path / "run", b"key", 1.0)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01
    path.write_bytes(bytes(data))
    info = describe_file(path, b"key")
    assert info["status"] == "invalid" and "digest" in info["error"]
    assert info["tree"] is None and info["attributes"] is None
    assert info["header"]["batch_idx"] == 7  # the header itself is intact
    assert describe_file(path, b"other key")["status"] == "invalid"


def test_a_keyed_file_without_a_key_verifies_its_digests(tmp_path: Path):
    path = _save(tmp_path / "run", b"key", 1.0)
    assert describe_file(path)["status"] == "valid"
    wrong = describe_file(path, b"other key")
    assert wrong["status"] == "invalid" and wrong["tree"] is None


def test_the_depth_bound_is_the_load_limits(tmp_path: Path):
    deep: dict = {}
    node = deep
    for _ in range(99):
        node["d"] = {}
        node = node["d"]
    node["leaf"] = 1
    path = CheckpointManager(tmp_path / "run").save_checkpoint(1, np.ones(2), deep, 0.5)

    info = describe_file(path)
    assert info["status"] == "valid"
    node = info["tree"]["optimizer_state"]
    for _ in range(99):
        assert "truncated" not in node
        node = node["children"]["d"]
    assert node["children"]["leaf"]["value"] == 1

    shallow = describe_file(path, limits=LoadLimits(max_depth=50))
    assert shallow["status"] == "invalid" and "max_depth" in shallow["error"]
    assert shallow["tree"] is None


def test_the_verified_copy_cannot_be_changed(tmp_path: Path):
    path = _save(tmp_path / "run", b"key", 1.0)
    fd = os.open(path, os.O_RDONLY)
    try:
        with verified_copy(fd, path, b"key", LoadLimits()) as (header, copy):
            assert header.batch_idx == 7
            assert os.pread(copy, path.stat().st_size + 1, 0) == path.read_bytes()
            with pytest.raises(PermissionError):  # sealed
                os.pwrite(copy, b"x", 600)
            with pytest.raises(PermissionError):
                os.ftruncate(copy, 10)
    finally:
        os.close(fd)


def test_children_are_described_in_the_order_loading_reads_them(tmp_path: Path):
    state = {"zeta": 1, "alpha": {"y": 2, "b": [3, 4], "a/b": 5}, "10": 6, "9": 7, "": 8}
    m = CheckpointManager(tmp_path / "run")
    path = m.save_checkpoint(1, np.ones(2), state, 0.5)
    loaded = m.load_checkpoint(path)["optimizer_state"]
    described = describe_file(path)["tree"]["optimizer_state"]

    def keys(node: dict) -> list:
        return [(k, keys(c)) for k, c in node["children"].items() if c["type"] == "dict"] + [
            list(node["children"])
        ]

    def loaded_keys(value: dict) -> list:
        return [(k, loaded_keys(v)) for k, v in value.items() if isinstance(v, dict)] + [
            list(value)
        ]

    assert list(loaded) == ["zeta", "alpha", "10", "9", ""]
    assert keys(described) == loaded_keys(loaded)
