"""``ShardedCheckpointManager``: one checkpoint of an MPI job, one shard per rank."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import struct
import time
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .. import _native
from ..arguments import as_loss, batch_index, resolve_hmac_key
from ..asyncsave import AsyncSaver, snapshot
from ..errors import (
    CheckpointConflictError,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointValueError,
)
from ..limits import LoadLimits
from ..manager import _LISTINGS, CheckpointManager, _changing
from ..options import KEYWORD_DEFAULTS, CheckpointManagerOptions, options_from
from ..payload import Contents, as_parameters
from ..reading import load_verified
from ..retention import set_aside
from ..staging import DirectoryLock
from ..templates import apply_like, check_like
from ..tree import check_value
from . import layout
from .manifest import (
    Manifest,
    StepInfo,
    check_shards,
    list_step_infos,
    read_manifest,
    read_shard,
    shard_mismatch,
    step_info,
    write_file,
    write_manifest,
)
from .protocol import DEFAULT_TIMEOUT, Channel, raise_first_failure
from .resplit import RankLocalHook, Resplit, merge_loaded, old_ranks_of
from .values import (
    REPLICATED,
    ROOTS,
    SHARDED,
    KeyPath,
    Sharded,
    classify,
    describe,
    flatten,
    get_at,
    set_at,
    unflatten,
)

__all__ = ["ShardedCheckpointManager", "load_global"]

logger = logging.getLogger("h5ckpt")

_PathLike = str | os.PathLike[str]


class _Prepared:
    """A rank's checked save arguments: its values in order, ready to classify."""

    def __init__(self, batch_idx: int, loss: float, leaves: list[tuple[KeyPath, Any]]) -> None:
        self.batch_idx = batch_idx
        self.loss = loss
        self.leaves = leaves
        self.described = describe(leaves)


def _loss_key(loss: float) -> bytes:
    return b"nan" if math.isnan(loss) else struct.pack("<d", loss)


def _agreed_batch(reports: list[Any]) -> int:
    """The batch every rank saves, once every rank reported the same batch and loss."""
    batches = sorted({r[0] for r in reports})
    if len(batches) > 1:
        raise CheckpointValueError(
            f"batch_idx differs between ranks: {[r[0] for r in reports]}",
            {"batch_idx": [r[0] for r in reports]},
        )
    if len({r[1] for r in reports}) > 1:
        raise CheckpointValueError(
            "loss differs between ranks; pass the same (reduced) loss on every rank",
            {"batch_idx": batches[0]},
        )
    return batches[0]


def _reasons(reports: list[Any]) -> list[str]:
    """Rank 0's decision on a step's check: every rank's reasons, none when usable."""
    raise_first_failure(reports)
    return [why for rep in reports for why in rep]


