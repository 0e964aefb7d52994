"""The release wheel: built as `make wheel` builds it, installed where there is no Rust.

Users install h5ckpt from a wheel in pipelines that have no Rust toolchain. This
builds the wheel and the sdist from the checkout, installs the wheel into a new
virtual environment and runs the command line from it with a PATH on which neither
cargo nor rustc can be found.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import h5ckpt

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (ROOT / "Cargo.toml").is_file():
        pytest.fail("the wheel test needs the source checkout (Cargo.toml) next to tests/")
    out = tmp_path_factory.mktemp("dist")
    _run(
        ["make", "-C", str(ROOT), "wheel", f"PYTHON={sys.executable}", f"DIST={out}"],
        timeout=840,
    )
    return out


def test_the_wheel_is_abi3_and_manylinux(dist: Path):
    (wheel,) = dist.glob("*.whl")
    # One wheel for every CPython from 3.11 on, for glibc 2.17 and newer; maturin's
    # compliance check ran while building (`--auditwheel check` fails the build).
    assert "-cp311-abi3-" in wheel.name
    assert "manylinux2014_x86_64" in wheel.name or "manylinux_2_17_x86_64" in wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    assert "h5ckpt/_native.abi3.so" in names
    assert "h5ckpt/py.typed" in names and "h5ckpt/_native.pyi" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_the_sdist_holds_what_a_build_needs(dist: Path):
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in ("Cargo.toml", "Cargo.lock", "pyproject.toml", "LICENSE", "rust/src/lib.rs"):
        assert needed in names
    assert "python/h5ckpt/manager.py" in names


def _interpreters() -> list[str]:
    """This interpreter and the newest other CPython >= 3.12 found on the machine: one
    abi3 wheel must serve both."""
    found = [sys.executable]
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    for minor in (14, 13, 12):
        candidates = [*sorted(pyenv.glob(f"3.{minor}.*/bin/python3"))]
        candidates += [Path(p) for p in [shutil.which(f"python3.{minor}")] if p]
        for other in candidates:
            works = subprocess.run([str(other), "-c", "import venv"], capture_output=True)
            if works.returncode == 0 and minor != sys.version_info[1]:
                return [*found, str(other)]
    return found


def _version(python: str) -> tuple[int, int]:
    out = subprocess.run(
        [python, "-c", "import sys; print(*sys.version_info[:2])"], capture_output=True, text=True
    ).stdout.split()
    return int(out[0]), int(out[1])


@pytest.mark.parametrize(
    "python", _interpreters(), ids=lambda p: "python" + ".".join(map(str, _version(p)))
)
def test_the_wheel_installs_and_runs_without_rust(dist: Path, tmp_path: Path, python: str):
    (wheel,) = dist.glob("*.whl")
    venv = tmp_path / "venv"
    _run([python, "-m", "venv", str(venv)])
    py = venv / "bin" / "python"
    _run([str(py), "-m", "pip", "install", "--quiet", str(wheel)], timeout=600)

    path = os.pathsep.join([str(venv / "bin"), "/usr/bin", "/bin"])
    assert shutil.which("cargo", path=path) is None
    assert shutil.which("rustc", path=path) is None
    env = {"PATH": path, "HOME": str(tmp_path), "LANG": "C.UTF-8"}

    version = _run([str(venv / "bin" / "h5ckpt"), "--version"], env=env, cwd=tmp_path)
    assert version.stdout.split()[:2] == ["h5ckpt", h5ckpt.__version__]

    demo = _run([str(py), "-m", "h5ckpt", "demo"], env=env, cwd=tmp_path, timeout=600)
    assert "bit for bit: yes" in demo.stdout
    # The installed package, not the checkout, ran.
    where = _run([str(py), "-c", "import h5ckpt; print(h5ckpt.__file__)"], env=env, cwd=tmp_path)
    assert where.stdout.strip().startswith(str(venv))
