"""h5ckpt benchmark harness: h5ckpt against the physical limit and the seed's approach.

    python benches/run.py            # full run: 8 KB, 8 MB, 100 MB, 1 GB (tens of minutes)
    python benches/run.py --quick    # 8 KB, 8 MB, 100 MB, 3 repeats (about a minute)
    python benches/run.py --sizes 100M --repeats 9 --no-seed

Every figure is measured in this run, side by side: each repeat runs every
operation once, in rotating order, and the tables show medians over the repeats
and ratios of medians. Baselines:

* raw write+fsync: ``os.write`` of the same bytes to a new file, then ``fsync``;
* raw read+sha256: ``read()`` of that file, then ``hashlib.sha256`` over it;
* seed: ``benches/seed_baseline.py``, the predecessor's approach (h5py, gzip 4,
  pickled state, hashlib over the pickle only, no fsync).

The state saved is ``parameters`` = a float64 array of the given size, either
random (incompressible) or smooth (cumulative sum of noise), plus a small
optimizer-state dict and metadata. Files are read back from a warm page cache;
between timed operations the disk is settled (``os.sync()``), so that no operation
pays for another's writeback or for the discard of deleted files.
Peak memory of a save is measured in a fresh subprocess (``VmHWM``).

This is not part of the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import h5ckpt
import small_state as small
from h5ckpt import CheckpointManager
from seed_baseline import SeedCheckpointManager

KB, MB, GB = 1000, 1000**2, 1000**3
DEFAULT_SIZES = "8K,8M,100M,1G"
QUICK_SIZES = "8K,8M,100M"
N_DIR_FILES = 5  # checkpoints in the directory for list / find-latest / cleanup
KEEP = 3

# ----------------------------------------------------------------------------- helpers


def parse_size(text: str) -> int:
    text = text.strip().upper().rstrip("B")
    for suffix, mult in (("K", KB), ("M", MB), ("G", GB)):
        if text.endswith(suffix):
            return int(float(text[:-1]) * mult)
    return int(text)


def size_label(n: float) -> str:
    for unit, mult in (("GB", GB), ("MB", MB), ("KB", KB)):
        if n >= mult:
            value = n / mult
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.3g} {unit}"
    return f"{n:.0f} B"


def ms(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    value = seconds * 1000
    if value >= 100:
        return f"{value:,.0f} ms"
    if value >= 1:
        return f"{value:.1f} ms"
    return f"{value * 1000:.0f} µs"


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def fmt_ratio(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}×"


def make_data(nbytes: int, kind: str, seed: int = 0) -> np.ndarray:
    """A float64 array of ``nbytes`` (rounded down to whole elements), built in place."""
    n = max(1, nbytes // 8)
    out = np.empty(n, dtype=np.float64)
    rng = np.random.default_rng(seed)
    step = 1 << 22
    for start in range(0, n, step):
        rng.standard_normal(out=out[start : start + step])
    if kind == "smooth":
        np.cumsum(out, out=out)
    elif kind != "random":
        raise ValueError(kind)
    return out


def small_state(batch: int) -> tuple[dict[str, Any], dict[str, Any]]:
    state = {"iteration": 42 + batch, "learning_rate": 1e-3, "n_accepted": 7, "method": "lm"}
    meta = {"run": "bench", "batch_size": 1024, "note": "h5ckpt benchmark"}
    return state, meta


def raw_write(path: Path, data: np.ndarray) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data).cast("B")
        while view:
            view = view[os.write(fd, view[: 1 << 30]) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def raw_read_sha256(path: Path) -> bytes:
    with open(path, "rb", buffering=0) as f:
        data = f.read()
    return hashlib.sha256(data).digest()


def sha256_file_streaming(path: Path) -> bytes:
    """Single-threaded hashlib over a file, 1 MiB at a time."""
    h = hashlib.sha256()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.digest()


class Timings:
    """Repeated timings of named operations."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = defaultdict(list)

    def time(self, name: str, fn: Callable[[], Any]) -> Any:
        gc.collect()
        t0 = time.perf_counter()
        result = fn()
        self.samples[name].append(time.perf_counter() - t0)
        return result

    def median(self, name: str) -> float | None:
        values = self.samples.get(name)
        return statistics.median(values) if values else None

    def medians_dict(self) -> dict[str, float | None]:
        return {k: self.median(k) for k in self.samples}

    def spread(self, name: str) -> str:
        values = self.samples.get(name)
        if not values or len(values) < 2:
            return ""
        return f"{min(values) * 1000:.0f}–{max(values) * 1000:.0f}"


