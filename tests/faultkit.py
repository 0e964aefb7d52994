"""Fault injection kit shared by the fault tests and ``benches/soak.py``.

Everything here injects real faults: child processes that are SIGKILLed, bytes
changed on disk, processes racing on one directory. Child processes run this file
as a script (``python faultkit.py ROLE ...``) so that a crash of libhdf5 or of the
Rust core kills only the child and shows as its exit status.

Roles:

* ``writer DIR LOG START``: save 4 MB states forever, logging each save.
* ``mutate FILE CASES OUT``: apply each corruption case to a copy of ``FILE`` and
  record what ``validate``, ``load``, ``list`` and ``find_latest`` make of it.
* ``race ROLE DIR DONE OUT``: one of the racing roles (saver, lister, loader, cleaner).
* ``replace DIR N DONE``: save batch 7 ``N`` times with changing content.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve()
PREFIX = "checkpoint"
CKPT_RE = re.compile(rf"^{PREFIX}_batch_\d+\.h5$")
TEMP_RE = re.compile(r"^\..*\.tmp$")
#: 4 MB of float64: the parameter array of each kill-test save.
STATE_FLOATS = 500_000


# ----------------------------------------------------------------------- content


def params_for(batch: int, n: int = STATE_FLOATS) -> np.ndarray:
    """The parameters saved for ``batch``: incompressible, so the Rust core writes them."""
    return np.random.default_rng(batch).random(n)


def state_for(batch: int) -> dict[str, Any]:
    """An optimizer state with a compressible array (written by HDF5) and scalars."""
    return {"step": batch, "moment": np.arange(50_000, dtype=np.float64) * batch, "tag": "adam"}


def compressible_state() -> dict[str, Any]:
    """16 MB that compress to a few MB: written by HDF5 through its LZ4 filter."""
    return {"a": np.random.default_rng(0).integers(0, 16, 2_000_000).astype(np.float64)}


def check_content(data: dict[str, Any], n: int = STATE_FLOATS) -> None:
    """Assert that a loaded checkpoint holds exactly what was saved for its batch."""
    batch = data["batch_idx"]
    assert data["metadata"] == {"batch": batch}, data["metadata"]
    assert data["optimizer_state"]["step"] == batch
    np.testing.assert_array_equal(data["parameters"], params_for(batch, n))
    np.testing.assert_array_equal(
        data["optimizer_state"]["moment"], np.arange(50_000, dtype=np.float64) * batch
    )


def checkpoint_names(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if CKPT_RE.match(n))


def temp_names(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if TEMP_RE.match(n))


def batch_of(name: str) -> int:
    return int(name[len(PREFIX) + 7 : -3])


def run_child(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run this file as a script in a child process; return its completed process."""
    return subprocess.run(
        [sys.executable, str(HERE), *args], capture_output=True, text=True, **kwargs
    )


def _die_with_parent() -> None:
    """In a child about to exec: be SIGKILLed when the parent dies (Linux), so that an
    interrupted test or soak leaves no writer saving forever."""
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


def spawn_child(*args: str, **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(HERE), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        **kwargs,
    )


# ------------------------------------------------------------------------- kills


def writer_main(directory: str, log: str, start: str) -> None:
    """Save 4 MB states in a loop until killed; log ``S b`` before and ``C b`` after."""
    from h5ckpt import CheckpointManager

    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    m = CheckpointManager(directory, keep_last_n=3)
    os.write(fd, b"R\n")
    batch = int(start)
    while True:
        os.write(fd, f"S {batch}\n".encode())
        m.save_checkpoint(
            batch, params_for(batch), state_for(batch), 1.0 / (batch + 1), {"batch": batch}
        )
        os.write(fd, f"C {batch}\n".encode())
        batch += 1


def _read_log(log: Path) -> tuple[bool, list[int], list[int]]:
    ready, started, committed = False, [], []
    with contextlib.suppress(FileNotFoundError):
        for line in log.read_text().splitlines():
            if line == "R":
                ready = True
            elif line.startswith("S "):
                started.append(int(line[2:]))
            elif line.startswith("C "):
                committed.append(int(line[2:]))
    return ready, started, committed


