"""Closed-form ridge alignment from one model's space into the best one's. Pure numpy, no Ray."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Alignment:
    """``y = x @ W + b``: W is (d_k, d*), b is (d*,)."""

    W: np.ndarray
    b: np.ndarray

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Map rows of ``x`` (n, d_k) into the target space (n, d*), as float32."""
        return (np.asarray(x, dtype=np.float64) @ self.W + self.b).astype(np.float32)


def fit_alignment(x: np.ndarray, y: np.ndarray, ridge: float = 1e-3) -> Alignment:
    """Ridge least squares with an unpenalised bias, T = argmin ||x W + b - y||^2 + lam ||W||^2.

    ``ridge`` is relative: lam = ridge * mean squared norm of the centred rows of x, so it is unit-free.
    Uses the primal or dual normal equations, whichever system is smaller, so tiny shared subsets
    (fewer rows than dims) stay well posed.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"fit_alignment needs (n, d_k) and (n, d*) with equal n, got {x.shape} and {y.shape}")
    if x.shape[0] < 2:
        raise ValueError("fit_alignment needs at least 2 shared rows")
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    lam = ridge * float((xc**2).sum()) / x.shape[0]
    n, d = xc.shape
    if d <= n:
        W = np.linalg.lstsq(xc.T @ xc + lam * np.eye(d), xc.T @ yc, rcond=None)[0]
    else:
        W = xc.T @ np.linalg.lstsq(xc @ xc.T + lam * np.eye(n), yc, rcond=None)[0]
    return Alignment(W=W, b=my - mx @ W)


def r2_score(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Coefficient of determination over all output dims (1 - SS_res / SS_tot)."""
    y_true = np.asarray(y_true, dtype=np.float64)
    ss_res = float(((y_true - y_pred) ** 2).sum())
    ss_tot = float(((y_true - y_true.mean(0)) ** 2).sum())
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")


def heldout_mask(n: int, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the held-out rows of S (at least 1 row and leaving at least 2 to fit, when possible)."""
    m = int(round(n * fraction))
    m = min(max(m, 1 if fraction > 0 else 0), max(n - 2, 0))
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).permutation(n)[:m]] = True
    return mask


RIDGE_GRID = tuple(float(r) for r in np.logspace(-6, 2, 17))  # relative ridges tried by leave-one-out


def loo_mse(x: np.ndarray, y: np.ndarray, ridges=RIDGE_GRID) -> np.ndarray:
    """Leave-one-out mean squared error of :func:`fit_alignment` for each relative ridge, in closed form.

    The fit is penalised least squares in ``[1, x]`` with the bias unpenalised, so its hat matrix is
    ``H = 11'/n + K (K + lam I)^-1`` with ``K = xc xc'`` (centred rows), and the prediction for row i from
    a fit without row i misses by ``r_i / (1 - H_ii)`` (r = the in-sample residual): one eigendecomposition
    of the n x n K serves every ridge, so this costs less than a single primal fit when n < d.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = x.shape[0]
    if n < 3:
        raise ValueError("leave-one-out needs at least 3 shared rows")
    xc, yc = x - x.mean(0), y - y.mean(0)
    s, u = np.linalg.eigh(xc @ xc.T)
    s = np.clip(s, 0.0, None)
    uy = u.T @ yc
    scale = float(s.sum()) / n  # the mean squared norm of the centred rows, as in fit_alignment
    out = []
    for r in ridges:
        shrink = s / (s + r * scale) if r > 0 else (s > 1e-12 * max(s.max(), 1e-300)).astype(float)
        resid = yc - u @ (shrink[:, None] * uy)
        h = 1.0 / n + (u**2) @ shrink
        out.append(float(((resid / np.maximum(1.0 - h, 1e-12)[:, None]) ** 2).sum(1).mean()))
    return np.array(out)


def select_ridge(x: np.ndarray, y: np.ndarray, ridges=RIDGE_GRID) -> float:
    """The relative ridge with the lowest leave-one-out error (the larger one on ties: the smoother map)."""
    err = loo_mse(x, y, ridges)
    best = float(err.min())
    return max(r for r, e in zip(ridges, err) if e <= best * (1 + 1e-9))


def fit_with_stats(x: np.ndarray, y: np.ndarray, ridge: float, heldout: float, seed: int, select: str = "fixed"):
    """Fit on all of S; report R^2 on S and held-out R^2 from a fit that did not see the held-out rows.

    ``select="loo"`` picks the ridge by leave-one-out on the rows each fit sees (for the held-out figure, on
    the fit rows only, so the held-out rows never inform the choice). Returns ``(T, r2, r2_held, ridge)``.
    """
    def choose(a, b):
        return select_ridge(a, b) if select == "loo" and len(a) >= 3 else ridge

    lam = choose(x, y)
    t = fit_alignment(x, y, lam)
    r2 = r2_score(y, t.apply(x))
    mask = heldout_mask(len(x), heldout, seed)
    r2_held = None
    if mask.any():
        t_fit = fit_alignment(x[~mask], y[~mask], choose(x[~mask], y[~mask]))
        r2_held = r2_score(y[mask], t_fit.apply(x[mask]))
    return t, r2, r2_held, lam


def loo_r2(x: np.ndarray, y: np.ndarray, ridges=RIDGE_GRID) -> float:
    """Leave-one-out R^2 of predicting ``y`` from ``x`` with the best ridge of the grid (1 - min LOO MSE over
    the mean squared norm of the centred rows of y): how much of y a linear map from x explains on rows it
    was not fitted on."""
    y = np.asarray(y, dtype=np.float64)
    tot = float(((y - y.mean(0)) ** 2).sum(1).mean())
    return 1.0 - float(loo_mse(x, y, ridges).min()) / tot if tot > 0 else float("nan")


def coverage(mats: dict[str, np.ndarray]) -> dict[str, float]:
    """Per participant, the mean leave-one-out R^2 with which its embeddings of S linearly predict every other
    participant's (higher is better): the space that holds what the others know. A second criterion for the
    best model next to uniformity (``score.method: coverage``). Needs at least 2 participants and 3 rows."""
    names = list(mats)
    if len(names) < 2:
        return {n: float("nan") for n in names}
    return {k: float(np.mean([loo_r2(mats[k], mats[j]) for j in names if j != k])) for k in names}
