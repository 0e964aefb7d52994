"""What loading and validating may conclude about a file, and what they may cost.

* A failure of the reader (memory, descriptors) is not corruption: nothing is marked
  invalid or deleted, and the error says what ran out.
* One definition of valid: what validates loads, with the manager's key and limits,
  and every caller (validate, list, find-latest, retention, ``h5ckpt verify`` and
  ``ls --verify``) gives the same verdict.
* Hostile sizes (a legacy file declaring gigabytes, a terabyte sparse file) cost a
  small constant amount of memory and give a clear error.
* A manager never commits a checkpoint its own limits refuse to load.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from h5ckpt import (
    CheckpointError,
    CheckpointLimitError,
    CheckpointManager,
    LoadLimits,
    _native,
)
from h5ckpt.cli import main as cli_main

GIB = 1 << 30


def child(script: str, *args: str, timeout: float = 300) -> dict:
    """Run ``script`` in a fresh interpreter; it prints one JSON line last."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


#: Caps the child's address space at what it uses now plus argv[2] MiB.
CAP = """
import json, resource, sys
from pathlib import Path

def cap(extra_mb):
    with open("/proc/self/status") as f:
        vm = next(int(l.split()[1]) for l in f if l.startswith("VmSize:")) * 1024
    limit = vm + extra_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
"""


# ------------------------------------------------------- resource failures (item 3)