def kill_trial(
    directory: Path, log: Path, start: int, rng: random.Random, max_delay: float = 0.5
) -> dict[str, Any]:
    """Start a writer, SIGKILL it at a random moment, then check the directory.

    Returns what happened: the last committed and in-flight batches, the batch that
    a new manager found, how many temp files the dead writer left.
    """
    from h5ckpt import CheckpointManager

    log.unlink(missing_ok=True)
    child = spawn_child("writer", str(directory), str(log), str(start))
    try:
        # Kill at a random moment after the writer is ready (or, now and then,
        # while it is still starting up).
        if rng.random() < 0.9:
            while not _read_log(log)[0]:
                if child.poll() is not None:
                    raise AssertionError(f"writer died on its own: {child.stderr.read()}")
                time.sleep(0.005)
        time.sleep(rng.uniform(0.0, max_delay))
    finally:
        child.send_signal(signal.SIGKILL)
        _, stderr = child.communicate()
    assert child.returncode == -signal.SIGKILL, stderr
    _, started, committed = _read_log(log)
    last_committed = committed[-1] if committed else None
    in_flight = started[-1] if started and started[-1] != last_committed else None
    before = sorted(directory.iterdir())
    had_before = set(checkpoint_names(directory))
    temps_left = temp_names(directory)

    m = CheckpointManager(directory, keep_last_n=3)  # sweeps dead writers' temp files
    assert temp_names(directory) == [], (temp_names(directory), before)
    latest = m.find_latest_checkpoint()
    allowed = {b for b in (last_committed, in_flight) if b is not None}
    if last_committed is None and start > 0:
        allowed.add(start - 1)  # nothing committed this time: the previous trial's latest
    if latest is None:
        assert last_committed is None and start == 0, (last_committed, start)
        found = None
    else:
        found = batch_of(latest.name)
        assert found in allowed, (found, allowed, had_before)
        check_content(m.load_checkpoint(latest))
    names = checkpoint_names(directory)
    for name in names:
        assert m.validate_checkpoint(directory / name), name
    assert all(i.is_valid for i in m.list_checkpoints(verify=True))
    if last_committed is not None:
        assert f"{PREFIX}_batch_{last_committed:04d}.h5" in names
    return {
        "last_committed": last_committed,
        "in_flight": in_flight,
        "found": found,
        "in_flight_committed": found is not None and found == in_flight,
        "temps_left": len(temps_left),
        "files": len(names),
    }


def kill_trials(
    directory: Path, trials: int, seed: int, max_delay: float = 0.5, progress: bool = False
) -> dict[str, int]:
    """``trials`` kill trials in a row on one directory, each resuming where the last
    ended; return counts."""
    rng = random.Random(seed)
    log = directory.parent / f"{directory.name}.log"
    start = 0
    stats = {
        "trials": 0,
        "killed_mid_save": 0,
        "in_flight_committed": 0,
        "temp_files_swept": 0,
        "saves_committed": 0,
    }
    for i in range(trials):
        r = kill_trial(directory, log, start, rng, max_delay)
        stats["trials"] += 1
        stats["killed_mid_save"] += r["in_flight"] is not None
        stats["in_flight_committed"] += bool(r["in_flight_committed"])
        stats["temp_files_swept"] += r["temps_left"]
        if r["found"] is not None:
            stats["saves_committed"] += r["found"] + 1 - start
            start = r["found"] + 1
        if progress and (i + 1) % 50 == 0:
            print(f"  kills: {i + 1}/{trials} {stats}", file=sys.stderr, flush=True)
    return stats


# --------------------------------------------------------------------- bit rot


