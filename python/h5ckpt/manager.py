"""``CheckpointManager``: save, verify, find, load and prune checkpoints of one run."""

from __future__ import annotations

import copy
import logging
import math
import numbers
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from . import _native
from .codec import resolve as resolve_compression
from .errors import (
    CheckpointAuthenticationError,
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
            The committed checkpoint file.

        Raises
        ------
        CheckpointError
            Nothing is left behind and earlier checkpoints are untouched.
        """
        batch_idx, params, loss_value, metadata = self._checked_arguments(
            batch_idx, parameters, optimizer_state, loss, metadata
        )
        return self._write(batch_idx, params, optimizer_state, loss_value, metadata)

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
        self, batch_idx: int, params: np.ndarray, optimizer_state: Any, loss: float, metadata: Any
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
                staged.commit(self.durable, _native.fsync_directory)
                staged.close()
                self._verifier.remember(final, "valid")
                if self.auto_cleanup:
                    self._cleanup_locked()
        except CheckpointError:
            staged.discard()
            raise
        except OSError as exc:
            staged.discard()
            raise oserror_to_checkpoint(exc, "write checkpoint", final) from exc
        except Exception as exc:
            staged.discard()
            raise CheckpointError(
                f"failed to save checkpoint of batch {batch_idx}: {exc}",
                {"batch_idx": batch_idx, "checkpoint_path": str(final)},
            ) from exc
        elapsed = time.perf_counter() - started
        logger.info(
            "checkpoint saved: batch=%d loss=%.6g file=%s (%.1f KiB) in %.3fs",
            batch_idx,
            loss,
            final.name,
            size / 1024,  # the file may be gone already: retention, here or elsewhere
            elapsed,
        )
        return final

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
        # Copy only once the previous save is done: one snapshot in memory at a time.
        self._slots.acquire()
        try:
            params = np.array(params, order="C", copy=True)
            state, meta = _snapshot(optimizer_state), _snapshot(metadata)
            with self._async_lock:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(1, thread_name_prefix="h5ckpt-save")
                future = self._executor.submit(
                    self._write, batch_idx, params, state, loss_value, meta
                )
                # Finished saves that succeeded have nothing left to report.
                self._pending = [f for f in self._pending if not _succeeded(f)]
                self._pending.append(future)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        return future

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
        """
        infos = self._verifier.list()[::-1]
        # The newest alone first (it is valid on almost every resume), then growing
        # windows hashed in parallel, so that many corrupt files cost few rounds.
        window = 1
        start = 0
        while start < len(infos):
            batch = infos[start : start + window]
            for info in self._verifier.verify(batch):
                if info.is_valid:
                    logger.info("latest valid checkpoint: %s", info.path.name)
                    return info.path
            start += window
            window = 2 if window == 1 else window * 4
        logger.debug("no valid checkpoint in %s", self.checkpoint_dir)
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
        """
        with self._lock.held():
            return self._cleanup_locked()

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
        infos, doomed = self._plan_locked()
        deleted: list[Path] = []
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
