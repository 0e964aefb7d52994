"""Asynchronous saves: snapshot, order, waiting, errors and the bound on pending snapshots.

Real files throughout; no assertion depends on how long anything takes. Where a test
needs a save to stay in progress, it holds the background thread at a gate (an
``Event``) inside the save path.
"""

from __future__ import annotations

import threading
import tracemalloc
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest

import h5ckpt.payload as payload_module
from h5ckpt import CheckpointError, CheckpointManager
from h5ckpt.staging import StagedFile
from h5ckpt.tree import values_equal


def _fail_batch(m: CheckpointManager, batch_idx: int) -> None:
    """Make the save of ``batch_idx`` fail for real: its final name is a directory."""
    (m.checkpoint_path(batch_idx)).mkdir()


class _Gate:
    """Holds every background save at the start of writing until opened: small
    checkpoints are built in memory (``build_image``), others written by HDF5 into
    the temp file (``write_payload``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()
        for name in ("build_image", "write_payload"):
            monkeypatch.setattr(payload_module, name, self._gated(getattr(payload_module, name)))

    def _gated(self, real):
        def gated(*args, **kwargs):
            self.entered.set()
            assert self.opened.wait(30), "the test never opened the gate"
            return real(*args, **kwargs)

        return gated


def test_returns_a_future_of_the_path(ckpt_dir: Path):
    with CheckpointManager(ckpt_dir) as m:
        fut = m.save_checkpoint_async(3, np.arange(5.0), {"step": 3}, 0.25, {"tag": "a"})
        assert isinstance(fut, Future)
        path = fut.result()
        assert path == m.checkpoint_path(3)
        assert isinstance(path, Path) and path.is_file()
        assert m.validate_checkpoint(path)
        data = m.load_checkpoint(path)
    assert data["batch_idx"] == 3 and data["loss"] == 0.25
    assert data["optimizer_state"] == {"step": 3} and data["metadata"] == {"tag": "a"}
    np.testing.assert_array_equal(data["parameters"], np.arange(5.0))


def test_snapshot_is_taken_before_the_call_returns(ckpt_dir: Path, monkeypatch):
    gate = _Gate(monkeypatch)
    params = np.arange(1000, dtype=np.float64)
    moments = np.ones((20, 30), dtype=np.float32)
    history = [1.0, 2.0]
    state = {"m": moments, "history": history, "nested": {"v": np.zeros(7, dtype=np.int64)}}
    meta = {"arr": np.full(4, 9, dtype=np.uint8), "labels": ["a"]}
    want_params = params.copy()
    want_state = {
        "m": moments.copy(),
        "history": [1.0, 2.0],
        "nested": {"v": np.zeros(7, dtype=np.int64)},
    }
    want_meta = {"arr": np.full(4, 9, dtype=np.uint8), "labels": ["a"]}
    with CheckpointManager(ckpt_dir) as m:
        fut = m.save_checkpoint_async(1, params, state, 0.5, meta)
        assert gate.entered.wait(30)
        # The save has not written anything yet; change everything the caller owns.
        params[:] = -1
        moments *= 0
        history.append(3.0)
        state["nested"]["v"][:] = 5
        state["extra"] = "added later"
        meta["arr"][:] = 0
        meta["labels"][0] = "changed"
        gate.opened.set()
        path = fut.result()
        data = m.load_checkpoint(path)
    np.testing.assert_array_equal(data["parameters"], want_params)
    assert values_equal(data["optimizer_state"], want_state)
    assert values_equal(data["metadata"], want_meta)


def test_parameters_dtype_shape_and_views_are_kept(ckpt_dir: Path):
    base = np.arange(60, dtype=np.int32).reshape(6, 10)
    view = base[::2, 1:8]  # not contiguous
    with CheckpointManager(ckpt_dir) as m:
        path = m.save_checkpoint_async(1, view, {}, 0.0).result()
        base[:] = 0
        out = m.load_checkpoint(path)["parameters"]
    assert out.dtype == np.int32 and out.shape == (3, 7)
    np.testing.assert_array_equal(out, np.arange(60, dtype=np.int32).reshape(6, 10)[::2, 1:8])


def test_saves_commit_in_submission_order(ckpt_dir: Path, monkeypatch):
    committed: list[str] = []
    real_commit = StagedFile.commit

    def recording_commit(self, *args, **kwargs):
        real_commit(self, *args, **kwargs)
        committed.append(self.final.name)

    monkeypatch.setattr(StagedFile, "commit", recording_commit)
    # Rising batches (a lower one would be refused below a higher one), but sizes
    # that vary: saves that did not wait for each other would commit small ones first.
    order = [1, 2, 3, 5, 7, 9]
    sizes = {1: 2_000_000, 2: 1_000, 3: 1_500_000, 5: 10, 7: 1_000_000, 9: 100}
    with CheckpointManager(ckpt_dir, keep_last_n=None) as m:
        futures = [
            m.save_checkpoint_async(b, np.full(sizes[b], float(b)), {"b": b}, float(b))
            for b in order
        ]
        m.wait_until_finished()
        assert all(f.done() for f in futures)
        assert [f.result() for f in futures] == [m.checkpoint_path(b) for b in order]
    assert committed == [m.checkpoint_path(b).name for b in order]
    for b in order:
        data = m.load_checkpoint(m.checkpoint_path(b))
        assert data["optimizer_state"] == {"b": b}
        assert np.all(data["parameters"] == b)


def test_retention_follows_the_async_saves(ckpt_dir: Path):
    with CheckpointManager(ckpt_dir, keep_last_n=2) as m:
        for b in range(1, 6):
            m.save_checkpoint_async(b, np.full(10, b), {}, float(b))
        m.wait_until_finished()
        assert [i.batch_idx for i in m.list_checkpoints(verify=True)] == [4, 5]


def test_wait_until_finished_waits_for_every_save(ckpt_dir: Path, monkeypatch):
    gate = _Gate(monkeypatch)
    m = CheckpointManager(ckpt_dir, keep_last_n=None)
    fut = m.save_checkpoint_async(1, np.ones(100), {}, 0.0)
    assert gate.entered.wait(30)
    waiter = threading.Thread(target=m.wait_until_finished)
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive(), "wait_until_finished returned while a save was held"
    assert not fut.done() and not m.checkpoint_path(1).exists()
    gate.opened.set()
    waiter.join(30)
    assert not waiter.is_alive()
    assert fut.done() and m.checkpoint_path(1).is_file()
    m.close()


def test_wait_until_finished_with_nothing_pending(ckpt_dir: Path):
    m = CheckpointManager(ckpt_dir)
    m.wait_until_finished()
    m.close()
    m.close()


def test_second_call_waits_for_the_first_snapshot(ckpt_dir: Path, monkeypatch):
    """At most one snapshot is pending: a second call neither returns nor copies its
    arrays (no memory is allocated for them) until the first save has finished."""
    gate = _Gate(monkeypatch)
    second_params = np.arange(1_000_000, dtype=np.float64)  # 8 MB
    second_state = {"m": np.ones(500_000)}  # 4 MB
    with CheckpointManager(ckpt_dir, keep_last_n=None) as m:
        first = m.save_checkpoint_async(1, np.zeros(1000), {}, 1.0)
        assert gate.entered.wait(30)
        result: dict[str, Future] = {}
        tracemalloc.start()
        try:
            caller = threading.Thread(
                target=lambda: result.update(
                    f=m.save_checkpoint_async(2, second_params, second_state, 2.0)
                )
            )
            caller.start()
            caller.join(0.5)
            blocked = caller.is_alive()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            gate.opened.set()
            tracemalloc.stop()
        caller.join(30)
        assert blocked, "a second call returned while the first save was pending"
        assert peak < 1_000_000, f"{peak} bytes were allocated while the first save was pending"
        assert first.result() == m.checkpoint_path(1)
        assert result["f"].result() == m.checkpoint_path(2)
    data = m.load_checkpoint(m.checkpoint_path(2))
    np.testing.assert_array_equal(data["parameters"], second_params)
    np.testing.assert_array_equal(data["optimizer_state"]["m"], second_state["m"])


def test_error_surfaces_on_the_future_and_from_wait(ckpt_dir: Path):
    m = CheckpointManager(ckpt_dir, keep_last_n=None)
    _fail_batch(m, 2)
    ok1 = m.save_checkpoint_async(1, np.ones(3), {}, 0.0)
    bad = m.save_checkpoint_async(2, np.ones(3), {}, 0.0)
    ok3 = m.save_checkpoint_async(3, np.ones(3), {}, 0.0)
    with pytest.raises(CheckpointError) as on_future:
        bad.result()
    assert isinstance(on_future.value.error_context, dict)
    # The failure did not stop the saves after it.
    assert ok1.result() == m.checkpoint_path(1) and ok3.result() == m.checkpoint_path(3)
    with pytest.raises(CheckpointError) as on_wait:
        m.wait_until_finished()
    assert on_wait.value is on_future.value
    # Reported once: the next wait has nothing left to report.
    m.wait_until_finished()
    # No temp file is left behind by the failed save.
    assert sorted(p.name for p in ckpt_dir.iterdir() if p.name.startswith(".checkpoint")) == []
    m.close()


def test_error_surfaces_when_leaving_the_with_block(ckpt_dir: Path):
    with pytest.raises(CheckpointError), CheckpointManager(ckpt_dir) as m:
        _fail_batch(m, 4)
        fut = m.save_checkpoint_async(4, np.ones(3), {}, 0.0)
    assert fut.done() and isinstance(fut.exception(), CheckpointError)


def test_error_surfaces_when_leaving_even_after_reading_the_future(ckpt_dir: Path):
    with pytest.raises(CheckpointError), CheckpointManager(ckpt_dir) as m:
        _fail_batch(m, 4)
        fut = m.save_checkpoint_async(4, np.ones(3), {}, 0.0)
        assert isinstance(fut.exception(), CheckpointError)


def test_error_in_flight_is_not_masked_by_a_failed_save(ckpt_dir: Path, caplog):
    with pytest.raises(KeyError), CheckpointManager(ckpt_dir) as m:
        _fail_batch(m, 1)
        fut = m.save_checkpoint_async(1, np.ones(3), {}, 0.0)
        ok = m.save_checkpoint_async(2, np.ones(3), {}, 0.0)
        raise KeyError("the user's own error")
    # Leaving the block still waited for (and wrote) what was queued.
    assert fut.done() and ok.done()
    assert m.checkpoint_path(2).is_file()
    assert any("asynchronous save failed" in r.getMessage() for r in caplog.records)


def test_leaving_the_with_block_finishes_pending_saves(ckpt_dir: Path, monkeypatch):
    gate = _Gate(monkeypatch)
    with CheckpointManager(ckpt_dir) as m:
        fut = m.save_checkpoint_async(1, np.ones(10), {}, 0.0)
        assert gate.entered.wait(30)
        gate.opened.set()
    assert fut.done() and m.checkpoint_path(1).is_file()


def test_invalid_arguments_raise_in_the_caller_and_free_the_slot(ckpt_dir: Path):
    with CheckpointManager(ckpt_dir) as m:
        with pytest.raises(CheckpointError):
            m.save_checkpoint_async(-1, np.ones(3), {}, 0.0)
        with pytest.raises(CheckpointError):
            m.save_checkpoint_async(1, np.array(["text"]), {}, 0.0)
        with pytest.raises(CheckpointError):
            m.save_checkpoint_async(1, np.ones(3), {"f": object()}, 0.0)
        with pytest.raises(CheckpointError):
            m.save_checkpoint_async(1, np.ones(3), {}, "not a number")
        # Nothing was queued and the slot is free: the next saves go through.
        assert m.save_checkpoint_async(1, np.ones(3), {}, 0.0).result() == m.checkpoint_path(1)
        assert m.save_checkpoint_async(2, np.ones(3), {}, 0.0).result() == m.checkpoint_path(2)


def test_manager_is_usable_after_close(ckpt_dir: Path):
    m = CheckpointManager(ckpt_dir)
    m.save_checkpoint_async(1, np.ones(3), {}, 0.0)
    m.close()
    assert m.checkpoint_path(1).is_file()
    assert m.save_checkpoint_async(2, np.ones(3), {}, 0.0).result() == m.checkpoint_path(2)
    m.close()


def test_async_and_sync_saves_mix(ckpt_dir: Path):
    with CheckpointManager(ckpt_dir, keep_last_n=None) as m:
        fut = m.save_checkpoint_async(1, np.full(1000, 1.0), {"k": 1}, 1.0)
        m.save_checkpoint(2, np.full(1000, 2.0), {"k": 2}, 2.0)
        fut.result()
    for b in (1, 2):
        data = m.load_checkpoint(m.checkpoint_path(b))
        assert data["optimizer_state"] == {"k": b} and np.all(data["parameters"] == b)


def test_large_state_round_trips(ckpt_dir: Path):
    rng = np.random.default_rng(0)
    params = rng.standard_normal(600_000)  # several MB: the native write path
    smooth = np.cumsum(rng.standard_normal(300_000))  # compressible
    with CheckpointManager(ckpt_dir) as m:
        want_p, want_s = params.copy(), smooth.copy()
        fut = m.save_checkpoint_async(1, params, {"smooth": smooth}, 0.0)
        params[:] = 0
        smooth[:] = 0
        data = m.load_checkpoint(fut.result())
    np.testing.assert_array_equal(data["parameters"], want_p)
    np.testing.assert_array_equal(data["optimizer_state"]["smooth"], want_s)


def test_listing_from_threads_while_saves_commit(ckpt_dir: Path):
    """The catalog is shared by the caller's threads and the background save; every
    listing is a consistent picture and the last one knows every committed file."""
    m = CheckpointManager(ckpt_dir, keep_last_n=3, keep_every=10, durable=False)
    errors: list[BaseException] = []
    done = threading.Event()

    def lister() -> None:
        try:
            while not done.is_set():
                infos = m.list_checkpoints()
                batches = [i.batch_idx for i in infos]
                assert batches == sorted(batches)
                assert all(i.status in ("valid", "unverified") for i in infos)
                m.find_latest_checkpoint()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=lister) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for b in range(1, 41):
            m.save_checkpoint_async(b, np.full(8, float(b)), {"b": b}, 1.0 / b)
        m.wait_until_finished()
    finally:
        done.set()
        for t in threads:
            t.join()
    assert errors == []
    infos = m.list_checkpoints()
    assert [i.batch_idx for i in infos] == [10, 20, 30, 38, 39, 40]
    assert all(i.status == "valid" and i.verified for i in infos)
    assert m.load_latest()["optimizer_state"] == {"b": 40}
