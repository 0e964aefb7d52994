"""Hostile input: pickles that would run code, HMAC keys (fail closed), crafted
headers, payloads that pass the digest but ask the loader for too much, and
symlinks planted at the names h5ckpt writes."""

from __future__ import annotations

import hashlib
import hmac
import os
import pickle
import secrets
import struct
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import faultkit
from h5ckpt import (
    CheckpointAuthenticationError,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointLimitError,
    CheckpointManager,
    CheckpointPickleError,
    CheckpointVersionError,
    LoadLimits,
    _native,
)

KEY = b"an hmac key"


def reseal(raw: bytearray) -> None:
    """Recompute the header digest, so that the check that fails is the intended one."""
    raw[480:512] = hashlib.sha256(bytes(raw[:480])).digest()


def pack(raw: bytearray, fmt: str, offset: int, *values) -> None:
    struct.pack_into("<" + fmt, raw, offset, *values)


def save(directory: Path, batch: int = 1, key: bytes | None = None, n: int = 2000) -> Path:
    m = CheckpointManager(directory, hmac_key=key, keep_last_n=None)
    return m.save_checkpoint(batch, np.arange(n, dtype=np.float64) + batch, {"s": batch}, 0.5)


# --------------------------------------------------------------------- pickles


class _Boom:
    """Unpickling this writes a marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_legacy_pickle_is_listed_validated_and_refused_without_running(
    ckpt_dir: Path, tmp_path: Path, seed_writer
):
    marker = tmp_path / "marker"
    blob = pickle.dumps(_Boom(marker))
    seed_writer(ckpt_dir, 5, np.ones(3), None, 0.1, pickled=blob)
    path = seed_writer(ckpt_dir, 10, np.ones(3), None, 0.2, pickled=blob)
    m = CheckpointManager(ckpt_dir, prefix="homodyne_state", keep_last_n=1)
    infos = m.list_checkpoints(verify=True)
    assert [(i.batch_idx, i.status) for i in infos] == [(5, "legacy"), (10, "legacy")]
    assert m.validate_checkpoint(path)
    assert m.find_latest_checkpoint() == path
    with pytest.raises(CheckpointPickleError) as info:
        m.load_checkpoint(path)
    assert "allow_pickle=True" in str(info.value)
    with pytest.raises(CheckpointPickleError):
        m.load_latest()
    m.cleanup_old_checkpoints()
    assert not marker.exists()
    # The payload is armed: a trusting manager runs it.
    CheckpointManager(ckpt_dir, prefix="homodyne_state", allow_pickle=True).load_checkpoint(path)
    assert marker.read_text() == "code ran"


def test_pickled_node_of_an_h5ckpt_file_is_refused_without_running(ckpt_dir: Path, tmp_path: Path):
    marker = tmp_path / "marker"
    writer = CheckpointManager(ckpt_dir, allow_pickle=True)
    path = writer.save_checkpoint(1, np.ones(2), {"evil": _Boom(marker)}, 0.0)
    assert not marker.exists()
    strict = CheckpointManager(ckpt_dir)
    assert strict.validate_checkpoint(path)
    assert strict.find_latest_checkpoint() == path
    with pytest.raises(CheckpointPickleError):
        strict.load_checkpoint(path)
    with pytest.raises(CheckpointPickleError):
        strict.load_latest()
    assert not marker.exists()
    writer.load_checkpoint(path)
    assert marker.exists()


# ------------------------------------------------------------------------ HMAC


def test_keyed_saves_carry_a_tag_over_the_header(ckpt_dir: Path):
    path = save(ckpt_dir, key=KEY)
    raw = path.read_bytes()
    (flags,) = struct.unpack_from("<I", raw, 36)
    assert flags & 1
    assert raw[104:136] == hmac.new(KEY, raw[:104], hashlib.sha256).digest()
    assert CheckpointManager(ckpt_dir, hmac_key=KEY).load_checkpoint(path)["batch_idx"] == 1
    # An unkeyed manager ignores the tag and still checks every byte.
    assert CheckpointManager(ckpt_dir).load_checkpoint(path)["batch_idx"] == 1


def test_key_from_the_environment_is_utf8(ckpt_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("H5CKPT_HMAC_KEY", "clé ✓")
    path = CheckpointManager(ckpt_dir).save_checkpoint(1, np.ones(2), {}, 0.0)
    raw = path.read_bytes()
    want = hmac.new("clé ✓".encode(), raw[:104], hashlib.sha256).digest()
    assert raw[104:136] == want
    assert CheckpointManager(ckpt_dir).validate_checkpoint(path)
    assert CheckpointManager(ckpt_dir, hmac_key="clé ✓".encode()).validate_checkpoint(path)
    # An explicit key wins over the environment.
    assert not CheckpointManager(ckpt_dir, hmac_key=b"other").validate_checkpoint(path)
    monkeypatch.delenv("H5CKPT_HMAC_KEY")
    with pytest.raises(CheckpointAuthenticationError):
        CheckpointManager(ckpt_dir, hmac_key=b"other").load_checkpoint(path)


def _sealed_garbage(path: Path, key: bytes | None) -> Path:
    """A file with valid digests (and a valid tag when keyed) over a payload that
    is not HDF5: whoever parses it gets an HDF5 error, not an integrity error."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.pwrite(fd, secrets.token_bytes(5000), 512)
        _native.finalize(fd, [], 9, 0.5, 1.7e9, key, False)
    finally:
        os.close(fd)
    return path


