"""The main job: a streaming least-squares fit that is killed and resumes exactly.

The model is the intensity autocorrelation of an XPCS experiment,
``g2(t) = baseline + contrast * exp(-2 * rate * t)``, fitted independently in many
q-bins. Each batch brings new noisy measurements (generated from the batch index, so
any run sees the same data) and one damped Gauss-Newton step with a forgetting
normal matrix. The whole optimizer state is checkpointed, so a run that is killed
and resumed ends with bit-for-bit the parameters of a run that never stopped.

With ``--jax`` (jax installed) the update runs as one jitted JAX function in float64:
parameters and state are ``jax.Array`` leaves of a NamedTuple, saved natively and
loaded back with ``like=`` templates. Without it, numpy does the same in place.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from . import _native
from .manager import CheckpointManager

__all__ = ["FitConfig", "main", "run_fit"]

PREFIX = "xpcs_fit"


@dataclass(frozen=True)
class FitConfig:
    """Size and schedule of the demo fit."""

    n_batches: int = 120
    n_q: int = 4096
    n_tau: int = 64
    checkpoint_frequency: int = 10
    keep_last_n: int = 3
    seed: int = 2026
    batch_delay: float = 0.0
    use_jax: bool = False


@dataclass
class FitRun:
    """What one (possibly resumed) run did."""

    parameters: np.ndarray
    start_batch: int
    end_batch: int
    checkpoints: list[Path] = field(default_factory=list)
    save_seconds: float = 0.0


def _true_parameters(cfg: FitConfig) -> np.ndarray:
    rng = np.random.default_rng(cfg.seed)
    baseline = 1.0 + 0.01 * rng.standard_normal(cfg.n_q)
    contrast = rng.uniform(0.1, 0.4, cfg.n_q)
    rate = np.geomspace(0.5, 50.0, cfg.n_q)
    return np.stack([baseline, contrast, rate], axis=1)


def _taus(cfg: FitConfig) -> np.ndarray:
    return np.geomspace(1e-3, 1.0, cfg.n_tau)


def _model(params: Any, tau: Any, xp: Any = np) -> tuple[Any, Any]:
    """g2 for every q-bin and its Jacobian with respect to (baseline, contrast, rate);
    ``xp`` is numpy or jax.numpy."""
    baseline, contrast, rate = params[:, 0:1], params[:, 1:2], params[:, 2:3]
    decay = xp.exp(-2.0 * rate * tau[None, :])
    g2 = baseline + contrast * decay
    jac = xp.stack(
        [xp.ones_like(decay), decay, -2.0 * contrast * tau[None, :] * decay], axis=2
    )  # (n_q, n_tau, 3)
    return g2, jac


def _batch_data(cfg: FitConfig, batch: int, truth: np.ndarray, tau: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng([cfg.seed, batch])
    g2, _ = _model(truth, tau)
    return g2 + 0.01 * rng.standard_normal(g2.shape)


def initial_state(cfg: FitConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """Starting parameters and optimizer state of a fresh fit."""
    params = np.tile(np.array([1.0, 0.2, 5.0]), (cfg.n_q, 1))
    state = {
        "normal_matrix": np.zeros((cfg.n_q, 3, 3)),
        "forgetting": 0.9,
        "damping": 1e-3,
        "losses": [],
        "steps": 0,
    }
    return params, state


FORGETTING = 0.9
DAMPING = 1e-3


class JaxFitState(NamedTuple):
    """The optimizer state of the JAX fit: fixed shapes, so a fresh one is the
    template its checkpoints load into."""

    normal_matrix: Any  # (n_q, 3, 3)
    losses: Any  # (n_batches,): the mean squared residual of each batch done, NaN after
    steps: Any  # int64 scalar


def _jax() -> Any:
    import jax

    # The fit is float64, as the numpy one.
    jax.config.update("jax_enable_x64", True)
    return jax


def jax_initial_state(cfg: FitConfig) -> tuple[Any, JaxFitState]:
    """Starting parameters and state of the JAX fit (also the ``like=`` templates)."""
    jnp = _jax().numpy
    params, _ = initial_state(cfg)
    state = JaxFitState(
        normal_matrix=jnp.zeros((cfg.n_q, 3, 3)),
        losses=jnp.full(cfg.n_batches, jnp.nan),
        steps=jnp.zeros((), jnp.int64),
    )
    return jnp.asarray(params), state


def jax_templates(cfg: FitConfig) -> dict[str, Any]:
    """What a checkpoint of the JAX fit loads into (``load_latest(like=...)``)."""
    params, state = jax_initial_state(cfg)
    return {"parameters": params, "optimizer_state": state}


def _jax_step() -> Any:
    jax = _jax()
    jnp = jax.numpy

    def step(params: Any, state: JaxFitState, data: Any, tau: Any, batch: Any) -> Any:
        g2, jac = _model(params, tau, jnp)
        resid = data - g2
        jtj = jnp.einsum("qti,qtj->qij", jac, jac)
        jtr = jnp.einsum("qti,qt->qi", jac, resid)
        normal = FORGETTING * state.normal_matrix + jtj
        damped = normal + DAMPING * jnp.eye(3)[None]
        params = params + jnp.linalg.solve(damped, jtr[..., None])[..., 0]
        loss = jnp.mean(resid**2)
        return params, JaxFitState(normal, state.losses.at[batch].set(loss), state.steps + 1), loss

    return jax.jit(step)


def run_fit(
    cfg: FitConfig, manager: CheckpointManager | None, resume: dict[str, Any] | None = None
) -> FitRun:
    """Run the fit from scratch or from a loaded checkpoint, saving as it goes."""
    if cfg.use_jax:
        return _run_jax_fit(cfg, manager, resume)
    truth, tau = _true_parameters(cfg), _taus(cfg)
    if resume is None:
        params, state = initial_state(cfg)
        start = 0
    else:
        params, state = resume["parameters"], resume["optimizer_state"]
        start = resume["batch_idx"] + 1
    run = FitRun(parameters=params, start_batch=start, end_batch=cfg.n_batches)
    for batch in range(start, cfg.n_batches):
        data = _batch_data(cfg, batch, truth, tau)
        g2, jac = _model(params, tau)
        resid = data - g2
        jtj = np.einsum("qti,qtj->qij", jac, jac)
        jtr = np.einsum("qti,qt->qi", jac, resid)
        state["normal_matrix"] = state["forgetting"] * state["normal_matrix"] + jtj
        damped = state["normal_matrix"] + state["damping"] * np.eye(3)[None]
        params = params + np.linalg.solve(damped, jtr[..., None])[..., 0]
        loss = float(np.mean(resid**2))
        state["losses"].append(loss)
        state["steps"] += 1
        _end_batch(cfg, manager, run, batch, params, state, loss)
    run.parameters = params
    return run


def _end_batch(
    cfg: FitConfig,
    manager: CheckpointManager | None,
    run: FitRun,
    batch: int,
    params: Any,
    state: Any,
    loss: float,
    **metadata: str,
) -> None:
    """Save the batch's state when it is due, timing the save; then the batch delay."""
    if manager is not None and manager.should_save(batch):
        t0 = time.perf_counter()
        path = manager.save_checkpoint(
            batch,
            params,
            state,
            loss,
            metadata={"model": "g2 = b + c exp(-2 r t)", "n_q": cfg.n_q, **metadata},
        )
        run.save_seconds += time.perf_counter() - t0
        run.checkpoints.append(path)
    if cfg.batch_delay:
        time.sleep(cfg.batch_delay)


