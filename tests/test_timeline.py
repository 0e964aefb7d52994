"""Restarts and rollbacks in a directory that holds a newer run's checkpoints.

An earlier run left batches 70, 80 and 90; a new run starts at 0 (a fresh start) or
resumes from 70 (a rollback). Without a policy, retention deleted every new save
right after it returned and a crash resumed the abandoned run. Now a save below the
newest valid checkpoint is refused (``on_older_batch="raise"``, the default) or the
newer files are first moved into a subdirectory (``"set_aside"``, or the explicit
``set_aside_newer_than``). Real files and real processes throughout; the crash is a
SIGKILL.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

import h5ckpt
import h5ckpt.verification
from h5ckpt import CheckpointError, CheckpointManager
from h5ckpt.staging import DirectoryLock

OLD = (70, 80, 90)


def name(b: int, prefix: str = "checkpoint") -> str:
    return f"{prefix}_batch_{b:04d}.h5"


def pattern_batches(d: Path) -> list[int]:
    return sorted(int(p.name[17:21]) for p in d.glob("checkpoint_batch_*.h5"))


def snapshot(d: Path) -> dict[str, tuple[int, int]]:
    """Every entry under ``d`` (recursively) with its inode and size."""
    out = {}
    for p in sorted(d.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(d))] = (st.st_ino, st.st_size)
    return out


def save(m: CheckpointManager, b: int, run: str) -> Path:
    return m.save_checkpoint(b, np.full(1000, float(b)), {"b": b, "run": run}, float(b))


def old_run(d: Path) -> None:
    m = CheckpointManager(d, keep_last_n=3)
    for b in OLD:
        save(m, b, "old")


def aside_dirs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir())


def check_old_run_intact(where: Path, batches: tuple[int, ...]) -> None:
    """``batches`` of the old run are in ``where``, every one verifies and loads."""
    m = CheckpointManager(where, keep_last_n=None, auto_cleanup=False)
    assert [i.batch_idx for i in m.list_checkpoints(verify=True)] == list(batches)
    for b in batches:
        data = m.load_checkpoint(where / name(b))
        assert data["optimizer_state"] == {"b": b, "run": "old"}


# -- the default: refuse ---------------------------------------------------------------


def test_fresh_restart_is_refused_and_changes_nothing(ckpt_dir: Path):
    old_run(ckpt_dir)
    before = snapshot(ckpt_dir)
    m = CheckpointManager(ckpt_dir, keep_last_n=3)
    with pytest.raises(h5ckpt.CheckpointConflictError) as refused:
        save(m, 0, "new")
    message = str(refused.value)
    assert name(90) in message and "batch 0" in message
    assert 'on_older_batch="set_aside"' in message and "set_aside_newer_than(" in message
    assert refused.value.error_context["newest_valid"] == str(ckpt_dir / name(90))
    assert isinstance(refused.value, CheckpointError)
    # The asynchronous save is refused at the call, not on its future.
    with pytest.raises(h5ckpt.CheckpointConflictError):
        m.save_checkpoint_async(10, np.ones(3), {}, 0.0)
    assert snapshot(ckpt_dir) == before
    # The same batch again (an overwrite) and newer batches are fine.
    assert save(m, 90, "old").exists()
    assert save(m, 100, "new").exists()
    assert pattern_batches(ckpt_dir) == [80, 90, 100]
    m.close()


def test_rollback_is_refused_until_the_newer_ones_are_set_aside(ckpt_dir: Path, caplog):
    old_run(ckpt_dir)
    m = CheckpointManager(ckpt_dir, keep_last_n=3)
    state = m.load_checkpoint(m.checkpoint_path(70))  # the user rolls back on purpose
    assert state["batch_idx"] == 70
    with pytest.raises(h5ckpt.CheckpointConflictError):
        save(m, 75, "new")
    assert pattern_batches(ckpt_dir) == list(OLD)
    with caplog.at_level(logging.WARNING, logger="h5ckpt"):
        aside = m.set_aside_newer_than(70)
    assert aside is not None and aside.parent == ckpt_dir
    assert aside.name.startswith("abandoned-")
    assert any(aside.name in r.getMessage() and name(90) in r.getMessage() for r in caplog.records)
    check_old_run_intact(aside, (80, 90))
    for b in (75, 85, 95):
        path = save(m, b, "new")
        assert path.exists(), b
    assert pattern_batches(ckpt_dir) == [75, 85, 95]  # keep_last_n=3 took 70
    assert CheckpointManager(ckpt_dir).load_latest()["optimizer_state"] == {"b": 95, "run": "new"}
    assert m.set_aside_newer_than(95) is None  # nothing newer: no directory
    assert aside_dirs(ckpt_dir) == [aside]


def test_set_aside_everything_for_a_fresh_start(ckpt_dir: Path):
    old_run(ckpt_dir)
    m = CheckpointManager(ckpt_dir, keep_last_n=3)
    aside = m.set_aside_newer_than(-1)
    assert pattern_batches(ckpt_dir) == []
    check_old_run_intact(aside, OLD)
    for b in (0, 10, 20):
        assert save(m, b, "new").exists()
    assert pattern_batches(ckpt_dir) == [0, 10, 20]
    with pytest.raises(CheckpointError):
        m.set_aside_newer_than(-2)


def test_newer_invalid_files_do_not_block_a_save(ckpt_dir: Path):
    old_run(ckpt_dir)
    path = ckpt_dir / name(90)
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0xFF
    path.write_bytes(bytes(raw))
    m = CheckpointManager(ckpt_dir, keep_last_n=3)
    with pytest.raises(h5ckpt.CheckpointConflictError) as refused:
        save(m, 75, "new")  # 80 is still valid
    assert refused.value.error_context["newest_valid"] == str(ckpt_dir / name(80))
    assert save(m, 85, "new").exists()  # above every valid one: the invalid 90 stays
    assert pattern_batches(ckpt_dir) == [70, 80, 85, 90]
    assert m.find_latest_checkpoint() == m.checkpoint_path(85)


def test_a_legacy_newer_checkpoint_counts(ckpt_dir: Path, seed_writer):
    seed_writer(ckpt_dir, 50, np.ones(3), {"step": 50}, 0.5, prefix="checkpoint")
    m = CheckpointManager(ckpt_dir)
    with pytest.raises(h5ckpt.CheckpointConflictError):
        save(m, 40, "new")


def test_the_check_hashes_only_the_newest_of_many_valid_newer_files(ckpt_dir: Path, monkeypatch):
    m = CheckpointManager(ckpt_dir, keep_last_n=None)
    for b in range(10, 20):
        save(m, b, "old")
    hashed: list[str] = []
    real = h5ckpt.verification._native.verify_fds

    def counting(fds, paths, key):
        hashed.extend(Path(p).name for p in paths)
        return real(fds, paths, key)

    monkeypatch.setattr(h5ckpt.verification._native, "verify_fds", counting)
    fresh = CheckpointManager(ckpt_dir, keep_last_n=None)
    with pytest.raises(h5ckpt.CheckpointConflictError):
        save(fresh, 5, "new")
    assert hashed == [name(19)]


def test_bad_on_older_batch_is_refused(ckpt_dir: Path):
    for value in ("ignore", None, 1, "RAISE"):
        with pytest.raises(h5ckpt.CheckpointValueError):
            CheckpointManager(ckpt_dir, on_older_batch=value)


# -- set_aside ---------------------------------------------------------------------------


def test_fresh_restart_with_set_aside(ckpt_dir: Path, caplog):
    old_run(ckpt_dir)
    m = CheckpointManager(ckpt_dir, keep_last_n=3, on_older_batch="set_aside")
    with caplog.at_level(logging.WARNING, logger="h5ckpt"):
        for b in (0, 10, 20):
            path = save(m, b, "new")
            assert path.exists(), b
    (aside,) = aside_dirs(ckpt_dir)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(aside.name in w and name(70) in w for w in warnings), warnings
    check_old_run_intact(aside, OLD)
    assert pattern_batches(ckpt_dir) == [0, 10, 20]
    fresh = CheckpointManager(ckpt_dir, keep_last_n=3)
    assert fresh.load_latest()["optimizer_state"] == {"b": 20, "run": "new"}
    # Retention never looks into the subdirectory.
    assert fresh.cleanup_old_checkpoints() == []
    check_old_run_intact(aside, OLD)


def test_rollback_with_set_aside(ckpt_dir: Path):
    old_run(ckpt_dir)
    m = CheckpointManager(ckpt_dir, keep_last_n=3, on_older_batch="set_aside")
    assert m.load_checkpoint(m.checkpoint_path(70))["batch_idx"] == 70
    assert save(m, 75, "new").exists()
    (aside,) = aside_dirs(ckpt_dir)
    check_old_run_intact(aside, (80, 90))
    assert pattern_batches(ckpt_dir) == [70, 75]
    for b in (85, 95):
        assert save(m, b, "new").exists()
    assert aside_dirs(ckpt_dir) == [aside]  # nothing newer any more: no second one
    assert pattern_batches(ckpt_dir) == [75, 85, 95]
    assert CheckpointManager(ckpt_dir).load_latest()["optimizer_state"] == {"b": 95, "run": "new"}


def test_set_aside_of_an_async_save(ckpt_dir: Path):
    old_run(ckpt_dir)
    with CheckpointManager(ckpt_dir, keep_last_n=3, on_older_batch="set_aside") as m:
        futures = [m.save_checkpoint_async(b, np.ones(10), {"b": b}, 0.0) for b in (0, 10)]
        assert [f.result().exists() for f in futures] == [True, True]
    assert pattern_batches(ckpt_dir) == [0, 10]
    (aside,) = aside_dirs(ckpt_dir)
    check_old_run_intact(aside, OLD)


# -- another process saved meanwhile: checked again under the lock --------------------


def _prepared_checkpoint(tmp_path: Path, b: int) -> Path:
    """A valid checkpoint of batch ``b``, written elsewhere, to rename into place."""
    elsewhere = tmp_path / f"elsewhere{b}"
    return save(CheckpointManager(elsewhere), b, "other")


@pytest.mark.parametrize("mode", ["raise", "set_aside"])
def test_a_newer_file_committed_during_the_save_is_seen_under_the_lock(
    ckpt_dir: Path, tmp_path: Path, mode: str
):
    m = CheckpointManager(ckpt_dir, keep_last_n=2, on_older_batch=mode, durable=False)
    for b in (1, 2):
        save(m, b, "old")
    newer = _prepared_checkpoint(tmp_path, 9)
    outcome: list[BaseException | Path] = []

    def saver() -> None:
        try:
            outcome.append(m.save_checkpoint(5, np.full(200_000, 5.0), {"b": 5}, 0.0))
        except BaseException as exc:
            outcome.append(exc)

    other = DirectoryLock(ckpt_dir)  # another process in the middle of its commit
    with other.held():
        t = threading.Thread(target=saver)
        t.start()
        # Once its temp file exists, the save is past the check at the call.
        while not any(p.name.endswith(".tmp") for p in ckpt_dir.iterdir()):
            assert t.is_alive(), outcome
        os.rename(newer, ckpt_dir / name(9))
    t.join(60)
    assert not t.is_alive()
    assert not [p for p in ckpt_dir.iterdir() if p.name.endswith(".tmp")]
    if mode == "raise":
        (exc,) = outcome
        assert isinstance(exc, h5ckpt.CheckpointConflictError), exc
        assert pattern_batches(ckpt_dir) == [1, 2, 9]
        assert aside_dirs(ckpt_dir) == []
    else:
        assert outcome == [m.checkpoint_path(5)]
        assert pattern_batches(ckpt_dir) == [2, 5]
        (aside,) = aside_dirs(ckpt_dir)
        assert [p.name for p in aside.iterdir()] == [name(9)]
        assert m.find_latest_checkpoint() == m.checkpoint_path(5)


# -- a crash right after the first new save ---------------------------------------------

CRASHER = """
    import sys, time
    import numpy as np
    from h5ckpt import CheckpointConflictError, CheckpointManager

    d, mode, resume, first = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    m = CheckpointManager(d, keep_last_n=3, on_older_batch=mode)
    if resume >= 0:
        assert m.load_checkpoint(m.checkpoint_path(resume))["batch_idx"] == resume
    params, state = np.full(1000, float(first)), {"b": first, "run": "new"}
    try:
        path = m.save_checkpoint(first, params, state, float(first))
    except CheckpointConflictError:
        print("refused", flush=True)
        m.set_aside_newer_than(resume)
        path = m.save_checkpoint(first, params, state, float(first))
    print("saved", path.exists(), flush=True)
    time.sleep(120)
