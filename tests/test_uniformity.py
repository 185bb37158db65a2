import numpy as np
import pytest

from coopt_ray.uniformity import best_participant, uniformity


def test_collapsed_features_give_zero():
    z = np.tile(np.array([[0.3, -1.2, 2.0]]), (40, 1))
    assert uniformity(z) == pytest.approx(0.0, abs=1e-12)


def test_scale_invariant_and_known_value():
    # two opposite unit vectors: ||z_i - z_j||^2 = 4 -> V = -2 * 4 = -8
    assert uniformity(np.array([[1.0, 0.0], [-3.0, 0.0]])) == pytest.approx(-8.0)


def test_orthonormal_basis_is_exactly_minus_four():
    # every pair of distinct basis vectors is at squared distance 2: V = log exp(-2 * 2) = -4
    for d in (2, 5, 16):
        assert uniformity(np.eye(d) * 3.0) == pytest.approx(-4.0, abs=1e-12)


def test_falls_as_features_spread():
    rng = np.random.default_rng(0)
    centre = rng.normal(size=32)
    noise = rng.normal(size=(200, 32))
    values = [uniformity(centre + s * noise) for s in (0.0, 0.05, 0.2, 1.0, 10.0)]
    assert values[0] == pytest.approx(0.0, abs=1e-12)
    assert all(a > b for a, b in zip(values, values[1:]))
    assert values[-1] < -3.5  # near the uniform-sphere limit for 32 dims (about -4)


def test_best_is_argmin():
    assert best_participant({"a": -1.0, "b": -3.0, "c": -2.0}) == "b"


def test_needs_two_rows():
    with pytest.raises(ValueError):
        uniformity(np.ones((1, 4)))
