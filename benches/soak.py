"""Reliability soak: the fault tests of tests/test_faults_*.py and tests/test_hostile.py,
run many more times. Not part of the test suite (it takes about a quarter of an hour).

    python benches/soak.py                      # 500 kills, 2,000 flips, 20 race rounds
    python benches/soak.py --kills 20 --flips 100 --races 1 --no-million   # a quick look

Every trial checks what its test checks and stops the soak on the first failure, so
the figures printed at the end are trials that all passed. They go to the README's
"Reliability" table and docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import faultkit  # noqa: E402


def _step(name: str) -> float:
    print(f"== {name}", file=sys.stderr, flush=True)
    return time.perf_counter()


def soak_kills(tmp: Path, kills: int, seed: int) -> dict[str, int]:
    directory = tmp / "kills"
    directory.mkdir()
    return faultkit.kill_trials(directory, kills, seed=seed, progress=True)


def soak_flips(tmp: Path, flips: int, seed: int) -> dict[str, int]:
    """``flips`` single-bit and ``flips`` single-byte changes at uniformly random
    offsets, 8 of each per region, truncation at every 1 % and appended bytes."""
    rng = random.Random(seed)
    sample = faultkit.bitrot_sample(tmp / "rot-sample")
    size = sample.stat().st_size
    cases: list[list] = []
    for _ in range(flips):
        cases.append(["xor", rng.randrange(size), 1 << rng.randrange(8)])
    for _ in range(flips):
        cases.append(["set", rng.randrange(size), rng.randrange(256)])
    regions = faultkit.file_regions(sample)
    for ranges in regions.values():
        for off in faultkit.sample_offsets(ranges, 8, rng):
            cases.append(["xor", off, 1 << rng.randrange(8)])
            cases.append(["set", off, rng.randrange(256)])
    truncations = [["truncate", size * k // 100] for k in range(100)]
    appends = [["append", os.urandom(n).hex()] for n in (1, 7, 512, 4096)]
    scratch = tmp / "rot"
    scratch.mkdir()
    results = faultkit.run_mutations(sample, cases + truncations + appends, scratch)
    missed = faultkit.undetected(results)
    if missed:
        raise AssertionError(f"undetected changes: {missed[:5]}")
    changed = [r for r in results if not r.get("unchanged")]
    return {
        "file_bytes": size,
        "regions": len(regions),
        "random_offset_changes": sum(not r.get("unchanged") for r in results[: 2 * flips]),
        "bit_flips": sum(r["case"][0] == "xor" for r in changed),
        "byte_changes": sum(r["case"][0] == "set" for r in changed),
        "truncations": len(truncations),
        "appends": len(appends),
        "detected": len(changed),
        "missed": 0,
    }


def soak_races(tmp: Path, rounds: int) -> dict[str, int]:
    stats = {"rounds": 0, "processes": 0, "saves": 0, "lists": 0, "loads": 0, "cleanups": 0}
    expected: dict[str, int] = {}
    for i in range(rounds):
        reports = faultkit.race_round(tmp / f"race{i}" / "ckpt", saves=30)
        stats["rounds"] += 1
        stats["processes"] += len(reports)
        stats["saves"] += reports["saver"]["ops"]
        stats["lists"] += reports["lister"]["ops"]
        stats["loads"] += reports["loader"]["ops"]
        stats["cleanups"] += reports["cleaner"]["ops"]
        for rep in reports.values():
            for name, n in rep["expected"].items():
                expected[name] = expected.get(name, 0) + n
        print(f"  races: {i + 1}/{rounds}", file=sys.stderr, flush=True)
    stats["expected_errors"] = sum(expected.values())
    return stats


def soak_million_attributes(tmp: Path) -> dict[str, object]:
    """A verified payload whose tree node carries 1,000,000 attributes, loaded under
    an address-space cap: refused by the attribute limit."""
    sys.path.insert(0, str(ROOT / "tests"))
    import test_hostile

    path = test_hostile.sealed_payload(
        tmp / "checkpoint_batch_0003.h5", test_hostile._many_attributes("tree", 1_000_000)
    )
    outcome = faultkit.load_capped(path)
    if outcome["result"] != "CheckpointLimitError":
        raise AssertionError(outcome)
    return {"attributes": 1_000_000, "file_bytes": path.stat().st_size, "result": outcome["result"]}


def soak_header_fuzz(cases: int) -> dict[str, int]:
    env = {**os.environ, "H5CKPT_FUZZ_CASES": str(cases)}
    proc = subprocess.run(
        ["cargo", "test", "--release", "--lib", "header::tests::fuzz_mutated_valid_headers"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0 or "1 passed" not in proc.stdout:
        raise AssertionError(proc.stdout[-3000:] + proc.stderr[-3000:])
    return {"cases": cases}


def machine() -> dict[str, str]:
    import h5py
    import numpy

    return {
        "cpus": str(os.cpu_count()),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "h5py": h5py.__version__,
        "hdf5": h5py.version.hdf5_version,
        "numpy": numpy.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=500)
    parser.add_argument(
        "--flips", type=int, default=1000, help="bit flips, and as many byte changes"
    )
    parser.add_argument("--races", type=int, default=20, help="rounds of four racing processes")
    parser.add_argument("--fuzz", type=int, default=1_000_000, help="header fuzz cases (cargo)")
    parser.add_argument("--no-million", action="store_true", help="skip the 1M-attribute file")
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()

    figures: dict[str, object] = {"machine": machine(), "seconds": {}}

    def record(name: str, run) -> None:
        started = _step(name)
        figures[name] = run()
        figures["seconds"][name] = round(time.perf_counter() - started)
        # Written as each part ends, so that a later failure loses nothing.
        print(json.dumps({name: figures[name]}), flush=True)
        if args.out:
            args.out.write_text(json.dumps(figures, indent=2) + "\n")

    with tempfile.TemporaryDirectory(prefix="h5ckpt-soak-") as tmp_name:
        tmp = Path(tmp_name)
        record("kills", lambda: soak_kills(tmp, args.kills, args.seed))
        record("bitrot", lambda: soak_flips(tmp, args.flips, args.seed))
        record("races", lambda: soak_races(tmp, args.races))
        if not args.no_million:
            record("million_attributes", lambda: soak_million_attributes(tmp))
        if args.fuzz:
            record("header_fuzz", lambda: soak_header_fuzz(args.fuzz))
    print(json.dumps(figures, indent=2))
    k, b, r = figures["kills"], figures["bitrot"], figures["races"]
    print(
        "\n| fault | trials | outcome |\n|---|---:|---|\n"
        f"| SIGKILL during 4 MB saves | {k['trials']} kills | last committed save found and "
        f"loaded every time; {k['in_flight_committed']} in-flight saves had committed; "
        f"{k['temp_files_swept']} dead writers' temp files swept |\n"
        f"| single-bit flips | {b['bit_flips']} | {b['bit_flips']} detected |\n"
        f"| single-byte changes | {b['byte_changes']} | {b['byte_changes']} detected |\n"
        f"| truncations (every 1 %) and appends | {b['truncations'] + b['appends']} | all "
        "detected |\n"
        f"| race rounds (save, list, load, clean) | {r['rounds']} × 4 processes | "
        "no unexpected exception, nothing committed lost |"
    )


if __name__ == "__main__":
    main()
