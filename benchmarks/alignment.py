"""Alignment fidelity against its linear ceiling: how well maps fitted on a tiny shared subset S generalise.

    python benchmarks/alignment.py --run runs/demo          # after `make demo` (|S| = 25 of 50,000)

For every aligned participant of a finished run, ``--eval`` + ``--ceiling-fit`` images of the unlabeled
pool that are not in S are embedded in-process by both that participant's model and the best one's (the
run's own preprocessing path; the script checks it reproduces the run's S embeddings exactly).

* ceiling: the map fitted on ``--ceiling-fit`` (3,000) pairs, ridge chosen on the evaluation rows: the best a
  linear map can do (an oracle the benchmark can afford offline; a run cannot);
* fixed / loo: fitted on the run's S alone, the config's fixed ridge vs leave-one-out selection;
* semi (covariance of x from the participant's whole shard, cross-covariance from S), with its ridge chosen
  on the evaluation rows, so an upper bound for that lever;
* pcr: regression on the top-k principal components of the participant's shard, k and ridge chosen by
  leave-one-out on S (a reduced-rank map whose basis comes from thousands of images, not 25);
* matched: the LOO map, then each output dimension re-centred and re-scaled to the best model's shard
  statistics (undoes the ridge's shrinkage);
* every figure is R^2 on the same ``--eval`` (1,000) images none of the maps saw.

The shared-size ablation repeats fixed and loo with S drawn from the pool at 0.05 %, 0.2 % and 1 % of 50,000
(25, 100, 500 images; ``--draws`` random draws each). The manifest's own held-out R^2 (a 20 % split of S) is
reported beside them. CPU, about a minute. Writes benchmarks/results/alignment.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import yaml

from common import RESULTS, log, machine, write_json
from fidelity_targets import shard_embeddings

from coopt_ray.align import RIDGE_GRID, fit_alignment, loo_mse, r2_score, select_ridge  # noqa: E402
from coopt_ray.config import parse_config, resolve_model  # noqa: E402
from coopt_ray.data import PUBLIC_SIZE, fashion_mnist_split  # noqa: E402
from coopt_ray.embeddings import shared_matrices  # noqa: E402

SIZES = {"0.05%": 25, "0.2%": 100, "1%": 500}
SEMI_GRID = (1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0)


def semi_fit(x_s, y_s, shard_x, shard_y, rel):
    """Ridge with the input covariance from the shard and the cross-covariance from S."""
    mx, my = shard_x.mean(0), shard_y.mean(0)
    cxx = np.cov(shard_x.T, bias=True)
    cxy = (x_s - mx).T @ (y_s - my) / len(x_s)
    W = np.linalg.solve(cxx + rel * np.trace(cxx) / len(cxx) * np.eye(len(cxx)), cxy)
    return lambda x: (x - mx) @ W + my


def pcr_fit(x_s, y_s, shard_x):
    """Principal-component regression: basis from the shard, (k, ridge) by leave-one-out on S."""
    mx = shard_x.mean(0)
    vals, vecs = np.linalg.eigh(np.cov(shard_x.T, bias=True))
    V = vecs[:, np.argsort(vals)[::-1]]
    best = None
    for k in (2, 4, 8, 12, 16, 24, 32, 48, 64, 96):
        if k > x_s.shape[1]:
            break
        z = (x_s - mx) @ V[:, :k]
        err = loo_mse(z, y_s)
        j = int(np.argmin(err))
        if best is None or err[j] < best[0]:
            best = (err[j], k, RIDGE_GRID[j])
    _, k, lam = best
    t = fit_alignment((x_s - mx) @ V[:, :k], y_s, lam)
    return (lambda x: t.apply((x - mx) @ V[:, :k])), k


def matched(t, shard_x, shard_y):
    """The map ``t`` followed by per-dimension re-centring and re-scaling to the best model's shard statistics."""
    p = t.apply(shard_x)
    mp, sp = p.mean(0), np.maximum(p.std(0), 1e-9)
    my, sy = shard_y.mean(0), shard_y.std(0)
    return lambda x: (t.apply(x) - mp) / sp * sy + my


