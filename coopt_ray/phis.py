"""PHI-S (arXiv 2410.01680): standardise a teacher's targets so that every dimension has the same variance, with
one scale for the whole space instead of one per dimension.

The targets' covariance ``U diag(λ) Uᵀ`` is rotated into its PCA basis, then by an orthogonal ``R`` whose
rotation spreads the variance evenly (``diag(R diag(λ) Rᵀ) = mean(λ)`` in every dimension), and divided by
``α = sqrt(mean(λ))``. The map ``z = (y - μ) U Rᵀ / α`` is a rotation and one isotropic scale, so it keeps every
angle and relative distance of the teacher's space (unlike per-dimension standardisation) while giving each
output dimension unit variance (unlike plain PCA whitening, it does not blow up the weak directions).

``R`` is the normalised Hadamard matrix when the width is a power of two (as in the paper); for any other width
it is built from Givens rotations, each of which sets one more diagonal entry to the mean exactly (the
constructive half of the Schur-Horn theorem), so the result is exact for every width. Pure numpy.
"""
from __future__ import annotations

import numpy as np


def hadamard(d: int) -> np.ndarray | None:
    """The normalised Sylvester Hadamard matrix of width ``d`` (orthogonal, every entry ±1/sqrt(d)), or None when
    ``d`` is not a power of two."""
    if d < 1 or d & (d - 1):
        return None
    h = np.ones((1, 1))
    while len(h) < d:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(d)


def equalising_rotation(eigvals: np.ndarray) -> np.ndarray:
    """An orthogonal ``R`` with ``diag(R diag(eigvals) Rᵀ)`` equal to ``mean(eigvals)`` in every entry."""
    lam = np.asarray(eigvals, dtype=np.float64)
    d = len(lam)
    h = hadamard(d)
    if h is not None:
        return h
    t = lam.mean()
    m, r = np.diag(lam), np.eye(d)
    todo = set(range(d))
    while len(todo) > 1:
        diag = np.diag(m)
        above = [i for i in todo if diag[i] > t]
        below = [j for j in todo if diag[j] < t]
        if not above or not below:
            break  # every remaining entry is already the mean (to rounding)
        i = max(above, key=lambda k: diag[k])
        j = min(below, key=lambda k: diag[k])
        # new m_ii = (m_ii + m_jj)/2 + (m_ii - m_jj)/2 cos 2θ + m_ij sin 2θ; solve for m_ii = t
        a, b, c = (m[i, i] - m[j, j]) / 2, m[i, j], t - (m[i, i] + m[j, j]) / 2
        rad = np.hypot(a, b)
        phi = np.arctan2(b, a) + np.arccos(np.clip(c / rad, -1.0, 1.0))
        cs, sn = np.cos(phi / 2), np.sin(phi / 2)
        g = np.eye(d)
        g[i, i], g[i, j], g[j, i], g[j, j] = cs, sn, -sn, cs
        m, r = g @ m @ g.T, g @ r
        todo.discard(i)
    return r


def phi_s_transform(mean: np.ndarray, cov: np.ndarray, eps: float = 1e-12) -> tuple[np.ndarray, np.ndarray]:
    """``(μ, P)`` with ``z = (y - μ) @ P``: PHI-S for targets of this mean and covariance (``P = U Rᵀ / α``)."""
    cov = np.asarray(cov, dtype=np.float64)
    vals, vecs = np.linalg.eigh((cov + cov.T) / 2)
    vals = np.maximum(vals, 0.0)
    alpha = np.sqrt(max(vals.mean(), eps))
    r = equalising_rotation(vals)
    return np.asarray(mean, dtype=np.float32), (vecs @ r.T / alpha).astype(np.float32)