def test_out_of_memory_while_loading_is_not_corruption(tmp_path: Path):
    """A good compressed checkpoint that decodes to 1 GiB, loaded under an
    address-space limit: an error that says memory ran out, nothing marked or
    deleted; it loads without the limit."""
    d = tmp_path / "ckpt"
    m = CheckpointManager(d, keep_last_n=None)
    m.save_checkpoint(0, np.ones(8), {"step": 0}, 1.0)
    big = m.save_checkpoint(10, np.zeros(GIB // 8), {"step": 10}, 0.5)
    assert big.stat().st_size < 64 << 20  # zeros compress well
    out = child(
        CAP
        + """
from h5ckpt import CheckpointManager
import numpy as np
d = Path(sys.argv[1])
m = CheckpointManager(d, keep_last_n=None, delete_invalid=True)
cap(256)
report = {}
try:
    data = m.load_latest()
    report["load_latest"] = data["batch_idx"] if data else None
except Exception as exc:
    report["load_latest"] = type(exc).__name__
    report["message"] = str(exc)
report["after"] = {i.path.name: i.status for i in m.list_checkpoints()}
m.save_checkpoint(20, np.ones(8), {"step": 20}, 0.25)  # retention runs, delete_invalid
report["kept"] = sorted(p.name for p in d.glob("*.h5"))
report["listed"] = {i.path.name: i.status for i in m.list_checkpoints(verify=True)}
print(json.dumps(report))
""",
        str(d),
    )
    assert out["load_latest"] == "CheckpointResourceError", out
    assert "memory" in out["message"]
    assert out["after"][big.name] != "invalid", out
    assert big.name in out["kept"], out
    assert out["listed"][big.name] == "valid", out
    data = CheckpointManager(d).load_checkpoint(big)
    assert data["batch_idx"] == 10 and data["parameters"].nbytes == GIB
    assert not data["parameters"].any()


NOFILE = """
import json, os, resource, sys
from pathlib import Path
from h5ckpt import CheckpointManager, CheckpointError

def no_more_descriptors():
    used = len(os.listdir("/proc/self/fd"))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (used - 1, hard))
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

def outcome(call):
    try:
        return repr(call())
    except CheckpointError as exc:
        return type(exc).__name__
"""


def test_no_descriptor_left_is_not_corruption(tmp_path: Path, seed_writer):
    """EMFILE while hashing h5ckpt files, checking legacy files, scanning: errors
    that say so, no file remembered invalid, a later cleanup with delete_invalid
    deletes nothing, and everything is valid once descriptors are back."""
    d = tmp_path / "ckpt"
    m = CheckpointManager(d, keep_last_n=None)
    for b in (0, 10):
        m.save_checkpoint(b, np.arange(5000.0), {"step": b}, 0.5)
    seeds = tmp_path / "seed"
    seeds.mkdir()
    seed_writer(seeds, 3, np.ones(4), {"lr": 0.1}, 0.5)
    out = child(
        NOFILE
        + """
report = {}
for name, prefix in (sys.argv[1], "checkpoint"), (sys.argv[2], "homodyne_state"):
    m = CheckpointManager(Path(name), keep_last_n=None, delete_invalid=True,
                          allow_pickle=True, prefix=prefix)
    infos = m.list_checkpoints()  # the headers, read while descriptors are left
    restore = no_more_descriptors()
    r = {"checked": {i.path.name: [i.status, i.error or ""] for i in m._verifier.verify(infos)}}
    r["latest"] = outcome(m.find_latest_checkpoint)
    r["load_latest"] = outcome(m.load_latest)
    r["validate"] = [m.validate_checkpoint(i.path) for i in infos]
    try:
        m._verifier.verify(infos, strict=True)
        r["strict"] = None
    except Exception as exc:
        r["strict"] = type(exc).__name__
    restore()
    r["deleted"] = [p.name for p in m.cleanup_old_checkpoints()]
    r["after"] = {i.path.name: i.status for i in m.list_checkpoints(verify=True)}
    latest = m.find_latest_checkpoint()
    r["latest after"] = latest.name if latest else None
    report[prefix] = r
print(json.dumps(report))
""",
        str(d),
        str(seeds),
    )
    for prefix, names, good, newest in (
        ("checkpoint", ["checkpoint_batch_0000.h5", "checkpoint_batch_0010.h5"], "valid", 1),
        ("homodyne_state", ["homodyne_state_batch_0003.h5"], "legacy", 0),
    ):
        r = out[prefix]
        assert sorted(r["checked"]) == names, r
        for status, error in r["checked"].values():
            assert status == "unverified", r
            assert "could not be checked" in error and "Too many open files" in error, r
        assert r["strict"] == "CheckpointResourceError", r
        assert r["latest"] == "CheckpointResourceError", r
        assert r["load_latest"] == "CheckpointResourceError", r
        assert r["validate"] == [False] * len(names)
        assert r["deleted"] == [], r
        assert r["after"] == dict.fromkeys(names, good), r
        assert r["latest after"] == names[newest], r


# ----------------------------------------------- one definition of valid (item 6)


def _reseal(path: Path, **fields: float) -> None:
    """Rewrite the header of a committed file with other fields and correct digests
    (what a careless or hostile writer can do): only the payload tells."""
    header = _native.read_header(path)
    values = {"batch_idx": header.batch_idx, "loss": header.loss, "timestamp": header.timestamp}
    values.update(fields)
    fd = os.open(path, os.O_RDWR)
    try:
        _native.finalize(
            fd, [], values["batch_idx"], values["loss"], values["timestamp"], None, False
        )
    finally:
        os.close(fd)
    [header] = _native.verify_files([path])
    assert isinstance(header, _native.Header), header
    assert header.loss == values["loss"]


def _cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, object]:
    capsys.readouterr()
    status = cli_main([*argv, "--json"])
    return status, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    "forge",
    ["loss", "timestamp", "batch_idx", "renamed", "garbage payload", "too deep"],
)
def test_every_caller_gives_one_verdict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], forge: str
):
    """A file whose digests verify but that does not load is invalid for
    validate_checkpoint, list_checkpoints(verify=True), find_latest_checkpoint,
    h5ckpt verify and h5ckpt ls --verify alike; load_latest resumes from the
    older good file without a failed load first."""
    d = tmp_path / "ckpt"
    m = CheckpointManager(d, keep_last_n=None, load_limits=LoadLimits(max_depth=8))
    older = m.save_checkpoint(0, np.ones(8), {"step": 0}, 1.0)
    path = m.save_checkpoint(10, np.arange(100.0), {"step": 10}, 0.5)
    if forge == "loss":
        _reseal(path, loss=0.125)
    elif forge == "timestamp":
        _reseal(path, timestamp=1.0)
    elif forge == "batch_idx":
        _reseal(path, batch_idx=11)
    elif forge == "renamed":
        path = path.rename(d / "checkpoint_batch_0020.h5")
    elif forge == "garbage payload":
        raw = bytearray(path.read_bytes())
        raw[512:1024] = os.urandom(512)  # the HDF5 superblock
        path.write_bytes(bytes(raw))
        _reseal(path)
    else:
        # Deeper than this manager's max_depth=8, sealed by a manager allowing it.
        deep: dict = {}
        node = deep
        for _ in range(12):
            node["x"] = {}
            node = node["x"]
        path.unlink()
        CheckpointManager(d, load_limits=LoadLimits(max_depth=20)).save_checkpoint(
            10, np.ones(8), deep, 0.5
        )
    fresh = CheckpointManager(d, keep_last_n=None, load_limits=LoadLimits(max_depth=8))
    with pytest.raises(CheckpointError):
        fresh.load_checkpoint(path)
    assert fresh.validate_checkpoint(path) is False
    statuses = {i.path.name: i.status for i in fresh.list_checkpoints(verify=True)}
    assert statuses == {older.name: "valid", path.name: "invalid"}
    fresh = CheckpointManager(d, keep_last_n=None, load_limits=LoadLimits(max_depth=8))
    assert fresh.find_latest_checkpoint() == older
    assert fresh.load_latest()["batch_idx"] == 0
    if forge == "too deep":
        # The CLI reads with the default limits, under which this file loads.
        assert CheckpointManager(d).validate_checkpoint(path) is True
        assert CheckpointManager(d).load_checkpoint(path)["batch_idx"] == 10
        return
    status, reports = _cli_json(capsys, "verify", str(path))
    assert status == 1 and reports[0]["status"] == "invalid", reports
    _, listed = _cli_json(capsys, "ls", str(d), "--verify")
    by_name = {row["name"]: row for row in listed}
    assert by_name[path.name]["status"] == "invalid", listed
    assert by_name[older.name]["latest"] is True
    _, listed = _cli_json(capsys, "ls", str(d))  # without --verify: the same newest
    assert {row["name"]: row["latest"] for row in listed}[older.name] is True


