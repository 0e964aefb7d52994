"""Deleting large checkpoint files without making the next save wait for the disk."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

__all__ = ["Reclaimer"]


class Reclaimer:
    """Deletes files at once and frees the space of large ones in a background thread.

    Unlinking a large file frees its cached pages and its blocks inside the ``unlink``
    call: tens of milliseconds per 100 MB, which retention would add to every save.
    With a descriptor open across the unlink, that work moves to the last ``close``,
    which a short-lived thread does. The name leaves the directory at once. At most
    one batch of closes is outstanding; saves wait for it before they start, so space
    comes back before new space is taken.
    """

    MIN_BYTES = 16 << 20

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None

    def unlink(self, path: Path, size: int, held: list[int]) -> None:
        """Unlink ``path``; for a large file, append a descriptor to close to ``held``."""
        fd = -1
        if size >= self.MIN_BYTES:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                fd = -1
        try:
            path.unlink()
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        if fd >= 0:
            held.append(fd)

    def close_later(self, fds: list[int]) -> None:
        if not fds:
            return
        self.wait()
        thread = threading.Thread(
            target=_close_all, args=(fds,), name="h5ckpt-reclaim", daemon=True
        )
        try:
            thread.start()
        except RuntimeError:  # no thread to be had: close here
            _close_all(fds)
            return
        self._thread = thread

    def wait(self) -> None:
        """Until the space of the files deleted so far is freed."""
        thread = self._thread
        if thread is not None:
            thread.join()


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
