"""Restoring a step that another number of ranks saved.

``Sharded`` values are split again in rank order (as ``np.array_split`` of the
global array would), replicated values are read once, by rank 0, and given to every
rank; rank-local values are handed to the caller's hook, which says what each new
rank gets. Each step of the protocol is a method of :class:`Resplit`, run by
:meth:`h5ckpt.mpi.ShardedCheckpointManager.load_latest`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointValueError
from .manifest import Manifest
from .protocol import raise_first_failure
from .values import (
    RANK_LOCAL,
    REPLICATED,
    SHARDED,
    KeyPath,
    get_at,
    render,
    split_ranges,
    take_range,
    unflatten,
)

__all__ = ["RankLocalHook", "Resplit", "merge_loaded", "old_ranks_of"]

RankLocalHook = Callable[[str, list[Any], int, int], Any]


def old_ranks_of(rank: int, world: int, old_world: int) -> list[int]:
    """The old ranks whose shards ``rank`` of ``world`` ranks speaks for (checks,
    and reads the rank-local values of): every ``world``-th from ``rank`` on."""
    return [i for i in range(old_world) if i % world == rank]


class Resplit:
    """This rank's side of restoring ``manifest``'s step with ``world`` ranks.

    Parameters
    ----------
    step, manifest
        The step directory and its verified manifest.
    rank, world
        This rank and the number of ranks restoring.
    read_shard : callable
        ``read_shard(old_rank)``: that old rank's shard, verified and checked
        against the manifest, as its tree of ``parameters``, ``optimizer_state``
        and ``metadata``.
    hook : callable or None
        The caller's ``rank_local`` mapping.

    Raises
    ------
    CheckpointValueError
        When the step holds rank-local values and there is no hook; the manifest is
        the same on every rank, so is the error, and nothing has been exchanged.
    """

    def __init__(
        self,
        step: Path,
        manifest: Manifest,
        rank: int,
        world: int,
        read_shard: Callable[[int], dict[str, Any]],
        hook: RankLocalHook | None,
    ) -> None:
        self.step = step
        self.manifest = manifest
        self.rank = rank
        self.world = world
        self.read_shard = read_shard
        self.hook = hook
        self.local_values = manifest.of_kind(RANK_LOCAL)
        if self.local_values and hook is None:
            raise self._unmapped()
        self.mine = set(old_ranks_of(rank, world, manifest.world_size))
        self.wants: dict[KeyPath, tuple[int, int]] = {
            v["path"]: split_ranges(v["global_shape"][v["axis"]], world)[rank]
            for v in manifest.of_kind(SHARDED)
        }
        self.need = self._needed()
        self.pieces: dict[KeyPath, Any] = {}

    def _unmapped(self) -> CheckpointValueError:
        names = [render(v["path"]) for v in self.local_values]
        return CheckpointValueError(
            f"{self.step} was saved by {self.manifest.world_size} rank(s) and holds "
            f"rank-local values ({', '.join(names)}); this job has {self.world}. Pass "
            "load_latest(rank_local=fn) to map them to the new ranks.",
            {"path": str(self.step), "keys": names},
        )

    def _needed(self) -> set[int]:
        """The old shards this rank reads."""
        need: set[int] = set()
        for v in self.manifest.of_kind(SHARDED):
            want = self.wants[v["path"]]
            for r, (a, b) in enumerate(v["ranges"]):
                if a < want[1] and want[0] < b:
                    need.add(r)
        if self.rank == 0 and self.manifest.of_kind(REPLICATED):
            need.add(0)  # replicated values are stored in rank 0's shard only
        if self.local_values:
            need |= self.mine
        return need

    def load(self) -> tuple[list[Any] | None, dict[int, dict[KeyPath, Any]]]:
        """Read the needed shards and keep this rank's blocks; report rank 0's
        replicated values and the rank-local values of the old ranks spoken for."""
        trees = {r: self.read_shard(r) for r in sorted(self.need)}
        for v in self.manifest.of_kind(SHARDED):
            p = v["path"]
            blocks = [(tuple(v["ranges"][r]), get_at(t, p)) for r, t in trees.items()]
            self.pieces[p] = take_range(
                blocks, self.wants[p], v["axis"], np.dtype(v["dtype"]), v["global_shape"]
            )
        replicated = None
        if self.rank == 0:
            replicated = [get_at(trees[0], v["path"]) for v in self.manifest.of_kind(REPLICATED)]
        contributed = {
            r: {
                v["path"]: get_at(trees[r], v["path"]) for v in self.local_values if r in v["ranks"]
            }
            for r in self.mine
            if self.local_values
        }
        return replicated, contributed

    def build(self, shared: dict[str, Any]) -> dict[str, Any]:
        """This rank's state from its blocks and :func:`merge_loaded`'s decision."""
        replicated = iter(shared["replicated"] or [])
        leaves = []
        for v in self.manifest.values:
            p = v["path"]
            if v["kind"] == SHARDED:
                leaves.append((p, self.pieces[p]))
            elif v["kind"] == REPLICATED:
                leaves.append((p, next(replicated)))
            else:
                leaves.append((p, self._mapped(p, shared["rank_local"])))
        return unflatten(leaves)

    def _mapped(self, p: KeyPath, by_rank: dict[int, dict[KeyPath, Any]]) -> Any:
        olds = [by_rank.get(r, {}).get(p) for r in range(self.manifest.world_size)]
        assert self.hook is not None  # refused when made
        return self.hook(render(p), olds, self.rank, self.world)


def merge_loaded(reports: list[Any]) -> dict[str, Any]:
    """Rank 0's decision on :meth:`Resplit.load`'s reports: its replicated values, and
    every old rank's rank-local values."""
    raise_first_failure(reports)
    by_rank: dict[int, dict[KeyPath, Any]] = {}
    for _, contributed in reports:
        by_rank.update(contributed)
    return {"replicated": reports[0][0], "rank_local": by_rank}
