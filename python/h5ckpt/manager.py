"""``CheckpointManager``: save, verify, find, load and prune checkpoints of one run."""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import os
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np

from . import _native
from .codec import resolve as resolve_compression
from .errors import (
    CheckpointAuthenticationError,
    CheckpointConflictError,
    CheckpointError,
    CheckpointLimitError,
    CheckpointResourceError,
    CheckpointValueError,
)
from .forking import reset_in_child
from .interop import snapshot_value
from .legacy import load_legacy
from .limits import DEFAULT_MIN_ARRAY_BYTES, LoadLimits
from .opening import checkpoint_kind, open_regular, read_head
from .payload import MAX_ATTRIBUTES_WRITTEN, as_parameters, read_payload, write_sealed
from .reclaim import Reclaimer
from .staging import (
    DirectoryLock,
    new_file_mode,
    oserror_to_checkpoint,
    staged_file,
    sweep_temp_files,
)
from .templates import apply_like, check_like
from .tree import check_value
from .verification import (
    INVALID,
    LEGACY,
    UNVERIFIED,
    VALID,
    VERDICT_ERRORS,
    CheckpointInfo,
    Verifier,
    check_file,
    check_name,
    check_size,
    check_verified,
    stat_identity,
)

__all__ = ["CheckpointManager"]

logger = logging.getLogger("h5ckpt")

HMAC_KEY_ENV = "H5CKPT_HMAC_KEY"
#: What a save below the newest valid checkpoint of the directory does.
ON_OLDER_BATCH = ("raise", "set_aside")
#: Newer checkpoints set aside go to ``checkpoint_dir / f"{ABANDONED}-<UTC time>-<token>"``.
ABANDONED = "abandoned"
_PathLike = str | os.PathLike[str]


#: Counts and batch indices stay below this: the file format and the Rust core hold
#: them in 64 bits.
_INT_LIMIT = 2**63

#: Longest file name most file systems allow, in bytes.
_NAME_MAX = 255
#: What a checkpoint's temp file name adds to the prefix at most:
#: ``.{prefix}_batch_{19 digits}.h5.{7-digit pid}.{12 hex digits}.tmp``.
_NAME_OVERHEAD = len("._batch_.h5...tmp") + 19 + 7 + 12


def _positive_int(name: str, value: object, *, minimum: int, allow_none: bool = False) -> Any:
    if value is None and allow_none:
        return None
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, numbers.Integral)
        or not minimum <= int(value) < _INT_LIMIT
    ):
        raise CheckpointValueError(
            f"{name} must be an integer from {minimum} to 2**63-1"
            + (" or None" if allow_none else "")
            + f", got {_short_repr(value)}",
            {name: _short_repr(value)},
        )
    return int(value)


def _flag(name: str, value: object) -> bool:
    # bool("no") is True: a string where a flag belongs (allow_pickle="no") is refused.
    if isinstance(value, (bool, np.bool_)) or (
        isinstance(value, numbers.Integral) and value in (0, 1)
    ):
        return bool(value)
    raise CheckpointValueError(
        f"{name} must be True or False, got {_short_repr(value)}", {name: _short_repr(value)}
    )


