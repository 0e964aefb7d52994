"""Tests of the Rust core, ``h5ckpt._native``, against docs/format.md.

Headers and digests are rebuilt here with ``struct`` and ``hashlib`` straight from the
spec, so that the spec and the code must agree.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import math
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from h5ckpt import _native as native
from h5ckpt.errors import (
    CheckpointAuthenticationError,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointStorageError,
    CheckpointValueError,
    CheckpointVersionError,
)

MAGIC = b"\x89H5C\r\n\x1a\n"
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
C_DEFAULT = 1 << 20


# --- an independent implementation of docs/format.md --------------------------------


def spec_tree_digest(payload: bytes, chunk_size: int = C_DEFAULT) -> bytes:
    n = -(-len(payload) // chunk_size)
    root = hashlib.sha256(struct.pack("<QQ", chunk_size, n))
    for i in range(n):
        root.update(hashlib.sha256(payload[i * chunk_size : (i + 1) * chunk_size]).digest())
    return root.digest()


def spec_header(
    payload: bytes,
    *,
    batch_idx: int = 7,
    loss: float = 0.125,
    timestamp: float = 1_700_000_000.25,
    chunk_log2: int = 20,
    key: bytes | None = None,
    major: int = 1,
    minor: int = 0,
    flags: int | None = None,
    chunk_count: int | None = None,
    header_size: int = 512,
    payload_offset: int = 512,
    tag: bytes | None = None,
) -> bytes:
    """Header bytes built per the spec; keyword overrides break one rule at a time."""
    c = 1 << chunk_log2
    n = -(-len(payload) // c) if chunk_count is None else chunk_count
    if flags is None:
        flags = 1 if key is not None else 0
    head = struct.pack(
        "<8sHHIQQIIQQdd32s",
        MAGIC,
        major,
        minor,
        header_size,
        payload_offset,
        len(payload),
        chunk_log2,
        flags,
        n,
        batch_idx,
        loss,
        timestamp,
        spec_tree_digest(payload, c),
    )
    assert len(head) == 104
    if tag is None:
        tag = hmac.new(key, head, hashlib.sha256).digest() if key is not None else bytes(32)
    body = head + tag + bytes(344)
    return body + hashlib.sha256(body).digest()


def write_spec_file(path: Path, payload: bytes, **kw) -> bytes:
    data = spec_header(payload, **kw) + payload
    path.write_bytes(data)
    return data


# --- the two ways the package verifies a file -----------------------------------------


def verify(path: Path | str, key: bytes | bytearray | None = None) -> native.Header:
    """One file checked by ``verify_files`` (validation, ``h5ckpt verify``); its failure
    raised."""
    (outcome,) = native.verify_files([path], key)
    if isinstance(outcome, CheckpointError):
        raise outcome
    return outcome


def read_verified(path: Path, key: bytes | None = None) -> tuple[native.Header, bytes]:
    """The whole file read through a descriptor into a numpy buffer and verified there,
    as a load does it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = np.empty(os.fstat(fd).st_size, dtype=np.uint8)
        header = native.read_verified_fd(fd, buf, key, path)
    finally:
        os.close(fd)
    return header, buf.tobytes()


#: A descriptor number above any limit of open files: never open.
UNOPENED_FD = 2**31 - 1


# --- constants ------------------------------------------------------------------------


def test_constants():
    assert native.MAGIC == MAGIC
    assert native.HDF5_SIGNATURE == HDF5_SIGNATURE
    assert native.HEADER_SIZE == 512
    assert (native.FORMAT_MAJOR, native.FORMAT_MINOR) == (1, 0)
    assert native.DEFAULT_CHUNK_SIZE == C_DEFAULT
    assert isinstance(native.__version__, str) and native.__version__


# --- tree digest ----------------------------------------------------------------------


SIZES = {
    "0": lambda c: 0,
    "1": lambda c: 1,
    "C-1": lambda c: c - 1,
    "C": lambda c: c,
    "C+1": lambda c: c + 1,
    "3C+5": lambda c: 3 * c + 5,
}


@pytest.mark.parametrize("chunk_size", [4096, C_DEFAULT])
@pytest.mark.parametrize("size", SIZES)
def test_tree_digest_matches_spec(size, chunk_size):
    data = os.urandom(SIZES[size](chunk_size))
    want = spec_tree_digest(data, chunk_size)
    if chunk_size == C_DEFAULT:
        assert native.tree_digest(data) == want
    assert native.tree_digest(data, chunk_size) == want
    assert native.tree_digest(data, chunk_size=chunk_size) == want


def test_tree_digest_known_values():
    assert (
        native.tree_digest(b"").hex()
        == "35c6d6e5b93657e4a741a1cec71c21813fe05aab219909ebbb0f62fb0ae648dc"
    )
    assert (
        native.tree_digest(b"abc").hex()
        == "f9755727e5da141a03685ec606215d3e3785418d6f940df6c6504b54d55f7149"
    )