class _Commit:
    """One collective save of a :class:`ShardedCheckpointManager`, a method a step.

    Two exchanges. First every rank reports what it saves (:meth:`report`) and rank 0
    plans the step: the kind of every value and a staging directory (:meth:`plan`).
    Then every rank writes its shard into the staging directory (:meth:`write`) and
    rank 0 seals the step: the manifest, then the rename to the step's name
    (:meth:`seal`). A save that fails anywhere leaves no staging directory behind.
    """

    def __init__(self, manager: ShardedCheckpointManager, prepared: _Prepared | CheckpointError):
        self.m = manager
        self.prepared = prepared
        self.decided: dict[str, Any] = {}
        self.staging: layout.StagingDir | None = None  # rank 0's, once planned
        self.committed = False

    def run(self) -> Path:
        """The committed step directory, on every rank (or the same error everywhere)."""
        ch = self.m._ch
        try:
            self.decided = ch.decide(
                self.report, self.plan, "saving a checkpoint (agreeing on the step)"
            )
            return Path(
                ch.decide(self.write, self.seal, "saving a checkpoint (committing the step)")
            )
        finally:
            if self.staging is not None and not self.committed:
                self.staging.discard()

    def _checked(self) -> _Prepared:
        # Past the first exchange: a rank whose arguments were bad raised there.
        assert isinstance(self.prepared, _Prepared)
        return self.prepared

    def report(self) -> Any:
        if isinstance(self.prepared, CheckpointError):
            raise self.prepared
        p = self.prepared
        return (p.batch_idx, _loss_key(p.loss), p.described)

    def plan(self, reports: list[Any]) -> dict[str, Any]:
        raise_first_failure(reports)
        batch = _agreed_batch(reports)
        if self.m.on_older_batch == "raise":
            self.m._refuse_older(batch)
        values = classify([r[2] for r in reports])
        self.staging = layout.StagingDir(
            self.m.checkpoint_dir, layout.step_name(self.m.prefix, batch)
        )
        return {"values": values, "staging": str(self.staging.path), "timestamp": time.time()}

    def write(self) -> tuple[int, bytes]:
        p, m = self._checked(), self.m
        tree = unflatten(self._stored_leaves(p))
        contents = Contents(
            batch_idx=p.batch_idx,
            loss=p.loss,
            timestamp=self.decided["timestamp"],
            parameters=tree["parameters"],
            optimizer_state=tree["optimizer_state"],
            metadata=tree["metadata"],
        )
        header, size = write_file(
            Path(self.decided["staging"]) / layout.shard_name(m.rank, m.world_size),
            contents,
            compression=m.compression,
            allow_pickle=m.allow_pickle,
            hmac_key=m._hmac_key,
            durable=m.durable,
            file_mode=m.file_mode,
        )
        return size, bytes(header.payload_digest)

    def _stored_leaves(self, p: _Prepared) -> list[tuple[KeyPath, Any]]:
        """This rank's values as its shard stores them."""
        replicated = {tuple(v["path"]) for v in self.decided["values"] if v["kind"] == REPLICATED}
        leaves = []
        for path, v in p.leaves:
            if isinstance(v, Sharded):
                v = v.block
            elif self.m.rank != 0 and path in replicated:
                v = _placeholder(path, v)  # stored once, in rank 0's shard
            leaves.append((path, v))
        return leaves

    def seal(self, reports: list[Any]) -> str:
        raise_first_failure(reports)
        p, m, staging = self._checked(), self.m, self.staging
        assert staging is not None  # planned on this rank, rank 0
        world = m.world_size
        manifest = Manifest(
            p.batch_idx,
            p.loss,
            self.decided["timestamp"],
            _native.__version__,
            world,
            [
                {"name": layout.shard_name(r, world), "size": s, "payload_digest": d}
                for r, (s, d) in enumerate(reports)
            ],
            self.decided["values"],
        )
        write_manifest(
            staging.path, manifest, hmac_key=m._hmac_key, durable=m.durable, file_mode=m.file_mode
        )
        with m._lock.held():
            # Again under the lock: another job may have saved meanwhile.
            m._make_room(p.batch_idx)
            staging.commit(m.durable)
            self.committed = True
        m._remember(staging.final, manifest)
        return str(staging.final)


