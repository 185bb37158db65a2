"""Fidelity benchmark: CoOpt vs BYOL / SimCLR / supervised / random init, ablations, cross-architecture.

Every method trains the same student architecture on the same unlabeled images for the same epochs,
batch size and optimizer, in the same in-process loop (``coopt_ray.baselines.fit``), and is scored
after every epoch by the same linear probe. The optimized datasets come from ``run_optimize`` (one
run per ablation config, shared by all seeds); only the student training is repeated per seed.

    python benchmarks/fidelity.py --quick          # 1 seed, small data, tiny student (~15 min idle CPU)
    python benchmarks/fidelity.py                  # 3 seeds, 50k images, resnet18 (GPU-sized)
    python benchmarks/fidelity.py --seeds 3 --images 1500 --pool 50000 --epochs 6 --arch resnet10t \
        --batch-size 64 --probe-images 1000 --test-images 1000 --probe-epochs 50 \
        --cross-archs resnet10t,mobilenetv3_small_100,test_vit   # the committed CPU-sized run (~80 min)

With ``--pool`` the optimize stage runs on that many unlabeled images (so the shared subset is a fraction
of the whole pool, as in the method) and every method trains on the first ``--images`` of them.

Writes benchmarks/results/fidelity[_quick].json and PNG plots next to it.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from common import RESULTS, ROOT, log, machine, optimize_config, start_ray, write_json, zoo_teachers

from coopt_ray import baselines as B  # noqa: E402
from coopt_ray.data import PUBLIC_SIZE, fashion_mnist_split, shared_size  # noqa: E402
from coopt_ray.images import arrays_to_rgb  # noqa: E402
from coopt_ray.train import read_targets  # noqa: E402

SHARED_FRACTIONS = {"shared_0.05": 0.0005, "shared_0.2": 0.002, "shared_1": 0.01}
ABLATIONS = ("noalign", "central", "worst", *SHARED_FRACTIONS)


class FinalProbe:
    """Probes only after the last epoch (the ablations report final accuracy; a probe costs about as much
    as an epoch of a small student on 2 CPU cores). ``fit`` calls it before training and after each epoch."""

    def __init__(self, prober, epochs: int):
        self.prober, self.epochs, self.calls = prober, epochs, 0

    def __call__(self, backbone):
        self.calls += 1
        return self.prober(backbone) if self.calls == self.epochs + 1 else None


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 seed, small data, tiny student")
    ap.add_argument("--seeds", type=int, help="number of seeds (default 3, quick 1)")
    ap.add_argument("--images", type=int, help="unlabeled training images (default all 50k, quick 2,000)")
    ap.add_argument("--pool", type=int, help="unlabeled images the optimize stage runs on (default: --images); "
                    "the students train on the first --images of them, so shared-subset fractions are of the pool")
    ap.add_argument("--epochs", type=int, help="student epochs (default 20, quick 4)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 256, quick 128")
    ap.add_argument("--arch", help="student architecture (default resnet18, quick test_vit)")
    ap.add_argument("--cross-archs", help="comma list for cross-architecture reuse "
                    "(default resnet18,mobilenetv3_small_100,vit_tiny_patch4_32; quick test_vit,"
                    "mobilenetv3_small_050,test_efficientnet)")
    ap.add_argument("--probe-images", type=int, help="labeled probe-train images from the public split "
                    "(default 10,000, quick 1,000)")
    ap.add_argument("--test-images", type=int, help="test images (default 10,000, quick 1,000)")
    ap.add_argument("--probe-epochs", type=int, help="linear-probe epochs (default 100, quick 30)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--whiten", action="store_true", help="CoOpt students regress PCA-whitened targets "
                    "(student.whiten) instead of per-dimension standardised ones")
    ap.add_argument("--methods", default="", help="comma list: train only these result keys (e.g. "
                    "coopt,byol,shared_0.05; default all)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--zoo", default=str(ROOT / "zoo"), help="teacher zoo folder (built if missing)")
    ap.add_argument("--work", default=None, help="optimize runs go here (default runs/bench-fidelity[-quick])")
    ap.add_argument("--out", default=None, help="result JSON (default benchmarks/results/fidelity[_quick].json)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: main (the --arch methods), "
                    "ablations, cross")
    ap.add_argument("--replot", action="store_true",
                    help="only re-summarise and re-plot the result JSON (e.g. a run still in progress)")
    a = ap.parse_args(argv)
    q = a.quick
    d = dict(seeds=1 if q else 3, images=2000 if q else None, epochs=4 if q else 20, batch_size=128 if q else 256,
             arch="test_vit" if q else "resnet18",
             cross_archs=("test_vit,mobilenetv3_small_050,test_efficientnet" if q
                          else "resnet18,mobilenetv3_small_100,vit_tiny_patch4_32"),
             probe_images=1000 if q else 10_000, test_images=1000 if q else 10_000, probe_epochs=30 if q else 100)
    for k, v in d.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    tag = "_quick" if q else ""
    a.work = Path(a.work or ROOT / "runs" / f"bench-fidelity{tag.replace('_', '-')}")
    a.out = Path(a.out or RESULTS / f"fidelity{tag}.json")
    a.cross_archs = [s for s in a.cross_archs.split(",") if s]
    a.skip = {s for s in a.skip.split(",") if s}
    a.methods = {s for s in a.methods.split(",") if s}
    if a.pool is not None and a.images is not None and a.pool < a.images:
        ap.error(f"--pool {a.pool} is smaller than --images {a.images}")
    return a


# ---------------------------------------------------------------- optimized datasets
def optimize_specs(a, teachers: list[dict]) -> dict:
    """``{name: optimize_config kwargs}`` for every optimized dataset the benchmark trains on."""

    by_acc = sorted(teachers[:4], key=lambda t: t["probe_accuracy"])
    worst, best = by_acc[0], by_acc[-1]
    specs = {"coopt": dict(teachers=teachers[:4])}
    if "ablations" not in a.skip:
        specs["central"] = dict(teachers=[best])
        specs["worst"] = dict(teachers=[worst])
        for name, frac in SHARED_FRACTIONS.items():
            specs[name] = dict(teachers=teachers[:4], shared_fraction=frac, shared_min=2)
    return specs


class OptimizedSets:
    """Runs ``run_optimize`` for a dataset the first time it is needed (main methods train first)."""

    def __init__(self, a, specs: dict, pool_size: int):
        self.a, self.specs, self.pool_size, self.runs, self.by_fp, self.by_emb = a, specs, pool_size, {}, {}, {}

    def __getitem__(self, name: str):
        if name not in self.runs:
            self.runs[name] = self._optimize(name, self.specs[name])
        return self.runs[name]

    def _optimize(self, name: str, spec: dict):
        from coopt_ray.pipeline import run_optimize

        a, runs, by_fp, by_emb = self.a, self.runs, self.by_fp, self.by_emb
        cfg = optimize_config(limit=a.pool or a.images, **spec)
        # S is fixed by the seed and its size alone (data.shared_subset), so two configs whose fraction/min
        # resolve to the same size (e.g. 0.05 % of 50k and the default) are the same optimized dataset
        s = shared_size(self.pool_size, cfg.shared.fraction, cfg.shared.min)
        fp = f"{cfg.fingerprint('seed', 'data', 'participants', 'align')}/S{s}"
        if fp in by_fp:
            log(f"[fidelity] {name}: same optimized dataset as {by_fp[fp]}")
            return runs[by_fp[fp]]
        run = a.work / name
        emb_fp = cfg.fingerprint("seed", "data", "participants", "shared")
        donor = by_emb.get(emb_fp)
        if donor is not None and not (run / "embeddings").exists():  # same embeddings, other align: reuse them
            run.mkdir(parents=True, exist_ok=True)
            shutil.copytree(donor / "embeddings", run / "embeddings")
        log(f"[fidelity] optimize {name}: {[t['name'] for t in spec['teachers']]} -> {run}")
        t0 = time.time()
        man = run_optimize(cfg, run, log=lambda m: None)
        log(f"[fidelity] optimize {name}: best {man['best']} in {time.time() - t0:.0f}s")
        by_fp[fp], by_emb[emb_fp] = name, run
        return run, man


def unaligned_targets(run: Path, manifest: dict) -> tuple[np.ndarray, np.ndarray]:
    """The "no alignment" ablation from the aligned run's own embeddings: every participant's raw
    psi_k(x) as the target, cut or zero-padded to the best model's width so the shards can be merged
    (the teachers' widths differ; ``merge`` itself needs one width, so ``align.enabled: false`` cannot
    merge this zoo)."""
    import pyarrow.parquet as pq

    from coopt_ray.embeddings import column_matrix

    d = manifest["target_dim"]
    idx, ys = [], []
    for p in manifest["participants"]:
        t = pq.read_table(run / "embeddings" / p["name"], columns=["id", "embedding", "owned", "error"])
        keep = np.asarray(t.column("owned").to_numpy(zero_copy_only=False)) & np.array(
            [e == "" for e in t.column("error").to_pylist()])
        x = column_matrix(t.column("embedding"))[keep]
        y = np.zeros((len(x), d), np.float32)
        y[:, :min(d, x.shape[1])] = x[:, :d]
        ids = [i for i, k in zip(t.column("id").to_pylist(), keep) if k]
        idx.append(np.array([int(i.split("/")[1]) - PUBLIC_SIZE for i in ids]))
        ys.append(y)
    idx, y = np.concatenate(idx), np.concatenate(ys)
    order = np.argsort(idx)
    return idx[order], y[order]


def load_targets(run: Path) -> tuple[np.ndarray, np.ndarray]:
    """(indices into the unlabeled split, target matrix) of RUN/optimized, sorted by index."""
    ids, y = read_targets(run / "optimized")
    idx = np.array([int(i.split("/")[1]) - PUBLIC_SIZE for i in ids])
    order = np.argsort(idx)
    return idx[order], y[order]


# ---------------------------------------------------------------- summary
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
        res["time_to_byol_final"] = {
            "byol_final_accuracy": target,
            "byol": {"epochs": curves["byol"]["epoch"][-1], "seconds": curves["byol"]["train_seconds_mean"][-1]},
            "coopt": {"epochs": hit, "seconds": None if hit is None else c["train_seconds_mean"][hit]},
            "epoch_ratio": None if hit is None else round(hit / curves["byol"]["epoch"][-1], 3),
        }
    g = {}
    if res.get("coopt") and res.get("byol"):
        g["coopt_minus_byol_points"] = round(100 * (res["coopt"]["mean"] - res["byol"]["mean"]), 2)
    if res.get("coopt") and res.get("noalign"):
        g["aligned_minus_unaligned_points"] = round(100 * (res["coopt"]["mean"] - res["noalign"]["mean"]), 2)
    if all(res.get(k) for k in ("shared_0.05", "shared_1", "noalign")):
        gain1 = res["shared_1"]["mean"] - res["noalign"]["mean"]
        gain005 = res["shared_0.05"]["mean"] - res["noalign"]["mean"]
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
def plot(res: dict, out_dir: Path, tag: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    curves = res.get("curves", {})
    main = [k for k in ("coopt", "byol", "simclr", "supervised", "noalign", "central", "worst") if k in curves]
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
                     f"{res['settings']['seeds']} seed(s)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        f = out_dir / f"fidelity_curves{tag}.png"
        fig.savefig(f, dpi=110)
        plt.close(fig)
        files.append(f.name)
    bars = [k for k in ("coopt", "noalign", "central", "worst", "shared_0.05", "shared_0.2", "shared_1",
                        "byol", "simclr", "supervised", "random_init") if res.get(k)]
    if bars:
        fig, ax = plt.subplots(figsize=(7.5, 4))
        m = [res[k]["mean"] for k in bars]
        s = [res[k]["std"] for k in bars]
        ax.bar(range(len(bars)), m, yerr=s, capsize=3, color=["C0" if k.startswith(("coopt", "shared")) else
                                                                "C1" if k in ("noalign", "central", "worst") else "C2"
                                                                for k in bars])
        ax.set_xticks(range(len(bars)))
        ax.set_xticklabels(bars, rotation=30, ha="right")
        lo = min(m) - 0.05
        ax.set_ylim(max(0, lo), min(1, max(m) + 0.03))
        ax.set_ylabel("final linear-probe accuracy")
        ax.set_title("ablations and baselines (final epoch)")
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        f = out_dir / f"fidelity_ablations{tag}.png"
        fig.savefig(f, dpi=110)
        plt.close(fig)
        files.append(f.name)
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
        fig.tight_layout()
        f = out_dir / f"uniformity_vs_accuracy{tag}.png"
        fig.savefig(f, dpi=110)
        plt.close(fig)
        files.append(f.name)
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
        fig.tight_layout()
        f = out_dir / f"cross_arch{tag}.png"
        fig.savefig(f, dpi=110)
        plt.close(fig)
        files.append(f.name)
    return files


# ---------------------------------------------------------------- main
def main(argv=None) -> dict:
    import torch

    a = parse_args(argv)
    tag = "_quick" if a.quick else ""
    if a.replot:
        res = json.loads(a.out.read_text())
        return finish(res, a, tag, time.time() - res.get("seconds_total", 0))
    if a.threads:
        torch.set_num_threads(a.threads)
    t_start = time.time()
    if any(x.startswith("vit_tiny_patch4") for x in a.cross_archs + [a.arch]):
        B.register_small_vit()
    teachers = zoo_teachers(Path(a.zoo), a.quick)
    log(f"[fidelity] zoo: {[(t['name'], t['probe_accuracy'], t['uniformity']) for t in teachers]}")
    res = {"settings": {k: (str(v) if isinstance(v, Path) else sorted(v) if isinstance(v, set) else v)
                        for k, v in vars(a).items()},
           "machine": machine(), "runs": {}, "optimize": {}}
    res["uniformity_vs_accuracy"] = uniformity_vs_accuracy(teachers)

    x_unl, y_unl = fashion_mnist_split("unlabeled")
    sets = OptimizedSets(a, optimize_specs(a, teachers), a.pool or a.images or len(x_unl))
    n = a.images or len(x_unl)
    images = arrays_to_rgb(x_unl[:n], 32)
    labels = y_unl[:n]
    x_pub, y_pub = fashion_mnist_split("public")
    x_te, y_te = fashion_mnist_split("test")
    probe_x, probe_y = arrays_to_rgb(x_pub[:a.probe_images], 32), y_pub[:a.probe_images]
    test_x, test_y = arrays_to_rgb(x_te[:a.test_images], 32), y_te[:a.test_images]
    targets = {}

    def targets_for(name: str):
        """(row indices, targets) of an optimized dataset, optimizing it first when needed."""
        if name not in targets:
            start_ray()
            run, man = sets["coopt" if name == "noalign" else name]
            res["optimize"][name] = {"run": str(run), "best": man["best"], "participants": [
                {k: p[k] for k in ("name", "model", "uniformity", "aligned", "align_r2", "align_heldout_r2",
                                   "shared_rows")} for p in man["participants"]],
                "shared_rows": len(man.get("shared_ids", [])), "timings": man["timings"]}
            if name == "noalign":
                targets[name] = unaligned_targets(run, man)
                res["optimize"][name]["note"] = ("coopt's embeddings, unaligned, cut/zero-padded to the best "
                                                 "model's width")
            else:
                targets[name] = load_targets(run)
            idx, y = targets[name]
            keep = idx < n  # the pool may be larger than the training images
            targets[name] = idx[keep], y[keep]
            if keep.sum() != n:
                log(f"[fidelity] {name}: {n - keep.sum()} images had no target; training on the {keep.sum()} that do")
        return targets[name]

    def save():
        write_json(a.out, summarise(json.loads(json.dumps(res, default=float)), a))

    common = dict(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr)
    jobs = []  # (key, arch, method, data name)
    for seed in range(a.seeds):
        if "main" not in a.skip:  # skipped e.g. to add cross-architecture runs to an earlier result
            jobs.append(("random_init", a.arch, "random_init", None, seed))
            jobs += [("coopt", a.arch, "coopt", "coopt", seed), ("byol", a.arch, "byol", None, seed),
                     ("simclr", a.arch, "simclr", None, seed), ("supervised", a.arch, "supervised", None, seed)]
        if "ablations" not in a.skip:
            for k in ABLATIONS:
                jobs.append((k, a.arch, "coopt", k, seed))
        if "cross" not in a.skip:
            for arch in a.cross_archs:
                if arch == a.arch:
                    continue
                jobs += [(f"cross/{arch}/random_init", arch, "random_init", None, seed),
                         (f"cross/{arch}/coopt", arch, "coopt", "coopt", seed),
                         (f"cross/{arch}/byol", arch, "byol", None, seed)]
    if a.methods:
        jobs = [j for j in jobs if j[0] in a.methods]
    for key, arch, method, data, seed in jobs:
        prober = B.Prober(probe_x, probe_y, test_x, test_y, epochs=a.probe_epochs, seed=seed)
        if key in ABLATIONS:
            prober = FinalProbe(prober, a.epochs)
        t0 = time.time()
        if method == "random_init":
            acc = B.random_init_accuracy(arch, 32, seed, prober)
            hist = [{"epoch": e, "loss": None, "train_seconds": 0.0, "probe_accuracy": acc} for e in range(a.epochs + 1)]
        elif method == "coopt":
            idx, y = targets_for(data)
            _, hist = B.train_coopt(arch, images[idx], y, seed=seed, whiten=a.whiten, probe=prober, log=log,
                                   **common)
        elif method == "byol":
            _, hist = B.train_byol(arch, images, seed=seed, probe=prober, log=log, **common)
        elif method == "simclr":
            _, hist = B.train_simclr(arch, images, seed=seed, probe=prober, log=log, **common)
        else:
            _, hist = B.train_supervised(arch, images, labels, seed=seed, probe=prober, log=log, **common)
        res["runs"].setdefault(key, {})[str(seed)] = hist
        log(f"[fidelity] {key} seed {seed}: final {hist[-1]['probe_accuracy']:.4f} ({time.time() - t0:.0f}s)")
        save()
    return finish(res, a, tag, t_start)


def finish(res: dict, a, tag: str, t_start: float) -> dict:
    """Summary, cross-architecture table and plots; writes the result JSON."""
    res = summarise(json.loads(json.dumps(res, default=float)), a)
    cross = {}
    for arch in a.cross_archs:
        for meth in ("coopt", "byol", "random_init"):
            key = meth if arch == a.arch else f"cross/{arch}/{meth}"
            if res.get(key):
                cross.setdefault(arch, {})[meth] = res[key]
    res["cross_arch"] = cross
    res["seconds_total"] = round(time.time() - t_start, 1)
    res["plots"] = plot(res, a.out.parent, tag)
    write_json(a.out, res)
    log(f"[fidelity] done in {res['seconds_total']:.0f}s -> {a.out}")
    for k in ("coopt", "byol", "simclr", "supervised", "random_init", "noalign", "central", "worst",
              *SHARED_FRACTIONS):
        if res.get(k):
            log(f"  {k:12s} {res[k]['mean']:.4f} ± {res[k]['std']:.4f}")
    log(f"  goals: {res['goals']}")
    log(f"  time_to_byol_final: {res.get('time_to_byol_final')}")
    return res


if __name__ == "__main__":
    main()
