"""Deleting large checkpoint files without making the next save wait for the disk."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

from .forking import reset_in_child

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
        self._closing: list[int] = []
        reset_in_child(self)

    def _after_fork_in_child(self) -> None:
        # The closing thread exists only in the parent; the child's copies of the
        # descriptors it had still to close would keep the deleted files' space.
        self._thread = None
        closing, self._closing = self._closing, []
        _close_all(closing)

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
        closing = list(fds)
        thread = threading.Thread(
            target=_close_all, args=(closing,), name="h5ckpt-reclaim", daemon=True
        )
        self._closing = closing
        try:
            thread.start()
        except RuntimeError:  # no thread to be had: close here
            _close_all(closing)
            return
        self._thread = thread

    def wait(self) -> None:
        """Until the space of the files deleted so far is freed."""
        thread = self._thread
        if thread is not None:
            thread.join()


def _close_all(fds: list[int]) -> None:
    # Taken off the list before it is closed: a fork in between leaves the child one
    # descriptor too many, never a closed number that may have been reused.
    while fds:
        fd = fds.pop()
        with contextlib.suppress(OSError):
            os.close(fd)
