"""Retention, listing and resume: every rule and invariant, on real files.

Invariants (DESIGN.md, issue 3):
1. the newest valid checkpoint is never deleted;
2. a valid checkpoint is never deleted in favour of an invalid one;
3. nothing is deleted before the new checkpoint is committed;
4. only files named ``{prefix}_batch_<int>.h5`` are touched.
Several processes and threads (5) and temp files of dead writers (6) are in
test_concurrency.py.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import h5ckpt.verification
from conftest import write_seed_checkpoint
from h5ckpt import CheckpointError, CheckpointManager
from h5ckpt.errors import CheckpointCorruptError
from h5ckpt.staging import LOCK_NAME

PREFIX = "checkpoint"
VALID_KINDS = ("valid", "legacy")
KINDS = ("valid", "legacy", "flipped", "truncated", "header", "foreign", "empty", "legacy_bad")


# -- building directories -----------------------------------------------------------


def writer(d: Path, prefix: str = PREFIX, **kw) -> CheckpointManager:
    """A manager that only writes: keeps everything, fast (no fsync)."""
    return CheckpointManager(
        d, keep_last_n=None, auto_cleanup=False, durable=False, prefix=prefix, **kw
    )


def name(b: int, prefix: str = PREFIX) -> str:
    return f"{prefix}_batch_{b:04d}.h5"


def flip(path: Path, offset: int | None = None) -> None:
    """Flip one byte in place (the middle of the payload by default)."""
    raw = bytearray(path.read_bytes())
    at = (512 + len(raw)) // 2 if offset is None else offset
    raw[at] ^= 0xFF
    with open(path, "r+b") as f:
        f.write(raw)


def make_file(d: Path, b: int, kind: str, loss: float, prefix: str = PREFIX) -> Path:
    """One file of ``kind`` under this prefix's name for batch ``b``."""
    path = d / name(b, prefix)
    if kind in ("valid", "flipped", "truncated", "header"):
        # Saved elsewhere and renamed in: a save below a newer batch would be refused.
        scratch = d.parent / f".{d.name}-scratch"
        made = writer(scratch, prefix).save_checkpoint(b, np.full(3, float(b)), {"b": b}, loss)
        os.replace(made, path)
        if kind == "flipped":
            flip(path)
        elif kind == "truncated":
            os.truncate(path, path.stat().st_size // 2)
        elif kind == "header":
            flip(path, 60)  # inside the header (batch index field)
    elif kind == "foreign":
        path.write_bytes(np.random.default_rng(b).bytes(700))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind in ("legacy", "legacy_bad"):
        write_seed_checkpoint(d, b, np.full(3, float(b)), {"b": b}, loss, prefix=prefix)
        if kind == "legacy_bad":
            with h5py.File(path, "r+") as f:
                f.attrs["checksum"] = "0" * 64
    else:  # pragma: no cover
        raise AssertionError(kind)
    return path


def pattern_names(d: Path, prefix: str = PREFIX) -> set[str]:
    return {p.name for p in d.glob(f"{prefix}_batch_*.h5") if p.is_file() and not p.is_symlink()}


def snapshot(d: Path) -> dict[str, str]:
    """Every entry below ``d`` but the lock file: content digest, link target or 'dir'."""
    out = {}
    for p in sorted(d.rglob("*")):
        if p.name == LOCK_NAME:
            continue
        rel = str(p.relative_to(d))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def expected_deleted(files: dict[int, tuple[str, float]], policy: dict) -> set[int]:
    """The batches a policy deletes, straight from the rules of the issue."""
    valid = sorted((b for b, (k, _) in files.items() if k in VALID_KINDS), reverse=True)
    keep: set[int] = set(valid[:1])  # the newest valid, always
    n = policy.get("keep_last_n", 3)
    keep |= set(valid if n is None else valid[:n])
    every = policy.get("keep_every")
    if every:
        keep |= {b for b in valid if b % every == 0}
    best_n = policy.get("keep_best_n", 0)
    if best_n:
        sign = -1.0 if policy.get("best_mode", "min") == "max" else 1.0
        ranked = sorted(
            (b for b in valid if not math.isnan(files[b][1])),
            key=lambda b: (sign * files[b][1], -b),  # best first; ties to the newer
        )
        keep |= set(ranked[:best_n])
    deleted = {b for b in valid if b not in keep}
    if policy.get("delete_invalid", False):
        deleted |= {b for b, (k, _) in files.items() if k not in VALID_KINDS}
    return deleted


# -- policy rules --------------------------------------------------------------------


def test_keep_last_n_counts_only_valid_checkpoints(ckpt_dir: Path):
    w = writer(ckpt_dir)
    for b in range(1, 9):
        w.save_checkpoint(b, np.ones(2), {}, float(b))
    flip(ckpt_dir / name(8))
    flip(ckpt_dir / name(7), 100)
    os.truncate(ckpt_dir / name(6), 700)
    m = CheckpointManager(ckpt_dir, keep_last_n=2)
    deleted = m.cleanup_old_checkpoints()
    assert deleted == [ckpt_dir / name(b) for b in (1, 2, 3)]
    assert pattern_names(ckpt_dir) == {name(b) for b in (4, 5, 6, 7, 8)}
    assert m.cleanup_old_checkpoints() == []  # nothing more to do


def test_corrupt_newest_never_costs_the_only_valid_one(ckpt_dir: Path):
    """The predecessor's bug: corrupt newest files took the keep_last_n slots."""
    make_file(ckpt_dir, 1, "valid", 1.0)
    for b, kind in enumerate(("flipped", "truncated", "header", "foreign", "empty"), start=2):
        make_file(ckpt_dir, b, kind, 1.0)
    m = CheckpointManager(ckpt_dir, keep_last_n=1)
    assert m.cleanup_old_checkpoints() == []
    assert pattern_names(ckpt_dir) == {name(b) for b in range(1, 7)}
    assert m.find_latest_checkpoint() == ckpt_dir / name(1)
    m = CheckpointManager(ckpt_dir, keep_last_n=1, delete_invalid=True)
    assert sorted(m.cleanup_old_checkpoints()) == [ckpt_dir / name(b) for b in range(2, 7)]
    assert pattern_names(ckpt_dir) == {name(1)}
    assert m.load_latest()["batch_idx"] == 1


def test_keep_last_n_none_keeps_everything(ckpt_dir: Path):
    m = CheckpointManager(ckpt_dir, keep_last_n=None, durable=False)
    for b in range(6):
        m.save_checkpoint(b, np.ones(2), {}, 0.0)
    make_file(ckpt_dir, 6, "flipped", 0.0)
    assert m.cleanup_old_checkpoints() == []
    assert len(pattern_names(ckpt_dir)) == 7
    # delete_invalid still removes invalid files when keep_last_n is None.
    m = CheckpointManager(ckpt_dir, keep_last_n=None, delete_invalid=True)
    assert m.cleanup_old_checkpoints() == [ckpt_dir / name(6)]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"keep_last_n": 0},
        {"keep_last_n": -1},
        {"keep_last_n": 1.5},
        {"keep_last_n": True},
        {"keep_last_n": "3"},
        {"keep_every": 0},
        {"keep_best_n": -1},
        {"best_mode": "median"},
    ],
)
def test_policy_values_out_of_range_are_refused(ckpt_dir: Path, kwargs):
    with pytest.raises(CheckpointError) as info:
        CheckpointManager(ckpt_dir, **kwargs)
    assert isinstance(info.value.error_context, dict)
    assert list(ckpt_dir.iterdir()) == []  # refused before touching the directory


