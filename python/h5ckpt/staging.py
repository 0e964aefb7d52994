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
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import _native, errors
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointPermissionError,
    CheckpointStorageError,
)
from .forking import reset_in_child

__all__ = [
    "LOCK_NAME",
    "DirectoryLock",
    "StagedFile",
    "new_file_mode",
    "oserror_to_checkpoint",
    "process_umask",
    "sigint_deferred",
    "staged_file",
    "sweep_temp_files",
]

logger = logging.getLogger("h5ckpt")

LOCK_NAME = ".h5ckpt.lock"
#: A temp file whose writer still runs but whose lock is free is taken as stale after this.
STALE_AFTER_SECONDS = 600.0
#: ``.{checkpoint name}.{pid}.{12 hex digits}.tmp``; the stem is checked by the
#: native name rule (``_native.checkpoint_name_parts``).
_TEMP_RE = re.compile(r"\.(?P<stem>.+)\.(?P<pid>[0-9]+)\.[0-9a-f]{12}\.tmp", re.A)


def _temp_stem(name: str) -> str | None:
    """The checkpoint name a temp file ``name`` stands for, or ``None``."""
    match = _TEMP_RE.fullmatch(name)
    if match is None or _native.checkpoint_name_parts(match["stem"]) is None:
        return None
    return match["stem"]


