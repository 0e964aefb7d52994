"""Names and directory operations of sharded checkpoints (no MPI needed).

A step is the directory ``{prefix}_batch_{batch_idx:04d}/`` holding
``shard_{rank:05d}_of_{world:05d}.h5`` per rank and ``manifest.h5``. While a step is
written it lives in a hidden staging directory next to it; a step that retention
removes is first renamed to a hidden ``.deleting`` name, so it is never seen half
deleted under its step name.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Set as AbstractSet
from pathlib import Path

from .. import _native
from .._native import fsync_directory
from ..staging import STALE_AFTER_SECONDS, _pid_alive, oserror_to_checkpoint

__all__ = [
    "MANIFEST_NAME",
    "StagingDir",
    "list_steps",
    "retire_step",
    "shard_name",
    "step_name",
    "sweep_hidden",
]

logger = logging.getLogger("h5ckpt")

MANIFEST_NAME = "manifest.h5"
_SHARD_RE = re.compile(r"^shard_(\d{5,})_of_(\d{5,})\.h5$", re.A)
_HIDDEN_RE = re.compile(
    r"^\.(?P<step>.+_batch_\d+)\.(?P<pid>\d+)\.[0-9a-f]{12}\.(?P<kind>staging|deleting)$", re.A
)


def step_name(prefix: str, batch_idx: int) -> str:
    # A step is named as the single-file checkpoint of its batch, without ".h5":
    # one name rule (the native one) for both.
    return _native.checkpoint_name(prefix, batch_idx).removesuffix(".h5")


def shard_name(rank: int, world: int) -> str:
    return f"shard_{rank:05d}_of_{world:05d}.h5"


def parse_shard_name(name: str) -> tuple[int, int] | None:
    m = _SHARD_RE.match(name)
    if not m or shard_name(int(m[1]), int(m[2])) != name:
        return None
    return int(m[1]), int(m[2])


def _batch_of(name: str, prefix: str) -> int | None:
    batch = _native.checkpoint_batch(name + ".h5", prefix)
    if batch is None:
        return None
    # Only the canonical spelling: "x_batch_07" and "x_batch_0007" are not both steps.
    return batch if step_name(prefix, batch) == name else None


def list_steps(directory: Path, prefix: str) -> list[tuple[int, Path]]:
    """Real directories named like steps of ``prefix``, by batch index."""
    out: list[tuple[int, Path]] = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return out
    except OSError as exc:
        raise oserror_to_checkpoint(exc, "list", directory) from exc
    for entry in entries:
        batch = _batch_of(entry.name, prefix)
        if batch is None:
            continue
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
        except OSError:
            continue
        out.append((batch, Path(entry.path)))
    out.sort()
    return out


def is_step_dir(path: Path) -> tuple[str, int] | None:
    """``(prefix, batch_idx)`` when ``path``'s name is a step name, else None."""
    parts = _native.checkpoint_name_parts(path.name + ".h5")
    if parts is None:
        return None
    batch = _batch_of(path.name, parts[0])
    return None if batch is None else (parts[0], batch)


def _hidden(step: str, kind: str) -> str:
    return f".{step}.{os.getpid()}.{secrets.token_hex(6)}.{kind}"


class StagingDir:
    """A new hidden directory a step is written into, ``flock``ed while in use.

    The lock is on the directory itself, so it exists from the first moment the
    directory is in use to the rename (the kernel drops it when the committing rank
    dies, however it dies), and no lock file ever reaches the step.
    """

    def __init__(self, directory: Path, step: str) -> None:
        self.final = directory / step
        self.path = directory / _hidden(step, "staging")
        try:
            os.mkdir(self.path, 0o755)
        except OSError as exc:
            raise oserror_to_checkpoint(exc, "create the staging directory", self.path) from exc
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            shutil.rmtree(self.path, ignore_errors=True)
            raise oserror_to_checkpoint(exc, "open the staging directory", self.path) from exc
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except OSError as exc:
            self.discard()
            raise oserror_to_checkpoint(exc, "lock the staging directory", self.path) from exc

    def commit(self, durable: bool) -> None:
        """Make the staged step the step ``final`` in one rename (an existing step of the
        same batch is swapped out atomically, then removed). Call after the last
        file's directory fsync."""
        try:
            _rename_dir(self.path, self.final)
        except OSError as exc:
            raise oserror_to_checkpoint(exc, "rename the staging directory to", self.final) from exc
        finally:
            self._close()
        if durable:
            fsync_directory(self.final.parent)

    def discard(self) -> None:
        """Remove the staging directory after a failed save; never raises."""
        shutil.rmtree(self.path, ignore_errors=True)
        self._close()

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries atomically (Linux renameat2); False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _rename_dir(staged: Path, final: Path) -> None:
    try:
        os.rename(staged, final)  # no step of this batch yet (or an empty directory)
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    # A step of the same batch exists (a run resumed from an older step saves it again).
    if _exchange(staged, final):
        shutil.rmtree(staged, ignore_errors=True)  # the old step, now under the hidden name
        return
    aside = final.parent / _hidden(final.name, "deleting")
    os.rename(final, aside)
    os.rename(staged, final)
    shutil.rmtree(aside, ignore_errors=True)


def retire_step(step: Path, durable: bool) -> None:
    """Delete a step: unreachable first (renamed to a hidden name), then removed."""
    aside = step.parent / _hidden(step.name, "deleting")
    os.rename(step, aside)
    if durable:
        fsync_directory(step.parent)
    shutil.rmtree(aside, ignore_errors=True)


def sweep_hidden(directory: Path, prefix: str, keep: AbstractSet[Path] = frozenset()) -> list[Path]:
    """Remove staging and half-deleted directories of ``prefix`` left by dead jobs.

    A staging directory is stale when nobody holds its ``flock`` (its committing rank
    is gone). Names that are not exactly ours are never touched.
    """
    removed: list[Path] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        m = _HIDDEN_RE.match(name) if name[:1] == "." else None
        if not m or _batch_of(m["step"], prefix) is None:
            continue
        path = directory / name
        if path in keep or path.is_symlink() or not path.is_dir():
            continue
        if m["kind"] == "staging" and not _staging_stale(path, int(m["pid"])):
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append(path)
    if removed:
        logger.info("removed %d staging/deleted step director(ies) of dead jobs", len(removed))
    return removed


def _staging_stale(path: Path, pid: int) -> bool:
    """Nobody holds the directory's lock, and its creator is gone (or it has not
    changed for ``STALE_AFTER_SECONDS``: a pid of another host, or one reused)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # a live job holds it
        age = time.time() - os.fstat(fd).st_mtime
    finally:
        os.close(fd)
    # Between mkdir and flock a live creator holds no lock yet: its pid tells.
    return not _pid_alive(pid) or age > STALE_AFTER_SECONDS


def remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        shutil.rmtree(path)