def _run_jax_fit(
    cfg: FitConfig, manager: CheckpointManager | None, resume: dict[str, Any] | None
) -> FitRun:
    """The same fit with the update as one jitted JAX function; ``resume`` loaded with
    ``like=jax_templates(cfg)``."""
    jnp = _jax().numpy
    truth, tau_np = _true_parameters(cfg), _taus(cfg)
    tau = jnp.asarray(tau_np)
    if resume is None:
        params, state = jax_initial_state(cfg)
        start = 0
    else:
        params, state = resume["parameters"], resume["optimizer_state"]
        start = resume["batch_idx"] + 1
    step = _jax_step()
    run = FitRun(parameters=np.asarray(params), start_batch=start, end_batch=cfg.n_batches)
    for batch in range(start, cfg.n_batches):
        data = jnp.asarray(_batch_data(cfg, batch, truth, tau_np))
        params, state, loss = step(params, state, data, tau, batch)
        _end_batch(cfg, manager, run, batch, params, state, float(loss), backend="jax")
    run.parameters = np.asarray(params)
    return run


def _like(cfg: FitConfig) -> dict[str, Any] | None:
    return jax_templates(cfg) if cfg.use_jax else None


def _worker(directory: Path, cfg: FitConfig) -> None:
    manager = CheckpointManager(directory, cfg.checkpoint_frequency, cfg.keep_last_n, prefix=PREFIX)
    run_fit(cfg, manager, manager.load_latest(like=_like(cfg)))


