"""Which checkpoint files are intact, with a memory of what was already checked.

The Rust core scans the directory and hashes h5ckpt files (many at once, on all
cores, with the GIL released); legacy files are checked here through h5py. A result
is remembered against the file's identity (device, inode, size, mtime, ctime), so
that save, cleanup and find-latest in a row do not hash the same unchanged file
twice, and listing an unchanged directory again reads no file.

One definition of valid serves every caller (``validate_checkpoint``, listing,
find-latest, retention, ``h5ckpt verify`` and ``ls --verify``): :func:`check_file`.
A file is invalid only when what it holds cannot load with the reader's key and
limits (:data:`VERDICT_ERRORS`); when the check itself fails (memory, descriptors,
a read error) nothing is concluded about the file.

Bit rot changes no part of the identity, so a remembered "valid" is a belief about
the file as it was checked, not a check: it serves the manager's own decisions
(retention after a save, find-latest, which ``load_checkpoint`` backs by verifying
every byte again), while a caller who asks for verification (``recheck``) gets the
files checked again.
"""

from __future__ import annotations

import builtins
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Final, Literal

from . import _native
from ._native import CheckpointInfo, Header
from .errors import (
    CheckpointAuthenticationError,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointLimitError,
    CheckpointNotFoundError,
    CheckpointVersionError,
)
from .legacy import read_legacy_summary, validate_legacy
from .limits import LoadLimits
from .opening import open_regular
from .payload import check_payload
from .staging import oserror_to_checkpoint

__all__ = [
    "VERDICT_ERRORS",
    "CheckpointInfo",
    "Verifier",
    "check_file",
    "check_h5ckpt_files",
    "check_name",
    "check_size",
    "check_verified",
]

logger = logging.getLogger("h5ckpt")

# The statuses and the file-name rule are the Rust core's (one spelling each).
VALID: Final = _native.STATUS_VALID
INVALID: Final = _native.STATUS_INVALID
LEGACY: Final = _native.STATUS_LEGACY
UNVERIFIED: Final = _native.STATUS_UNVERIFIED
Status = Literal["valid", "invalid", "legacy", "unverified"]

#: The errors that are a verdict on a file: it cannot load with this reader's key
#: and limits. Any other error of a check (out of memory or descriptors, a failed
#: read, a vanished file) says nothing about the file.
VERDICT_ERRORS = (CheckpointCorruptError, CheckpointVersionError, CheckpointLimitError)

_Identity = tuple[int, int, int, int, int]


def stat_identity(path: Path) -> _Identity | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def check_name(path: Path, batch_idx: int) -> None:
    """A file named like a checkpoint must hold the batch its name says: a renamed
    file would otherwise resume, and be retained, as another batch."""
    parts = _native.checkpoint_name_parts(path.name)
    if parts is not None and parts[1] != batch_idx:
        raise CheckpointCorruptError(
            f"checkpoint {path}: file name says batch {parts[1]}, header says {batch_idx}",
            {"path": str(path), "reason": "name"},
        )


#: A payload tree costs at most this much HDF5 structure per node and per file on
#: top of its arrays: what bounds a loadable file's size by ``max_array_bytes``.
_STRUCTURE_BYTES_PER_NODE = 4096
_STRUCTURE_BYTES = 1 << 20


def check_size(path: Path, header: _native.Header, size: int, limits: LoadLimits) -> None:
    """Refuse, before reading it, a file whose length disagrees with its header or
    that is too large for any payload within ``limits.max_array_bytes``."""
    want = header.payload_offset + header.payload_length
    if size != want:
        raise CheckpointCorruptError(
            f"checkpoint {path}: the file is {size} bytes long, its header says {want} "
            "(truncated or extended)",
            {"path": str(path), "size_bytes": size, "header_bytes": want},
        )
    check_size_limit(path, size, limits)


def check_size_limit(path: Path, size: int, limits: LoadLimits) -> None:
    """Refuse a file too large for any payload within ``limits.max_array_bytes``
    (nothing of it needs to be read for that)."""
    if limits.max_array_bytes is not None:
        most = (
            limits.max_array_bytes + limits.max_nodes * _STRUCTURE_BYTES_PER_NODE + _STRUCTURE_BYTES
        )
        if size > most:
            raise CheckpointLimitError(
                f"checkpoint {path} is {size} bytes, more than a payload within "
                f"max_array_bytes={limits.max_array_bytes} can take; raise it with "
                "CheckpointManager(..., load_limits=LoadLimits(max_array_bytes=...))",
                {"path": str(path), "size_bytes": size, "max_array_bytes": limits.max_array_bytes},
            )