def test_tree_digest_accepts_buffers():
    arr = np.arange(3000, dtype=np.float64).reshape(30, 100)
    raw = arr.tobytes()
    want = spec_tree_digest(raw, 4096)
    for buf in (raw, bytearray(raw), memoryview(raw), arr, arr.view(np.uint8), memoryview(arr)):
        assert native.tree_digest(buf, 4096) == want
    scalar = np.array(3.5)  # 0-d
    assert native.tree_digest(scalar, 4096) == spec_tree_digest(scalar.tobytes(), 4096)
    with pytest.raises(CheckpointValueError, match="C-contiguous"):
        native.tree_digest(arr[:, ::2], 4096)
    with pytest.raises(CheckpointValueError, match="contiguous"):
        native.tree_digest(np.asfortranarray(arr), 4096)
    with pytest.raises(TypeError):
        native.tree_digest("text")  # type: ignore[arg-type]


@pytest.mark.parametrize("chunk_size", [0, 1, 2048, 4095, 4097, 3 << 20, 1 << 31, -4096])
def test_tree_digest_rejects_chunk_sizes(chunk_size):
    with pytest.raises(CheckpointValueError, match="chunk_size"):
        native.tree_digest(b"x", chunk_size)


# --- header parsing -------------------------------------------------------------------


def test_parse_spec_header():
    payload = os.urandom(5000)
    raw = spec_header(payload, batch_idx=99, loss=-2.5, timestamp=12.75, chunk_log2=12)
    h = native.parse_header(raw)
    assert h.format_major == 1 and h.format_minor == 0
    assert h.payload_offset == 512
    assert h.payload_length == 5000
    assert h.chunk_size == 4096
    assert h.chunk_count == 2
    assert h.flags == 0 and h.keyed is False and h.hmac_tag is None
    assert h.batch_idx == 99 and h.loss == -2.5 and h.timestamp == 12.75
    assert h.payload_digest == spec_tree_digest(payload, 4096)
    assert h.header_digest == raw[480:]
    d = h.to_dict()
    assert d["batch_idx"] == 99 and d["chunk_size"] == 4096 and d["hmac_tag"] is None
    assert set(d) >= {
        "format_major", "format_minor", "payload_offset", "payload_length", "chunk_size",
        "chunk_count", "flags", "keyed", "batch_idx", "loss", "timestamp",
        "payload_digest", "hmac_tag", "header_digest",
    }  # fmt: skip
    assert "batch_idx=99" in repr(h)
    # Bytes beyond 512 are ignored; a minor version is accepted.
    assert native.parse_header(raw + b"more").batch_idx == 99
    assert native.parse_header(spec_header(payload, minor=9)).format_minor == 9


def test_parse_keyed_header_and_special_floats():
    raw = spec_header(b"p", key=b"k", loss=float("nan"), timestamp=float("-inf"))
    h = native.parse_header(raw)
    assert h.keyed and h.flags == 1
    assert h.hmac_tag == raw[104:136]
    assert np.isnan(h.loss) and h.timestamp == float("-inf")


def test_parse_header_rejects_garbage_and_truncation():
    raw = spec_header(b"payload")
    bad_inputs = [
        b"",
        b"\x89H5C",
        os.urandom(512),
        bytes(512),
        raw[:511],
        raw[:12],
        HDF5_SIGNATURE + bytes(504),
    ]
    for data in bad_inputs:
        with pytest.raises(CheckpointCorruptError):
            native.parse_header(data)


def test_parse_header_every_flipped_byte():
    raw = bytearray(spec_header(b"payload", key=b"k"))
    for i in range(512):
        for bit in (0x01, 0x80):
            raw[i] ^= bit
            # Flipping the major version up gives a version error; all else: corrupt.
            with pytest.raises((CheckpointCorruptError, CheckpointVersionError)):
                native.parse_header(bytes(raw))
            raw[i] ^= bit


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ({"major": 0}, "major"),
        ({"header_size": 1024}, "header_size"),
        ({"payload_offset": 4096}, "payload_offset"),
        ({"chunk_log2": 11}, "chunk_log2"),
        ({"chunk_log2": 31}, "chunk_log2"),
        ({"flags": 2}, "flag"),
        ({"flags": 0x80000001, "key": b"k"}, "flag"),
        ({"chunk_count": 3}, "chunk_count"),
        ({"tag": b"\x01" * 32}, "HMAC"),
    ],
)
def test_parse_header_field_rules(override, reason):
    with pytest.raises(CheckpointCorruptError, match=reason) as info:
        native.parse_header(spec_header(b"x" * 5000, **override))
    assert info.value.error_context["reason"]


def test_newer_major_is_version_error():
    raw = spec_header(b"x", major=2, minor=5)
    with pytest.raises(CheckpointVersionError) as info:
        native.parse_header(raw)
    assert info.value.error_context["format_major"] == 2
    assert info.value.error_context["format_minor"] == 5
    # Even with everything after the version broken.
    odd = MAGIC + struct.pack("<HH", 3, 0) + b"\xff" * 500
    with pytest.raises(CheckpointVersionError):
        native.parse_header(odd)


