"""Temp files and the directory lock: the file-system side of the commit protocol.

A checkpoint is written to a hidden temp file in its final directory and renamed into
place. While a writer works on a temp file it holds an exclusive ``flock`` on it; the
kernel drops that lock when the writer dies, however it dies, which is how a later
manager tells a dead writer's leftovers from a live writer's file.

The directory lock (``.h5ckpt.lock``) serialises the short critical sections that
change which checkpoints exist (rename into place, retention, temp-file sweeping) across
processes and across managers in one process. Writing the payload happens outside it,
so concurrent writers only wait for each other's renames and deletions.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointPermissionError,
    CheckpointStorageError,
)

__all__ = [
    "LOCK_NAME",
    "DirectoryLock",
    "StagedFile",
    "oserror_to_checkpoint",
    "sigint_deferred",
    "sweep_temp_files",
]

logger = logging.getLogger("h5ckpt")

LOCK_NAME = ".h5ckpt.lock"
#: A temp file whose writer still runs but whose lock is free is taken as stale after this.
STALE_AFTER_SECONDS = 600.0
_TEMP_RE = re.compile(r"^\.(?P<stem>.+_batch_\d+\.h5)\.(?P<pid>\d+)\.[0-9a-f]{12}\.tmp$", re.A)


def oserror_to_checkpoint(exc: OSError, action: str, path: Path | str) -> CheckpointError:
    """The ``CheckpointError`` subclass that matches an ``OSError``."""
    context = {"path": str(path), "errno": exc.errno, "action": action}
    message = f"cannot {action} {path}: {exc.strerror or exc}"
    if isinstance(exc, FileNotFoundError):
        return CheckpointNotFoundError(message, context)
    if isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return CheckpointPermissionError(message, context)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        message += " (the file system is full or the file size limit was reached)"
    return CheckpointStorageError(message, context)


class DirectoryLock:
    """An advisory, re-entrant (per manager) exclusive lock on a checkpoint directory.

    ``flock`` locks belong to an open file description, so two managers in one
    process, each with its own descriptor, exclude each other just like two processes.
    """

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_NAME
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._fd: int | None = None

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._thread_lock:
            if self._depth == 0:
                self._acquire()
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    try:
                        self._release()
                    except BaseException:  # an interrupt landed in it: finish it
                        self._release()
                        raise

    def _acquire(self) -> None:
        fd = -1
        try:
            with sigint_deferred():  # a Ctrl-C right after open() would lose the descriptor
                fd = os.open(
                    self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
                )
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException as exc:  # an interrupt while waiting too
            if fd >= 0:
                os.close(fd)
            if isinstance(exc, OSError):
                action = "lock" if fd >= 0 else "open the lock file"
                raise oserror_to_checkpoint(exc, action, self.path) from exc
            raise
        self._fd = fd

    def _release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing drops the flock


class StagedFile:
    """A new, exclusively created, locked temp file that will become ``final``."""

    def __init__(self, final: Path) -> None:
        self.final = final
        self.fd = -1
        self.committed = True  # nothing at a temp name yet
        try:
            # A Ctrl-C between open() and storing its descriptor would lose both the
            # descriptor and the file: it is held until they are this object's.
            with sigint_deferred():
                self._create(final)
        except BaseException:
            self.discard()
            raise
        try:
            # Blocking: a sweeper in another process may hold the lock for a moment
            # while it checks whether this file's writer is alive.
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except BaseException as exc:  # an interrupt while waiting too
            self.discard()
            if isinstance(exc, OSError):
                raise oserror_to_checkpoint(exc, "lock the temp file", self.path) from exc
            raise

    def _create(self, final: Path) -> None:
        for _ in range(16):
            token = secrets.token_hex(6)
            path = final.with_name(f".{final.name}.{os.getpid()}.{token}.tmp")
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                fd = os.open(path, flags, 0o600)
            except FileExistsError:
                continue
            except OSError as exc:
                raise oserror_to_checkpoint(exc, "create a temp file in", final.parent) from exc
            break
        else:  # pragma: no cover - 16 collisions of 48 random bits
            raise CheckpointStorageError(f"cannot create a unique temp file for {final}", {})
        self.path, self.fd, self.committed = path, fd, False

    def commit(self, durable: bool, fsync_directory) -> None:
        """Rename into place (replacing any file or symlink there, never following it)."""
        try:
            os.replace(self.path, self.final)
        except OSError as exc:
            raise oserror_to_checkpoint(exc, "rename the temp file to", self.final) from exc
        self.committed = True
        if durable:
            fsync_directory(self.final.parent)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        """Remove the temp file unless it was committed, and close it.

        Raises nothing of its own, and may be called again after an interrupt landed
        in it (each step is done once: the descriptor is never closed twice).
        """
        # No `with` here: entering a context manager is one more place where an
        # interrupt could land before the system call.
        if not self.committed:
            try:  # noqa: SIM105
                os.unlink(self.path)
            except OSError:
                pass
            self.committed = True  # nothing left at the temp name either way
        fd, self.fd = self.fd, -1
        if fd >= 0:
            try:  # noqa: SIM105
                os.close(fd)
            except OSError:
                pass


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) until the block is done, then hand it to the previous
    handler; in the main thread only (no other thread gets KeyboardInterrupt).

    Python runs signal handlers between bytecodes, so a ``KeyboardInterrupt`` can
    land where no ``try`` catches it: right after ``os.open`` returned, before its
    result is stored, or at the entry of HDF5's file-object callbacks, inside libhdf5.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[Any] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            if callable(previous):
                previous(signal.SIGINT, caught[0])
            elif previous == signal.SIG_DFL:
                signal.raise_signal(signal.SIGINT)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_temp_files(directory: Path, prefix: str) -> list[Path]:
    """Remove temp files of this prefix whose writer is gone. Call with the lock held.

    A temp file is removed only when nobody holds its lock and its writer's process
    is gone (or the file has not changed for ``STALE_AFTER_SECONDS``, for a process id
    that was reused).
    """
    removed: list[Path] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    stem_prefix = f"{prefix}_batch_"
    for name in names:
        if name[:1] != ".":
            continue  # every temp name starts with a dot; checkpoints do not
        match = _TEMP_RE.match(name)
        if not match or not match["stem"].startswith(stem_prefix):
            continue
        digits = match["stem"][len(stem_prefix) : -3]
        if not (digits.isascii() and digits.isdigit()):
            continue
        path = directory / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live writer holds it
            age = time.time() - os.fstat(fd).st_mtime
            if _pid_alive(int(match["pid"])) and age < STALE_AFTER_SECONDS:
                continue  # its writer may be between creating and locking it
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed.append(path)
        finally:
            os.close(fd)
    if removed:
        logger.info("removed %d temp file(s) left by writers that died", len(removed))
    return removed
