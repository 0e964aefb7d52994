"""Which checkpoint files are intact, with a memory of what was already checked.

The Rust core scans the directory and hashes h5ckpt files (many at once, on all
cores, with the GIL released); legacy files are checked here through h5py. A result
is remembered against the file's identity (device, inode, size, mtime, ctime), so
that save, cleanup and find-latest in a row do not hash the same unchanged file
twice, and listing an unchanged directory again reads no file.

Bit rot changes no part of the identity, so a remembered "valid" is a belief about
the file as it was checked, not a check: it serves the manager's own decisions
(retention after a save, find-latest, which ``load_checkpoint`` backs by verifying
every byte again), while a caller who asks for verification (``recheck``) gets the
files hashed again.
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

    def list(self, full: bool = False, recheck: bool = False) -> list[CheckpointInfo]:
        """Every checkpoint file of the directory by batch index; with ``full``,
        every file not checked before is checked now; with ``recheck`` too, also
        every file remembered as valid or legacy (see :meth:`verify`)."""
        infos, unsummarized = self.catalog.list()
        for i in unsummarized:
            infos[i] = self._summarize(infos[i])
        return self.verify(infos, recheck=recheck) if full or recheck else infos

    def verify(
        self, infos: Sequence[CheckpointInfo], recheck: bool = False
    ) -> list[CheckpointInfo]:
        """``infos`` with every file not yet checked checked: h5ckpt files hashed
        together on all cores, legacy files opened through h5py.

        With ``recheck``, files remembered as valid (or as checked legacy files) are
        checked again, and what is found replaces what was remembered. A file known
        to be invalid stays so: its identity has not changed since, and a verdict
        from loading (intact bytes that do not load) is not a hash's to overturn.
        """
        out = list(infos)
        again = (VALID,) if recheck else ()
        to_hash = [i for i, info in enumerate(out) if info.status in (UNVERIFIED, *again)]
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
            if info.status == LEGACY and (recheck or not info.verified):
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