def test_read_header_checks_length(tmp_path):
    p = tmp_path / "a.h5"
    data = write_spec_file(p, b"x" * 100)
    assert native.read_header(p).payload_length == 100
    assert native.read_header(str(p)).payload_length == 100
    p.write_bytes(data + b"!")
    with pytest.raises(CheckpointCorruptError, match="extra bytes"):
        native.read_header(p)
    p.write_bytes(data[:-1])
    with pytest.raises(CheckpointCorruptError, match="truncated"):
        native.read_header(p)


# --- finalize + verify ----------------------------------------------------------------


def make_hdf5_part(path: Path, length: int, hole: tuple[int, int]) -> tuple[int, bytes]:
    """A file as HDF5 leaves it: 512-byte user block, bytes written with pwrite, and a
    hole that the segment fills. Returns the open fd and the final file bytes."""
    final = bytearray(length)
    final[512:] = (np.arange(length - 512) % 251).astype(np.uint8).tobytes()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.pwrite(fd, bytes(final[512 : hole[0]]), 512)
    os.pwrite(fd, bytes(final[hole[1] :]), hole[1])
    return fd, bytes(final)


def finalize_file(tmp_path, *, key=None, chunk_size=4096, name="ck.h5", as_array=False):
    p = tmp_path / name
    length = 512 + 9 * 4096 + 77
    hole = (4096 + 100, 6 * 4096 + 3)
    fd, final = make_hdf5_part(p, length, hole)
    try:
        segment = final[hole[0] : hole[1]]
        if as_array:
            segment = np.frombuffer(segment, dtype=np.uint8).copy()
        h = native.finalize(
            fd, [(hole[0], segment)], 12, 0.5, 99.0, hmac_key=key, chunk_size=chunk_size
        )
    finally:
        os.close(fd)
    return p, h, final


@pytest.mark.parametrize("chunk_size", [4096, C_DEFAULT])
def test_finalize_then_verify(tmp_path, chunk_size):
    p, h, final = finalize_file(tmp_path, chunk_size=chunk_size)
    data = p.read_bytes()
    payload = final[512:]
    assert data[512:] == payload
    assert data[:512] == spec_header(
        payload, batch_idx=12, loss=0.5, timestamp=99.0, chunk_log2=chunk_size.bit_length() - 1
    )
    assert h.payload_length == len(payload) and h.chunk_size == chunk_size
    v = verify(p)
    assert v.to_dict() == h.to_dict()
    assert native.read_header(p).header_digest == h.header_digest


def test_finalize_accepts_numpy_segments(tmp_path):
    p, _, final = finalize_file(tmp_path, as_array=True)
    assert p.read_bytes()[512:] == final[512:]
    verify(p)


def test_every_flipped_byte_is_detected(tmp_path):
    p, _, _ = finalize_file(tmp_path)
    orig = p.read_bytes()
    edges = {0, 8, 72, 104, 479, 480, 511, 512, 513, len(orig) - 1}
    offsets = sorted(edges | set(range(0, len(orig), 397)))
    for off in offsets:
        damaged = bytearray(orig)
        damaged[off] ^= 0x10
        p.write_bytes(damaged)
        with pytest.raises((CheckpointCorruptError, CheckpointVersionError)):
            verify(p)
        with pytest.raises((CheckpointCorruptError, CheckpointVersionError)):
            read_verified(p)
    p.write_bytes(orig)
    verify(p)


def test_payload_mismatch_message(tmp_path):
    p, _, _ = finalize_file(tmp_path)
    data = bytearray(p.read_bytes())
    data[3000] ^= 1
    p.write_bytes(data)
    with pytest.raises(CheckpointCorruptError) as info:
        verify(p)
    assert str(info.value) == f"checkpoint {p}: payload digest mismatch (file changed or corrupted)"
    assert info.value.error_context["path"] == str(p)


def test_extra_and_missing_bytes(tmp_path):
    p, _, _ = finalize_file(tmp_path)
    orig = p.read_bytes()
    for data in (orig + b"\0", orig[:-1], orig[:600], orig[:512], orig[:100], b""):
        p.write_bytes(data)
        with pytest.raises(CheckpointCorruptError):
            verify(p)


def test_finalize_rejects_bad_arguments(tmp_path):
    p = tmp_path / "f.h5"
    fd, _ = make_hdf5_part(p, 512 + 8192, (600, 700))
    try:
        for segments in (
            [(100, b"x" * 10)],
            [(511, b"xx")],
            [(512 + 8190, b"xxx")],
            [(600, b"x" * 50), (640, b"y" * 50)],
            [(-1, b"x")],
        ):
            with pytest.raises(CheckpointValueError):
                native.finalize(fd, segments, 1, 0.0, 0.0)
        with pytest.raises(CheckpointValueError):
            native.finalize(fd, [], -1, 0.0, 0.0)
        with pytest.raises(CheckpointValueError):
            native.finalize(fd, [], 1, 0.0, 0.0, chunk_size=1000)
        with pytest.raises(CheckpointValueError):
            native.finalize(fd, [], 1, 0.0, 0.0, hmac_key=b"")
        with pytest.raises(CheckpointValueError):
            native.finalize(fd, [(600, np.zeros((10, 10))[:, ::2])], 1, 0.0, 0.0)
    finally:
        os.close(fd)
    ro = os.open(p, os.O_RDONLY)
    try:
        with pytest.raises(CheckpointValueError, match="reading and writing"):
            native.finalize(ro, [], 1, 0.0, 0.0)
    finally:
        os.close(ro)
    short = tmp_path / "short.h5"
    short.write_bytes(b"x" * 100)
    fd = os.open(short, os.O_RDWR)
    try:
        with pytest.raises(CheckpointValueError, match="user block"):
            native.finalize(fd, [], 1, 0.0, 0.0)
    finally:
        os.close(fd)


