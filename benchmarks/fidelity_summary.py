"""Summary, goal quantities and plots of a fidelity result JSON (benchmarks/fidelity.py writes it)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

MAIN = ("coopt", "byol", "simclr", "supervised")
ABLATION_KEYS = ("noalign", "randproj", "central", "worst", "labelfree", "loo", "weighted",
                 "shared_0.2", "shared_1", "loo_shared_0.2", "loo_shared_1", "heads_pp", "heads_both", "heads_all")
COLLABORATIVE = ("coopt", "loo", "weighted", "heads_pp", "heads_both")  # settings allowed in the collaborative setting


def mean_std(xs) -> dict:
    xs = [x for x in xs if x is not None]
    return {"mean": round(float(np.mean(xs)), 4), "std": round(float(np.std(xs)), 4), "n": len(xs)} if xs else None


def summarise(res: dict, a) -> dict:
    """Final-epoch mean/std per method, mean curves, time to BYOL's final accuracy, goal checks."""
    runs = res["runs"]
    out = {}
    curves = {}
    for key, per_seed in runs.items():
        finals = [h[-1]["probe_accuracy"] for h in per_seed.values()]
        out[key] = mean_std(finals)
        if any(e["probe_accuracy"] is None for h in per_seed.values() for e in h):
            continue  # probed after the last epoch only: no curve
        ep = min(len(h) for h in per_seed.values())
        curves[key] = {
            "epoch": list(range(ep)),
            "acc_mean": [round(float(np.mean([h[e]["probe_accuracy"] for h in per_seed.values()])), 4) for e in range(ep)],
            "acc_std": [round(float(np.std([h[e]["probe_accuracy"] for h in per_seed.values()])), 4) for e in range(ep)],
            "train_seconds_mean": [round(float(np.mean([h[e]["train_seconds"] for h in per_seed.values()])), 2)
                                   for e in range(ep)],
        }
    res["curves"] = curves
    for k, v in out.items():
        res[k] = v
    if "coopt" in curves and "byol" in curves:
        target = curves["byol"]["acc_mean"][-1]
        c = curves["coopt"]
        hit = next((e for e, acc in zip(c["epoch"], c["acc_mean"]) if e > 0 and acc >= target), None)
        costs = res.get("costs", {})
        train = None if hit is None else c["train_seconds_mean"][hit]
        all_in = None if hit is None or not costs else round(
            train + costs["teachers_train_seconds"] + costs["optimize_seconds"], 1)
        res["time_to_byol_final"] = {
            "byol_final_accuracy": target,
            "byol": {"epochs": curves["byol"]["epoch"][-1], "seconds": curves["byol"]["train_seconds_mean"][-1]},
            "coopt": {"epochs": hit, "seconds": train, "seconds_all_costs": all_in,
                      "seconds_all_costs_prorated": None if hit is None or not costs else round(
                          train + (costs["teachers_train_seconds"] + costs["optimize_seconds"]) * costs["share"], 1)},
            "epoch_ratio": None if hit is None else round(hit / curves["byol"]["epoch"][-1], 3),
        }
    g = {}

    def diff(a, b):
        return round(100 * (res[a]["mean"] - res[b]["mean"]), 2) if res.get(a) and res.get(b) else None

    for name, a, b in (("coopt_minus_byol_points", "coopt", "byol"), ("coopt_minus_simclr_points", "coopt", "simclr"),
                       ("aligned_minus_unaligned_points", "coopt", "noalign"),
                       ("aligned_minus_random_projection_points", "coopt", "randproj"),
                       ("coopt_minus_central_points", "coopt", "central"),
                       ("loo_minus_central_points", "loo", "central"), ("loo_minus_fixed_points", "loo", "coopt"),
                       ("weighted_minus_loo_points", "weighted", "loo"),
                       ("labelfree_minus_byol_points", "labelfree", "byol"),
                       ("labelfree_minus_simclr_points", "labelfree", "simclr")):
        v = diff(a, b)
        if v is not None:
            g[name] = v
    for k in ("heads_pp", "heads_both", "heads_all"):
        for b in ("central", "coopt", "simclr"):
            v = diff(k, b)
            if v is not None:
                g[f"{k}_minus_{b}_points"] = v
    single = [k for k in res if (k == "central" or k.startswith("solo_")) and isinstance(res[k], dict) and "mean" in res[k]]
    if single:  # the best student any one teacher gives when it labels every image
        g["best_single_teacher"] = max(single, key=lambda k: res[k]["mean"])
    collab = [k for k in COLLABORATIVE if res.get(k)]
    if collab:
        best = max(collab, key=lambda k: res[k]["mean"])
        g["best_collaborative"] = best
        for b in ("central", "simclr", "byol", g.get("best_single_teacher")):
            v = diff(best, b) if b else None
            if v is not None:
                g[f"best_collaborative_minus_{'best_single' if b == g.get('best_single_teacher') else b}_points"] = v
    if all(res.get(k) for k in ("coopt", "shared_1", "noalign")):
        gain1 = res["shared_1"]["mean"] - res["noalign"]["mean"]
        gain005 = res["coopt"]["mean"] - res["noalign"]["mean"]
        g["shared_0.05_share_of_1pct_gain"] = round(gain005 / gain1, 3) if abs(gain1) > 1e-9 else None
    res["goals"] = g
    return res


