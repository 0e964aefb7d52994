"""The few collective steps of a sharded save or restore, each with a deadline.

Everything runs on a duplicate of the caller's communicator (so no message of ours
ever matches one of the caller's) and only through point-to-point messages that are
polled until a deadline: a rank that never arrives makes the others raise
:class:`CheckpointTimeoutError` instead of blocking for ever. Every exchange has its
own tag, so a late message of an exchange that timed out is never taken for a later
one. Polls sleep between tries, so waiting ranks leave the cores to the ranks that
work.
"""

from __future__ import annotations

import contextlib
import pickle
import time
from collections.abc import Callable
from typing import Any

from ..errors import CheckpointError

__all__ = ["DEFAULT_TIMEOUT", "Channel", "CheckpointTimeoutError"]

#: Seconds any rank waits for the others at one step of a save or restore.
DEFAULT_TIMEOUT = 1800.0
_FIRST_SLEEP = 20e-6
_MAX_SLEEP = 2e-3


class CheckpointTimeoutError(CheckpointError):
    """Other ranks did not reach a step of a collective save or restore in time."""


class _Failed:
    """An error one rank sends to the others."""

    def __init__(self, error: CheckpointError) -> None:
        self.error = error


def as_checkpoint_error(exc: BaseException, what: str) -> CheckpointError:
    if isinstance(exc, CheckpointError):
        return exc
    return CheckpointError(f"{what} failed: {type(exc).__name__}: {exc}", {})


def _sleeper() -> Callable[[], None]:
    delay = _FIRST_SLEEP

    def sleep() -> None:
        nonlocal delay
        time.sleep(delay)
        delay = min(delay * 2, _MAX_SLEEP)

    return sleep


class Channel:
    """Rank 0 as the one decider, reached by every rank with a deadline."""

    def __init__(self, comm: Any, timeout: float) -> None:
        from mpi4py import MPI

        self._MPI = MPI
        self.timeout = float(timeout)
        deadline = time.monotonic() + self.timeout
        # Idup rather than Dup: a rank that never constructs its manager must not
        # hold the others for ever.
        self.comm, request = comm.Idup()
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self._wait([request], deadline, "creating the manager's communicator")
        ub = self.comm.Get_attr(MPI.TAG_UB) or 32767
        self._tag_span = max(int(ub) - 1, 1)
        self._seq = 0

    def _tag(self) -> int:
        self._seq += 1
        return 1 + self._seq % self._tag_span

    def _wait(self, requests: list[Any], deadline: float, what: str) -> None:
        sleep = _sleeper()
        MPI = self._MPI
        while not MPI.Request.Testall(requests):
            if time.monotonic() > deadline:
                for r in requests:
                    with contextlib.suppress(MPI.Exception):
                        r.Cancel()
                raise CheckpointTimeoutError(
                    f"{what}: the other ranks did not take part within {self.timeout:g} s",
                    {"timeout": self.timeout, "rank": self.rank},
                )
            sleep()

    def _receive(self, sources: list[int], tag: int, deadline: float, what: str) -> dict[int, Any]:
        MPI = self._MPI
        got: dict[int, Any] = {}
        pending = list(sources)
        sleep = _sleeper()
        status = MPI.Status()
        while pending:
            progressed = False
            for src in list(pending):
                msg = self.comm.Improbe(source=src, tag=tag, status=status)
                if msg is None:
                    continue
                buf = bytearray(status.Get_count(MPI.BYTE))
                msg.Recv([buf, MPI.BYTE])
                got[src] = pickle.loads(buf)
                pending.remove(src)
                progressed = True
            if not pending:
                break
            if time.monotonic() > deadline:
                who = "rank 0" if pending == [0] else f"rank(s) {pending}"
                raise CheckpointTimeoutError(
                    f"{what}: {who} did not take part in time (timeout {self.timeout:g} s)",
                    {"timeout": self.timeout, "rank": self.rank, "missing": pending},
                )
            if not progressed:
                sleep()
        return got

    def gather(self, obj: Any, what: str) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 (None elsewhere)."""
        tag = self._tag()
        deadline = time.monotonic() + self.timeout
        if self.rank != 0:
            data = pickle.dumps(obj, protocol=5)
            self._wait([self.comm.Isend([data, self._MPI.BYTE], dest=0, tag=tag)], deadline, what)
            return None
        got = self._receive(list(range(1, self.size)), tag, deadline, what)
        return [obj] + [got[r] for r in range(1, self.size)]

    def bcast(self, obj: Any, what: str, patience: float = 1.0) -> Any:
        """Rank 0's ``obj`` on every rank (the others wait ``patience`` timeouts)."""
        tag = self._tag()
        deadline = time.monotonic() + self.timeout * patience
        if self.rank == 0:
            data = pickle.dumps(obj, protocol=5)
            reqs = [
                self.comm.Isend([data, self._MPI.BYTE], dest=r, tag=tag)
                for r in range(1, self.size)
            ]
            self._wait(reqs, deadline, what)
            return obj
        return self._receive([0], tag, deadline, what)[0]

    def decide(
        self,
        local: Callable[[], Any],
        decide: Callable[[list[Any]], Any],
        what: str,
    ) -> Any:
        """Run ``local`` on every rank, let rank 0 ``decide`` on all results, and return
        the decision on every rank, or raise the same ``CheckpointError`` on every rank.

        ``decide`` gets each rank's result, or a :class:`_Failed` holding its error.
        """
        try:
            mine: Any = local()
        except Exception as exc:  # every failure goes to rank 0, none is lost
            mine = _Failed(as_checkpoint_error(exc, what))
        try:
            reports = self.gather(mine, what)
        except CheckpointTimeoutError as exc:
            if self.rank != 0:
                raise
            outcome: Any = _Failed(exc)
        else:
            if self.rank == 0:
                assert reports is not None
                try:
                    outcome = decide(reports)
                except Exception as exc:
                    outcome = _Failed(as_checkpoint_error(exc, what))
        if self.rank != 0:
            outcome = None
        # Rank 0 may itself be waiting out the deadline of a late rank before it can
        # decide: the others wait for its decision up to twice as long.
        outcome = self.bcast(outcome, what, patience=2.0)
        if isinstance(outcome, _Failed):
            raise outcome.error
        return outcome

    def free(self) -> None:
        with contextlib.suppress(Exception):
            self.comm.Free()


def first_failure(reports: list[Any]) -> CheckpointError | None:
    """The first rank's error among reports, its message naming the rank."""
    for r, rep in enumerate(reports):
        if isinstance(rep, _Failed):
            err = rep.error
            if not err.message.startswith("rank "):
                err.message = f"rank {r}: {err.message}"
                err.args = (err.message,)
            err.error_context.setdefault("rank", r)
            return err
    return None


def raise_first_failure(reports: list[Any]) -> None:
    """Raise :func:`first_failure` of ``reports`` if there is one: the decision of a
    step that only has to know that every rank succeeded."""
    err = first_failure(reports)
    if err is not None:
        raise err


def is_failed(report: Any) -> bool:
    return isinstance(report, _Failed)