def test_finalize_leaves_fd_open(tmp_path):
    p = tmp_path / "f.h5"
    fd, _ = make_hdf5_part(p, 512 + 100, (512, 520))
    native.finalize(fd, [(512, b"12345678")], 1, 0.0, 0.0, durable=False)
    os.fstat(fd)  # still open
    os.close(fd)
    verify(p)


@pytest.mark.parametrize(("chunk_size", "key"), [(4096, None), (C_DEFAULT, b"secret")])
def test_seal_image_writes_the_whole_file(tmp_path, chunk_size, key):
    image = (np.arange(3 * 4096 + 77) % 251).astype(np.uint8).tobytes()
    p = tmp_path / "img.h5"
    fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        h = native.seal_image(fd, image, 12, 0.5, 99.0, hmac_key=key, chunk_size=chunk_size)
        os.fstat(fd)  # still open
    finally:
        os.close(fd)
    data = p.read_bytes()
    assert data[512:] == image
    if key is None:
        assert data[:512] == spec_header(
            image, batch_idx=12, loss=0.5, timestamp=99.0, chunk_log2=chunk_size.bit_length() - 1
        )
    (verified,) = native.verify_files([p], key)
    assert verified.to_dict() == h.to_dict()
    assert h.payload_length == len(image) and h.chunk_size == chunk_size


def test_seal_image_refuses_a_file_it_cannot_write_whole(tmp_path):
    p = tmp_path / "f.h5"
    p.write_bytes(b"already here")
    fd = os.open(p, os.O_RDWR)
    try:
        with pytest.raises(CheckpointValueError, match="must be empty"):
            native.seal_image(fd, b"x" * 100, 1, 0.0, 0.0)
    finally:
        os.close(fd)
    assert p.read_bytes() == b"already here"
    p.write_bytes(b"")
    ro = os.open(p, os.O_RDONLY)
    try:
        with pytest.raises(CheckpointError) as info:
            native.seal_image(ro, b"x" * 100, 1, 0.0, 0.0)
        assert info.value.error_context.get("errno") == errno.EBADF
    finally:
        os.close(ro)
    with pytest.raises(CheckpointValueError):
        native.seal_image(-1, b"x", 1, 0.0, 0.0)
    fd = os.open(p, os.O_RDWR)
    try:
        with pytest.raises(CheckpointValueError):
            native.seal_image(fd, b"x", 1, 0.0, 0.0, chunk_size=1000)
        with pytest.raises(CheckpointValueError):
            native.seal_image(fd, b"x", 1, 0.0, 0.0, hmac_key=b"")
        with pytest.raises(TypeError):
            native.seal_image(fd, bytearray(b"x"), 1, 0.0, 0.0)  # only immutable bytes
    finally:
        os.close(fd)
    assert p.read_bytes() == b""


# --- HMAC -----------------------------------------------------------------------------


def test_hmac(tmp_path):
    keyed, hk, _ = finalize_file(tmp_path, key=b"secret", name="k.h5")
    plain, hp, _ = finalize_file(tmp_path, name="p.h5")
    assert hk.keyed and hk.hmac_tag is not None
    assert not hp.keyed and hp.hmac_tag is None
    head = keyed.read_bytes()[:104]
    assert hk.hmac_tag == hmac.new(b"secret", head, hashlib.sha256).digest()
    assert verify(keyed, b"secret").keyed
    assert verify(keyed, bytearray(b"secret")).keyed
    verify(keyed)  # a reader without a key accepts a keyed file
    with pytest.raises(CheckpointAuthenticationError, match="mismatch"):
        verify(keyed, b"wrong")
    with pytest.raises(CheckpointAuthenticationError, match="no HMAC tag"):
        verify(plain, b"secret")
    with pytest.raises(CheckpointAuthenticationError):
        read_verified(plain, b"secret")
    with pytest.raises(CheckpointAuthenticationError):
        read_verified(keyed, b"wrong")
    assert read_verified(keyed, b"secret")[0].keyed
    # An authentication error is a corruption error too.
    assert issubclass(CheckpointAuthenticationError, CheckpointCorruptError)
    with pytest.raises(CheckpointValueError):
        verify(keyed, b"")


