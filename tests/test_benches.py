"""Every benchmark in benches/ still runs against the package as it is now.

The benchmarks reach into modules (where_time_goes wraps the functions a save and a
load call), so a refactor can break one without any test noticing. Each runs here
once on the smallest input it takes; its figures are not looked at (timings belong
in benches/, not in tests), only that it finishes and prints its table.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHES = Path(__file__).resolve().parent.parent / "benches"

RUNS = {
    "run.py": (
        [
            "--sizes",
            "8K",
            "--repeats",
            "1",
            "--no-rss",
            "--small-repeats",
            "1",
            "--validate-size",
            "1M",
        ],
        "| **save ratio** |",
    ),
    "small_state.py": (["--repeats", "1"], "durable save / raw commit"),
    "where_time_goes.py": (["--size", "1M", "--repeats", "1"], "validate: verify_fds"),
    "bench_scale.py": (["--n", "20", "--corrupt-n", "5", "--repeats", "1"], "list_checkpoints()"),
    "bench_jax.py": (["--mb", "1", "--repeats", "1"], "save, parameters"),
    "bench_mpi.py": (["--sizes", "1M", "--repeats", "1"], "sharded save"),
}
MPIEXEC = Path(sys.executable).parent / "mpiexec"  # from the mpich wheel


@pytest.mark.parametrize(
    ("script", "ranks"), [(script, 0) for script in RUNS] + [("bench_mpi.py", 2)]
)
def test_benchmark_runs(tmp_path: Path, script: str, ranks: int):
    args, expected = RUNS[script]
    launcher = [str(MPIEXEC), "-n", str(ranks)] if ranks else []
    env = dict(os.environ, TMPDIR=str(tmp_path))
    env.pop("H5CKPT_HMAC_KEY", None)
    proc = subprocess.run(
        [*launcher, sys.executable, str(BENCHES / script), *args],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert expected in proc.stdout, proc.stdout
    if ranks:
        assert f"{ranks} ranks" in proc.stdout, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
