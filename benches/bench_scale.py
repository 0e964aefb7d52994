"""Directories with many checkpoints: listing, cleanup and find-latest at scale.

Run:  python benches/bench_scale.py [--n 10000] [--repeats 7] [--cache DIR]

Builds (once; cached with --cache) a directory of N small real checkpoints saved by
h5ckpt, then measures medians over repeated runs of

* ``list_checkpoints()`` (headers only) on a new manager (every header read) and on
  one that listed before (only changed files are read: here none), next to the
  Rust core's part of the first alone (``_native.Catalog.list`` on a new catalog, the
  call ``list_checkpoints()`` makes) and the construction of a manager;
* ``list_checkpoints(verify=True)`` (every file hashed, in parallel);
* ``cleanup_old_checkpoints()`` from N down to 3, on a manager that has verified the
  files before and on a fresh one (which must verify what it deletes: invalid files are
  never deleted by default), next to the bare ``os.unlink`` calls for the same files;
  plus a profile of the warm cleanup: what the time goes to;
* ``find_latest_checkpoint()`` in a directory of 1,000 where the 999 newest are
  corrupt, next to a re-implementation of the predecessor's find_latest (glob, sort by
  the batch index in the name, then for each file: open with h5py, check the required
  datasets and attributes, SHA-256 of the pickled optimizer state against its
  ``checksum`` attribute; sequential) on the predecessor's own file format.

Not a test: nothing is asserted about time. Prints a table (Markdown).
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import itertools
import logging
import os
import pickle
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing import get_context
from pathlib import Path

import h5py
import numpy as np

from h5ckpt import CheckpointManager, _native

PREFIX = "checkpoint"
SEED_PREFIX = "homodyne_state"

# A real application configures logging; without any handler Python prints warnings
# to stderr. Records are still created (the cost is measured), just not printed.
logging.getLogger("h5ckpt").addHandler(logging.NullHandler())
logging.getLogger("h5ckpt").propagate = False


# -- building directories -----------------------------------------------------------


def _save_range(args: tuple[str, int, int]) -> None:
    directory, start, stop = args
    m = CheckpointManager(directory, keep_last_n=None, auto_cleanup=False, durable=False)
    for b in range(start, stop):
        m.save_checkpoint(b, np.full(4, float(b)), {"step": b, "lr": 1e-3}, float(b % 97))


def build_h5ckpt_dir(directory: Path, n: int) -> None:
    """N real checkpoints (batches 0..n-1), saved by h5ckpt in one process per core."""
    done = {p.name for p in directory.glob(f"{PREFIX}_batch_*.h5")} if directory.exists() else ()
    if len(done) == n:
        return
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    workers = os.cpu_count() or 1
    bounds = np.linspace(0, n, workers + 1).astype(int)
    # Each range in a directory of its own: a manager refuses to save a batch below
    # one already in its directory, which another worker's range would be.
    parts = [directory / f"part{i}" for i in range(workers)]
    ranges = itertools.pairwise(bounds)
    jobs = [(str(d), int(a), int(b)) for d, (a, b) in zip(parts, ranges, strict=True)]
    with get_context("spawn").Pool(workers) as pool:
        pool.map(_save_range, jobs)
    for part in parts:
        for path in part.glob(f"{PREFIX}_batch_*.h5"):
            path.rename(directory / path.name)
        shutil.rmtree(part)


def copy_dir(src: Path, dst: Path, limit: int | None = None) -> list[Path]:
    """Copy the checkpoints (real copies, not links) of ``src``; return the new paths."""
    dst.mkdir(parents=True)
    names = sorted(p.name for p in src.glob(f"{PREFIX}_batch_*.h5"))
    out = []
    for name in names[:limit] if limit else names:
        shutil.copyfile(src / name, dst / name)
        out.append(dst / name)
    return out


def flip_payload_byte(path: Path) -> None:
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        at = (512 + size) // 2
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))


def write_seed_file(directory: Path, b: int) -> Path:
    """A file in the predecessor's layout (gzip parameters, pickled state, attrs)."""
    path = directory / f"{SEED_PREFIX}_batch_{b:04d}.h5"
    blob = pickle.dumps({"step": b, "lr": 1e-3})
    with h5py.File(path, "w") as f:
        f.create_dataset(
            "parameters", data=np.full(4, float(b)), compression="gzip", compression_opts=4
        )
        f.create_dataset("optimizer_state", data=np.void(blob))
        f.attrs["batch_idx"] = b
        f.attrs["loss"] = float(b % 97)
        f.attrs["checksum"] = hashlib.sha256(blob).hexdigest()
        f.attrs["version"] = "2.4.0"
        f.attrs["timestamp"] = time.time()
    return path


