"""Bit rot: single-bit and single-byte changes in every region of a checkpoint —
each header field, the HDF5 superblock and metadata, every dataset (every chunk of a
chunked one), the root attributes' names and values, the tree's type attributes —
truncation at every 5 % of the length, and appended bytes. Every change is caught by
validate, load, a verified listing and find_latest. The loads run in a child process,
so a crash of libhdf5 on a damaged file would fail the test, not hide in it.
``benches/soak.py`` adds 1,000+ changes at uniformly random offsets."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

import faultkit
from h5ckpt import CheckpointManager


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return faultkit.bitrot_sample(tmp_path_factory.mktemp("rot"))


def test_regions_cover_the_whole_file(sample: Path):
    regions = faultkit.file_regions(sample)
    size = sample.stat().st_size
    covered = bytearray(size)
    for ranges in regions.values():
        for lo, hi in ranges:
            covered[lo:hi] = b"\x01" * (hi - lo)
    assert all(covered), "some bytes belong to no region"
    kinds = Counter(name.split()[0] for name in regions)
    assert kinds["header"] == 16
    assert kinds["dataset"] >= 4  # parameters, a chunked array, small arrays
    assert kinds["attribute"] >= 10


def test_flips_in_every_region_are_detected(sample: Path, tmp_path: Path):
    rng = random.Random(1234)
    cases: list[list] = []
    for ranges in faultkit.file_regions(sample).values():
        for off in faultkit.sample_offsets(ranges, 5, rng):
            cases.append(["xor", off, 1 << rng.randrange(8)])
        for off in faultkit.sample_offsets(ranges, 3, rng):
            cases.append(["set", off, rng.randrange(256)])
    results = faultkit.run_mutations(sample, cases, tmp_path)
    assert len(results) == len(cases) >= 200
    assert faultkit.undetected(results) == []
    # What failed is the check of the damaged part: HDF5 was never reached.
    loads = Counter(r["load"] for r in results if not r.get("unchanged"))
    assert set(loads) <= {"CheckpointCorruptError", "CheckpointVersionError"}, loads


def test_truncation_at_every_5_percent_and_appended_bytes(sample: Path, tmp_path: Path):
    size = sample.stat().st_size
    cases: list[list] = [["truncate", size * k // 20] for k in range(20)]
    cases += [["truncate", size - 1], ["truncate", 511], ["truncate", 513]]
    cases += [
        ["append", "00"],
        ["append", "ff" * 4096],
        ["append", sample.read_bytes()[:512].hex()],
    ]
    results = faultkit.run_mutations(sample, cases, tmp_path)
    assert faultkit.undetected(results) == []
    assert all(r["load"] == "CheckpointCorruptError" for r in results)


def test_rot_under_a_long_lived_manager_falls_back(tmp_path: Path):
    """Bit rot changes no size or mtime. A manager that verified the newest file
    earlier still refuses to load it once it rots, and load_latest falls back."""
    import os

    m = CheckpointManager(tmp_path / "c", keep_last_n=None)
    for b in (1, 2):
        m.save_checkpoint(b, faultkit.params_for(b, 1000), {"step": b}, 1.0)
    newest = m.find_latest_checkpoint()
    assert newest is not None and newest.name.endswith("0002.h5")
    st = newest.stat()
    with open(newest, "r+b") as f:
        f.seek(st.st_size // 2)
        byte = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([byte[0] ^ 0x10]))
    os.utime(newest, ns=(st.st_atime_ns, st.st_mtime_ns))
    data = m.load_latest()
    assert data is not None and data["batch_idx"] == 1
    assert m.validate_checkpoint(newest) is False
