"""Which checkpoint files are intact, with a memory of what was already checked.

The Rust core hashes h5ckpt files (many at once, on all cores, with the GIL
released); legacy files are checked here through h5py. A result is remembered
against the file's identity (device, inode, size, mtime), so that save, cleanup and
find-latest in a row do not hash the same unchanged file twice.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from . import _native
from .errors import CheckpointError
from .legacy import read_legacy_summary, validate_legacy

__all__ = ["CheckpointInfo", "Verifier"]

logger = logging.getLogger("h5ckpt")

VALID = "valid"
INVALID = "invalid"
LEGACY = "legacy"
UNVERIFIED = "unverified"

_Identity = tuple[int, int, int, int]


class CheckpointInfo:
    """One checkpoint file of a directory, as ``list_checkpoints`` reports it.

    Attributes
    ----------
    path : Path
        The file.
    batch_idx : int
        Batch index, from the file name.
    loss : float
        Loss at that batch (NaN when the file is unreadable).
    timestamp : float
        Save time, seconds since the epoch (NaN when unreadable).
    size_bytes : int
        File size.
    status : str
        ``"valid"`` (h5ckpt file, every byte verified), ``"unverified"`` (h5ckpt
        header intact, payload not hashed in this listing), ``"legacy"`` (a file of
        the predecessor's format; checked when ``verified`` is true), or
        ``"invalid"`` (corrupt, truncated, tampered, foreign content).
    verified : bool
        Whether the whole file was checked for this status.
    error : str or None
        Why the file is invalid.
    """

    __slots__ = (
        "_path",
        "batch_idx",
        "error",
        "loss",
        "size_bytes",
        "status",
        "timestamp",
        "verified",
    )
    _FIELDS = (
        "path",
        "batch_idx",
        "loss",
        "timestamp",
        "size_bytes",
        "status",
        "verified",
        "error",
    )

    def __init__(
        self,
        path: str | os.PathLike[str],
        batch_idx: int,
        loss: float,
        timestamp: float,
        size_bytes: int,
        status: str,
        verified: bool = False,
        error: str | None = None,
    ) -> None:
        # The Path is made on first use: building 10,000 of them would cost more than
        # the whole directory scan.
        for name, value in (
            ("_path", path),
            ("batch_idx", batch_idx),
            ("loss", loss),
            ("timestamp", timestamp),
            ("size_bytes", size_bytes),
            ("status", status),
            ("verified", verified),
            ("error", error),
        ):
            object.__setattr__(self, name, value)

    @property
    def path(self) -> Path:
        """The file."""
        path = self._path
        if not isinstance(path, Path):
            path = Path(path)
            object.__setattr__(self, "_path", path)
        return path

    @property
    def is_valid(self) -> bool:
        """True when the file was verified intact (h5ckpt or legacy)."""
        return self.verified and self.status in (VALID, LEGACY)

    def _astuple(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self._FIELDS)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"CheckpointInfo is immutable: cannot set {name!r}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CheckpointInfo):
            return NotImplemented
        return self._astuple() == other._astuple()

    def __hash__(self) -> int:
        return hash(self._astuple())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._FIELDS)
        return f"CheckpointInfo({fields})"


def identity(entry: _native.Entry) -> _Identity:
    return (entry.device, entry.inode, entry.size, entry.mtime_ns)


def stat_identity(path: Path) -> _Identity | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class Verifier:
    """Checks files for one key, remembering results by file identity."""

    def __init__(self, hmac_key: bytes | None) -> None:
        self.hmac_key = hmac_key
        self._known: dict[str, tuple[_Identity, str, str | None]] = {}
        # The CheckpointInfo last reported for a path, by identity: listing an
        # unchanged file again costs a dictionary lookup, not a new object.
        self._infos: dict[str, tuple[_Identity, CheckpointInfo]] = {}

    def remember(self, path: Path, status: str, error: str | None = None) -> None:
        ident = stat_identity(path)
        self._infos.pop(str(path), None)
        if ident is not None:
            self._known[str(path)] = (ident, status, error)

    def forget(self, path: Path) -> None:
        self._known.pop(str(path), None)
        self._infos.pop(str(path), None)

    def known(self, entry: _native.Entry) -> tuple[str, str | None] | None:
        hit = self._known.get(entry.path)
        if hit is not None and hit[0] == identity(entry):
            return hit[1], hit[2]
        return None

    def check(
        self, entries: Sequence[_native.Entry], full: bool, complete: bool = False
    ) -> list[CheckpointInfo]:
        """Status of each entry; with ``full``, every file not known is verified.

        ``complete`` says that ``entries`` is a whole directory listing: what is
        remembered about files no longer in it is dropped.
        """
        if complete:
            self._prune({e.path for e in entries})
        infos: list[CheckpointInfo | None] = [None] * len(entries)
        results: list[tuple[str, bool, str | None] | None] = [None] * len(entries)
        to_hash: list[int] = []
        cached = self._infos
        for i, entry in enumerate(entries):
            hit = cached.get(entry.path)
            if hit is not None and (hit[1].verified or not full) and hit[0] == identity(entry):
                infos[i] = hit[1]
                continue
            results[i] = self._cheap_status(entry, full)
            if results[i] is None:
                to_hash.append(i)
        if to_hash:
            outcomes = _native.verify_files([entries[i].path for i in to_hash], self.hmac_key)
            for i, outcome in zip(to_hash, outcomes, strict=True):
                entry = entries[i]
                if isinstance(outcome, Exception):
                    results[i] = (INVALID, True, str(outcome))
                    logger.warning("invalid checkpoint %s: %s", entry.path, outcome)
                else:
                    results[i] = (VALID, True, None)
                self._known[entry.path] = (identity(entry), results[i][0], results[i][2])
        for i, result in enumerate(results):
            if result is not None:
                entry = entries[i]
                infos[i] = info = self._info(entry, result)
                cached[entry.path] = (identity(entry), info)
        return infos  # type: ignore[return-value]

    def _prune(self, paths: set[str]) -> None:
        for table in (self._known, self._infos):
            # list(table) copies the keys at once: a save in another thread may
            # remember a file meanwhile.
            for gone in [p for p in list(table) if p not in paths]:
                table.pop(gone, None)

    def _cheap_status(
        self, entry: _native.Entry, full: bool
    ) -> tuple[str, bool, str | None] | None:
        """The status without hashing, or None when the file must be hashed."""
        if entry.kind == "foreign":
            return (INVALID, True, entry.error or "not a checkpoint file")
        if entry.error is not None:
            return (INVALID, True, entry.error)
        if entry.kind == "legacy" and self.hmac_key is not None:
            return (INVALID, True, "legacy file without an HMAC tag, refused by a keyed manager")
        if entry.header is not None and entry.header.batch_idx != entry.batch_idx:
            # A renamed file would otherwise resume, and be retained, as another batch.
            return (
                INVALID,
                True,
                f"file name says batch {entry.batch_idx}, header says {entry.header.batch_idx}",
            )
        known = self.known(entry)
        if known is not None:
            return (known[0], True, known[1])
        if not full:
            return (LEGACY if entry.kind == "legacy" else UNVERIFIED, False, None)
        if entry.kind == "legacy":
            try:
                validate_legacy(Path(entry.path))
                status: tuple[str, bool, str | None] = (LEGACY, True, None)
            except CheckpointError as exc:
                status = (INVALID, True, str(exc))
            self._known[entry.path] = (identity(entry), status[0], status[2])
            return status
        return None

    @staticmethod
    def _info(entry: _native.Entry, result: tuple[str, bool, str | None]) -> CheckpointInfo:
        status, verified, error = result
        loss = timestamp = float("nan")
        if entry.header is not None:
            loss, timestamp = entry.header.loss, entry.header.timestamp
        elif entry.kind == "legacy" and status != INVALID:
            try:
                _, loss, timestamp = read_legacy_summary(Path(entry.path))
            except CheckpointError as exc:
                status, verified, error = INVALID, True, str(exc)
        return CheckpointInfo(
            path=entry.path,
            batch_idx=entry.batch_idx,
            loss=loss,
            timestamp=timestamp,
            size_bytes=entry.size,
            status=status,
            verified=verified,
            error=error,
        )
