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
    _, r2, held, lam = fit_with_stats(x, y, ridge=1e-6, heldout=0.2, seed=0)
    assert lam == 1e-6
    assert r2 > 0.99 and held > 0.99
    m = heldout_mask(50, 0.2, seed=3)
    assert m.sum() == 10 and np.array_equal(m, heldout_mask(50, 0.2, seed=3))


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        fit_alignment(np.zeros((5, 3)), np.zeros((4, 3)))


def test_leave_one_out_shortcut_equals_refitting_without_each_row():
    from coopt_ray.align import loo_mse

    for n, dk, ds in ((20, 6, 4), (12, 30, 5)):  # more rows than dims, and fewer (the shared-subset case)
        x, y, _, _ = planted(n=n, dk=dk, ds=ds, seed=n, noise=0.5)
        ridges = (1e-4, 1e-2, 1.0)
        def scale(a):  # fit_alignment's ridge is relative to this; hold the absolute penalty fixed
            return ((a - a.mean(0)) ** 2).sum() / len(a)

        brute = []
        for r in ridges:
            err = []
            for i in range(n):
                xi, yi = np.delete(x, i, 0), np.delete(y, i, 0)
                t = fit_alignment(xi, yi, r * scale(x) / scale(xi))
                err.append(((t.apply(x[i:i + 1]) - y[i]) ** 2).sum())
            brute.append(np.mean(err))
        np.testing.assert_allclose(loo_mse(x, y, ridges), brute, rtol=1e-6)


def test_leave_one_out_picks_a_small_ridge_for_a_clean_map_and_a_large_one_for_noise():
    from coopt_ray.align import select_ridge

    x, y, _, _ = planted(n=60, dk=8, ds=5, noise=0.01)
    assert select_ridge(x, y) <= 1e-3
    rng = np.random.default_rng(1)
    assert select_ridge(x, rng.normal(size=(60, 5))) >= 1.0  # y independent of x: shrink (nearly) all of it
    _, _, _, lam = fit_with_stats(x, y, ridge=1.0, heldout=0.2, seed=0, select="loo")
    assert lam <= 1e-3  # the configured ridge is ignored when selecting


def test_r2_score_on_hand_values():
    y = np.array([[1.0], [2.0], [3.0], [4.0]])  # mean 2.5, SS_tot = 5
    assert r2_score(y, y) == 1.0
    assert r2_score(y, np.full_like(y, 2.5)) == 0.0  # predicting the mean
    assert r2_score(y, np.array([[1.0], [2.0], [3.0], [5.0]])) == pytest.approx(1 - 1 / 5)
    # two output dims pool their sums: SS_res = 1 + 4, SS_tot = 5 + 20
    y2 = np.array([[1.0, 0.0], [2.0, 2.0], [3.0, 4.0], [4.0, 6.0]])
    p2 = y2 + np.array([[0, 0], [0, 2.0], [0, 0], [1.0, 0]])
    assert r2_score(y2, p2) == pytest.approx(1 - 5 / 25)
    assert np.isnan(r2_score(np.ones((3, 1)), np.zeros((3, 1))))  # constant truth: undefined, not 1 or 0
