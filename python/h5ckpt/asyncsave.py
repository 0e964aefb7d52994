"""Asynchronous saves: one background thread that writes snapshots in order.

The caller's state is copied before a save is queued, so the caller may change it at
once; at most one copy waits at a time (the next save's copy is made only once the
previous save is written), which bounds the memory a fast loop can pile up.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from pathlib import Path
from typing import Any

from .errors import CheckpointError
from .forking import reset_in_child
from .interop import snapshot_value

__all__ = ["AsyncSaver", "snapshot"]


class AsyncSaver:
    """The background thread of one manager's asynchronous saves, and their futures.

    Saves run one after the other in submission order. Errors stay with their
    futures until :meth:`wait_until_finished` raises the first. In a child of
    ``os.fork()`` the saver starts afresh (see :mod:`h5ckpt.forking`).

    Parameters
    ----------
    thread_name : str
        The name prefix of the background thread.
    threaded : bool, default True
        False: each save runs in the thread that submits it, before ``submit``
        returns, its outcome kept as a background save's would be (for an MPI job
        whose MPI library may only be called from one thread).
    """

    def __init__(self, thread_name: str = "h5ckpt-save", *, threaded: bool = True) -> None:
        self._thread_name = thread_name
        self._threaded = threaded
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[Future[Path]] = []
        # The last save submitted: the executor runs them in order.
        self._last: Future[Path] | None = None
        self._thread: int | None = None
        self._slots = threading.BoundedSemaphore(1)
        reset_in_child(self)

    def submit(self, prepare: Callable[[], Callable[[], Path]]) -> Future[Path]:
        """Queue the save that ``prepare()`` returns, calling it once the previous
        save is written (so that the snapshot it takes is the only one held)."""
        self._slots.acquire()
        try:
            job = prepare()
            # Outside the lock: a save in this thread may take long.
            ran = None if self._threaded else _ran(job)
            with self._lock:
                future = ran if ran is not None else self._queue(job)
                # Finished saves that succeeded have nothing left to report.
                self._pending = [f for f in self._pending if not _succeeded(f)]
                self._pending.append(future)
                self._last = future
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        return future

    def _queue(self, job: Callable[[], Path]) -> Future[Path]:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                1, thread_name_prefix=self._thread_name, initializer=self._mark_thread
            )
        return self._executor.submit(job)

    def _mark_thread(self) -> None:
        self._thread = threading.get_ident()

    def wait_for_queued(self) -> None:
        """Until the saves submitted so far have finished; their errors stay for
        :meth:`wait_until_finished`."""
        with self._lock:
            last = self._last
        # From the background thread itself (a done callback that saves), the saves
        # before are done, and the later ones wait for this one.
        if last is not None and threading.get_ident() != self._thread:
            # One background thread takes them in order: the last done, all done.
            wait_for_futures([last])

    def wait_until_finished(self) -> None:
        """Wait for every save; raise the first error among them."""
        with self._lock:
            pending, self._pending = self._pending, []
        first: BaseException | None = None
        for future in pending:
            exc = future.exception()
            if exc is not None and first is None:
                first = exc
        if first is not None:
            raise first

    def shutdown(self) -> None:
        """Let the background thread go once its saves are done (a later save
        starts another)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)

    def _after_fork_in_child(self) -> None:
        """Fresh machinery in a forked child.

        The background thread does not exist here, the executor would wait for it
        forever, and another thread may have held the lock or the snapshot slot at
        the fork. Saves that were pending belong to the parent, which completes
        them: here their futures fail at once instead of never resolving.
        """
        self._lock = threading.Lock()
        self._executor = None
        inherited, self._pending = self._pending, []
        for future in inherited:
            reinit = getattr(getattr(future, "_condition", None), "_at_fork_reinit", None)
            if reinit is not None:
                reinit()  # a parent thread may have held it at the fork
            if not future.done():
                future.set_exception(
                    CheckpointError(
                        "this asynchronous save was in progress in the parent process "
                        f"when process {os.getpid()} was forked from it; the parent "
                        "completes it, the child does not",
                        {"pid": os.getpid()},
                    )
                )
        # After the futures: their callbacks release the inherited slot.
        self._slots = threading.BoundedSemaphore(1)


def _ran(job: Callable[[], Path]) -> Future[Path]:
    """The future of ``job`` run now, in this thread."""
    future: Future[Path] = Future()
    try:
        future.set_result(job())
    except Exception as exc:  # kept for wait_until_finished, as a background save's is
        future.set_exception(exc)
    return future


def _succeeded(future: Future[Path]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None


def snapshot(value: Any) -> Any:
    """A copy of a state tree that later changes by the caller cannot reach (device
    arrays copied to host: the background write touches no array library)."""
    return snapshot_value(value)
