"""``CheckpointManager``: save, verify, find, load and prune checkpoints of one run."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import numbers
import os
import secrets
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from pathlib import Path
from typing import Any

import numpy as np

from . import _native
from .codec import resolve as resolve_compression
from .errors import (
    CheckpointAuthenticationError,
    CheckpointConflictError,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointValueError,
)
from .legacy import load_legacy, validate_legacy
from .limits import LoadLimits
from .payload import WritebackFile, as_parameters, read_payload, write_payload
from .reclaim import Reclaimer
from .staging import DirectoryLock, StagedFile, oserror_to_checkpoint, sweep_temp_files
from .tree import check_value
from .verification import INVALID, CheckpointInfo, Verifier, stat_identity

__all__ = ["CheckpointManager"]

logger = logging.getLogger("h5ckpt")

HMAC_KEY_ENV = "H5CKPT_HMAC_KEY"
#: What a save below the newest valid checkpoint of the directory does.
ON_OLDER_BATCH = ("raise", "set_aside")
#: Newer checkpoints set aside go to ``checkpoint_dir / f"{ABANDONED}-<UTC time>-<token>"``.
ABANDONED = "abandoned"
_PathLike = str | os.PathLike[str]


def _positive_int(name: str, value: object, *, minimum: int, allow_none: bool = False) -> Any:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise CheckpointValueError(
            f"{name} must be an integer >= {minimum}"
            + (" or None" if allow_none else "")
            + f", got {value!r}",
            {name: repr(value)},
        )
    return int(value)


class CheckpointManager:
    """Save and restore the state of a long, batch-by-batch optimization.

    Each checkpoint is one HDF5 file ``{prefix}_batch_{batch_idx:04d}.h5`` in
    ``checkpoint_dir``, written to a temp file, sealed with a SHA-256 tree digest of
    every byte (and an HMAC tag when a key is given), fsynced and renamed into place:
    a crash at any moment leaves the previous checkpoints and either no new file or
    the complete new one.

    Parameters
    ----------
    checkpoint_dir : str or Path
        Directory of the checkpoints; created if missing.
    checkpoint_frequency : int, default 10
        ``should_save(batch_idx)`` is true every this many batches.
    keep_last_n : int or None, default 3
        How many of the newest *valid* checkpoints retention keeps; ``None`` keeps all.
    enable_compression : bool, default True
        Compress arrays that compress well (byte shuffle + LZ4); others stay raw.
    prefix : str, default "checkpoint"
        File name prefix. Use ``"homodyne_state"`` for a directory of the
        predecessor's files.
    allow_pickle : bool, default False
        Store values that have no native HDF5 form by pickling them, and load
        pickled values (including legacy files' optimizer state). Unpickling can run
        code: only enable it for files you trust.
    hmac_key : bytes, optional
        Sign saves with HMAC-SHA256 and refuse files without a matching tag. Defaults
        to the UTF-8 bytes of the environment variable ``H5CKPT_HMAC_KEY``, if set.
    durable : bool, default True
        fsync the file and its directory on every save. ``False`` is faster but a
        power loss may lose recent checkpoints (never corrupt them undetected).
    keep_every : int, optional
        Also keep, for good, valid checkpoints whose ``batch_idx % keep_every == 0``.
    keep_best_n : int, default 0
        Also keep the ``keep_best_n`` valid checkpoints with the best loss.
    best_mode : {"min", "max"}, default "min"
        Whether the best loss is the lowest or the highest. NaN is never best.
    delete_invalid : bool, default False
        Let retention delete invalid files under this manager's names (they are
        otherwise kept and reported).
    auto_cleanup : bool, default True
        Apply retention after every committed save.
    compression : {"auto", "lz4", "zstd", "gzip", None}, optional
        Overrides ``enable_compression``: a codec for every array of 64 KiB or more,
        ``"auto"`` (compress what samples show to be compressible), or ``None`` (raw).
    load_limits : LoadLimits, optional
        Bounds on what loading a verified file may allocate.
    on_older_batch : {"raise", "set_aside"}, default "raise"
        What a save does when the directory holds a valid checkpoint of a *higher*
        batch (a fresh start or a rollback in a used directory; retention would
        delete the new saves and a resume would pick the abandoned run).
        ``"raise"`` refuses it with :class:`CheckpointConflictError`, writing and
        deleting nothing; saving the same batch again is always allowed.
        ``"set_aside"`` first moves every checkpoint of a higher batch into a new
        subdirectory ``abandoned-<UTC time>-<token>/`` (logged as a warning; never
        listed, loaded or deleted by a manager), then commits. See also
        :meth:`set_aside_newer_than`.

    Examples
    --------
    >>> m = CheckpointManager("ckpt", checkpoint_frequency=10, keep_last_n=3)
    >>> state = m.load_latest()  # None on a fresh start
    >>> if m.should_save(batch):
    ...     m.save_checkpoint(batch, params, {"step": 42}, loss)
    """

    def __init__(
        self,
        checkpoint_dir: _PathLike,
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
    ) -> None:
        if not isinstance(checkpoint_dir, (str, os.PathLike)):
            raise CheckpointValueError(
                f"checkpoint_dir must be a str or Path, got {type(checkpoint_dir).__name__}",
                {"checkpoint_dir": repr(checkpoint_dir)},
            )
        self.checkpoint_dir = Path(checkpoint_dir)
        self.checkpoint_frequency = _positive_int(
            "checkpoint_frequency", checkpoint_frequency, minimum=1
        )
        self.keep_last_n = _positive_int("keep_last_n", keep_last_n, minimum=1, allow_none=True)
        self.keep_every = _positive_int("keep_every", keep_every, minimum=1, allow_none=True)
        self.keep_best_n = _positive_int("keep_best_n", keep_best_n, minimum=0)
        if best_mode not in ("min", "max"):
            raise CheckpointValueError(
                f"best_mode must be 'min' or 'max', got {best_mode!r}", {"best_mode": best_mode}
            )
        self.best_mode = best_mode
        if not isinstance(on_older_batch, str) or on_older_batch not in ON_OLDER_BATCH:
            raise CheckpointValueError(
                f"on_older_batch must be 'raise' or 'set_aside', got {on_older_batch!r}",
                {"on_older_batch": repr(on_older_batch)},
            )
        self.on_older_batch = on_older_batch
        # A retention failure after a committed save, for the next explicit cleanup.
        self._retention_failure: CheckpointError | None = None
        # The last asynchronous save submitted: the executor runs them in order.
        self._last_async: Future[Path] | None = None
        self._save_thread: int | None = None
        if not isinstance(prefix, str) or not prefix or "/" in prefix or "\x00" in prefix:
            raise CheckpointValueError(
                f"prefix must be a non-empty file name part without '/', got {prefix!r}",
                {"prefix": repr(prefix)},
            )
        self.prefix = prefix
        self.enable_compression = bool(enable_compression)
        self.compression = resolve_compression(self.enable_compression, compression)
        self.allow_pickle = bool(allow_pickle)
        self.durable = bool(durable)
        self.delete_invalid = bool(delete_invalid)
        self.auto_cleanup = bool(auto_cleanup)
        self.load_limits = load_limits if load_limits is not None else LoadLimits()
        self._hmac_key = _resolve_key(hmac_key)

        try:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise oserror_to_checkpoint(
                exc, "create the checkpoint directory", checkpoint_dir
            ) from exc
        if not self.checkpoint_dir.is_dir():
            raise CheckpointValueError(
                f"checkpoint_dir {self.checkpoint_dir} is not a directory",
                {"checkpoint_dir": str(self.checkpoint_dir)},
            )
        self._verifier = Verifier(self.checkpoint_dir, self.prefix, self._hmac_key)
        self._lock = DirectoryLock(self.checkpoint_dir)
        self._async_lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[Future[Path]] = []
        self._slots = threading.BoundedSemaphore(1)
        self._reclaimer = Reclaimer()
        if os.access(self.checkpoint_dir, os.W_OK):
            with self._lock.held():
                sweep_temp_files(self.checkpoint_dir, self.prefix)
        logger.debug(
            "CheckpointManager(dir=%s, frequency=%d, keep_last_n=%s, compression=%s)",
            self.checkpoint_dir,
            self.checkpoint_frequency,
            self.keep_last_n,
            self.compression,
        )

    # -- naming ---------------------------------------------------------------------

    def checkpoint_path(self, batch_idx: int) -> Path:
        """The file name a checkpoint of ``batch_idx`` is saved under.

        Parameters
        ----------
        batch_idx : int
            Batch index.

        Returns
        -------
        Path
            ``checkpoint_dir / f"{prefix}_batch_{batch_idx:04d}.h5"``.
        """
        return self.checkpoint_dir / f"{self.prefix}_batch_{batch_idx:04d}.h5"

    def should_save(self, batch_idx: int) -> bool:
        """Whether ``batch_idx`` is a batch to checkpoint (every ``checkpoint_frequency``).

        Parameters
        ----------
        batch_idx : int
            Non-negative batch index.

        Returns
        -------
        bool
            ``batch_idx % checkpoint_frequency == 0``.
        """
        return _batch_index(batch_idx) % self.checkpoint_frequency == 0

    # -- saving ---------------------------------------------------------------------

    def save_checkpoint(
        self,
        batch_idx: int,
        parameters: Any,
        optimizer_state: Any,
        loss: float,
        metadata: dict[str, Any] | None = None,
    ) -> Path:
        """Save a checkpoint atomically and return its path.

        Parameters
        ----------
        batch_idx : int
            Non-negative batch index; names the file.
        parameters : array_like
            Numeric parameter array (dtype and shape are kept).
        optimizer_state : dict
            Any tree of dicts, lists, tuples, scalars, strings, bytes, None and numpy
            arrays/scalars; stored natively, restored with the same types.
        loss : float
            Loss at this batch.
        metadata : dict, optional
            Another such tree.

        Returns
        -------
        Path
            The committed checkpoint file. Once it is committed the save has
            succeeded: a failure of the retention that follows is logged and raised
            by the next :meth:`cleanup_old_checkpoints`.

        Raises
        ------
        CheckpointConflictError
            With ``on_older_batch="raise"``, the directory holds a valid checkpoint
            of a higher batch; nothing was written or deleted.
        CheckpointError
            Nothing is left behind and earlier checkpoints are untouched.

        Notes
        -----
        The asynchronous saves of this manager queued before this call commit
        first (their errors stay for :meth:`wait_until_finished`). An interrupt
        (``KeyboardInterrupt``) during the save removes its temp file and
        propagates unchanged.
        """
        batch_idx, params, loss_value, metadata = self._checked_arguments(
            batch_idx, parameters, optimizer_state, loss, metadata
        )
        self._wait_for_queued()
        if self.on_older_batch == "raise":
            self._refuse_older(batch_idx, early=True)
        return self._write(batch_idx, params, optimizer_state, loss_value, metadata)

    def _save_copy(
        self, batch_idx: int, parameters: Any, optimizer_state: Any, loss: float, metadata: Any
    ) -> Path:
        """``save_checkpoint`` whatever batches the directory holds, for a migration:
        it copies a run file by file, and no run resumes from the copy meanwhile."""
        batch_idx, params, loss_value, metadata = self._checked_arguments(
            batch_idx, parameters, optimizer_state, loss, metadata
        )
        self._wait_for_queued()
        return self._write(batch_idx, params, optimizer_state, loss_value, metadata, older="allow")

    def _checked_arguments(
        self, batch_idx: object, parameters: Any, optimizer_state: Any, loss: object, metadata: Any
    ) -> tuple[int, np.ndarray, float, Any]:
        """The arguments of a save, converted; refused before anything is written."""
        if metadata is None:
            metadata = {}
        checked = (_batch_index(batch_idx), as_parameters(parameters), _loss(loss), metadata)
        check_value(optimizer_state, allow_pickle=self.allow_pickle, path="optimizer_state")
        check_value(metadata, allow_pickle=self.allow_pickle, path="metadata")
        return checked

    def _write(
        self,
        batch_idx: int,
        params: np.ndarray,
        optimizer_state: Any,
        loss: float,
        metadata: Any,
        *,
        older: str | None = None,
    ) -> Path:
        started = time.perf_counter()
        # Space freed by the last retention is back before new space is taken.
        self._reclaimer.wait()
        final = self.checkpoint_path(batch_idx)
        staged = StagedFile(final)
        timestamp = time.time()
        try:
            with WritebackFile(staged.fd, writeback=self.durable) as raw:
                segments = write_payload(
                    raw,
                    batch_idx=batch_idx,
                    loss=loss,
                    timestamp=timestamp,
                    parameters=params,
                    optimizer_state=optimizer_state,
                    metadata=metadata,
                    compression=self.compression,
                    allow_pickle=self.allow_pickle,
                    version=_native.__version__,
                )
            _native.finalize(
                staged.fd,
                segments,
                batch_idx,
                loss,
                timestamp,
                self._hmac_key,
                self.durable,
            )
            size = os.fstat(staged.fd).st_size
            with self._lock.held():
                # Again under the lock: another process may have saved meanwhile.
                older = older or self.on_older_batch
                if older == "raise":
                    self._refuse_older(batch_idx)
                elif older == "set_aside":
                    self._set_aside_locked(batch_idx)
                staged.commit(self.durable, _native.fsync_directory)
                self._after_commit_locked(final)
        except CheckpointError:
            raise
        except OSError as exc:
            raise oserror_to_checkpoint(exc, "write checkpoint", final) from exc
        except Exception as exc:
            raise CheckpointError(
                f"failed to save checkpoint of batch {batch_idx}: {exc}",
                {"batch_idx": batch_idx, "checkpoint_path": str(final)},
            ) from exc
        finally:
            # Whatever ended the save, an interrupt included: the temp file goes
            # (unless it is the committed file) and its descriptor is closed.
            try:
                staged.discard()
            except BaseException:  # the interrupt landed in the cleanup: finish it
                staged.discard()
                raise
        elapsed = time.perf_counter() - started
        logger.info(
            "checkpoint saved: batch=%d loss=%.6g file=%s (%.1f KiB) in %.3fs",
            batch_idx,
            loss,
            final.name,
            size / 1024,  # the file may be gone already: retention elsewhere
            elapsed,
        )
        return final

    def _after_commit_locked(self, final: Path) -> None:
        """Remember the new file and apply retention; the save has succeeded, so a
        failure here is logged and kept for the next explicit cleanup."""
        try:
            self._verifier.remember(final, "valid")
            if self.auto_cleanup:
                self._cleanup_locked()
        except Exception as exc:
            error = _as_retention_error(exc)
            error.error_context.setdefault("saved", str(final))
            self._retention_failure = error
            logger.warning(
                "saved %s, but the retention after it failed (the next "
                "cleanup_old_checkpoints() raises it): %s",
                final.name,
                error,
            )

    def _refuse_older(self, batch_idx: int, *, early: bool = False) -> None:
        """A ``CheckpointConflictError`` when a valid checkpoint of a higher batch
        exists (``on_older_batch="raise"``).

        ``early``: the check at the call, before anything is written. The one under
        the lock decides, so a directory that cannot be read now is left to it (and
        to the save's own error).
        """
        try:
            newer = [i for i in self._verifier.list() if i.batch_idx > batch_idx]
            newest = self._first_valid(newer[::-1])
        except CheckpointError:
            if early:
                return
            raise
        if newest is None:
            return
        names = [i.path.name for i in newer]
        shown = ", ".join(names[-5:]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise CheckpointConflictError(
            f"refusing to save batch {batch_idx} in {self.checkpoint_dir}: it holds "
            f"checkpoints of higher batches ({shown}; the newest valid is "
            f"{newest.path.name}), which a resume would pick instead of this run and "
            "whose presence would make retention delete the new saves. If this run "
            'restarts or rolls back on purpose, pass on_older_batch="set_aside" to '
            f"CheckpointManager, or call set_aside_newer_than({batch_idx}) first: "
            "either moves them into a subdirectory.",
            {
                "batch_idx": batch_idx,
                "newest_valid": str(newest.path),
                "newer": [str(i.path) for i in newer],
            },
        )

    def set_aside_newer_than(self, batch_idx: int) -> Path | None:
        """Move every checkpoint of a batch above ``batch_idx`` into a subdirectory.

        For a deliberate rollback (resume from ``batch_idx``) or, with ``-1``, a
        fresh start in a used directory. The files are moved unchanged, newest
        first, into a new ``abandoned-<UTC time>-<token>/`` of the checkpoint
        directory, which no manager lists, loads or deletes; both directories are
        fsynced. Asynchronous saves queued before this call commit first.

        Parameters
        ----------
        batch_idx : int
            The batch the run goes on from; ``-1`` sets every checkpoint aside.

        Returns
        -------
        Path or None
            The subdirectory, or None when no checkpoint was above ``batch_idx``.
        """
        batch = -1 if isinstance(batch_idx, int) and batch_idx == -1 else _batch_index(batch_idx)
        self._wait_for_queued()
        with self._lock.held():
            return self._set_aside_locked(batch)

    def _set_aside_locked(self, batch_idx: int) -> Path | None:
        newer = [i for i in self._verifier.list() if i.batch_idx > batch_idx]
        if not newer:
            return None
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        while True:
            aside = self.checkpoint_dir / f"{ABANDONED}-{stamp}-{secrets.token_hex(4)}"
            try:
                os.mkdir(aside)
                break
            except FileExistsError:
                continue
            except OSError as exc:
                raise oserror_to_checkpoint(exc, "create a directory in", aside.parent) from exc
        moved: list[str] = []
        try:
            # Newest first: a crash part-way leaves an earlier state of the abandoned
            # run (as if it had stopped sooner), never one with a gap.
            for info in reversed(newer):
                try:
                    os.rename(info.path, aside / info.path.name)
                except FileNotFoundError:
                    continue
                self._verifier.forget(info.path)
                moved.append(info.path.name)
            # Set aside for good before anything is committed over them.
            _native.fsync_directory(aside)
            _native.fsync_directory(self.checkpoint_dir)
        except OSError as exc:
            if not moved:
                with contextlib.suppress(OSError):
                    os.rmdir(aside)
            raise oserror_to_checkpoint(exc, "set aside newer checkpoints into", aside) from exc
        finally:
            if moved:
                logger.warning(
                    "set aside %d checkpoint(s) of batches above %d into %s: %s",
                    len(moved),
                    batch_idx,
                    aside,
                    ", ".join(sorted(moved)),
                )
        if not moved:
            os.rmdir(aside)
            return None
        return aside

    def save_checkpoint_async(
        self,
        batch_idx: int,
        parameters: Any,
        optimizer_state: Any,
        loss: float,
        metadata: dict[str, Any] | None = None,
    ) -> Future[Path]:
        """Snapshot the state now and save it in a background thread.

        The arrays are copied before this returns, so the caller may change them at
        once. Saves commit in submission order; at most one snapshot waits at a time
        (a second call blocks until the first is written), which bounds memory.

        Parameters
        ----------
        batch_idx, parameters, optimizer_state, loss, metadata
            As for :meth:`save_checkpoint`; checked before this returns.

        Returns
        -------
        concurrent.futures.Future
            Resolves to the checkpoint path, or raises its ``CheckpointError``.
        """
        batch_idx, params, loss_value, metadata = self._checked_arguments(
            batch_idx, parameters, optimizer_state, loss, metadata
        )
        if self.on_older_batch == "raise":
            self._refuse_older(batch_idx, early=True)
        # Copy only once the previous save is done: one snapshot in memory at a time.
        self._slots.acquire()
        try:
            params = np.array(params, order="C", copy=True)
            state, meta = _snapshot(optimizer_state), _snapshot(metadata)
            with self._async_lock:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(
                        1, thread_name_prefix="h5ckpt-save", initializer=self._mark_save_thread
                    )
                future = self._executor.submit(
                    self._write, batch_idx, params, state, loss_value, meta
                )
                # Finished saves that succeeded have nothing left to report.
                self._pending = [f for f in self._pending if not _succeeded(f)]
                self._pending.append(future)
                self._last_async = future
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        return future

    def _mark_save_thread(self) -> None:
        self._save_thread = threading.get_ident()

    def _wait_for_queued(self) -> None:
        """Until the asynchronous saves submitted so far have finished; their
        errors stay for :meth:`wait_until_finished`."""
        with self._async_lock:
            last = self._last_async
        # From the background thread itself (a done callback that saves), the saves
        # before are done, and the later ones wait for this one.
        if last is not None and threading.get_ident() != self._save_thread:
            # One background thread takes them in order: the last done, all done.
            wait_for_futures([last])

    def wait_until_finished(self) -> None:
        """Wait for every asynchronous save; raise the first error among them."""
        with self._async_lock:
            pending, self._pending = self._pending, []
        first: BaseException | None = None
        for future in pending:
            exc = future.exception()
            if exc is not None and first is None:
                first = exc
        if first is not None:
            raise first

    def close(self) -> None:
        """Finish pending saves and release the background thread."""
        try:
            self.wait_until_finished()
        finally:
            with self._async_lock:
                executor, self._executor = self._executor, None
            if executor is not None:
                executor.shutdown(wait=True)
            self._reclaimer.wait()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            # Do not mask the error in flight; still finish writing what was queued.
            try:
                self.close()
            except CheckpointError as save_error:
                logger.error("an asynchronous save failed: %s", save_error)

    # -- reading --------------------------------------------------------------------

    def load_checkpoint(self, checkpoint_path: _PathLike) -> dict[str, Any]:
        """Verify every byte of a checkpoint, then load it.

        Parameters
        ----------
        checkpoint_path : str or Path
            An h5ckpt file, or a legacy (predecessor's) file: its pickled optimizer
            state is loaded only when the manager has ``allow_pickle=True``.

        Returns
        -------
        dict
            ``batch_idx`` (int), ``parameters`` (ndarray), ``optimizer_state``,
            ``loss`` (float), ``metadata`` (dict), ``version`` (str),
            ``timestamp`` (float).

        Raises
        ------
        CheckpointError
            Missing, corrupt, tampered, foreign, too new, or needing ``allow_pickle``.
        """
        path = _as_path(checkpoint_path)
        kind = _sniff(path)
        if kind == "legacy":
            if self._hmac_key is not None:
                raise CheckpointAuthenticationError(
                    f"{path} is a legacy file without an HMAC tag; a keyed manager refuses it",
                    {"path": str(path)},
                )
            result = load_legacy(path, allow_pickle=self.allow_pickle, limits=self.load_limits)
        else:
            header, data = _read_verified(path, self._hmac_key)
            try:
                result = read_payload(
                    data, header, allow_pickle=self.allow_pickle, limits=self.load_limits
                )
            except CheckpointError as exc:
                exc.error_context.setdefault("path", str(path))
                if str(path) not in exc.message:
                    exc.message = f"{path}: {exc.message}"
                    exc.args = (exc.message,)
                raise
        logger.info(
            "checkpoint loaded: batch=%d loss=%.6g file=%s",
            result["batch_idx"],
            result["loss"],
            path.name,
        )
        return result

    def validate_checkpoint(self, checkpoint_path: _PathLike) -> bool:
        """Whether a file is an intact checkpoint (every byte checked). Never raises.

        Parameters
        ----------
        checkpoint_path : str or Path
            The file. Legacy files are checked by their own checksum.

        Returns
        -------
        bool
            False for a missing, unreadable, corrupt, foreign or (for a keyed
            manager) unsigned file.
        """
        try:
            path = _as_path(checkpoint_path)
            kind = _sniff(path)
            if kind == "legacy":
                if self._hmac_key is not None:
                    return False
                validate_legacy(path)
            else:
                _native.verify_file(path, self._hmac_key)
        except Exception as exc:  # the contract: False for any reason
            logger.debug("validation failed for %s: %s", checkpoint_path, exc)
            return False
        return True

    def list_checkpoints(self, verify: bool = False) -> list[CheckpointInfo]:
        """Every file named like this manager's checkpoints, sorted by batch index.

        Parameters
        ----------
        verify : bool, default False
            Hash every file (in parallel) instead of reading headers only.

        Returns
        -------
        list of CheckpointInfo
            One per file named ``{prefix}_batch_<digits>.h5``, by batch index.
            Without ``verify``, h5ckpt files not checked before are
            ``"unverified"``.
        """
        return self._verifier.list(full=verify)

    def find_latest_checkpoint(self) -> Path | None:
        """The newest checkpoint that verifies, skipping any number of invalid ones.

        Returns
        -------
        Path or None
            None when no file of this manager verifies.
        """
        info = self._first_valid(self._verifier.list()[::-1])
        if info is None:
            logger.debug("no valid checkpoint in %s", self.checkpoint_dir)
            return None
        logger.info("latest valid checkpoint: %s", info.path.name)
        return info.path

    def _first_valid(self, newest_first: list[CheckpointInfo]) -> CheckpointInfo | None:
        """The first of ``newest_first`` that verifies, hashing as few as it can."""
        # The newest alone first (it is valid on almost every resume), then growing
        # windows hashed in parallel, so that many corrupt files cost few rounds.
        window = 1
        start = 0
        while start < len(newest_first):
            batch = newest_first[start : start + window]
            for info in self._verifier.verify(batch):
                if info.is_valid:
                    return info
            start += window
            window = 2 if window == 1 else window * 4
        return None

    def load_latest(self) -> dict[str, Any] | None:
        """Load the newest valid checkpoint, or return None when there is none.

        Returns
        -------
        dict or None
            What :meth:`load_checkpoint` returns, or None on a fresh start.
        """
        changed = 0
        while changed < 3:
            path = self.find_latest_checkpoint()
            if path is None:
                return None
            before = stat_identity(path)
            try:
                return self.load_checkpoint(path)
            except (CheckpointCorruptError, FileNotFoundError) as exc:
                if isinstance(exc, CheckpointCorruptError) and stat_identity(path) == before:
                    # The same file does not load (rotted since it was verified, or
                    # intact bytes that are not a loadable payload): skip it.
                    self._verifier.remember(path, INVALID, str(exc))
                    logger.warning("latest checkpoint %s does not load: %s", path, exc)
                    continue
                # Replaced or removed by another process since it was verified.
                self._verifier.forget(path)
                changed += 1
                logger.warning("latest checkpoint %s changed while loading: %s", path, exc)
        return None

    # -- retention ------------------------------------------------------------------

    def cleanup_old_checkpoints(self) -> list[Path]:
        """Apply the retention policy now; return the deleted paths.

        Only valid checkpoints count toward ``keep_last_n``; the newest valid one is
        never deleted; invalid files are kept unless ``delete_invalid``.

        Returns
        -------
        list of Path
            The files deleted.

        Raises
        ------
        CheckpointError
            Retention failed: a file it must delete could not be deleted (after
            every other one was), or the plan could not be made. Also, once, when
            the automatic retention after an earlier save had failed: this call
            still applies retention first, then raises that failure, with the
            paths it deleted in ``error_context["deleted_now"]``.
        """
        earlier, self._retention_failure = self._retention_failure, None
        with self._lock.held():
            deleted = self._cleanup_locked()
        if earlier is not None:
            error = type(earlier)(
                f"the automatic retention after saving "
                f"{Path(earlier.error_context.get('saved', '?')).name} failed: "
                f"{earlier.message} (this cleanup has now run without error)",
                {**earlier.error_context, "deleted_now": [str(p) for p in deleted]},
            )
            raise error from earlier
        return deleted

    def plan_cleanup(self) -> list[Path]:
        """The paths ``cleanup_old_checkpoints`` would delete now; deletes nothing.

        Every file is verified (results are remembered), so the plan is the one a
        cleanup run at this moment carries out.

        Returns
        -------
        list of Path
            The checkpoint files the retention policy would delete, by batch index.
        """
        with self._lock.held():
            infos, doomed = self._plan_locked()
        return [infos[index].path for index in doomed]

    def _plan_locked(self) -> tuple[list[CheckpointInfo], list[int]]:
        infos = self._verifier.list(full=True)
        candidates = [(i.batch_idx, i.is_valid, i.loss) for i in infos]
        doomed = _native.plan_retention(
            candidates,
            self.keep_last_n,
            self.keep_every,
            self.keep_best_n,
            self.best_mode == "max",
            self.delete_invalid,
        )
        return infos, doomed

    def _cleanup_locked(self) -> list[Path]:
        try:
            infos, doomed = self._plan_locked()
        except Exception as exc:
            raise _as_retention_error(exc) from exc
        deleted: list[Path] = []
        failed: list[tuple[Path, OSError]] = []
        held: list[int] = []
        try:
            for index in doomed:
                path = infos[index].path
                try:
                    self._reclaimer.unlink(path, infos[index].size_bytes, held)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    logger.warning("cannot delete old checkpoint %s: %s", path, exc)
                    failed.append((path, exc))
                    continue
                self._verifier.forget(path)
                deleted.append(path)
        finally:
            self._reclaimer.close_later(held)
        gone = set(deleted)
        invalid = [i.path.name for i in infos if i.status == INVALID and i.path not in gone]
        if invalid:
            logger.warning("keeping invalid checkpoint file(s): %s", ", ".join(invalid))
        if deleted:
            logger.debug("retention deleted %d checkpoint(s)", len(deleted))
        if failed:
            path, exc = failed[0]
            error = oserror_to_checkpoint(exc, "delete old checkpoint", path)
            if len(failed) > 1:
                error.message += f" (and {len(failed) - 1} more old checkpoint(s))"
                error.args = (error.message,)
            error.error_context["not_deleted"] = [str(p) for p, _ in failed]
            error.error_context["deleted"] = [str(p) for p in deleted]
            raise error from exc
        return deleted

    def __repr__(self) -> str:
        return (
            f"CheckpointManager({str(self.checkpoint_dir)!r}, "
            f"checkpoint_frequency={self.checkpoint_frequency}, keep_last_n={self.keep_last_n}, "
            f"prefix={self.prefix!r})"
        )


def _resolve_key(hmac_key: object) -> bytes | None:
    if hmac_key is None:
        env = os.environ.get(HMAC_KEY_ENV)
        if not env:
            return None
        return env.encode("utf-8")
    if isinstance(hmac_key, str):
        hmac_key = hmac_key.encode("utf-8")
    if not isinstance(hmac_key, (bytes, bytearray, memoryview)) or len(bytes(hmac_key)) == 0:
        raise CheckpointValueError(
            "hmac_key must be non-empty bytes", {"hmac_key_type": type(hmac_key).__name__}
        )
    return bytes(hmac_key)


def _batch_index(batch_idx: object) -> int:
    if isinstance(batch_idx, (bool, np.bool_)) or not isinstance(batch_idx, numbers.Integral):
        raise CheckpointValueError(
            f"batch_idx must be a non-negative integer, got {batch_idx!r}",
            {"batch_idx": repr(batch_idx)},
        )
    value = int(batch_idx)
    if value < 0 or value >= 2**63:
        raise CheckpointValueError(
            f"batch_idx must be a non-negative integer below 2**63, got {value}",
            {"batch_idx": value},
        )
    return value


def _loss(loss: object) -> float:
    try:
        value = float(loss)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise CheckpointValueError(
            f"loss must be a real number, got {loss!r}", {"loss": repr(loss)}
        ) from exc
    if isinstance(loss, complex) or (isinstance(loss, np.ndarray) and loss.size != 1):
        raise CheckpointValueError(f"loss must be a real number, got {loss!r}", {})
    return value if not math.isnan(value) else float("nan")


def _as_path(path: object) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointValueError(
            f"a checkpoint path must be a str or Path, got {type(path).__name__}",
            {"path": repr(path)},
        )
    return Path(path)


def _read_verified(path: Path, key: bytes | None) -> tuple[_native.Header, np.ndarray]:
    """The whole file, read once into fresh memory and verified from it.

    The memory is a numpy buffer: its large raw arrays become the loaded arrays
    (views), so loading touches their bytes once.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise oserror_to_checkpoint(exc, "open checkpoint", path) from exc
    try:
        buf = np.empty(os.fstat(fd).st_size, dtype=np.uint8)
        header = _native.read_verified_fd(fd, buf, key, path)
    finally:
        os.close(fd)
    return header, buf


def _sniff(path: Path) -> str:
    """``"h5ckpt"`` or ``"legacy"`` from a file's first bytes, or a ``CheckpointError``."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except IsADirectoryError as exc:
        raise CheckpointValueError(
            f"{path} is a directory, not a checkpoint", {"path": str(path)}
        ) from exc
    except OSError as exc:
        raise oserror_to_checkpoint(exc, "open checkpoint", path) from exc
    if head == _native.MAGIC:
        return "h5ckpt"
    if head == _native.HDF5_SIGNATURE:
        return "legacy"
    raise CheckpointCorruptError(
        f"{path} is not a checkpoint file (neither an h5ckpt header nor an HDF5 signature)",
        {"path": str(path), "reason": "foreign"},
    )


def _as_retention_error(exc: Exception) -> CheckpointError:
    if isinstance(exc, CheckpointError):
        return exc
    if isinstance(exc, OSError):
        return oserror_to_checkpoint(exc, "apply retention in", exc.filename or "the directory")
    error = CheckpointError(f"retention failed: {exc}", {"reason": repr(exc)})
    error.__cause__ = exc
    return error


def _succeeded(future: Future[Path]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None


def _snapshot(value: Any) -> Any:
    """A copy of a state tree that later changes by the caller cannot reach."""
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, dict):
        return {k: _snapshot(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_snapshot(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_snapshot(v) for v in value)
    if isinstance(value, (str, bytes, int, float, bool, complex, type(None), np.generic)):
        return value
    return copy.deepcopy(value)
