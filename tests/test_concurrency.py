"""Several processes and threads on one directory; temp files of dead writers.

Invariant 5: processes (and managers in one process) sharing a directory keep the
retention invariants; the advisory lock ``.h5ckpt.lock`` serialises commit and
cleanup, and readers never wait for it. Invariant 6: a temp file whose writer died is
removed by the next manager that opens the directory; a live writer's is kept.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from h5ckpt import CheckpointConflictError, CheckpointManager
from h5ckpt.staging import LOCK_NAME, STALE_AFTER_SECONDS, DirectoryLock

PREFIX = "checkpoint"


def name(b: int, prefix: str = PREFIX) -> str:
    return f"{prefix}_batch_{b:04d}.h5"


def batches(d: Path) -> set[int]:
    return {int(p.name[len(PREFIX) + 7 : -3]) for p in d.glob(f"{PREFIX}_batch_*.h5")}


def temp_files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))


def check_all_load(d: Path) -> None:
    """Every remaining checkpoint verifies and holds what its writer saved."""
    m = CheckpointManager(d, keep_last_n=None)
    for info in m.list_checkpoints(verify=True):
        assert info.status == "valid", info
        data = m.load_checkpoint(info.path)
        assert data["batch_idx"] == info.batch_idx
        assert np.all(data["parameters"] == float(info.batch_idx))
        assert data["optimizer_state"]["b"] == info.batch_idx


def run_python(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# -- several processes ----------------------------------------------------------------

WORKER = """
    import json, os, sys, time
    from pathlib import Path
    import numpy as np
    from h5ckpt import CheckpointConflictError, CheckpointManager

    d, wid, nproc, count, go = sys.argv[1], *map(int, sys.argv[2:5]), sys.argv[5]
    while not os.path.exists(go):
        time.sleep(0.001)
    m = CheckpointManager(d, keep_last_n=3)
    committed, refused = [], []
    for k in range(count):
        b = wid + nproc * k
        try:
            m.save_checkpoint(b, np.full(256, float(b)), {"b": b, "w": wid}, float(-b))
            committed.append(b)
        except CheckpointConflictError as exc:
            # Another worker committed a higher batch first (seen at the call or
            # under the lock): refused, nothing written, the newer one named.
            newest = Path(exc.error_context["newest_valid"]).name
            assert int(newest[len("checkpoint_batch_") : -3]) > b, (b, newest)
            refused.append(b)
        if k % 3 == 0:
            m.cleanup_old_checkpoints()
        if k % 4 == 1:
            state = m.load_latest()
            assert state is not None
            assert np.all(state["parameters"] == state["batch_idx"]), state
        m.list_checkpoints()
    m.cleanup_old_checkpoints()
    print("done", json.dumps({"committed": committed, "refused": refused}))
