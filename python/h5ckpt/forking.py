"""Making live objects usable again in a child of ``os.fork()``.

A forked child has one thread, a copy of all memory and the parent's descriptors:
locks that other threads held stay held with nobody to release them, a thread pool
counts workers that do not exist, and a descriptor with an ``flock`` on it is the
parent's lock, not the child's. Objects that hold such state register here; in the
child, right after the fork, each one's ``_after_fork_in_child()`` replaces it with
fresh state. Registration is by weak reference: it keeps nothing alive.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Protocol

__all__ = ["reset_in_child"]

logger = logging.getLogger("h5ckpt")


class _Resettable(Protocol):
    def _after_fork_in_child(self) -> None: ...


_live: weakref.WeakSet[_Resettable] = weakref.WeakSet()


def reset_in_child(obj: _Resettable) -> None:
    """Call ``obj._after_fork_in_child()`` in every child forked while it lives."""
    _live.add(obj)


def _after_fork_in_child() -> None:
    for obj in list(_live):
        try:
            obj._after_fork_in_child()
        except Exception:  # one object's failure must not leave the others broken
            logger.exception("resetting %r after fork failed", obj)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
