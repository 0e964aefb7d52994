"""A process forked from one that uses a manager: its saves, locks and listings work.

``os.fork()`` copies one thread and all memory: locks other threads held stay held,
a thread pool's bookkeeping says idle workers exist that do not, and descriptors
are shared with the parent. Each scenario runs in its own interpreter, which forks
for real; the parent kills a child that does not finish in time (a hang is the
failure), and the whole script runs under a timeout too.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PYTHON_DIR = str(Path(__file__).resolve().parents[1] / "python")

PRELUDE = r'''
import fcntl, os, select, subprocess, sys, threading, time, traceback
from pathlib import Path
import numpy as np
from h5ckpt import CheckpointManager, CheckpointError

def in_child(fn, timeout=60.0):
    """Run fn in a forked child; its exit code, or "hung" (then it is killed)."""
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return "hung"
        time.sleep(0.02)

def wait_for_thread_in_flock():
    """Until a thread of this process is blocked in flock(2) (x86-64: syscall 73)."""
    me = threading.get_native_id()
    for _ in range(3000):
        for task in os.listdir("/proc/self/task"):
            if int(task) == me:
                continue
            try:
                call = Path(f"/proc/self/task/{task}/syscall").read_text().split()[0]
            except OSError:
                continue
            if call == "73":
                return
        time.sleep(0.01)
    raise AssertionError("no thread ever blocked in flock")

def hold_lock_elsewhere(directory):
    """Another process holding the directory lock until it is killed."""
    code = (
        "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
        "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(Path(directory) / ".h5ckpt.lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc

d = Path(sys.argv[1])
'''


def run_script(body: str, directory: Path) -> str:
    env = {**os.environ, "PYTHONPATH": PYTHON_DIR}
    env.pop("H5CKPT_HMAC_KEY", None)
    script = PRELUDE + textwrap.dedent(body)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", script, str(directory)],
            capture_output=True,
            text=True,
            timeout=240,
            env=env,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the script hung: {exc.stderr!r}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_child_async_save_completes(tmp_path: Path):
    out = run_script(
        """
        m = CheckpointManager(d)
        m.save_checkpoint_async(0, np.arange(3.0), {"a": 1}, 1.0).result()

        def child():
            f = m.save_checkpoint_async(1, np.arange(4.0), {"a": 2}, 0.5)
            assert f.result(timeout=30) == m.checkpoint_path(1)
            m.close()
            assert m.load_checkpoint(m.checkpoint_path(1))["optimizer_state"] == {"a": 2}

        print("child:", in_child(child))
        m.close()
        print([i.batch_idx for i in CheckpointManager(d).list_checkpoints(verify=True)])
        """,
        tmp_path / "ck",
    )
    assert out.splitlines() == ["child: 0", "[0, 1]"]


def test_child_saves_while_a_parent_thread_was_mid_save(tmp_path: Path):
    out = run_script(
        """
        m = CheckpointManager(d, keep_last_n=None)
        locker = hold_lock_elsewhere(d)
        # The parent's save writes its file, then waits for the directory lock,
        # inside the manager's own lock, with its snapshot slot taken.
        pending = m.save_checkpoint_async(5, np.arange(5.0), {"who": "parent"}, 1.0)
        wait_for_thread_in_flock()

        def child():
            try:
                pending.result(timeout=30)
            except CheckpointError as exc:
                print("inherited future:", "parent" in str(exc), flush=True)
            m.wait_until_finished()  # the parent's save is not the child's to wait for
            f = m.save_checkpoint_async(6, np.arange(6.0), {"who": "child"}, 0.5)
            assert f.result(timeout=30) == m.checkpoint_path(6)
            m.save_checkpoint(7, np.arange(7.0), {"who": "child"}, 0.25)
            assert m.load_checkpoint(m.checkpoint_path(7))["optimizer_state"] == {"who": "child"}
            m.close()

        # Released only once the child runs: the child must wait for it like anyone.
        threading.Timer(0.5, locker.kill).start()
        print("child:", in_child(child))
        locker.wait()
        assert pending.result(timeout=30) == m.checkpoint_path(5)
        m.close()
        infos = CheckpointManager(d).list_checkpoints(verify=True)
        print([(i.batch_idx, i.status) for i in infos])
        """,
        tmp_path / "ck",
    )
    assert out.splitlines() == [
        "inherited future: True",
        "child: 0",
        "[(5, 'valid'), (6, 'valid'), (7, 'valid')]",
    ]


def test_the_childs_directory_lock_excludes_the_parent(tmp_path: Path):
    out = run_script(
        """
        m = CheckpointManager(d)
        held, release = threading.Event(), threading.Event()

        def hold():
            with m._lock.held():
                held.set()
                release.wait()

        holder = threading.Thread(target=hold)
        holder.start()
        held.wait()
        to_parent_r, to_parent_w = os.pipe()
        to_child_r, to_child_w = os.pipe()

        def child():
            with m._lock.held():
                os.write(to_parent_w, b"in")
                os.read(to_child_r, 1)
            m.save_checkpoint(3, np.arange(3.0), {}, 1.0)
            m.close()

        result = {}
        runner = threading.Thread(target=lambda: result.update(rc=in_child(child)))
        runner.start()
        # The parent holds the lock: the child must not get in.
        print("child got in while the parent held it:",
              bool(select.select([to_parent_r], [], [], 1.0)[0]))
        release.set()
        holder.join()
        print("child got in after:", bool(select.select([to_parent_r], [], [], 60)[0]))
        probe = os.open(d / ".h5ckpt.lock", os.O_RDONLY)
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            print("parent could lock while the child held it")
        except BlockingIOError:
            print("parent excluded")
        os.write(to_child_w, b"x")
        runner.join()
        print("child:", result["rc"])
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(probe)
        print([i.batch_idx for i in m.list_checkpoints(verify=True)])
        """,
        tmp_path / "ck",
    )
    assert out.splitlines() == [
        "child got in while the parent held it: False",
        "child got in after: True",
        "parent excluded",
        "child: 0",
        "[3]",
    ]


def test_children_forked_while_a_parent_thread_lists(tmp_path: Path):
    d = tmp_path / "ck"
    d.mkdir()
    # Many names make every listing spend a while inside the native catalog's lock.
    for i in range(4000):
        (d / f"checkpoint_batch_{i + 1000:05d}.h5").write_bytes(b"")
    out = run_script(
        """
        m = CheckpointManager(d, keep_last_n=None)
        stop = threading.Event()

        def lister():
            while not stop.is_set():
                m.list_checkpoints()

        t = threading.Thread(target=lister)
        t.start()

        def child(k):
            infos = m.list_checkpoints()
            assert len(infos) >= 4000
            m.save_checkpoint(k, np.arange(3.0), {"k": k}, 1.0)
            assert m.find_latest_checkpoint() == m.checkpoint_path(k)
            m.close()

        codes = [in_child(lambda: child(k), timeout=20) for k in range(10)]
        stop.set()
        t.join()
        print(codes)
        """,
        d,
    )
    assert out.splitlines() == ["[0, 0, 0, 0, 0, 0, 0, 0, 0, 0]"]