def header_fields() -> dict[str, tuple[int, int]]:
    """Byte ranges of the header fields (docs/format.md)."""
    return {
        "header magic": (0, 8),
        "header format_major": (8, 10),
        "header format_minor": (10, 12),
        "header header_size": (12, 16),
        "header payload_offset": (16, 24),
        "header payload_length": (24, 32),
        "header chunk_log2": (32, 36),
        "header flags": (36, 40),
        "header chunk_count": (40, 48),
        "header batch_idx": (48, 56),
        "header loss": (56, 64),
        "header timestamp": (64, 72),
        "header payload_digest": (72, 104),
        "header hmac_tag": (104, 136),
        "header reserved": (136, 480),
        "header header_digest": (480, 512),
    }


def file_regions(path: Path) -> dict[str, list[tuple[int, int]]]:
    """Byte ranges of every part of a checkpoint: header fields, HDF5 metadata (all
    bytes that are not raw dataset data), each dataset's data (each chunk of a
    chunked one), the names and values of the root attributes."""
    import h5py

    raw = path.read_bytes()
    regions: dict[str, list[tuple[int, int]]] = {k: [v] for k, v in header_fields().items()}
    data_ranges: list[tuple[int, int]] = []
    with h5py.File(path, "r") as f:

        def visit(name: str, obj: Any) -> None:
            if not isinstance(obj, h5py.Dataset) or not obj.id.get_storage_size():
                return
            if obj.chunks is None:
                off = obj.id.get_offset()
                if off is not None:  # contiguous; compact data lives in the metadata
                    rng = (off, off + obj.id.get_storage_size())
                    regions[f"dataset {name}"] = [rng]
                    data_ranges.append(rng)
                return
            chunks = []
            for i in range(obj.id.get_num_chunks()):
                info = obj.id.get_chunk_info(i)
                chunks.append((info.byte_offset, info.byte_offset + info.size))
            regions[f"dataset {name} (chunked)"] = chunks
            data_ranges.extend(chunks)

        f.visititems(visit)
        attrs = {k: f.attrs[k] for k in f.attrs}
    data_ranges.sort()
    meta, pos = [], 512
    for lo, hi in data_ranges:
        if lo > pos:
            meta.append((pos, lo))
        pos = max(pos, hi)
    if pos < len(raw):
        meta.append((pos, len(raw)))
    regions["hdf5 superblock"] = [(512, 512 + 48)]
    regions["hdf5 metadata"] = meta
    for name, value in attrs.items():
        at = raw.find(name.encode(), 512)
        assert at > 0, name
        regions[f"attribute name {name}"] = [(at, at + len(name))]
        if isinstance(value, (str, bytes)):
            vb = value.encode() if isinstance(value, str) else value
        else:
            vb = np.asarray(value).tobytes()
        vat = raw.find(vb, at)
        if vat < 0:  # a variable-length string lives in a global heap, maybe earlier
            vat = raw.find(vb, 512)
        assert vat > 0, name
        regions[f"attribute value {name}"] = [(vat, vat + len(vb))]
    regions["h5ckpt_type attributes"] = [
        (m.start(), m.end()) for m in re.finditer(rb"h5ckpt_type", raw)
    ][:8]
    return regions


def sample_offsets(ranges: list[tuple[int, int]], k: int, rng: random.Random) -> list[int]:
    """``k`` offsets in ``ranges``: both ends of the first and last range, the rest random."""
    out = {ranges[0][0], ranges[-1][1] - 1}
    total = sum(hi - lo for lo, hi in ranges)
    while len(out) < min(k, total):
        x = rng.randrange(total)
        for lo, hi in ranges:
            if x < hi - lo:
                out.add(lo + x)
                break
            x -= hi - lo
    return sorted(out)


