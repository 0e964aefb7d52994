"""Ctrl-C during a save: the temp file goes, its descriptor is closed, the
``KeyboardInterrupt`` propagates unchanged, and the directory is either as before
or holds the complete new checkpoint.

Every interrupt is a real SIGINT handled by Python's default handler: sent to a
child process that saves in a loop at random moments, and, in this process, sent
by the process to itself at known points of the save (the points are reached
through thin wrappers around the real functions).
"""

from __future__ import annotations

import fcntl
import json
import os
import queue
import random
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest

import h5ckpt
import h5ckpt.payload as payload_module
from h5ckpt import CheckpointManager
from h5ckpt.payload import WritebackFile
from h5ckpt.reclaim import Reclaimer
from h5ckpt.staging import LOCK_NAME, DirectoryLock, StagedFile


def temp_files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))


def fds_into(d: Path) -> list[str]:
    """This process's descriptors on anything in ``d`` (deleted files included)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(d) + "/"):
            found.append(target)
    return found


def lock_is_free(d: Path) -> bool:
    fd = os.open(d / LOCK_NAME, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def interrupt_me() -> None:
    os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture
def default_sigint():
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _before(real):
    def wrapper(*args, **kwargs):
        interrupt_me()
        return real(*args, **kwargs)

    return wrapper


def _after(real):
    def wrapper(*args, **kwargs):
        result = real(*args, **kwargs)
        interrupt_me()
        return result

    return wrapper


#: point -> (object, attribute, wrap, whether the new file is committed)
POINTS = {
    "hdf5 driver write": (WritebackFile, "write", _before, False),
    "after the payload": (payload_module, "write_payload", _after, False),
    "after finalize": (h5ckpt._native, "finalize", _after, False),
    "before the rename": (StagedFile, "commit", _before, False),
    "after the rename": (StagedFile, "commit", _after, True),
    "during retention": (Reclaimer, "unlink", _before, True),
}


@pytest.mark.parametrize("point", list(POINTS))
def test_sigint_at_a_known_point(ckpt_dir: Path, monkeypatch, default_sigint, point):
    owner, attr, wrap, committed = POINTS[point]
    m = CheckpointManager(ckpt_dir, keep_last_n=1)
    rng = np.random.default_rng(0)
    state = {"smooth": np.cumsum(rng.standard_normal(200_000))}  # HDF5 writes its chunks
    old = m.save_checkpoint(1, rng.standard_normal(1000), state, 1.0)
    monkeypatch.setattr(owner, attr, wrap(getattr(owner, attr)))
    with pytest.raises(KeyboardInterrupt) as caught:
        m.save_checkpoint(2, rng.standard_normal(1000), state, 2.0)
    monkeypatch.undo()
    assert type(caught.value) is KeyboardInterrupt
    assert temp_files(ckpt_dir) == []
    assert fds_into(ckpt_dir) == []
    assert lock_is_free(ckpt_dir)
    names = sorted(p.name for p in ckpt_dir.glob("*.h5"))
    fresh = CheckpointManager(ckpt_dir, keep_last_n=None)
    if committed:
        assert m.checkpoint_path(2).name in names
        assert fresh.load_latest()["batch_idx"] == 2
    else:
        assert names == [old.name]
        assert fresh.load_latest()["batch_idx"] == 1
    # The manager (and HDF5) are fine afterwards.
    assert m.save_checkpoint(3, np.ones(3), state, 3.0).exists()
    assert fresh.load_latest()["batch_idx"] == 3


#: point of a small save (built in memory, written whole) -> (object, attribute, wrap)
SMALL_POINTS = {
    # The interrupt lands in the in-memory build; it is raised once HDF5 is done.
    "in the in-memory build": (payload_module, "write_value", _before),
    "after the in-memory build": (payload_module, "build_image", _after),
    "after seal_image": (h5ckpt._native, "seal_image", _after),
}


@pytest.mark.parametrize("point", list(SMALL_POINTS))
def test_sigint_at_a_known_point_of_a_small_save(
    ckpt_dir: Path, monkeypatch, default_sigint, point
):
    owner, attr, wrap = SMALL_POINTS[point]
    m = CheckpointManager(ckpt_dir, keep_last_n=1)
    state = {"jtj": np.eye(7), "step": 1, "history": np.zeros(256)}
    old = m.save_checkpoint(1, np.ones(7), state, 1.0)
    monkeypatch.setattr(owner, attr, wrap(getattr(owner, attr)))
    with pytest.raises(KeyboardInterrupt) as caught:
        m.save_checkpoint(2, np.ones(7), state, 2.0)
    monkeypatch.undo()
    assert type(caught.value) is KeyboardInterrupt
    assert temp_files(ckpt_dir) == []
    assert fds_into(ckpt_dir) == []
    assert lock_is_free(ckpt_dir)
    assert sorted(p.name for p in ckpt_dir.glob("*.h5")) == [old.name]
    # No in-memory HDF5 file was left open by the interrupted build.
    assert not [
        i
        for i in h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE)
        if h5py.h5f.get_name(i).startswith(b"h5ckpt-")
    ]
    fresh = CheckpointManager(ckpt_dir, keep_last_n=None)
    assert fresh.load_latest()["batch_idx"] == 1
    assert m.save_checkpoint(3, np.ones(7), state, 3.0).exists()
    assert fresh.load_latest()["batch_idx"] == 3


def test_sigint_while_waiting_for_the_directory_lock(ckpt_dir: Path, default_sigint):
    m = CheckpointManager(ckpt_dir, keep_last_n=1)
    m.save_checkpoint(1, np.ones(3), {}, 1.0)
    other = DirectoryLock(ckpt_dir)  # another process in the middle of its commit

    def interrupt_once_waiting() -> None:
        # The save has opened the lock file for itself: it is (about to be) in flock.
        while sum(t.endswith(LOCK_NAME) for t in fds_into(ckpt_dir)) < 2:
            pass
        os.kill(os.getpid(), signal.SIGINT)

    with other.held():
        sender = threading.Thread(target=interrupt_once_waiting)
        sender.start()
        with pytest.raises(KeyboardInterrupt):
            m.save_checkpoint(2, np.ones(3), {}, 2.0)
        sender.join()
        assert temp_files(ckpt_dir) == []
        assert fds_into(ckpt_dir) == [str(ckpt_dir / LOCK_NAME)]  # the holder's only
    assert lock_is_free(ckpt_dir)
    assert sorted(p.name for p in ckpt_dir.glob("*.h5")) == [m.checkpoint_path(1).name]
    assert m.save_checkpoint(2, np.ones(3), {}, 2.0).exists()


LOOPER = """
    import json, os, sys
    import numpy as np
    from h5ckpt import CheckpointError, CheckpointManager

    d, rounds = sys.argv[1], int(sys.argv[2])
    m = CheckpointManager(d, keep_last_n=2)
    rng = np.random.default_rng(0)
    params = rng.standard_normal(300_000)  # raw: written by the Rust core
    state = {"smooth": np.cumsum(rng.standard_normal(300_000))}  # chunks written by HDF5

    def fds():
        out = {}
        for fd in os.listdir("/proc/self/fd"):
            try:
                out[fd] = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                pass
        return out

    b = 0
    m.save_checkpoint(b, params, state, 0.0)
    base = fds()
    for r in range(rounds):
        print("ready", flush=True)
        errors = []
        try:
            while True:
                b += 1
                try:
                    m.save_checkpoint(b, params, state, float(b))
                except CheckpointError as exc:
                    errors.append(repr(exc))
        except KeyboardInterrupt as exc:
            tb, where = exc.__traceback__, []
            while tb is not None:
                where.append(tb.tb_frame.f_code.co_name)
                tb = tb.tb_next
        now = fds()
        print(json.dumps({
            "temps": [n for n in os.listdir(d) if n.endswith(".tmp")],
            "new_fds": {k: v for k, v in now.items() if base.get(k) != v},
            "errors": errors,
            "in_save": "_write" in where,
            "where": where[-1],
        }), flush=True)
    # Still a working manager and a working HDF5 after every interrupt.
    b += 1
    m.save_checkpoint(b, params, state, float(b))
    assert CheckpointManager(d).load_latest()["batch_idx"] == b
    print("done", b, flush=True)