"""


def test_four_processes_save_and_clean_one_directory(ckpt_dir: Path, tmp_path: Path):
    nproc, count = 4, 15
    go = tmp_path / "go"
    procs = [
        run_python(WORKER, str(ckpt_dir), str(w), str(nproc), str(count), str(go))
        for w in range(nproc)
    ]
    reader = CheckpointManager(ckpt_dir, keep_last_n=None, auto_cleanup=False)
    seen: list[int] = []
    misses = 0
    go.touch()
    while any(p.poll() is None for p in procs):
        # A reader in this process meanwhile: once anything is committed, the latest
        # valid checkpoint is always found and loads.
        state = reader.load_latest()
        if state is None:
            misses += bool(seen)
        else:
            assert np.all(state["parameters"] == state["batch_idx"])
            seen.append(state["batch_idx"])
    committed: list[int] = []
    for p in procs:
        out, err = p.communicate()
        assert p.returncode == 0, err
        assert out.startswith("done")
        report = json.loads(out[len("done") :])
        assert len(report["committed"]) + len(report["refused"]) == count
        committed += report["committed"]
    # The workers save interleaved batches into one directory: one that fell behind
    # another had its save refused (a save below the newest valid checkpoint). What
    # remains is the three newest committed ones; the very last batch always commits.
    total = nproc * count
    newest = sorted(committed)[-3:]
    assert newest[-1] == total - 1
    assert batches(ckpt_dir) == set(newest)
    assert temp_files(ckpt_dir) == []
    assert {p.name for p in ckpt_dir.iterdir()} == {LOCK_NAME} | {name(b) for b in newest}
    check_all_load(ckpt_dir)
    assert misses == 0
    assert seen  # the reader did overlap with the writers


def test_managers_in_threads_of_one_process(ckpt_dir: Path):
    nthreads, count = 4, 12
    managers = [CheckpointManager(ckpt_dir, keep_last_n=3, durable=False) for _ in range(2)]
    errors: list[BaseException] = []
    committed: list[int] = []
    barrier = threading.Barrier(nthreads)

    def work(t: int) -> None:
        try:
            m = managers[t % 2]  # two threads share each manager
            barrier.wait()
            for k in range(count):
                b = t + nthreads * k
                try:
                    m.save_checkpoint(b, np.full(64, float(b)), {"b": b}, 0.0)
                    committed.append(b)
                except CheckpointConflictError:
                    pass  # another thread committed a higher batch first
                if k % 2:
                    m.cleanup_old_checkpoints()
                latest = m.find_latest_checkpoint()
                assert latest is not None
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for m in managers:
        m.cleanup_old_checkpoints()
    total = nthreads * count
    newest = sorted(committed)[-3:]
    assert newest[-1] == total - 1
    assert batches(ckpt_dir) == set(newest)
    assert temp_files(ckpt_dir) == []
    check_all_load(ckpt_dir)


REWRITER = """
    import sys
    import numpy as np
    from h5ckpt import CheckpointManager

    d, versions = sys.argv[1], int(sys.argv[2])
    m = CheckpointManager(d, keep_last_n=1)
    for v in range(1, versions + 1):
        m.save_checkpoint(7, np.full(50_000, float(v)), {"b": 7, "v": v}, float(v))
    print("done")
"""


def test_reader_loads_while_a_writer_replaces_the_same_batch(ckpt_dir: Path):
    versions = 40
    m = CheckpointManager(ckpt_dir, keep_last_n=1, durable=False)
    m.save_checkpoint(7, np.full(50_000, 0.0), {"b": 7, "v": 0}, 0.0)
    path = m.checkpoint_path(7)
    writer = run_python(REWRITER, str(ckpt_dir), str(versions))
    reader = CheckpointManager(ckpt_dir, keep_last_n=1)
    loaded: list[int] = []
    while writer.poll() is None:
        for data in (reader.load_checkpoint(path), reader.load_latest()):
            v = data["optimizer_state"]["v"]
            assert 0 <= v <= versions
            assert np.all(data["parameters"] == float(v))  # one complete version
            assert data["loss"] == float(v)
            loaded.append(v)
    _, err = writer.communicate()
    assert writer.returncode == 0, err
    assert loaded == sorted(loaded)  # versions only move forward
    assert len(set(loaded)) > 1  # the loads did overlap with the rewrites
    assert reader.load_checkpoint(path)["optimizer_state"]["v"] == versions
    assert temp_files(ckpt_dir) == []


def test_readers_do_not_wait_for_the_directory_lock(ckpt_dir: Path):
    m = CheckpointManager(ckpt_dir, keep_last_n=2, durable=False)
    for b in range(3):
        m.save_checkpoint(b, np.full(4, float(b)), {"b": b}, 0.0)
    other = DirectoryLock(ckpt_dir)  # as another process holding it would
    saved = threading.Event()
    with other.held():
        # The readers run in a thread: were any of them to wait for the lock, it
        # would still be waiting when the generous join below gives up.
        read: list[object] = []
        reader = threading.Thread(
            target=lambda: read.extend(
                [
                    m.find_latest_checkpoint(),
                    m.load_latest()["batch_idx"],
                    len(m.list_checkpoints(verify=True)),
                    m.validate_checkpoint(m.checkpoint_path(2)),
                ]
            ),
            daemon=True,
        )
        reader.start()
        reader.join(60)
        assert not reader.is_alive(), "a reader waited for the directory lock"
        assert read == [m.checkpoint_path(2), 2, 2, True]
        # A writer waits for the lock holder before committing.
        t = threading.Thread(
            target=lambda: (m.save_checkpoint(3, np.full(4, 3.0), {"b": 3}, 0.0), saved.set())
        )
        t.start()
        assert not saved.wait(0.5)
        assert not m.checkpoint_path(3).exists()
        assert batches(ckpt_dir) == {1, 2}
    t.join(10)
    assert saved.is_set()
    assert batches(ckpt_dir) == {2, 3}


# -- temp files of writers that died --------------------------------------------------

STAGER = """
    import fcntl, sys, time
    from pathlib import Path
    from h5ckpt.staging import StagedFile

    staged = StagedFile(Path(sys.argv[1]))  # created O_EXCL and flocked, as a save does
    staged_bytes = b"half a checkpoint" * 100
    import os
    os.write(staged.fd, staged_bytes)
    if sys.argv[2] == "unlocked":  # died (or paused) between creating and locking
        fcntl.flock(staged.fd, fcntl.LOCK_UN)
    print(staged.path, flush=True)
    time.sleep(120)