def test_what_validates_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """The other direction: good files validate everywhere and load."""
    d = tmp_path / "ckpt"
    m = CheckpointManager(d, keep_last_n=None)
    state = {"w": np.arange(300_000.0), "text": "é" * 1000, "blob": b"x" * 5000, "t": (1, None)}
    paths = [m.save_checkpoint(b, np.full(10, b), state, 0.1 * b) for b in (1, 2)]
    fresh = CheckpointManager(d, keep_last_n=None)
    assert [i.status for i in fresh.list_checkpoints(verify=True)] == ["valid", "valid"]
    for p in paths:
        assert fresh.validate_checkpoint(p) is True
        assert fresh.load_checkpoint(p)["optimizer_state"]["text"] == "é" * 1000
    status, reports = _cli_json(capsys, "verify", str(d))
    assert status == 0 and [r["status"] for r in reports] == ["valid", "valid"]


# ------------------------------------------------ hostile legacy sizes (item 9)


def _hollow_legacy(path: Path) -> Path:
    """A predecessor-format file of a few KB declaring a 2 GiB optimizer state that
    was never written (its checksum is that of 2 GiB of zeros)."""
    import hashlib

    zeros = hashlib.sha256()
    block = bytes(1 << 24)
    for _ in range(2 * GIB // len(block)):
        zeros.update(block)
    with h5py.File(path, "w") as f:
        f.create_dataset("parameters", data=np.ones(4))
        # Contiguous, allocated late: declared, never written, not in the file.
        f.create_dataset("optimizer_state", shape=(2 * GIB,), dtype=np.uint8)
        f.attrs["batch_idx"] = 7
        f.attrs["loss"] = 0.5
        f.attrs["checksum"] = zeros.hexdigest()
        f.attrs["version"] = "2.4.0"
        f.attrs["timestamp"] = 1.7e9
    assert path.stat().st_size < 16 << 10
    return path


def test_hostile_legacy_file_costs_little_memory(tmp_path: Path, seed_writer):
    d = tmp_path / "seed"
    d.mkdir()
    seed_writer(d, 3, np.ones(4), {"lr": 0.1}, 0.5)
    hollow = _hollow_legacy(d / "homodyne_state_batch_0007.h5")
    out = child(
        CAP
        + """
import resource
from h5ckpt import CheckpointManager, CheckpointError
m = CheckpointManager(Path(sys.argv[1]), prefix="homodyne_state", allow_pickle=True)
cap(3 * 1024)  # would the whole dataset be read, twice, this is where it stops
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
latest = m.find_latest_checkpoint()
report = {"latest": latest.name if latest else None}
report["listed"] = {i.path.name: [i.status, i.error] for i in m.list_checkpoints(verify=True)}
try:
    m.load_checkpoint(Path(sys.argv[2]))
    report["load"] = "loaded"
except CheckpointError as exc:
    report["load"] = type(exc).__name__
report["grew_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps(report))
""",
        str(d),
        str(hollow),
    )
    assert out["latest"] == "homodyne_state_batch_0003.h5", out
    status, error = out["listed"][hollow.name]
    assert status == "invalid" and "optimizer_state" in error, out
    assert out["load"] == "CheckpointCorruptError", out
    assert out["grew_kib"] < 64 * 1024, out  # far from 2 GiB, let alone 4


def test_legacy_loading_obeys_load_limits(tmp_path: Path, seed_writer):
    d = tmp_path / "seed"
    d.mkdir()
    path = seed_writer(d, 3, np.ones(100_000), {"lr": 0.1}, 0.5, {"curve": np.ones(50_000)})
    small = CheckpointManager(
        d, prefix="homodyne_state", allow_pickle=True, load_limits=LoadLimits(max_array_bytes=1000)
    )
    with pytest.raises(CheckpointLimitError, match="max_array_bytes"):
        small.load_checkpoint(path)
    few = CheckpointManager(
        d, prefix="homodyne_state", allow_pickle=True, load_limits=LoadLimits(max_attributes=2)
    )
    with pytest.raises(CheckpointLimitError, match="max_attributes"):
        few.load_checkpoint(path)
    assert few.validate_checkpoint(path) is False
    data = CheckpointManager(d, prefix="homodyne_state", allow_pickle=True).load_checkpoint(path)
    assert data["optimizer_state"] == {"lr": 0.1} and data["metadata"]["curve"].size == 50_000


# --------------------------------------------------- a terabyte sparse file (item 10)


def test_terabyte_sparse_file_is_refused_before_any_allocation(tmp_path: Path):
    d = tmp_path / "ckpt"
    m = CheckpointManager(d, keep_last_n=None)
    good = m.save_checkpoint(1, np.ones(8), {}, 0.5)
    junk = d / "checkpoint_batch_0002.h5"
    with open(junk, "wb") as f:
        f.write(_native.MAGIC)
    os.truncate(junk, 1 << 40)
    # A real header, resealed, that agrees with the terabyte: only its size is wrong.
    forged = d / "checkpoint_batch_0003.h5"
    raw = bytearray(good.read_bytes()[:512])
    length = (1 << 40) - 512
    log2 = int.from_bytes(raw[32:36], "little")
    raw[24:32] = length.to_bytes(8, "little")
    raw[40:48] = (-(-length // (1 << log2))).to_bytes(8, "little")
    raw[48:56] = (3).to_bytes(8, "little")
    import hashlib

    raw[480:512] = hashlib.sha256(bytes(raw[:480])).digest()
    with open(forged, "wb") as f:
        f.write(raw)
    os.truncate(forged, 1 << 40)
    assert _native.read_header(forged).batch_idx == 3
    out = child(
        CAP
        + """
from h5ckpt import CheckpointManager, LoadLimits
m = CheckpointManager(Path(sys.argv[1]).parent, load_limits=LoadLimits(max_array_bytes=2**30))
default = CheckpointManager(Path(sys.argv[1]).parent)
cap(128)
report = {}
for name, manager, path in (("junk", default, sys.argv[1]), ("forged", default, sys.argv[2]),
                            ("forged, limited", m, sys.argv[2])):
    try:
        manager.load_checkpoint(path)
        report[name] = ["loaded", ""]
    except BaseException as exc:
        report[name] = [type(exc).__name__, str(exc)]
report["validate"] = m.validate_checkpoint(sys.argv[2])
print(json.dumps(report))
""",
        str(junk),
        str(forged),
        timeout=120,
    )
    assert out["junk"][0] == "CheckpointCorruptError", out
    assert out["forged"][0] == "CheckpointResourceError", out
    assert "memory" in out["forged"][1] and str(1 << 40) in out["forged"][1], out
    assert out["forged, limited"][0] == "CheckpointLimitError", out
    assert "max_array_bytes" in out["forged, limited"][1], out
    assert out["validate"] is False


# --------------------------------------------- saves obey the loader's limits (item 11)


def _nested(depth: int) -> dict:
    root: dict = {}
    node = root
    for _ in range(depth - 1):
        node["x"] = {}
        node = node["x"]
    node["x"] = 1
    return root


def test_saves_obey_the_managers_own_depth_limit(tmp_path: Path):
    d = tmp_path / "ckpt"
    shallow = CheckpointManager(d, keep_last_n=None, load_limits=LoadLimits(max_depth=4))
    with pytest.raises(CheckpointError, match="max_depth=4") as info:
        shallow.save_checkpoint(1, np.ones(3), _nested(10), 0.5)
    assert "LoadLimits(max_depth=" in str(info.value)
    assert sorted(os.listdir(d)) == [".h5ckpt.lock"] or not list(d.glob("*.h5"))
    assert not list(d.glob("*.h5")) and not list(d.glob(".*.tmp"))
    deep = CheckpointManager(d, keep_last_n=None, load_limits=LoadLimits(max_depth=1000))
    path = deep.save_checkpoint(2, np.ones(3), _nested(400), 0.5)
    node, depth = deep.load_checkpoint(path)["optimizer_state"], 0
    while isinstance(node, dict):
        node, depth = node["x"], depth + 1
    assert depth == 400


def test_saves_obey_the_managers_own_byte_limit(tmp_path: Path):
    d = tmp_path / "ckpt"
    m = CheckpointManager(d, keep_last_n=None, load_limits=LoadLimits(max_array_bytes=1 << 20))
    m.save_checkpoint(1, np.ones(1000), {}, 0.5)
    with pytest.raises(CheckpointLimitError, match="max_array_bytes") as info:
        m.save_checkpoint(2, np.zeros(1 << 18), {"more": np.zeros(1000)}, 0.5)  # 2 MiB
    assert "LoadLimits(max_array_bytes=" in str(info.value)
    assert [p.name for p in d.glob("*.h5")] == ["checkpoint_batch_0001.h5"]
    assert not list(d.glob(".*.tmp"))
    few = CheckpointManager(d, keep_last_n=None, load_limits=LoadLimits(max_attributes=3))
    with pytest.raises(CheckpointLimitError, match="max_attributes"):
        few.save_checkpoint(3, np.ones(10), {}, 0.5)
    assert [p.name for p in d.glob("*.h5")] == ["checkpoint_batch_0001.h5"]
    assert m.load_latest()["batch_idx"] == 1


@pytest.mark.slow
def test_default_budget_is_checked_before_the_commit(tmp_path: Path):
    """8.25 GiB of zeros compress to a few tens of MB, beyond the default budget
    max(8 GiB, 64 x file size): the save fails and commits nothing. np.zeros
    memory that is only read stays unallocated (the zero page), so this needs no
    8 GiB of RAM."""
    out = child(
        """
import json, resource, sys
from pathlib import Path
import numpy as np
from h5ckpt import CheckpointManager, CheckpointError
d = Path(sys.argv[1])
m = CheckpointManager(d, keep_last_n=None)
m.save_checkpoint(1, np.ones(10), {}, 0.5)
report = {}
try:
    m.save_checkpoint(2, np.zeros(int(8.25 * 2**30) // 8), {}, 0.5)
    report["save"] = ["saved", ""]
except CheckpointError as exc:
    report["save"] = [type(exc).__name__, str(exc)]
report["files"] = sorted(p.name for p in d.iterdir())
report["latest"] = m.load_latest()["batch_idx"]
report["rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
print(json.dumps(report))
""",
        str(tmp_path),
        timeout=600,
    )
    kind, message = out["save"]
    assert kind == "CheckpointLimitError", out
    assert "max_array_bytes" in message and "64 x file size" in message, out
    assert "LoadLimits(max_array_bytes=" in message
    assert out["files"] == [".h5ckpt.lock", "checkpoint_batch_0001.h5"], out
    assert out["latest"] == 1


def test_a_renamed_legacy_file_is_invalid_everywhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], seed_writer
):
    d = tmp_path / "seed"
    d.mkdir()
    older = seed_writer(d, 3, np.ones(4), {"lr": 0.1}, 0.5)
    renamed = seed_writer(d, 5, np.ones(4), {"lr": 0.2}, 0.4).rename(
        d / "homodyne_state_batch_0009.h5"
    )
    m = CheckpointManager(d, prefix="homodyne_state", allow_pickle=True, keep_last_n=None)
    assert m.validate_checkpoint(renamed) is False
    with pytest.raises(CheckpointError, match="name says batch 9"):
        m.load_checkpoint(renamed)
    statuses = {i.path.name: i.status for i in m.list_checkpoints(verify=True)}
    assert statuses == {older.name: "legacy", renamed.name: "invalid"}
    fresh = CheckpointManager(d, prefix="homodyne_state", allow_pickle=True)
    assert fresh.find_latest_checkpoint() == older
    status, reports = _cli_json(capsys, "verify", str(renamed))
    assert status == 1 and reports[0]["status"] == "invalid", reports
    _, listed = _cli_json(capsys, "ls", str(d), "--prefix", "homodyne_state", "--verify")
    assert {r["name"]: r["status"] for r in listed}[renamed.name] == "invalid", listed


def test_no_object_of_a_saved_file_has_more_attributes_than_the_writer_declares(tmp_path: Path):
    """Saves skip the check of the written file against max_attributes when the limit
    is at least MAX_ATTRIBUTES_WRITTEN: the writer must keep that promise."""
    import h5py

    from h5ckpt.payload import MAX_ATTRIBUTES_WRITTEN

    state = {
        "a": [1, 2.5, "x", b"y", None, (True, np.float32(3))],
        "b": {"c": np.arange(10), "d": {"e": np.zeros((3, 3))}},
    }
    path = CheckpointManager(tmp_path).save_checkpoint(1, np.arange(3.0), state, 0.5, {"m": [1]})
    counts = []
    with h5py.File(path, "r") as f:
        counts.append(len(f.attrs))
        f.visititems(lambda _, obj: counts.append(len(obj.attrs)))
    assert max(counts) == MAX_ATTRIBUTES_WRITTEN == counts[0]
    assert len(counts) > 10