def test_spec_keyed_file_verifies(tmp_path):
    p = tmp_path / "s.h5"
    write_spec_file(p, os.urandom(10_000), key=b"k2", chunk_log2=12)
    assert verify(p, b"k2").keyed
    with pytest.raises(CheckpointAuthenticationError):
        verify(p, b"k3")


# --- read_verified_fd, verify_files, verify_fds ---------------------------------------


def test_read_verified_fd_returns_exact_bytes(tmp_path):
    for n in (0, 1, 4095, 4096, 3 * 4096 + 5, 2 * C_DEFAULT + 9):
        p = tmp_path / f"r{n}.h5"
        data = write_spec_file(p, os.urandom(n), chunk_log2=12 if n < 20000 else 20)
        h, got = read_verified(p)
        assert got == data
        assert h.payload_length == n


def test_read_verified_fd_reads_the_open_file_and_leaves_it_as_it_was(tmp_path):
    p = tmp_path / "r.h5"
    data = write_spec_file(p, os.urandom(9000), chunk_log2=12, key=b"k")
    fd = os.open(p, os.O_RDONLY)
    try:
        os.lseek(fd, 100, os.SEEK_SET)
        # The open file is read, whatever its name points to by now.
        (tmp_path / "other").write_bytes(b"replaced")
        os.replace(tmp_path / "other", p)
        buf = bytearray(len(data))
        assert native.read_verified_fd(fd, buf, b"k", p).keyed
        assert buf == data
        assert os.lseek(fd, 0, os.SEEK_CUR) == 100  # neither moved nor closed
        with pytest.raises(CheckpointAuthenticationError):
            native.read_verified_fd(fd, buf, b"other key", p)
        with pytest.raises(CheckpointCorruptError, match="did it change"):
            native.read_verified_fd(fd, bytearray(len(data) - 1), None, p)
        with pytest.raises(CheckpointValueError, match="writable"):
            native.read_verified_fd(fd, bytes(len(data)))
    finally:
        os.close(fd)


def test_descriptors_that_are_not_open_are_refused_before_use(tmp_path):
    with pytest.raises(CheckpointStorageError) as info:
        native.finalize(UNOPENED_FD, [], 1, 0.0, 0.0)
    assert info.value.error_context["errno"] == errno.EBADF
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == errno.EBADF
    with pytest.raises(CheckpointStorageError) as info:
        native.read_verified_fd(UNOPENED_FD, bytearray(600), None, tmp_path / "a.h5")
    assert info.value.error_context["errno"] == errno.EBADF
    assert info.value.error_context["path"] == str(tmp_path / "a.h5")
    (outcome,) = native.verify_fds([UNOPENED_FD], [tmp_path / "b.h5"])
    assert isinstance(outcome, CheckpointStorageError)
    assert outcome.error_context["errno"] == errno.EBADF
    # Only a hint: nothing to report.
    assert native.start_writeback(UNOPENED_FD) is None
    assert list(tmp_path.iterdir()) == []


def test_verify_files_returns_exceptions_in_place(tmp_path):
    good = tmp_path / "good.h5"
    write_spec_file(good, b"abc")
    bad = tmp_path / "bad.h5"
    data = bytearray(write_spec_file(bad, b"abcdef"))
    data[-1] ^= 1
    bad.write_bytes(data)
    missing = tmp_path / "missing.h5"
    out = native.verify_files([good, str(bad), missing, good])
    assert len(out) == 4
    assert isinstance(out[0], native.Header) and isinstance(out[3], native.Header)
    assert isinstance(out[1], CheckpointCorruptError)
    assert isinstance(out[2], CheckpointNotFoundError)
    assert out[2].error_context["path"] == str(missing)
    assert native.verify_files([]) == []
    # Returned exceptions pickle with their context.
    again = pickle.loads(pickle.dumps(out[1]))
    assert again.error_context == out[1].error_context


# --- errors ---------------------------------------------------------------------------


def test_missing_file_errors(tmp_path):
    missing = tmp_path / "nope.h5"
    with pytest.raises(CheckpointNotFoundError) as info:
        native.read_header(missing)
    e = info.value
    assert isinstance(e, FileNotFoundError) and isinstance(e, CheckpointError)
    assert e.error_context["path"] == str(missing)
    assert e.error_context["op"] == "open"
    assert e.error_context["errno"] == 2
    assert "No such file or directory" in str(e)
    assert isinstance(e.__cause__, FileNotFoundError)
    assert e.__cause__.errno == 2 and e.__cause__.filename == str(missing)
    # Returned by verify_files rather than raised: the same error.
    (returned,) = native.verify_files([missing])
    assert isinstance(returned, CheckpointNotFoundError)
    assert isinstance(returned, FileNotFoundError)
    assert returned.error_context == e.error_context
    with pytest.raises(CheckpointNotFoundError) as info:
        native.Catalog(missing, "x", False).list()
    assert isinstance(info.value, FileNotFoundError)
    assert info.value.error_context["path"] == str(missing)
    with pytest.raises(CheckpointNotFoundError):
        native.fsync_directory(missing)


