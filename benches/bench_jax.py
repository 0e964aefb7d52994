"""A ``jax.Array`` saves as fast as the same numpy array.

    python benches/bench_jax.py                # 100 MB, 7 repeats
    python benches/bench_jax.py --mb 400 --repeats 5

The same random (incompressible) float32 data, once as a numpy array and once as a
CPU ``jax.Array``, side by side in one repeat loop (rotating order, ``os.sync()``
between timed operations, medians and ratios of medians):

* ``save, parameters``: ``save_checkpoint`` with the array as ``parameters``;
* ``save, optimizer_state``: the array as a leaf of an optax-like NamedTuple state;
* ``async call``: the time ``save_checkpoint_async`` blocks the caller (its
  snapshot: one copy of the array in both cases);
* ``load``: ``load_latest()`` of the numpy file, against ``load_latest(like=...)``
  of the jax one (the arrays made ``jax.Array`` again).

A second numpy array ("numpy again") is timed like the first: its ratio to the first
is what noise alone does to a ratio in that run.

A CPU ``jax.Array`` is saved through a read-only view of its buffer, so the saves
should take the same time; the goal is jax within 10 % of numpy (medians). The
minimums are printed too: on a shared machine they show what noise does to the
medians. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from h5ckpt import CheckpointManager


class AdamLike(NamedTuple):
    count: Any
    mu: Any


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100.0, help="array size in MB (1e6 bytes)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dir", help="where to write (default: a temp dir)")
    args = parser.parse_args()

    n = int(args.mb * 1e6) // 4
    host = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    device = jnp.asarray(host)
    device.block_until_ready()
    assert np.asarray(device).tobytes() == host.tobytes()
    # "numpy again": a second numpy copy timed like the first, the noise floor of a ratio.
    values = {"numpy": host, "numpy again": host.copy(), "jax": device}

    root = Path(args.dir or tempfile.mkdtemp(prefix="h5ckpt-bench-jax-"))
    samples: dict[tuple[str, str], list[float]] = defaultdict(list)
    managers = {
        (op, lib): CheckpointManager(root / f"{op}-{lib}", keep_last_n=2)
        for op in ("param", "state", "async")
        for lib in values
    }
    batch = 0

    def timed(key: tuple[str, str], fn: Any) -> Any:
        os.sync()
        t0 = time.perf_counter()
        out = fn()
        samples[key].append(time.perf_counter() - t0)
        return out

    try:
        for repeat in range(args.repeats):
            ops: list[tuple[str, str]] = [
                (op, lib) for op in ("param", "state", "async", "load") for lib in values
            ]
            shift = repeat % len(ops)
            for op, lib in ops[shift:] + ops[:shift]:
                batch += 1
                arr = values[lib]
                state = AdamLike(
                    count=jnp.int32(batch) if lib == "jax" else np.int32(batch), mu=arr
                )
                if op == "param":
                    m = managers[("param", lib)]
                    timed(
                        ("save, parameters", lib), partial(m.save_checkpoint, batch, arr, {}, 0.1)
                    )
                elif op == "state":
                    m = managers[("state", lib)]
                    save = partial(m.save_checkpoint, batch, np.zeros(1), state, 0.1)
                    timed(("save, optimizer_state", lib), save)
                elif op == "async":
                    m = managers[("async", lib)]
                    save = partial(m.save_checkpoint_async, batch, np.zeros(1), state, 0.1)
                    timed(("async call", lib), save)
                    m.wait_until_finished()
                else:
                    m = managers[("state", lib)]
                    if not m.list_checkpoints():
                        m.save_checkpoint(batch, np.zeros(1), state, 0.1)
                    like = {"optimizer_state": state} if lib == "jax" else None
                    out = timed(("load", lib), partial(m.load_latest, like=like))
                    mu = out["optimizer_state"].mu
                    assert type(mu) is type(arr)
                    assert np.asarray(mu).tobytes() == host.tobytes()
    finally:
        for m in managers.values():
            m.close()
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)

    print(
        f"{args.mb:g} MB float32 random, medians of {args.repeats} (jax {jax.__version__}, "
        f"{jax.devices()[0].platform}; load average {os.getloadavg()[0]:.2f})"
    )
    # Minimums too: on a shared machine they show what the medians' noise hides.
    print(
        f"{'operation':<22}{'numpy':>9}{'numpy again':>13}{'jax':>9}{'jax/numpy':>11}"
        f"{'again/numpy':>13}{'min jax/numpy':>15}"
    )
    for name in ("save, parameters", "save, optimizer_state", "async call", "load"):
        a, c, b = (samples[(name, lib)] for lib in ("numpy", "numpy again", "jax"))
        ma, mc, mb = (statistics.median(x) for x in (a, c, b))
        print(
            f"{name:<22}{ma * 1e3:>7.1f}ms{mc * 1e3:>11.1f}ms{mb * 1e3:>7.1f}ms"
            f"{mb / ma:>10.2f}x{mc / ma:>12.2f}x{min(b) / min(a):>14.2f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