def _batches(directory: Path) -> dict[Path, int]:
    """The demo's checkpoint files in ``directory`` and their batch indices."""
    found = {}
    for path in directory.glob(f"{PREFIX}_batch_*.h5"):
        batch = _native.checkpoint_batch(path.name, PREFIX)
        if batch is not None:
            found[path] = batch
    return found


def _spawn_and_kill(directory: Path, cfg: FitConfig, kill_after: int) -> tuple[int, float]:
    """Run the fit in a child process and SIGKILL it once ``kill_after`` saves exist."""
    cmd = [
        sys.executable,
        "-m",
        "h5ckpt.demo",
        "--worker",
        str(directory),
        "--batches",
        str(cfg.n_batches),
        "--n-q",
        str(cfg.n_q),
        "--batch-delay",
        str(cfg.batch_delay),
        *(["--jax"] if cfg.use_jax else []),
    ]
    child = subprocess.Popen(cmd)
    deadline = time.monotonic() + 300
    wanted = kill_after * cfg.checkpoint_frequency
    try:
        while time.monotonic() < deadline and child.poll() is None:
            newest = max(_batches(directory).values(), default=-1)
            if newest >= wanted - cfg.checkpoint_frequency:
                # Land the kill at a random point within the next few batches.
                time.sleep(np.random.default_rng().uniform(0, 4 * max(cfg.batch_delay, 0.005)))
                break
            time.sleep(0.002)
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
        code = child.wait()
    return code, time.monotonic()


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else list(argv)
    if "--mpi" in args_in:  # the same fit split across the ranks of an MPI job
        from .mpi.demo import main as mpi_main

        return mpi_main([a for a in args_in if a != "--mpi"])
    parser = argparse.ArgumentParser(prog="h5ckpt demo", description=__doc__.splitlines()[0])
    parser.add_argument("directory", nargs="?", help="checkpoint directory (default: a temp dir)")
    parser.add_argument("--batches", type=int, default=FitConfig.n_batches)
    parser.add_argument("--n-q", type=int, default=FitConfig.n_q)
    parser.add_argument("--batch-delay", type=float, default=0.01)
    parser.add_argument("--kill-after", type=int, default=4, help="saves before the kill")
    parser.add_argument(
        "--jax", action="store_true", help="run the update with JAX (needs jax installed)"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.jax:
        try:
            _jax()
        except ImportError:
            parser.error("--jax needs jax: pip install 'h5ckpt[jax]'")
    cfg = FitConfig(
        n_batches=args.batches, n_q=args.n_q, batch_delay=args.batch_delay, use_jax=args.jax
    )
    if args.worker:
        _worker(Path(args.directory), cfg)
        return 0
    return _demo(args.directory, cfg, args.kill_after)


def _demo(directory: str | None, cfg: FitConfig, kill_after: int) -> int:
    with tempfile.TemporaryDirectory(prefix="h5ckpt-demo-") as scratch:
        root = Path(directory) if directory else Path(scratch)
        killed_dir = root / "killed-and-resumed"
        reference_dir = root / "uninterrupted"
        for d in (killed_dir, reference_dir):
            d.mkdir(parents=True, exist_ok=True)
            for old in _batches(d):
                old.unlink()
        state_mb = (cfg.n_q * 3 * 8 + cfg.n_q * 9 * 8) / 1e6
        print(
            f"h5ckpt demo: XPCS g2 fit, {cfg.n_q} q-bins, {cfg.n_batches} batches, "
            f"checkpoint every {cfg.checkpoint_frequency} (~{state_mb:.2f} MB of state)"
            + (", update step in JAX (jit, float64)" if cfg.use_jax else "")
        )

        t0 = time.perf_counter()
        reference = run_fit(
            cfg,
            CheckpointManager(
                reference_dir, cfg.checkpoint_frequency, cfg.keep_last_n, prefix=PREFIX
            ),
        )
        ref_seconds = time.perf_counter() - t0
        print(
            f"uninterrupted run: {cfg.n_batches} batches in {ref_seconds:.2f}s, "
            f"{len(reference.checkpoints)} checkpoints, {reference.save_seconds:.3f}s saving "
            f"({reference.save_seconds / max(1, len(reference.checkpoints)) * 1e3:.1f} ms each)"
        )

        code, _ = _spawn_and_kill(killed_dir, cfg, kill_after)
        survivors = sorted(p.name for p in _batches(killed_dir))
        leftovers = [p.name for p in killed_dir.iterdir() if p.name.endswith(".tmp")]
        how = "SIGKILL" if code == -signal.SIGKILL else f"exit code {code}"
        print(
            f"child process stopped by {how}; files left: {', '.join(survivors) or 'none'}"
            + (f"; temp files: {len(leftovers)}" if leftovers else "")
        )

        manager = CheckpointManager(
            killed_dir, cfg.checkpoint_frequency, cfg.keep_last_n, prefix=PREFIX
        )
        gone = [p for p in leftovers if (killed_dir / p).exists()]
        latest = manager.find_latest_checkpoint()
        resume = manager.load_checkpoint(latest, like=_like(cfg)) if latest is not None else None
        point = (
            "scratch"
            if latest is None or resume is None
            else f"{latest.name} (batch {resume['batch_idx']})"
        )
        print(
            f"resuming from {point}"
            + (
                f"; {len(leftovers) - len(gone)} dead writer temp file(s) removed"
                if leftovers
                else ""
            )
        )
        resumed = run_fit(cfg, manager, resume)
        print(
            f"resumed run: batches {resumed.start_batch}..{cfg.n_batches - 1}, "
            f"{len(resumed.checkpoints)} checkpoints, {resumed.save_seconds:.3f}s saving"
        )

        same = np.array_equal(resumed.parameters, reference.parameters)
        truth = _true_parameters(cfg)
        rel = np.abs(resumed.parameters - truth) / np.abs(truth)
        np.set_printoptions(precision=6, suppress=True)
        print(f"final parameters, q-bin 0 (baseline, contrast, rate): {resumed.parameters[0]}")
        print(f"final parameters, q-bin {cfg.n_q - 1}: {resumed.parameters[-1]}")
        print(
            "relative error vs the true parameters (baseline, contrast, rate): "
            f"median {np.median(rel, axis=0)}, 99th percentile {np.percentile(rel, 99, axis=0)}"
        )
        print("resumed fit == uninterrupted fit, bit for bit: " + ("yes" if same else "NO"))
        return 0 if same else 1


if __name__ == "__main__":  # the worker process of the demo
    os.environ.setdefault("PYTHONHASHSEED", "0")
    raise SystemExit(main())
