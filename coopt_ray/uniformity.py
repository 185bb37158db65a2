"""Uniformity value of a model on the shared subset (Wang & Isola). Pure numpy, no Ray."""
from __future__ import annotations

import numpy as np


def uniformity(features: np.ndarray, t: float = 2.0) -> float:
    """``log mean_{i<j} exp(-t * ||z_i - z_j||^2)`` with z the L2-normalised rows; lower is better.

    Collapsed features (all rows equal) give exactly 0; the value falls as features spread out.
    """
    z = np.asarray(features, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] < 2:
        raise ValueError(f"uniformity needs at least 2 feature rows, got shape {z.shape}")
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    sq = np.clip(2.0 - 2.0 * (z @ z.T), 0.0, 4.0)  # ||a-b||^2 for unit vectors
    iu = np.triu_indices(z.shape[0], k=1)
    x = -t * sq[iu]
    m = x.max()
    return float(m + np.log(np.mean(np.exp(x - m))))  # stable log-mean-exp


def best_participant(values: dict[str, float], higher_is_better: bool = False) -> str:
    """Name with the lowest value (uniformity; the highest with ``higher_is_better``, e.g. coverage); ties are
    broken by name order."""
    sign = -1.0 if higher_is_better else 1.0
    return min(sorted(values), key=lambda k: sign * values[k])
