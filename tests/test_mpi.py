"""Sharded checkpoints of real MPI jobs (mpiexec from the ``mpich`` wheel, mpi4py).

Each test runs one scenario of tests/mpi/scenarios.py on every rank; the scenario
asserts on every rank and the job's exit status carries the result. A subprocess
timeout guards against hangs (a hang is the failure).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
SCENARIOS = HERE / "mpi" / "scenarios.py"
BIN = Path(sys.executable).parent
MPIEXEC = BIN / "mpiexec"
PYTHON_PATH = str(HERE.parent / "python")


def mpirun(
    n: int, script: Path, *args: str, timeout: float = 60, env: dict | None = None
) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=PYTHON_PATH, **(env or {}))
    full_env.pop("H5CKPT_HMAC_KEY", None)
    return subprocess.run(
        [str(MPIEXEC), "-n", str(n), sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


def scenario(
    n: int, name: str, directory: Path, *args: str, timeout: float = 60, env: dict | None = None
) -> str:
    proc = mpirun(n, SCENARIOS, name, str(directory), *args, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{name} on {n} ranks failed:\n{proc.stdout}\n{proc.stderr}"
    assert f"ok {name} on {n} ranks" in proc.stdout
    return proc.stderr


@pytest.mark.parametrize("n", [2, 4])
def test_commit_and_restore_bit_for_bit(tmp_path, n):
    scenario(n, "roundtrip", tmp_path)


@pytest.mark.parametrize("n", [2, 4])
def test_bad_input_on_one_rank_fails_the_save_everywhere(tmp_path, n):
    scenario(n, "bad_input", tmp_path)


def test_full_disk_on_one_rank(tmp_path):
    scenario(4, "full_disk", tmp_path)


@pytest.mark.parametrize("n", [2, 4])
def test_restore_past_incomplete_and_corrupt_steps(tmp_path, n):
    err = scenario(n, "corrupt_steps", tmp_path)
    assert "skipped 4 incomplete or corrupt step(s)" in err
    assert "checkpoint_batch_0050" in err and "missing" in err


def test_wrong_hmac_key_finds_nothing(tmp_path):
    err = scenario(2, "wrong_key", tmp_path)
    assert "HMAC" in err


def test_deadline_expires_instead_of_hanging(tmp_path):
    scenario(4, "deadline", tmp_path)


@pytest.mark.parametrize(("before", "after"), [(4, 3), (2, 4)])
def test_restore_with_another_world_size(tmp_path, before, after):
    scenario(before, "save_for_resplit", tmp_path)
    scenario(after, "resplit", tmp_path, str(before))


@pytest.mark.parametrize("n", [2, 4])
def test_retention_counts_complete_steps_only(tmp_path, n):
    scenario(n, "retention", tmp_path)


@pytest.mark.parametrize("n", [2, 4])
def test_async_saves(tmp_path, n):
    scenario(n, "async_saves", tmp_path)


@pytest.mark.parametrize("n", [2, 4])
def test_async_saves_without_thread_multiple(tmp_path, n):
    err = scenario(
        n, "async_saves_in_one_thread", tmp_path, env={"MPI4PY_RC_THREAD_LEVEL": "single"}
    )
    assert "not initialised with THREAD_MULTIPLE: saving synchronously" in err


@pytest.mark.parametrize("n", [2, 4])
def test_a_restart_in_a_used_directory_keeps_the_new_steps(tmp_path, n):
    scenario(n, "restart", tmp_path)


@pytest.mark.parametrize("n", [2, 4])
def test_set_aside_newer_than(tmp_path, n):
    err = scenario(n, "set_aside", tmp_path)
    assert "set aside 3 checkpoint(s) of batches above 15" in err


@pytest.mark.parametrize("n", [2, 4])
def test_file_mode(tmp_path, n):
    scenario(n, "file_modes", tmp_path)


@pytest.mark.parametrize("n", [2, 4])
def test_read_only(tmp_path, n):
    scenario(n, "read_only", tmp_path)


@pytest.mark.parametrize("n", [2, 4])
def test_restore_lists_again_when_the_listed_steps_vanish(tmp_path, n):
    scenario(n, "restore_while_steps_vanish", tmp_path)


@pytest.mark.parametrize("n", [2, 4])
def test_options_object(tmp_path, n):
    scenario(n, "options", tmp_path)