def _short_repr(value: object, limit: int = 60) -> str:
    """``repr(value)``, cut short: an int of 400 digits is not a message."""
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__name__} object>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


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
        File name prefix: text without ``/``, NUL or lone surrogates, at most 200
        bytes of UTF-8 (so that every file name fits in 255 bytes). Use
        ``"homodyne_state"`` for a directory of the predecessor's files.
    allow_pickle : bool, default False
        Store values that have no native HDF5 form by pickling them, and load
        pickled values (including legacy files' optimizer state). Unpickling can run
        code: only enable it for files you trust.
    hmac_key : bytes or str, optional
        Sign saves with HMAC-SHA256 and refuse files without a matching tag. Text is
        used as its UTF-8 bytes; an empty key is refused. Defaults to the bytes of the
        environment variable ``H5CKPT_HMAC_KEY`` when it is set and not empty.
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
    read_only : bool, default False
        Only list, validate, find and load: the directory must exist, nothing is
        created or swept and no lock is taken, so read access to the directory and
        its files is all it needs. Saves and retention raise ``CheckpointError``.
    file_mode : int, optional
        Permission bits of committed checkpoint files. Default: those of any new
        file under the process umask (``0o666 & ~umask``, read at each save).
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
        read_only: bool = False,
        file_mode: int | None = None,
    ) -> None:
        self.checkpoint_dir = _as_path(checkpoint_dir, "checkpoint_dir")
        self.checkpoint_frequency = _positive_int(
            "checkpoint_frequency", checkpoint_frequency, minimum=1
        )
        self.keep_last_n = _positive_int("keep_last_n", keep_last_n, minimum=1, allow_none=True)
        self.keep_every = _positive_int("keep_every", keep_every, minimum=1, allow_none=True)
        self.keep_best_n = _positive_int("keep_best_n", keep_best_n, minimum=0)
        if not isinstance(best_mode, str) or best_mode not in ("min", "max"):
            raise CheckpointValueError(
                f"best_mode must be 'min' or 'max', got {_short_repr(best_mode)}",
                {"best_mode": _short_repr(best_mode)},
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
        self.prefix = _prefix(prefix)
        self.enable_compression = _flag("enable_compression", enable_compression)
        self.compression = resolve_compression(self.enable_compression, compression)
        self.allow_pickle = _flag("allow_pickle", allow_pickle)
        self.durable = _flag("durable", durable)
        self.delete_invalid = _flag("delete_invalid", delete_invalid)
        self.auto_cleanup = _flag("auto_cleanup", auto_cleanup)
        if load_limits is not None and not isinstance(load_limits, LoadLimits):
            raise CheckpointValueError(
                f"load_limits must be a LoadLimits or None, got {_short_repr(load_limits)}",
                {"load_limits": _short_repr(load_limits)},
            )
        self.load_limits = load_limits if load_limits is not None else LoadLimits()
        self._hmac_key = _resolve_key(hmac_key)
        self.read_only = _flag("read_only", read_only)
        self.file_mode = _file_mode(file_mode)

        try:
            if self.read_only:
                os.stat(self.checkpoint_dir)
            else:
                self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            action = "open" if self.read_only else "create"
            raise oserror_to_checkpoint(
                exc, f"{action} the checkpoint directory", checkpoint_dir
            ) from exc
        if not self.checkpoint_dir.is_dir():
            raise CheckpointValueError(
                f"checkpoint_dir {self.checkpoint_dir} is not a directory",
                {"checkpoint_dir": str(self.checkpoint_dir)},
            )
        self._verifier = Verifier(
            self.checkpoint_dir, self.prefix, self._hmac_key, self.load_limits
        )
        self._lock = DirectoryLock(self.checkpoint_dir)
        self._async_lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[Future[Path]] = []
        self._slots = threading.BoundedSemaphore(1)
        self._reclaimer = Reclaimer()
        reset_in_child(self)
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
        return self.checkpoint_dir / _native.checkpoint_name(self.prefix, _batch_index(batch_idx))

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
        batch_idx, params, loss_value, metadata, check_after = self._checked_arguments(
            batch_idx, parameters, optimizer_state, loss, metadata
        )
        self._wait_for_queued()
        if self.on_older_batch == "raise":
            self._refuse_older(batch_idx, early=True)
        return self._write(
            batch_idx, params, optimizer_state, loss_value, metadata, check_after=check_after
        )

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
        batch_idx, params, loss_value, metadata, check_after = self._checked_arguments(
            batch_idx, parameters, optimizer_state, loss, metadata
        )
        self._wait_for_queued()
        return self._write(
            batch_idx,
            params,
            optimizer_state,
            loss_value,
            metadata,
            older="allow",
            check_after=check_after,
        )

    def _checked_arguments(
        self, batch_idx: object, parameters: Any, optimizer_state: Any, loss: object, metadata: Any
    ) -> tuple[int, np.ndarray, float, Any, bool]:
        """The arguments of a save, converted, and whether the written file must be
        checked against the limits before it is committed; refused before anything is
        written."""
        if metadata is None:
            metadata = {}
        checked = (_batch_index(batch_idx), as_parameters(parameters), _loss(loss), metadata)
        # Checked against this manager's own load limits: a save never commits a
        # file its manager refuses to load (what only the written file can tell is
        # checked again before the commit, see _check_loadable).
        limits = self.load_limits
        nbytes = checked[1].nbytes
        for name, tree in (("optimizer_state", optimizer_state), ("metadata", metadata)):
            nbytes += check_value(tree, allow_pickle=self.allow_pickle, limits=limits, path=name)
        if limits.max_array_bytes is not None and nbytes > limits.max_array_bytes:
            raise CheckpointLimitError(
                f"the checkpoint of batch {checked[0]} holds {nbytes} bytes of arrays and "
                f"strings, more than this manager's load_limits allow "
                f"(max_array_bytes={limits.max_array_bytes}), so it could not be loaded; "
                "nothing was written. Raise the limit with "
                "CheckpointManager(..., load_limits=LoadLimits(max_array_bytes=...))",
                {
                    "batch_idx": checked[0],
                    "max_array_bytes": limits.max_array_bytes,
                    "declared_bytes": nbytes,
                },
            )
        # Only the written file can tell the default budget (it grows with the file's
        # size), what pickles take, and whether the root's attributes fit a lower
        # max_attributes; otherwise the checks above are all the file's.
        check_after = (
            self.allow_pickle
            or limits.max_attributes < MAX_ATTRIBUTES_WRITTEN
            or (limits.max_array_bytes is None and nbytes > DEFAULT_MIN_ARRAY_BYTES)
        )
        return (*checked, check_after)

    def _write(
        self,
        batch_idx: int,
        params: np.ndarray,
        optimizer_state: Any,
        loss: float,
        metadata: Any,
        *,
        older: str | None = None,
        check_after: bool = True,
    ) -> Path:
        started = time.perf_counter()
        # Space freed by the last retention is back before new space is taken.
        self._reclaimer.wait()
        final = self.checkpoint_path(batch_idx)
        mode = self.file_mode if self.file_mode is not None else new_file_mode()
        timestamp = time.time()
        failure = f"failed to save checkpoint of batch {batch_idx}"
        context = {"batch_idx": batch_idx, "checkpoint_path": str(final)}
        with staged_file(final, mode, failure=failure, context=context) as staged:
            write_sealed(
                staged.fd,
                batch_idx=batch_idx,
                loss=loss,
                timestamp=timestamp,
                parameters=params,
                optimizer_state=optimizer_state,
                metadata=metadata,
                compression=self.compression,
                allow_pickle=self.allow_pickle,
                version=_native.__version__,
                hmac_key=self._hmac_key,
                durable=self.durable,
            )
            if check_after:
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
                self._after_commit_locked(final)
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

    def _after_commit_locked(self, final: Path) -> None:
        """Remember the new file and apply retention; the save has succeeded, so a
        failure here is logged and kept for the next explicit cleanup."""
        try:
            self._verifier.remember(final, VALID)
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
        self._refuse_if_read_only("set checkpoints aside")
        batch = -1 if isinstance(batch_idx, int) and batch_idx == -1 else _batch_index(batch_idx)
        self._wait_for_queued()
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
        batch_idx, params, loss_value, metadata, check_after = self._checked_arguments(
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
                    self._write, batch_idx, params, state, loss_value, meta, check_after=check_after
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

    def _after_fork_in_child(self) -> None:
        """Fresh asynchronous machinery in a forked child (see :mod:`h5ckpt.forking`).

        The background thread does not exist here, the executor would wait for it
        forever, and another thread may have held the locks or the snapshot slot at
        the fork. Saves that were pending belong to the parent, which completes
        them: here their futures fail at once instead of never resolving.
        """
        self._async_lock = threading.Lock()
        self._executor = None
        inherited, self._pending = self._pending, []
        for future in inherited:
            reinit = getattr(getattr(future, "_condition", None), "_at_fork_reinit", None)
            if reinit is not None:
                reinit()  # a parent thread may have held it at the fork
            if not future.done():
                future.set_exception(
                    CheckpointError(
                        "this asynchronous save was in progress in the parent process "
                        f"when process {os.getpid()} was forked from it; the parent "
                        "completes it, the child does not",
                        {"pid": os.getpid()},
                    )
                )
        # After the futures: their callbacks release the inherited slot.
        self._slots = threading.BoundedSemaphore(1)

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
        path = _as_path(checkpoint_path)
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
            header, data = _read_verified(path, self._hmac_key, self.load_limits)
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
            path = _as_path(checkpoint_path)
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
            for info in self._verifier.verify(batch, strict=True):
                if info.is_valid:
                    return info
            start += window
            window = 2 if window == 1 else window * 4
        return None

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
        return None

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
            A ``read_only`` manager plans without the directory lock.
        """
        with contextlib.nullcontext() if self.read_only else self._lock.held():
            infos, doomed = self._plan_locked()
        return [infos[index].path for index in doomed]

    def _plan_locked(self) -> tuple[list[CheckpointInfo], list[int]]:
        infos = self._verifier.list(full=True)
        # A file that could not be checked (status still "unverified") is neither
        # counted nor deleted: nothing is known of it.
        known = [k for k, i in enumerate(infos) if i.status in (VALID, LEGACY, INVALID)]
        candidates = [(infos[k].batch_idx, infos[k].is_valid, infos[k].loss) for k in known]
        doomed = _native.plan_retention(
            candidates,
            self.keep_last_n,
            self.keep_every,
            self.keep_best_n,
            self.best_mode == "max",
            self.delete_invalid,
        )
        return infos, [known[d] for d in doomed]

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
            path, cause = failed[0]
            error = oserror_to_checkpoint(cause, "delete old checkpoint", path)
            if len(failed) > 1:
                error.message += f" (and {len(failed) - 1} more old checkpoint(s))"
                error.args = (error.message,)
            error.error_context["not_deleted"] = [str(p) for p, _ in failed]
            error.error_context["deleted"] = [str(p) for p in deleted]
            raise error from cause
        return deleted

    def __repr__(self) -> str:
        return (
            f"CheckpointManager({str(self.checkpoint_dir)!r}, "
            f"checkpoint_frequency={self.checkpoint_frequency}, keep_last_n={self.keep_last_n}, "
            f"prefix={self.prefix!r})"
        )


def set_aside(
    directory: Path, newer: list[Path], batch_idx: int, moved_one: Callable[[Path], object]
) -> Path | None:
    """Move the checkpoints ``newer`` (files or step directories, by batch index)
    into a new ``abandoned-<UTC time>-<token>/`` of ``directory``; fsync both.

    Newest first: a crash part-way leaves an earlier state of the abandoned run (as
    if it had stopped sooner), never one with a gap. ``moved_one`` is called with
    each path moved. Returns the subdirectory, or None when nothing was moved.
    """
    if not newer:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    while True:
        aside = directory / f"{ABANDONED}-{stamp}-{secrets.token_hex(4)}"
        try:
            os.mkdir(aside)
            break
        except FileExistsError:
            continue
        except OSError as exc:
            raise oserror_to_checkpoint(exc, "create a directory in", directory) from exc
    moved: list[str] = []
    try:
        for path in reversed(newer):
            try:
                os.rename(path, aside / path.name)
            except FileNotFoundError:
                continue
            moved_one(path)
            moved.append(path.name)
        # Set aside for good before anything is committed over them.
        _native.fsync_directory(aside)
        _native.fsync_directory(directory)
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


def _resolve_key(hmac_key: object) -> bytes | None:
    """The HMAC key bytes: bytes as given, text as its UTF-8 bytes, None for no key.

    Without ``hmac_key`` the environment variable ``H5CKPT_HMAC_KEY`` is used, as the
    bytes it holds (not decoded and encoded again, so a value that is not UTF-8 still
    works); unset or empty means no key.
    """
    if hmac_key is None:
        return _key_from_environment()
    if isinstance(hmac_key, str):
        try:
            hmac_key = hmac_key.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise CheckpointValueError(
                f"hmac_key is text with a lone surrogate (at position {exc.start}), which "
                "has no UTF-8 bytes: pass the key as bytes",
                {"hmac_key_type": "str", "position": exc.start},
            ) from None
    if not isinstance(hmac_key, (bytes, bytearray, memoryview)) or len(bytes(hmac_key)) == 0:
        raise CheckpointValueError(
            "hmac_key must be non-empty bytes or text, got "
            + (
                "an empty key"
                if isinstance(hmac_key, (bytes, bytearray, memoryview))
                else type(hmac_key).__name__
            ),
            {"hmac_key_type": type(hmac_key).__name__},
        )
    return bytes(hmac_key)


def _key_from_environment() -> bytes | None:
    if os.supports_bytes_environ:
        raw = os.environb.get(HMAC_KEY_ENV.encode("ascii"))
        return bytes(raw) if raw else None
    text = os.environ.get(HMAC_KEY_ENV)  # Windows: the environment is text
    if not text:
        return None
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise CheckpointValueError(
            f"the environment variable {HMAC_KEY_ENV} holds text that has no UTF-8 bytes",
            {"variable": HMAC_KEY_ENV},
        ) from None


def _prefix(prefix: object) -> str:
    """The file name prefix, checked: every checkpoint name of it must be creatable."""
    problem = None
    if not isinstance(prefix, str):
        problem = f"must be a str, got {type(prefix).__name__}"
    elif not prefix:
        problem = "must not be empty"
    elif "/" in prefix or "\x00" in prefix:
        problem = "must not contain '/' or NUL"
    else:
        try:
            size = len(prefix.encode("utf-8"))
        except UnicodeEncodeError as exc:
            # The native scan matches names as UTF-8: such a prefix would match nothing.
            problem = f"has a lone surrogate (at position {exc.start}), which is not UTF-8"
        else:
            if size + _NAME_OVERHEAD > _NAME_MAX:
                problem = (
                    f"is {size} bytes long: its file names would exceed {_NAME_MAX} bytes "
                    f"(at most {_NAME_MAX - _NAME_OVERHEAD} bytes of UTF-8)"
                )
    if problem is not None:
        raise CheckpointValueError(
            f"prefix {problem}, got {_short_repr(prefix)}", {"prefix": _short_repr(prefix)}
        )
    return prefix  # type: ignore[return-value]


def _file_mode(mode: object) -> int | None:
    if mode is None:
        return None
    if (
        isinstance(mode, bool)
        or not isinstance(mode, numbers.Integral)
        or not 0 <= int(mode) <= 0o777
    ):
        raise CheckpointValueError(
            f"file_mode must be None or permission bits from 0 to 0o777, got {mode!r}",
            {"file_mode": repr(mode)},
        )
    return int(mode)


def _batch_index(batch_idx: object) -> int:
    if isinstance(batch_idx, (bool, np.bool_)) or not isinstance(batch_idx, numbers.Integral):
        raise CheckpointValueError(
            f"batch_idx must be a non-negative integer, got {_short_repr(batch_idx)}",
            {"batch_idx": _short_repr(batch_idx)},
        )
    value = int(batch_idx)
    if value < 0 or value >= _INT_LIMIT:
        raise CheckpointValueError(
            f"batch_idx must be a non-negative integer below 2**63, got {_short_repr(value)}",
            {"batch_idx": _short_repr(value)},
        )
    return value


def _loss(loss: object) -> float:
    """``loss`` as a float: a real number (``numbers.Real`` except bool, numpy real
    scalars included) or a 0-d array of an integer or float dtype (as reductions of
    numpy, JAX or torch arrays give); anything else is refused, text included."""
    value = loss
    if not isinstance(loss, numbers.Real) and hasattr(loss, "__array__"):
        try:
            array = np.asarray(loss)
        except Exception:
            array = None
        if array is not None and array.ndim == 0:
            value = array[()]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise CheckpointValueError(
            "loss must be a real number (an int, a float, a numpy real scalar or a 0-d "
            f"array), got {type(loss).__name__} {_short_repr(loss)}"
            + (
                ": convert it with float() if that is what you mean"
                if isinstance(loss, (str, bytes, Decimal))
                else ""
            ),
            {"loss": _short_repr(loss)},
        )
    try:
        with np.errstate(over="ignore"):
            result = float(value)
    except OverflowError:
        result = -math.inf if value < 0 else math.inf
        finite = True
    except (TypeError, ValueError) as exc:
        raise CheckpointValueError(
            f"loss {_short_repr(loss)} does not convert to a float: {exc}",
            {"loss": _short_repr(loss)},
        ) from exc
    else:
        finite = isinstance(value, np.generic) and bool(np.isfinite(value))
    if math.isinf(result) and finite:
        raise CheckpointValueError(
            f"loss {_short_repr(loss)} is too large for a 64-bit float "
            "(the largest is about 1.8e308)",
            {"loss": _short_repr(loss)},
        )
    return result if not math.isnan(result) else float("nan")


def _as_path(path: object, what: str = "the checkpoint path") -> Path:
    """``path`` as a ``Path``, refused when no file could have that name."""
    problem = None
    if not isinstance(path, (str, os.PathLike)):
        problem = f"must be a str or Path, got {type(path).__name__}"
    else:
        try:
            text = os.fspath(path)
        except TypeError as exc:
            text, problem = None, str(exc)
        if not isinstance(text, str):
            problem = problem or f"must be a str path, got {type(text).__name__}"
        elif not text:
            problem = "is empty (use '.' for the current directory)"
        elif "\x00" in text:
            problem = "contains a NUL character, which no file name can hold"
        else:
            try:
                os.fsencode(text)
            except UnicodeEncodeError as exc:
                problem = (
                    f"has a character that is no file name byte (U+{ord(text[exc.start]):04X} "
                    f"at position {exc.start})"
                )
    if problem is not None:
        raise CheckpointValueError(
            f"{what} {problem}: {_short_repr(path)}", {"path": _short_repr(path)}
        )
    return Path(text)  # type: ignore[arg-type]


def _read_verified(
    path: Path, key: bytes | None, limits: LoadLimits
) -> tuple[_native.Header, np.ndarray]:
    """The whole file, read once into fresh memory and verified from it.

    The memory is a numpy buffer: its large raw arrays become the loaded arrays
    (views), so loading touches their bytes once. The header, the file's length and
    its size against ``limits`` and the machine's memory are checked before the
    buffer is allocated.
    """
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        head = read_head(fd, path, _native.HEADER_SIZE)
        try:
            header = _native.parse_header(head)
        except CheckpointError as exc:
            exc.message = f"{path}: {exc.message}"
            exc.args = (exc.message,)
            exc.error_context.setdefault("path", str(path))
            raise
        check_size(path, header, size, limits)
        _check_memory(path, size)
        try:
            buf = np.empty(size, dtype=np.uint8)
        except MemoryError as exc:
            raise CheckpointResourceError(
                f"cannot load {path}: out of memory for its {size} bytes (the file is not "
                "at fault; free memory or raise the process's memory limit)",
                {"path": str(path), "size_bytes": size, "resource": "memory"},
            ) from exc
        header = _native.read_verified_fd(fd, buf, key, path)
    finally:
        os.close(fd)
    return header, buf


def _check_memory(path: Path, size: int) -> None:
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if size > memory:
        raise CheckpointResourceError(
            f"cannot load {path}: it is {size} bytes, more than this machine's "
            f"{memory} bytes of memory",
            {"path": str(path), "size_bytes": size, "memory_bytes": memory, "resource": "memory"},
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
    """A copy of a state tree that later changes by the caller cannot reach (device
    arrays copied to host: the background write touches no array library)."""
    return snapshot_value(value)