_UNPRIVILEGED_CHECK = """
import os, sys
from h5ckpt import _native as native
from h5ckpt.errors import CheckpointPermissionError
# Root reads every file whatever its mode: drop to "nobody" (after the imports, which
# may live under root's home), where the kernel really enforces the permissions.
if os.geteuid() == 0:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
d = sys.argv[1]
try:
    native.read_header(d + "/a.h5")
except CheckpointPermissionError as e:
    assert isinstance(e, PermissionError) and e.error_context["errno"] == 13, e
else:
    raise SystemExit("no CheckpointPermissionError")
# A file that cannot be read is listed, but as unverified: a failed read says nothing
# of what the file holds.
(info,), pending = native.Catalog(d, "r", False).list()
assert (info.status, info.verified, pending) == ("unverified", False, []), info
assert info.error is not None and "Permission denied" in info.error, info.error
print("ok")
"""


def test_permission_error():
    d = Path(tempfile.mkdtemp(prefix="h5ckpt-perm-"))
    try:
        d.chmod(0o755)
        for name in ("a.h5", "r_batch_1.h5"):
            write_spec_file(d / name, b"x")
            (d / name).chmod(0)
        proc = subprocess.run(
            [sys.executable, "-c", _UNPRIVILEGED_CHECK, str(d)],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
            timeout=120,
        )
        assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    finally:
        shutil.rmtree(d)


def test_other_os_errors_are_storage_errors(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_bytes(b"")
    with pytest.raises(CheckpointStorageError) as info:
        native.read_header(not_a_dir / "x.h5")  # ENOTDIR
    assert isinstance(info.value, OSError)
    assert info.value.error_context["errno"] == 20
    with pytest.raises(CheckpointStorageError) as info:
        native.Catalog(not_a_dir, "x", False).list()
    assert info.value.error_context["errno"] == 20


def test_directory_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointCorruptError, match="not a regular file"):
        verify(tmp_path)
    with pytest.raises(CheckpointCorruptError, match="not a regular file"):
        native.read_header(tmp_path)


# --- listing a directory: the catalog ---------------------------------------------


def test_catalog_lists_files_named_like_checkpoints(tmp_path):
    d = tmp_path
    write_spec_file(d / "run_batch_0010.h5", b"ten", batch_idx=10)
    write_spec_file(d / "run_batch_10.h5", b"ten too", batch_idx=10)
    write_spec_file(d / "run_batch_2.h5", b"two", key=b"k", batch_idx=2, loss=1.5)
    data = write_spec_file(d / "run_batch_3.h5", b"three", batch_idx=3)
    (d / "run_batch_3.h5").write_bytes(data + b"extra")
    (d / "run_batch_4.h5").write_bytes(HDF5_SIGNATURE + bytes(200))
    (d / "run_batch_5.h5").write_bytes(b"not hdf5 at all")
    (d / "run_batch_6.h5").write_bytes(b"tiny")
    (d / "run_batch_7.h5").write_bytes(spec_header(b"x", major=2, batch_idx=7))
    write_spec_file(d / "run_batch_12.h5", b"renamed", batch_idx=13)
    (d / "run_batch_8.h5").mkdir()
    (d / "run_batch_9.h5").symlink_to(d / "run_batch_2.h5")
    (d / "run_batch_11.h5").symlink_to(d / "nowhere")
    for name in (
        "run_batch_.h5",
        "run_batch_1.h5.tmp",
        ".run_batch_1.h5.tmp",
        "run_batch_x.h5",
        "run_batch_99999999999999999999999.h5",
        "runx_batch_1.h5",
        "other_batch_1.h5",
        "run_batch_1.hdf5",
    ):
        (d / name).write_bytes(b"")
    # A name that is not UTF-8 is no checkpoint name and does not stop the listing.
    Path(os.fsdecode(os.fsencode(d) + b"/run_batch_1\xff.h5")).write_bytes(b"")

    infos, pending = native.Catalog(d, "run", False).list()
    # By batch index (not by name: "run_batch_0010.h5" < "run_batch_2.h5"), then name.
    got = [(i.path.name, i.batch_idx, i.status, i.verified) for i in infos]
    assert got == [
        ("run_batch_2.h5", 2, "unverified", False),
        ("run_batch_3.h5", 3, "invalid", True),
        ("run_batch_4.h5", 4, "legacy", False),
        ("run_batch_5.h5", 5, "invalid", True),
        ("run_batch_6.h5", 6, "invalid", True),
        ("run_batch_7.h5", 7, "invalid", True),
        ("run_batch_0010.h5", 10, "unverified", False),
        ("run_batch_10.h5", 10, "unverified", False),
        ("run_batch_12.h5", 12, "invalid", True),
    ]
    by = {i.path.name: i for i in infos}
    # Only the legacy file's loss and timestamp are left to the caller (HDF5).
    assert pending == [2]
    two = by["run_batch_2.h5"]
    assert two.path == d / "run_batch_2.h5" and two.error is None
    assert (two.loss, two.timestamp) == (1.5, 1_700_000_000.25)  # from the header
    assert two.size_bytes == os.stat(two.path).st_size == 512 + 3
    assert "extra bytes" in by["run_batch_3.h5"].error
    assert by["run_batch_4.h5"].error is None and math.isnan(by["run_batch_4.h5"].loss)
    assert by["run_batch_5.h5"].error == by["run_batch_6.h5"].error == "not a checkpoint file"
    assert "version" in by["run_batch_7.h5"].error
    assert by["run_batch_12.h5"].error == "file name says batch 12, header says 13"

    # A keyed reader refuses legacy files, which have no tag, from the first listing.
    keyed, pending = native.Catalog(d, "run", True).list()
    statuses = [i.status for i in infos]
    statuses[2] = "invalid"
    assert [i.status for i in keyed] == statuses
    assert "refused by a keyed manager" in keyed[2].error and pending == []

    # The prefix is matched whole, and the path may be a str.
    assert native.Catalog(str(d), "nomatch", False).list() == ([], [])
    (other,), _ = native.Catalog(str(d), "other", False).list()
    assert other.path == d / "other_batch_1.h5" and other.status == "invalid"