def test_keep_last_n_positional_like_the_predecessor(ckpt_dir: Path):
    with pytest.raises(CheckpointError):
        CheckpointManager(ckpt_dir, 10, 0)
    assert CheckpointManager(ckpt_dir, 10, 1).keep_last_n == 1


def test_keep_every_keeps_milestones_for_good(ckpt_dir: Path):
    m = CheckpointManager(ckpt_dir, keep_last_n=2, keep_every=5, durable=False)
    for b in range(13):
        m.save_checkpoint(b, np.ones(2), {}, 1.0)
    assert pattern_names(ckpt_dir) == {name(b) for b in (0, 5, 10, 11, 12)}
    # An invalid milestone is no milestone: kept by default, deleted with delete_invalid.
    flip(ckpt_dir / name(5))
    assert m.cleanup_old_checkpoints() == []
    m2 = CheckpointManager(ckpt_dir, keep_last_n=2, keep_every=5, delete_invalid=True)
    assert m2.cleanup_old_checkpoints() == [ckpt_dir / name(5)]
    assert pattern_names(ckpt_dir) == {name(b) for b in (0, 10, 11, 12)}


@pytest.mark.parametrize("mode", ["min", "max"])
def test_keep_best_n_by_loss_nan_never_best(ckpt_dir: Path, mode: str):
    losses = {1: 0.5, 2: float("nan"), 3: 0.1, 4: 9.0, 5: float("nan"), 6: 3.0, 7: float("nan")}
    w = writer(ckpt_dir)
    for b, loss in losses.items():
        w.save_checkpoint(b, np.ones(2), {}, loss)
    m = CheckpointManager(ckpt_dir, keep_last_n=1, keep_best_n=2, best_mode=mode)
    m.cleanup_old_checkpoints()
    best = {3, 1} if mode == "min" else {4, 6}
    # 7 is the newest (kept whatever its loss); NaN never counts as best.
    assert pattern_names(ckpt_dir) == {name(b) for b in best | {7}}
    # An invalid file with the best loss is no "best": it is left alone, it takes no slot.
    make_file(ckpt_dir, 8, "flipped", -100.0 if mode == "min" else 100.0)
    assert m.cleanup_old_checkpoints() == []


def test_keep_best_n_all_nan_keeps_only_the_newest(ckpt_dir: Path):
    w = writer(ckpt_dir)
    for b in range(4):
        w.save_checkpoint(b, np.ones(2), {}, float("nan"))
    m = CheckpointManager(ckpt_dir, keep_last_n=1, keep_best_n=3)
    assert len(m.cleanup_old_checkpoints()) == 3
    assert pattern_names(ckpt_dir) == {name(3)}