def rotate(items: list[Any], k: int) -> list[Any]:
    k %= len(items)
    return items[k:] + items[:k]


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def drop_file(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


# ----------------------------------------------------------------------------- one case


def bench_case(
    root: Path, nbytes: int, kind: str, repeats: int, with_seed: bool, verbose: bool
) -> dict[str, Any]:
    data = make_data(nbytes, kind)
    case = root / f"{kind}-{nbytes}"
    raw_dir, ours_dir, seed_dir = case / "raw", case / "ours", case / "seed"
    for d in (raw_dir, ours_dir, seed_dir):
        d.mkdir(parents=True)
    ours = CheckpointManager(ours_dir)  # the defaults: durable, compression "auto", keep 3
    seed = SeedCheckpointManager(seed_dir)
    t = Timings()
    sizes: dict[str, int] = {}
    batch = 0
    state, meta = small_state(1)
    for r in range(repeats):
        batch += 1
        raw_path = raw_dir / f"raw-{batch}.bin"
        save_ops: list[tuple[str, Callable[[], Any]]] = [
            ("raw_write", lambda p=raw_path: raw_write(p, data)),
            ("save", lambda b=batch: ours.save_checkpoint(b, data, state, 0.5, meta)),
        ]
        if with_seed:
            save_ops.append(
                ("seed_save", lambda b=batch: seed.save_checkpoint(b, data, state, 0.5, meta))
            )
        for name, fn in rotate(save_ops, r):
            t.time(name, fn)
            # Retention's deletions free their space in a background thread: let it
            # finish (close() waits for it) so it does not overlap the next timing.
            ours.close()
            # Settle the disk before the next timing: the seed does not fsync, and
            # deleted files are discarded (ext4 -o discard) at the next journal
            # commit, which the next timed fsync would otherwise pay for.
            os.sync()
        ours_path = ours.checkpoint_path(batch)
        seed_path = seed.checkpoint_path(batch)
        sizes["raw"] = raw_path.stat().st_size
        sizes["ours"] = ours_path.stat().st_size
        if with_seed:
            sizes["seed"] = seed_path.stat().st_size

        read_ops: list[tuple[str, Callable[[], Any]]] = [
            ("raw_read_sha256", lambda p=raw_path: raw_read_sha256(p)),
            ("load", lambda p=ours_path: ours.load_checkpoint(p)),
            ("validate", lambda p=ours_path: ours.validate_checkpoint(p)),
        ]
        if with_seed:
            read_ops += [
                ("seed_load", lambda p=seed_path: seed.load_checkpoint(p)),
                ("seed_validate", lambda p=seed_path: seed.validate_checkpoint(p)),
            ]
        for name, fn in rotate(read_ops, r):
            result = t.time(name, fn)
            if name.endswith("validate") and result is not True:
                raise AssertionError(f"{name} failed on a fresh checkpoint")
            del result
        drop_file(raw_path)
        os.sync()

        # Asynchronous save: the time the caller is blocked, then wait (not timed).
        batch += 1
        future = t.time(
            "async_call", lambda b=batch: ours.save_checkpoint_async(b, data, state, 0.5, meta)
        )
        future.result()
        ours.close()  # the background thread and its retention are done
        os.sync()
        del future
        if verbose:
            print(f"  repeat {r + 1}/{repeats} done (load {loadavg()})", file=sys.stderr)

    ours.close()
    dir_ops = bench_directory_ops(case, data, kind, repeats, with_seed)
    shutil.rmtree(case, ignore_errors=True)
    return {
        "nbytes": int(data.nbytes),
        "kind": kind,
        "repeats": repeats,
        "medians": {k: t.median(k) for k in t.samples} | dir_ops.medians_dict(),
        "samples": dict(t.samples) | dict(dir_ops.samples),
        "file_sizes": sizes,
    }


def bench_directory_ops(
    case: Path, data: np.ndarray, kind: str, repeats: int, with_seed: bool
) -> Timings:
    """list / find-latest / cleanup over a directory of ``N_DIR_FILES`` checkpoints.

    Every timing uses a freshly constructed manager (no remembered verification), as a
    restarted job would; the files are in the page cache. Cleanup deletes the two
    oldest; they are put back (hard links from a stash) before the next repeat.
    """
    t = Timings()
    state, meta = small_state(0)
    ours_dir, ours_stash = case / "dir-ours", case / "dir-ours-stash"
    seed_dir, seed_stash = case / "dir-seed", case / "dir-seed-stash"
    for d in (ours_dir, ours_stash, seed_dir, seed_stash):
        d.mkdir()
    writer = CheckpointManager(ours_dir, keep_last_n=None, auto_cleanup=False)
    for b in range(1, N_DIR_FILES + 1):
        p = writer.save_checkpoint(b, data, state, 0.5, meta)
        os.link(p, ours_stash / p.name)
    if with_seed:
        seed_writer = SeedCheckpointManager(seed_dir, keep_last_n=KEEP)
        first = seed_writer.save_checkpoint(1, data, state, 0.5, meta)
        os.link(first, seed_stash / first.name)
        for b in range(2, N_DIR_FILES + 1):
            os.link(first, seed_stash / seed_writer.checkpoint_path(b).name)
            os.link(first, seed_writer.checkpoint_path(b))
        os.sync()

    def restore(directory: Path, stash: Path) -> None:
        for p in stash.iterdir():
            if not (directory / p.name).exists():
                os.link(p, directory / p.name)

    # (name, directory, stash, manager class, method)
    ops: list[tuple[str, Path, Path, Any, str]] = [
        ("list", ours_dir, ours_stash, CheckpointManager, "list_checkpoints"),
        ("find_latest", ours_dir, ours_stash, CheckpointManager, "find_latest_checkpoint"),
        ("cleanup", ours_dir, ours_stash, CheckpointManager, "cleanup_old_checkpoints"),
    ]
    if with_seed:
        ops += [
            ("seed_list", seed_dir, seed_stash, SeedCheckpointManager, "list_checkpoints"),
            (
                "seed_find_latest",
                seed_dir,
                seed_stash,
                SeedCheckpointManager,
                "find_latest_checkpoint",
            ),
            (
                "seed_cleanup",
                seed_dir,
                seed_stash,
                SeedCheckpointManager,
                "cleanup_old_checkpoints",
            ),
        ]
    for r in range(repeats):
        for name, directory, stash, cls, method in rotate(ops, r):
            restore(directory, stash)
            fn = getattr(cls(directory, keep_last_n=KEEP), method)
            result = t.time(name, fn)
            if name.endswith("cleanup") and len(result) != N_DIR_FILES - KEEP:
                raise AssertionError(f"{name} deleted {len(result)} files")
            if name.endswith("find_latest") and result is None:
                raise AssertionError(f"{name} found nothing")
    return t


# ----------------------------------------------------------------------------- extras


def bench_validate_big(root: Path, nbytes: int, repeats: int) -> dict[str, Any]:
    """validate_checkpoint of one large random file against single-threaded hashlib."""
    directory = root / "validate"
    directory.mkdir()
    data = make_data(nbytes, "random", seed=1)
    m = CheckpointManager(directory, enable_compression=False)
    path = m.save_checkpoint(1, data, {}, 0.0)
    del data
    t = Timings()
    ops = [
        ("validate", lambda: m.validate_checkpoint(path)),
        ("hashlib_sha256", lambda: sha256_file_streaming(path)),
    ]
    for r in range(repeats):
        for name, fn in rotate(ops, r):
            t.time(name, fn)
    size = path.stat().st_size
    shutil.rmtree(directory, ignore_errors=True)
    return {"nbytes": size, "medians": t.medians_dict(), "samples": dict(t.samples)}


def bench_hashing(repeats: int) -> dict[str, Any]:
    """In-memory hashing throughput: hashlib on one core, the tree digest on all."""
    data = make_data(100 * MB, "random", seed=2)
    view = memoryview(data).cast("B")
    t = Timings()
    ops = [
        ("hashlib_sha256", lambda: hashlib.sha256(view).digest()),
        ("tree_digest", lambda: h5ckpt._native.tree_digest(data)),
    ]
    for r in range(repeats):
        for name, fn in rotate(ops, r):
            t.time(name, fn)
    return {
        "nbytes": data.nbytes,
        "gb_per_s": {k: data.nbytes / v / 1e9 for k, v in t.medians_dict().items() if v},
    }


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def rss_child(nbytes: int, kind: str, impl: str, directory: str) -> None:
    """Run in a subprocess: memory of one synchronous save (prints JSON).

    The high-water mark is reset (``/proc/self/clear_refs``) just before the save and
    read back (``VmHWM``) after it; ``ru_maxrss`` would include the parent's RSS.
    """
    base = _proc_status_bytes("VmRSS")
    data = make_data(nbytes, kind)
    state, meta = small_state(1)
    if impl == "ours":
        m: Any = CheckpointManager(directory)
    else:
        m = SeedCheckpointManager(directory)
    gc.collect()
    before = _proc_status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    m.save_checkpoint(1, data, state, 0.5, meta)
    peak = _proc_status_bytes("VmHWM")
    print(json.dumps({"state": int(data.nbytes), "base": base, "before": before, "peak": peak}))


def bench_rss(root: Path, sizes: list[int], kinds: list[str], with_seed: bool) -> list[dict]:
    rows = []
    for nbytes in sizes:
        for kind in kinds:
            for impl in ("ours", "seed") if with_seed else ("ours",):
                directory = root / f"rss-{impl}-{kind}-{nbytes}"
                directory.mkdir()
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--rss-child",
                        str(nbytes),
                        kind,
                        impl,
                        str(directory),
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                shutil.rmtree(directory, ignore_errors=True)
                r = json.loads(out.strip().splitlines()[-1])
                r.update(impl=impl, kind=kind, nbytes=nbytes)
                rows.append(r)
    return rows


# ----------------------------------------------------------------------------- report


def machine(root: Path) -> dict[str, str]:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024**2:.0f} GiB"
                break
    fs = "?"
    with contextlib.suppress(OSError), open("/proc/mounts") as f:
        best = ""
        real = str(root.resolve())
        for line in f:
            dev, mnt, fstype = line.split()[:3]
            if real.startswith(mnt) and len(mnt) > len(best):
                best, fs = mnt, f"{fstype} on {dev} (mounted at {mnt})"
    import h5py

    return {
        "cpu": f"{cpu}, {os.cpu_count()} logical cores",
        "memory": mem,
        "filesystem": fs,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": (
            f"h5ckpt {h5ckpt.__version__}, numpy {np.__version__}, h5py {h5py.__version__}, "
            f"HDF5 {h5py.version.hdf5_version}"
        ),
    }


