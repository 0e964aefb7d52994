"""The main job: a fit SIGKILLed in a child process resumes to the exact same result."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from h5ckpt import CheckpointManager


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


def test_demo_with_the_jax_update_resumes_exactly(tmp_path: Path):
    """The same fit with the update in jitted JAX: jax.Array state in a NamedTuple,
    saved natively and loaded back with like= templates, resumed bit for bit."""
    pytest.importorskip("jax", reason="jax is not installed (pip install 'h5ckpt[jax]')")
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "h5ckpt", "demo", str(tmp_path)),
            *("--batches", "60", "--n-q", "256", "--batch-delay", "0.01", "--kill-after", "3"),
            "--jax",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "update step in JAX" in out
    assert "stopped by SIGKILL" in out and "resuming from xpcs_fit_batch_" in out
    assert "bit for bit: yes" in out
    newest = sorted((tmp_path / "killed-and-resumed").glob("xpcs_fit_batch_*.h5"))[-1]
    state = CheckpointManager(tmp_path / "killed-and-resumed", prefix="xpcs_fit").load_checkpoint(
        newest
    )["optimizer_state"]
    assert type(state).__name__ == "JaxFitState" and int(state.steps) == 51
