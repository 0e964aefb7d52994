"""The ``h5ckpt`` command line, run as a real subprocess on real directories."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import faultkit
import h5ckpt
import h5ckpt.cli as cli_module
from h5ckpt import CheckpointManager
from h5ckpt.tree import values_equal

H5CKPT = [sys.executable, "-m", "h5ckpt"]


def run(*args: object, cwd: Path | None = None, env: dict | None = None):
    proc = subprocess.run(
        [*H5CKPT, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )
    return proc


def one_error_line(proc) -> str:
    """The stderr of a failed command: exactly one ``h5ckpt: error:`` line."""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("h5ckpt: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def flip_in_seed_pickle(path: Path) -> None:
    """Change one byte of a seed file's pickled optimizer state (its checksum covers it)."""
    with h5py.File(path, "r") as f:
        offset = f["optimizer_state"].id.get_offset()
    flip_byte(path, offset + 10)


LOSSES = {0: 5.0, 10: 4.0, 20: 3.0, 30: 0.5, 40: 2.0, 50: 1.9, 60: 1.8, 70: 1.7, 80: 1.6, 90: 1.5}


def state_of(batch: int) -> dict:
    return {
        "step": batch,
        "moment": np.linspace(0, 1, 40).reshape(10, 4) * batch,
        "history": [1.0, None, (batch, "x")],
        "a/b": "text",
    }


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """Ten h5ckpt checkpoints, batches 0..90, prefix "checkpoint"."""
    d = tmp_path / "run"
    m = CheckpointManager(d, checkpoint_frequency=10, keep_last_n=None)
    for batch, loss in LOSSES.items():
        m.save_checkpoint(batch, np.arange(6.0) * batch, state_of(batch), loss, {"n": batch})
    return d


@pytest.fixture
def seed_dir(tmp_path: Path, seed_writer) -> Path:
    """Three files written the way the seed writes them, prefix "homodyne_state"."""
    d = tmp_path / "seed"
    d.mkdir()
    for batch in (0, 10, 20):
        seed_writer(
            d,
            batch,
            np.full(4, float(batch)),
            {"step": batch, "m": np.arange(3.0) * batch, "lr": 0.01},
            1.0 / (batch + 1),
            {"model": "g2", "n_q": 16, "shape": [1, 2]},
        )
    return d


# ------------------------------------------------------------------ generalities


def test_version_help_and_usage_errors():
    proc = run("--version")
    assert proc.returncode == 0
    assert h5ckpt.__version__ in proc.stdout
    assert run("--help").returncode == 0
    assert run().returncode == 2  # no command
    assert run("frobnicate").returncode == 2
    assert run("ls").returncode == 2  # missing DIR
    proc = run("ls", ".", "--bogus")
    assert proc.returncode == 2
    assert "unrecognized arguments: --bogus" in proc.stderr