def mutate_main(original: str, cases_path: str, out_path: str) -> None:
    """Apply each case to a scratch copy of ``original`` and record what h5ckpt says.

    The scratch copy sits beside an older valid checkpoint, so ``find_latest`` must
    fall back to it. A case is ``["xor", off, mask]``, ``["set", off, byte]``,
    ``["truncate", length]`` or ``["append", hex]``.
    """
    from h5ckpt import CheckpointError, CheckpointManager

    src = Path(original)
    data = src.read_bytes()
    cases = json.loads(Path(cases_path).read_text())
    work = Path(out_path).with_suffix(".dir")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    older = work / f"{PREFIX}_batch_0001.h5"
    CheckpointManager(work).save_checkpoint(1, np.ones(3), {"older": True}, 1.0)
    target = work / f"{PREFIX}_batch_0002.h5"
    target.write_bytes(data)
    results = []
    for i, case in enumerate(cases):
        print(f"case {i}: {case}", file=sys.stderr, flush=True)
        kind = case[0]
        if kind in ("xor", "set"):
            off = case[1]
            new = data[off] ^ case[2] if kind == "xor" else case[2]
            if new == data[off]:
                results.append({"case": case, "unchanged": True})
                continue
            with open(target, "r+b") as f:
                f.seek(off)
                f.write(bytes([new]))
        elif kind == "truncate":
            target.write_bytes(data[: case[1]])
        else:
            target.write_bytes(data + bytes.fromhex(case[1]))
        m = CheckpointManager(work, keep_last_n=None)
        result: dict[str, Any] = {"case": case, "valid": m.validate_checkpoint(target)}
        try:
            m.load_checkpoint(target)
            result["load"] = "LOADED"
        except CheckpointError as exc:
            result["load"] = type(exc).__name__
        except BaseException as exc:  # recorded, the test fails on it
            result["load"] = f"UNEXPECTED {type(exc).__name__}: {exc}"
        try:
            listed = {i.path.name: i for i in m.list_checkpoints(verify=True)}
            result["listed_status"] = listed[target.name].status
            latest = m.find_latest_checkpoint()
            result["latest"] = latest.name if latest else None
        except BaseException as exc:
            result["listed_status"] = f"UNEXPECTED {type(exc).__name__}: {exc}"
        results.append(result)
        if kind in ("xor", "set"):
            with open(target, "r+b") as f:
                f.seek(case[1])
                f.write(data[case[1] : case[1] + 1])
        else:
            target.write_bytes(data)
    assert CheckpointManager(work).validate_checkpoint(target)
    assert older.exists()
    Path(out_path).write_text(json.dumps(results))
    shutil.rmtree(work, ignore_errors=True)


def run_mutations(original: Path, cases: list[list[Any]], scratch: Path) -> list[dict[str, Any]]:
    """Run ``mutate_main`` in a child process; a crash of the child fails loudly."""
    cases_path = scratch / "cases.json"
    out = scratch / "results.json"
    cases_path.write_text(json.dumps(cases))
    proc = run_child("mutate", str(original), str(cases_path), str(out))
    last = proc.stderr.strip().splitlines()[-3:]
    assert proc.returncode == 0, f"child exited {proc.returncode}; last lines: {last}"
    return json.loads(out.read_text())


