"""Races on one directory, from the fault angle: processes that save, list, load and
clean at once; two managers in one process; a reader loading while a writer
replaces the same batch. No process ever sees an exception other than a
CheckpointError, a checkpoint once seen never goes missing, and every load returns
exactly what was saved for its batch."""

from __future__ import annotations

import contextlib
import threading
import traceback
from pathlib import Path

import numpy as np

import faultkit
from h5ckpt import CheckpointConflictError, CheckpointError, CheckpointManager


def test_four_processes_save_list_load_and_clean(tmp_path: Path):
    reports = faultkit.race_round(tmp_path / "ckpt", saves=30)
    # The others worked while the saver saved (they loop until it is done).
    assert reports["lister"]["ops"] >= 1
    assert reports["loader"]["ops"] >= 1
    assert reports["cleaner"]["ops"] >= 1
    # Whatever CheckpointErrors were expected (a file deleted by retention between
    # listing and loading), none was a corruption.
    for rep in reports.values():
        assert "CheckpointCorruptError" not in rep["expected"], rep


def test_two_managers_in_one_process(tmp_path: Path):
    directory = tmp_path / "ckpt"
    a = CheckpointManager(directory, keep_last_n=2)
    b = CheckpointManager(directory, keep_last_n=2)
    failures: list[str] = []
    done = threading.Event()

    def saver(m: CheckpointManager, batches: range) -> None:
        try:
            for batch in batches:
                # The two writers save interleaved batches: one that falls behind
                # the other is refused (a save below the newest valid checkpoint).
                with contextlib.suppress(CheckpointConflictError):
                    m.save_checkpoint(
                        batch,
                        faultkit.params_for(batch, 20_000),
                        faultkit.state_for(batch),
                        0.0,
                        {"batch": batch},
                    )
        except BaseException:
            failures.append(traceback.format_exc())

    def reader() -> None:
        seen: list[int | None] = []
        m = CheckpointManager(directory, keep_last_n=2)
        while not done.is_set():
            try:
                data = m.load_latest()
                seen.append(None if data is None else data["batch_idx"])
                if data is not None:
                    faultkit.check_content(data, 20_000)
                m.list_checkpoints(verify=True)
                m.cleanup_old_checkpoints()
            except CheckpointError:
                pass
            except BaseException:
                failures.append(traceback.format_exc())
        # Two writers commit out of order, so "newest" may step between their
        # batches; what was seen must still never vanish completely.
        first = next((i for i, s in enumerate(seen) if s is not None), len(seen))
        if any(s is None for s in seen[first:]):
            failures.append(f"the latest checkpoint vanished: {seen}")

    threads = [
        threading.Thread(target=saver, args=(a, range(0, 40, 2))),
        threading.Thread(target=saver, args=(b, range(1, 40, 2))),
    ]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watcher.join()
    assert failures == []
    m = CheckpointManager(directory, keep_last_n=2)
    latest = m.find_latest_checkpoint()
    assert latest is not None and faultkit.batch_of(latest.name) == 39
    faultkit.check_content(m.load_checkpoint(latest), 20_000)
    assert all(i.is_valid for i in m.list_checkpoints(verify=True))
    assert faultkit.temp_names(directory) == []


def test_reader_loads_while_a_writer_replaces_the_same_batch(tmp_path: Path):
    directory = tmp_path / "ckpt"
    directory.mkdir()
    done = tmp_path / "done"
    writer = faultkit.spawn_child("replace", str(directory), "60", str(done))
    path = directory / "checkpoint_batch_0007.h5"
    m = CheckpointManager(directory, keep_last_n=1)
    loads = 0
    iterations: set[int] = set()
    while not done.exists() and writer.poll() is None:
        if not path.exists():
            continue
        # The name always points to a complete file: every load succeeds, and what
        # it returns is one save, never a mix of two.
        data = m.load_checkpoint(path)
        i = data["metadata"]["i"]
        assert data["optimizer_state"] == {"i": i} and data["loss"] == float(i)
        np.testing.assert_array_equal(data["parameters"], faultkit.params_for(i, 20_000))
        assert m.validate_checkpoint(path)
        loads += 1
        iterations.add(i)
    _, stderr = writer.communicate()
    assert writer.returncode == 0, stderr
    assert loads >= 1
    assert m.load_checkpoint(path)["metadata"] == {"i": 59}
    assert faultkit.checkpoint_names(directory) == [path.name]


class _DeletesAfterListing:
    """Runs ``act`` right after ``m`` lists the directory, before it checks or loads
    what it listed: the files it listed are deleted (and newer ones saved) by
    another manager in between, as a second job's retention does."""

    def __init__(self, m: CheckpointManager, act, times: int = 1) -> None:
        self.act, self.left = act, times
        self.real = m._verifier.list
        m._verifier.list = self.list

    def list(self, *args, **kwargs):
        listed = self.real(*args, **kwargs)
        if self.left and listed:
            self.left -= 1
            self.act()
        return listed


def test_find_latest_lists_again_when_every_listed_file_was_deleted(tmp_path: Path):
    """A reader's listing goes stale when another job saves and its retention deletes
    every file listed: the newest valid checkpoint exists all along, so the answer
    must be it, never None (a resume would start over)."""
    directory = tmp_path / "ckpt"
    writer = CheckpointManager(directory, keep_last_n=1)
    writer.save_checkpoint(1, np.arange(4.0), {"b": 1}, 0.5)
    for call in ("find_latest_checkpoint", "load_latest"):
        reader = CheckpointManager(directory)
        batch = writer.find_latest_checkpoint()
        n = int(batch.stem.rsplit("_", 1)[1]) + 1
        _DeletesAfterListing(
            reader, lambda n=n: writer.save_checkpoint(n, np.arange(4.0) + n, {"b": n}, 0.5)
        )
        result = getattr(reader, call)()
        assert result is not None, call
        if call == "load_latest":
            assert result["batch_idx"] == n and result["optimizer_state"] == {"b": n}
        else:
            assert result == writer.checkpoint_path(n)


def test_a_directory_that_changes_on_every_listing_raises_instead_of_none(tmp_path: Path):
    directory = tmp_path / "ckpt"
    writer = CheckpointManager(directory, keep_last_n=1)
    writer.save_checkpoint(1, np.arange(4.0), {}, 0.5)
    batches = iter(range(2, 1000))
    for call in ("find_latest_checkpoint", "load_latest"):
        reader = CheckpointManager(directory)
        _DeletesAfterListing(
            reader,
            lambda: writer.save_checkpoint(next(batches), np.arange(4.0), {}, 0.5),
            times=1000,
        )
        try:
            result = getattr(reader, call)()
        except CheckpointError as exc:
            assert "changed" in str(exc), exc
        else:
            raise AssertionError(f"{call} returned {result!r} for a directory never empty")
