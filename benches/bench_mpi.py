"""Sharded save and restore of an MPI job, against one process and against raw I/O.

Run: ``mpiexec -n 4 python benches/bench_mpi.py [--sizes 8K,8M,100M] [--repeats N]``.

For each per-rank size (float64 random data, incompressible), every repeat times, in
a rotating order:

* ``raw``: each rank ``os.write``s its bytes to a new file and ``fsync``s it;
* ``sharded save``: ``ShardedCheckpointManager.save_checkpoint`` with ``Sharded``
  parameters (shards, gathered digests, manifest, rename, directory fsyncs, retention);
* ``sharded load``: ``load_latest`` (manifest and every shard verified, each rank its own);
* ``one process``: rank 0 alone saves (``CheckpointManager.save_checkpoint``) and
  loads the same total (all ranks' blocks in one array), the other ranks idle.

Times are wall times of the slowest rank (barrier before and after). Medians over the
repeats and their ratios are printed (``--json`` for machine-readable output).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

from h5ckpt import CheckpointManager
from h5ckpt.mpi import Sharded, ShardedCheckpointManager

COMM = MPI.COMM_WORLD
RANK, WORLD = COMM.Get_rank(), COMM.Get_size()
UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    text = text.strip().upper()
    if text[-1] in UNITS:
        return int(float(text[:-1]) * UNITS[text[-1]])
    return int(text)


def settle() -> None:
    # No os.sync(): on a disk shared with other jobs it waits for their writeback too.
    # Every timed operation fsyncs what it wrote, so little is left for the next one.
    idle_barrier()


def idle_barrier() -> None:
    request = COMM.Ibarrier()
    while not request.Test():
        time.sleep(0.001)


def timed(fn, everyone: bool = True) -> float:
    settle()
    COMM.Barrier()  # a tight start for every rank
    t0 = time.perf_counter()
    if everyone or RANK == 0:
        fn()
    if everyone:
        COMM.Barrier()
    else:
        idle_barrier()
    return time.perf_counter() - t0


def raw_write(path: Path, data: np.ndarray) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])
        os.fsync(fd)
    finally:
        os.close(fd)


def bench(size: int, repeats: int, root: Path) -> dict[str, float]:
    rng = np.random.default_rng(RANK)
    block = rng.standard_normal(max(size // 8, 1))
    state = {"step": 1, "lr": 0.01}
    sharded_dir, single_dir, raw_dir = root / "sharded", root / "single", root / "raw"
    if RANK == 0:
        for d in (sharded_dir, single_dir, raw_dir):
            d.mkdir(parents=True, exist_ok=True)
    COMM.Barrier()
    m = ShardedCheckpointManager(sharded_dir, COMM, keep_last_n=1)
    single = CheckpointManager(single_dir, keep_last_n=1) if RANK == 0 else None
    blocks = COMM.gather(block)  # collective: every rank takes part
    total = np.concatenate(blocks) if RANK == 0 else None
    times: dict[str, list[float]] = {k: [] for k in ("raw", "save", "load", "save1", "load1")}
    batch = 0

    def op_raw() -> float:
        return timed(lambda: raw_write(raw_dir / f"rank_{RANK}.bin", block))

    def op_save() -> float:
        nonlocal batch
        batch += 1
        return timed(lambda: m.save_checkpoint(batch, Sharded(block), state, 0.5))

    def op_load() -> float:
        return timed(m.load_latest)

    def op_save1() -> float:
        return timed(lambda: single.save_checkpoint(batch, total, state, 0.5), everyone=False)

    def op_load1() -> float:
        return timed(lambda: single.load_latest(), everyone=False)

    ops = [("raw", op_raw), ("save", op_save), ("load", op_load), ("save1", op_save1)]
    ops.append(("load1", op_load1))
    # Warm-up, not counted: also makes a step and a file exist before any load is timed.
    for _, op in ops:
        op()
    for rep in range(repeats):
        order = ops[rep % len(ops) :] + ops[: rep % len(ops)]
        for name, op in order:
            times[name].append(op())
    m.close()
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", default="8K,8M,100M", help="bytes per rank (default: %(default)s)"
    )
    parser.add_argument("--repeats", type=int, default=0, help="repeats (default: by size)")
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    root = Path(
        COMM.bcast(
            tempfile.mkdtemp(prefix="h5ckpt-bench-mpi-", dir=args.dir) if RANK == 0 else None
        )
    )
    results = []
    try:
        for text in args.sizes.split(","):
            size = parse_size(text)
            repeats = args.repeats or (15 if size < (1 << 20) else 7 if size < (64 << 20) else 5)
            med = bench(size, repeats, root / text)
            results.append({"size_per_rank": text, "ranks": WORLD, "repeats": repeats, **med})
    finally:
        COMM.Barrier()
        if RANK == 0:
            shutil.rmtree(root, ignore_errors=True)
    if RANK != 0:
        return 0
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    ms = lambda s: f"{s * 1e3:9.2f} ms"  # noqa: E731
    print(f"{WORLD} ranks; medians; 'one process' saves/loads all ranks' data in one file")
    head = "size/rank  raw write+fsync  sharded save   save/raw  one-process save  sharded/one"
    head += "  sharded load  one-process load  sharded/one"
    print(head)
    for r in results:
        print(
            f"{r['size_per_rank']:>9}  {ms(r['raw']):>15}  {ms(r['save']):>12}  "
            f"{r['save'] / r['raw']:8.2f}  {ms(r['save1']):>16}  {r['save'] / r['save1']:11.2f}"
            f"  {ms(r['load']):>12}  {ms(r['load1']):>16}  {r['load'] / r['load1']:11.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