def check_verified(path: Path, header: Header, fd: int, limits: LoadLimits) -> None:
    """What makes an h5ckpt file whose digests (and tag) verified valid, for the
    file open at ``fd`` and named ``path``: its name and size agree with its header
    and limits, and its payload passes every check loading makes."""
    try:
        check_size(path, header, os.fstat(fd).st_size, limits)
        check_payload(fd, header, limits=limits, path=path)
        check_name(path, header.batch_idx)
    except OSError as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise oserror_to_checkpoint(exc, "read", path) from exc
    except CheckpointError as exc:
        if str(path) not in exc.message:
            exc.message = f"{path}: {exc.message}"
            exc.args = (exc.message,)
        exc.error_context.setdefault("path", str(path))
        raise


#: Files checked at once by :func:`check_h5ckpt_files` (one descriptor each).
_FILES_AT_ONCE = 64


def check_h5ckpt_files(
    paths: Sequence[Path], hmac_key: bytes | None, limits: LoadLimits
) -> list[Header | CheckpointError]:
    """For each h5ckpt file, its header if it is valid (see :func:`check_file`), else
    the error: each file is opened once and every check is made on that open file
    (digests hashed in parallel by the Rust core), so a file replaced meanwhile is
    never judged by parts of two files."""
    out: list[Header | CheckpointError] = []
    for start in range(0, len(paths), _FILES_AT_ONCE):
        out.extend(_check_some(paths[start : start + _FILES_AT_ONCE], hmac_key, limits))
    return out


def _check_some(
    paths: Sequence[Path], hmac_key: bytes | None, limits: LoadLimits
) -> list[Header | CheckpointError]:
    results: list[Header | CheckpointError | None] = [None] * len(paths)
    fds: dict[int, int] = {}
    try:
        for i, path in enumerate(paths):
            try:
                fds[i] = open_regular(path)
            except CheckpointError as exc:
                results[i] = exc
        opened = list(fds)
        outcomes = _native.verify_fds(
            [fds[i] for i in opened], [paths[i] for i in opened], hmac_key
        )
        for i, outcome in zip(opened, outcomes, strict=True):
            if not isinstance(outcome, Exception):
                try:
                    check_verified(paths[i], outcome, fds[i], limits)
                except CheckpointError as exc:
                    outcome = exc
            results[i] = outcome
    finally:
        for fd in fds.values():
            os.close(fd)
    return results  # type: ignore[return-value]


def check_file(path: Path, kind: str, hmac_key: bytes | None, limits: LoadLimits) -> None:
    """Raise one of :data:`VERDICT_ERRORS` unless ``path`` (of format ``kind``:
    ``"h5ckpt"`` or ``"legacy"``, from its first bytes) is a checkpoint that loads
    with ``hmac_key`` and ``limits``; another ``CheckpointError`` when that cannot
    be told now (the file is then neither valid nor invalid)."""
    if kind == "legacy":
        if hmac_key is not None:
            raise CheckpointAuthenticationError(
                f"{path} is a legacy file without an HMAC tag; a keyed manager refuses it",
                {"path": str(path), "reason": "unsigned"},
            )
        batch, _, _ = validate_legacy(path, limits=limits)
        check_name(path, batch)
        return
    # A file too large for the limits is refused before it is hashed.
    check_size(path, _native.read_header(path), os.stat(path).st_size, limits)
    (outcome,) = check_h5ckpt_files([path], hmac_key, limits)
    if isinstance(outcome, Exception):
        raise outcome


