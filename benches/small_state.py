"""The small state the predecessor was built for: a streaming least-squares fit.

    python benches/small_state.py                   # 40 repeats, both states
    python benches/small_state.py --repeats 100 --predecessor-python /path/to/python

Two states, saved every few batches by a streaming fit:

* ``fit``: 7 parameters; optimizer state ``{"jtj": (7, 7) f64, "jtr": (7,) f64,
  "n_points": int, "step": int, "lm_lambda": float, "history": (256,) f64}``; four
  small metadata fields (the issue's exact state);
* ``wide``: the same plus about 100 leaves (per-q-bin scalars, short arrays, strings).

Side by side in one repeat loop (rotating order, medians and ratios of medians):
h5ckpt durable and ``durable=False``; the predecessor's approach re-implemented
(``seed_baseline.py``); the real predecessor (homodyne's ``CheckpointManager``)
when ``--predecessor-python`` names an interpreter that can import it (it needs
Python >= 3.12 and its own dependencies, so it runs in a subprocess of that
interpreter, in the same run); and the physical baseline: the same number of bytes
as h5ckpt's file written to a temp file, fsynced, renamed, directory fsynced.

Also timed: the resume path of a restarted job, ``CheckpointManager(...)`` and
``load_latest()`` on a directory of 3 such checkpoints, against the seed's
find-latest + load. Not part of the test suite; ``run.py`` runs it too.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fit_states import STATES, count_leaves
from h5ckpt import CheckpointManager
from seed_baseline import SeedCheckpointManager

#: Medians against these (milliseconds), from the small-state performance issue.
GOALS_MS = {"save": 2.5, "save_fast": 1.5, "load": 1.5, "resume": 3.0}
#: The durable save against the physical baseline measured in the same loop.
RAW_RATIO_GOAL = 4.0


def raw_commit(directory: Path, name: str, data: bytes) -> None:
    """The physical floor of a durable save: temp file, fsync, rename, directory fsync."""
    tmp = directory / f".{name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, directory / name)
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class Timings:
    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = defaultdict(list)

    def time(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        result = fn()
        self.samples[name].append(time.perf_counter() - t0)
        return result

    def medians(self) -> dict[str, float]:
        return {k: statistics.median(v) for k, v in self.samples.items()}


def bench_state(root: Path, name: str, repeats: int) -> dict[str, Any]:
    make = STATES[name]
    case = root / name
    dirs = {k: case / k for k in ("ours", "fast", "seed", "raw", "resume", "seed_resume")}
    for d in dirs.values():
        d.mkdir(parents=True)
    ours = CheckpointManager(dirs["ours"], keep_last_n=3)
    fast = CheckpointManager(dirs["fast"], keep_last_n=3, durable=False)
    seed = SeedCheckpointManager(dirs["seed"])
    for b in range(3):  # the directories a restarted job resumes from
        CheckpointManager(dirs["resume"]).save_checkpoint(b, *make(b))
        SeedCheckpointManager(dirs["seed_resume"]).save_checkpoint(b, *make(b))
    file_bytes = ours.save_checkpoint(0, *make(0)).stat().st_size
    payload = os.urandom(file_bytes)

    t = Timings()
    gc.collect()
    gc.disable()  # a collection inside one timed call would dominate a 1 ms sample
    try:
        for r in range(repeats):
            batch = r + 1
            state = make(batch)
            ops: list[tuple[str, Callable[[], Any]]] = [
                ("save", lambda s=state, b=batch: ours.save_checkpoint(b, *s)),
                ("save_fast", lambda s=state, b=batch: fast.save_checkpoint(b, *s)),
                ("seed_save", lambda s=state, b=batch: seed.save_checkpoint(b, *s)),
                ("raw_commit", lambda b=batch: raw_commit(dirs["raw"], f"raw-{b}.bin", payload)),
            ]
            k = r % len(ops)
            for op, fn in ops[k:] + ops[:k]:
                t.time(op, fn)
            path, seed_path = ours.checkpoint_path(batch), seed.checkpoint_path(batch)
            reads: list[tuple[str, Callable[[], Any]]] = [
                ("load", lambda p=path: ours.load_checkpoint(p)),
                ("validate", lambda p=path: ours.validate_checkpoint(p)),
                ("seed_load", lambda p=seed_path: seed.load_checkpoint(p)),
                ("seed_validate", lambda p=seed_path: seed.validate_checkpoint(p)),
                ("resume", lambda: CheckpointManager(dirs["resume"]).load_latest()),
                (
                    "seed_resume",
                    lambda: seed.load_checkpoint(
                        SeedCheckpointManager(dirs["seed_resume"]).find_latest_checkpoint()
                    ),
                ),
            ]
            k = r % len(reads)
            for op, fn in reads[k:] + reads[:k]:
                result = t.time(op, fn)
                if op.endswith("validate") and result is not True:
                    raise AssertionError(f"{op} failed on a fresh checkpoint")
            seed.cleanup_old_checkpoints()
            for old in dirs["raw"].glob("raw-*.bin"):
                if old.name != f"raw-{batch}.bin":
                    old.unlink()
            gc.collect()
    finally:
        gc.enable()
        ours.close()
        fast.close()
    _, optimizer_state, _, metadata = make(0)
    return {
        "state": name,
        "leaves": 1 + count_leaves(optimizer_state) + count_leaves(metadata),
        "file_bytes": file_bytes,
        "seed_file_bytes": seed.checkpoint_path(repeats).stat().st_size,
        "repeats": repeats,
        "medians": t.medians(),
        "samples": dict(t.samples),
    }


PREDECESSOR_SCRIPT = r"""
import json, os, statistics, sys, tempfile, time
sys.path.insert(0, sys.argv[1])
from fit_states import STATES
from homodyne.optimization.checkpoint_manager import CheckpointManager
import homodyne
out = {"version": getattr(homodyne, "__version__", "?")}
for name in sys.argv[3].split(","):
    make = STATES[name]
    d = tempfile.mkdtemp(prefix="homodyne-", dir=sys.argv[4])
    m = CheckpointManager(d, keep_last_n=3)
    resume_dir = tempfile.mkdtemp(prefix="homodyne-resume-", dir=sys.argv[4])
    for b in range(3):  # the directory a restarted job resumes from
        CheckpointManager(resume_dir).save_checkpoint(b, *make(b))
    samples = {"save": [], "load": [], "validate": [], "resume": []}
    for r in range(int(sys.argv[2])):
        params, state, loss, meta = make(r + 1)
        t = time.perf_counter(); path = m.save_checkpoint(r + 1, params, state, loss, meta)
        samples["save"].append(time.perf_counter() - t)
        t = time.perf_counter(); m.load_checkpoint(path)
        samples["load"].append(time.perf_counter() - t)
        t = time.perf_counter(); ok = m.validate_checkpoint(path)
        samples["validate"].append(time.perf_counter() - t)
        assert ok
        t = time.perf_counter()
        fresh = CheckpointManager(resume_dir)
        fresh.load_checkpoint(fresh.find_latest_checkpoint())
        samples["resume"].append(time.perf_counter() - t)
    out[name] = {k: statistics.median(v) for k, v in samples.items()}
