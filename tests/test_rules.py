"""Each rule has one definition, in the Rust core, and every caller agrees with it:
the checkpoint file name, the first-bytes format check, the status strings and the
errno -> exception-class table."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import h5ckpt
from h5ckpt import CheckpointManager, _native, errors
from h5ckpt.errors import CheckpointCorruptError, CheckpointPermissionError, CheckpointValueError
from h5ckpt.inspection import checkpoint_files, describe_file, file_format, verify_paths
from h5ckpt.staging import oserror_to_checkpoint

H5CKPT = [sys.executable, "-m", "h5ckpt"]

#: Names that look like checkpoints of prefix "run" and are not.
NOT_CHECKPOINTS = [
    "run_batch_\u0661.h5",  # an Arabic-Indic digit one
    "run_batch_\uff11.h5",  # a full-width digit one
    "run_batch_+1.h5",
    "run_batch_-1.h5",
    "run_batch_ 1.h5",
    "run_batch_1 .h5",
    "run_batch_99999999999999999999.h5",  # more than a u64 holds
    "run_batch_1.h5\n",
    "run_batch_1.hdf5",
    "run_batch_1.H5",
    "run_batch_1.h5.bak",
    "run_batch_.h5",
    "_batch_1.h5",
]


def run(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*H5CKPT, *map(str, args)], capture_output=True, text=True, timeout=180)


@pytest.fixture
def tricky_dir(tmp_path: Path) -> Path:
    """One real checkpoint (batch 1, prefix "run") and byte copies of it under each
    name of NOT_CHECKPOINTS."""
    d = tmp_path / "run"
    m = CheckpointManager(d, prefix="run", keep_last_n=None)
    m.save_checkpoint(1, np.ones(3), {"s": 1}, 0.5)
    good = d / "run_batch_0001.h5"
    for name in NOT_CHECKPOINTS:
        (d / name).write_bytes(good.read_bytes())
    return d


def test_the_native_name_rule():
    assert _native.checkpoint_batch("run_batch_0012.h5", "run") == 12
    assert _native.checkpoint_name_parts("a_batch_1_batch_2.h5") == ("a_batch_1", 2)
    assert _native.checkpoint_name("run", 7) == "run_batch_0007.h5"
    for name in NOT_CHECKPOINTS:
        assert _native.checkpoint_batch(name, "run") is None, name
        assert _native.checkpoint_name_parts(name) is None, name
    # A name that is not valid UTF-8 (os.listdir gives it with surrogates) is none.
    assert _native.checkpoint_name_parts("run_batch_1\udcff.h5") is None
    with pytest.raises(CheckpointValueError):
        _native.checkpoint_name("run", -1)


def test_every_caller_sees_the_same_checkpoints(tricky_dir: Path):
    only = [tricky_dir / "run_batch_0001.h5"]
    # the scanner
    listed = CheckpointManager(tricky_dir, prefix="run").list_checkpoints(verify=True)
    assert [i.path for i in listed] == only
    # inspection
    assert checkpoint_files([tricky_dir]) == only
    # h5ckpt verify DIR
    proc = run("verify", tricky_dir, "--json")
    assert proc.returncode == 0, proc.stderr
    assert [Path(r["path"]) for r in json.loads(proc.stdout)] == only
    # h5ckpt ls
    proc = run("ls", tricky_dir, "--prefix", "run", "--json")
    assert proc.returncode == 0, proc.stderr
    assert [Path(e["path"]) for e in json.loads(proc.stdout)] == only


def test_ls_hints_only_at_real_prefixes(tmp_path: Path):
    d = tmp_path / "d"
    CheckpointManager(d, prefix="run").save_checkpoint(1, np.ones(2), {}, 1.0)
    good = d / "run_batch_0001.h5"
    (d / "other_batch_\u0661.h5").write_bytes(good.read_bytes())
    (d / "big_batch_99999999999999999999.h5").write_bytes(good.read_bytes())
    proc = run("ls", d)  # the default prefix "checkpoint" finds nothing
    assert "files with prefix run exist" in proc.stdout + proc.stderr
    assert "other" not in proc.stdout + proc.stderr
    assert "big" not in proc.stdout + proc.stderr


def test_temp_files_of_odd_names_are_not_cleaned_as_ours(tmp_path: Path):
    d = tmp_path / "d"
    d.mkdir()
    odd = d / ".run_batch_\u0661.h5.999999.0123456789ab.tmp"
    odd.write_bytes(b"x")
    ours = d / ".run_batch_0001.h5.999999.0123456789ab.tmp"
    ours.write_bytes(b"x")
    os.utime(odd, (0, 0))
    os.utime(ours, (0, 0))
    CheckpointManager(d, prefix="run")
    assert odd.exists()
    assert not ours.exists()


@pytest.mark.parametrize(
    "content",
    [b"", b"\x89HDF", b"PK\x03\x04 not a checkpoint", _native.MAGIC[:7]],
    ids=["empty", "short-hdf5", "zip", "short-magic"],
)
def test_a_foreign_file_is_refused_the_same_way_everywhere(tmp_path: Path, content: bytes):
    path = tmp_path / "x_batch_0001.h5"
    path.write_bytes(content)
    m = CheckpointManager(tmp_path / "m", prefix="x")
    with pytest.raises(CheckpointCorruptError) as by_manager:
        m.load_checkpoint(path)
    with pytest.raises(CheckpointCorruptError) as by_inspection:
        describe_file(path)
    assert str(by_manager.value) == str(by_inspection.value)
    assert not m.validate_checkpoint(path)
    assert file_format(path) == "unknown"
    [report] = verify_paths([path])
    assert report.status == _native.STATUS_INVALID and report.format == "unknown"
    [info] = CheckpointManager(tmp_path, prefix="x").list_checkpoints()
    assert info.status == _native.STATUS_INVALID


def test_a_directory_is_refused_the_same_way_everywhere(tmp_path: Path):
    m = CheckpointManager(tmp_path / "m")
    with pytest.raises(CheckpointValueError) as by_manager:
        m.load_checkpoint(tmp_path)
    with pytest.raises(CheckpointValueError) as by_inspection:
        describe_file(tmp_path)
    assert str(by_manager.value) == str(by_inspection.value)


def test_status_strings_are_the_native_ones():
    from h5ckpt import inspection, verification

    for module in (inspection, verification):
        assert module.VALID is _native.STATUS_VALID
        assert module.INVALID is _native.STATUS_INVALID
        assert module.LEGACY is _native.STATUS_LEGACY
        assert module.UNVERIFIED is _native.STATUS_UNVERIFIED


# ----------------------------------------------------------------------- errors

#: errno numbers outside the table, which both layers call storage errors.
OTHER_ERRNOS = [errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.ENOTDIR, errno.EISDIR]


def test_the_errno_table_is_the_python_mapping():
    table = _native.ERRNO_CLASSES
    assert table[errno.EROFS] == "CheckpointPermissionError"
    assert table[errno.EACCES] == table[errno.EPERM] == "CheckpointPermissionError"
    assert table[errno.ENOENT] == "CheckpointNotFoundError"
    for number in (errno.ENOMEM, errno.EMFILE, errno.ENFILE):
        assert table[number] == "CheckpointResourceError"
    for number in [*table, *OTHER_ERRNOS]:
        exc = OSError(number, os.strerror(number), "/x")
        mapped = oserror_to_checkpoint(exc, "open", "/x")
        want = table.get(number, _native.DEFAULT_OS_ERROR_CLASS)
        assert type(mapped).__name__ == want, (errno.errorcode[number], mapped)
        assert isinstance(mapped, getattr(errors, want))
        assert number not in OTHER_ERRNOS or want == "CheckpointStorageError"


#: Run in a child: each real failure through the Rust core (read_header) and through
#: the Python layer (open_regular); prints {case: [rust class, python class]}.
_REAL_FAILURES = r"""
import json, os, resource, sys
from h5ckpt import _native
from h5ckpt.opening import open_regular