def report(results: dict[str, Any]) -> str:
    lines: list[str] = []
    add = lines.append

    def row(*cells: str) -> None:
        add("| " + " | ".join(cells) + " |")

    info = results["machine"]
    add(
        f"Machine: {info['cpu']}, {info['memory']} RAM, {info['filesystem']}, "
        f"Linux {info['kernel']}, Python {info['python']}; {info['versions']}."
    )
    add(
        f"Load average (1, 5, 15 min): {results['load_start']} at start, "
        f"{results['load_end']} at end. Medians of {results['repeats']} repeats "
        "(files in the page cache)."
    )
    add("")
    cases = results["cases"]
    with_seed = results["with_seed"]

    add(
        "Save, load and validate: h5ckpt against the physical baseline measured in the same "
        "repeat loop (raw write+fsync for save; raw read+sha256 for load and validate)."
    )
    add("")
    header = (
        "| size | data | save | raw write+fsync | **save ratio** | load | raw read+sha256 "
        "| **load ratio** | validate | validate ratio | file / raw |"
    )
    add(header)
    add("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in cases:
        m = c["medians"].get
        raw = m("raw_read_sha256")
        row(
            size_label(c["nbytes"]),
            c["kind"],
            ms(m("save")),
            ms(m("raw_write")),
            f"**{fmt_ratio(ratio(m('save'), m('raw_write')))}**",
            ms(m("load")),
            ms(raw),
            f"**{fmt_ratio(ratio(m('load'), raw))}**",
            ms(m("validate")),
            fmt_ratio(ratio(m("validate"), raw)),
            f"{c['file_sizes']['ours'] / c['file_sizes']['raw']:.3f}",
        )
    add("")
    if with_seed:
        add(
            "Against the seed's approach (seed time / h5ckpt time: how many times faster "
            "h5ckpt is; below 1 means slower)."
        )
        add("")
        add(
            "| size | data | seed save | **×** | seed load | × | seed validate | × | "
            "seed file / raw |"
        )
        add("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for c in cases:
            m = c["medians"].get
            if m("seed_save") is None:
                continue
            row(
                size_label(c["nbytes"]),
                c["kind"],
                ms(m("seed_save")),
                f"**{fmt_ratio(ratio(m('seed_save'), m('save')), 1)}**",
                ms(m("seed_load")),
                fmt_ratio(ratio(m("seed_load"), m("load")), 1),
                ms(m("seed_validate")),
                fmt_ratio(ratio(m("seed_validate"), m("validate")), 1),
                f"{c['file_sizes']['seed'] / c['file_sizes']['raw']:.3f}",
            )
        add("")
    add(
        f"Directory operations over {N_DIR_FILES} checkpoints of the given size, each by a "
        f"freshly constructed manager (keep_last_n={KEEP}). h5ckpt's find-latest and cleanup "
        "verify every byte of the files they rely on; the seed checks only its pickle. "
        "Asynchronous save: time the caller is blocked, against a synchronous save."
    )
    add("")
    add(
        "| size | data | list | seed list | find-latest | seed find-latest | cleanup | "
        "seed cleanup | async call | **async / sync save** |"
    )
    add("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in cases:
        m = c["medians"].get
        row(
            size_label(c["nbytes"]),
            c["kind"],
            *(ms(m(k)) for k in ("list", "seed_list", "find_latest", "seed_find_latest")),
            *(ms(m(k)) for k in ("cleanup", "seed_cleanup", "async_call")),
            f"**{fmt_ratio(ratio(m('async_call'), m('save')))}**",
        )
    add("")
    v = results.get("validate_big")
    if v:
        vm = v["medians"]
        add(
            f"validate_checkpoint of one {size_label(v['nbytes'])} file: "
            f"{ms(vm['validate'])}; single-threaded hashlib.sha256 over it: "
            f"{ms(vm['hashlib_sha256'])}; "
            f"**{fmt_ratio(ratio(vm['hashlib_sha256'], vm['validate']))} faster**."
        )
        add("")
    h = results.get("hashing")
    if h:
        g = h["gb_per_s"]
        add(
            f"In-memory hashing of 100 MB: hashlib.sha256 {g.get('hashlib_sha256', 0):.2f} GB/s "
            f"(one core), tree digest {g.get('tree_digest', 0):.2f} GB/s (all cores)."
        )
        add("")
    rss = results.get("rss")
    if rss:
        add(
            "Peak memory (RSS) of one synchronous save, in a fresh process: peak minus the "
            "interpreter's RSS before the state existed, over the state size."
        )
        add("")
        add(
            "| size | data | impl | state | peak − interpreter | **/ state** | "
            "peak − RSS before save |"
        )
        add("|---|---|---|---:|---:|---:|---:|")
        for r in rss:
            add(
                f"| {size_label(r['nbytes'])} | {r['kind']} | "
                f"{'h5ckpt' if r['impl'] == 'ours' else 'seed'} | {size_label(r['state'])} | "
                f"{size_label(r['peak'] - r['base'])} | "
                f"**{(r['peak'] - r['base']) / r['state']:.2f}×** | "
                f"{size_label(max(0, r['peak'] - r['before']))} |"
            )
        add("")
    add(goals(results))
    if results.get("small"):
        add("")
        add(small.report(*results["small"]))
    return "\n".join(lines)


def goals(results: dict[str, Any]) -> str:
    """The goals of the performance issue, checked against this run's figures."""
    rows = ["| goal | target | measured | met |", "|---|---|---:|---|"]

    def row(goal: str, target: str, value: float | None, ok: Callable[[float], bool]) -> None:
        if value is None:
            rows.append(f"| {goal} | {target} | not measured | – |")
        else:
            rows.append(f"| {goal} | {target} | {value:.2f} | {'yes' if ok(value) else 'NO'} |")

    by = {(c["nbytes"] // MB, c["kind"]): c["medians"] for c in results["cases"]}
    sizes = {(c["nbytes"] // MB, c["kind"]): c["file_sizes"] for c in results["cases"]}
    r100 = by.get((100, "random"), {})
    s100 = by.get((100, "smooth"), {})
    row(
        "save 100 MB random / raw write+fsync",
        "≤ 1.25",
        ratio(r100.get("save"), r100.get("raw_write")),
        lambda x: x <= 1.25,
    )
    fs = sizes.get((100, "smooth"))
    row(
        "smooth 100 MB: file / raw size",
        "≤ 0.80",
        fs["ours"] / fs["raw"] if fs else None,
        lambda x: x <= 0.8,
    )
    row(
        "smooth 100 MB: save / raw write+fsync",
        "≤ 1.5",
        ratio(s100.get("save"), s100.get("raw_write")),
        lambda x: x <= 1.5,
    )
    row(
        "load 100 MB random / raw read+sha256",
        "≤ 1.5",
        ratio(r100.get("load"), r100.get("raw_read_sha256")),
        lambda x: x <= 1.5,
    )
    v = results.get("validate_big")
    row(
        f"validate {size_label(v['nbytes']) if v else '512 MB'}: hashlib time / validate time",
        "≥ 1.7",
        ratio(v["medians"]["hashlib_sha256"], v["medians"]["validate"]) if v else None,
        lambda x: x >= 1.7,
    )
    row(
        "seed save / h5ckpt save, 100 MB random",
        "≥ 15",
        ratio(r100.get("seed_save"), r100.get("save")),
        lambda x: x >= 15,
    )
    worst = None
    for r in results.get("rss") or []:
        if r["impl"] == "ours":
            value = (r["peak"] - r["base"]) / r["state"]
            worst = value if worst is None else max(worst, value)
    row("peak RSS of a save / state size (worst case)", "≤ 1.3", worst, lambda x: x <= 1.3)
    row(
        "async: caller blocked / sync save, 100 MB random",
        "≤ 0.25",
        ratio(r100.get("async_call"), r100.get("save")),
        lambda x: x <= 0.25,
    )
    return "Goals (ratios of this run):\n\n" + "\n".join(rows) + "\n"


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", help=f"comma-separated sizes (default {DEFAULT_SIZES})")
    p.add_argument("--kinds", default="random,smooth", help="random, smooth or both")
    p.add_argument("--repeats", type=int, help="repeats per size (default 7; 3 from 1 GB)")
    p.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}, 3 repeats")
    p.add_argument("--no-seed", action="store_true", help="skip the seed's approach")
    p.add_argument("--seed-max", default="1G", help="largest size the seed is run at")
    p.add_argument(
        "--validate-size", default="512M", help="file size of the validate test (0: skip)"
    )
    p.add_argument("--no-rss", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument(
        "--small-repeats", type=int, default=40, help="small-state scenario repeats (0: skip)"
    )
    p.add_argument(
        "--predecessor-python",
        default=os.environ.get("H5CKPT_PREDECESSOR_PYTHON"),
        help="an interpreter that can import homodyne: the real predecessor, small state",
    )
    p.add_argument("--dir", help="where to write (default: a temp dir, removed afterwards)")
    p.add_argument("--json", help="also write all samples to this JSON file")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--rss-child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.rss_child:
        nbytes, kind, impl, directory = args.rss_child
        rss_child(int(nbytes), kind, impl, directory)
        return 0

    sizes = [
        parse_size(s)
        for s in (args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)).split(",")
    ]
    kinds = [k.strip() for k in args.kinds.split(",")]
    seed_max = parse_size(args.seed_max)
    validate_size = parse_size(args.validate_size)

    def repeats_for(n: int) -> int:
        if args.repeats:
            return args.repeats
        if args.quick:
            return 3
        return 3 if n >= 500 * MB else 7

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="h5ckpt-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=root))
    results: dict[str, Any] = {
        "machine": machine(work),
        "load_start": loadavg(),
        "with_seed": not args.no_seed,
        "repeats": ", ".join(sorted({str(repeats_for(n)) for n in sizes})),
        "cases": [],
    }
    try:
        for nbytes in sizes:
            for kind in kinds:
                print(f"{size_label(nbytes)} {kind} (load {loadavg()}) ...", file=sys.stderr)
                results["cases"].append(
                    bench_case(
                        work,
                        nbytes,
                        kind,
                        repeats_for(nbytes),
                        not args.no_seed and nbytes <= seed_max,
                        args.verbose,
                    )
                )
        if validate_size:
            print(f"validate {size_label(validate_size)} ...", file=sys.stderr)
            results["validate_big"] = bench_validate_big(work, validate_size, 5)
        results["hashing"] = bench_hashing(5)
        if args.small_repeats:
            print("small state ...", file=sys.stderr)
            results["small"] = small.run(
                work, args.small_repeats, list(small.STATES), args.predecessor_python
            )
        if not args.no_rss:
            print("peak memory ...", file=sys.stderr)
            rss_sizes = [n for n in sizes if n >= 100 * MB] or [max(sizes)]
            results["rss"] = bench_rss(work, rss_sizes, kinds, not args.no_seed)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    results["load_end"] = loadavg()
    print(report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
