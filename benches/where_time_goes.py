"""Where the time of a save, a load and a validate goes, phase by phase.

    python benches/where_time_goes.py                # 100 MB, random and smooth, 7 repeats
    python benches/where_time_goes.py --size 512M --kinds random --repeats 5

Each phase is timed by wrapping the function that does it (medians over the
repeats), next to the raw baselines of benches/run.py measured in the same loop:

save:  sample     choosing raw or LZ4 (codec sample)
       payload    HDF5 layout through h5py; compressed chunks included
       finalize   Rust core: writes raw arrays, hashes the payload, writes the
                  header, fsyncs (includes waiting for the disk)
       commit     rename + directory fsync + retention
load:  verified   Rust core: read the file once and hash it (all cores)
       parse      h5py over the verified bytes: tree walk and array copies
validate:         Rust core: hash the file on all cores

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent))

import h5ckpt.codec as codec_module
import h5ckpt.payload as payload_module
import h5ckpt.reading as reading_module
import h5ckpt.retention as retention_module
import h5ckpt.verification as verification_module
from h5ckpt import CheckpointManager
from run import loadavg, make_data, parse_size, raw_read_sha256, raw_write, size_label

TIMES: dict[str, list[float]] = defaultdict(list)


def timed(label: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[label].append(time.perf_counter() - t0)

    return wrapper


class _NativeProxy:
    """``h5ckpt._native`` with the calls a save, a load and a validate make timed."""

    LABELS: ClassVar[dict[str, str]] = {
        "finalize": "save: finalize (write+hash+fsync)",
        "seal_image": "save: seal_image (small files: hash+write+fsync)",
        "read_verified_fd": "load: read + verify",
        "verify_fds": "validate: verify_fds",
    }

    def __init__(self, native) -> None:
        self._native = native

    def __getattr__(self, name: str):
        attr = getattr(self._native, name)
        label = self.LABELS.get(name)
        return timed(label, attr) if label else attr


def instrument() -> None:
    # Each module that makes one of the timed calls: finalize and seal_image
    # (payload), the verified read (reading), the validation's hashing (verification).
    for module in (payload_module, reading_module, verification_module):
        module._native = _NativeProxy(module._native)
    payload_module.write_payload = timed(
        "save: payload (HDF5 layout)", payload_module.write_payload
    )
    reading_module.read_payload = timed("load: parse (h5py)", reading_module.read_payload)
    codec_module._sample_ratio = timed("save: codec sample", codec_module._sample_ratio)
    cleanup = retention_module.Retention.cleanup
    retention_module.Retention.cleanup = timed("save: retention", cleanup)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="100M")
    p.add_argument("--kinds", default="random,smooth")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    nbytes = parse_size(args.size)
    instrument()
    print(f"load average at start: {loadavg()}")
    for kind in args.kinds.split(","):
        TIMES.clear()
        data = make_data(nbytes, kind)
        root = Path(tempfile.mkdtemp(prefix="h5ckpt-profile-"))
        try:
            m = CheckpointManager(root / "ckpt")
            for r in range(args.repeats):
                raw = root / f"raw-{r}"
                t0 = time.perf_counter()
                raw_write(raw, data)
                TIMES["baseline: raw write+fsync"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                path = m.save_checkpoint(r + 1, data, {"step": r}, 0.5)
                TIMES["save: total"].append(time.perf_counter() - t0)
                m.close()  # background reclamation of retention's deletions
                t0 = time.perf_counter()
                raw_read_sha256(raw)
                TIMES["baseline: raw read+sha256"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                m.load_checkpoint(path)
                TIMES["load: total"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    while block := f.read(1 << 20):
                        h.update(block)
                TIMES["baseline: hashlib.sha256 (1 thread)"].append(time.perf_counter() - t0)
                m.validate_checkpoint(path)
                raw.unlink()
        finally:
            shutil.rmtree(root, ignore_errors=True)
        print(f"\n{size_label(data.nbytes)} {kind}, medians of {args.repeats} (ms):")
        for label in sorted(TIMES):
            values = TIMES[label]
            spread = f"{min(values) * 1000:.0f}–{max(values) * 1000:.0f}"
            print(f"  {label:40s} {statistics.median(values) * 1000:8.1f}   ({spread})")
    print(f"\nload average at end: {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