def classes(path):
    out = []
    for call in (_native.read_header, open_regular):
        try:
            call(path)
        except Exception as exc:
            out.append(type(exc).__name__)
        else:
            out.append("no error")
    return out

d = sys.argv[1]
got = {
    "ENOENT": classes(os.path.join(d, "missing.h5")),
    "ENOTDIR": classes(os.path.join(d, "plain", "x.h5")),
}
os.setgid(65534)
os.setuid(65534)
got["EACCES"] = classes(os.path.join(d, "secret.h5"))
fds = []
try:
    while True:
        fds.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
got["EMFILE"] = classes(os.path.join(d, "plain"))
for fd in fds:
    os.close(fd)
print(json.dumps(got))
"""


def test_real_failures_get_the_same_class_from_rust_and_python(tmp_path: Path):
    (tmp_path / "plain").write_bytes(b"x")
    secret = tmp_path / "secret.h5"
    secret.write_bytes(b"x" * 600)
    secret.chmod(0)
    tmp_path.chmod(0o755)
    proc = subprocess.run(
        [sys.executable, "-c", _REAL_FAILURES, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(h5ckpt.__file__).parents[1])},
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got == {
        "ENOENT": ["CheckpointNotFoundError"] * 2,
        "ENOTDIR": ["CheckpointStorageError"] * 2,
        "EACCES": ["CheckpointPermissionError"] * 2,
        "EMFILE": ["CheckpointResourceError"] * 2,
    }


def test_read_only_mount_is_a_permission_error(tmp_path: Path):
    where = tmp_path / "ro"
    where.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(where)])
    assert proc.returncode == 0, "mounting a tmpfs needs root"
    try:
        with pytest.raises(CheckpointPermissionError) as info:
            CheckpointManager(where / "ck")
        assert info.value.error_context["errno"] == errno.EROFS
        assert _native.ERRNO_CLASSES[errno.EROFS] == type(info.value).__name__
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_without_the_python_classes_the_message_survives(tmp_path: Path):
    missing = tmp_path / "missing.h5"
    script = (
        "import sys, h5ckpt._native as n\n"
        "sys.modules['h5ckpt.errors'] = None\n"
        "try:\n"
        f"    n.read_header({str(missing)!r})\n"
        "except OSError as exc:\n"
        "    print(type(exc).__name__, exc.errno, exc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(h5ckpt.__file__).parents[1])},
    )
    assert proc.returncode == 0, proc.stderr
    assert f"cannot open {missing}" in proc.stdout
    assert f"FileNotFoundError {errno.ENOENT}" in proc.stdout


def test_mpi_step_names_follow_the_same_rule(tmp_path: Path):
    from h5ckpt.mpi import layout

    for name in [
        "run_batch_0001",
        "run_batch_\u0661\u0661\u0661\u0661",
        "run_batch_+001",
        "run_batch_99999999999999999999",
        "run_batch_01",
    ]:
        (tmp_path / name).mkdir()
    assert layout.list_steps(tmp_path, "run") == [(1, tmp_path / "run_batch_0001")]
    assert layout.step_name("run", 1) == _native.checkpoint_name("run", 1).removesuffix(".h5")
    assert layout.is_step_dir(tmp_path / "run_batch_\u0661\u0661\u0661\u0661") is None