def uniformity_vs_accuracy(teachers: list[dict]) -> dict:
    from scipy.stats import spearmanr

    u = [t["uniformity"] for t in teachers]
    acc = [t["probe_accuracy"] for t in teachers]
    rho, p = spearmanr(u, acc)
    return {"teachers": [{"name": t["name"], "uniformity": t["uniformity"], "probe_accuracy": t["probe_accuracy"]}
                         for t in teachers],
            "spearman_rho": None if np.isnan(rho) else round(float(rho), 4),
            "p_value": None if np.isnan(p) else round(float(p), 4),
            "note": "lower uniformity should mean higher accuracy: a good score gives rho near -1"}


# ---------------------------------------------------------------- plots
def _save(plt, fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def plot(res: dict, out_dir: Path, tag: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    curves = res.get("curves", {})
    main = [k for k in MAIN if k in curves]
    if main:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for k in main:
            c = curves[k]
            ax.errorbar(c["epoch"], c["acc_mean"], yerr=c["acc_std"], label=k, marker="o", ms=3, capsize=2)
        if res.get("random_init"):
            ax.axhline(res["random_init"]["mean"], ls="--", c="gray", label="random init")
        ax.set_xlabel("epoch")
        ax.set_ylabel("linear-probe accuracy")
        ax.set_title(f"{res['settings']['arch']}, {res['settings']['images'] or 50000} images, "
                     f"{res['settings']['seeds']} seed(s), each method at its best lr")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        files.append(_save(plt, fig, out_dir / f"fidelity_curves{tag}.png"))
    bars = [k for k in ("coopt", *ABLATION_KEYS, "byol", "simclr", "supervised", "random_init") if res.get(k)]
    if bars:
        fig, ax = plt.subplots(figsize=(9, 4.2))
        m = [res[k]["mean"] for k in bars]
        s = [res[k]["std"] for k in bars]
        ax.bar(range(len(bars)), m, yerr=s, capsize=3, color=["C0" if k in ("coopt", "loo", "weighted", "labelfree") or "shared" in k
                                                                else "C1" if k in ABLATION_KEYS else "C2" for k in bars])
        ax.set_xticks(range(len(bars)))
        ax.set_xticklabels(bars, rotation=30, ha="right")
        lo = min(m) - 0.05
        ax.set_ylim(max(0, lo), min(1, max(m) + 0.03))
        ax.set_ylabel("final linear-probe accuracy")
        ax.set_title("ablations and baselines (final epoch)")
        ax.grid(axis="y", alpha=0.3)
        files.append(_save(plt, fig, out_dir / f"fidelity_ablations{tag}.png"))
    uv = res.get("uniformity_vs_accuracy")
    if uv:
        fig, ax = plt.subplots(figsize=(5, 4))
        for t in uv["teachers"]:
            ax.scatter(t["uniformity"], t["probe_accuracy"])
            ax.annotate(t["name"], (t["uniformity"], t["probe_accuracy"]), fontsize=8)
        ax.set_xlabel("uniformity value (lower is better)")
        ax.set_ylabel("teacher linear-probe accuracy")
        ax.set_title(f"Spearman rho = {uv['spearman_rho']}")
        ax.grid(alpha=0.3)
        files.append(_save(plt, fig, out_dir / f"uniformity_vs_accuracy{tag}.png"))
    cross = res.get("cross_arch")
    if cross:
        archs = list(cross)
        fig, ax = plt.subplots(figsize=(6, 4))
        w = 0.38
        for j, meth in enumerate(("coopt", "byol")):
            m = [cross[x][meth]["mean"] if cross[x].get(meth) else 0 for x in archs]
            s = [cross[x][meth]["std"] if cross[x].get(meth) else 0 for x in archs]
            ax.bar(np.arange(len(archs)) + (j - 0.5) * w, m, w, yerr=s, capsize=3, label=meth)
        ax.set_xticks(range(len(archs)))
        ax.set_xticklabels(archs, rotation=15)
        ax.set_ylabel("final linear-probe accuracy")
        ax.set_title("one optimized dataset, several students")
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
        files.append(_save(plt, fig, out_dir / f"cross_arch{tag}.png"))
    return files