print(json.dumps(out))
"""


def bench_predecessor(python: str, names: list[str], repeats: int, root: Path) -> dict[str, Any]:
    """The real predecessor, timed by its own interpreter on the same states."""
    here = str(Path(__file__).resolve().parent)
    env = dict(os.environ, PYTHONPATH=here)
    result = subprocess.run(
        [python, "-c", PREDECESSOR_SCRIPT, here, str(repeats), ",".join(names), str(root)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-3:]
        return {"error": " / ".join(tail) or f"exit status {result.returncode}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def _ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1000:.2f} ms"


def _x(a: float | None, b: float | None) -> str:
    return "–" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def report(results: list[dict[str, Any]], predecessor: dict[str, Any] | None) -> str:
    lines = [
        "Small state (medians; ratio = h5ckpt / other, below 1 means h5ckpt is faster).",
        "",
        "| state | leaves | operation | h5ckpt durable | h5ckpt durable=False | seed re-impl "
        "| real predecessor | raw commit | durable / seed | durable / predecessor "
        "| durable / raw |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        m = res["medians"].get
        pred = (predecessor or {}).get(res["state"], {})
        rows = [
            ("save", m("save"), m("save_fast"), m("seed_save"), pred.get("save"), m("raw_commit")),
            ("load (verified)", m("load"), None, m("seed_load"), pred.get("load"), None),
            ("validate", m("validate"), None, m("seed_validate"), pred.get("validate"), None),
            (
                "manager + load_latest, 3 files",
                m("resume"),
                None,
                m("seed_resume"),
                pred.get("resume"),
                None,
            ),
        ]
        for op, ours, fast, seed, real, raw in rows:
            lines.append(
                f"| {res['state']} | {res['leaves']} | {op} | {_ms(ours)} | {_ms(fast)} | "
                f"{_ms(seed)} | {_ms(real)} | {_ms(raw)} | {_x(ours, seed)} | "
                f"{_x(ours, real)} | {_x(ours, raw)} |"
            )
    lines.append("")
    if predecessor is None:
        lines.append("Real predecessor: not run (no --predecessor-python).")
    elif "error" in predecessor:
        lines.append(f"Real predecessor: failed to run: {predecessor['error']}")
    else:
        lines.append(f"Real predecessor: homodyne {predecessor.get('version')}.")
    fit = next((r for r in results if r["state"] == "fit"), None)
    if fit:
        m = fit["medians"]
        lines += [
            "",
            f"File size: h5ckpt {fit['file_bytes']} B, seed re-impl {fit['seed_file_bytes']} B.",
            "",
            "| goal (fit state) | target | measured | met |",
            "|---|---:|---:|---|",
        ]
        labels = {
            "save": "durable save",
            "save_fast": "`durable=False` save",
            "load": "verified load",
            "resume": "manager + load_latest (3 files)",
        }
        for key, goal in GOALS_MS.items():
            value = m.get(key)
            met = "yes" if value is not None and value * 1000 <= goal else "NO"
            lines.append(f"| {labels[key]} | ≤ {goal} ms | {_ms(value)} | {met} |")
        save, raw = m.get("save"), m.get("raw_commit")
        ratio = save / raw if save is not None and raw else None
        met = "yes" if ratio is not None and ratio <= RAW_RATIO_GOAL else "NO"
        measured = "–" if ratio is None else f"{ratio:.2f}"
        label = f"durable save / raw commit ({_ms(raw)})"
        lines.append(f"| {label} | ≤ {RAW_RATIO_GOAL:g} | {measured} | {met} |")
    return "\n".join(lines)


def run(
    root: Path, repeats: int, names: list[str], predecessor_python: str | None
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    results = [bench_state(root, name, repeats) for name in names]
    predecessor = None
    if predecessor_python:
        predecessor = bench_predecessor(predecessor_python, names, repeats, root)
    return results, predecessor


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--states", default="fit,wide", help="fit, wide or both")
    p.add_argument(
        "--predecessor-python",
        default=os.environ.get("H5CKPT_PREDECESSOR_PYTHON"),
        help="an interpreter that can import homodyne (the real predecessor)",
    )
    p.add_argument("--dir", help="where to write (default: a temp dir, removed afterwards)")
    p.add_argument("--json", help="also write all samples to this JSON file")
    args = p.parse_args(argv)
    names = [s.strip() for s in args.states.split(",")]
    with tempfile.TemporaryDirectory(prefix="h5ckpt-small-", dir=args.dir) as tmp:
        results, predecessor = run(Path(tmp), args.repeats, names, args.predecessor_python)
    print(report(results, predecessor))
    if args.json:
        Path(args.json).write_text(json.dumps({"small": results, "predecessor": predecessor}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