def test_policies_combine_as_a_union(ckpt_dir: Path):
    losses = [5.0, 4.0, 0.5, 3.0, 2.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0]
    m = CheckpointManager(
        ckpt_dir, keep_last_n=2, keep_every=4, keep_best_n=1, durable=False, auto_cleanup=False
    )
    for b, loss in enumerate(losses):
        m.save_checkpoint(b, np.ones(2), {}, loss)
    files = {b: ("valid", loss) for b, loss in enumerate(losses)}
    policy = {"keep_last_n": 2, "keep_every": 4, "keep_best_n": 1}
    deleted = m.cleanup_old_checkpoints()
    assert {int(p.name[17:21]) for p in deleted} == expected_deleted(files, policy)
    assert pattern_names(ckpt_dir) == {name(b) for b in (0, 2, 4, 8, 9, 10)}


def test_auto_cleanup_runs_after_each_save_and_can_be_off(ckpt_dir: Path, tmp_path: Path):
    m = CheckpointManager(ckpt_dir, keep_last_n=2, durable=False)
    for b in range(5):
        m.save_checkpoint(b, np.ones(2), {}, 0.0)
        assert pattern_names(ckpt_dir) == {name(x) for x in range(max(0, b - 1), b + 1)}
    off = tmp_path / "off"
    m = CheckpointManager(off, keep_last_n=2, auto_cleanup=False, durable=False)
    for b in range(5):
        m.save_checkpoint(b, np.ones(2), {}, 0.0)
    assert len(pattern_names(off)) == 5
    assert [p.name for p in m.cleanup_old_checkpoints()] == [name(b) for b in range(3)]


def test_saving_an_older_batch_than_the_kept_ones(ckpt_dir: Path):
    """Retention right after the commit would delete the file just saved: such a save
    is refused, or (``on_older_batch="set_aside"``) the newer ones are moved away first.
    A save never returns a path its own retention deleted."""
    m = CheckpointManager(ckpt_dir, keep_last_n=2, durable=False)
    for b in (10, 11):
        m.save_checkpoint(b, np.ones(2), {}, 0.0)
    with pytest.raises(h5ckpt.CheckpointConflictError):
        m.save_checkpoint(5, np.ones(2), {}, 0.0)
    assert pattern_names(ckpt_dir) == {name(10), name(11)}
    aside = CheckpointManager(ckpt_dir, keep_last_n=2, on_older_batch="set_aside")
    path = aside.save_checkpoint(5, np.ones(2), {}, 0.0)
    assert path == ckpt_dir / name(5) and path.exists()
    assert pattern_names(ckpt_dir) == {name(5)}


def test_invalid_files_are_reported_not_deleted(ckpt_dir: Path, caplog):
    make_file(ckpt_dir, 1, "valid", 1.0)
    make_file(ckpt_dir, 2, "valid", 1.0)
    for b, kind in enumerate(("flipped", "header", "foreign", "legacy_bad"), start=3):
        make_file(ckpt_dir, b, kind, 1.0)
    m = CheckpointManager(ckpt_dir, keep_last_n=1)
    with caplog.at_level(logging.WARNING, logger="h5ckpt"):
        assert m.cleanup_old_checkpoints() == [ckpt_dir / name(1)]
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for b in range(3, 7):
        assert name(b) in warned
    cheap = {i.batch_idx: i.status for i in m.list_checkpoints()}
    full = {i.batch_idx: i.status for i in CheckpointManager(ckpt_dir).list_checkpoints(True)}
    assert full == {2: "valid", 3: "invalid", 4: "invalid", 5: "invalid", 6: "invalid"}
    # Without hashing, a damaged header or foreign bytes already show; a payload flip
    # or a legacy checksum needs verify=True (this manager remembers what it checked).
    assert cheap == full
    fresh_cheap = {i.batch_idx: i.status for i in CheckpointManager(ckpt_dir).list_checkpoints()}
    assert fresh_cheap == {
        2: "unverified",
        3: "unverified",
        4: "invalid",
        5: "invalid",
        6: "legacy",
    }


def test_delete_invalid_removes_them_but_never_the_newest_valid(ckpt_dir: Path):
    make_file(ckpt_dir, 1, "legacy_bad", 1.0)
    make_file(ckpt_dir, 2, "valid", 1.0)
    for b, kind in enumerate(("flipped", "truncated", "header", "foreign", "empty", "x"), start=3):
        if kind == "x":
            (ckpt_dir / name(b)).write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 50)  # broken HDF5
        else:
            make_file(ckpt_dir, b, kind, 1.0)
    m = CheckpointManager(ckpt_dir, keep_last_n=1, delete_invalid=True)
    deleted = m.cleanup_old_checkpoints()
    assert sorted(deleted) == [ckpt_dir / name(b) for b in (1, *range(3, 9))]
    assert pattern_names(ckpt_dir) == {name(2)}
    assert m.load_latest()["batch_idx"] == 2


