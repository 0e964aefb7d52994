"""The main job across ranks: ``mpiexec -n 4 python -m h5ckpt demo --mpi``."""

from __future__ import annotations

import os
import subprocess
import sys

from test_mpi import MPIEXEC, PYTHON_PATH


def test_mpi_demo_kill_and_resume_on_4_and_3_ranks(tmp_path):
    demo = ["-m", "h5ckpt", "demo", "--mpi", str(tmp_path), "--batches", "50", "--n-q", "128"]
    proc = subprocess.run(
        [str(MPIEXEC), "-n", "4", sys.executable, *demo],
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(os.environ, PYTHONPATH=PYTHON_PATH),
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "SIGKILLed" in out
    assert "resumed on 4 ranks == uninterrupted, bit for bit: yes" in out
    assert "resumed on 3 ranks: largest relative difference" in out
    assert out.count("resumed at batch") == 2
