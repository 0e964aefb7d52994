"""The main job: a fit SIGKILLed in a child process resumes to the exact same result."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_demo_kill_and_resume_is_exact(tmp_path: Path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "h5ckpt",
            "demo",
            str(tmp_path),
            "--batches",
            "80",
            "--n-q",
            "512",
            "--batch-delay",
            "0.01",
            "--kill-after",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "stopped by SIGKILL" in out
    assert "resuming from xpcs_fit_batch_" in out
    assert "bit for bit: yes" in out
    # The killed run's directory holds only valid checkpoints and no temp files.
    killed = tmp_path / "killed-and-resumed"
    assert not [p for p in killed.iterdir() if p.name.endswith(".tmp")]
    assert (
        sorted(p.name for p in killed.glob("xpcs_fit_batch_*.h5"))[-1] == "xpcs_fit_batch_0070.h5"
    )