def test_keyed_manager_refuses_untagged_files_before_parsing(ckpt_dir: Path, seed_writer):
    good = save(ckpt_dir, batch=1, key=KEY)
    untagged = _sealed_garbage(ckpt_dir / "checkpoint_batch_0009.h5", None)
    # Unkeyed: the digests pass, so HDF5 parses the garbage and fails.
    with pytest.raises(CheckpointCorruptError) as info:
        CheckpointManager(ckpt_dir).load_checkpoint(untagged)
    assert not isinstance(info.value, CheckpointAuthenticationError)
    assert "HDF5" in str(info.value)
    # Keyed: refused on the missing tag, before HDF5 sees a byte.
    keyed = CheckpointManager(ckpt_dir, hmac_key=KEY, keep_last_n=None)
    with pytest.raises(CheckpointAuthenticationError) as info:
        keyed.load_checkpoint(untagged)
    assert "tag" in str(info.value)
    assert keyed.validate_checkpoint(untagged) is False
    assert keyed.find_latest_checkpoint() == good
    assert keyed.load_latest()["batch_idx"] == 1
    # Unkeyed, the garbage is the newest file whose digests pass; load_latest
    # falls back past it to the newest file that loads.
    assert CheckpointManager(ckpt_dir).load_latest()["batch_idx"] == 1
    # Seed-format files have no tag: refused, even one whose HDF5 is broken past
    # its signature (proof that it is not parsed).
    seed = seed_writer(ckpt_dir, 20, np.ones(2), {"a": 1}, 0.0, prefix="checkpoint")
    broken = ckpt_dir / "checkpoint_batch_0021.h5"
    broken.write_bytes(seed.read_bytes()[:8] + secrets.token_bytes(3000))
    for path in (seed, broken):
        with pytest.raises(CheckpointAuthenticationError):
            keyed.load_checkpoint(path)
        assert keyed.validate_checkpoint(path) is False
    statuses = {i.path.name: i.status for i in keyed.list_checkpoints(verify=True)}
    assert statuses == {
        good.name: "valid",
        untagged.name: "invalid",
        seed.name: "invalid",
        broken.name: "invalid",
    }
    assert keyed.find_latest_checkpoint() == good