def undetected(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The cases that some check failed to catch."""
    bad = []
    for r in results:
        if r.get("unchanged"):
            continue
        caught = (
            r["valid"] is False
            and r["load"] != "LOADED"
            and not r["load"].startswith("UNEXPECTED")
            and r["listed_status"] == "invalid"
            and r["latest"] == f"{PREFIX}_batch_0001.h5"
        )
        if not caught:
            bad.append(r)
    return bad


def bitrot_sample(directory: Path) -> Path:
    """A checkpoint with every kind of region: raw multi-chunk parameters (written by
    the Rust core), compressed chunked arrays, small contiguous and compact data,
    nested containers and scalars, metadata."""
    from h5ckpt import CheckpointManager

    m = CheckpointManager(directory)
    rng = np.random.default_rng(5)
    state = {
        "smooth": np.cumsum(rng.standard_normal(150_000)),
        "ramp": np.arange(300_000, dtype=np.float64),  # compressed, several chunks
        "small": np.arange(10),
        "step": 3,
        "name": "adam",
        "nested": {"t": (1, 2.5, None), "b": b"bytes"},
    }
    return m.save_checkpoint(2, rng.standard_normal(300_000), state, 0.375, {"run": "rot"})


# ------------------------------------------------------------------------ races


def _wait_for(path: Path) -> None:
    while not path.exists():
        time.sleep(0.001)


class _Racer:
    """One racing process's role: ``step()`` does one round of it."""

    def __init__(self, role: str, directory: Path, done: Path) -> None:
        self.role = role
        self.d = directory
        self.done = done
        self.n = 20_000
        self.saves = int(os.environ.get("H5CKPT_RACE_SAVES", "30"))
        self.report: dict[str, Any] = {
            "role": role,
            "ops": 0,
            "expected": {},
            "failures": [],
            "seen": [],
            "committed": [],
        }

    def manager(self) -> Any:
        from h5ckpt import CheckpointManager

        return CheckpointManager(self.d, keep_last_n=2)

    def step(self) -> None:
        """One round of the role; ``StopIteration`` once the saver has saved them all."""
        act = {
            "saver": self.saver,
            "lister": self.lister,
            "loader": self.loader,
            "cleaner": self.cleaner,
        }.get(self.role)
        if act is not None:
            act()
        self.report["ops"] += 1

    def saver(self) -> None:
        m = self.manager()
        for b in range(self.saves):
            m.save_checkpoint(b, params_for(b, self.n), state_for(b), 1.0 / (b + 1), {"batch": b})
            self.report["committed"].append(b)
            self.report["ops"] += 1
        self.done.touch()
        raise StopIteration

    def lister(self) -> None:
        m = self.manager()
        infos = m.list_checkpoints(verify=True)
        if infos and not any(i.is_valid for i in infos):
            self.report["failures"].append(f"no valid file among {[i.path.name for i in infos]}")
        latest = m.find_latest_checkpoint()
        self.report["seen"].append(None if latest is None else batch_of(latest.name))

    def loader(self) -> None:
        from h5ckpt import CheckpointError

        m = self.manager()
        data = m.load_latest()
        if data is not None:
            check_content(data, self.n)
        self.report["seen"].append(None if data is None else data["batch_idx"])
        for name in checkpoint_names(self.d):
            with contextlib.suppress(CheckpointError):  # retention may delete it
                check_content(m.load_checkpoint(self.d / name), self.n)

    def cleaner(self) -> None:
        m = self.manager()  # sweeps temp files
        m.cleanup_old_checkpoints()


def race_main(role: str, directory: str, done: str, out: str) -> None:
    """One racing process. Records expected CheckpointErrors by class, and anything
    else as a failure; never stops on an exception."""
    from h5ckpt import CheckpointError

    racer = _Racer(role, Path(directory), Path(done))
    report = racer.report
    _wait_for(racer.d.parent / "go")
    while True:
        finished = racer.done.exists()
        try:
            racer.step()
        except StopIteration:
            break
        except CheckpointError as exc:
            name = type(exc).__name__
            report["expected"][name] = report["expected"].get(name, 0) + 1
        except BaseException:
            report["failures"].append(traceback.format_exc())
            if role == "saver":
                racer.done.touch()
                break
        if finished:
            break
    Path(out).write_text(json.dumps(report))


def check_monotonic(seen: list[int | None]) -> None:
    """Once a checkpoint was seen, a later look never finds an older one or none."""
    best = None
    for b in seen:
        if best is not None:
            assert b is not None and b >= best, f"went back from {best} to {b} in {seen}"
        best = b if b is not None else best


def race_round(directory: Path, saves: int = 30) -> dict[str, Any]:
    """Four processes (saver, lister, loader, cleaner) on one directory; returns their
    reports after checking them and the final directory."""
    from h5ckpt import CheckpointManager

    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    go = directory.parent / "go"
    done = directory.parent / "done"
    go.unlink(missing_ok=True)
    done.unlink(missing_ok=True)
    env = {**os.environ, "H5CKPT_RACE_SAVES": str(saves)}
    roles = ["saver", "lister", "loader", "cleaner"]
    outs = {r: directory.parent / f"{r}.json" for r in roles}
    procs = {
        r: spawn_child("race", r, str(directory), str(done), str(outs[r]), env=env) for r in roles
    }
    go.touch()
    reports = {}
    for role, proc in procs.items():
        _, stderr = proc.communicate()
        assert proc.returncode == 0, (role, proc.returncode, stderr[-3000:])
        reports[role] = json.loads(outs[role].read_text())
    for role, rep in reports.items():
        assert rep["failures"] == [], (role, rep["failures"])
    assert reports["saver"]["committed"] == list(range(saves))
    check_monotonic(reports["loader"]["seen"])
    check_monotonic(reports["lister"]["seen"])
    m = CheckpointManager(directory, keep_last_n=2)
    assert temp_names(directory) == []
    latest = m.find_latest_checkpoint()
    assert latest is not None and batch_of(latest.name) == saves - 1
    check_content(m.load_checkpoint(latest), 20_000)
    for name in checkpoint_names(directory):
        assert m.validate_checkpoint(directory / name), name
    return reports


def replace_main(directory: str, count: str, done: str) -> None:
    """Save batch 7 ``count`` times, each time with other content."""
    from h5ckpt import CheckpointManager

    m = CheckpointManager(directory, keep_last_n=1)
    for i in range(int(count)):
        m.save_checkpoint(7, params_for(i, 20_000), {"i": i}, float(i), {"i": i})
    Path(done).touch()


# ------------------------------------------------------------------ hostile loads


def load_main(path: str, limits_json: str, headroom_mb: str) -> None:
    """Load one file under an address-space cap of current use + ``headroom_mb``;
    print a JSON line: the outcome class and message."""
    import resource

    from h5ckpt import CheckpointManager, LoadLimits

    limits = LoadLimits(**json.loads(limits_json))
    m = CheckpointManager(Path(path).parent, load_limits=limits)
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) * 1024
    cap = vm + int(headroom_mb) * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    try:
        m.load_checkpoint(path)
        outcome = {"result": "LOADED", "message": ""}
    except BaseException as exc:
        text = str(exc)
        outcome = {
            "result": type(exc).__name__,
            "message": text if len(text) < 600 else f"{text[:300]}...{text[-300:]}",
            "context": sorted(getattr(exc, "error_context", {})),
        }
    print(json.dumps(outcome), flush=True)