"""


def start_stager(final: Path, mode: str = "locked") -> tuple[subprocess.Popen, Path]:
    proc = run_python(STAGER, str(final), mode)
    line = proc.stdout.readline().strip()
    assert line, proc.stderr.read()
    temp = Path(line)
    assert temp.exists() and temp.parent == final.parent
    return proc, temp


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate()  # reaped (the process is gone) and its pipes closed


@pytest.mark.parametrize("mode", ["locked", "unlocked"])
def test_temp_file_of_a_killed_writer_is_removed_by_the_next_manager(ckpt_dir, mode):
    CheckpointManager(ckpt_dir).save_checkpoint(1, np.ones(2), {}, 0.0)
    proc, temp = start_stager(ckpt_dir / name(2), mode)
    kill(proc)
    assert temp.exists()
    m = CheckpointManager(ckpt_dir)
    assert not temp.exists()
    assert temp_files(ckpt_dir) == []
    assert [i.batch_idx for i in m.list_checkpoints()] == [1]


@pytest.mark.parametrize("mode", ["locked", "unlocked"])
def test_temp_file_of_a_live_writer_is_kept(ckpt_dir: Path, mode: str):
    proc, temp = start_stager(ckpt_dir / name(2), mode)
    try:
        m = CheckpointManager(ckpt_dir, keep_last_n=1, delete_invalid=True, durable=False)
        assert temp.exists()
        m.save_checkpoint(1, np.ones(2), {}, 0.0)
        m.save_checkpoint(3, np.ones(2), {}, 0.0)
        assert m.cleanup_old_checkpoints() == []
        assert temp.exists()
        assert [i.batch_idx for i in m.list_checkpoints()] == [3]
        assert m.find_latest_checkpoint() == m.checkpoint_path(3)
        CheckpointManager(ckpt_dir)
        assert temp.exists()
    finally:
        kill(proc)
    CheckpointManager(ckpt_dir)
    assert not temp.exists()


def test_dead_writer_of_another_prefix_is_left_to_its_own_manager(ckpt_dir: Path):
    proc, temp = start_stager(ckpt_dir / name(2, "other"))
    kill(proc)
    CheckpointManager(ckpt_dir)
    assert temp.exists()
    CheckpointManager(ckpt_dir, prefix="other")
    assert not temp.exists()


def test_temp_file_with_a_reused_pid(ckpt_dir: Path):
    """A free lock and a live pid: kept while recent, removed once clearly stale."""
    recent = ckpt_dir / f".{name(4)}.{os.getpid()}.0123456789ab.tmp"
    old = ckpt_dir / f".{name(5)}.{os.getpid()}.0123456789ab.tmp"
    for p in (recent, old):
        p.write_bytes(b"x")
    past = time.time() - STALE_AFTER_SECONDS - 60
    os.utime(old, (past, past))
    not_ours = ckpt_dir / f".{name(6)}.{os.getpid()}.zz.tmp"  # not our temp pattern
    not_ours.write_bytes(b"x")
    CheckpointManager(ckpt_dir)
    assert recent.exists() and not old.exists() and not_ours.exists()


def test_sweep_only_takes_ascii_batch_numbers(ckpt_dir: Path):
    """A dead writer's temp file has an ASCII batch number; nothing else is swept."""
    dead = 2**22 + 12345  # above the default pid_max: no such process
    if Path("/proc/sys/kernel/pid_max").exists():
        dead = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    ours = ckpt_dir / f".{PREFIX}_batch_0007.h5.{dead}.0123456789ab.tmp"
    arabic = ckpt_dir / f".{PREFIX}_batch_٧.h5.{dead}.0123456789ab.tmp"
    for p in (ours, arabic):
        p.write_bytes(b"x")
    CheckpointManager(ckpt_dir)
    assert not ours.exists() and arabic.exists()
