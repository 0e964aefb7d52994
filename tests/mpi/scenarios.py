"""Multi-rank scenarios, run under ``mpiexec`` by tests/test_mpi*.py.

``python scenarios.py NAME DIR [ARGS...]``: every rank runs scenario NAME against the
checkpoint directory DIR and exits 0 only if every check held. Checks use ``assert``
with messages; a failing rank exits non-zero and mpiexec ends the job.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

from h5ckpt import CheckpointError, CheckpointManagerOptions, CheckpointValueError
from h5ckpt.mpi import (
    CheckpointTimeoutError,
    Sharded,
    ShardedCheckpointManager,
    list_steps,
    load_global,
)
from h5ckpt.tree import values_equal

COMM = MPI.COMM_WORLD
RANK = COMM.Get_rank()
WORLD = COMM.Get_size()


def state_of(batch: int, rank: int, n: int = 10) -> dict:
    """A deterministic state of ``rank`` at ``batch``: sharded, replicated, rank-local."""
    rng = np.random.default_rng(batch * 1000 + rank)
    return {
        "params": rng.standard_normal(n + rank),  # this rank's block (uneven split)
        "moment": rng.standard_normal((n + rank, 3)).astype(np.float32),
        "lr": 0.125 * batch,  # replicated
        "schedule": {"warmup": [1, 2, 3], "name": "cosine"},  # replicated
        "cursor": batch * 100 + rank,  # rank-local
        "rng": rng.bytes(16),  # rank-local
    }


def save_state(m: ShardedCheckpointManager, batch: int, rank: int = RANK) -> Path:
    s = state_of(batch, rank)
    return m.save_checkpoint(
        batch,
        Sharded(s["params"]),
        {
            "moment": Sharded(s["moment"], axis=0),
            "lr": s["lr"],
            "schedule": s["schedule"],
            "cursor": s["cursor"],
            "rng": s["rng"],
        },
        loss=1.0 / (batch + 1),
        metadata={"job": "scenario", "rank_note": f"rank {rank}"},
    )


def check_own(state: dict, batch: int, rank: int = RANK) -> None:
    s = state_of(batch, rank)
    assert state is not None, "nothing restored"
    assert state["batch_idx"] == batch, (state["batch_idx"], batch)
    assert state["parameters"].dtype == s["params"].dtype
    assert np.array_equal(state["parameters"], s["params"]), "parameters differ"
    o = state["optimizer_state"]
    assert list(o) == ["moment", "lr", "schedule", "cursor", "rng"], list(o)
    assert values_equal(o["moment"], s["moment"])
    assert values_equal(o["lr"], s["lr"]) and type(o["lr"]) is float
    assert values_equal(o["schedule"], s["schedule"])
    assert values_equal(o["cursor"], s["cursor"]) and type(o["cursor"]) is int
    assert values_equal(o["rng"], s["rng"])
    assert state["metadata"] == {"job": "scenario", "rank_note": f"rank {rank}"}
    assert state["loss"] == 1.0 / (batch + 1)


def manager(d: str, **kw) -> ShardedCheckpointManager:
    kw.setdefault("keep_last_n", None)
    return ShardedCheckpointManager(d, COMM, **kw)


def same_everywhere(value) -> None:
    got = COMM.allgather(value)
    assert all(g == got[0] for g in got), got


# -- scenarios -------------------------------------------------------------------------


def roundtrip(d: str) -> None:
    m = manager(d)
    assert m.load_latest() is None
    assert m.find_latest_checkpoint() is None
    p = save_state(m, 10)
    same_everywhere(str(p))
    assert p.name == "checkpoint_batch_0010"
    names = sorted(os.listdir(p))
    assert names == ["manifest.h5"] + [f"shard_{r:05d}_of_{WORLD:05d}.h5" for r in range(WORLD)]
    save_state(m, 20)
    same_everywhere(str(m.find_latest_checkpoint()))
    check_own(m.load_latest(), 20)
    # Each shard is an ordinary, verifiable h5ckpt file.
    from h5ckpt import CheckpointManager

    plain = CheckpointManager(d)
    for name in names:
        assert plain.validate_checkpoint(p / name), name
    if RANK == 0:
        # Replicated values are stored once: the other shards hold a placeholder.
        other = plain.load_checkpoint(p / f"shard_{WORLD - 1:05d}_of_{WORLD:05d}.h5")
        if WORLD > 1:
            assert other["optimizer_state"]["lr"] is None
        infos = list_steps(d, verify=True)
        assert [i.status for i in infos] == ["complete", "complete"], infos
        g = load_global(p)
        full = np.concatenate([state_of(10, r)["params"] for r in range(WORLD)])
        assert np.array_equal(g["parameters"], full)
        assert g["optimizer_state"]["lr"] == 0.125 * 10
        assert g["optimizer_state"]["cursor"] == [10 * 100 + r for r in range(WORLD)]
        assert g["world_size"] == WORLD
    same_everywhere(True)


def expect_error(kind, fn, *args, everywhere=True, **kw) -> CheckpointError:
    """``fn`` raises ``kind`` on this rank; the message is the same on every rank."""
    try:
        fn(*args, **kw)
    except kind as exc:
        if everywhere:
            same_everywhere(str(exc))
        return exc
    raise AssertionError(f"rank {RANK}: {fn.__name__} did not raise {kind.__name__}")


def no_leftovers(d: str, steps: list[str]) -> None:
    """Only the given steps (and the lock file) exist: no staging directory, no temp file."""
    COMM.Barrier()
    if RANK == 0:
        names = sorted(n for n in os.listdir(d) if n != ".h5ckpt.lock")
        assert names == sorted(steps), names


def bad_input(d: str) -> None:
    m = manager(d)
    save_state(m, 1)
    bad = {"x": object()} if RANK == WORLD - 1 else {"x": 1}
    err = expect_error(CheckpointError, m.save_checkpoint, 2, np.zeros(3), bad, 0.5)
    assert f"rank {WORLD - 1}" in str(err), str(err)
    expect_error(CheckpointError, m.save_checkpoint, 2 + (RANK == 1), np.zeros(3), {}, 0.5)
    expect_error(CheckpointError, m.save_checkpoint, 2, np.zeros(3), {}, 0.5 + RANK)
    # Sharded on one rank only, and blocks that do not fit together.
    v = Sharded(np.zeros(3)) if RANK == 0 else np.zeros(3)
    expect_error(CheckpointError, m.save_checkpoint, 2, np.zeros(3), {"v": v}, 0.5)
    v = Sharded(np.zeros((3, 1 + RANK)))
    expect_error(CheckpointError, m.save_checkpoint, 2, np.zeros(3), {"v": v}, 0.5)
    no_leftovers(d, ["checkpoint_batch_0001"])
    check_own(m.load_latest(), 1)
    save_state(m, 2)
    check_own(m.load_latest(), 2)


def full_disk(d: str) -> None:
    m = manager(d)
    save_state(m, 1)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if RANK == 1:
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, hard))
    big = np.random.default_rng(RANK).standard_normal(200_000)  # 1.6 MB per rank
    expect_error(CheckpointError, m.save_checkpoint, 2, Sharded(big), {"a": 1}, 0.5)
    if RANK == 1:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    no_leftovers(d, ["checkpoint_batch_0001"])
    check_own(m.load_latest(), 1)
    m.save_checkpoint(2, Sharded(big), {"a": 1}, 0.5)
    got = m.load_latest()
    assert got["batch_idx"] == 2 and np.array_equal(got["parameters"], big)


def flip(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


def corrupt_steps(d: str) -> None:
    m = manager(d)
    for b in (10, 20, 30, 40, 50):
        save_state(m, b)
    COMM.Barrier()
    last = WORLD - 1
    if RANK == 0:
        root = Path(d)
        (root / f"checkpoint_batch_0050/shard_{last:05d}_of_{WORLD:05d}.h5").unlink()
        flip(root / f"checkpoint_batch_0040/shard_{last:05d}_of_{WORLD:05d}.h5")
        flip(root / "checkpoint_batch_0030/manifest.h5")
        (root / "checkpoint_batch_0020/manifest.h5").unlink()
    COMM.Barrier()
    same_everywhere(str(m.find_latest_checkpoint()))
    check_own(m.load_latest(), 10)
    if RANK == 0:
        got = [(i.batch_idx, i.status) for i in list_steps(d, verify=True)]
        assert got == [
            (10, "complete"),
            (20, "incomplete"),
            (30, "invalid"),
            (40, "invalid"),
            (50, "incomplete"),
        ], got
        assert [m.validate_checkpoint(Path(d) / f"checkpoint_batch_{b:04d}") for b in (10, 40)] == [
            True,
            False,
        ]


def wrong_key(d: str) -> None:
    m = manager(d, hmac_key=b"right key")
    save_state(m, 3)
    other = manager(d, hmac_key=b"wrong key")
    assert other.find_latest_checkpoint() is None
    assert other.load_latest() is None
    assert not other.validate_checkpoint(Path(d) / "checkpoint_batch_0003")
    check_own(m.load_latest(), 3)


def deadline(d: str) -> None:
    m = manager(d, timeout=2.0)
    save_state(m, 1)
    if RANK == 1:
        time.sleep(5)  # arrives after the others gave up
    expect_error(CheckpointTimeoutError, save_state, m, 2)
    no_leftovers(d, ["checkpoint_batch_0001"])
    # The ranks are in step again: the next save and restore work.
    save_state(m, 3)
    check_own(m.load_latest(), 3)
    # A rank that never comes: the others raise instead of hanging.
    if RANK == 1:
        return
    expect_error(CheckpointTimeoutError, m.load_latest, everywhere=False)


def save_for_resplit(d: str) -> None:
    m = manager(d)
    save_state(m, 5)
    # A later step without rank-local values (only Sharded and replicated ones).
    s = state_of(6, RANK)
    m.save_checkpoint(
        6, Sharded(s["params"]), {"moment": Sharded(s["moment"]), "lr": s["lr"]}, 0.25
    )


def resplit(d: str, old_world: str) -> None:
    old = int(old_world)
    m = manager(d)
    # Step 6 has no rank-local values: it loads with any world size.
    got = m.load_latest()
    assert got["batch_idx"] == 6
    full = np.concatenate([state_of(6, r)["params"] for r in range(old)])
    want = np.array_split(full, WORLD)[RANK]
    assert got["parameters"].dtype == want.dtype and np.array_equal(got["parameters"], want)
    moment = np.concatenate([state_of(6, r)["moment"] for r in range(old)])
    assert values_equal(got["optimizer_state"]["moment"], np.array_split(moment, WORLD)[RANK])
    assert got["optimizer_state"]["lr"] == 0.125 * 6
    # Step 5 holds rank-local values: a clear error on every rank, no fall back to older.
    m.cleanup_old_checkpoints()
    if RANK == 0:
        from h5ckpt.mpi.layout import retire_step

        retire_step(Path(d) / "checkpoint_batch_0006", durable=True)
    COMM.Barrier()
    err = expect_error(CheckpointError, m.load_latest)
    for key in ("optimizer_state/cursor", "optimizer_state/rng", "metadata/rank_note"):
        assert key in str(err), str(err)
    assert "optimizer_state/lr" not in str(err)
    calls = []

    def hook(key, values, new_rank, new_world):
        calls.append(key)
        assert len(values) == old and new_world == WORLD and new_rank == RANK
        if key == "optimizer_state/cursor":
            assert values == [5 * 100 + r for r in range(old)], values
            return max(values)
        if key == "optimizer_state/rng":
            return values[new_rank % old]
        return f"rank {new_rank}"

    got = m.load_latest(rank_local=hook)
    assert calls == ["optimizer_state/cursor", "optimizer_state/rng", "metadata/rank_note"]
    assert got["batch_idx"] == 5
    o = got["optimizer_state"]
    assert list(o) == ["moment", "lr", "schedule", "cursor", "rng"], list(o)
    full = np.concatenate([state_of(5, r)["params"] for r in range(old)])
    assert np.array_equal(got["parameters"], np.array_split(full, WORLD)[RANK])
    assert o["cursor"] == 5 * 100 + old - 1
    assert o["rng"] == state_of(5, RANK % old)["rng"]
    assert o["schedule"] == {"warmup": [1, 2, 3], "name": "cosine"}
    assert got["metadata"] == {"job": "scenario", "rank_note": f"rank {RANK}"}

    # A hook that fails on one rank fails the restore on every rank.
    def failing(key, values, new_rank, new_world):
        if new_rank == WORLD - 1:
            raise ValueError("cannot map")
        return None

    expect_error(CheckpointError, m.load_latest, rank_local=failing)


def steps_in(d: str) -> list[str]:
    import re

    return sorted(n for n in os.listdir(d) if re.fullmatch(r"checkpoint_batch_\d+", n))


def retention(d: str) -> None:
    import fcntl
    import shutil

    root = Path(d)
    m = manager(d, keep_last_n=2)
    for b in (10, 20, 30):
        save_state(m, b)
    same_everywhere(steps_in(d))
    assert steps_in(d) == ["checkpoint_batch_0020", "checkpoint_batch_0030"]
    unknown = ["notes", "checkpoint_batch_50x", ".checkpoint_batch_0050.foo", "other_batch_0001"]
    COMM.Barrier()
    if RANK == 0:
        flip(root / f"checkpoint_batch_0030/shard_{WORLD - 1:05d}_of_{WORLD:05d}.h5")
        # An incomplete newer step, as a copy without its manifest would leave.
        shutil.copytree(root / "checkpoint_batch_0020", root / "checkpoint_batch_0040")
        (root / "checkpoint_batch_0040" / "manifest.h5").unlink()
        for name in unknown:
            (root / name).mkdir()
    COMM.Barrier()
    save_state(m, 50)
    # Complete steps: 20 and 50; 30 (invalid) and 40 (incomplete) are kept, not counted.
    assert steps_in(d) == [f"checkpoint_batch_00{b}0" for b in (2, 3, 4, 5)], steps_in(d)
    save_state(m, 60)
    assert steps_in(d) == [f"checkpoint_batch_00{b}0" for b in (3, 4, 5, 6)], steps_in(d)
    check_own(m.load_latest(), 60)
    # The newest complete step survives even when every newer one is bad.
    COMM.Barrier()
    if RANK == 0:
        shutil.copytree(root / "checkpoint_batch_0060", root / "checkpoint_batch_0070")
        flip(root / "checkpoint_batch_0070" / "manifest.h5")
    COMM.Barrier()
    strict = manager(d, keep_last_n=1, delete_invalid=True)
    deleted = strict.cleanup_old_checkpoints()
    same_everywhere([p.name for p in deleted])
    assert sorted(p.name for p in deleted) == [f"checkpoint_batch_00{b}0" for b in (3, 4, 5, 7)], (
        deleted
    )
    assert steps_in(d) == ["checkpoint_batch_0060"]
    check_own(strict.load_latest(), 60)
    # Stale staging directories of dead jobs are swept, live ones and unknown names kept.
    COMM.Barrier()
    live = root / ".checkpoint_batch_0080.1.0123456789ab.staging"
    dead = root / ".checkpoint_batch_0090.99999999.0123456789ab.staging"
    gone = root / ".checkpoint_batch_0010.1.0123456789ab.deleting"
    fd = -1
    if RANK == 0:
        for p in (live, dead, gone):
            p.mkdir()
            (p / "shard_00000_of_00001.h5").write_bytes(b"partial")
        fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a live job's committing rank holds it
    COMM.Barrier()
    manager(d, keep_last_n=1)
    if RANK == 0:
        assert live.exists() and not dead.exists() and not gone.exists()
        for name in unknown:
            assert (root / name).is_dir(), name
        os.close(fd)
    # Milestones and the best losses are kept too.
    COMM.Barrier()
    other = Path(d) / "policy"
    p = manager(str(other), keep_last_n=1, keep_every=20, keep_best_n=1)
    losses = {10: 0.5, 20: 0.9, 30: 0.1, 40: 0.8, 50: 0.7}
    for b, loss in losses.items():
        p.save_checkpoint(b, Sharded(np.arange(3.0)), {"b": b}, loss)
    assert steps_in(str(other)) == [f"checkpoint_batch_00{b}0" for b in (2, 3, 4, 5)]


def async_saves(d: str) -> None:
    m = manager(d, keep_last_n=2)
    params = np.arange(1000.0) + RANK
    state = {"w": Sharded(params.copy()), "n": 1}
    f = m.save_checkpoint_async(1, Sharded(params), state, 0.5)
    params[:] = -1.0  # changes after the call do not reach the snapshot
    state["n"] = 99
    m.wait_until_finished()
    same_everywhere(str(f.result()))
    got = m.load_latest()
    assert got["batch_idx"] == 1 and np.array_equal(got["parameters"], np.arange(1000.0) + RANK)
    assert got["optimizer_state"]["n"] == 1
    # Several in a row, then collective calls that wait for the one in flight.
    for b in (2, 3, 4):
        m.save_checkpoint_async(b, Sharded(np.full(10, float(b))), {"b": b}, 1.0 / b)
    same_everywhere(str(m.find_latest_checkpoint()))
    assert m.find_latest_checkpoint().name == "checkpoint_batch_0004"
    m.wait_until_finished()
    # A rank with bad input fails the background save on every rank.
    bad = {"x": object()} if RANK == 0 else {"x": 1}
    m.save_checkpoint_async(5, np.zeros(2), bad, 0.1)
    expect_error(CheckpointError, m.wait_until_finished)
    with m:
        m.save_checkpoint_async(6, Sharded(np.full(10, 6.0)), {"b": 6}, 0.1)
    assert m.load_latest()["batch_idx"] == 6
    assert steps_in(d) == ["checkpoint_batch_0004", "checkpoint_batch_0006"]


def async_saves_in_one_thread(d: str) -> None:
    """Without THREAD_MULTIPLE, asynchronous saves run in the caller's thread (MPI may
    be called from that thread only) and their futures are resolved on return."""
    import threading

    assert MPI.Query_thread() != MPI.THREAD_MULTIPLE, MPI.Query_thread()
    m = manager(d)
    f = m.save_checkpoint_async(1, Sharded(np.arange(5.0) + RANK), {"n": 1}, 0.5)
    assert f.done() and f.result() == Path(d) / "checkpoint_batch_0001", f
    bad = {"x": object()} if RANK == 0 else {"x": 1}
    failed = m.save_checkpoint_async(2, np.zeros(2), bad, 0.1)
    assert failed.done() and isinstance(failed.exception(), CheckpointError)
    err = expect_error(CheckpointError, m.wait_until_finished)
    assert "rank 0" in str(err), err
    saving = [t.name for t in threading.enumerate() if t.name.startswith("h5ckpt")]
    assert saving == [], saving
    m.close()
    async_saves(str(Path(d) / "more"))


def restart(d: str) -> None:
    """A new run in a used directory: its saves are refused, or the old steps are set
    aside; never does retention delete the new steps or a resume pick the old run."""
    from h5ckpt import CheckpointConflictError

    old = manager(d, keep_last_n=3)
    for b in (70, 80, 90):
        save_state(old, b)
    fresh = manager(d, keep_last_n=3)
    err = expect_error(CheckpointConflictError, save_state, fresh, 0)
    assert "checkpoint_batch_0090" in str(err), err
    assert steps_in(d) == [f"checkpoint_batch_{b:04d}" for b in (70, 80, 90)]
    new = manager(d, keep_last_n=3, on_older_batch="set_aside")
    for b in (0, 10, 20, 30):
        path = save_state(new, b)
        assert path.is_dir(), path  # never deleted by its own retention
    assert steps_in(d) == [f"checkpoint_batch_{b:04d}" for b in (10, 20, 30)]
    assert new.find_latest_checkpoint() == Path(d) / "checkpoint_batch_0030"
    if RANK == 0:
        (aside,) = [n for n in os.listdir(d) if n.startswith("abandoned-")]
        assert steps_in(str(Path(d) / aside)) == [f"checkpoint_batch_{b:04d}" for b in (70, 80, 90)]
    COMM.Barrier()


def set_aside(d: str) -> None:
    """A deliberate rollback: the newer steps move, unchanged, into one subdirectory."""
    m = manager(d)
    for b in (10, 20, 30):
        save_state(m, b)
    m.save_checkpoint_async(40, Sharded(np.arange(4.0)), {"b": 40}, 0.1)
    aside = m.set_aside_newer_than(15)  # the queued save commits first
    same_everywhere(str(aside))
    assert aside is not None and aside.parent == Path(d) and aside.name.startswith("abandoned-")
    assert steps_in(d) == ["checkpoint_batch_0010"], steps_in(d)
    assert steps_in(str(aside)) == [f"checkpoint_batch_{b:04d}" for b in (20, 30, 40)]
    if RANK == 0:
        moved = list_steps(aside, verify=True)
        assert [(i.batch_idx, i.status) for i in moved] == [
            (20, "complete"),
            (30, "complete"),
            (40, "complete"),
        ], moved
    check_own(m.load_latest(), 10)
    # The run goes on from 10: its next saves are not refused, nothing else moves.
    save_state(m, 20)
    assert m.set_aside_newer_than(20) is None
    assert steps_in(d) == ["checkpoint_batch_0010", "checkpoint_batch_0020"]
    # Arguments that are bad, or differ between ranks, fail on every rank; nothing moves.
    err = expect_error(CheckpointError, m.set_aside_newer_than, 5 if RANK == 0 else 15)
    assert "differs between ranks" in str(err), err
    bad = "15" if RANK == WORLD - 1 else 15
    err = expect_error(CheckpointError, m.set_aside_newer_than, bad)
    assert f"rank {WORLD - 1}" in str(err), err
    assert steps_in(d) == ["checkpoint_batch_0010", "checkpoint_batch_0020"]
    # -1: a fresh start in a used directory.
    everything = m.set_aside_newer_than(-1)
    same_everywhere(str(everything))
    assert steps_in(d) == [] and everything != aside
    assert m.load_latest() is None
    assert steps_in(str(everything)) == ["checkpoint_batch_0010", "checkpoint_batch_0020"]


def file_modes(d: str) -> None:
    """Shards and manifest get file_mode, or without it what the umask leaves."""
    os.umask(0o027)

    def modes(step: Path) -> set[int]:
        return {(step / n).stat().st_mode & 0o777 for n in os.listdir(step)}

    default = save_state(manager(d), 1)
    assert modes(default) == {0o640}, modes(default)
    m = manager(d, file_mode=0o604)
    assert m.file_mode == 0o604
    step = save_state(m, 2)
    assert "manifest.h5" in os.listdir(step) and modes(step) == {0o604}, modes(step)
    # Per save, as for single files: a changed attribute applies to the next save.
    m.file_mode = 0o600
    assert modes(save_state(m, 3)) == {0o600}
    check_own(m.load_latest(), 3)
    # A bad mode on one rank fails the construction on every rank.
    mode = 0o1777 if RANK == WORLD - 1 else 0o644
    err = expect_error(CheckpointError, manager, d, file_mode=mode)
    assert "file_mode" in str(err), err


def read_only(d: str) -> None:
    """A reader loads and lists, refuses to change anything, and creates nothing."""
    root = Path(d)
    missing = root / "missing"
    expect_error(CheckpointError, manager, str(missing), read_only=True)
    assert not missing.exists()
    writer = manager(d)
    for b in (10, 20):
        save_state(writer, b)
    COMM.Barrier()
    dead = root / ".checkpoint_batch_0090.99999999.0123456789ab.staging"
    if RANK == 0:
        dead.mkdir()  # a dead job's staging directory: a writer sweeps it, a reader not
    COMM.Barrier()
    reader = manager(d, read_only=True, keep_last_n=1)
    assert reader.read_only and not writer.read_only
    assert dead.is_dir()
    check_own(reader.load_latest(), 20)
    assert reader.find_latest_checkpoint() == root / "checkpoint_batch_0020"
    assert [i.batch_idx for i in reader.list_checkpoints(verify=True)] == [10, 20]
    before = sorted(os.listdir(d))
    for call in (
        lambda: save_state(reader, 30),
        lambda: reader.save_checkpoint_async(30, np.zeros(2), {}, 0.5),
        reader.cleanup_old_checkpoints,
        lambda: reader.set_aside_newer_than(-1),
    ):
        err = expect_error(CheckpointError, call)
        assert "read_only=True" in str(err), err
    COMM.Barrier()
    assert sorted(os.listdir(d)) == before, (before, os.listdir(d))
    reader.wait_until_finished()  # the refused async save left nothing pending
    # Ranks that disagree are refused when the manager is made, not at the first save.
    err = expect_error(CheckpointError, manager, d, read_only=RANK == 0)
    assert "read_only differs" in str(err), err
    # The writer is unaffected, and sweeps.
    save_state(writer, 30)
    manager(d)
    assert not dead.exists()


def options(d: str) -> None:
    """Settings given as one CheckpointManagerOptions act as the same keywords."""
    opts = CheckpointManagerOptions(keep_last_n=2, prefix="run", checkpoint_frequency=5)
    m = ShardedCheckpointManager(d, COMM, options=opts)
    assert m.options is opts and m.keep_last_n == 2 and m.prefix == "run"
    assert m.should_save(10) and not m.should_save(11)
    for b in (10, 20, 30):
        save_state(m, b)
    # Retention by the options' keep_last_n, over complete steps, on the sharded side.
    steps = sorted(p.name for p in Path(d).iterdir() if p.name.startswith("run_batch_"))
    assert steps == ["run_batch_0020", "run_batch_0030"], steps
    check_own(m.load_latest(), 30)
    # Options and a keyword that differs from its default: refused on every rank.
    err = expect_error(
        CheckpointValueError, ShardedCheckpointManager, d, COMM, options=opts, keep_last_n=5
    )
    assert "not both" in str(err), err
    reader = ShardedCheckpointManager(
        d, COMM, options=CheckpointManagerOptions(prefix="run", read_only=True)
    )
    assert reader.read_only
    check_own(reader.load_latest(), 30)


def restore_while_steps_vanish(d: str) -> None:
    """The steps listed are deleted (another job's retention) before they are
    checked, while a newer one is there: restoring lists again and finds it."""
    import shutil

    root, hold = Path(d), Path(d) / "held"
    newer = root / "checkpoint_batch_0020"
    writer = manager(d)
    save_state(writer, 20)
    COMM.Barrier()
    if RANK == 0:
        hold.mkdir()
        newer.rename(hold / newer.name)
    COMM.Barrier()
    for call in ("load_latest", "find_latest_checkpoint"):
        save_state(writer, 10)  # the one step the reader will list
        reader = manager(d, read_only=True)
        real, left = reader._list_for_restore, [1]

        def listing_then_retention(reports, real=real, left=left):
            listed = real(reports)  # rank 0's listing ([10]), its manifest read
            if left:
                left.pop()
                shutil.rmtree(root / "checkpoint_batch_0010")
                (hold / newer.name).rename(newer)
            return listed

        reader._list_for_restore = listing_then_retention
        result = getattr(reader, call)()
        if call == "load_latest":
            check_own(result, 20)
        else:
            assert result == newer, result
        COMM.Barrier()
        if RANK == 0:
            newer.rename(hold / newer.name)  # the same start for the next call
        COMM.Barrier()


def main() -> int:
    logging.basicConfig(level=os.environ.get("H5CKPT_LOG", "WARNING"), stream=sys.stderr)
    name, d, *args = sys.argv[1:]
    globals()[name](d, *args)
    COMM.Barrier()
    if RANK == 0:
        print(f"ok {name} on {WORLD} ranks", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