class ShardedCheckpointManager:
    """Checkpoints of an MPI job: every rank saves its own state, committed as one.

    A checkpoint is the directory ``{prefix}_batch_{batch_idx:04d}/`` with one
    ordinary h5ckpt file per rank (``shard_{rank:05d}_of_{world:05d}.h5``) and
    ``manifest.h5``. It exists under that name only once every rank's shard was
    written, fsynced and reported with its digest; restoring checks the manifest and
    every shard's digest, skipping incomplete or corrupt steps.

    Construction and the methods marked *collective* must be called by every rank of
    ``comm`` in the same order. ``list_checkpoints`` and ``validate_checkpoint`` use
    no communication.

    Each manager holds a duplicate of ``comm`` until MPI is finalized (see
    :meth:`close`), and an MPI library has a few thousand of them (MPICH: about
    2000): make one manager for a job, not one per step.

    Parameters
    ----------
    checkpoint_dir : str or Path
        Directory of the steps (on a file system every rank sees).
    comm : mpi4py.MPI.Comm, optional
        The ranks that save together; ``MPI.COMM_WORLD`` by default. The manager talks
        on a duplicate of it, never matching the caller's own messages.
    checkpoint_frequency, keep_last_n, enable_compression, prefix, allow_pickle, \
hmac_key, durable, keep_every, keep_best_n, best_mode, delete_invalid, auto_cleanup, \
compression, load_limits, on_older_batch, file_mode, options
        As for :class:`h5ckpt.CheckpointManager`; retention counts complete steps, and
        a save below the newest complete step is refused (``"raise"``) or first moves
        the newer steps into ``abandoned-<UTC time>-<token>/`` (``"set_aside"``, and
        see :meth:`set_aside_newer_than`). ``file_mode`` is the permission bits of
        every shard and manifest file (a step directory is made as any directory).
    read_only : bool, default False
        A reader: the directory must exist, and nothing is created, swept or locked,
        so read access is all the ranks need; ``load_latest``,
        ``find_latest_checkpoint`` and the single-process views work, and saves,
        retention and setting aside raise ``CheckpointError`` on every rank before
        any exchange. Every rank must pass the same value (a mismatch is refused at
        construction).
    timeout : float, default 1800
        Seconds a rank waits for the others at any step of a save or restore before
        raising :class:`~h5ckpt.mpi.CheckpointTimeoutError`.
    """

    def __init__(
        self,
        checkpoint_dir: _PathLike,
        comm: Any = None,
        checkpoint_frequency: int = 10,
        keep_last_n: int | None = 3,
        enable_compression: bool = True,
        *,
        prefix: str = "checkpoint",
        allow_pickle: bool = False,
        hmac_key: bytes | None = None,
        durable: bool = True,
        keep_every: int | None = None,
        keep_best_n: int = 0,
        best_mode: str = "min",
        delete_invalid: bool = False,
        auto_cleanup: bool = True,
        compression: str | None = "default",
        load_limits: LoadLimits | None = None,
        on_older_batch: str = "raise",
        read_only: bool = False,
        file_mode: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        options: CheckpointManagerOptions | None = None,
    ) -> None:
        # Taken before any other local exists: the settings, by name.
        keywords = {k: v for k, v in locals().items() if k in KEYWORD_DEFAULTS}
        from mpi4py import MPI

        if comm is None:
            comm = MPI.COMM_WORLD
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise CheckpointValueError(
                f"timeout must be a positive number of seconds, got {timeout!r}", {}
            )
        self._threads_ok = MPI.Query_thread() == MPI.THREAD_MULTIPLE
        self._ch = Channel(comm, timeout)
        self.rank = self._ch.rank
        self.world_size = self._ch.size
        self.timeout = float(timeout)

        def build() -> bool:
            # The single-file manager checks every shared setting in one place; it
            # never cleans up by itself (retention here counts complete steps).
            self.options = options_from(options, keywords)
            single = dataclasses.replace(self.options, auto_cleanup=False)
            self._single = CheckpointManager(checkpoint_dir, options=single)
            return self._single.read_only

        def settle(reports: list[Any]) -> None:
            raise_first_failure(reports)
            if len(set(reports)) > 1:
                # A reader refuses saves without asking the others, who would wait.
                raise CheckpointValueError(
                    f"read_only differs between ranks: {reports}", {"read_only": reports}
                )
            if not reports[0]:
                with self._lock.held():
                    layout.sweep_hidden(self._single.checkpoint_dir, self._single.prefix)

        self._lock = DirectoryLock(Path(checkpoint_dir))
        self._ch.decide(build, settle, "creating the sharded checkpoint manager")
        s = self._single
        self.auto_cleanup = self.options.auto_cleanup
        self.checkpoint_dir = s.checkpoint_dir
        self.checkpoint_frequency = s.checkpoint_frequency
        self.keep_last_n = s.keep_last_n
        self.keep_every = s.keep_every
        self.keep_best_n = s.keep_best_n
        self.best_mode = s.best_mode
        self.prefix = s.prefix
        self.compression = s.compression
        self.allow_pickle = s.allow_pickle
        self.durable = s.durable
        self.delete_invalid = s.delete_invalid
        self.load_limits = s.load_limits
        self.on_older_batch = s.on_older_batch
        self.file_mode = s.file_mode
        self._hmac_key = s._hmac_key
        self._known: dict[str, tuple[Any, StepInfo]] = {}
        # Without THREAD_MULTIPLE only this thread may talk MPI: saves run in it.
        self._saver = AsyncSaver("h5ckpt-mpi-save", threaded=self._threads_ok)

    @property
    def read_only(self) -> bool:
        """Whether this manager only reads (fixed when made: it decides what
        construction creates and sweeps)."""
        return self._single.read_only

    # -- naming ---------------------------------------------------------------------

    def checkpoint_path(self, batch_idx: int) -> Path:
        """The step directory a checkpoint of ``batch_idx`` is saved as."""
        return self.checkpoint_dir / layout.step_name(self.prefix, batch_index(batch_idx))

    def should_save(self, batch_idx: int) -> bool:
        """Whether ``batch_idx`` is a batch to checkpoint (every ``checkpoint_frequency``)."""
        return self._single.should_save(batch_idx)

    # -- saving ---------------------------------------------------------------------

    def save_checkpoint(
        self,
        batch_idx: int,
        parameters: Any,
        optimizer_state: Any,
        loss: float,
        metadata: dict[str, Any] | None = None,
    ) -> Path:
        """Save this rank's state as its shard of one step; collective.

        ``parameters``, values of ``optimizer_state`` and ``metadata`` dicts may be
        :class:`Sharded`. ``batch_idx`` and ``loss`` must be the same on every rank.

        Returns
        -------
        Path
            The committed step directory, on every rank.

        Raises
        ------
        CheckpointError
            The same error on every rank when any rank fails, or when the manager is
            ``read_only``; nothing is committed.
        """
        self._single._refuse_if_read_only("save a checkpoint")
        self._drain()
        prepared = self._prepare(batch_idx, parameters, optimizer_state, loss, metadata, False)
        return self._commit(prepared)

    def save_checkpoint_async(
        self,
        batch_idx: int,
        parameters: Any,
        optimizer_state: Any,
        loss: float,
        metadata: dict[str, Any] | None = None,
    ) -> Future[Path]:
        """Snapshot the state now and commit it in the background; collective.

        The same protocol as :meth:`save_checkpoint` runs in a background thread (it
        needs ``MPI.THREAD_MULTIPLE``; otherwise the save runs before this returns).
        One save is in flight at a time; every other collective method waits for it.

        Returns
        -------
        concurrent.futures.Future
            Its result is the step directory; :meth:`wait_until_finished` raises the
            first error of the pending saves.
        """
        self._single._refuse_if_read_only("save a checkpoint")
        if not self._threads_ok:
            logger.warning("MPI is not initialised with THREAD_MULTIPLE: saving synchronously")

        def prepare() -> Callable[[], Path]:
            # Called once the previous save is done: one snapshot in memory at a time.
            # Errors are not raised here but agreed on in the commit, on every rank.
            prepared = self._prepare(batch_idx, parameters, optimizer_state, loss, metadata, True)
            return lambda: self._commit(prepared)

        return self._saver.submit(prepare)

    def wait_until_finished(self) -> None:
        """Wait for the background saves; raise the first error among them."""
        self._saver.wait_until_finished()

    def _drain(self) -> None:
        """Wait for the background save before a collective call (their exchanges must
        not interleave); its outcome stays for wait_until_finished."""
        self._saver.wait_for_queued()

    def _prepare(
        self,
        batch_idx: Any,
        parameters: Any,
        optimizer_state: Any,
        loss: Any,
        metadata: Any,
        copy: bool,
    ) -> _Prepared | CheckpointError:
        """The checked arguments, or the error to report to the other ranks."""
        try:
            batch = batch_index(batch_idx)
            loss_value = as_loss(loss)
            if isinstance(parameters, Sharded):
                parameters = Sharded(as_parameters(parameters.block), parameters.axis)
            else:
                parameters = as_parameters(parameters)
            state = {
                "parameters": parameters,
                "optimizer_state": optimizer_state,
                "metadata": {} if metadata is None else metadata,
            }
            leaves = flatten(state)
            plain = unflatten([(p, v.block if isinstance(v, Sharded) else v) for p, v in leaves])
            for root in ("optimizer_state", "metadata"):
                check_value(plain[root], allow_pickle=self.allow_pickle, path=root)
            if copy:
                leaves = [
                    (p, Sharded(v.block.copy(), v.axis) if isinstance(v, Sharded) else snapshot(v))
                    for p, v in leaves
                ]
            return _Prepared(batch, loss_value, leaves)
        except CheckpointError as exc:
            return exc
        except Exception as exc:
            return CheckpointValueError(f"cannot save this state: {exc}", {})

    def _commit(self, prepared: _Prepared | CheckpointError) -> Path:
        started = time.perf_counter()
        final = _Commit(self, prepared).run()
        assert isinstance(prepared, _Prepared)  # an error was raised on every rank
        if self.rank == 0:
            logger.info(
                "sharded checkpoint saved: batch=%d loss=%.6g step=%s (%d ranks) in %.3fs",
                prepared.batch_idx,
                prepared.loss,
                final.name,
                self.world_size,
                time.perf_counter() - started,
            )
            if self.auto_cleanup:
                try:
                    self._cleanup_root()
                except CheckpointError as exc:
                    logger.warning("retention after saving %s failed: %s", final.name, exc)
        return final

    def _make_room(self, batch_idx: int) -> None:
        """Under the lock, just before a step of ``batch_idx`` is committed: refuse or
        set aside the steps of higher batches, by ``on_older_batch``."""
        if self.on_older_batch == "raise":
            self._refuse_older(batch_idx)
        else:
            self._set_aside_locked(batch_idx)

    def _set_aside_locked(self, batch_idx: int) -> Path | None:
        return set_aside(
            self.checkpoint_dir,
            self._newer_steps(batch_idx),
            batch_idx,
            lambda path: self._known.pop(path.name, None),
        )

    def set_aside_newer_than(self, batch_idx: int) -> Path | None:
        """Move every step of a batch above ``batch_idx`` into a subdirectory; collective.

        For a deliberate rollback (resume from ``batch_idx``) or, with ``-1``, a fresh
        start in a used directory. Rank 0 moves the step directories unchanged, newest
        first, complete or not, into a new ``abandoned-<UTC time>-<token>/`` of the
        checkpoint directory, which no manager lists, loads or deletes, and fsyncs
        both directories. Asynchronous saves queued before this call commit first.

        Parameters
        ----------
        batch_idx : int
            The batch the run goes on from, the same on every rank; ``-1`` sets every
            step aside.

        Returns
        -------
        Path or None
            The subdirectory, or None when no step was above ``batch_idx``; the same
            on every rank.

        Raises
        ------
        CheckpointError
            The same on every rank: ``batch_idx`` is not a batch index or differs
            between ranks, the manager is ``read_only``, or a step could not be moved
            (those moved before stay moved).
        """
        self._single._refuse_if_read_only("set checkpoints aside")
        self._drain()
        aside = self._ch.decide(
            partial(_rollback_batch, batch_idx), self._set_aside_agreed, "setting steps aside"
        )
        return None if aside is None else Path(aside)

    def _set_aside_agreed(self, reports: list[Any]) -> str | None:
        raise_first_failure(reports)
        if len(set(reports)) > 1:
            raise CheckpointValueError(
                f"batch_idx differs between ranks: {reports}", {"batch_idx": reports}
            )
        with self._lock.held():
            aside = self._set_aside_locked(reports[0])
        return None if aside is None else str(aside)

    def _remember(self, final: Path, manifest: Manifest) -> None:
        """A step this manager just committed is complete: retention need not hash it."""
        self._known[final.name] = (
            _identity(final),
            StepInfo(
                final,
                manifest.batch_idx,
                manifest.loss,
                manifest.timestamp,
                manifest.world_size,
                _tree_bytes(final),
                "complete",
            ),
        )

    def _newer_steps(self, batch_idx: int) -> list[Path]:
        return [p for b, p in layout.list_steps(self.checkpoint_dir, self.prefix) if b > batch_idx]

    def _refuse_older(self, batch_idx: int) -> None:
        """As :class:`~h5ckpt.CheckpointManager` does: a save below the newest complete
        step is a restart or rollback in a used directory (rank 0 decides)."""
        newer = self._newer_steps(batch_idx)
        newest = next((p for p in reversed(newer) if self._step_status(p).is_valid), None)
        if newest is None:
            return
        names = [p.name for p in newer]
        raise CheckpointConflictError(
            f"refusing to save batch {batch_idx} in {self.checkpoint_dir}: it holds steps of "
            f"higher batches ({', '.join(names[-5:])}; the newest complete is {newest.name}), "
            "which a resume would pick instead of this run and whose presence would make "
            'retention delete the new saves. Pass on_older_batch="set_aside" to '
            "ShardedCheckpointManager to move them into a subdirectory first.",
            {"batch_idx": batch_idx, "newest_valid": str(newest), "newer": names},
        )

    # -- restoring --------------------------------------------------------------------

    def find_latest_checkpoint(self) -> Path | None:
        """The newest complete step (manifest and every shard verified); collective.

        Returns
        -------
        Path or None
            The same step directory on every rank, or None.
        """
        self._drain()
        return self._restore(None, None)

    def load_latest(
        self, rank_local: RankLocalHook | None = None, *, like: dict[str, Any] | None = None
    ) -> dict[str, Any] | None:
        """Load this rank's state from the newest complete step; collective.

        With the world size of the save, each rank gets exactly its own shard back
        (replicated values filled in from rank 0's). With another world size,
        ``Sharded`` values are split again in rank order (``np.array_split`` of the
        global array) and replicated values are given to every rank; rank-local
        values then need ``rank_local(key_path, values_of_old_ranks, new_rank,
        new_world_size)``, which returns this rank's value (``values_of_old_ranks``
        has None for old ranks without that value); without it a
        ``CheckpointValueError`` names them, on every rank.

        ``like`` takes templates as :meth:`h5ckpt.CheckpointManager.load_checkpoint`
        does; each rank applies its own after the collective load, so a template
        that does not match raises on that rank alone.

        Returns
        -------
        dict or None
            As :meth:`h5ckpt.CheckpointManager.load_checkpoint` (``parameters`` and
            values are this rank's), or None on a fresh start.
        """
        self._drain()
        loaded = self._restore("load", rank_local)
        like = check_like(like)
        return None if loaded is None else apply_like(loaded, like)

    def _restore(self, mode: str | None, hook: RankLocalHook | None) -> Any:
        listing = self._ch.decide(
            lambda: None, self._list_for_restore, "restoring (listing the steps)"
        )
        # As for single files: another job's retention may delete every step listed
        # before it is checked, so None needs a second listing that is the same.
        for _ in range(_LISTINGS):
            names, first = listing
            found, result, skipped = self._restore_from(names, first, mode, hook)
            if found:
                return result
            again = self._ch.decide(
                lambda: None, self._list_for_restore, "restoring (listing the steps again)"
            )
            if again[0] == listing[0]:
                self._warn_skipped(skipped)
                return None
            listing = again
        raise _changing(self.checkpoint_dir, f"{_LISTINGS} listings")

    def _restore_from(
        self,
        names: list[tuple[int, str]],
        first: Manifest | str,
        mode: str | None,
        hook: RankLocalHook | None,
    ) -> tuple[bool, Any, list[str]]:
        """The newest step of ``names`` restored (``first``: the newest one's manifest,
        or why it has none): whether one was, what it gave, and why the newer ones
        were skipped."""
        skipped: list[str] = []
        for index, (batch, name) in enumerate(names):
            step = self.checkpoint_dir / name
            manifest = first if index == 0 else self._agreed_manifest(step, batch)
            if isinstance(manifest, str):
                skipped.append(manifest)
                continue
            same = mode == "load" and manifest.world_size == self.world_size
            loaded: dict[str, Any] = {}
            bad = self._ch.decide(
                partial(self._check_step, step, manifest, same, loaded),
                _reasons,
                "restoring (checking the shards)",
            )
            if bad:
                skipped.append(f"{step}: " + "; ".join(bad))
                continue
            self._warn_skipped(skipped)
            if mode is None:
                if self.rank == 0:
                    logger.info("latest complete sharded checkpoint: %s", name)
                return True, step, skipped
            if same:
                return True, self._fill_replicated(manifest, loaded), skipped
            return True, self._resplit(step, manifest, hook), skipped
        return False, None, skipped

    def _manifest_of(self, step: Path, batch: int) -> Manifest | str:
        """The step's manifest, or why it has none that can be used."""
        try:
            return read_manifest(step, self._hmac_key, batch)
        except CheckpointError as exc:
            return str(exc)

    def _list_for_restore(
        self, _: list[Any]
    ) -> tuple[list[tuple[int, str]], Manifest | str | None]:
        """Rank 0's decision: the steps, newest first, and the newest one's manifest."""
        steps = layout.list_steps(self.checkpoint_dir, self.prefix)[::-1]
        # The newest manifest comes with the listing: one exchange fewer on a resume.
        first = self._manifest_of(steps[0][1], steps[0][0]) if steps else None
        return [(b, p.name) for b, p in steps], first

    def _agreed_manifest(self, step: Path, batch: int) -> Manifest | str:
        """Rank 0 reads the manifest of an older step; every rank gets what it read."""
        return self._ch.decide(
            lambda: None,
            lambda _: self._manifest_of(step, batch),
            "restoring (reading a manifest)",
        )

    def _check_step(
        self, step: Path, manifest: Manifest, same: bool, loaded: dict[str, Any]
    ) -> list[str]:
        """This rank's part of checking a step: why it cannot be restored (none: it can).

        With the world size of the save each rank loads (into ``loaded``) and checks
        its own shard; otherwise the ranks share out hashing the old shards.
        """
        if not same:
            mine = old_ranks_of(self.rank, self.world_size, manifest.world_size)
            return check_shards(step, manifest, mine, self._hmac_key)
        try:
            header, result = load_verified(
                step / manifest.shards[self.rank]["name"],
                self._hmac_key,
                self.allow_pickle,
                self.load_limits,
            )
        except (CheckpointCorruptError, CheckpointNotFoundError) as exc:
            return [str(exc)]
        why = shard_mismatch(step, manifest, self.rank, header)
        if why is not None:
            return [why]
        loaded.update(result)
        return []

    def _warn_skipped(self, skipped: list[str]) -> None:
        if skipped and self.rank == 0:
            logger.warning(
                "skipped %d incomplete or corrupt step(s): %s", len(skipped), " | ".join(skipped)
            )

    def _fill_replicated(self, manifest: Manifest, loaded: dict[str, Any]) -> dict[str, Any]:
        paths = [v["path"] for v in manifest.of_kind(REPLICATED)]
        tree = {k: loaded[k] for k in ROOTS}
        if paths and self.world_size > 1:
            values = self._ch.bcast(
                [get_at(tree, p) for p in paths] if self.rank == 0 else None,
                "restoring (replicated values from rank 0)",
            )
            if self.rank != 0:
                for p, v in zip(paths, values, strict=True):
                    set_at(tree, p, v)
        return _result(manifest, tree)

    def _resplit(
        self, step: Path, manifest: Manifest, hook: RankLocalHook | None
    ) -> dict[str, Any]:
        read = partial(
            read_shard,
            step,
            manifest,
            hmac_key=self._hmac_key,
            allow_pickle=self.allow_pickle,
            limits=self.load_limits,
        )
        job = Resplit(step, manifest, self.rank, self.world_size, read, hook)
        shared = self._ch.decide(
            job.load, merge_loaded, "restoring (reading shards for the new world size)"
        )
        tree: dict[str, Any] = {}
        self._ch.decide(
            lambda: tree.update(job.build(shared)),
            raise_first_failure,
            "restoring (mapping rank-local values)",
        )
        return _result(manifest, tree)

    # -- single-process views ----------------------------------------------------------

    def list_checkpoints(self, verify: bool = False) -> list[StepInfo]:
        """Every step directory of this manager by batch index (no communication).

        Parameters
        ----------
        verify : bool, default False
            Hash every shard, not only the manifest.
        """
        return list_step_infos(self.checkpoint_dir, self.prefix, self._hmac_key, verify)

    def validate_checkpoint(self, checkpoint_path: _PathLike) -> bool:
        """Whether a step directory is complete and intact (no communication). Never raises."""
        try:
            return step_info(Path(checkpoint_path), self._hmac_key, True).is_valid
        except Exception as exc:  # the contract: False for any reason
            logger.debug("validation failed for %s: %s", checkpoint_path, exc)
            return False

    # -- retention ------------------------------------------------------------------

    def cleanup_old_checkpoints(self) -> list[Path]:
        """Apply the retention policy now (rank 0 deletes); collective.

        Only complete steps count; the newest complete step is never deleted; a step
        is renamed to a hidden name before its files are removed; incomplete or
        invalid steps are kept unless ``delete_invalid``.

        Returns
        -------
        list of Path
            The deleted step directories, on every rank.
        """
        self._single._refuse_if_read_only("delete checkpoints")
        self._drain()
        deleted = self._ch.decide(
            lambda: None,
            lambda _: [str(p) for p in self._cleanup_root()],
            "applying retention",
        )
        return [Path(p) for p in deleted]

    def _step_status(self, step: Path) -> StepInfo:
        ident = _identity(step)
        known = self._known.get(step.name)
        if known is not None and known[0] == ident:
            return known[1]
        info = step_info(step, self._hmac_key, True)
        self._known[step.name] = (ident, info)
        return info

    def _cleanup_root(self) -> list[Path]:
        with self._lock.held():
            layout.sweep_hidden(self.checkpoint_dir, self.prefix)
            steps = layout.list_steps(self.checkpoint_dir, self.prefix)
            infos = [self._step_status(p) for _, p in steps]
            doomed = _native.plan_retention(
                [(i.batch_idx, i.is_valid, i.loss) for i in infos],
                self.keep_last_n,
                self.keep_every,
                self.keep_best_n,
                self.best_mode == "max",
                self.delete_invalid,
            )
            deleted = []
            for index in doomed:
                path = infos[index].path
                try:
                    layout.retire_step(path, self.durable)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    logger.warning("cannot delete old step %s: %s", path, exc)
                    continue
                self._known.pop(path.name, None)
                deleted.append(path)
            kept_bad = [i.path.name for i in infos if not i.is_valid and i.path not in deleted]
            if kept_bad:
                logger.warning("keeping incomplete or invalid step(s): %s", ", ".join(kept_bad))
        return deleted

    # -- lifetime -------------------------------------------------------------------

    def close(self) -> None:
        """Finish the background save and release the thread.

        Not collective: the duplicated communicator stays until MPI is finalized.
        """
        try:
            self.wait_until_finished()
        finally:
            self._saver.shutdown()
        # The duplicate of comm is not freed here. MPI_Comm_free is collective in the
        # standard (an implementation may make it wait for every rank), and close is
        # not: __exit__ calls it on a rank whose block raised while the others go on,
        # and ranks close at different points of their code, where freeing would
        # join the order of collective calls the program must keep. MPICH and Open
        # MPI do free it locally, but nothing promises that; the cost of keeping it
        # is one communicator a manager, released by MPI_Finalize.

    def __enter__(self) -> ShardedCheckpointManager:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            try:
                self.close()
            except CheckpointError as save_error:
                logger.error("a background save failed: %s", save_error)

    def __repr__(self) -> str:
        return (
            f"ShardedCheckpointManager({str(self.checkpoint_dir)!r}, rank={self.rank}, "
            f"world_size={self.world_size}, prefix={self.prefix!r})"
        )