"""


def test_sigint_at_random_moments_of_a_save_loop(ckpt_dir: Path):
    rounds = 24
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(LOOPER), str(ckpt_dir), str(rounds)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(
        target=lambda: [lines.put(line) for line in child.stdout], daemon=True
    )
    reader.start()
    rng = random.Random(12)
    reports = []
    try:
        for _ in range(rounds):
            assert lines.get(timeout=120).strip() == "ready"
            threading.Event().wait(rng.uniform(0.005, 0.25))
            child.send_signal(signal.SIGINT)
            for _attempt in range(10):
                try:
                    line = lines.get(timeout=10)
                    break
                except queue.Empty:
                    # Python drops an exception raised while a weakref callback runs
                    # ("Exception ignored"): that interrupt never reached the save.
                    child.send_signal(signal.SIGINT)
            reports.append(json.loads(line))
        reader.join(120)  # until the child closes its stdout
        err = child.stderr.read()
        child.wait(120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
        child.stderr.close()
    assert child.returncode == 0, err  # no crash of libhdf5 at exit either
    rest = []
    while not lines.empty():
        rest.append(lines.get_nowait())
    assert rest and rest[-1].startswith("done"), (rest, err)
    for rep in reports:
        assert rep["temps"] == [], rep
        assert rep["new_fds"] == {}, rep
        assert rep["errors"] == [], rep  # the interrupt was never turned into another error
    # Most interrupts did land inside a save (the loop does little else).
    assert sum(rep["in_save"] for rep in reports) >= rounds // 2, reports
    assert temp_files(ckpt_dir) == []
    m = CheckpointManager(ckpt_dir, keep_last_n=None)
    assert all(i.is_valid for i in m.list_checkpoints(verify=True))