def test_legacy_files_are_valid_checkpoints_that_count(ckpt_dir: Path, seed_writer):
    for b in (1, 2, 3):
        seed_writer(ckpt_dir, b, np.ones(3), {"b": b}, float(b), prefix=PREFIX)
    m = CheckpointManager(ckpt_dir, keep_last_n=2, durable=False)
    infos = m.list_checkpoints()
    assert [(i.batch_idx, i.status, i.loss) for i in infos] == [
        (1, "legacy", 1.0),
        (2, "legacy", 2.0),
        (3, "legacy", 3.0),
    ]
    assert all(i.timestamp > 0 and i.size_bytes == i.path.stat().st_size for i in infos)
    assert [i.status for i in m.list_checkpoints(verify=True)] == ["legacy"] * 3
    assert m.cleanup_old_checkpoints() == [ckpt_dir / name(1)]
    m.save_checkpoint(4, np.ones(3), {}, 4.0)  # a new h5ckpt file: the oldest legacy goes
    assert pattern_names(ckpt_dir) == {name(3), name(4)}
    assert m.find_latest_checkpoint() == ckpt_dir / name(4)


def test_keyed_manager_treats_legacy_files_as_invalid(ckpt_dir: Path, seed_writer):
    for b in (1, 2):
        seed_writer(ckpt_dir, b, np.ones(3), {}, 1.0, prefix=PREFIX)
    m = CheckpointManager(ckpt_dir, keep_last_n=1, hmac_key=b"secret", durable=False)
    assert {i.status for i in m.list_checkpoints()} == {"invalid"}
    assert m.find_latest_checkpoint() is None
    m.save_checkpoint(3, np.ones(2), {}, 0.0)
    assert pattern_names(ckpt_dir) == {name(b) for b in (1, 2, 3)}  # not deleted


# -- listing and resume --------------------------------------------------------------


def test_list_checkpoints_fields_for_every_kind(ckpt_dir: Path):
    kinds = dict(enumerate(KINDS, start=1))
    for b, kind in kinds.items():
        make_file(ckpt_dir, b, kind, b / 10)
    m = CheckpointManager(ckpt_dir, keep_last_n=None)
    cheap = m.list_checkpoints()
    assert [i.batch_idx for i in cheap] == list(kinds)
    for info in cheap:
        assert info.path == ckpt_dir / name(info.batch_idx)
        assert info.size_bytes == info.path.stat().st_size
        assert info.status in ("valid", "invalid", "legacy", "unverified")
    by_b = {i.batch_idx: i for i in cheap}
    assert by_b[1].status == "unverified" and by_b[1].loss == 0.1
    assert abs(by_b[1].timestamp - by_b[1].path.stat().st_mtime) < 60
    assert by_b[2].status == "legacy" and by_b[2].loss == 0.2
    full = {i.batch_idx: i for i in m.list_checkpoints(verify=True)}
    expect = {
        b: "valid" if k == "valid" else "legacy" if k == "legacy" else "invalid"
        for b, k in kinds.items()
    }
    assert {b: i.status for b, i in full.items()} == expect
    for b, info in full.items():
        assert info.is_valid == (expect[b] != "invalid")
        assert (info.error is None) == info.is_valid
        if expect[b] == "invalid" and kinds[b] in ("foreign", "empty", "header", "truncated"):
            assert math.isnan(info.loss)


def test_find_latest_falls_back_past_many_invalid_newest(ckpt_dir: Path):
    make_file(ckpt_dir, 3, "valid", 0.3)
    kinds = ("flipped", "truncated", "header", "foreign", "empty", "legacy_bad")
    for i, b in enumerate(range(4, 70)):
        make_file(ckpt_dir, b, kinds[i % len(kinds)], 0.0)
    m = CheckpointManager(ckpt_dir, keep_last_n=None)
    assert m.find_latest_checkpoint() == ckpt_dir / name(3)
    state = m.load_latest()
    assert state["batch_idx"] == 3 and state["optimizer_state"] == {"b": 3}
    (ckpt_dir / name(3)).unlink()
    assert m.find_latest_checkpoint() is None and m.load_latest() is None


def test_find_latest_with_only_other_files(ckpt_dir: Path):
    make_file(ckpt_dir, 5, "valid", 0.0, prefix="other")
    (ckpt_dir / f"{name(6)}.bak").write_bytes((ckpt_dir / name(5, "other")).read_bytes())
    m = CheckpointManager(ckpt_dir)
    assert m.find_latest_checkpoint() is None and m.list_checkpoints() == []


# -- invariant 3: nothing is deleted before the new checkpoint is committed ------------


def full_dir(d: Path) -> CheckpointManager:
    w = writer(d)
    for b in range(1, 6):
        w.save_checkpoint(b, np.full(2, float(b)), {}, float(b))
    return CheckpointManager(d, keep_last_n=1, delete_invalid=True, durable=False)