def test_catalog_reads_again_only_the_files_that_changed(tmp_path):
    for b in (1, 2):
        write_spec_file(tmp_path / f"run_batch_{b}.h5", b"payload", batch_idx=b)
    catalog = native.Catalog(tmp_path, "run", False)
    first, _ = catalog.list()
    again, _ = catalog.list()
    assert [a is b for a, b in zip(first, again, strict=True)] == [True, True]
    data = write_spec_file(tmp_path / "run_batch_2.h5", b"payload", batch_idx=2, loss=9.0)
    (tmp_path / "run_batch_2.h5").write_bytes(data + b"!")
    (tmp_path / "run_batch_1.h5").unlink()
    write_spec_file(tmp_path / "run_batch_3.h5", b"new", batch_idx=3)
    now, _ = catalog.list()
    assert [(i.batch_idx, i.status) for i in now] == [(2, "invalid"), (3, "unverified")]
    assert "extra bytes" in now[0].error and len(catalog) == 2


# --- retention ------------------------------------------------------------------------


def test_plan_retention_basics():
    c = [(1, True, 0.5), (2, True, 0.4), (3, False, 0.0), (4, True, 0.3), (5, False, 0.0)]
    assert native.plan_retention(c, 2) == [0]
    assert native.plan_retention(c, 1) == [0, 1]
    assert native.plan_retention(c, 0) == [0, 1]  # the newest valid one always stays
    assert native.plan_retention(c, None) == []
    assert native.plan_retention(c, 1, delete_invalid=True) == [0, 1, 2, 4]
    assert native.plan_retention(c, 1, keep_every=2) == [0]
    assert native.plan_retention(c, 1, keep_best_n=1) == [0, 1]
    assert native.plan_retention(c, 1, keep_best_n=1, maximize=True) == [1]
    assert native.plan_retention([], 3) == []
    nan = [(1, True, float("nan")), (2, True, 1.0), (3, True, 2.0)]
    assert native.plan_retention(nan, 1, keep_best_n=1) == [0]


def test_plan_retention_never_deletes_only_valid():
    c = [(1, True, 0.0), (2, False, 0.0), (3, False, 0.0), (4, False, 0.0)]
    assert native.plan_retention(c, 2, delete_invalid=True) == [1, 2, 3]
    assert native.plan_retention(c, 2) == []


@pytest.mark.parametrize(
    "kwargs",
    [{"keep_last_n": -1}, {"keep_every": 0}, {"keep_every": -3}, {"keep_best_n": -1}],
)
def test_plan_retention_rejects_bad_policy(kwargs):
    args = {"keep_last_n": 1, **kwargs}
    with pytest.raises(CheckpointValueError):
        native.plan_retention([(1, True, 0.0)], **args)


def test_plan_retention_rejects_negative_batch():
    with pytest.raises(CheckpointValueError):
        native.plan_retention([(-1, True, 0.0)], 1)


# --- argument conversion --------------------------------------------------------------

