"""What a save reports once its file is committed, and the order saves commit in.

* A synchronous save after asynchronous ones of the same manager commits after them.
* Once the rename has happened the save has succeeded: a retention failure after it
  is logged and remembered, and the next explicit ``cleanup_old_checkpoints()``
  raises it (or its own error); it is never raised as a failed save.

Retention failures are real: a checkpoint made immutable (``chattr +i``) cannot be
unlinked, even by root. Where planning itself must fail, the real manager's planning
method is replaced on that one instance; the commit is real.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from h5ckpt import CheckpointError, CheckpointManager, CheckpointPermissionError
from h5ckpt.staging import StagedFile


def immutable(path: Path, on: bool) -> None:
    subprocess.run(["chattr", "+i" if on else "-i", str(path)], check=True)


@pytest.fixture
def frozen(ckpt_dir: Path):
    """Make files immutable; undone at the end whatever happens."""
    made: list[Path] = []

    def freeze(path: Path) -> None:
        immutable(path, True)
        made.append(path)

    yield freeze
    for path in made:
        if path.exists():
            immutable(path, False)


def save(m: CheckpointManager, b: int, **meta) -> Path:
    return m.save_checkpoint(b, np.full(100, float(b)), {"b": b}, float(b), meta or None)


# -- item: call order ------------------------------------------------------------------


def test_sync_save_after_a_big_async_save_of_the_same_batch_wins(ckpt_dir: Path, monkeypatch):
    committed: list[str] = []
    real_commit = StagedFile.commit

    def recording_commit(self, *args, **kwargs):
        real_commit(self, *args, **kwargs)
        committed.append(self.final.name)

    monkeypatch.setattr(StagedFile, "commit", recording_commit)
    big = np.random.default_rng(0).standard_normal(6_000_000)  # 48 MB
    with CheckpointManager(ckpt_dir) as m:
        for round_ in range(2):
            fut = m.save_checkpoint_async(100, big, {"phase": "in-loop", "r": round_}, 1.0)
            path = m.save_checkpoint(100, np.ones(3), {"phase": "final", "r": round_}, 0.5)
            assert fut.done() and fut.result() == path
            data = m.load_checkpoint(path)
            assert data["optimizer_state"] == {"phase": "final", "r": round_}
            np.testing.assert_array_equal(data["parameters"], np.ones(3))
    assert len(committed) == 4


def test_set_aside_waits_for_queued_async_saves(ckpt_dir: Path):
    big = np.random.default_rng(1).standard_normal(4_000_000)
    with CheckpointManager(ckpt_dir, keep_last_n=None) as m:
        save(m, 10)
        fut = m.save_checkpoint_async(90, big, {"b": 90}, 0.0)
        aside = m.set_aside_newer_than(10)  # called after the save of 90: includes it
        assert fut.done()
        assert aside is not None and [p.name for p in aside.iterdir()] == [
            m.checkpoint_path(90).name
        ]
        assert save(m, 20).exists()
        assert m.find_latest_checkpoint() == m.checkpoint_path(20)


def test_async_errors_stay_for_wait_until_finished_after_a_sync_save(ckpt_dir: Path):
    m = CheckpointManager(ckpt_dir, keep_last_n=None)
    m.checkpoint_path(2).mkdir()  # the async save of 2 fails for real
    bad = m.save_checkpoint_async(2, np.ones(3), {}, 0.0)
    assert save(m, 3).exists()  # waits for it, does not raise its error
    assert bad.done() and isinstance(bad.exception(), CheckpointError)
    with pytest.raises(CheckpointError):
        m.wait_until_finished()
    m.close()


# -- item: a failure after the commit --------------------------------------------------


def test_unlink_failure_after_commit_is_not_a_failed_save(ckpt_dir: Path, frozen, caplog):
    m = CheckpointManager(ckpt_dir, keep_last_n=1)
    first = save(m, 1)
    frozen(first)
    with caplog.at_level(logging.WARNING, logger="h5ckpt"):
        second = save(m, 2)
    assert second == m.checkpoint_path(2) and second.exists()
    assert first.exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(first.name in w and "not permitted" in w for w in warnings), warnings
    assert CheckpointManager(ckpt_dir).find_latest_checkpoint() == second
    # The next explicit cleanup fails on its own (the file is still immutable).
    with pytest.raises(CheckpointPermissionError) as own:
        m.cleanup_old_checkpoints()
    assert first.name in str(own.value)
    assert own.value.error_context["not_deleted"] == [str(first)]
    immutable(first, False)
    assert m.cleanup_old_checkpoints() == [first]
    assert m.cleanup_old_checkpoints() == []


def test_remembered_failure_surfaces_on_the_next_cleanup(ckpt_dir: Path, frozen):
    m = CheckpointManager(ckpt_dir, keep_last_n=1)
    first = save(m, 1)
    frozen(first)
    assert save(m, 2).exists()
    immutable(first, False)  # the cause is gone; the failure was still real
    with pytest.raises(CheckpointPermissionError) as earlier:
        m.cleanup_old_checkpoints()
    assert "after saving" in str(earlier.value) and first.name in str(earlier.value)
    assert not first.exists()  # this cleanup did its work before reporting
    assert earlier.value.error_context["deleted_now"] == [str(first)]
    assert m.cleanup_old_checkpoints() == []  # reported once


def test_planning_failure_after_commit(ckpt_dir: Path, monkeypatch, caplog):
    m = CheckpointManager(ckpt_dir, keep_last_n=1)
    save(m, 1)

    def broken_plan(policy):
        raise RuntimeError("planning exploded")

    monkeypatch.setattr(m._retention, "plan", broken_plan)
    with caplog.at_level(logging.WARNING, logger="h5ckpt"):
        path = save(m, 2)
        fut = m.save_checkpoint_async(3, np.ones(3), {"b": 3}, 0.0)
        assert fut.result() == m.checkpoint_path(3)
    assert any("planning exploded" in r.getMessage() for r in caplog.records)
    assert path.exists() and m.validate_checkpoint(path)
    assert CheckpointManager(ckpt_dir).find_latest_checkpoint() == m.checkpoint_path(3)
    m.wait_until_finished()  # the async save succeeded: nothing to report
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="planning exploded"):
        m.cleanup_old_checkpoints()
    assert [p.name for p in ckpt_dir.glob("*.h5")] == [m.checkpoint_path(3).name]
    assert m.cleanup_old_checkpoints() == []
    m.close()


def test_explicit_cleanup_that_cannot_plan_raises_a_checkpoint_error(ckpt_dir: Path, monkeypatch):
    m = CheckpointManager(ckpt_dir, keep_last_n=1)
    save(m, 1)
    monkeypatch.setattr(m._retention, "plan", lambda policy: (_ for _ in ()).throw(KeyError("k")))
    with pytest.raises(CheckpointError, match="retention"):
        m.cleanup_old_checkpoints()


def test_a_sync_save_from_a_done_callback_does_not_wait_for_itself(ckpt_dir: Path):
    """The callback runs on the background thread while a later async save is queued
    behind it: waiting for the queue there would never end (a subprocess, so that a
    hang fails the test)."""
    code = textwrap.dedent(
        """
        import sys, threading
        import numpy as np
        from h5ckpt import CheckpointManager

        m = CheckpointManager(sys.argv[1], keep_last_n=None)
        gate = threading.Event()
        done = []

        def on_done(_):
            gate.wait(30)  # the second async save is queued by now
            done.append(m.save_checkpoint(5, np.ones(3), {"from": "callback"}, 0.0))

        first = m.save_checkpoint_async(1, np.ones(3), {}, 0.0)
        first.add_done_callback(on_done)
        second = m.save_checkpoint_async(9, np.ones(3), {}, 0.0)
        gate.set()
        second.result()
        m.close()
        print("ok", [p.name for p in done])
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(ckpt_dir)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok ['checkpoint_batch_0005.h5']"
