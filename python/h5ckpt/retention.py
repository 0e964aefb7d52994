"""Which checkpoints stay in a directory: retention's deletions, and the newer run
set aside on a restart or rollback.

What to delete is decided by the Rust core (``_native.plan_retention``) over the
verdicts of :mod:`h5ckpt.verification`: only valid checkpoints count, the newest
valid one is never deleted, and a file nothing is known of is neither counted nor
deleted. The callers hold the directory lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import NamedTuple

from . import _native
from .errors import CheckpointError
from .reclaim import Reclaimer
from .staging import oserror_to_checkpoint
from .verification import INVALID, LEGACY, VALID, CheckpointInfo, Verifier

__all__ = ["ABANDONED", "Retention", "RetentionPolicy", "set_aside"]

logger = logging.getLogger("h5ckpt")

#: Newer checkpoints set aside go to ``directory / f"{ABANDONED}-<UTC time>-<token>"``.
ABANDONED = "abandoned"


class RetentionPolicy(NamedTuple):
    """What retention keeps (the manager's settings of that name)."""

    keep_last_n: int | None
    keep_every: int | None
    keep_best_n: int
    best_mode: str
    delete_invalid: bool


class Retention:
    """Plans and applies retention in one directory, and keeps the failure of an
    automatic retention after a committed save for the next explicit cleanup.

    Files are deleted through ``reclaimer`` (large files' space is freed in the
    background) and forgotten by ``verifier``.
    """

    def __init__(self, verifier: Verifier, reclaimer: Reclaimer) -> None:
        self._verifier = verifier
        self._reclaimer = reclaimer
        self._failure: CheckpointError | None = None

    def plan(self, policy: RetentionPolicy) -> tuple[list[CheckpointInfo], list[int]]:
        """Every checkpoint of the directory (all verified), and the indices of the
        ones ``policy`` deletes."""
        infos = self._verifier.list(full=True)
        # A file that could not be checked (status still "unverified") is neither
        # counted nor deleted: nothing is known of it.
        known = [k for k, i in enumerate(infos) if i.status in (VALID, LEGACY, INVALID)]
        candidates = [(infos[k].batch_idx, infos[k].is_valid, infos[k].loss) for k in known]
        doomed = _native.plan_retention(
            candidates,
            policy.keep_last_n,
            policy.keep_every,
            policy.keep_best_n,
            policy.best_mode == "max",
            policy.delete_invalid,
        )
        return infos, [known[d] for d in doomed]

    def cleanup(self, policy: RetentionPolicy) -> list[Path]:
        """Delete what ``policy`` deletes; return the deleted paths.

        Every file that can be deleted is; then the first failure is raised, with
        what was and was not deleted in its ``error_context``.
        """
        try:
            infos, doomed = self.plan(policy)
        except Exception as exc:
            raise as_retention_error(exc) from exc
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

    def after_commit(self, final: Path, policy: RetentionPolicy | None) -> None:
        """Remember the new file ``final`` as valid and apply ``policy`` (None: no
        automatic cleanup). The save has succeeded: a failure here is logged and
        kept for :meth:`explicit_cleanup`."""
        try:
            self._verifier.remember(final, VALID)
            if policy is not None:
                self.cleanup(policy)
        except Exception as exc:
            error = as_retention_error(exc)
            error.error_context.setdefault("saved", str(final))
            self._failure = error
            logger.warning(
                "saved %s, but the retention after it failed (the next "
                "cleanup_old_checkpoints() raises it): %s",
                final.name,
                error,
            )

    def explicit_cleanup(
        self, policy: RetentionPolicy, locked: Callable[[], AbstractContextManager[object]]
    ) -> list[Path]:
        """:meth:`cleanup` within ``locked()``, then the kept failure of an earlier
        automatic retention, once (with the paths deleted now in
        ``error_context["deleted_now"]``)."""
        earlier, self._failure = self._failure, None
        with locked():
            deleted = self.cleanup(policy)
        if earlier is not None:
            error = type(earlier)(
                f"the automatic retention after saving "
                f"{Path(earlier.error_context.get('saved', '?')).name} failed: "
                f"{earlier.message} (this cleanup has now run without error)",
                {**earlier.error_context, "deleted_now": [str(p) for p in deleted]},
            )
            raise error from earlier
        return deleted


def as_retention_error(exc: Exception) -> CheckpointError:
    """``exc`` as the ``CheckpointError`` a failed retention raises."""
    if isinstance(exc, CheckpointError):
        return exc
    if isinstance(exc, OSError):
        return oserror_to_checkpoint(exc, "apply retention in", exc.filename or "the directory")
    error = CheckpointError(f"retention failed: {exc}", {"reason": repr(exc)})
    error.__cause__ = exc
    return error


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
    aside = _new_aside_directory(directory)
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


def _new_aside_directory(directory: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    while True:
        aside = directory / f"{ABANDONED}-{stamp}-{secrets.token_hex(4)}"
        try:
            os.mkdir(aside)
            return aside
        except FileExistsError:
            continue
        except OSError as exc:
            raise oserror_to_checkpoint(exc, "create a directory in", directory) from exc
