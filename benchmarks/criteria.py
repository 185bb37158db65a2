"""Best-model criteria vs teacher quality, in the teachers' domain and out of it (issue 17).

    python benchmarks/criteria.py            # 5 zoo teachers, 4 domains, 20 draws of S (~1 min on 2 CPUs)

For each domain (Fashion-MNIST as is, and three the zoo never saw: inverted, rotated 90 degrees, and with
additive pixel noise) every zoo teacher gets a linear-probe accuracy (2,000 labeled images of the
unlabeled split's tail -> 2,000 of t10k, all transformed; none of them were in the teachers' training data)
and two scores on a shared subset S of 25 images drawn ``--draws`` times from 2,000 pool images:

* uniformity (the paper's; lower is better, so a good criterion has rho near -1);
* coverage (``align.coverage``: mean leave-one-out R^2 with which a teacher's space predicts every other
  teacher's; higher is better, rho near +1);
* and, as a control that should fail, ``predicted_by_others`` (how well the others predict the teacher: a
  narrow space is easy to predict, so it ranks teachers backwards).

Reports per domain the share of draws in which each score picks the teacher that probes best (what a run
uses), and the Spearman rho of each score with probe accuracy: the mean over draws (what one run
with |S| = 25 sees) and the rho of the draw-averaged score. Writes benchmarks/results/criteria.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from common import RESULTS, ROOT, log, machine, write_json, zoo_teachers

from coopt_ray.align import coverage, loo_r2  # noqa: E402
from coopt_ray.data import fashion_mnist_split  # noqa: E402
from coopt_ray.uniformity import uniformity  # noqa: E402


def domains(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "fashion-mnist": lambda x: x,
        "inverted": lambda x: 255 - x,
        "rot90": lambda x: np.ascontiguousarray(np.rot90(x, 1, axes=(1, 2))),
        "noise": lambda x: np.clip(x.astype(np.int16) + rng.integers(0, 120, x.shape), 0, 255).astype(np.uint8),
    }


def predicted_by_others(mats: dict) -> dict:
    return {k: float(np.mean([loo_r2(mats[j], mats[k]) for j in mats if j != k])) for k in mats}


def main(argv=None) -> int:
    from scipy.stats import spearmanr

    from coopt_ray.models import load_model
    from coopt_ray.probe import embed_arrays, linear_probe

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", default=str(ROOT / "zoo"))
    ap.add_argument("--shared", type=int, default=25, help="|S| per draw")
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--probe-images", type=int, default=2000)
    ap.add_argument("--out", default=str(RESULTS / "criteria.json"))
    a = ap.parse_args(argv)
    teachers = zoo_teachers(Path(a.zoo), False)
    models = [load_model(t["model"], None, "cpu")[:2] for t in teachers]
    names = [t["name"] for t in teachers]
    xu, yu = fashion_mnist_split("unlabeled")
    xt, yt = fashion_mnist_split("test")
    n = a.probe_images
    res = {"teachers": names, "shared": a.shared, "draws": a.draws, "probe_images": n, "machine": machine(),
           "domains": {}}
    scorers = {"uniformity": (lambda m: {k: uniformity(v) for k, v in m.items()}, -1),
               "coverage": (coverage, +1), "predicted_by_others": (predicted_by_others, +1)}
    for dname, f in domains().items():
        acc, pool = [], []
        for model, pre in models:
            acc.append(linear_probe(embed_arrays(model, pre, f(xu[-n:])), yu[-n:], embed_arrays(model, pre, f(xt[:n])),
                                    yt[:n], epochs=100, seed=0))
            pool.append(embed_arrays(model, pre, f(xu[:2000])))
        rng = np.random.default_rng(1)
        per = {k: [] for k in scorers}
        for _ in range(a.draws):
            idx = rng.choice(len(pool[0]), a.shared, replace=False)
            mats = {nm: p[idx].astype(np.float64) for nm, p in zip(names, pool)}
            for k, (fn, _) in scorers.items():
                v = fn(mats)
                per[k].append([v[nm] for nm in names])
        d = {"probe_accuracy": dict(zip(names, [round(x, 4) for x in acc]))}
        for k, (_, sign) in scorers.items():
            rhos = [spearmanr(v, acc)[0] for v in per[k]]
            mean_score = np.mean(per[k], 0)
            top = int(np.argmax(acc))
            picks = [int(np.argmax(sign * np.asarray(v))) == top for v in per[k]]
            d[k] = {"mean_score": dict(zip(names, [round(float(s), 4) for s in mean_score])),
                    "rho_mean_over_draws": round(float(np.mean(rhos)), 3),
                    "rho_std_over_draws": round(float(np.std(rhos)), 3),
                    "rho_of_mean_score": round(float(spearmanr(mean_score, acc)[0]), 3),
                    "picks_the_best_teacher": round(float(np.mean(picks)), 3),
                    "right_direction": "negative" if sign < 0 else "positive"}
        res["domains"][dname] = d
        log(f"[criteria] {dname}: probe {d['probe_accuracy']}; rho (mean over draws / of mean score; share of draws "
            f"that pick the best teacher): " + ", ".join(
                f"{k} {d[k]['rho_mean_over_draws']:+.2f} / {d[k]['rho_of_mean_score']:+.2f}; "
                f"{d[k]['picks_the_best_teacher']:.2f}" for k in scorers))
    ood = [k for k in res["domains"] if k != "fashion-mnist"]
    res["goal_ood_rank_0.8"] = {
        k: {dn: bool(sign * res["domains"][dn][k]["rho_mean_over_draws"] >= 0.8) for dn in ood}
        for k, (_, sign) in scorers.items() if k != "predicted_by_others"}
    write_json(Path(a.out), res)
    log(f"[criteria] -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
