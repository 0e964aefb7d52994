"""The main job across ranks: the streaming fit of :mod:`h5ckpt.demo`, split over an
MPI job, SIGKILLed part-way and resumed with the same and with one rank fewer.

Every rank owns a slice of every batch's delay times (its part of the data); the
ranks add their normal equations in rank order, so every rank takes the same step.
Parameters and the scalar state are replicated (stored once); the normal matrix is
saved ``Sharded`` by q-bin, each rank writing its block. Run it as
``mpiexec -n 4 python -m h5ckpt demo --mpi``.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..demo import FitConfig, _batch_data, _model, _taus, _true_parameters, initial_state
from .layout import list_steps
from .manager import ShardedCheckpointManager
from .values import Sharded, split_ranges

__all__ = ["main", "run_fit"]

PREFIX = "xpcs_fit"
_LAUNCHER_VARS = ("PMI_", "PMIX_", "HYDRA_", "MPIR_", "MPI_LOCALNRANKS", "MPI_LOCALRANKID")


def _combine(comm: Any, parts: np.ndarray) -> np.ndarray:
    """The sum of every rank's ``parts``, added in rank order (the same on every rank)."""
    gathered = np.empty((comm.Get_size(), parts.size))
    comm.Allgather(np.ascontiguousarray(parts), gathered)
    total = gathered[0].copy()
    for row in gathered[1:]:
        total += row
    return total


def run_fit(
    cfg: FitConfig, comm: Any, manager: ShardedCheckpointManager | None, resume: dict | None
) -> tuple[np.ndarray, int]:
    """Run (or resume) the fit on every rank of ``comm``; the final parameters."""
    world, rank = comm.Get_size(), comm.Get_rank()
    truth, tau = _true_parameters(cfg), _taus(cfg)
    lo, hi = split_ranges(cfg.n_tau, world)[rank]
    q_lo, q_hi = split_ranges(cfg.n_q, world)[rank]
    if resume is None:
        params, state = initial_state(cfg)
        start = 0
    else:
        params, state = resume["parameters"], dict(resume["optimizer_state"])
        # Each rank got its block of the normal matrix back: put the whole one together.
        state["normal_matrix"] = np.concatenate(comm.allgather(state["normal_matrix"]))
        start = resume["batch_idx"] + 1
    n = cfg.n_q * 9
    for batch in range(start, cfg.n_batches):
        data = _batch_data(cfg, batch, truth, tau)[:, lo:hi]
        g2, jac = _model(params, tau[lo:hi])
        resid = data - g2
        local = np.concatenate(
            [
                np.einsum("qti,qtj->qij", jac, jac).ravel(),
                np.einsum("qti,qt->qi", jac, resid).ravel(),
                [float(np.sum(resid**2))],
            ]
        )
        total = _combine(comm, local)
        jtj = total[:n].reshape(cfg.n_q, 3, 3)
        jtr = total[n:-1].reshape(cfg.n_q, 3)
        state["normal_matrix"] = state["forgetting"] * state["normal_matrix"] + jtj
        damped = state["normal_matrix"] + state["damping"] * np.eye(3)[None]
        params = params + np.linalg.solve(damped, jtr[..., None])[..., 0]
        loss = float(total[-1] / (cfg.n_q * cfg.n_tau))
        state["losses"].append(loss)
        state["steps"] += 1
        if manager is not None and manager.should_save(batch):
            saved = dict(state, normal_matrix=Sharded(state["normal_matrix"][q_lo:q_hi]))
            manager.save_checkpoint(
                batch, params, saved, loss, metadata={"model": "g2 = b + c exp(-2 r t)"}
            )
        if cfg.batch_delay:
            time.sleep(cfg.batch_delay)
    return params, start


def _worker(directory: Path, cfg: FitConfig, pids: Path) -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    (pids / f"rank_{comm.Get_rank()}.pid").write_text(str(os.getpid()))
    manager = ShardedCheckpointManager(
        directory, comm, cfg.checkpoint_frequency, cfg.keep_last_n, prefix=PREFIX
    )
    resume = manager.load_latest()
    params, start = run_fit(cfg, comm, manager, resume)
    if comm.Get_rank() == 0:
        tmp = directory.parent / f".{directory.name}.final.npy"
        np.save(tmp, params)
        os.replace(tmp, directory.parent / f"{directory.name}.final.npy")
        print(f"  resumed at batch {start} on {comm.Get_size()} ranks", flush=True)


def _child(
    n: int, directory: Path, cfg: FitConfig, pids: Path, quiet: bool = False
) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_VARS)}
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        mpiexec = Path(shutil.which("mpiexec") or "mpiexec")
    pids.mkdir(parents=True, exist_ok=True)
    for old in pids.glob("*.pid"):
        old.unlink()
    cmd = [str(mpiexec), "-n", str(n), sys.executable, "-m", "h5ckpt.mpi.demo", "--worker"]
    cmd += [str(directory), "--pids", str(pids), "--batches", str(cfg.n_batches)]
    cmd += ["--n-q", str(cfg.n_q), "--batch-delay", str(cfg.batch_delay)]
    # The killed job's launcher reports the kill at length: its output is not shown.
    out = subprocess.DEVNULL if quiet else None
    return subprocess.Popen(cmd, env=env, stdout=out, stderr=out)