def load_capped(
    path: Path, limits: dict[str, int] | None = None, headroom_mb: int = 512
) -> dict[str, str]:
    """``load_main`` in a child process; a crash fails loudly."""
    proc = run_child("load", str(path), json.dumps(limits or {}), str(headroom_mb))
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------ disk and permissions


def unavailable(reason: str) -> None:
    """Skip a test this machine cannot run (no pseudo-terminal, no mount); under CI
    (``CI=true``), which must run every test, fail instead, so that a skip there
    never hides a feature."""
    import pytest  # here: the fault scripts' child processes import this module

    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI must run this test, but: {reason}")
    pytest.skip(reason)


def can_mount(where: Path) -> bool:
    """Whether this process can mount a tmpfs (root, and mounting is allowed here)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    where.mkdir(parents=True, exist_ok=True)
    ok = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True
        ).returncode
        == 0
    )
    if ok:
        subprocess.run(["umount", str(where)], check=True)
    return ok


@contextlib.contextmanager
def tmpfs(where: Path, size: str):
    """A size-limited tmpfs mounted at ``where`` for the duration."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)], check=True
    )
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def remount(where: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(where)], check=True)


def fill(directory: Path, leave: int) -> Path:
    """Fill the file system of ``directory`` up, then free ``leave`` bytes."""
    filler = directory / "filler"
    block = b"\xa5" * 2**20
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(block)
            f.flush()
    size = filler.stat().st_size
    os.truncate(filler, max(0, size - leave))
    return filler


