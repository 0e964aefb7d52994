"""SIGKILL at random moments: the last committed checkpoint (or the one in flight, if
it got committed) is always found and loads, every file under a checkpoint name is
intact, and the dead writers' temp files are gone once a new manager opens the
directory. ``benches/soak.py`` runs the same trials 500 times."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import faultkit
from h5ckpt import CheckpointManager

TRIALS = 30


def test_random_kills_lose_nothing_committed(tmp_path: Path):
    directory = tmp_path / "ckpt"
    directory.mkdir()
    # Each trial resumes where the last one ended and checks, after the kill: the
    # latest checkpoint is the last committed save or the one in flight, it loads
    # with exactly the saved content, every checkpoint file validates, and no temp
    # file survives the next manager's start.
    stats = faultkit.kill_trials(directory, TRIALS, seed=20240605)
    assert stats["trials"] == TRIALS
    assert stats["killed_mid_save"] > 0  # the writer saves all the time
    assert stats["saves_committed"] > 0


def test_writer_killed_while_its_temp_file_exists(tmp_path: Path):
    """Killed with a temp file on disk: the temp file is never listed or loaded, the
    previous checkpoint is the latest, and a new manager removes the temp file."""
    directory = tmp_path / "ckpt"
    m = CheckpointManager(directory)
    m.save_checkpoint(0, faultkit.params_for(0), faultkit.state_for(0), 1.0, {"batch": 0})
    log = tmp_path / "log"
    for _ in range(5):
        child = faultkit.spawn_child("writer", str(directory), str(log), "1")
        try:
            while not faultkit.temp_names(directory) and child.poll() is None:
                time.sleep(0.0005)
        finally:
            child.send_signal(signal.SIGKILL)
            child.communicate()
        left = faultkit.temp_names(directory)
        if left:
            break
    assert left, "the writer never left a temp file in 5 tries"
    assert all(os.stat(directory / n).st_mode & 0o777 == 0o600 for n in left)
    # Listing and finding ignore the temp file (the lister does not sweep).
    listed = [i.path.name for i in m.list_checkpoints(verify=True)]
    assert all(faultkit.CKPT_RE.match(n) for n in listed)
    latest = m.find_latest_checkpoint()
    assert latest is not None
    faultkit.check_content(m.load_checkpoint(latest))
    CheckpointManager(directory)  # a new manager sweeps dead writers' temp files
    assert faultkit.temp_names(directory) == []
    assert m.validate_checkpoint(latest)