# Every integer argument of the native functions the package calls, the others valid.
# Each call is refused before it touches a descriptor or file.
INTEGER_ARGUMENTS = {
    "tree_digest chunk_size": lambda v: native.tree_digest(b"x", v),
    "finalize batch_idx": lambda v: native.finalize(0, [], v, 0.0, 0.0),
    "finalize segment offset": lambda v: native.finalize(0, [(v, b"x")], 1, 0.0, 0.0),
    "finalize chunk_size": lambda v: native.finalize(0, [], 1, 0.0, 0.0, chunk_size=v),
    "start_writeback offset": lambda v: native.start_writeback(0, v),
    "start_writeback length": lambda v: native.start_writeback(0, 0, v),
    "blosc_compress_chunks chunk_bytes": lambda v: native.blosc_compress_chunks(
        b"x", v, 1, bytearray(1000)
    ),
    "blosc_compress_chunks typesize": lambda v: native.blosc_compress_chunks(
        b"x", 1, v, bytearray(1000)
    ),
    "blosc_max_frame_len chunk_bytes": lambda v: native.blosc_max_frame_len(v),
    "blosc_ratio typesize": lambda v: native.blosc_ratio(b"x", v),
    "checkpoint_name batch_idx": lambda v: native.checkpoint_name("ck", v),
    "plan_retention batch_idx of a candidate": lambda v: native.plan_retention([(v, True, 0.0)], 1),
    "plan_retention keep_last_n": lambda v: native.plan_retention([], v),
    "plan_retention keep_every": lambda v: native.plan_retention([], 1, v),
    "plan_retention keep_best_n": lambda v: native.plan_retention([], 1, None, v),
    "CheckpointInfo batch_idx": lambda v: native.CheckpointInfo("x.h5", v, 0.0, 0.0, 0, "valid"),
    "CheckpointInfo size_bytes": lambda v: native.CheckpointInfo("x.h5", 1, 0.0, 0.0, v, "valid"),
}
# Descriptors take any C int: a negative one is the callee's to judge (below).
FD_ARGUMENTS = {
    "finalize fd": lambda v: native.finalize(v, [], 1, 0.0, 0.0),
    "read_verified_fd fd": lambda v: native.read_verified_fd(v, bytearray(1)),
    "verify_fds fd": lambda v: native.verify_fds([v], ["x.h5"]),
    "start_writeback fd": lambda v: native.start_writeback(v),
}


def _refused_as_value_error(call, argument: str) -> None:
    with pytest.raises(CheckpointValueError) as info:
        call()
    assert not isinstance(info.value, OverflowError)
    assert f"{argument} must be an integer" in str(info.value)
    assert info.value.error_context["reason"] in str(info.value)


@pytest.mark.parametrize("value", [2**64, -1, 2**200, -(2**200)])
@pytest.mark.parametrize("what", sorted(INTEGER_ARGUMENTS))
def test_integer_arguments_out_of_range_are_value_errors(what, value):
    _refused_as_value_error(lambda: INTEGER_ARGUMENTS[what](value), what.split(" ", 1)[1])


@pytest.mark.parametrize("value", [2**31, 2**64, -(2**31) - 1, -(2**200)])
@pytest.mark.parametrize("what", sorted(FD_ARGUMENTS))
def test_descriptors_out_of_range_are_value_errors(what, value):
    _refused_as_value_error(lambda: FD_ARGUMENTS[what](value), "fd")


def test_negative_descriptors(tmp_path):
    for call in (
        lambda: native.finalize(-1, [], 1, 0.0, 0.0),
        lambda: native.read_verified_fd(-1, bytearray(1)),
    ):
        with pytest.raises(CheckpointValueError, match="invalid file descriptor -1"):
            call()
    (outcome,) = native.verify_fds([-1], [tmp_path / "x.h5"])
    assert isinstance(outcome, CheckpointValueError)
    assert "invalid file descriptor -1" in str(outcome)
    assert native.start_writeback(-(2**31)) is None  # only a hint


def test_integer_arguments_take_their_whole_range(tmp_path):
    assert native.checkpoint_name("ck", 2**64 - 1) == f"ck_batch_{2**64 - 1}.h5"
    assert native.checkpoint_name("ck", 0) == "ck_batch_0000.h5"
    assert native.plan_retention([(2**64 - 1, True, 0.0)], 0) == []
    info = native.CheckpointInfo(tmp_path / "x.h5", 2**64 - 1, 0.0, 0.0, 2**64 - 1, "valid")
    assert (info.batch_idx, info.size_bytes) == (2**64 - 1, 2**64 - 1)
    assert native.blosc_max_frame_len(2**31 - 1) > 2**31 - 1
    assert native.blosc_max_frame_len(0) > 0
    assert native.start_writeback(UNOPENED_FD, 2**64 - 1, 2**64 - 1) is None


# --- misc -----------------------------------------------------------------------------


def test_fsync_directory(tmp_path):
    native.fsync_directory(tmp_path)
    native.fsync_directory(str(tmp_path))


def test_gil_is_released():
    """While one thread hashes, another Python thread keeps running."""
    import threading

    data = bytes(1 << 30)  # calloc'd: zero pages, no real memory
    entered = threading.Event()

    def work():
        entered.set()
        native.tree_digest(data)

    worker = threading.Thread(target=work)
    worker.start()
    entered.wait()
    spins = 0
    while worker.is_alive():
        spins += 1
    worker.join()
    # Were the GIL held during the call, this thread would get one switch interval
    # (5 ms, ~10k spins) before it; released, it spins through the whole call.
    assert spins > 100_000, spins


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_parallel_work_after_fork():
    """A forked child (the pool's threads are not there) still hashes in parallel."""
    data = os.urandom(4 << 20)
    want = spec_tree_digest(data, 4096)
    assert native.tree_digest(data, 4096) == want  # the parent's pool is running
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            code = 0 if native.tree_digest(data, 4096) == want else 3
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("tree_digest hung in a forked child")