def _rollback_batch(batch_idx: Any) -> int:
    """``set_aside_newer_than``'s argument: a batch index, or -1 for all."""
    return -1 if isinstance(batch_idx, int) and batch_idx == -1 else batch_index(batch_idx)


def _placeholder(path: KeyPath, value: Any) -> Any:
    if path == ("parameters",):
        return np.empty(0, dtype=value.dtype)
    return None


def _result(manifest: Manifest, tree: dict[str, Any]) -> dict[str, Any]:
    return {
        "batch_idx": manifest.batch_idx,
        "parameters": tree["parameters"],
        "optimizer_state": tree["optimizer_state"],
        "loss": manifest.loss,
        "metadata": tree["metadata"],
        "version": manifest.version,
        "timestamp": manifest.timestamp,
    }


def _identity(step: Path) -> Any:
    """Everything that changes when a file of the step is replaced, added or removed."""
    out = []
    try:
        for entry in sorted(os.scandir(step), key=lambda e: e.name):
            st = entry.stat(follow_symlinks=False)
            out.append((entry.name, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        st = os.stat(step)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, tuple(out))


def _tree_bytes(step: Path) -> int:
    ident = _identity(step)
    return sum(e[2] for e in ident[2]) if ident else 0


def load_global(
    checkpoint_path: _PathLike,
    *,
    hmac_key: bytes | None = None,
    allow_pickle: bool = False,
    load_limits: LoadLimits | None = None,
) -> dict[str, Any]:
    """A whole step as one state, on one process (no MPI needed).

    ``Sharded`` values are assembled into global arrays, replicated values appear
    once, rank-local values as a list with one entry per rank (None for ranks
    without it). Every shard is verified first.

    Returns
    -------
    dict
        ``batch_idx``, ``parameters``, ``optimizer_state``, ``loss``, ``metadata``,
        ``version``, ``timestamp`` and ``world_size``.
    """
    step = Path(checkpoint_path)
    key = resolve_hmac_key(hmac_key)
    limits = load_limits if load_limits is not None else LoadLimits()
    named = layout.is_step_dir(step)
    manifest = read_manifest(step, key, named[1] if named else None)
    trees = []
    for r, entry in enumerate(manifest.shards):
        try:
            trees.append(read_shard(step, manifest, r, key, allow_pickle, limits))
        except CheckpointNotFoundError as exc:
            raise CheckpointNotFoundError(
                f"{step}: shard {entry['name']} is missing (an incomplete step)", exc.error_context
            ) from exc
    leaves: list[tuple[KeyPath, Any]] = []
    for v in manifest.values:
        p = v["path"]
        if v["kind"] == SHARDED:
            blocks = [get_at(t, p) for t in trees]
            leaves.append((p, np.concatenate(blocks, axis=v["axis"])))
        elif v["kind"] == REPLICATED:
            leaves.append((p, get_at(trees[0], p)))
        else:
            leaves.append(
                (p, [get_at(t, p) if r in v["ranks"] else None for r, t in enumerate(trees)])
            )
    result = _result(manifest, unflatten(leaves))
    result["world_size"] = manifest.world_size
    return result
