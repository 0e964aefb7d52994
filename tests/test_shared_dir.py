"""A checkpoint directory shared by two users, and the modes of what h5ckpt creates.

The second user is real: a process that drops to ``nobody`` (uid and gid 65534, no
supplementary groups), so the kernel enforces the mode bits on it. The interpreter
lives under root's home, which ``nobody`` cannot read, so each script imports what
it needs first and then drops its privileges; nothing it does afterwards has more
rights than ``nobody``. ``nobody`` shares no group with root: the "other" mode bits
stand in for a group-shared directory's group bits.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

from h5ckpt import CheckpointManager
from h5ckpt.errors import CheckpointNotFoundError, CheckpointValueError

PYTHON_DIR = str(Path(__file__).resolve().parents[1] / "python")

AS_NOBODY = r"""
import fcntl, json, os, sys
from pathlib import Path
import numpy as np
from h5ckpt import CheckpointManager, CheckpointError
from h5ckpt.errors import CheckpointPermissionError
from h5ckpt.cli import main as cli_main

def cli(*argv):
    try:
        return cli_main([str(a) for a in argv])
    except SystemExit as exc:
        return exc.code

# Whatever the commands import on first use must be imported while the interpreter's
# files can still be read: run them once as root, elsewhere, output discarded.
import contextlib, io, shutil, tempfile
warm = Path(tempfile.mkdtemp())
CheckpointManager(warm).save_checkpoint(1, np.arange(3.0), {}, 1.0)
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    for argv in (["ls"], ["ls", "--verify"], ["verify"]):
        cli(*argv, warm)
    cli("show", warm / "checkpoint_batch_0001.h5")
shutil.rmtree(warm)

