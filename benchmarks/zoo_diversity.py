"""Do a zoo's teachers know different things? Probe each teacher alone and their embeddings concatenated.

A collaborative student can only beat the best teacher alone if the other teachers add something the best one
lacks. This measures it directly: every teacher embeds ``--probe-images`` images of the unlabeled split (which no
teacher trained on) and ``--test-images`` of t10k; a linear probe (``coopt_ray.probe.linear_probe``, per-dimension
standardised features) is fitted on each teacher alone, on the top two (by their own probe) side by side, and on
all of them side by side. The zoo passes when all of them together probe at least ``--margin`` points above the
best one alone (issue 27: at least 2 points for a zoo whose teachers differ).

    python benchmarks/zoo_diversity.py --zoo zoo --zoo zoo-diverse     # CPU protocol: 2,000 + 2,000 images, ~2 min
    python benchmarks/zoo_diversity.py --quick --zoo zoo               # 500 + 500 images, 20 probe epochs

GPU protocol: the same command (teachers this small embed in seconds either way). Builds a missing zoo first
(``zoo`` with the default specs, a folder named ``*diverse*`` with the diverse ones). Writes
benchmarks/results/zoo_diversity[_quick].json.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from common import RESULTS, ROOT, log, machine, write_json

from coopt_ray.data import fashion_mnist_split  # noqa: E402
from coopt_ray.models import load_model  # noqa: E402
from coopt_ray.probe import embed_arrays, linear_probe  # noqa: E402


def teachers_of(zoo_dir: Path) -> list[dict]:
    """A built zoo's teachers as they are; a missing one is built (diverse specs when its name says so)."""
    from common import zoo_teachers

    from coopt_ray.zoo import ZOO_JSON, build_zoo
    from coopt_ray.zoo_specs import ZOO_SETS

    if (zoo_dir / ZOO_JSON).exists() or "diverse" not in zoo_dir.name:
        return zoo_teachers(zoo_dir, quick=False)
    return build_zoo(zoo_dir, specs=ZOO_SETS["diverse"], progress=log)


def measure(zoo_dir: Path, n_probe: int, n_test: int, epochs: int) -> dict:
    """Probe accuracy of each teacher alone, the top two together and all together, on one zoo."""
    x_pr, y_pr = fashion_mnist_split("unlabeled")
    x_te, y_te = fashion_mnist_split("test")
    x_pr, y_pr, x_te, y_te = x_pr[:n_probe], y_pr[:n_probe], x_te[:n_test], y_te[:n_test]
    feats, alone = {}, {}
    for t in teachers_of(zoo_dir):
        t0 = time.time()
        model, preprocess, _ = load_model(t["model"], device="cpu")
        tr, te = embed_arrays(model, preprocess, x_pr), embed_arrays(model, preprocess, x_te)
        feats[t["name"]] = (tr, te)
        alone[t["name"]] = linear_probe(tr, y_pr, te, y_te, epochs=epochs)
        log(f"[zoo-diversity] {zoo_dir.name}/{t['name']}: probe {alone[t['name']]:.4f} ({time.time() - t0:.1f}s)")

    def together(names: list[str]) -> float:
        tr = np.concatenate([feats[n][0] for n in names], axis=1)
        te = np.concatenate([feats[n][1] for n in names], axis=1)
        return linear_probe(tr, y_pr, te, y_te, epochs=epochs)

    ranked = sorted(alone, key=alone.get, reverse=True)
    top2, every = together(ranked[:2]), together(ranked)
    best = alone[ranked[0]]
    out = {"zoo": str(zoo_dir), "teachers": alone, "best": ranked[0], "best_alone": best,
           "top2": ranked[:2], "top2_together": top2, "all_together": every,
           "gain_all_over_best_points": round(100 * (every - best), 2)}
    log(f"[zoo-diversity] {zoo_dir.name}: best alone {best:.4f} ({ranked[0]}), top two {top2:.4f}, "
        f"all {every:.4f}: {out['gain_all_over_best_points']:+.2f} points")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", action="append", help="a zoo folder (repeat for several; default: zoo and zoo-diverse)")
    ap.add_argument("--quick", action="store_true", help="500 + 500 images, 20 probe epochs")
    ap.add_argument("--probe-images", type=int, default=None, help="default 2,000 (quick 500)")
    ap.add_argument("--test-images", type=int, default=None, help="default 2,000 (quick 500)")
    ap.add_argument("--probe-epochs", type=int, default=None, help="default 100 (quick 20)")
    ap.add_argument("--margin", type=float, default=2.0, help="points above the best teacher that pass")
    ap.add_argument("--out", default=None, help="result JSON (default benchmarks/results/zoo_diversity[_quick].json)")
    a = ap.parse_args(argv)
    q = a.quick
    n_probe, n_test = a.probe_images or (500 if q else 2000), a.test_images or (500 if q else 2000)
    epochs = a.probe_epochs or (20 if q else 100)
    zoos = [Path(z) if Path(z).is_absolute() else ROOT / z for z in (a.zoo or ["zoo", "zoo-diverse"])]
    results = {z.name: measure(z, n_probe, n_test, epochs) for z in zoos}
    for r in results.values():
        r["passes"] = r["gain_all_over_best_points"] >= a.margin
    out = Path(a.out) if a.out else RESULTS / f"zoo_diversity{'_quick' if q else ''}.json"
    write_json(out, {"protocol": {"probe_images": n_probe, "probe_split": "unlabeled[0:n]", "test_images": n_test,
                                  "test_split": "t10k[0:n]", "probe_epochs": epochs, "margin_points": a.margin},
                     "machine": machine(), "zoos": results})
    log(f"[zoo-diversity] wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
