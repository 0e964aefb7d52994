"""The typed surface is checked: the stub matches the native module, and the package
type-checks with the configuration in pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_stub_matches_native_module() -> None:
    # stubtest imports h5ckpt._native and compares every name, signature and class
    # property of the stub with it (missing and extra names included).
    proc = _run(["-m", "mypy.stubtest", "h5ckpt._native"], cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_package_type_checks(tmp_path: Path) -> None:
    # From the repository root, so that pyproject.toml's [tool.mypy] applies; a
    # private cache, so that concurrent runs do not share one.
    proc = _run(["-m", "mypy", "--cache-dir", str(tmp_path / "cache")], cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Success" in proc.stdout, proc.stdout
