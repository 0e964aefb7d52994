"""``h5ckpt ls`` / ``verify`` / ``show`` on step directories of sharded checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from test_mpi import PYTHON_PATH, scenario


def h5ckpt(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=PYTHON_PATH, COLUMNS="250")
    env.pop("H5CKPT_HMAC_KEY", None)
    return subprocess.run(
        [sys.executable, "-m", "h5ckpt", *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_ls_verify_show_of_steps_next_to_single_files(tmp_path):
    scenario(4, "corrupt_steps", tmp_path)
    from h5ckpt import CheckpointManager

    CheckpointManager(tmp_path).save_checkpoint(7, np.arange(3.0), {}, 0.5)  # a single file

    ls = h5ckpt("ls", str(tmp_path))
    assert ls.returncode == 1, ls.stderr  # invalid and incomplete steps, as for invalid files
    lines = {}
    for line in ls.stdout.splitlines():
        words = line.replace("*", " ").split()
        if len(words) > 3 and words[0].isdigit():
            lines[words[0]] = line
    assert "complete" in lines["10"] and lines["10"].lstrip().startswith("*")
    assert "incomplete" in lines["20"] and "no manifest.h5" in lines["20"]
    assert "invalid" in lines["30"] and "manifest.h5" in lines["30"]
    assert "invalid" in lines["40"] and "shard_00003_of_00004.h5" in lines["40"]
    assert "incomplete" in lines["50"] and "missing shard" in lines["50"]
    assert "sharded steps" in ls.stdout and "checkpoint_batch_*.h5" in ls.stdout

    rows = json.loads(h5ckpt("ls", "--json", str(tmp_path)).stdout)
    steps = {r["batch_idx"]: r for r in rows if r.get("kind") == "step"}
    files = [r for r in rows if r.get("kind") != "step"]
    assert [f["batch_idx"] for f in files] == [7]
    assert {b: r["status"] for b, r in steps.items()} == {
        10: "complete",
        20: "incomplete",
        30: "invalid",
        40: "invalid",
        50: "incomplete",
    }
    assert steps[10]["latest"] and steps[10]["world_size"] == 4

    verify = h5ckpt("verify", str(tmp_path))
    assert verify.returncode == 1
    assert "5 step(s): 1 complete, 4 incomplete or invalid" in verify.stdout
    good = h5ckpt("verify", str(tmp_path / "checkpoint_batch_0010"))
    assert good.returncode == 0, good.stdout + good.stderr
    assert "1 step(s): 1 complete" in good.stdout
    bad = json.loads(h5ckpt("verify", "--json", str(tmp_path / "checkpoint_batch_0040")).stdout)
    assert bad[0]["status"] == "invalid" and "digest" in bad[0]["error"]

    show = h5ckpt("show", str(tmp_path / "checkpoint_batch_0010"))
    assert show.returncode == 0, show.stderr
    assert "status: complete" in show.stdout
    assert "optimizer_state/cursor" in show.stdout and "rank_local" in show.stdout
    assert "float32 (46, 3) split along axis 0" in show.stdout
    doc = json.loads(h5ckpt("show", "--json", str(tmp_path / "checkpoint_batch_0050")).stdout)
    assert doc["status"] == "incomplete" and "shard_00003_of_00004.h5" in doc["error"]
    assert h5ckpt("show", str(tmp_path / "checkpoint_batch_0030")).returncode == 1