class Verifier:
    """Lists and checks the checkpoint files of one directory for one key and one
    set of limits.

    The native catalog scans the directory (reading only files that changed since
    the last listing) and remembers every result by file identity; this class adds
    what needs Python: the payload checks after the digests, hashing orchestration
    and the h5py side of legacy files.
    """

    def __init__(
        self, directory: Path, prefix: str, hmac_key: bytes | None, limits: LoadLimits
    ) -> None:
        self.hmac_key = hmac_key
        self.limits = limits
        self.catalog = _native.Catalog(directory, prefix, hmac_key is not None)

    def list(self, full: bool = False, recheck: bool = False) -> list[CheckpointInfo]:
        """Every checkpoint file of the directory by batch index; with ``full``,
        every file not checked before is checked now; with ``recheck`` too, also
        every file remembered as valid or legacy (see :meth:`verify`)."""
        infos, unsummarized = self.catalog.list()
        for i in unsummarized:
            infos[i] = self._summarize(infos[i])
        return self.verify(infos, recheck=recheck) if full or recheck else infos

    def verify(
        self, infos: Sequence[CheckpointInfo], strict: bool = False, recheck: bool = False
    ) -> builtins.list[CheckpointInfo]:
        """``infos`` with every file not yet checked checked: h5ckpt files hashed
        together on all cores, legacy files opened through h5py.

        A file whose check failed without a verdict (see :data:`VERDICT_ERRORS`)
        stays ``"unverified"``, with the failure as its ``error``, and nothing is
        remembered; with ``strict`` that failure is raised instead (a vanished file
        is skipped either way).

        With ``recheck``, files remembered as valid (or as checked legacy files) are
        checked again, and what is found replaces what was remembered. A file known
        to be invalid stays so: its identity has not changed since, and a verdict
        from loading (intact bytes that do not load) is not a hash's to overturn.
        """
        out = list(infos)
        again = (VALID,) if recheck else ()
        to_hash = []
        for i, info in enumerate(out):
            if info.status not in (UNVERIFIED, *again):
                continue
            try:
                check_size_limit(info.path, info.size_bytes, self.limits)
            except CheckpointLimitError as exc:
                out[i] = self._outcome(info, exc, VALID, strict)
                continue
            to_hash.append(i)
        if to_hash:
            paths = [out[i].path for i in to_hash]
            outcomes = check_h5ckpt_files(paths, self.hmac_key, self.limits)
            for i, outcome in zip(to_hash, outcomes, strict=True):
                out[i] = self._outcome(out[i], outcome, VALID, strict)
        for i, info in enumerate(out):
            if info.status == LEGACY and (recheck or not info.verified):
                failure: CheckpointError | None = None
                try:
                    batch, _, _ = validate_legacy(info.path, limits=self.limits)
                    check_name(info.path, batch)
                except CheckpointError as exc:
                    failure = exc
                out[i] = self._outcome(info, failure, LEGACY, strict)
        return out

    def _outcome(
        self, info: CheckpointInfo, outcome: object, good: Status, strict: bool
    ) -> CheckpointInfo:
        if not isinstance(outcome, Exception):
            return self.catalog.note(info, good)
        if isinstance(outcome, VERDICT_ERRORS):
            logger.warning("invalid checkpoint %s: %s", info.path, outcome)
            return self.catalog.note(info, INVALID, str(outcome))
        if strict and not isinstance(outcome, CheckpointNotFoundError):
            raise outcome
        logger.warning("could not check checkpoint %s: %s", info.path, outcome)
        return CheckpointInfo(
            info.path,
            info.batch_idx,
            info.loss,
            info.timestamp,
            info.size_bytes,
            UNVERIFIED,
            False,
            f"could not be checked: {outcome}",
        )

    def _summarize(self, info: CheckpointInfo) -> CheckpointInfo:
        try:
            _, loss, timestamp = read_legacy_summary(info.path)
        except VERDICT_ERRORS as exc:
            return self.catalog.note(info, INVALID, str(exc))
        except CheckpointError as exc:
            logger.warning("could not read legacy checkpoint %s: %s", info.path, exc)
            return info
        return self.catalog.note(info, loss=loss, timestamp=timestamp)

    def remember(self, path: Path, status: Status, error: str | None = None) -> None:
        """Record ``status`` for ``path`` as the file is now.

        A save records "valid" for the file it has just committed without reading it
        back. That is sound because the digest in its header was computed over exactly
        the bytes written: the big arrays are copied once from the caller's memory into
        a private buffer that is both hashed and written (the caller may change them
        meanwhile), and everything else is read back from the file after HDF5 closed
        it; nobody else writes the locked temp file, and the identity recorded here
        is that of the renamed file. What can still go wrong later (bit rot) is what
        ``recheck`` and ``load_checkpoint`` look for.
        """
        self.catalog.remember(path.name, status, error)

    def forget(self, path: Path) -> None:
        self.catalog.forget(path.name)