os.setgroups([])
os.setresgid(65534, 65534, 65534)
os.setresuid(65534, 65534, 65534)
os.umask(0o022)
d = Path(sys.argv[1])
"""


def run_as_nobody(body: str, *args: object, stdin: str | None = None):
    env = {**os.environ, "PYTHONPATH": PYTHON_DIR}
    env.pop("H5CKPT_HMAC_KEY", None)
    proc = subprocess.run(
        [sys.executable, "-c", AS_NOBODY + textwrap.dedent(body), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        input=stdin,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture
def base():
    """A directory that ``nobody`` can reach (pytest's tmp_path is root's, 0700)."""
    d = Path(tempfile.mkdtemp(prefix="h5ckpt-shared-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d)


def saved_by_root(directory: Path, mode: int) -> None:
    """Checkpoints 10 and 20 saved by root (umask 022) in ``directory`` of ``mode``."""
    old = os.umask(0o022)
    try:
        m = CheckpointManager(directory, keep_last_n=None)
        m.save_checkpoint(10, np.arange(3.0), {"by": "root"}, 2.0)
        m.save_checkpoint(20, np.arange(4.0), {"by": "root"}, 1.0)
    finally:
        os.umask(old)
    directory.chmod(mode)


def test_a_reader_of_a_directory_it_cannot_write(base: Path):
    d = base / "run"
    saved_by_root(d, 0o755)
    before = sorted(os.listdir(d))
    out = run_as_nobody(
        """
        for m in (CheckpointManager(d, read_only=True), CheckpointManager(d)):
            print([(i.batch_idx, i.status) for i in m.list_checkpoints(verify=True)])
            print(m.validate_checkpoint(m.checkpoint_path(20)), m.load_latest()["batch_idx"])
        try:
            CheckpointManager(d).save_checkpoint(30, np.arange(2.0), {}, 0.5)
        except CheckpointPermissionError as exc:
            print("save refused by the OS")
        r = CheckpointManager(d, read_only=True)
        for call in (
            lambda: r.save_checkpoint(30, np.arange(2.0), {}, 0.5),
            lambda: r.save_checkpoint_async(30, np.arange(2.0), {}, 0.5),
            lambda: r.cleanup_old_checkpoints(),
        ):
            try:
                call()
            except CheckpointError as exc:
                print("refused:", "read_only" in str(exc))
        print(r.plan_cleanup() == [])
        """,
        d,
    )
    assert out.splitlines() == [
        "[(10, 'valid'), (20, 'valid')]",
        "True 20",
        "[(10, 'valid'), (20, 'valid')]",
        "True 20",
        "save refused by the OS",
        "refused: True",
        "refused: True",
        "refused: True",
        "True",
    ]
    assert sorted(os.listdir(d)) == before


def test_read_only_manager_and_cli_create_nothing_in_a_writable_directory(base: Path):
    d = base / "run"
    saved_by_root(d, 0o777)
    (d / ".h5ckpt.lock").unlink()  # as in a directory of copied checkpoints
    before = sorted(os.listdir(d))
    out = run_as_nobody(
        """
        r = CheckpointManager(d, read_only=True)
        print(len(r.list_checkpoints(verify=True)), r.load_latest()["batch_idx"])
        print(cli("ls", d), cli("ls", "--verify", d), cli("verify", d),
              cli("show", d / "checkpoint_batch_0020.h5"))
        """,
        d,
    )
    assert out.splitlines()[0] == "2 20"
    assert out.splitlines()[-1] == "0 0 0 0"
    assert sorted(os.listdir(d)) == before


def test_read_only_refuses_a_missing_directory_and_creates_it_not(tmp_path: Path):
    with pytest.raises(CheckpointNotFoundError):
        CheckpointManager(tmp_path / "missing", read_only=True)
    assert not (tmp_path / "missing").exists()


def test_the_second_user_of_a_shared_directory_saves_and_locks(base: Path):
    d = base / "shared"
    saved_by_root(d, 0o777)
    lock = d / ".h5ckpt.lock"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            AS_NOBODY
            + textwrap.dedent(
                """
                m = CheckpointManager(d, keep_last_n=None)
                m.save_checkpoint(30, np.arange(5.0), {"by": "nobody"}, 0.5)
                print([(i.batch_idx, i.status) for i in m.list_checkpoints(verify=True)])
                print(cli("ls", d))
                with m._lock.held():
                    print("held", flush=True)
                    sys.stdin.readline()
                """
            ),
            str(d),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": PYTHON_DIR},
    )
    try:
        lines = []
        while not lines or lines[-1] != "held":
            line = proc.stdout.readline()
            assert line, f"the second user's script ended early: {lines}"
            lines.append(line.strip())
        assert lines[0] == "[(10, 'valid'), (20, 'valid'), (30, 'valid')]"
        # The second user holds the directory lock: root cannot take it.
        probe = os.open(lock, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            proc.stdin.write("\n")
            proc.stdin.flush()
            assert proc.wait(timeout=120) == 0
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(probe)
    finally:
        proc.kill()
        proc.communicate()
    saved = d / "checkpoint_batch_0030.h5"
    assert saved.stat().st_uid == 65534
    assert stat.S_IMODE(saved.stat().st_mode) == 0o644
    m = CheckpointManager(d)
    assert m.load_latest()["optimizer_state"] == {"by": "nobody"}


MODES = r"""
import json, os, stat, sys
from pathlib import Path
import numpy as np
from h5ckpt import CheckpointManager
out = {}
for mask in (0o022, 0o027, 0o077, 0o002):
    os.umask(mask)
    d = Path(sys.argv[1]) / f"u{mask:o}"
    m = CheckpointManager(d)
    p = m.save_checkpoint(1, np.arange(3.0), {}, 1.0)
    out[f"{mask:o}"] = [
        stat.S_IMODE(p.stat().st_mode),
        stat.S_IMODE((d / ".h5ckpt.lock").stat().st_mode),
    ]
os.umask(0o077)
m = CheckpointManager(Path(sys.argv[1]) / "explicit", file_mode=0o640)
out["explicit"] = stat.S_IMODE(m.save_checkpoint(1, np.arange(3.0), {}, 1.0).stat().st_mode)
print(json.dumps(out))
"""


def test_committed_files_get_the_mode_of_a_new_file(tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, "-c", MODES, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": PYTHON_DIR},
    )
    assert proc.returncode == 0, proc.stderr
    import json

    modes = json.loads(proc.stdout)
    # The lock file: as a new file, and readable by whoever may write the directory
    # (the directory itself is made under the same umask).
    assert modes == {
        "22": [0o644, 0o644],
        "27": [0o640, 0o640],
        "77": [0o600, 0o600],
        "2": [0o664, 0o664],
        "explicit": 0o640,
    }


def test_a_shared_directorys_lock_is_readable_by_its_writers(tmp_path: Path):
    d = tmp_path / "group"
    d.mkdir()
    d.chmod(0o2770)  # a group-shared directory
    old = os.umask(0o077)
    try:
        CheckpointManager(d).save_checkpoint(1, np.arange(3.0), {}, 1.0)
    finally:
        os.umask(old)
    assert stat.S_IMODE((d / ".h5ckpt.lock").stat().st_mode) == 0o640


@pytest.mark.parametrize("mode", [-1, 0o1000, "644", True, 1.5])
def test_file_mode_is_checked(tmp_path: Path, mode):
    with pytest.raises(CheckpointValueError):
        CheckpointManager(tmp_path, file_mode=mode)