def stats(v) -> dict:
    v = np.asarray(v, dtype=float)
    return {"mean": round(float(v.mean()), 4), "std": round(float(v.std()), 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--eval", type=int, default=1000, help="evaluation images (not in S)")
    ap.add_argument("--ceiling-fit", type=int, default=3000, help="pairs the ceiling map is fitted on")
    ap.add_argument("--draws", type=int, default=20, help="random S draws per size in the shared-size ablation")
    ap.add_argument("--out", default=str(RESULTS / "alignment.json"))
    a = ap.parse_args(argv)
    from coopt_ray.models import load_model
    from coopt_ray.probe import embed_arrays
    from coopt_ray.uniformity import best_participant, uniformity

    run = Path(a.run)
    cfg = parse_config(yaml.safe_load((run / "config.yaml").read_text()))
    man = __import__("json").loads((run / "manifest.json").read_text())
    ids, mats = shared_matrices(cfg, run)
    best = man["best"]
    assert best == best_participant({n: uniformity(x) for n, x in mats.items()}) or cfg.score.method != "uniformity"
    x_unl, _ = fashion_mnist_split("unlabeled", cfg.data.path)
    s_idx = sorted(int(i.split("/")[1]) - PUBLIC_SIZE for i in ids)
    rng = np.random.default_rng(0)
    pool = np.setdiff1d(rng.permutation(min(len(x_unl), cfg.data.limit or len(x_unl))), s_idx)
    pool = pool[: a.eval + max(a.ceiling_fit, max(SIZES.values()))]
    emb, emb_s = {}, {}
    for p in cfg.participants:
        model, pre, _ = load_model(resolve_model(cfg, p.model), p.pretrained, "cpu")
        emb[p.name] = embed_arrays(model, pre, x_unl[pool]).astype(np.float64)
        emb_s[p.name] = embed_arrays(model, pre, x_unl[s_idx]).astype(np.float64)
        diff = float(np.abs(emb_s[p.name] - mats[p.name]).max())
        if diff > 1e-4:
            raise SystemExit(f"{p.name}: in-process embeddings of S differ from the run's by {diff:g}")
    yb, yb_ev, yb_fit = mats[best], emb[best][: a.eval], emb[best][a.eval:]
    shards = {n: x.astype(np.float64) for n, (_, x) in shard_embeddings(run, man).items()}  # each shard, read once
    shard_y = shards[best]
    res = {"run": str(run), "shared_rows": len(ids), "best": best, "fixed_ridge": cfg.align.ridge,
           "eval_images": a.eval, "ceiling_fit_images": a.ceiling_fit, "draws": a.draws, "machine": machine(),
           "participants": {}}
    for n, x in mats.items():
        if n == best:
            continue
        x_ev, x_fit = emb[n][: a.eval], emb[n][a.eval:]
        ceil = {r: r2_score(yb_ev, fit_alignment(x_fit[: a.ceiling_fit], yb_fit[: a.ceiling_fit], r).apply(x_ev))
                for r in (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)}
        lam = select_ridge(x, yb)
        shard_x = shards[n]
        semi = {r: r2_score(yb_ev, semi_fit(x, yb, shard_x, shard_y, r)(x_ev)) for r in SEMI_GRID}
        pcr, pcr_k = pcr_fit(x, yb, shard_x)
        p = next(q for q in man["participants"] if q["name"] == n)
        r = {"dims": [int(x.shape[1]), int(yb.shape[1])],
             "ceiling": round(max(ceil.values()), 4),
             "fixed": round(r2_score(yb_ev, fit_alignment(x, yb, cfg.align.ridge).apply(x_ev)), 4),
             "loo": round(r2_score(yb_ev, fit_alignment(x, yb, lam).apply(x_ev)), 4), "loo_ridge": lam,
             "semi_best_of_grid": round(max(semi.values()), 4),
             "semi_ridge": max(semi, key=semi.get),
             "pcr": round(r2_score(yb_ev, pcr(x_ev)), 4), "pcr_k": pcr_k,
             "loo_matched": round(r2_score(yb_ev, matched(fit_alignment(x, yb, lam), shard_x, shard_y)(x_ev)), 4),
             "manifest_heldout_r2": p.get("align_heldout_r2"), "manifest_ridge": p.get("align_ridge"),
             "sizes": {}}
        r["gap_fixed"] = round(r["ceiling"] - r["fixed"], 4)
        r["gap_loo"] = round(r["ceiling"] - r["loo"], 4)
        for label, size in SIZES.items():
            fx, lo = [], []
            for d in range(a.draws):
                sel = np.random.default_rng(1000 + d).choice(len(x_fit), size, replace=False)
                fx.append(r2_score(yb_ev, fit_alignment(x_fit[sel], yb_fit[sel], cfg.align.ridge).apply(x_ev)))
                lo.append(r2_score(yb_ev, fit_alignment(x_fit[sel], yb_fit[sel],
                                                        select_ridge(x_fit[sel], yb_fit[sel])).apply(x_ev)))
            r["sizes"][label] = {"images": size, "fixed": stats(fx), "loo": stats(lo)}
        res["participants"][n] = r
        log(f"[alignment] {n} ({x.shape[1]} -> {yb.shape[1]} dims): R2 on {a.eval} unseen images: ceiling "
            f"{r['ceiling']:.3f}, |S|={len(ids)} fixed {r['fixed']:.3f}, loo {r['loo']:.3f} (ridge {lam:g}), "
            f"semi (best of grid) {r['semi_best_of_grid']:.3f}, pcr {r['pcr']:.3f} (k {pcr_k}), matched "
            f"{r['loo_matched']:.3f}; sizes " +
            ", ".join(f"{k}: fixed {v['fixed']['mean']:.3f} loo {v['loo']['mean']:.3f}" for k, v in r["sizes"].items()))
    gaps = [v["gap_loo"] for v in res["participants"].values()]
    res["goal_within_0.15_of_ceiling"] = {"gaps_loo": gaps, "met": bool(max(gaps) <= 0.15)}
    write_json(Path(a.out), res)
    log(f"[alignment] -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