def test_console_script(run_dir: Path):
    # The installed entry point, beside the interpreter that runs the tests.
    script = shutil.which("h5ckpt", path=str(Path(sys.executable).parent))
    assert script is not None, "the h5ckpt console script is not installed"
    proc = subprocess.run(
        [script, "verify", str(run_dir)], capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr
    assert "10 file(s): 10 valid, 0 invalid" in proc.stdout


def test_errors_are_one_line_and_debug_shows_the_traceback(tmp_path: Path):
    missing = tmp_path / "missing"
    for args in (
        ("ls", missing),
        ("verify", missing),
        ("show", missing),
        ("prune", missing, "--keep-last", 1),
    ):
        proc = run(*args)
        assert proc.returncode == 1
        assert str(missing) in one_error_line(proc)
    not_a_dir = tmp_path / "file.txt"
    not_a_dir.write_text("x")
    proc = run("ls", not_a_dir)
    assert proc.returncode == 1
    assert "not a directory" in one_error_line(proc)
    proc = run("show", missing, "--debug")
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("h5ckpt: error: no such file")
    proc = run("--debug", "show", missing)
    assert "Traceback" in proc.stderr


# ---------------------------------------------------------------------------- ls


def test_ls_table_marks_the_newest_valid(run_dir: Path):
    proc = run("ls", run_dir)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    rows = [line.split() for line in proc.stdout.splitlines()]
    marked = [row for row in rows if row[:1] == ["*"]]
    assert len(marked) == 1 and marked[0][1] == "90"
    assert "valid" in marked[0]
    assert "\x1b[" not in proc.stdout  # no colour codes when piped


def test_ls_json_and_verify_with_a_corrupt_newest(run_dir: Path):
    flip_byte(run_dir / "checkpoint_batch_0090.h5", 2000)
    proc = run("ls", run_dir, "--json")
    assert proc.returncode == 1  # an invalid file
    listing = json.loads(proc.stdout)
    assert [e["batch_idx"] for e in listing] == sorted(LOSSES)
    assert set(listing[0]) >= {"path", "batch_idx", "loss", "timestamp", "size_bytes", "status"}
    assert listing[3]["loss"] == 0.5
    by_batch = {e["batch_idx"]: e for e in listing}
    assert by_batch[90]["status"] == "invalid" and "digest" in by_batch[90]["error"]
    assert [e["batch_idx"] for e in listing if e["latest"]] == [80]

    verified = json.loads(run("ls", run_dir, "--verify", "--json").stdout)
    assert {e["batch_idx"]: e["status"] for e in verified} == {
        **{b: "valid" for b in LOSSES},
        90: "invalid",
    }
    assert all(e["verified"] for e in verified)
    table = run("ls", run_dir, "--verify").stdout
    marked = [line.split() for line in table.splitlines() if line.lstrip().startswith("*")]
    assert marked[0][1] == "80"
    assert "payload digest mismatch" in table


def test_ls_seed_directory(seed_dir: Path):
    proc = run("ls", seed_dir)  # the default prefix finds nothing, and says what would
    assert proc.returncode == 0
    assert "no checkpoints named checkpoint_batch_<n>.h5" in proc.stdout
    assert "homodyne_state" in proc.stdout and "--prefix" in proc.stdout

    listing = json.loads(run("ls", seed_dir, "--prefix", "homodyne_state", "--json").stdout)
    assert [(e["batch_idx"], e["status"]) for e in listing] == [
        (0, "legacy"),
        (10, "legacy"),
        (20, "legacy"),
    ]
    assert listing[1]["loss"] == pytest.approx(1 / 11)
    assert [e["latest"] for e in listing] == [False, False, True]

    flip_in_seed_pickle(seed_dir / "homodyne_state_batch_0020.h5")
    proc = run("ls", seed_dir, "--prefix", "homodyne_state", "--verify")
    assert proc.returncode == 1  # an invalid file
    lines = proc.stdout.splitlines()
    assert any(
        line.split()[:1] == ["20"] and "invalid" in line and "checksum mismatch" in line
        for line in lines
    )
    assert any(line.split()[:2] == ["*", "10"] and "legacy" in line for line in lines)


# ------------------------------------------------------------------------ verify


def test_verify_all_valid(run_dir: Path, seed_dir: Path):
    proc = run("verify", run_dir)
    assert proc.returncode == 0, proc.stderr
    assert "10 file(s): 10 valid, 0 invalid" in proc.stdout
    assert "verifying" not in proc.stdout and "\x1b[" not in proc.stdout  # no progress bar
    proc = run("verify", seed_dir, run_dir / "checkpoint_batch_0000.h5")
    assert proc.returncode == 0
    assert "4 file(s): 1 valid, 3 legacy" in proc.stdout


def test_verify_flipped_byte_exits_1(run_dir: Path):
    bad = run_dir / "checkpoint_batch_0040.h5"
    flip_byte(bad, bad.stat().st_size // 2)
    proc = run("verify", run_dir)
    assert proc.returncode == 1
    assert "9 valid, 1 invalid" in proc.stdout
    [line] = [line for line in proc.stdout.splitlines() if "invalid" in line and "40" in line]
    assert "checkpoint_batch_0040.h5" in line
    results = json.loads(run("verify", run_dir, "--json").stdout)
    assert len(results) == 10
    assert [r["batch_idx"] for r in results if not r["valid"]] == [40]
    bad_entry = next(r for r in results if not r["valid"])
    assert bad_entry["status"] == "invalid" and bad_entry["path"] == str(bad)
    assert "digest" in bad_entry["error"]
    # The header's own digest catches a header byte.
    flip_byte(run_dir / "checkpoint_batch_0050.h5", 50)
    assert run("verify", run_dir / "checkpoint_batch_0050.h5").returncode == 1


def test_verify_searches_directories_recursively_for_any_prefix(tmp_path: Path, run_dir: Path):
    nested = tmp_path / "many" / "deep" / "er"
    CheckpointManager(nested, prefix="fit_a").save_checkpoint(3, np.ones(2), {}, 1.0)
    CheckpointManager(tmp_path / "many", prefix="b").save_checkpoint(7, np.ones(2), {}, 1.0)
    (tmp_path / "many" / "notes.h5").write_bytes(b"not a checkpoint")  # not checkpoint-named
    results = json.loads(run("verify", tmp_path / "many", "--json").stdout)
    assert sorted(Path(r["path"]).name for r in results) == [
        "b_batch_0007.h5",
        "fit_a_batch_0003.h5",
    ]
    # A file named explicitly is checked whatever its name.
    proc = run("verify", tmp_path / "many" / "notes.h5", "--json")
    assert proc.returncode == 1
    [result] = json.loads(proc.stdout)
    assert result["format"] == "unknown" and "not a checkpoint file" in result["error"]


def test_verify_errors(tmp_path: Path, run_dir: Path):
    proc = run("verify", run_dir, tmp_path / "nope.h5")
    assert proc.returncode == 1
    assert "no such file or directory" in one_error_line(proc)
    assert proc.stdout == ""
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run("verify", empty)
    assert proc.returncode == 1
    assert "no checkpoint files" in one_error_line(proc)
    proc = run("verify")
    assert proc.returncode == 2
    assert "required: PATH" in proc.stderr


def test_verify_with_a_key_in_the_environment(tmp_path: Path, seed_dir: Path):
    keyed = CheckpointManager(tmp_path / "keyed", hmac_key=b"secret")
    keyed.save_checkpoint(1, np.ones(3), {}, 1.0)
    assert run("verify", tmp_path / "keyed", env={"H5CKPT_HMAC_KEY": "secret"}).returncode == 0
    assert run("verify", tmp_path / "keyed", env={"H5CKPT_HMAC_KEY": "other"}).returncode == 1
    # A keyed reader refuses seed files: they carry no tag.
    assert run("verify", seed_dir, env={"H5CKPT_HMAC_KEY": "secret"}).returncode == 1


def test_verify_progress_bar_on_a_terminal(run_dir: Path):
    pty = pytest.importorskip("pty")
    try:
        main, child = pty.openpty()
    except OSError:
        faultkit.unavailable("no pseudo-terminal available")
    proc = subprocess.Popen(
        [*H5CKPT, "verify", str(run_dir)],
        stdout=child,
        stderr=child,
        env={**os.environ, "COLUMNS": "120", "TERM": "xterm"},
    )
    os.close(child)
    out = b""
    while True:
        try:
            data = os.read(main, 65536)
        except OSError:
            break
        if not data:
            break
        out += data
    os.close(main)
    assert proc.wait(timeout=180) == 0
    text = out.decode("utf-8", "replace")
    assert "verifying 10 files" in text
    assert "10 file(s): 10 valid, 0 invalid" in text


# -------------------------------------------------------------------------- show


def test_show_json(run_dir: Path):
    path = run_dir / "checkpoint_batch_0030.h5"
    proc = run("show", path, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["format"] == "h5ckpt" and info["status"] == "valid" and info["error"] is None
    header = info["header"]
    assert header["batch_idx"] == 30 and header["loss"] == 0.5
    assert header["format_major"] == 1 and header["payload_offset"] == 512
    assert len(header["payload_digest"]) == 64 and header["hmac_tag"] is None
    assert info["attributes"]["h5ckpt_format"] == "1.1"
    tree = info["tree"]
    assert tree["parameters"] == {
        "type": "ndarray",
        "dtype": "float64",
        "shape": [6],
        "nbytes": 48,
        "storage": "compact",  # a small checkpoint: built in memory, small arrays compact
        "values": [0.0, 30.0, 60.0, 90.0, 120.0, 150.0],
    }
    state = tree["optimizer_state"]
    assert state["type"] == "dict"
    assert list(state["children"]) == ["step", "moment", "history", "a/b"]  # insertion order
    assert state["children"]["step"] == {"type": "int", "dtype": "int64", "value": 30}
    moment = state["children"]["moment"]
    assert (moment["type"], moment["dtype"], moment["shape"]) == ("ndarray", "float64", [10, 4])
    assert moment["summary"]["max"] == pytest.approx(30.0) and "values" not in moment
    history = state["children"]["history"]
    assert history["type"] == "list" and history["length"] == 3
    assert history["children"]["1"] == {"type": "none"}
    assert history["children"]["2"]["type"] == "tuple"
    assert history["children"]["2"]["children"]["1"] == {"type": "str", "value": "x"}
    assert tree["metadata"]["children"]["n"]["value"] == 30


def test_show_text_invalid_and_seed(run_dir: Path, seed_dir: Path):
    path = run_dir / "checkpoint_batch_0030.h5"
    proc = run("show", path)
    assert proc.returncode == 0
    for text in ("status: valid", "payload_digest", "optimizer_state", "moment", "(10, 4)"):
        assert text in proc.stdout
    flip_byte(path, path.stat().st_size - 100)
    proc = run("show", path, "--json")
    assert proc.returncode == 1
    info = json.loads(proc.stdout)
    assert (
        info["status"] == "invalid" and info["tree"] is None and info["header"]["batch_idx"] == 30
    )
    assert "payload not shown" in run("show", path).stdout

    seed = json.loads(run("show", seed_dir / "homodyne_state_batch_0010.h5", "--json").stdout)
    assert seed["format"] == "legacy" and seed["status"] == "legacy"
    assert seed["header"]["batch_idx"] == 10 and seed["header"]["version"] == "2.4.0"
    assert seed["tree"]["optimizer_state"]["type"] == "pickle"
    assert seed["tree"]["parameters"]["values"] == [10.0] * 4
    assert seed["tree"]["metadata"]["children"]["model"]["value"] == "g2"

    foreign = run_dir / "foreign.h5"
    foreign.write_bytes(b"hello")
    proc = run("show", foreign)
    assert proc.returncode == 1
    assert "not a checkpoint file" in one_error_line(proc)


# ------------------------------------------------------------------------- prune


def names(directory: Path) -> set[str]:
    return {p.name for p in directory.glob("*_batch_*.h5")}


def test_prune_dry_run_then_real(run_dir: Path):
    before = names(run_dir)
    args = ("prune", run_dir, "--keep-last", 2, "--keep-best", 1, "--keep-every", 40)
    proc = run(*args, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert names(run_dir) == before  # nothing deleted
    # Kept: the last two (80, 90), the best loss (30), multiples of 40 (0, 40, 80).
    expected = {f"checkpoint_batch_{b:04d}.h5" for b in (10, 20, 50, 60, 70)}
    would = {
        Path(line.split()[-1]).name
        for line in proc.stdout.splitlines()
        if line.startswith("would delete ")
    }
    assert would == expected
    assert "dry run: nothing deleted" in proc.stdout

    proc = run(*args, "--json")
    assert proc.returncode == 0
    report = json.loads(proc.stdout)
    assert report["dry_run"] is False
    assert {Path(p).name for p in report["deleted"]} == expected
    assert names(run_dir) == before - expected
    # Applying the same policy again deletes nothing more.
    again = json.loads(run(*args, "--json").stdout)
    assert again["deleted"] == []


def test_prune_keeps_invalid_unless_asked(run_dir: Path):
    flip_byte(run_dir / "checkpoint_batch_0090.h5", 3000)
    proc = run("prune", run_dir, "--keep-last", 2)
    assert proc.returncode == 1  # done, but an invalid file is kept
    # Only valid checkpoints count: 70 and 80 are the two newest valid ones.
    assert names(run_dir) == {f"checkpoint_batch_{b:04d}.h5" for b in (70, 80, 90)}
    assert "7 of 10 checkpoint file(s) deleted, 3 kept" in proc.stdout
    proc = run("prune", run_dir, "--keep-last", 2, "--delete-invalid")
    assert proc.returncode == 0
    assert names(run_dir) == {f"checkpoint_batch_{b:04d}.h5" for b in (70, 80)}


def test_prune_matches_the_manager(tmp_path: Path, run_dir: Path):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    manager = CheckpointManager(
        copy, keep_last_n=3, keep_best_n=2, best_mode="max", auto_cleanup=False
    )
    expected = {p.name for p in manager.cleanup_old_checkpoints()}
    proc = run("prune", run_dir, "--keep-last", 3, "--keep-best", 2, "--best-mode", "max", "--json")
    assert {Path(p).name for p in json.loads(proc.stdout)["deleted"]} == expected
    assert names(run_dir) == names(copy)


def test_prune_usage_errors(run_dir: Path):
    assert run("prune", run_dir).returncode == 2  # --keep-last is required
    assert run("prune", run_dir, "--keep-last", 0).returncode == 2
    assert run("prune", run_dir, "--keep-last", "two").returncode == 2
    assert run("prune", run_dir, "--keep-last", 1, "--best-mode", "median").returncode == 2
    assert len(names(run_dir)) == 10


# ----------------------------------------------------------------------- migrate


def test_migrate_refuses_without_allow_pickle(tmp_path: Path, seed_dir: Path):
    dst = tmp_path / "dst"
    proc = run("migrate", seed_dir, dst)
    assert proc.returncode == 1
    line = one_error_line(proc)
    assert "pickled" in line and "--allow-pickle" in line and "arbitrary code" in line
    assert not dst.exists()


def test_migrate_converts_and_verifies(tmp_path: Path, seed_dir: Path):
    dst = tmp_path / "dst"
    proc = run("migrate", seed_dir, dst, "--prefix", "homodyne_state", "--allow-pickle")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("converted")]
    assert len(lines) == 3
    assert "3 file(s): 3 converted, 0 skipped, 0 failed" in proc.stdout

    old = CheckpointManager(seed_dir, prefix="homodyne_state", allow_pickle=True)
    new = CheckpointManager(dst, prefix="homodyne_state")  # no pickle needed any more
    for batch in (0, 10, 20):
        path = dst / f"homodyne_state_batch_{batch:04d}.h5"
        assert path.read_bytes()[:8] == b"\x89H5C\r\n\x1a\n"  # an h5ckpt file
        assert new.validate_checkpoint(path)
        a = old.load_checkpoint(seed_dir / path.name)
        b = new.load_checkpoint(path)
        assert b["batch_idx"] == a["batch_idx"] and b["loss"] == a["loss"]
        assert values_equal(b["parameters"], a["parameters"])
        assert values_equal(b["optimizer_state"], a["optimizer_state"])
        assert values_equal(b["metadata"], a["metadata"])
    assert new.load_latest()["batch_idx"] == 20
    assert json.loads(run("verify", dst, "--json").stdout)[0]["status"] == "valid"

    # Again: existing files are skipped, not overwritten.
    proc = run("migrate", seed_dir, dst, "--allow-pickle")
    assert proc.returncode == 0
    assert "0 converted, 3 skipped, 0 failed" in proc.stdout
    # Another prefix on the way.
    proc = run("migrate", seed_dir, dst, "--allow-pickle", "--dst-prefix", "fit")
    assert proc.returncode == 0
    assert names(dst) >= {"fit_batch_0000.h5", "fit_batch_0010.h5", "fit_batch_0020.h5"}


def test_migrate_with_a_key_in_the_environment(tmp_path: Path, seed_dir: Path):
    """The seed files carry no tag: they are read without the key, and the new files
    are signed with it."""
    dst = tmp_path / "dst"
    env = {"H5CKPT_HMAC_KEY": "secret"}
    proc = run("migrate", seed_dir, dst, "--allow-pickle", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "3 file(s): 3 converted, 0 skipped, 0 failed" in proc.stdout
    path = dst / "homodyne_state_batch_0020.h5"
    for key, signed in (("secret", True), ("other", False)):
        manager = CheckpointManager(dst, prefix="homodyne_state", hmac_key=key)
        assert manager.validate_checkpoint(path) is signed
    assert run("verify", dst, env=env).returncode == 0
    assert run("ls", seed_dir, "--prefix", "homodyne_state", env=env).returncode == 1  # unsigned


def test_migrate_state_without_a_native_form(tmp_path: Path, seed_writer):
    src = tmp_path / "src"
    src.mkdir()
    seed_writer(src, 5, np.ones(2), {"tags": {1, 2}, "x": 1.5}, 0.25)
    seed_writer(src, 6, np.ones(2), {"x": 1.5}, 0.25)
    dst = tmp_path / "dst"
    proc = run("migrate", src, dst, "--allow-pickle", "--native-only")
    assert proc.returncode == 1
    assert "1 converted, 0 skipped, 1 failed" in proc.stdout
    assert "optimizer_state['tags'] has no native HDF5 form" in proc.stdout
    assert names(dst) == {"homodyne_state_batch_0006.h5"}

    proc = run("migrate", src, dst, "--allow-pickle")
    assert proc.returncode == 0
    assert "kept pickled" in proc.stdout
    path = dst / "homodyne_state_batch_0005.h5"
    with pytest.raises(h5ckpt.CheckpointPickleError):
        CheckpointManager(dst, prefix="homodyne_state").load_checkpoint(path)
    state = CheckpointManager(dst, prefix="homodyne_state", allow_pickle=True).load_checkpoint(path)
    assert state["optimizer_state"] == {"tags": {1, 2}, "x": 1.5}
    tree = json.loads(run("show", path, "--json").stdout)["tree"]
    assert tree["optimizer_state"]["children"]["tags"]["type"] == "pickle"
    assert tree["optimizer_state"]["children"]["x"] == {
        "type": "float",
        "dtype": "float64",
        "value": 1.5,
    }


def test_migrate_reports_invalid_sources_and_usage_errors(tmp_path: Path, seed_dir: Path):
    flip_in_seed_pickle(seed_dir / "homodyne_state_batch_0010.h5")
    dst = tmp_path / "dst"
    proc = run("migrate", seed_dir, dst, "--allow-pickle")
    assert proc.returncode == 1
    [failed] = [line for line in proc.stdout.splitlines() if line.startswith("failed")]
    assert "homodyne_state_batch_0010.h5" in failed and "checksum mismatch" in failed
    assert names(dst) == {"homodyne_state_batch_0000.h5", "homodyne_state_batch_0020.h5"}

    proc = run("migrate", seed_dir, seed_dir, "--allow-pickle")
    assert proc.returncode == 2
    assert "DST_DIR is SRC_DIR" in proc.stderr
    proc = run("migrate", tmp_path / "nope", dst)
    assert proc.returncode == 1
    assert "no such directory" in one_error_line(proc)
    proc = run("migrate", seed_dir, dst, "--prefix", "other")
    assert proc.returncode == 1
    assert "no checkpoints named other_batch_<n>.h5" in one_error_line(proc)
    assert run("migrate", seed_dir).returncode == 2


# -------------------------------------------------------------------------- demo


def test_demo_help_reaches_the_demo():
    proc = run("demo", "--help")
    assert proc.returncode == 0
    assert "--kill-after" in proc.stdout


def test_long_listings_keep_the_table_layout(tmp_path: Path):
    """Above RICH_TABLE_MAX_ROWS rows ``ls`` lays the table out itself (rich takes
    about a millisecond per row); the columns, their order and the marks stay."""
    m = CheckpointManager(tmp_path, keep_last_n=None, durable=False, compression=None)
    count = cli_module.RICH_TABLE_MAX_ROWS + 5
    for b in range(count):
        m.save_checkpoint(b, np.ones(2), {}, float(b))
    (tmp_path / "checkpoint_batch_0003.h5").write_bytes(b"junk")
    proc = run("ls", tmp_path)
    assert proc.returncode == 1 and proc.stderr == ""  # 1: batch 3 is invalid
    lines = proc.stdout.splitlines()
    assert lines[0] == f"{tmp_path}  (checkpoint_batch_*.h5)"
    assert lines[1].split() == ["batch", "loss", "saved", "size", "status", "note"]
    assert set(lines[2].strip()) == {"─"}
    rows = lines[3 : 3 + count]
    batches = [r.split()[1] if r.split()[0] == "*" else r.split()[0] for r in rows]
    assert batches == [str(b) for b in range(count)]
    assert rows[3].split()[:3] == ["3", "-", "-"] and "not a checkpoint file" in rows[3]
    assert rows[-1].split()[:2] == ["*", str(count - 1)]
    assert rows[-1].split()[2] == f"{count - 1:g}"
    assert rows[5].split()[-1] == "unverified"
    # Cells sit in their header's column: right-aligned batch numbers end where the
    # header "batch" ends, and each status starts where "status" starts.
    batch_end = lines[1].index("batch") + len("batch")
    status_at = lines[1].index("status")
    for r, b in zip(rows, batches, strict=True):
        assert r[batch_end - len(b) : batch_end] == b
        assert r[status_at:].split()[0] in ("unverified", "invalid", "valid")


def test_table_block_matches_rich_table_cell_for_cell():
    columns = [("", "left"), ("batch", "right"), ("status", "left"), ("note", "left")]
    rows = [
        [cli_module.Text("*", style="green") if b == 7 else "", str(b), "valid", "x" * (b % 3)]
        for b in range(12)
    ]
    small = cli_module._table(columns, rows, "title")
    limit = cli_module.RICH_TABLE_MAX_ROWS
    try:
        cli_module.RICH_TABLE_MAX_ROWS = 0
        block = cli_module._table(columns, rows, "title")
    finally:
        cli_module.RICH_TABLE_MAX_ROWS = limit
    assert isinstance(block, cli_module.Text) and not isinstance(small, cli_module.Text)

    def cells(renderable) -> list[list[str]]:
        console = cli_module.Console(width=200, file=io.StringIO(), highlight=False)
        with console.capture() as captured:
            console.print(renderable)
        lines = captured.get().splitlines()
        # (rich's rule under the header spans its padding too; only its length differs)
        return [line.split() for line in lines if line.strip() and set(line.strip()) != {"─"}]

    assert cells(block) == cells(small)
    assert [span.style for span in block.spans if span.style == "green"] == ["green"]


# ------------------------------------------------ exit statuses, JSON, keys


def test_exit_status_is_1_whenever_a_file_is_invalid(run_dir: Path, tmp_path: Path):
    for args in (("ls",), ("ls", "--verify"), ("ls", "--json"), ("verify",), ("verify", "--json")):
        assert run(args[0], run_dir, *args[1:]).returncode == 0, args
    assert run("prune", run_dir, "--keep-last", 20).returncode == 0
    # A damaged header: invalid for every command, without --verify too.
    flip_byte(run_dir / "checkpoint_batch_0040.h5", 50)
    for args in (("ls",), ("ls", "--verify"), ("ls", "--json"), ("verify",), ("verify", "--json")):
        proc = run(args[0], run_dir, *args[1:])
        assert proc.returncode == 1, args
        assert proc.stderr == "", args  # an invalid file is a finding, not an error
    assert run("show", run_dir / "checkpoint_batch_0040.h5").returncode == 1
    # A damaged payload: found by the commands that hash.
    flip_byte(run_dir / "checkpoint_batch_0040.h5", 50)
    flip_byte(run_dir / "checkpoint_batch_0060.h5", 3000)
    assert run("ls", run_dir).returncode == 0  # headers only: 60 is "unverified"
    assert run("ls", run_dir, "--verify").returncode == 1
    assert run("verify", run_dir).returncode == 1
    # prune keeps an invalid file and says so (exit 1); deleting it ends at 0.
    proc = run("prune", run_dir, "--keep-last", 20)
    assert proc.returncode == 1
    assert "kept 1 invalid file(s)" in proc.stdout and "checkpoint_batch_0060.h5" in proc.stdout
    report = json.loads(run("prune", run_dir, "--keep-last", 20, "--dry-run", "--json").stdout)
    assert [Path(p).name for p in report["invalid_kept"]] == ["checkpoint_batch_0060.h5"]
    assert run("prune", run_dir, "--keep-last", 20, "--delete-invalid").returncode == 0
    assert run("ls", run_dir, "--verify").returncode == 0


def test_empty_directories(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for args in (("ls",), ("ls", "--json"), ("prune", "--keep-last", 1)):
        proc = run(args[0], empty, *args[1:])
        assert proc.returncode == 0 and proc.stderr == "", args
    assert json.loads(run("ls", empty, "--json").stdout) == []
    proc = run("verify", empty)
    assert proc.returncode == 1
    line = one_error_line(proc)
    assert "nothing to verify" in line and "_batch_<n>.h5" in line and str(empty) in line


def test_json_says_null_for_what_the_header_could_not_give(tmp_path: Path):
    d = tmp_path / "d"
    m = CheckpointManager(d, keep_last_n=None)
    m.save_checkpoint(10, np.ones(2), {}, float("nan"))
    m.save_checkpoint(20, np.ones(2), {}, float("-inf"))
    good = m.save_checkpoint(30, np.ones(2), {}, 0.25)
    (d / "checkpoint_batch_0040.h5").write_bytes(good.read_bytes()[:300])  # no header
    (d / "checkpoint_batch_0050.h5").write_bytes(b"not a checkpoint at all")
    corrupt = bytearray(m.save_checkpoint(60, np.ones(2), {}, float("nan")).read_bytes())
    corrupt[-10] ^= 1  # intact header (its NaN loss is real), bad payload
    (d / "checkpoint_batch_0060.h5").write_bytes(bytes(corrupt))
    for args in (("ls", d, "--json"), ("ls", d, "--verify", "--json"), ("verify", d, "--json")):
        proc = run(*args)
        assert proc.returncode == 1, args
        rows = {r["batch_idx"]: r for r in json.loads(proc.stdout)}
        assert rows[10]["loss"] == "NaN" and isinstance(rows[10]["timestamp"], float)
        assert rows[20]["loss"] == "-Infinity"
        assert rows[30]["loss"] == 0.25
        for unknown in (40, 50):
            assert rows[unknown]["loss"] is None and rows[unknown]["timestamp"] is None, args
        if "--json" in args and (args[0] == "verify" or "--verify" in args):
            assert rows[60]["status"] == "invalid"
        assert rows[60]["loss"] == "NaN"


def test_keyless_verify_says_the_tag_was_not_checked(tmp_path: Path):
    keyed = CheckpointManager(tmp_path / "k", hmac_key=b"secret", keep_last_n=None)
    for b in (1, 2):
        keyed.save_checkpoint(b, np.ones(3), {}, 1.0)
    CheckpointManager(tmp_path / "k", prefix="plain").save_checkpoint(3, np.ones(3), {}, 1.0)
    env = {"H5CKPT_HMAC_KEY": ""}
    proc = run("verify", tmp_path / "k", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "2 carry an HMAC tag that was not checked" in proc.stdout
    assert "H5CKPT_HMAC_KEY" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if "_batch_000" in line]
    assert all("tag not checked" in r for r in rows if "checkpoint_batch" in r)
    assert all("tag not checked" not in r for r in rows if "plain_batch" in r)
    results = {
        Path(r["path"]).name: r
        for r in json.loads(run("verify", tmp_path / "k", "--json", env=env).stdout)
    }
    assert results["checkpoint_batch_0001.h5"]["keyed"] is True
    assert results["checkpoint_batch_0001.h5"]["tag_checked"] is False
    assert "not checked" in results["checkpoint_batch_0001.h5"]["note"]
    assert results["plain_batch_0003.h5"]["keyed"] is False
    assert results["plain_batch_0003.h5"]["note"] is None
    with_key = json.loads(
        run(
            "verify",
            tmp_path / "k" / "checkpoint_batch_0001.h5",
            "--json",
            env={"H5CKPT_HMAC_KEY": "secret"},
        ).stdout
    )
    assert with_key[0]["tag_checked"] is True and with_key[0]["note"] is None
    # show does not claim a tag check it did not make.
    shown = run("show", tmp_path / "k" / "checkpoint_batch_0001.h5", env=env).stdout
    assert "HMAC tag not checked" in shown
    shown = run(
        "show", tmp_path / "k" / "checkpoint_batch_0001.h5", env={"H5CKPT_HMAC_KEY": "secret"}
    ).stdout
    assert "HMAC tag)" in shown


def test_key_in_the_environment_that_is_not_utf8(tmp_path: Path):
    CheckpointManager(tmp_path, hmac_key=b"\xffkey").save_checkpoint(1, np.ones(2), {}, 0.0)
    env = {**os.environ, "H5CKPT_HMAC_KEY": os.fsdecode(b"\xffkey")}
    for command in ("verify", "ls", "show"):
        target = tmp_path / "checkpoint_batch_0001.h5" if command == "show" else tmp_path
        proc = subprocess.run(
            [*H5CKPT, command, str(target)], capture_output=True, text=True, timeout=180, env=env
        )
        assert proc.returncode == 0, (command, proc.stderr)
    env["H5CKPT_HMAC_KEY"] = os.fsdecode(b"\xfeother")
    proc = subprocess.run(
        [*H5CKPT, "verify", str(tmp_path)], capture_output=True, text=True, timeout=180, env=env
    )
    assert proc.returncode == 1 and proc.stderr == ""


def test_argument_values_the_manager_refuses_are_usage_errors(run_dir: Path, tmp_path: Path):
    huge = str(2**63)
    for args in (
        ("prune", run_dir, "--keep-last", huge),
        ("prune", run_dir, "--keep-last", 1, "--keep-best", huge),
        ("prune", run_dir, "--keep-last", 1, "--keep-every", 10**30),
        ("ls", run_dir, "--prefix", ""),
        ("ls", run_dir, "--prefix", "a/b"),
        ("prune", run_dir, "--keep-last", 1, "--prefix", "p" * 300),
        ("migrate", run_dir, tmp_path / "out", "--dst-prefix", "x/y"),
    ):
        proc = run(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "usage:" in proc.stderr and "Traceback" not in proc.stderr
    assert len(names(run_dir)) == 10 and not (tmp_path / "out").exists()


ODD_TEXT = st.one_of(
    st.text(
        st.characters(codec=None, exclude_categories=(), exclude_characters="\x00"), max_size=6
    ),
    st.sampled_from(["", "-1", "0", str(2**63), str(10**40), "nan", "1e400", "\udcff", "a/b"]),
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(command=st.sampled_from(["ls", "verify", "show", "prune", "migrate"]), odd=ODD_TEXT)
def test_odd_command_lines_fail_as_documented(tmp_path: Path, command: str, odd: str):
    """In process, any odd argument ends in a documented exit status with a one-line
    message that is a CheckpointError's (never a leaked UnicodeEncodeError, ...)."""
    d = tmp_path / "run"
    if not d.exists():
        CheckpointManager(d).save_checkpoint(1, np.ones(2), {}, 0.5)
    variants = {
        "ls": [[str(d), "--prefix", odd], [str(tmp_path / odd.replace("/", "_"))]],
        "verify": [[str(tmp_path / odd.replace("/", "_"))], [str(d), str(d / odd)]],
        "show": [[str(d / odd.replace("/", "_"))]],
        "prune": [
            [str(d), "--keep-last", odd, "--dry-run"],
            [str(d), "--keep-last", "5", "--prefix", odd],
        ],
        "migrate": [[str(d), str(tmp_path / "out"), "--prefix", odd, "--dst-prefix", odd]],
    }[command]
    for args in variants:
        out, err = io.StringIO(), io.StringIO()  # text as it is, whatever its characters
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = cli_module.main([command, *args])
            except SystemExit as exc:  # argparse: a usage error
                status = exc.code
        assert status in (0, 1, 2), (command, args)
        if status == 1 and err.getvalue():
            [line] = err.getvalue().strip().splitlines()
            assert line.startswith("h5ckpt: error: ")
            assert not re.match(r"h5ckpt: error: [A-Z]\w*(Error|Exception): ", line), line
        if status == 2:
            assert "usage:" in err.getvalue()


def test_file_names_that_are_not_utf8_print_as_their_bytes(tmp_path: Path):
    """Such names reach Python as lone surrogates; a strict stdout (a UTF-8 locale
    such as en_US.UTF-8 has one) must not turn them into a failure."""
    d = tmp_path / os.fsdecode(b"run-\xff")
    CheckpointManager(d).save_checkpoint(1, np.ones(2), {}, 0.5)
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}
    for args in (
        ["ls", d],
        ["ls", d, "--verify"],
        ["verify", d],
        ["show", d / "checkpoint_batch_0001.h5"],
    ):
        proc = subprocess.run(
            [*H5CKPT, *map(os.fsencode, args)], capture_output=True, timeout=180, env=env
        )
        assert proc.returncode == 0, (args, proc.stderr)
        assert b"run-\xff" in proc.stdout and proc.stderr == b""
    proc = subprocess.run([*H5CKPT, "ls", d / "missing"], capture_output=True, timeout=180, env=env)
    assert proc.returncode == 1 and proc.stderr.startswith(b"h5ckpt: error: no such directory")
