"""Alignment fidelity on a finished run's shared subset: the fixed ridge against leave-one-out selection.

    python benchmarks/alignment.py --run runs/demo          # after `make demo` (|S| = 25 of 50,000)

For every aligned participant, S is split at random into fit rows and held-out rows (``--heldout``, 20 %)
``--splits`` times; each method fits its map on the fit rows only (LOO chooses its ridge on them as well)
and is scored by R^2 on the held-out rows. Both methods see the same splits, side by side. CPU only
(n x n eigendecompositions; seconds). Writes benchmarks/results/alignment.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import yaml

from common import RESULTS, log, write_json

from coopt_ray.align import fit_alignment, heldout_mask, r2_score, select_ridge  # noqa: E402
from coopt_ray.config import parse_config  # noqa: E402
from coopt_ray.embeddings import shared_matrices  # noqa: E402
from coopt_ray.uniformity import best_participant, uniformity  # noqa: E402


def compare(x: np.ndarray, y: np.ndarray, ridge: float, heldout: float, splits: int) -> dict:
    """Held-out R^2 of the fixed ridge and of the LOO-selected one over ``splits`` random splits of S."""
    fixed, loo, chosen = [], [], []
    for seed in range(splits):
        m = heldout_mask(len(x), heldout, seed)
        fixed.append(r2_score(y[m], fit_alignment(x[~m], y[~m], ridge).apply(x[m])))
        lam = select_ridge(x[~m], y[~m])
        chosen.append(lam)
        loo.append(r2_score(y[m], fit_alignment(x[~m], y[~m], lam).apply(x[m])))
    f, lo = np.array(fixed), np.array(loo)
    return {"fixed": {"mean": round(float(f.mean()), 4), "std": round(float(f.std()), 4)},
            "loo": {"mean": round(float(lo.mean()), 4), "std": round(float(lo.std()), 4)},
            "loo_minus_fixed": round(float((lo - f).mean()), 4), "loo_better_share": round(float((lo > f).mean()), 3),
            "chosen_ridges": sorted({float(c) for c in chosen}), "median_ridge": float(np.median(chosen))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--splits", type=int, default=50)
    ap.add_argument("--heldout", type=float, default=0.2)
    ap.add_argument("--out", default=str(RESULTS / "alignment.json"))
    a = ap.parse_args(argv)
    run = Path(a.run)
    cfg = parse_config(yaml.safe_load((run / "config.yaml").read_text()))
    ids, mats = shared_matrices(cfg, run)
    best = best_participant({n: uniformity(x) for n, x in mats.items()})
    res = {"run": str(run), "shared_rows": len(ids), "best": best, "fixed_ridge": cfg.align.ridge,
           "heldout": a.heldout, "splits": a.splits, "participants": {}}
    for n, x in mats.items():
        if n == best:
            continue
        r = compare(x, mats[best], cfg.align.ridge, a.heldout, a.splits)
        r["dims"] = [int(x.shape[1]), int(mats[best].shape[1])]
        res["participants"][n] = r
        log(f"[alignment] {n} ({x.shape[1]} -> {mats[best].shape[1]} dims, |S| = {len(ids)}): held-out R2 fixed "
            f"{r['fixed']['mean']:.3f} ± {r['fixed']['std']:.3f}, loo {r['loo']['mean']:.3f} ± {r['loo']['std']:.3f} "
            f"(median ridge {r['median_ridge']:g})")
    write_json(Path(a.out), res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
