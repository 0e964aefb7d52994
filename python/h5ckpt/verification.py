"""Which checkpoint files are intact, with a memory of what was already checked.

The Rust core scans the directory and hashes h5ckpt files (many at once, on all
cores, with the GIL released); legacy files are checked here through h5py. A result
is remembered against the file's identity (device, inode, size, mtime, ctime), so
that save, cleanup and find-latest in a row do not hash the same unchanged file
twice, and listing an unchanged directory again reads no file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from . import _native
from ._native import CheckpointInfo
from .errors import CheckpointError
from .legacy import read_legacy_summary, validate_legacy

__all__ = ["CheckpointInfo", "Verifier"]

logger = logging.getLogger("h5ckpt")

VALID = "valid"
INVALID = "invalid"
LEGACY = "legacy"
UNVERIFIED = "unverified"

_Identity = tuple[int, int, int, int, int]


def stat_identity(path: Path) -> _Identity | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class Verifier:
    """Lists and checks the checkpoint files of one directory for one key.

    The native catalog scans the directory (reading only files that changed since
    the last listing) and remembers every result by file identity; this class adds
    what needs Python: hashing orchestration and the h5py side of legacy files.
    """

    def __init__(self, directory: Path, prefix: str, hmac_key: bytes | None) -> None:
        self.hmac_key = hmac_key
        self.catalog = _native.Catalog(directory, prefix, hmac_key is not None)

    def list(self, full: bool = False) -> list[CheckpointInfo]:
        """Every checkpoint file of the directory by batch index; with ``full``,
        every file not checked before is checked now."""
        infos, unsummarized = self.catalog.list()
        for i in unsummarized:
            infos[i] = self._summarize(infos[i])
        return self.verify(infos) if full else infos

    def verify(self, infos: Sequence[CheckpointInfo]) -> list[CheckpointInfo]:
        """``infos`` with every file not yet checked checked: h5ckpt files hashed
        together on all cores, legacy files opened through h5py."""
        out = list(infos)
        to_hash = [i for i, info in enumerate(out) if info.status == UNVERIFIED]
        if to_hash:
            paths = [out[i].path for i in to_hash]
            outcomes = _native.verify_files(paths, self.hmac_key)
            for i, outcome in zip(to_hash, outcomes, strict=True):
                if isinstance(outcome, Exception):
                    logger.warning("invalid checkpoint %s: %s", out[i].path, outcome)
                    out[i] = self.catalog.note(out[i], INVALID, str(outcome))
                else:
                    out[i] = self.catalog.note(out[i], VALID)
        for i, info in enumerate(out):
            if info.status == LEGACY and not info.verified:
                try:
                    validate_legacy(info.path)
                    out[i] = self.catalog.note(info, LEGACY)
                except CheckpointError as exc:
                    out[i] = self.catalog.note(info, INVALID, str(exc))
        return out

    def _summarize(self, info: CheckpointInfo) -> CheckpointInfo:
        try:
            _, loss, timestamp = read_legacy_summary(info.path)
        except CheckpointError as exc:
            return self.catalog.note(info, INVALID, str(exc))
        return self.catalog.note(info, loss=loss, timestamp=timestamp)

    def remember(self, path: Path, status: str, error: str | None = None) -> None:
        """Record ``status`` for ``path`` as the file is now."""
        self.catalog.remember(path.name, status, error)

    def forget(self, path: Path) -> None:
        self.catalog.forget(path.name)
