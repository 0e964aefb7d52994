"""One trial of "a rank is SIGKILLed mid-save" (run by tests/test_mpi_kill.py).

``python killjob.py DIR SEED``: every rank resumes from the newest complete step and
checks it (its content is a function of batch and rank, and it is not older than the
last save rank 0 saw committed), then saves batch after batch; with SEED >= 0 one
rank (chosen by SEED) SIGKILLs itself at a random moment, which ends the whole job.
With SEED < 0 the job only checks and exits 0.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
from pathlib import Path

import numpy as np
from mpi4py import MPI

from h5ckpt.mpi import Sharded, ShardedCheckpointManager

COMM = MPI.COMM_WORLD
RANK = COMM.Get_rank()
WORLD = COMM.Get_size()


def block(batch: int, rank: int) -> np.ndarray:
    return np.random.default_rng(batch * 1000 + rank).standard_normal(60_000 + 1000 * rank)


def main() -> int:
    d, seed = Path(sys.argv[1]), int(sys.argv[2])
    log = d / "committed.log"
    m = ShardedCheckpointManager(d, COMM, keep_last_n=2, timeout=20)
    state = m.load_latest()
    committed = [int(x) for x in log.read_text().split()] if log.exists() else []
    if state is None:
        assert not committed, f"nothing restored although {committed[-1]} was committed"
        batch = 0
    else:
        batch = state["batch_idx"]
        assert not committed or batch >= committed[-1], (batch, committed[-1])
        assert np.array_equal(state["parameters"], block(batch, RANK)), "parameters differ"
        assert state["optimizer_state"] == {"batch": batch, "rank": RANK, "shared": batch * 2}
    if RANK == 0:
        hidden = [n for n in os.listdir(d) if n.endswith(".staging")]
        assert not hidden, f"staging directories of dead jobs were not swept: {hidden}"
        print(f"resumed at {batch}", flush=True)
    if seed < 0:
        return 0
    rng = random.Random(seed)
    victim = rng.randrange(WORLD)
    delay = rng.uniform(0.0, 0.8)
    if victim == RANK:
        threading.Timer(delay, os.kill, (os.getpid(), signal.SIGKILL)).start()
    while True:
        batch += 1
        m.save_checkpoint(
            batch,
            Sharded(block(batch, RANK)),
            {"batch": batch, "rank": RANK, "shared": batch * 2},
            1.0 / batch,
        )
        if RANK == 0:
            with open(log, "a") as f:
                f.write(f"{batch}\n")
                f.flush()
                os.fsync(f.fileno())


if __name__ == "__main__":
    sys.exit(main())