"""


@pytest.mark.parametrize("mode", ["raise", "set_aside"])
@pytest.mark.parametrize(("resume", "first"), [(-1, 0), (70, 75)], ids=["fresh", "rollback"])
def test_crash_right_after_the_first_new_save(ckpt_dir: Path, mode, resume, first):
    old_run(ckpt_dir)
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(CRASHER),
            str(ckpt_dir),
            mode,
            str(resume),
            str(first),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = [child.stdout.readline().strip()]
        if lines[0] == "refused":
            lines.append(child.stdout.readline().strip())
    finally:
        child.send_signal(signal.SIGKILL)
        _, stderr = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL, stderr
    assert lines[-1] == "saved True", (lines, stderr)
    assert (lines[0] == "refused") == (mode == "raise")
    fresh = CheckpointManager(ckpt_dir, keep_last_n=3)
    data = fresh.load_latest()
    assert data is not None and data["optimizer_state"] == {"b": first, "run": "new"}
    newer = tuple(b for b in OLD if b > resume)
    kept = [b for b in OLD if b <= resume]
    assert pattern_batches(ckpt_dir) == sorted([*kept, first])
    (aside,) = aside_dirs(ckpt_dir)
    check_old_run_intact(aside, newer)


HALTER = """
    import sys, time
    import numpy as np
    from h5ckpt import CheckpointManager
    from h5ckpt.staging import StagedFile

    def halt(self, *args, **kwargs):  # reached once the newer files are set aside
        print("set aside", flush=True)
        time.sleep(120)

    StagedFile.commit = halt
    d, resume, first = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    m = CheckpointManager(d, keep_last_n=3, on_older_batch="set_aside")
    m.save_checkpoint(first, np.full(1000, float(first)), {"b": first, "run": "new"}, 0.0)
"""


@pytest.mark.parametrize(("resume", "first"), [(-1, 0), (70, 75)], ids=["fresh", "rollback"])
def test_crash_between_set_aside_and_commit(ckpt_dir: Path, resume, first):
    old_run(ckpt_dir)
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HALTER), str(ckpt_dir), str(resume), str(first)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = child.stdout.readline().strip()
    finally:
        child.send_signal(signal.SIGKILL)
        _, stderr = child.communicate(timeout=60)
    assert line == "set aside", stderr
    fresh = CheckpointManager(ckpt_dir, keep_last_n=3)  # sweeps the dead writer's temp file
    data = fresh.load_latest()
    if resume < 0:
        assert data is None  # nothing: never the abandoned run
    else:
        assert data["batch_idx"] == resume and data["optimizer_state"]["run"] == "old"
    assert not [p for p in ckpt_dir.iterdir() if p.name.endswith(".tmp")]
    (aside,) = aside_dirs(ckpt_dir)
    check_old_run_intact(aside, tuple(b for b in OLD if b > resume))