def test_failed_save_of_unsupported_value_deletes_nothing(ckpt_dir: Path):
    m = full_dir(ckpt_dir)
    before = snapshot(ckpt_dir)
    with pytest.raises(CheckpointError):
        m.save_checkpoint(9, np.ones(2), {"bad": object()}, 0.0)
    with pytest.raises(CheckpointError):
        m.save_checkpoint(9, np.array(["text"]), {}, 0.0)
    with pytest.raises(CheckpointError):
        m.save_checkpoint(9, np.ones(2), {}, "not a loss")
    assert snapshot(ckpt_dir) == before


def test_failed_commit_deletes_nothing(ckpt_dir: Path):
    """The rename fails (a non-empty directory holds the final name): no cleanup."""
    m = full_dir(ckpt_dir)
    blocker = ckpt_dir / name(9)
    blocker.mkdir()
    (blocker / "keep.txt").write_text("mine")
    before = snapshot(ckpt_dir)
    with pytest.raises(CheckpointError):
        m.save_checkpoint(9, np.ones(2), {}, 0.0)
    assert snapshot(ckpt_dir) == before  # no temp file either
    fut = m.save_checkpoint_async(9, np.ones(2), {}, 0.0)
    with pytest.raises(CheckpointError):
        fut.result()
    assert snapshot(ckpt_dir) == before


def test_directory_replaced_under_the_manager_deletes_nothing(ckpt_dir: Path, tmp_path: Path):
    m = full_dir(ckpt_dir)
    moved = tmp_path / "moved"
    ckpt_dir.rename(moved)
    before = snapshot(moved)
    ckpt_dir.write_text("a file where the directory was")
    with pytest.raises(CheckpointError):
        m.save_checkpoint(9, np.ones(2), {}, 0.0)
    with pytest.raises(CheckpointError):
        m.cleanup_old_checkpoints()
    assert snapshot(moved) == before
    assert ckpt_dir.read_text() == "a file where the directory was"


def test_cleanup_happens_only_after_the_new_file_is_in_place(ckpt_dir: Path, monkeypatch):
    m = full_dir(ckpt_dir)
    make_file(ckpt_dir, 0, "flipped", 0.0)
    new = ckpt_dir / name(9)
    events: list[tuple[str, str, bool]] = []
    real_unlink, real_replace = os.unlink, os.replace

    def unlink(path, *a, **kw):
        # At every deletion the new checkpoint is already complete under its name.
        native = h5ckpt.verification._native
        ok = new.exists() and isinstance(native.verify_files([new])[0], native.Header)
        events.append(("unlink", Path(path).name, ok))
        return real_unlink(path, *a, **kw)

    def replace(src, dst, *a, **kw):
        events.append(("replace", Path(dst).name, new.exists()))
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "unlink", unlink)
    monkeypatch.setattr(os, "replace", replace)
    m.save_checkpoint(9, np.ones(2), {}, 0.0)
    monkeypatch.undo()
    kinds = [e[0] for e in events]
    assert kinds[0] == "replace" and events[0][1] == name(9) and not events[0][2]
    deleted = [e for e in events if e[0] == "unlink"]
    assert sorted(e[1] for e in deleted) == [name(b) for b in range(0, 6)]
    assert all(ok for _, _, ok in deleted)
    assert pattern_names(ckpt_dir) == {name(9)}


# -- invariant 4: only this manager's own names are touched --------------------------


