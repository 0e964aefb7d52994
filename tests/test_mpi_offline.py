"""The parts of h5ckpt.mpi that run on one process, without MPI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from test_mpi import PYTHON_PATH, scenario

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def run_python(code: str, *args: str, user: list[str] | None = None) -> str:
    proc = subprocess.run(
        [*(user or []), sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=PYTHON_PATH),
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_import_and_offline_reading_need_no_mpi(tmp_path):
    scenario(2, "roundtrip", tmp_path)
    out = run_python(
        "import sys, h5ckpt\n"
        "assert 'mpi4py' not in sys.modules\n"
        "from h5ckpt.mpi import load_global, list_steps, validate_step\n"
        "d = sys.argv[1]\n"
        "g = load_global(d + '/checkpoint_batch_0020')\n"
        "print(g['world_size'], g['parameters'].shape, g['optimizer_state']['cursor'])\n"
        "one = validate_step(d + '/checkpoint_batch_0010')\n"
        "print([i.status for i in list_steps(d, verify=True)], one.status)\n"
        "assert 'mpi4py' not in sys.modules\n",
        str(tmp_path),
    )
    assert out.splitlines() == ["2 (21,) [2000, 2001]", "['complete', 'complete'] complete"]


def test_a_step_is_unreachable_before_its_files_are_removed():
    """Deleting a step whose files cannot be removed leaves only a hidden directory."""
    top = Path(tempfile.mkdtemp(prefix="h5ckpt-retire-"))
    try:
        os.chmod(top, 0o755)
        d = top / "ckpt"
        d.mkdir()
        os.chown(d, 65534, 65534)
        step = d / "checkpoint_batch_0001"
        step.mkdir()  # owned by root: the deleting user cannot remove what is inside
        (step / "manifest.h5").write_bytes(b"x")
        (step / "shard_00000_of_00001.h5").write_bytes(b"y")
        out = run_python(
            "import sys\n"
            "from pathlib import Path\n"
            "from h5ckpt.mpi.layout import retire_step, list_steps\n"
            "d = Path(sys.argv[1])\n"
            "retire_step(d / 'checkpoint_batch_0001', durable=True)\n"
            "print(list_steps(d, 'checkpoint'))\n",
            str(d),
            user=NOBODY,
        )
        assert out.strip() == "[]"
        left = os.listdir(d)
        assert len(left) == 1 and left[0].startswith(".checkpoint_batch_0001.")
        assert left[0].endswith(".deleting")
        assert sorted(os.listdir(d / left[0])) == ["manifest.h5", "shard_00000_of_00001.h5"]
    finally:
        shutil.rmtree(top)


def test_shard_files_get_the_umask_mode_as_single_files_do(tmp_path):
    import numpy as np

    from h5ckpt.mpi.manifest import write_file
    from h5ckpt.payload import Contents

    old = os.umask(0o027)
    try:
        path = tmp_path / "shard_00000_of_00001.h5"
        contents = Contents(
            batch_idx=3,
            loss=0.5,
            timestamp=1.0,
            parameters=np.arange(4.0),
            optimizer_state={},
            metadata={},
        )
        write_file(
            path,
            contents,
            compression=None,
            allow_pickle=False,
            hmac_key=None,
            durable=False,
        )
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left
