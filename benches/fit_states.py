"""The states of a streaming least-squares fit, for the small-state benchmark.

Plain numpy, no h5ckpt: the real predecessor's interpreter imports this too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def fit_state(batch: int) -> tuple[np.ndarray, dict[str, Any], float, dict[str, Any]]:
    rng = np.random.default_rng(batch)
    j = rng.standard_normal((64, 7))
    params = rng.standard_normal(7)
    optimizer_state = {
        "jtj": j.T @ j,
        "jtr": j.T @ rng.standard_normal(64),
        "n_points": 64 * (batch + 1),
        "step": batch,
        "lm_lambda": 1e-3 * (1 + batch % 5),
        "history": rng.standard_normal(256),
    }
    metadata = {"run": "xpcs-fit", "q_bins": 7, "batch_size": 4096, "started": 1.7e9}
    return params, optimizer_state, float(np.abs(params).sum()), metadata


def wide_state(batch: int) -> tuple[np.ndarray, dict[str, Any], float, dict[str, Any]]:
    params, optimizer_state, loss, metadata = fit_state(batch)
    rng = np.random.default_rng(1000 + batch)
    optimizer_state["per_bin"] = {
        f"q{i:02d}": {"chi2": float(rng.random()), "n": i, "contrast": rng.random(3)}
        for i in range(30)
    }
    metadata["labels"] = [f"bin-{i}" for i in range(8)]
    return params, optimizer_state, loss, metadata


STATES: dict[str, Callable[[int], tuple[np.ndarray, dict[str, Any], float, dict[str, Any]]]] = {
    "fit": fit_state,
    "wide": wide_state,
}


def count_leaves(value: Any) -> int:
    if isinstance(value, dict):
        return sum(count_leaves(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(count_leaves(v) for v in value)
    return 1