def process_umask() -> int:
    """This process's umask, read without changing it.

    ``os.umask`` can only read the mask by setting another one, and a thread that
    creates a file meanwhile gets the wrong mode; Linux reports it in
    ``/proc/self/status`` instead. The set-and-restore is only the fallback.
    """
    try:
        # Read with one system call (the line is near the top): every save asks.
        # A file object, not a bare descriptor: an interrupt that lands between the
        # open and the close drops the object, and dropping it closes the file.
        with open("/proc/self/status", "rb", buffering=0) as status:
            head = status.read(4096)
        start = head.index(b"\nUmask:") + len(b"\nUmask:")
        return int(head[start : head.index(b"\n", start)], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode a file created now with ``0o666`` gets: what a user expects of a save."""
    return 0o666 & ~process_umask()


def oserror_to_checkpoint(
    exc: OSError, action: str, path: str | os.PathLike[str]
) -> CheckpointError:
    """The ``CheckpointError`` subclass that matches an ``OSError``.

    The errno decides, by the native module's table (the one the Rust core raises
    by); an ``OSError`` without an errno is classed by its type.
    """
    context = {"path": str(path), "errno": exc.errno, "action": action}
    message = f"cannot {action} {path}: {exc.strerror or exc}"
    if exc.errno is not None:
        name = _native.ERRNO_CLASSES.get(exc.errno, _native.DEFAULT_OS_ERROR_CLASS)
        cls = getattr(errors, name)
    elif isinstance(exc, FileNotFoundError):
        cls = CheckpointNotFoundError
    elif isinstance(exc, PermissionError):
        cls = CheckpointPermissionError
    else:
        cls = CheckpointStorageError
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        message += " (the file system is full or the file size limit was reached)"
    return cls(message, context)


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
        reset_in_child(self)

    def _after_fork_in_child(self) -> None:
        # Another thread of the parent may have held the thread lock at the fork.
        # The inherited descriptor is closed by _close_inherited_descriptors; the
        # child locks on a descriptor of its own, which excludes the parent.
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._fd = None

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
        global _descriptors_opened
        _descriptors_opened = True
        # The lock guards changes to the directory: one this process cannot change
        # is refused here, before anything is half done (the lock file opens
        # read-only, so opening it would not tell).
        directory = self.path.parent
        if not os.access(directory, os.W_OK):
            try:
                readonly_fs = os.statvfs(directory).f_flag & os.ST_RDONLY
            except OSError as exc:  # gone, or not a directory any more
                raise oserror_to_checkpoint(exc, "open the lock file", self.path) from exc
            code = errno.EROFS if readonly_fs else errno.EACCES
            raise oserror_to_checkpoint(
                OSError(code, os.strerror(code)), "change the checkpoint directory", directory
            )
        fd = -1
        try:
            with sigint_deferred():  # a Ctrl-C right after open() would lose the descriptor
                fd = self._checked_open()
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException as exc:  # an interrupt while waiting too
            if fd >= 0:
                os.close(fd)
            if isinstance(exc, OSError):
                action = "lock" if fd >= 0 else "open the lock file"
                raise oserror_to_checkpoint(exc, action, self.path) from exc
            raise
        self._fd = fd

    def _checked_open(self) -> int:
        """A descriptor of the lock file, which must be a regular file."""
        try:
            fd = self._open()
        except PermissionError as exc:
            error = oserror_to_checkpoint(exc, "open the lock file", self.path)
            error.message += (
                " (every user who saves or prunes here must be able to read it: its owner"
                " can run `chmod a+r` on it, or remove it while no save runs)"
            )
            error.args = (error.message,)
            raise error from exc
        except OSError as exc:
            raise oserror_to_checkpoint(exc, "open the lock file", self.path) from exc
        try:
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
        except OSError as exc:
            os.close(fd)
            raise oserror_to_checkpoint(exc, "stat", self.path) from exc
        if not regular:
            os.close(fd)
            raise CheckpointStorageError(
                f"the lock file {self.path} is not a regular file: remove it",
                {"path": str(self.path)},
            )
        return fd

    def _open(self) -> int:
        """A descriptor of the lock file, made if missing.

        Read-only: ``flock`` needs no more, so every user who can read the file can
        lock it. A new lock file gets the mode of any new file, plus read access for
        whoever may write the directory, so that all who can save here lock the same
        file.
        """
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        while True:
            try:
                return os.open(self.path, flags)
            except FileNotFoundError:
                pass
            try:
                fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue  # made by another process meanwhile
            try:
                writers = os.stat(self.path.parent).st_mode & 0o222
                os.fchmod(fd, new_file_mode() | (writers << 1))
            except OSError:
                os.close(fd)
                raise
            return fd

    def _release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing drops the flock


class StagedFile:
    """A new, exclusively created, locked temp file that will become ``final``.

    Private (``0600``) while it is written; given ``mode`` (the umask does not
    apply) just before it is renamed into place.
    """

    def __init__(self, final: Path, mode: int = 0o600) -> None:
        self.final = final
        global _descriptors_opened
        _descriptors_opened = True
        self.mode = mode
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
            # On the open descriptor: the name may not be followed. The directory
            # fsync below commits this inode change with the rename.
            os.fchmod(self.fd, self.mode)
        except OSError as exc:
            raise oserror_to_checkpoint(exc, "set the mode of", self.path) from exc
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


@contextlib.contextmanager
def staged_file(
    final: Path, mode: int, *, failure: str, context: dict[str, Any]
) -> Iterator[StagedFile]:
    """A :class:`StagedFile` for a block that writes it and commits it.

    Whatever ends the block, an interrupt included, the temp file goes (unless it
    was committed) and its descriptor is closed. An ``OSError`` becomes the matching
    ``CheckpointError``; any other ``Exception`` a ``CheckpointError`` whose message
    starts with ``failure``.
    """
    staged = StagedFile(final, mode)
    try:
        yield staged
    except CheckpointError:
        raise
    except OSError as exc:
        raise oserror_to_checkpoint(exc, "write checkpoint", final) from exc
    except Exception as exc:
        raise CheckpointError(f"{failure}: {exc}", context) from exc
    finally:
        try:
            staged.discard()
        except BaseException:  # the interrupt landed in the cleanup: finish it
            staged.discard()
            raise


#: Whether this process ever opened a lock or temp file (forks need no scan otherwise).
_descriptors_opened = False


def _close_inherited_descriptors() -> None:
    """In a forked child: close every inherited descriptor of a lock or temp file.

    Each shares its open file description, and with it its ``flock``, with the
    parent: a child that kept one would keep the parent's lock alive after the
    parent released or died (a directory lock then blocks everyone, a dead writer's
    temp file looks alive to sweeps), and a lock taken through one would not
    exclude the parent. A thread of the parent may have been between opening such a
    descriptor and recording it, so they are found by name in ``/proc/self/fd``.
    """
    if not _descriptors_opened:
        return
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:  # no /proc: nothing to find them by
        return
    for name in names:
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        base = target.rpartition("/")[2].removesuffix(" (deleted)")
        if base == LOCK_NAME or _temp_stem(base) is not None:
            with contextlib.suppress(OSError):
                os.close(int(name))


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_descriptors)


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
    for name in names:
        if name[:1] != ".":
            continue  # every temp name starts with a dot; checkpoints do not
        match = _TEMP_RE.fullmatch(name)
        if not match or _native.checkpoint_batch(match["stem"], prefix) is None:
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
