"""A rank SIGKILLed at a random moment of saving: the restart resumes from the newest
complete step, never from a partial one (real processes, real SIGKILL)."""

from __future__ import annotations

import re

import pytest

from test_mpi import HERE, mpirun

pytestmark = pytest.mark.slow  # 12 kill-and-restart trials per rank count

KILLJOB = HERE / "mpi" / "killjob.py"
TRIALS = 12


@pytest.mark.parametrize("n", [2, 4])
def test_sigkill_of_one_rank_mid_save(tmp_path, n):
    resumed = []
    for trial in range(TRIALS):
        # Longer than the job's own deadline (20 s): should the launcher be slow to end
        # the job, the surviving ranks raise CheckpointTimeoutError and exit.
        proc = mpirun(n, KILLJOB, str(tmp_path), str(1000 * n + trial), timeout=120)
        # The job must die by the kill (not by a failed check, which exits with 1
        # before any save and prints an AssertionError).
        assert "AssertionError" not in proc.stderr, proc.stderr
        assert proc.returncode != 0, proc.stdout
        found = re.search(r"resumed at (\d+)", proc.stdout)
        assert found, proc.stdout + proc.stderr
        resumed.append(int(found[1]))
    final = mpirun(n, KILLJOB, str(tmp_path), "-1", timeout=60)
    assert final.returncode == 0, final.stdout + final.stderr
    assert resumed == sorted(resumed)
    assert resumed[-1] > 0, resumed  # saves did commit between the kills