def corrupt_seed_file(path: Path) -> None:
    """Flip a byte of the pickled optimizer state: what the predecessor's check sees."""
    with h5py.File(path, "r") as f:
        offset = f["optimizer_state"].id.get_offset()
    with open(path, "r+b") as f:
        f.seek(offset + 5)
        byte = f.read(1)
        f.seek(offset + 5)
        f.write(bytes([byte[0] ^ 0xFF]))


# -- the predecessor's find_latest, re-implemented from its documented behaviour --------


def seed_validate(path: Path) -> bool:
    if not path.exists():
        return False
    try:
        with h5py.File(path, "r") as f:
            for field in ("parameters", "optimizer_state"):
                if field not in f:
                    return False
            for attr in ("batch_idx", "loss", "checksum"):
                if attr not in f.attrs:
                    return False
            blob = bytes(f["optimizer_state"][()])
            return hashlib.sha256(blob).hexdigest() == f.attrs["checksum"]
    except (OSError, KeyError, ValueError):
        return False


def seed_find_latest(directory: Path) -> Path | None:
    files = list(directory.glob(f"{SEED_PREFIX}_batch_*.h5"))
    if not files:
        return None

    def batch(path: Path) -> int:
        try:
            return int(path.stem.split("_")[-1])
        except (ValueError, IndexError):
            return -1

    files.sort(key=batch, reverse=True)
    for path in files:
        if seed_validate(path):
            return path
    return None


# -- measuring ------------------------------------------------------------------------


