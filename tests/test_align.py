import numpy as np
import pytest

from coopt_ray.align import fit_alignment, fit_with_stats, heldout_mask, r2_score


def planted(n=200, dk=12, ds=7, seed=0, noise=0.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dk)) * rng.uniform(0.5, 3, size=dk) + rng.normal(size=dk)
    W = rng.normal(size=(dk, ds))
    b = rng.normal(size=ds) * 5
    return x, x @ W + b + noise * rng.normal(size=(n, ds)), W, b


@pytest.mark.parametrize("dk,ds", [(12, 7), (7, 12), (16, 16)])
def test_planted_map_recovered_as_ridge_goes_to_zero(dk, ds):
    x, y, W, b = planted(dk=dk, ds=ds)
    t = fit_alignment(x, y, ridge=1e-12)
    assert t.W.shape == (dk, ds) and t.b.shape == (ds,)
    np.testing.assert_allclose(t.W, W, atol=1e-4)
    np.testing.assert_allclose(t.b, b, atol=1e-4)
    assert r2_score(y, t.apply(x)) > 1 - 1e-8


def test_error_shrinks_as_ridge_shrinks():
    x, y, W, _ = planted(dk=10, ds=6)
    errs = [np.abs(fit_alignment(x, y, ridge=r).W - W).max() for r in (1.0, 1e-2, 1e-4, 1e-8)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-4 < errs[0]


def test_fewer_rows_than_dims_is_well_posed():
    x, y, _, _ = planted(n=16, dk=64, ds=32)
    t = fit_alignment(x, y, ridge=1e-3)
    assert np.all(np.isfinite(t.W))
    assert r2_score(y, t.apply(x)) > 0.99  # interpolates the fit rows


def test_heldout_stats_and_mask():
    x, y, _, _ = planted(n=50, dk=5, ds=3, noise=0.01)
    _, r2, held = fit_with_stats(x, y, ridge=1e-6, heldout=0.2, seed=0)
    assert r2 > 0.99 and held > 0.99
    m = heldout_mask(50, 0.2, seed=3)
    assert m.sum() == 10 and np.array_equal(m, heldout_mask(50, 0.2, seed=3))


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        fit_alignment(np.zeros((5, 3)), np.zeros((4, 3)))
