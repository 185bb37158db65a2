"""PHI-S (coopt_ray/phis.py) against known answers: every output dimension gets unit variance through one rotation
and one scale, for Hadamard widths and for any other width."""
from __future__ import annotations

import numpy as np
import pytest

from coopt_ray.phis import equalising_rotation, hadamard, phi_s_transform
from coopt_ray.student import target_transform


def test_hadamard_is_sylvesters_and_orthogonal():
    h4 = hadamard(4) * 2
    assert h4.tolist() == [[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]
    h = hadamard(64)
    assert np.allclose(h @ h.T, np.eye(64)) and np.allclose(np.abs(h), 1 / 8)
    assert hadamard(48) is None and hadamard(0) is None


@pytest.mark.parametrize("d", [1, 2, 3, 5, 16, 48, 96])
def test_equalising_rotation_puts_the_mean_eigenvalue_on_every_diagonal_entry(d):
    lam = np.random.default_rng(d).gamma(0.5, 2.0, size=d) * np.geomspace(1, 1e-3, d)  # steep, as embeddings are
    r = equalising_rotation(lam)
    assert np.allclose(r @ r.T, np.eye(d), atol=1e-10)
    assert np.allclose(np.diag(r @ np.diag(lam) @ r.T), lam.mean(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("d", [8, 12])
def test_phi_s_gives_unit_variance_per_dimension_with_one_isotropic_scale(d):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(d, d)) * np.geomspace(10, 0.1, d)  # a planted, very anisotropic covariance
    y = rng.normal(size=(4000, d)) @ a + 3.0
    mean, p = target_transform(y, phi_s=True)
    z = (y - mean) @ p
    assert np.allclose(z.mean(0), 0, atol=1e-4)
    assert np.allclose(z.var(0, ddof=1), 1.0, rtol=1e-4)  # each dimension: unit variance
    s = np.linalg.svd(p, compute_uv=False)
    assert np.allclose(s, s[0], rtol=1e-5)  # a rotation times one scale: angles between targets are kept
    cos = lambda u, v: (u @ v) / np.linalg.norm(u) / np.linalg.norm(v)  # noqa: E731
    assert cos(z[0], z[1]) == pytest.approx(cos(y[0] - mean, y[1] - mean), abs=1e-5)
    # control: per-dimension standardisation also gives unit variances but changes the angles
    m2, p2 = target_transform(y)
    z2 = (y - m2) @ p2
    assert abs(cos(z2[0], z2[1]) - cos(y[0] - mean, y[1] - mean)) > 1e-3


def test_phi_s_of_isotropic_targets_is_a_pure_rotation_and_whiten_excludes_it():
    mean, p = phi_s_transform(np.zeros(4), 4.0 * np.eye(4))
    assert np.allclose(p @ p.T, np.eye(4) / 4.0, atol=1e-6)  # already balanced: only the scale 1/2 is applied
    with pytest.raises(ValueError, match="choose one"):
        target_transform(np.random.default_rng(0).normal(size=(10, 3)), whiten=True, phi_s=True)
