"""FIFOs, devices and symlinks named like checkpoints: refused at once, never a hang.

Opening a FIFO for reading blocks until a writer appears, and reading a character
device may never end; every call runs in its own process with a timeout, so a hang
fails the test instead of stalling the suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from h5ckpt import CheckpointManager

PYTHON_DIR = str(Path(__file__).resolve().parents[1] / "python")
TIMEOUT = 20


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": PYTHON_DIR}
    env.pop("H5CKPT_HMAC_KEY", None)
    try:
        return subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code), *args],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            env=env,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"hung for {TIMEOUT}s: {exc.cmd}")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    code = "import sys; from h5ckpt.cli import main; sys.exit(main(sys.argv[1:]))"
    return run_python(code, *args)


@pytest.fixture
def special(tmp_path: Path, seed_writer) -> dict[str, Path]:
    """A directory with a good checkpoint, a good seed file, and special files
    named like checkpoints: a FIFO, a symlink to it, a symlink to /dev/zero."""
    d = tmp_path / "ck"
    m = CheckpointManager(d)
    good = m.save_checkpoint(10, np.arange(4.0), {"lr": 0.1}, 1.5)
    seed = seed_writer(d, 20, np.arange(3.0), {"s": 1}, 2.0, prefix="checkpoint")
    fifo = d / "checkpoint_batch_0030.h5"
    os.mkfifo(fifo)
    link_fifo = d / "checkpoint_batch_0040.h5"
    link_fifo.symlink_to(fifo.name)
    link_zero = d / "checkpoint_batch_0050.h5"
    link_zero.symlink_to("/dev/zero")
    link_good = tmp_path / "latest.h5"
    link_good.symlink_to(good)
    return {
        "dir": d,
        "good": good,
        "seed": seed,
        "fifo": fifo,
        "link_fifo": link_fifo,
        "link_zero": link_zero,
        "zero": Path("/dev/zero"),
        "null": Path("/dev/null"),
        "link_good": link_good,
    }


BAD = ["fifo", "link_fifo", "link_zero", "zero", "null"]


@pytest.mark.parametrize("which", BAD)
def test_validate_checkpoint_says_false(special, which):
    proc = run_python(
        """
        import sys
        from h5ckpt import CheckpointManager
        m = CheckpointManager(sys.argv[1])
        print(m.validate_checkpoint(sys.argv[2]))
        """,
        str(special["dir"]),
        str(special[which]),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


@pytest.mark.parametrize("which", BAD)
def test_load_checkpoint_refuses_with_a_clear_error(special, which):
    proc = run_python(
        """
        import sys
        from h5ckpt import CheckpointManager
        from h5ckpt.errors import CheckpointValueError
        m = CheckpointManager(sys.argv[1])
        try:
            m.load_checkpoint(sys.argv[2])
        except CheckpointValueError as exc:
            print(exc)
        """,
        str(special["dir"]),
        str(special[which]),
    )
    assert proc.returncode == 0, proc.stderr
    assert "not a regular file" in proc.stdout, proc.stdout
    assert str(special[which]) in proc.stdout


@pytest.mark.parametrize("which", BAD)
def test_inspection_and_native_calls_refuse(special, which):
    proc = run_python(
        """
        import sys
        from pathlib import Path
        from h5ckpt import _native
        from h5ckpt.errors import CheckpointError
        from h5ckpt.inspection import describe_file, file_format, verify_paths
        from h5ckpt.legacy import validate_legacy
        path = Path(sys.argv[1])
        for call in (
            lambda: file_format(path),
            lambda: describe_file(path),
            lambda: validate_legacy(path),
            lambda: _native.read_header(path),
        ):
            try:
                call()
            except CheckpointError as exc:
                print("refused:", exc)
            else:
                print("accepted")
        [report] = verify_paths([path])
        print(report.status, report.error)
        [outcome] = _native.verify_files([path], None)
        print("outcome:", outcome)
        """,
        str(special[which]),
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 6, proc.stdout
    assert all(line.startswith("refused:") for line in lines[:4]), proc.stdout
    assert lines[4].startswith("invalid ") and "not a regular file" in lines[4]
    assert lines[5].startswith("outcome:") and "not a regular file" in lines[5]


@pytest.mark.parametrize("command", ["verify", "show"])
@pytest.mark.parametrize("which", BAD)
def test_cli_on_the_file(special, which, command):
    proc = run_cli(command, str(special[which]))
    assert proc.returncode != 0
    assert "not a regular file" in proc.stdout + proc.stderr, (proc.stdout, proc.stderr)


@pytest.mark.parametrize("command", [["ls"], ["ls", "--verify"], ["verify"]])
def test_cli_on_the_directory_lists_only_the_real_files(special, command):
    proc = run_cli(*command, "--json", str(special["dir"]))
    assert proc.stdout, proc.stderr
    assert "checkpoint_batch_0010.h5" in proc.stdout
    assert "checkpoint_batch_0030.h5" not in proc.stdout


def test_listing_and_loading_through_the_manager(special):
    proc = run_python(
        """
        import sys
        from h5ckpt import CheckpointManager
        m = CheckpointManager(sys.argv[1], allow_pickle=True)
        print([i.batch_idx for i in m.list_checkpoints(verify=True)])
        print(m.load_latest()["batch_idx"])
        """,
        str(special["dir"]),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["[10, 20]", "20"]


def test_a_symlink_to_a_good_checkpoint_loads(special):
    m = CheckpointManager(special["dir"], allow_pickle=True)
    assert m.validate_checkpoint(special["link_good"])
    assert m.load_checkpoint(special["link_good"])["batch_idx"] == 10
    assert m.load_checkpoint(special["seed"])["batch_idx"] == 20