def test_wrong_or_forged_tags_are_refused(ckpt_dir: Path):
    path = save(ckpt_dir, key=KEY)
    original = path.read_bytes()
    keyed = CheckpointManager(ckpt_dir, hmac_key=KEY)
    with pytest.raises(CheckpointAuthenticationError):
        CheckpointManager(ckpt_dir, hmac_key=b"another key").load_checkpoint(path)

    def craft(change: Callable[[bytearray], None]) -> None:
        raw = bytearray(original)
        change(raw)
        reseal(raw)
        path.write_bytes(bytes(raw))

    # A flipped tag bit, with the header digest recomputed.
    craft(lambda raw: raw.__setitem__(110, raw[110] ^ 4))
    with pytest.raises(CheckpointAuthenticationError):
        keyed.load_checkpoint(path)
    # The flag claims a tag, the tag is all zero.
    craft(lambda raw: raw.__setitem__(slice(104, 136), bytes(32)))
    with pytest.raises(CheckpointAuthenticationError):
        keyed.load_checkpoint(path)

    # The tag removed (flag cleared, tag zeroed): an untagged file.
    def strip(raw: bytearray) -> None:
        pack(raw, "I", 36, 0)
        raw[104:136] = bytes(32)

    craft(strip)
    with pytest.raises(CheckpointAuthenticationError):
        keyed.load_checkpoint(path)
    assert CheckpointManager(ckpt_dir).validate_checkpoint(path)  # digests still fine

    # A changed payload byte with the payload digest recomputed and the header
    # resealed: consistent digests, but without the key no valid tag.
    def forge(raw: bytearray) -> None:
        raw[len(raw) // 2] ^= 1
        chunk = 1 << struct.unpack_from("<I", raw, 32)[0]
        raw[72:104] = _native.tree_digest(bytes(raw[512:]), chunk)

    craft(forge)
    [header] = _native.verify_files([path])  # the digests check out
    assert isinstance(header, _native.Header), header
    assert header.batch_idx == 1
    with pytest.raises(CheckpointAuthenticationError):
        keyed.load_checkpoint(path)
    assert keyed.validate_checkpoint(path) is False
    # An unkeyed manager still verifies the digest: a payload change without a new
    # digest is caught.
    raw = bytearray(original)
    raw[len(raw) // 2] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointCorruptError):
        CheckpointManager(ckpt_dir).load_checkpoint(path)


# ------------------------------------------------------------- crafted headers


def _length(raw: bytearray, delta: int) -> None:
    (length,) = struct.unpack_from("<Q", raw, 24)
    (log2,) = struct.unpack_from("<I", raw, 32)
    pack(raw, "Q", 24, length + delta)
    pack(raw, "Q", 40, -(-(length + delta) // (1 << log2)))  # chunk_count follows


def _log2(value: int, recount: bool = False) -> Callable[[bytearray], None]:
    def change(raw: bytearray) -> None:
        pack(raw, "I", 32, value)
        if recount:
            (length,) = struct.unpack_from("<Q", raw, 24)
            pack(raw, "Q", 40, -(-length // (1 << value)))

    return change


CRAFTED: dict[str, tuple[Callable[[bytearray], None], type, str]] = {
    "payload_length lies (longer)": (lambda r: _length(r, 1), CheckpointCorruptError, "truncated"),
    "payload_length lies (shorter)": (lambda r: _length(r, -1), CheckpointCorruptError, "bytes"),
    "payload_length absurd": (lambda r: _length(r, 2**62), CheckpointCorruptError, "truncated"),
    "payload_length out of range": (
        lambda r: pack(r, "Q", 24, 2**64 - 1),
        CheckpointCorruptError,
        "payload_length",
    ),
    "chunk_count absurd": (
        lambda r: pack(r, "Q", 40, 2**63),
        CheckpointCorruptError,
        "chunk_count",
    ),
    "chunk_count zero": (lambda r: pack(r, "Q", 40, 0), CheckpointCorruptError, "chunk_count"),
    "chunk_log2 31": (_log2(31), CheckpointCorruptError, "chunk_log2"),
    "chunk_log2 0": (_log2(0), CheckpointCorruptError, "chunk_log2"),
    "chunk_log2 11": (_log2(11), CheckpointCorruptError, "chunk_log2"),
    "chunk_log2 4096 B, recounted": (_log2(12, True), CheckpointCorruptError, "digest"),
    "payload_offset 0": (lambda r: pack(r, "Q", 16, 0), CheckpointCorruptError, "payload_offset"),
    "payload_offset 1024": (
        lambda r: pack(r, "Q", 16, 1024),
        CheckpointCorruptError,
        "payload_offset",
    ),
    "header_size 0": (lambda r: pack(r, "I", 12, 0), CheckpointCorruptError, "header_size"),
    "header_size 4096": (lambda r: pack(r, "I", 12, 4096), CheckpointCorruptError, "header_size"),
    "flags bit 1": (lambda r: pack(r, "I", 36, 2), CheckpointCorruptError, "flag"),
    "flags bit 31": (lambda r: pack(r, "I", 36, 2**31), CheckpointCorruptError, "flag"),
    "tag without flag": (
        lambda r: r.__setitem__(slice(104, 136), b"\x01" * 32),
        CheckpointCorruptError,
        "HMAC",
    ),
    "major 0": (lambda r: pack(r, "H", 8, 0), CheckpointCorruptError, "major"),
    "major 2": (lambda r: pack(r, "H", 8, 2), CheckpointVersionError, "version"),
    "major 65535": (lambda r: pack(r, "H", 8, 65535), CheckpointVersionError, "version"),
    "magic": (lambda r: r.__setitem__(3, ord("X")), CheckpointCorruptError, "not"),
    "batch_idx differs from HDF5": (
        lambda r: pack(r, "Q", 48, 2),
        CheckpointCorruptError,
        "disagree",
    ),
    "loss differs from HDF5": (
        lambda r: pack(r, "d", 56, 0.25),
        CheckpointCorruptError,
        "disagree",
    ),
    "payload digest": (lambda r: r.__setitem__(80, r[80] ^ 1), CheckpointCorruptError, "digest"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_header_is_refused_by_the_intended_check(ckpt_dir: Path, case: str):
    older = save(ckpt_dir, batch=0)
    path = save(ckpt_dir, batch=1)
    change, error, words = CRAFTED[case]
    raw = bytearray(path.read_bytes())
    change(raw)
    reseal(raw)
    path.write_bytes(bytes(raw))
    m = CheckpointManager(ckpt_dir, keep_last_n=None)
    with pytest.raises(error) as info:
        m.load_checkpoint(path)
    assert words.lower() in str(info.value).lower(), str(info.value)
    # One definition of valid: also when the digests agree and only the payload's
    # checks can see that the header and the HDF5 attributes tell different stories.
    assert m.validate_checkpoint(path) is False
    statuses = {i.path.name: i.status for i in m.list_checkpoints(verify=True)}
    assert statuses == {older.name: "valid", path.name: "invalid"}
    assert m.find_latest_checkpoint() == older
    assert m.load_latest()["batch_idx"] == 0


def test_header_digest_mismatch(ckpt_dir: Path):
    path = save(ckpt_dir)
    raw = bytearray(path.read_bytes())
    raw[300] = 1  # a reserved byte, header digest not recomputed
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointCorruptError, match="header digest"):
        CheckpointManager(ckpt_dir).load_checkpoint(path)


def test_minor_version_and_unkeyed_flag_without_key(ckpt_dir: Path):
    """What the format allows still loads: a newer minor version; a tag flag read by
    a reader without a key (it ignores the tag)."""
    path = save(ckpt_dir)
    raw = bytearray(path.read_bytes())
    pack(raw, "H", 10, 65535)
    reseal(raw)
    path.write_bytes(bytes(raw))
    assert CheckpointManager(ckpt_dir).load_checkpoint(path)["batch_idx"] == 1
    keyed = save(ckpt_dir, batch=2, key=KEY)
    assert CheckpointManager(ckpt_dir).load_checkpoint(keyed)["batch_idx"] == 2


def test_valid_header_over_another_payload(ckpt_dir: Path, tmp_path: Path):
    a = save(ckpt_dir, batch=1)
    b = save(tmp_path, batch=1, n=3000)  # another length
    c = save(tmp_path / "c", batch=1)  # the same length, other bytes (timestamp)
    assert a.stat().st_size == c.stat().st_size != b.stat().st_size
    header = a.read_bytes()[:512]
    m = CheckpointManager(ckpt_dir)
    for other, words in ((b, "bytes"), (c, "digest")):
        a.write_bytes(header + other.read_bytes()[512:])
        with pytest.raises(CheckpointCorruptError) as info:
            m.load_checkpoint(a)
        assert words in str(info.value)
        assert m.validate_checkpoint(a) is False


@settings(max_examples=300, deadline=None)
@given(
    edits=st.lists(st.tuples(st.integers(0, 479), st.integers(0, 255)), min_size=1, max_size=6),
    reseal_digest=st.booleans(),
)
def test_parse_header_of_mutated_valid_headers_only_raises_checkpoint_errors(edits, reseal_digest):
    raw = bytearray(_VALID_HEADER)
    for at, value in edits:
        raw[at] = value
    if reseal_digest:
        reseal(raw)
    try:
        header = _native.parse_header(bytes(raw))
    except CheckpointError:
        return
    # Accepted: then every rule of docs/format.md holds.
    assert raw[:8] == b"\x89H5C\r\n\x1a\n"
    assert header.format_major == 1 and header.payload_offset == 512
    assert 4096 <= header.chunk_size <= 2**30
    assert header.chunk_count == -(-header.payload_length // header.chunk_size)
    assert header.flags in (0, 1)


def _valid_header() -> bytes:
    fd = os.memfd_create("h")
    try:
        os.pwrite(fd, bytes(6000), 512)
        _native.finalize(fd, [], 3, 0.5, 1.0, None, False, 4096)
        return os.pread(fd, 512, 0)
    finally:
        os.close(fd)


_VALID_HEADER = _valid_header()


# ------------------------------------------------- payloads hostile to the loader


def _tag(obj, tag: str) -> None:
    obj.attrs["h5ckpt_type"] = np.bytes_(tag.encode())


def sealed_payload(path: Path, build: Callable[[h5py.File], None], key: bytes | None = None):
    """A real HDF5 payload built by ``build`` (which must create ``optimizer_state``),
    sealed with a correct header: the digests pass, the loader's limits are tested."""
    ts = 1.7e9
    with h5py.File(path, "w", userblock_size=512, libver=("v110", "latest")) as f:
        f.attrs["h5ckpt_format"] = "1.0"
        f.attrs["h5ckpt_version"] = "hostile"
        f.attrs["batch_idx"] = np.int64(3)
        f.attrs["loss"] = np.float64(0.5)
        f.attrs["timestamp"] = np.float64(ts)
        _tag(f.create_dataset("parameters", data=np.zeros(3)), "ndarray")
        _tag(f.create_group("metadata"), "dict")
        build(f)
    fd = os.open(path, os.O_RDWR)
    try:
        _native.finalize(fd, [], 3, 0.5, ts, key, True)
    finally:
        os.close(fd)
    [header] = _native.verify_files([path], key)
    assert isinstance(header, _native.Header), header
    assert header.batch_idx == 3
    return path


def _terabytes(f: h5py.File) -> None:
    g = f.create_group("optimizer_state")
    _tag(g, "dict")
    _tag(g.create_dataset("w", shape=(2**37,), dtype="f8", chunks=(2**16,)), "ndarray")


def _terabyte_bytes(f: h5py.File) -> None:
    g = f.create_group("optimizer_state")
    _tag(g, "dict")
    _tag(g.create_dataset("blob", shape=(2**40,), dtype="u1", chunks=(2**20,)), "bytes")


def _deep(f: h5py.File, levels: int = 10_000) -> None:
    g = f.create_group("optimizer_state")
    _tag(g, "list")
    for _ in range(levels):
        g = g.create_group("0")
        _tag(g, "list")
    _tag(g.create_dataset("0", data=np.int64(1)), "int")


def _many_attributes(where: str, count: int = 20_000) -> Callable[[h5py.File], None]:
    def build(f: h5py.File) -> None:
        gcpl = h5py.h5p.create(h5py.h5p.GROUP_CREATE)
        gcpl.set_attr_phase_change(0, 0)  # dense attribute storage from the start
        gid = h5py.h5g.create(f.id, b"optimizer_state", gcpl=gcpl)
        _tag(h5py.Group(gid), "dict")
        target = {"tree": gid, "root": f["/"].id, "parameters": f["parameters"].id}[where]
        space = h5py.h5s.create(h5py.h5s.SCALAR)
        for i in range(count):
            h5py.h5a.create(target, b"%x" % i, h5py.h5t.STD_U8LE, space)

    return build


HOSTILE = {
    "a dataset declaring 1 TiB": (_terabytes, "max_array_bytes"),
    "a bytes node declaring 1 TiB": (_terabyte_bytes, "max_array_bytes"),
    "a tree nested 10,000 deep": (_deep, "max_depth"),
    "20,000 attributes on a tree node": (_many_attributes("tree"), "max_attributes"),
    "20,000 attributes on the parameters": (_many_attributes("parameters"), "max_attributes"),
    "20,000 attributes on the root group": (_many_attributes("root"), "max_attributes"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_payload_is_refused_under_a_memory_cap(tmp_path: Path, case: str):
    build, limit = HOSTILE[case]
    path = sealed_payload(tmp_path / "checkpoint_batch_0003.h5", build)
    assert path.stat().st_size < 8 * 2**20
    outcome = faultkit.load_capped(path)
    assert outcome["result"] == "CheckpointLimitError", outcome
    assert limit in outcome["message"] and limit in outcome["context"], outcome


def test_limits_are_adjustable(tmp_path: Path):
    def wide(f: h5py.File) -> None:
        g = f.create_group("optimizer_state", track_order=True)
        _tag(g, "list")
        leaf = g.create_dataset("0", data=np.int64(1))
        _tag(leaf, "int")
        for i in range(1, 5000):
            g[str(i)] = leaf  # hard links to one dataset: 5,000 nodes

    path = sealed_payload(tmp_path / "checkpoint_batch_0003.h5", wide)
    m = CheckpointManager(tmp_path, load_limits=LoadLimits(max_nodes=1000))
    with pytest.raises(CheckpointLimitError, match="max_nodes"):
        m.load_checkpoint(path)
    assert CheckpointManager(tmp_path).load_checkpoint(path)["optimizer_state"] == [1] * 5000
    (tmp_path / "deep").mkdir()
    deep = sealed_payload(tmp_path / "deep" / "checkpoint_batch_0003.h5", lambda f: _deep(f, 1000))
    with pytest.raises(CheckpointLimitError, match="max_depth"):
        CheckpointManager(tmp_path, load_limits=LoadLimits(max_depth=999)).load_checkpoint(deep)
    data = CheckpointManager(tmp_path, load_limits=LoadLimits(max_depth=1001)).load_checkpoint(deep)
    node, depth = data["optimizer_state"], 0
    while isinstance(node, list) and node and isinstance(node[0], list):
        node, depth = node[0], depth + 1
    assert depth == 1000
    normal = save(tmp_path / "n", n=4096)
    small = LoadLimits(max_array_bytes=1000)
    with pytest.raises(CheckpointLimitError, match="max_array_bytes"):
        CheckpointManager(normal.parent, load_limits=small).load_checkpoint(normal)
    # h5ckpt writes five attributes on the root group, one on every tree node.
    few = CheckpointManager(normal.parent, load_limits=LoadLimits(max_attributes=4))
    with pytest.raises(CheckpointLimitError, match="max_attributes"):
        few.load_checkpoint(normal)
    enough = CheckpointManager(normal.parent, load_limits=LoadLimits(max_attributes=5))
    assert enough.load_checkpoint(normal)["batch_idx"] == 1


def test_links_out_of_the_file_are_never_followed(tmp_path: Path):
    outside = tmp_path / "outside.h5"
    with h5py.File(outside, "w") as f:
        _tag(f.create_dataset("secret", data=np.arange(3)), "ndarray")

    def build(f: h5py.File) -> None:
        g = f.create_group("optimizer_state")
        _tag(g, "dict")
        g["ext"] = h5py.ExternalLink(str(outside), "/secret")
        g["soft"] = h5py.SoftLink("/parameters")

    path = sealed_payload(tmp_path / "checkpoint_batch_0003.h5", build)
    with pytest.raises(CheckpointCorruptError, match="link"):
        CheckpointManager(tmp_path).load_checkpoint(path)


# ------------------------------------------------------- file modes and symlinks


def test_files_are_created_with_the_umask_mode(ckpt_dir: Path):
    ckpt_dir.chmod(0o755)
    old = os.umask(0o077)
    try:
        path = save(ckpt_dir)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o600
    # Readable by whoever may write the directory (its owner only here).
    assert (ckpt_dir / ".h5ckpt.lock").stat().st_mode & 0o777 == 0o600


def test_symlink_at_a_checkpoint_name_is_replaced_not_written_through(
    ckpt_dir: Path, tmp_path: Path
):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    link = ckpt_dir / "checkpoint_batch_0001.h5"
    link.symlink_to(victim)
    m = CheckpointManager(ckpt_dir, keep_last_n=1)
    assert m.list_checkpoints() == []  # symlinks are not checkpoints
    path = m.save_checkpoint(1, np.ones(2), {}, 0.0)
    assert not path.is_symlink() and m.validate_checkpoint(path)
    assert victim.read_bytes() == b"precious"
    # Retention never deletes through a symlink either.
    link2 = ckpt_dir / "checkpoint_batch_0000.h5"
    link2.symlink_to(victim)
    m.save_checkpoint(2, np.ones(2), {}, 0.0)
    assert victim.read_bytes() == b"precious"


def test_symlink_at_a_temp_name_is_never_written_through(
    ckpt_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    token = "0123456789ab"
    planted = ckpt_dir / f".checkpoint_batch_0001.h5.{os.getpid()}.{token}.tmp"
    planted.symlink_to(victim)
    dangling = ckpt_dir / f".checkpoint_batch_0001.h5.{os.getpid()}.{'f' * 12}.tmp"
    dangling.symlink_to(tmp_path / "would-be-created")
    # The next two temp names h5ckpt draws are exactly the planted ones.
    tokens = iter([token, "f" * 12])
    real = secrets.token_hex
    monkeypatch.setattr(secrets, "token_hex", lambda n: next(tokens, None) or real(n))
    m = CheckpointManager(ckpt_dir)
    path = m.save_checkpoint(1, np.ones(2), {}, 0.0)
    assert m.validate_checkpoint(path)
    assert victim.read_bytes() == b"precious"
    assert not (tmp_path / "would-be-created").exists()
    assert planted.is_symlink() and dangling.is_symlink()


def test_symlink_at_the_lock_name_is_refused(ckpt_dir: Path, tmp_path: Path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (ckpt_dir / ".h5ckpt.lock").symlink_to(victim)
    with pytest.raises(CheckpointError):
        CheckpointManager(ckpt_dir).save_checkpoint(1, np.ones(2), {}, 0.0)
    assert victim.read_bytes() == b"precious"
    assert faultkit.checkpoint_names(ckpt_dir) == []
    assert faultkit.temp_names(ckpt_dir) == []