def _drop_dac() -> None:
    """In a child about to exec: lose the capabilities that let root ignore file
    permissions, so that mode bits are enforced for it as for anyone else."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop = 24
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(pr_capbset_drop, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def run_unprivileged(*args: str) -> dict[str, Any]:
    """Run a role in a child for which file permissions are enforced (root loses
    CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH; others have them not); return its JSON."""
    preexec = _drop_dac if os.geteuid() == 0 else None
    proc = subprocess.run(
        [sys.executable, str(HERE), *args], capture_output=True, text=True, preexec_fn=preexec
    )
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _outcome(call: Any) -> str:
    """``"ok"``, the CheckpointError class name, or ``"UNEXPECTED ..."``."""
    from h5ckpt import CheckpointError

    try:
        call()
    except CheckpointError as exc:
        return type(exc).__name__
    except BaseException as exc:
        return f"UNEXPECTED {type(exc).__name__}: {exc}"
    return "ok"


def fsize_main(directory: str) -> None:
    """A save past RLIMIT_FSIZE, then the limit lifted: print what happened."""
    import resource

    from h5ckpt import CheckpointManager

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG instead
    d = Path(directory)
    m = CheckpointManager(d, keep_last_n=None)
    for b in (1, 2):
        m.save_checkpoint(b, params_for(b, 1000), {"step": b}, 0.5, {"batch": b})
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    report: dict[str, Any] = {}
    for name, limit, params, state in (
        ("raw", 2**20, params_for(3), {"step": 3}),  # written by the Rust core
        ("compressed", 2**18, np.ones(10), compressible_state()),  # written by HDF5
        ("tiny", 600, np.ones(10), {"step": 3}),  # HDF5 fails on its metadata
    ):
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        report[name] = _outcome(lambda p=params, s=state: m.save_checkpoint(3, p, s, 0.5))
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        report[f"{name} temp files"] = temp_names(d)
        report[f"{name} names"] = checkpoint_names(d)
        latest = CheckpointManager(d).find_latest_checkpoint()
        report[f"{name} latest"] = latest.name if latest else None
        report[f"{name} earlier load"] = [
            CheckpointManager(d).load_checkpoint(d / n)["batch_idx"] for n in checkpoint_names(d)
        ]
    path = m.save_checkpoint(3, params_for(3), state_for(3), 0.5, {"batch": 3})
    report["after"] = CheckpointManager(d).load_checkpoint(path)["batch_idx"]
    print(json.dumps(report))


def perm_main(kind: str, directory: str) -> None:
    """Permission faults, seen by a process for which permissions are enforced."""
    from h5ckpt import CheckpointManager

    d = Path(directory)
    probe = d.parent / "probe"
    report: dict[str, Any] = {}
    try:
        probe.read_bytes()
        report["enforced"] = False
    except PermissionError:
        report["enforced"] = True
    m = CheckpointManager(d, keep_last_n=None)
    if kind == "readonly":
        report["save"] = _outcome(lambda: m.save_checkpoint(9, np.ones(3), {}, 0.0))
        report["cleanup"] = _outcome(m.cleanup_old_checkpoints)
    else:
        report["load unreadable"] = _outcome(lambda: m.load_checkpoint(d / kind))
        report["save"] = _outcome(lambda: m.save_checkpoint(9, np.ones(3), {}, 0.0))
        report["cleanup"] = _outcome(m.cleanup_old_checkpoints)
    report["validate"] = {n: m.validate_checkpoint(d / n) for n in checkpoint_names(d)}
    report["listed"] = {i.path.name: i.status for i in m.list_checkpoints(verify=True)}
    latest = m.find_latest_checkpoint()
    report["latest"] = latest.name if latest else None
    data = m.load_latest()
    report["load_latest"] = data["batch_idx"] if data else None
    report["temp files"] = temp_names(d)
    print(json.dumps(report))


# -------------------------------------------------------------------------- main


if __name__ == "__main__":
    role, *rest = sys.argv[1:]
    if role == "writer":
        writer_main(*rest)
    elif role == "mutate":
        mutate_main(*rest)
    elif role == "race":
        race_main(*rest)
    elif role == "replace":
        replace_main(*rest)
    elif role == "load":
        load_main(*rest)
    elif role == "fsize":
        fsize_main(*rest)
    elif role == "perm":
        perm_main(*rest)
    else:
        raise SystemExit(f"unknown role {role!r}")
