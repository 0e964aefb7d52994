"""``CheckpointManager``: save, verify, find, load and prune checkpoints of one run.

The manager is the facade: it holds the directory, its lock and what it knows of the
files, and runs each call's sequence. The settings are checked by
:class:`~h5ckpt.options.CheckpointManagerOptions`, arguments by
:mod:`h5ckpt.arguments`; asynchronous saves run in :mod:`h5ckpt.asyncsave`,
retention and setting newer runs aside in :mod:`h5ckpt.retention`, the verified read
of a file in :mod:`h5ckpt.reading`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from . import _native
from .arguments import SaveArguments, as_path, batch_index, save_arguments
from .asyncsave import AsyncSaver, snapshot
from .errors import (
    CheckpointAuthenticationError,
    CheckpointConflictError,
    CheckpointError,
    CheckpointLimitError,
    CheckpointValueError,
)
from .legacy import load_legacy
from .limits import LoadLimits
from .opening import checkpoint_kind
from .options import KEYWORD_DEFAULTS, CheckpointManagerOptions, options_from
from .payload import Contents, write_sealed
from .reading import load_verified
from .reclaim import Reclaimer
from .retention import Retention, RetentionPolicy, set_aside
from .staging import (
    DirectoryLock,
    new_file_mode,
    oserror_to_checkpoint,
    staged_file,
    sweep_temp_files,
)
from .templates import apply_like, check_like
from .verification import (
    INVALID,
    UNVERIFIED,
    VALID,
    VERDICT_ERRORS,
    CheckpointInfo,
    Verifier,
    check_file,
    check_name,
    check_verified,
    stat_identity,
)

__all__ = ["CheckpointManager"]

logger = logging.getLogger("h5ckpt")

#: How often a search for the newest valid checkpoint lists the directory again when
#: every file it would have answered with was deleted before it was checked.
_LISTINGS = 5


def _verdicts(infos: list[CheckpointInfo]) -> list[tuple[Path, str]]:
    """What a listing says, to compare two: each file and its status."""
    return sorted((i.path, i.status) for i in infos)


def _changing(directory: Path, attempts: str) -> CheckpointError:
    """The error of a search whose every attempt found its files deleted under it:
    valid checkpoints exist, so None (a fresh start) would be the wrong answer."""
    return CheckpointError(
        f"the checkpoints of {directory} changed under each of {attempts}: what was "
        "listed was deleted before it could be checked or loaded (another job saving "
        "and deleting there?); nothing was marked invalid, try again",
        {"checkpoint_dir": str(directory), "attempts": attempts},
    )


_PathLike = str | os.PathLike[str]


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
        Directory of the checkpoints; created if missing (``read_only``: it must
        exist).
    checkpoint_frequency, keep_last_n, enable_compression, prefix, allow_pickle, \
hmac_key, durable, keep_every, keep_best_n, best_mode, delete_invalid, auto_cleanup, \
compression, load_limits, on_older_batch, read_only, file_mode, key_from_environment
        The settings, each as the field of that name of
        :class:`~h5ckpt.CheckpointManagerOptions` (see there), with the same
        defaults: every ``checkpoint_frequency`` batches ``should_save`` is true;
        retention keeps the ``keep_last_n`` newest valid checkpoints (``None``: all),
        and more by ``keep_every`` and ``keep_best_n``; ``read_only`` makes a reader
        that creates nothing and takes no lock; ``on_older_batch`` says what a save
        below the newest valid batch does (see :meth:`set_aside_newer_than`).
    options : CheckpointManagerOptions, optional
        All the settings in one object, instead of the keywords (a keyword that
        differs from its default next to ``options`` is refused).

    Attributes
    ----------
    options : CheckpointManagerOptions
        The settings the manager was made with. The attributes of the same names
        (``checkpoint_frequency``, ``keep_last_n``, ...) are the ones it uses, and
        may be changed; ``compression`` is the resolved codec setting.

    Examples
    --------
    >>> m = CheckpointManager("ckpt", checkpoint_frequency=10, keep_last_n=3)
    >>> state = m.load_latest()  # None on a fresh start
    >>> if m.should_save(batch):
    ...     m.save_checkpoint(batch, params, {"step": 42}, loss)
    >>> reader = CheckpointManager("ckpt", options=CheckpointManagerOptions(read_only=True))
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
        read_only: bool = False,
        file_mode: int | None = None,
        key_from_environment: bool = True,
        options: CheckpointManagerOptions | None = None,
    ) -> None:
        # Taken before any other local exists: the settings, by name.
        keywords = {k: v for k, v in locals().items() if k in KEYWORD_DEFAULTS}
        self.checkpoint_dir = as_path(checkpoint_dir, "checkpoint_dir")
        self.options = opts = options_from(options, keywords)
        self.checkpoint_frequency = opts.checkpoint_frequency
        self.keep_last_n = opts.keep_last_n
        self.keep_every = opts.keep_every
        self.keep_best_n = opts.keep_best_n
        self.best_mode = opts.best_mode
        self.on_older_batch = opts.on_older_batch
        self.prefix = opts.prefix
        self.enable_compression = opts.enable_compression
        self.compression = opts.resolved_compression
        self.allow_pickle = opts.allow_pickle
        self.durable = opts.durable
        self.delete_invalid = opts.delete_invalid
        self.auto_cleanup = opts.auto_cleanup
        self.load_limits = opts.load_limits
        self._hmac_key = opts.resolved_hmac_key()
        self.read_only = opts.read_only
        self.file_mode = opts.file_mode
        self._open_directory(checkpoint_dir)
        self._verifier = Verifier(
            self.checkpoint_dir, self.prefix, self._hmac_key, self.load_limits
        )
        self._lock = DirectoryLock(self.checkpoint_dir)
        self._reclaimer = Reclaimer()
        self._saver = AsyncSaver()
        self._retention = Retention(self._verifier, self._reclaimer)
        if not self.read_only and os.access(self.checkpoint_dir, os.W_OK):
            with self._lock.held():
                sweep_temp_files(self.checkpoint_dir, self.prefix)
        logger.debug(
            "CheckpointManager(dir=%s, frequency=%d, keep_last_n=%s, compression=%s)",
            self.checkpoint_dir,
            self.checkpoint_frequency,
            self.keep_last_n,
            self.compression,
        )

    def _open_directory(self, given: _PathLike) -> None:
        """Create the directory (a reader: check that it exists); it must be one."""
        try:
            if self.read_only:
                os.stat(self.checkpoint_dir)
            else:
                self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            action = "open" if self.read_only else "create"
            raise oserror_to_checkpoint(exc, f"{action} the checkpoint directory", given) from exc
        if not self.checkpoint_dir.is_dir():
            raise CheckpointValueError(
                f"checkpoint_dir {self.checkpoint_dir} is not a directory",
                {"checkpoint_dir": str(self.checkpoint_dir)},
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

        Raises
        ------
        CheckpointValueError
            If ``batch_idx`` is not an integer from 0 to 2**63-1.
        """
        return self.checkpoint_dir / _native.checkpoint_name(self.prefix, batch_index(batch_idx))

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
        return batch_index(batch_idx) % self.checkpoint_frequency == 0

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
            Numeric parameter array (dtype and shape are kept); a ``jax.Array`` or
            another array-like is stored as its numpy array, ``bfloat16`` included.
        optimizer_state : dict
            Any tree of dicts, lists, tuples, scalars, strings, bytes, None and numpy
            arrays/scalars; stored natively, restored with the same types. Also
            NamedTuples (optax states), array-likes (``jax.Array``, ``torch.Tensor``),
            ml_dtypes arrays (``bfloat16``) and JAX pytree nodes, stored natively and
            restored in their types through ``load_checkpoint(..., like=...)``.
        loss : float
            Loss at this batch: a real number (int, float, ``Fraction``, numpy
            integer or float scalar, or a 0-d array of such a dtype), stored as a
            64-bit float. NaN and ±inf are kept; bool, text, complex numbers,
            ``Decimal`` and values beyond the float range are refused.
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
        self._refuse_if_read_only("save a checkpoint")
        args = self._save_arguments(batch_idx, parameters, optimizer_state, loss, metadata)
        self._saver.wait_for_queued()
        if self.on_older_batch == "raise":
            self._refuse_older(args.batch_idx, early=True)
        return self._write(args)

    def _refuse_if_read_only(self, action: str) -> None:
        if self.read_only:
            raise CheckpointError(
                f"cannot {action} in {self.checkpoint_dir}: this manager was made with "
                "read_only=True (make another without it to save or prune)",
                {"checkpoint_dir": str(self.checkpoint_dir), "read_only": True},
            )

    def _save_copy(
        self, batch_idx: int, parameters: Any, optimizer_state: Any, loss: float, metadata: Any
    ) -> Path:
        """``save_checkpoint`` whatever batches the directory holds, for a migration:
        it copies a run file by file, and no run resumes from the copy meanwhile."""
        args = self._save_arguments(batch_idx, parameters, optimizer_state, loss, metadata)
        self._saver.wait_for_queued()
        return self._write(args, older="allow")

    def _save_arguments(
        self, batch_idx: object, parameters: Any, optimizer_state: Any, loss: object, metadata: Any
    ) -> SaveArguments:
        return save_arguments(
            batch_idx,
            parameters,
            optimizer_state,
            loss,
            metadata,
            allow_pickle=self.allow_pickle,
            limits=self.load_limits,
        )

    def _write(self, args: SaveArguments, *, older: str | None = None) -> Path:
        started = time.perf_counter()
        # Space freed by the last retention is back before new space is taken.
        self._reclaimer.wait()
        batch_idx = args.batch_idx
        final = self.checkpoint_path(batch_idx)
        mode = self.file_mode if self.file_mode is not None else new_file_mode()
        failure = f"failed to save checkpoint of batch {batch_idx}"
        context = {"batch_idx": batch_idx, "checkpoint_path": str(final)}
        with staged_file(final, mode, failure=failure, context=context) as staged:
            contents = Contents(
                batch_idx=batch_idx,
                loss=args.loss,
                timestamp=time.time(),
                parameters=args.parameters,
                optimizer_state=args.optimizer_state,
                metadata=args.metadata,
            )
            write_sealed(
                staged.fd,
                contents,
                compression=self.compression,
                allow_pickle=self.allow_pickle,
                hmac_key=self._hmac_key,
                durable=self.durable,
            )
            if args.check_after:
                self._check_loadable(final, staged.fd, batch_idx)
            size = os.fstat(staged.fd).st_size
            with self._lock.held():
                # Again under the lock: another process may have saved meanwhile.
                older = older or self.on_older_batch
                if older == "raise":
                    self._refuse_older(batch_idx)
                elif older == "set_aside":
                    self._set_aside_locked(batch_idx)
                staged.commit(self.durable, _native.fsync_directory)
                # The save has succeeded: a failure of retention is kept for later.
                self._retention.after_commit(
                    final, self._retention_policy() if self.auto_cleanup else None
                )
        elapsed = time.perf_counter() - started
        logger.info(
            "checkpoint saved: batch=%d loss=%.6g file=%s (%.1f KiB) in %.3fs",
            batch_idx,
            args.loss,
            final.name,
            size / 1024,  # the file may be gone already: retention elsewhere
            elapsed,
        )
        return final

    def _check_loadable(self, final: Path, fd: int, batch_idx: int) -> None:
        """Refuse to commit a written file that this manager's limits refuse to load:
        with the default budget, that depends on the size of the file."""
        header = _native.parse_header(os.pread(fd, _native.HEADER_SIZE, 0))
        try:
            check_verified(final, header, fd, self.load_limits)
        except CheckpointLimitError as exc:
            names = [
                k for k in ("max_depth", "max_nodes", "max_attributes") if k in exc.error_context
            ]
            name = names[0] if names else "max_array_bytes"
            default = ""
            if name == "max_array_bytes" and self.load_limits.max_array_bytes is None:
                default = (
                    " (the default budget is max(8 GiB, 64 x file size): the file would be "
                    f"{os.fstat(fd).st_size} bytes)"
                )
            raise CheckpointLimitError(
                f"the checkpoint of batch {batch_idx} would not load with this manager's "
                f"load_limits{default}: {exc.message}; nothing was committed. Raise the "
                f"limit with CheckpointManager(..., load_limits=LoadLimits({name}=...))",
                {**exc.error_context, "batch_idx": batch_idx, "limit": name},
            ) from exc

    def _refuse_older(self, batch_idx: int, *, early: bool = False) -> None:
        """A ``CheckpointConflictError`` when a valid checkpoint of a higher batch
        exists (``on_older_batch="raise"``).

        ``early``: the check at the call, before anything is written. The one under
        the lock decides, so a directory that cannot be read now is left to it (and
        to the save's own error).
        """
        try:
            newest = self._newest_valid(above=batch_idx, settled=False)
        except CheckpointError:
            if early:
                return
            raise
        if newest is None:
            return
        newer = [i for i in self._verifier.list() if i.batch_idx > batch_idx]
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
        self._refuse_if_read_only("set checkpoints aside")
        batch = -1 if isinstance(batch_idx, int) and batch_idx == -1 else batch_index(batch_idx)
        self._saver.wait_for_queued()
        with self._lock.held():
            return self._set_aside_locked(batch)

    def _set_aside_locked(self, batch_idx: int) -> Path | None:
        newer = [i.path for i in self._verifier.list() if i.batch_idx > batch_idx]
        return set_aside(self.checkpoint_dir, newer, batch_idx, self._verifier.forget)

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
        self._refuse_if_read_only("save a checkpoint")
        args = self._save_arguments(batch_idx, parameters, optimizer_state, loss, metadata)
        if self.on_older_batch == "raise":
            self._refuse_older(args.batch_idx, early=True)

        def prepare() -> Callable[[], Path]:
            # Called once the previous save is done: one snapshot in memory at a time.
            copied = args._replace(
                parameters=np.array(args.parameters, order="C", copy=True),
                optimizer_state=snapshot(args.optimizer_state),
                metadata=snapshot(args.metadata),
            )
            return lambda: self._write(copied)

        return self._saver.submit(prepare)

    def wait_until_finished(self) -> None:
        """Wait for every asynchronous save; raise the first error among them."""
        self._saver.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the background thread."""
        try:
            self.wait_until_finished()
        finally:
            self._saver.shutdown()
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

    def load_checkpoint(
        self, checkpoint_path: _PathLike, *, like: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Verify every byte of a checkpoint, then load it.

        Parameters
        ----------
        checkpoint_path : str or Path
            An h5ckpt file, or a legacy (predecessor's) file: its pickled optimizer
            state is loaded only when the manager has ``allow_pickle=True``.
        like : dict, optional
            Templates for any of ``parameters``, ``optimizer_state`` and
            ``metadata``: each such part comes back in its template's structure and
            leaf types (``jax.Array``, ``torch.Tensor``, NamedTuple classes, JAX
            pytree nodes; see :mod:`h5ckpt.templates`). Parts without a template
            come back as without ``like``.

        Returns
        -------
        dict
            ``batch_idx`` (int), ``parameters`` (ndarray), ``optimizer_state``,
            ``loss`` (float), ``metadata`` (dict), ``version`` (str),
            ``timestamp`` (float).

        Raises
        ------
        CheckpointError
            Missing, corrupt, tampered, foreign, too new, beyond ``load_limits``, or
            needing ``allow_pickle``. A :class:`CheckpointResourceError` (out of
            memory or file descriptors) says nothing about the file; a
            :class:`CheckpointValueError` naming a key path, a template of ``like``
            that the file does not match.
        """
        like = check_like(like)
        path = as_path(checkpoint_path)
        kind = checkpoint_kind(path)
        if kind == "legacy":
            if self._hmac_key is not None:
                raise CheckpointAuthenticationError(
                    f"{path} is a legacy file without an HMAC tag; a keyed manager refuses it",
                    {"path": str(path)},
                )
            result = load_legacy(path, allow_pickle=self.allow_pickle, limits=self.load_limits)
            check_name(path, result["batch_idx"])
        else:
            header, result = load_verified(
                path, self._hmac_key, self.allow_pickle, self.load_limits
            )
            check_name(path, header.batch_idx)
        logger.info(
            "checkpoint loaded: batch=%d loss=%.6g file=%s",
            result["batch_idx"],
            result["loss"],
            path.name,
        )
        return apply_like(result, like)

    def validate_checkpoint(self, checkpoint_path: _PathLike) -> bool:
        """Whether a file is a checkpoint this manager loads (every byte checked).
        Never raises.

        The same check as listing, finding the latest and retention make: digests,
        HMAC tag for a keyed manager, a file name that agrees with the header, and
        every check loading makes on the payload, with this manager's
        ``load_limits`` (array data is not decoded).

        Parameters
        ----------
        checkpoint_path : str or Path
            The file. Legacy files are checked by their own checksum.

        Returns
        -------
        bool
            False for a missing, unreadable, corrupt, foreign, renamed, beyond-limits
            or (for a keyed manager) unsigned file, and when the check itself could
            not be made (out of memory, say).
        """
        try:
            path = as_path(checkpoint_path)
            check_file(path, checkpoint_kind(path), self._hmac_key, self.load_limits)
        except Exception as exc:  # the contract: False for any reason
            logger.debug("validation failed for %s: %s", checkpoint_path, exc)
            return False
        return True

    def list_checkpoints(self, verify: bool = False) -> list[CheckpointInfo]:
        """Every file named like this manager's checkpoints, sorted by batch index.

        Parameters
        ----------
        verify : bool, default False
            Hash every file (in parallel) instead of reading headers only, also
            the ones this manager saved or verified before.

        Returns
        -------
        list of CheckpointInfo
            One per file named ``{prefix}_batch_<digits>.h5``, by batch index.
            Without ``verify``, h5ckpt files not checked before are
            ``"unverified"``.
        """
        return self._verifier.list(full=verify, recheck=verify)

    def find_latest_checkpoint(self) -> Path | None:
        """The newest checkpoint that verifies, skipping any number of invalid ones.

        Returns
        -------
        Path or None
            None when no file of this manager verifies.

        Raises
        ------
        CheckpointError
            When a file newer than every valid one could not be checked (memory or
            descriptors ran out, a read failed): skipping it could resume from an
            older state than the newest good one. Nothing is marked invalid.
        """
        info = self._newest_valid()
        if info is None:
            logger.debug("no valid checkpoint in %s", self.checkpoint_dir)
            return None
        logger.info("latest valid checkpoint: %s", info.path.name)
        return info.path

    def _newest_valid(self, above: int = -1, *, settled: bool = True) -> CheckpointInfo | None:
        """The newest checkpoint of a batch above ``above`` that verifies.

        A listing is a snapshot: another job's retention may delete every file in it
        before they are checked, and a listing taken while files are renamed in and
        deleted may hold neither the old nor the new ones. So with ``settled``, None
        is the answer only when the next listing finds the same files with the same
        verdicts; without it (a save's own check, under the lock no manager deletes
        without), when no file of the listing vanished. After ``_LISTINGS`` listings
        that all went stale, ``CheckpointError``: a fresh start would be wrong.
        """
        seen: list[tuple[Path, str]] | None = None
        for _ in range(_LISTINGS):
            listed = [i for i in self._verifier.list() if i.batch_idx > above]
            if seen is not None and _verdicts(listed) == seen:
                return None
            info, checked = self._first_valid(listed[::-1])
            if info is not None:
                return info
            seen = _verdicts(checked)
            if not settled and all(i.status != UNVERIFIED for i in checked):
                return None
            logger.debug("%s changed while checked: listing again", self.checkpoint_dir)
        raise _changing(self.checkpoint_dir, f"{_LISTINGS} listings")

    def _first_valid(
        self, newest_first: list[CheckpointInfo]
    ) -> tuple[CheckpointInfo | None, list[CheckpointInfo]]:
        """The first of ``newest_first`` that verifies, hashing as few as it can, and
        the files checked (all of them when none verifies: a vanished one stays
        ``"unverified"``, the one failure without a verdict that strict checking does
        not raise)."""
        # The newest alone first (it is valid on almost every resume), then growing
        # windows hashed in parallel, so that many corrupt files cost few rounds.
        window = 1
        start = 0
        checked: list[CheckpointInfo] = []
        while start < len(newest_first):
            batch = newest_first[start : start + window]
            for info in self._verifier.verify(batch, strict=True):
                if info.is_valid:
                    return info, checked
                checked.append(info)
            start += window
            window = 2 if window == 1 else window * 4
        return None, checked

    def load_latest(self, *, like: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Load the newest valid checkpoint, or return None when there is none.

        Parameters
        ----------
        like : dict, optional
            Templates, as for :meth:`load_checkpoint`. A template the newest file
            does not match raises; it does not make that file invalid.

        Returns
        -------
        dict or None
            What :meth:`load_checkpoint` returns, or None on a fresh start.
        """
        like = check_like(like)
        loaded = self._load_latest()
        return None if loaded is None else apply_like(loaded, like)

    def _load_latest(self) -> dict[str, Any] | None:
        loaded = self._load_newest_unchecked()
        if loaded is not None:
            return loaded
        changed = 0
        while changed < 3:
            path = self.find_latest_checkpoint()
            if path is None:
                return None
            before = stat_identity(path)
            try:
                return self.load_checkpoint(path)
            except (*VERDICT_ERRORS, FileNotFoundError) as exc:
                # Only a verdict on the file counts (a resource or read failure says
                # nothing about it, and propagates): never a reason to mark it.
                if isinstance(exc, VERDICT_ERRORS) and stat_identity(path) == before:
                    # The same file does not load (rotted since it was verified, or
                    # array data that does not decode): skip it.
                    self._verifier.remember(path, INVALID, str(exc))
                    logger.warning("latest checkpoint %s does not load: %s", path, exc)
                    continue
                # Replaced or removed by another process since it was verified.
                self._verifier.forget(path)
                changed += 1
                logger.warning("latest checkpoint %s changed while loading: %s", path, exc)
        raise _changing(self.checkpoint_dir, "3 loads")

    def _load_newest_unchecked(self) -> dict[str, Any] | None:
        """The newest file loaded straight away when nothing is known of it yet (the
        usual resume): loading makes every check validation makes, so checking it
        first would parse it twice. None when that file is not loaded here; a verdict
        against it is remembered for the search that follows."""
        infos = self._verifier.list()
        if not infos or infos[-1].status != UNVERIFIED:
            return None
        path = infos[-1].path
        before = stat_identity(path)
        try:
            result = self.load_checkpoint(path)
        except VERDICT_ERRORS as exc:
            if stat_identity(path) == before:
                self._verifier.remember(path, INVALID, str(exc))
                logger.warning("latest checkpoint %s does not load: %s", path, exc)
            return None
        except FileNotFoundError:
            return None
        if stat_identity(path) == before:
            self._verifier.remember(path, VALID)
        return result

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
        self._refuse_if_read_only("delete checkpoints")
        return self._retention.explicit_cleanup(self._retention_policy(), self._lock.held)

    def plan_cleanup(self) -> list[Path]:
        """The paths ``cleanup_old_checkpoints`` would delete now; deletes nothing.

        Every file is verified (results are remembered), so the plan is the one a
        cleanup run at this moment carries out.

        Returns
        -------
        list of Path
            The checkpoint files the retention policy would delete, by batch index.
            A ``read_only`` manager plans without the directory lock.
        """
        with contextlib.nullcontext() if self.read_only else self._lock.held():
            infos, doomed = self._retention.plan(self._retention_policy())
        return [infos[index].path for index in doomed]

    def _retention_policy(self) -> RetentionPolicy:
        # From the attributes as they are now: they may have been changed.
        return RetentionPolicy(
            self.keep_last_n, self.keep_every, self.keep_best_n, self.best_mode, self.delete_invalid
        )

    def __repr__(self) -> str:
        return (
            f"CheckpointManager({str(self.checkpoint_dir)!r}, "
            f"checkpoint_frequency={self.checkpoint_frequency}, keep_last_n={self.keep_last_n}, "
            f"prefix={self.prefix!r})"
        )