def _kill_one_rank(n: int, directory: Path, cfg: FitConfig, pids: Path, kill_after: int) -> str:
    child = _child(n, directory, cfg, pids, quiet=True)
    wanted = kill_after * cfg.checkpoint_frequency - cfg.checkpoint_frequency
    deadline = time.monotonic() + 300
    victim = random.randrange(n)
    try:
        while time.monotonic() < deadline and child.poll() is None:
            steps = list_steps(directory, PREFIX)
            if steps and steps[-1][0] >= wanted and len(list(pids.glob("*.pid"))) == n:
                time.sleep(random.uniform(0, 4 * max(cfg.batch_delay, 0.005)))
                os.kill(int((pids / f"rank_{victim}.pid").read_text()), signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        if child.poll() is None and time.monotonic() >= deadline:
            child.kill()
        child.wait()
    return f"rank {victim} of {n} SIGKILLed; the job ended with exit code {child.returncode}"


def _wait_politely(comm: Any) -> None:
    """A barrier that sleeps instead of spinning while rank 0 runs the child jobs."""
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(0.02)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="h5ckpt demo --mpi", description=__doc__.splitlines()[0])
    parser.add_argument("directory", nargs="?", help="checkpoint directory (default: a temp dir)")
    parser.add_argument("--batches", type=int, default=FitConfig.n_batches)
    parser.add_argument("--n-q", type=int, default=1024)
    parser.add_argument("--batch-delay", type=float, default=0.01)
    parser.add_argument("--kill-after", type=int, default=4, help="saves before the kill")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pids", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cfg = FitConfig(n_batches=args.batches, n_q=args.n_q, batch_delay=args.batch_delay)
    if args.worker:
        _worker(Path(args.directory), cfg, Path(args.pids))
        return 0
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    world, rank = comm.Get_size(), comm.Get_rank()
    if world < 2:
        print("run it on several ranks: mpiexec -n 4 python -m h5ckpt demo --mpi")
        return 2
    scratch = tempfile.mkdtemp(prefix="h5ckpt-mpi-demo-") if rank == 0 else None
    root = Path(comm.bcast(args.directory or scratch))
    try:
        return _demo(comm, root, cfg, args.kill_after)
    finally:
        if rank == 0 and scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _demo(comm: Any, root: Path, cfg: FitConfig, kill_after: int) -> int:
    world, rank = comm.Get_size(), comm.Get_rank()
    reference_dir, killed_dir = root / "uninterrupted", root / "killed-and-resumed"
    fewer_dir = root / f"resumed-on-{world - 1}"
    if rank == 0:
        for d in (reference_dir, killed_dir, fewer_dir):
            shutil.rmtree(d, ignore_errors=True)
        reference_dir.mkdir(parents=True)
        print(
            f"h5ckpt demo --mpi: XPCS g2 fit on {world} ranks, {cfg.n_q} q-bins, "
            f"{cfg.n_batches} batches, each rank holding 1/{world} of every batch's data; "
            f"a sharded checkpoint every {cfg.checkpoint_frequency} batches",
            flush=True,
        )
    comm.Barrier()
    t0 = time.perf_counter()
    manager = ShardedCheckpointManager(
        reference_dir, comm, cfg.checkpoint_frequency, cfg.keep_last_n, prefix=PREFIX
    )
    reference, _ = run_fit(cfg, comm, manager, None)
    if rank != 0:
        _wait_politely(comm)
        return comm.bcast(None)
    print(f"uninterrupted run on {world} ranks: {time.perf_counter() - t0:.2f}s", flush=True)
    pids = root / "pids"
    print(_kill_one_rank(world, killed_dir, cfg, pids, kill_after), flush=True)
    for _, step in list_steps(killed_dir, PREFIX):
        from .manifest import step_info

        info = step_info(step, None, True)
        print(f"  {step.name}: {info.status}" + (f" ({info.error})" if info.error else ""))
    hidden = [p.name for p in killed_dir.iterdir() if p.name.startswith(f".{PREFIX}")]
    if hidden:
        print(f"  left by the dead job (swept on resume): {', '.join(sorted(hidden))}")
    shutil.copytree(killed_dir, fewer_dir, symlinks=True)
    ok = True
    for n, d in ((world, killed_dir), (world - 1, fewer_dir)):
        print(f"resuming {d.name} with {n} ranks:", flush=True)
        child = _child(n, d, cfg, pids)
        if child.wait() != 0:
            print(f"  the resumed job failed (exit code {child.returncode})")
            ok = False
    if ok:
        same = np.load(root / f"{killed_dir.name}.final.npy")
        fewer = np.load(root / f"{fewer_dir.name}.final.npy")
        exact = np.array_equal(same, reference)
        rel = float(np.max(np.abs(fewer - reference) / np.abs(reference)))
        close = rel < 1e-9
        np.set_printoptions(precision=6, suppress=True)
        print(f"final parameters, q-bin 0 (baseline, contrast, rate): {same[0]}")
        print(f"resumed on {world} ranks == uninterrupted, bit for bit: {'yes' if exact else 'NO'}")
        print(
            f"resumed on {world - 1} ranks: largest relative difference {rel:.2e} "
            f"(floating-point summation order): {'yes' if close else 'NO'}"
        )
        ok = exact and close
    _wait_politely(comm)
    return comm.bcast(0 if ok else 1)


if __name__ == "__main__":
    raise SystemExit(main())