def test_only_own_pattern_is_touched(ckpt_dir: Path, tmp_path: Path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    make_file(elsewhere, 1, "valid", 0.0)
    for b in (1, 2, 3):
        make_file(ckpt_dir, b, "valid", float(b), prefix="other")
        make_file(ckpt_dir, b, "valid", float(b), prefix="checkpoint_x")
        make_file(ckpt_dir, b, "valid", float(b), prefix="Checkpoint")
    make_file(ckpt_dir, 4, "valid", 0.0)
    make_file(ckpt_dir, 5, "flipped", 0.0)
    shutil.copy(ckpt_dir / name(4), ckpt_dir / f"{name(4)}.bak")
    shutil.copy(ckpt_dir / name(4), ckpt_dir / "checkpoint_batch_0004.h5~")
    (ckpt_dir / name(2)).mkdir()  # a directory named like a checkpoint
    (ckpt_dir / name(2) / "inside.txt").write_text("x")
    (ckpt_dir / name(3)).symlink_to(elsewhere / name(1))  # a symlink named like one
    (ckpt_dir / name(6)).symlink_to(tmp_path / "nowhere")  # a dangling one
    for junk in (
        "checkpoint_batch_.h5",
        "checkpoint_batch_1a.h5",
        "checkpoint_batch_-7.h5",
        "checkpoint_batch_7.hdf5",
        "checkpoint_batch_7.H5",
        "checkpoint_batch_٣.h5",
        "checkpoint_batch_0007.h5.tmp",
        ".checkpoint_batch_0007.h5",
        "notes.txt",
        "checkpoint_batch_0001.h5.part",
    ):
        (ckpt_dir / junk).write_bytes(b"not ours")
    (ckpt_dir / "sub").mkdir()
    make_file(ckpt_dir / "sub", 0, "valid", 0.0)
    before = snapshot(ckpt_dir)
    elsewhere_before = snapshot(elsewhere)

    m = CheckpointManager(ckpt_dir, keep_last_n=1, delete_invalid=True, durable=False)
    assert [i.batch_idx for i in m.list_checkpoints()] == [4, 5]
    assert m.cleanup_old_checkpoints() == [ckpt_dir / name(5)]
    m.save_checkpoint(7, np.ones(2), {}, 0.0)  # auto cleanup removes batch 4
    after = snapshot(ckpt_dir)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert changed == {name(4), name(5), name(7)}
    assert name(7) in after and name(4) not in after and name(5) not in after
    assert snapshot(elsewhere) == elsewhere_before


def test_prefix_with_special_characters(ckpt_dir: Path):
    prefix = "run.1[a]*"
    w = writer(ckpt_dir, prefix=prefix)
    for b in range(3):
        w.save_checkpoint(b, np.ones(2), {}, 0.0)
    make_file(ckpt_dir, 0, "valid", 0.0, prefix="run.1a")
    make_file(ckpt_dir, 1, "valid", 0.0, prefix="run")
    m = CheckpointManager(ckpt_dir, keep_last_n=1, prefix=prefix)
    assert [p.name for p in m.cleanup_old_checkpoints()] == [name(0, prefix), name(1, prefix)]
    assert (ckpt_dir / name(0, "run.1a")).exists() and (ckpt_dir / name(1, "run")).exists()


# -- the verification cache ----------------------------------------------------------


class Spy:
    """Counts the files handed to the real ``verify_fds`` (and still calls it)."""

    def __init__(self, monkeypatch):
        self.real = h5ckpt.verification._native.verify_fds
        self.calls: list[list[str]] = []
        monkeypatch.setattr(h5ckpt.verification._native, "verify_fds", self)

    def __call__(self, fds, paths, hmac_key=None):
        self.calls.append([Path(p).name for p in paths])
        return self.real(fds, paths, hmac_key)

    def take(self) -> list[str]:
        out = [n for call in self.calls for n in call]
        self.calls.clear()
        return out


def test_unchanged_files_are_hashed_once(ckpt_dir: Path, monkeypatch):
    spy = Spy(monkeypatch)
    m = CheckpointManager(ckpt_dir, keep_last_n=2, durable=False)
    for b in range(5):
        m.save_checkpoint(b, np.ones(2), {}, 0.0)
    # What this manager wrote it knows: save -> cleanup -> find-latest hashes nothing.
    assert spy.take() == []
    assert m.find_latest_checkpoint() == ckpt_dir / name(4)
    assert m.cleanup_old_checkpoints() == []
    assert [i.status for i in m.list_checkpoints()] == ["valid", "valid"]
    assert spy.take() == []

    fresh = CheckpointManager(ckpt_dir, keep_last_n=1, durable=False)
    assert fresh.find_latest_checkpoint() == ckpt_dir / name(4)
    assert spy.take() == [name(4)]  # the newest is valid: nothing older is hashed
    assert fresh.find_latest_checkpoint() == ckpt_dir / name(4)
    assert spy.take() == []
    assert fresh.cleanup_old_checkpoints() == [ckpt_dir / name(3)]
    assert spy.take() == [name(3)]
    # Asked for, verification hashes again what the manager already knows.
    assert fresh.list_checkpoints(verify=True)[0].status == "valid"
    assert spy.take() == [name(4)]
    assert m.list_checkpoints(verify=True)[0].status == "valid"
    assert spy.take() == [name(4)]


def test_verify_true_hashes_all_files_in_one_parallel_call(ckpt_dir: Path, monkeypatch):
    for b in range(6):
        make_file(ckpt_dir, b, "valid" if b % 2 else "flipped", 0.0)
    make_file(ckpt_dir, 6, "legacy", 0.0)
    make_file(ckpt_dir, 7, "foreign", 0.0)
    spy = Spy(monkeypatch)
    infos = CheckpointManager(ckpt_dir).list_checkpoints(verify=True)
    assert len(spy.calls) == 1 and sorted(spy.calls[0]) == [name(b) for b in range(6)]
    assert [i.status for i in infos] == ["invalid", "valid"] * 3 + ["legacy", "invalid"]


def test_file_changed_in_place_is_verified_again(ckpt_dir: Path, tmp_path: Path, monkeypatch):
    m = CheckpointManager(ckpt_dir, keep_last_n=None, durable=False)
    for b in range(3):
        m.save_checkpoint(b, np.ones(2), {}, 0.0)
    spy = Spy(monkeypatch)
    assert m.find_latest_checkpoint() == ckpt_dir / name(2)
    assert spy.take() == []
    os.utime(ckpt_dir / name(2), ns=(1, 1))
    flip(ckpt_dir / name(2))  # same inode and size, new mtime
    assert m.find_latest_checkpoint() == ckpt_dir / name(1)
    assert spy.take() == [name(2)]
    assert m.list_checkpoints()[2].status == "invalid"
    assert spy.take() == []
    # Replaced by a new file (new inode): checked again too.
    m.save_checkpoint(2, np.ones(2), {}, 0.0)
    other = CheckpointManager(tmp_path / "other", keep_last_n=None, durable=False)
    os.replace(other.save_checkpoint(1, np.full(2, 7.0), {}, 0.0), ckpt_dir / name(1))
    spy.take()  # (the other manager's own cleanup checked files it did not know)
    assert m.cleanup_old_checkpoints() == []
    assert spy.take() == [name(1)]
    assert m.list_checkpoints()[1].status == "valid"
    # verify=True hashes every file again, whatever the manager remembers.
    assert [i.status for i in m.list_checkpoints(verify=True)] == ["valid"] * 3
    assert sorted(spy.take()) == [name(b) for b in range(3)]


def test_listing_an_unchanged_directory_again_reuses_what_it_knows(ckpt_dir: Path):
    w = writer(ckpt_dir)
    for b in range(4):
        w.save_checkpoint(b, np.ones(2), {}, float(b))
    m = CheckpointManager(ckpt_dir, keep_last_n=None)
    first = m.list_checkpoints()
    again = m.list_checkpoints()
    assert [a is b for a, b in zip(first, again, strict=True)] == [True] * 4
    assert [i.status for i in again] == ["unverified"] * 4
    full = m.list_checkpoints(verify=True)  # unverified entries are not reused here
    assert [i.status for i in full] == ["valid"] * 4
    assert [i.status for i in m.list_checkpoints()] == ["valid"] * 4
    flip(ckpt_dir / name(1))
    (ckpt_dir / name(2)).unlink()
    w.save_checkpoint(3, np.zeros(2), {}, 9.0)  # replaced by another manager
    after = {i.batch_idx: i for i in m.list_checkpoints()}
    assert after[0] is full[0]
    assert after[1].status == "unverified" and 2 not in after
    assert after[3].status == "unverified" and after[3].loss == 9.0
    # What is known about files that are gone is dropped with a listing.
    assert name(2) not in m._verifier.catalog
    assert name(1) in m._verifier.catalog and len(m._verifier.catalog) == 3


def test_a_forged_mtime_does_not_hide_a_change(ckpt_dir: Path, monkeypatch):
    m = CheckpointManager(ckpt_dir, keep_last_n=None, durable=False)
    for b in range(3):
        m.save_checkpoint(b, np.full(2, float(b)), {}, 0.0)
    path = ckpt_dir / name(2)
    st_before = path.stat()
    flip(path)
    # The old size, inode and mtime again; the change time cannot be set back.
    os.utime(path, ns=(st_before.st_atime_ns, st_before.st_mtime_ns))
    assert path.stat().st_mtime_ns == st_before.st_mtime_ns
    spy = Spy(monkeypatch)
    assert m.find_latest_checkpoint() == ckpt_dir / name(1)
    assert spy.take() == [name(2)]
    assert m.list_checkpoints()[2].status == "invalid"


def _bytes_read() -> int:
    """Bytes this process has read through read(2) and friends (all threads)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def test_listing_an_unchanged_directory_again_reads_no_file(ckpt_dir: Path):
    w = writer(ckpt_dir)
    for b in range(60):
        w.save_checkpoint(b, np.ones(2), {}, float(b))
    m = CheckpointManager(ckpt_dir, keep_last_n=None)
    before = _bytes_read()
    first = m.list_checkpoints()
    read_first = _bytes_read() - before
    assert read_first >= 60 * 512  # every header
    before = _bytes_read()
    again = m.list_checkpoints()
    assert _bytes_read() - before < 512  # no header read again
    assert again == first
    with open(ckpt_dir / name(7), "ab") as f:
        f.write(b"x")
    before = _bytes_read()
    after = m.list_checkpoints()
    assert 512 <= _bytes_read() - before < 2 * 512  # only the changed file
    assert after[7].status == "invalid" and "extra bytes" in after[7].error
    assert after[:7] == first[:7] and after[8:] == first[8:]


def test_load_checkpoint_verifies_whatever_the_cache_says(ckpt_dir: Path, monkeypatch):
    m = CheckpointManager(ckpt_dir, keep_last_n=None, durable=False)
    for b in range(3):
        m.save_checkpoint(b, np.full(2, float(b)), {}, 0.0)
    path = ckpt_dir / name(2)
    flip(path)
    # A cache that is wrong about the file (as it would be after a change no file
    # identity shows): it says valid.
    m._verifier.catalog.note(m.list_checkpoints()[2], "valid")
    spy = Spy(monkeypatch)
    assert m.find_latest_checkpoint() == path  # what the cache says, by design
    assert spy.take() == []
    with pytest.raises(CheckpointCorruptError):
        m.load_checkpoint(path)
    assert not m.validate_checkpoint(path)
    # load_latest forgets what failed and falls back to the newest that loads.
    assert m.load_latest()["batch_idx"] == 1
    assert m.find_latest_checkpoint() == ckpt_dir / name(1)


# -- property-based: random directories, random policies -----------------------------

losses = st.one_of(
    st.sampled_from([0.0, 1.0, -1.0, float("nan"), float("inf"), float("-inf")]),
    st.floats(-1e6, 1e6, allow_nan=False),
)
directories = st.dictionaries(
    st.integers(0, 40), st.tuples(st.sampled_from(KINDS), losses), max_size=9
)
policies = st.fixed_dictionaries(
    {
        "keep_last_n": st.one_of(st.none(), st.integers(1, 5)),
        "keep_every": st.one_of(st.none(), st.integers(1, 7)),
        "keep_best_n": st.integers(0, 3),
        "best_mode": st.sampled_from(["min", "max"]),
        "delete_invalid": st.booleans(),
    }
)


def _fresh(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prop")


def _bystanders(d: Path) -> None:
    (d / "notes.txt").write_text("bystander")
    (d / f"{name(3)}.bak").write_bytes(b"backup")
    (d / name(1, "other")).write_bytes(b"other prefix")
    (d / name(99)).mkdir()
    (d / name(98)).symlink_to(d / "notes.txt")


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(files=directories, policy=policies)
def test_cleanup_of_random_directories(tmp_path_factory, files, policy):
    d = _fresh(tmp_path_factory)
    for b, (kind, loss) in files.items():
        make_file(d, b, kind, loss)
    _bystanders(d)
    others_before = {k: v for k, v in snapshot(d).items() if k not in pattern_names(d)}
    m = CheckpointManager(d, durable=False, **policy)
    deleted = m.cleanup_old_checkpoints()
    remaining = {int(n[17:21]) for n in pattern_names(d)}
    gone = set(files) - remaining

    assert {int(p.name[17:21]) for p in deleted} == gone
    assert gone == expected_deleted(files, policy)
    valid = [b for b, (k, _) in files.items() if k in VALID_KINDS]
    # 1. the newest valid one survives.
    if valid:
        assert max(valid) in remaining
    # 2. no valid one goes while fewer than keep_last_n valid ones remain.
    n = policy["keep_last_n"]
    kept_valid = [b for b in valid if b in remaining]
    assert len(kept_valid) >= (len(valid) if n is None else min(n, len(valid)))
    if not policy["delete_invalid"]:
        assert all(b in remaining for b in files if b not in valid)
    # 4. nothing else was touched.
    after = snapshot(d)
    assert {k: v for k, v in after.items() if k not in pattern_names(d)} == others_before
    # The listing agrees with what is there, and a second run deletes nothing.
    listed = {i.batch_idx: i for i in m.list_checkpoints(verify=True)}
    assert set(listed) == remaining
    for b, info in listed.items():
        assert info.is_valid == (files[b][0] in VALID_KINDS)
    assert m.cleanup_old_checkpoints() == []
    latest = m.find_latest_checkpoint()
    assert latest == (d / name(max(valid)) if valid else None)
    shutil.rmtree(d)


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    steps=st.lists(
        st.tuples(st.sampled_from(["save", "save", "corrupt", "cleanup"]), st.integers(0, 9)),
        min_size=1,
        max_size=14,
    ),
    keep=st.integers(1, 3),
)
def test_saves_and_damage_interleaved(tmp_path_factory, steps, keep):
    """Auto cleanup after every save, with files damaged between saves."""
    d = _fresh(tmp_path_factory)
    m = CheckpointManager(d, keep_last_n=keep, durable=False)
    state: dict[int, bool] = {}  # batch -> valid, as it should be on disk
    batch = 0
    for op, arg in steps:
        if op == "save":
            batch += 1 + arg % 3
            m.save_checkpoint(batch, np.full(2, float(batch)), {}, float(arg))
            state[batch] = True
        elif op == "corrupt" and any(state.values()):
            b = sorted(b for b, ok in state.items() if ok)[arg % sum(state.values())]
            flip(d / name(b))
            state[b] = False
        else:
            m.cleanup_old_checkpoints()
        # What is left: every invalid file, and the `keep` newest valid ones (after a
        # save or cleanup; a corruption alone deletes nothing).
        on_disk = {int(n[17:21]) for n in pattern_names(d)}
        assert {b for b, ok in state.items() if not ok} <= on_disk
        valid = sorted((b for b, ok in state.items() if ok), reverse=True)
        assert set(valid[:keep]) <= on_disk
        state = {b: ok for b, ok in state.items() if b in on_disk}
        if op != "corrupt":
            assert sorted((b for b, ok in state.items() if ok), reverse=True) == valid[:keep]
        newest = max((b for b, ok in state.items() if ok), default=None)
        found = m.find_latest_checkpoint()
        assert found == (None if newest is None else d / name(newest))
    shutil.rmtree(d)


def test_file_renamed_to_another_batch_is_invalid(ckpt_dir: Path):
    m = CheckpointManager(ckpt_dir, keep_last_n=None)
    m.save_checkpoint(10, np.ones(2), {"b": 10}, 0.1)
    src = m.save_checkpoint(30, np.ones(2), {"b": 30}, 0.3)
    os.rename(src, m.checkpoint_path(50))
    fresh = CheckpointManager(ckpt_dir, keep_last_n=None)
    (info,) = [i for i in fresh.list_checkpoints() if i.batch_idx == 50]
    assert info.status == "invalid" and "header says 30" in info.error
    assert fresh.find_latest_checkpoint() == m.checkpoint_path(10)