def median_ms(
    fn: Callable[[], object], repeats: int, setup: Callable[[], object] | None = None
) -> tuple[float, float, object]:
    """Median wall and CPU (all threads of this process) milliseconds of ``fn``."""
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        arg = setup() if setup else None
        c0, t0 = time.process_time(), time.perf_counter()
        result = fn(arg) if setup else fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls) * 1e3, statistics.median(cpus) * 1e3, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--corrupt-n", type=int, default=1_000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--cache", type=Path, default=None, help="keep the built directory here")
    args = ap.parse_args()
    n, r = args.n, args.repeats
    load_before = os.getloadavg()[0]

    scratch = Path(tempfile.mkdtemp(prefix="h5ckpt-bench-"))
    template = args.cache or scratch / "template"
    rows: list[tuple[str, str, str, str]] = []

    def row(what: str, wall: float, cpu: float, ref: str = "", ratio: str = "") -> None:
        rows.append((what, f"{wall:.1f} ms (CPU {cpu:.0f} ms)", ref, ratio))
        print(f"  {what}: {wall:.1f} ms wall, {cpu:.1f} ms CPU", flush=True)

    try:
        t0 = time.perf_counter()
        build_h5ckpt_dir(template, n)
        print(f"{n} checkpoints ready in {template} ({time.perf_counter() - t0:.0f} s)")
        listing = scratch / "listing"
        copy_dir(template, listing)

        # -- listing ---------------------------------------------------------------
        wall, cpu, (infos, pending) = median_ms(
            lambda c: c.list(), r, lambda: _native.Catalog(listing, PREFIX, False)
        )
        assert len(infos) == n and not pending
        row(f"`_native.Catalog.list()`, {n:,} files, new catalog (Rust core only)", wall, cpu)
        wall, cpu, _ = median_ms(lambda: CheckpointManager(listing, keep_last_n=None), r)
        row(f"`CheckpointManager(...)` on {n:,} files (sweeps stale temp files)", wall, cpu)
        wall, cpu, infos = median_ms(
            lambda m: m.list_checkpoints(), r, lambda: CheckpointManager(listing, keep_last_n=None)
        )
        assert len(infos) == n and infos[0].status == "unverified"
        row(f"`list_checkpoints()`, {n:,} files, new manager (every header read)", wall, cpu)
        warm = CheckpointManager(listing, keep_last_n=None)
        warm.list_checkpoints()
        wall, cpu, _ = median_ms(warm.list_checkpoints, r)
        row(f"`list_checkpoints()`, {n:,} files, same manager again (no file read)", wall, cpu)
        wall, cpu, infos = median_ms(
            lambda: CheckpointManager(listing, keep_last_n=None).list_checkpoints(verify=True),
            max(3, r // 2),
        )
        assert all(i.status == "valid" for i in infos)
        row(f"`list_checkpoints(verify=True)`, {n:,} files, fresh manager", wall, cpu)

        # -- cleanup down to 3 -----------------------------------------------------
        counter = iter(range(10**6))

        def prepared_copy() -> Path:
            """A copy of the directory, read once (atime) and written back, like files
            a job saved a while ago."""
            d = scratch / f"c{next(counter)}"
            copy_dir(template, d)
            CheckpointManager(d, keep_last_n=None).list_checkpoints(verify=True)
            os.sync()
            return d

        def bare_setup() -> list[Path]:
            return sorted(prepared_copy().glob(f"{PREFIX}_batch_*.h5"))[:-3]

        def bare_unlink(paths: list[Path]) -> int:
            for p in paths:
                os.unlink(p)
            return len(paths)

        rc = max(3, r // 2)
        wall_u, cpu_u, k = median_ms(bare_unlink, rc, bare_setup)
        assert k == n - 3
        row(f"bare `os.unlink` of {n - 3:,} files (reference)", wall_u, cpu_u)

        def warm_setup() -> CheckpointManager:
            d = prepared_copy()
            m = CheckpointManager(d, keep_last_n=3, auto_cleanup=False)
            m.list_checkpoints(verify=True)  # e.g. the job itself: it knows its files
            return m

        def cleanup(m: CheckpointManager) -> int:
            return len(m.cleanup_old_checkpoints())

        wall, cpu, k = median_ms(cleanup, rc, warm_setup)
        assert k == n - 3
        row(
            f"`cleanup_old_checkpoints()` {n:,} → 3, files verified before",
            wall,
            cpu,
            f"{wall_u:.0f} ms unlink (CPU {cpu_u:.0f} ms)",
            f"{wall / wall_u:.2f}× unlink",
        )
        wall, cpu, k = median_ms(
            cleanup,
            rc,
            lambda: CheckpointManager(prepared_copy(), keep_last_n=3, auto_cleanup=False),
        )
        assert k == n - 3
        row(
            f"`cleanup_old_checkpoints()` {n:,} → 3, fresh manager (verifies all first)",
            wall,
            cpu,
            f"{wall_u:.0f} ms unlink (CPU {cpu_u:.0f} ms)",
            f"{wall / wall_u:.2f}× unlink",
        )
        prof = cProfile.Profile()
        m = warm_setup()
        prof.enable()
        m.cleanup_old_checkpoints()
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(6)
        profile_text = out.getvalue()

        # -- find_latest past 999 corrupt -------------------------------------------
        m_dir = scratch / "latest"
        paths = copy_dir(template, m_dir, limit=args.corrupt_n)
        for p in paths[1:]:
            flip_payload_byte(p)
        s_dir = scratch / "seed"
        s_dir.mkdir()
        s_paths = [write_seed_file(s_dir, b) for b in range(args.corrupt_n)]
        for p in s_paths[1:]:
            corrupt_seed_file(p)
        wall_s, cpu_s, found = median_ms(lambda: seed_find_latest(s_dir), max(3, r // 2))
        assert found == s_paths[0], found
        wall, cpu, found = median_ms(
            lambda: CheckpointManager(m_dir, keep_last_n=None).find_latest_checkpoint(), r
        )
        assert found == paths[0], found
        row(
            f"`find_latest_checkpoint()`, {args.corrupt_n - 1} newest of {args.corrupt_n:,} "
            "corrupt, fresh manager",
            wall,
            cpu,
            f"{wall_s:.0f} ms predecessor",
            f"{wall_s / wall:.1f}× faster",
        )
        rows.append(
            (
                "predecessor's find_latest (re-implemented), same scenario, its own format",
                f"{wall_s:.0f} ms (CPU {cpu_s:.0f} ms)",
                "",
                "",
            )
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print()
    print(
        f"machine: {os.cpu_count()} cores, {sys.platform}, Python {sys.version.split()[0]}, "
        f"load average before the run {load_before:.1f}; medians of {r} runs"
    )
    print()
    print("| operation | h5ckpt (median) | reference | ratio |")
    print("|---|---|---|---|")
    for what, ours, ref, ratio in rows:
        print(f"| {what} | {ours} | {ref} | {ratio} |")
    print()
    print("Profile of one cleanup (files verified before), top functions by own time:")
    print("\n".join(line for line in profile_text.splitlines() if line.strip())[:3000])


if __name__ == "__main__":
    main()
