"""Distillation benchmark (KRR-ST on the optimized set): what M distilled rows are worth as pre-training data.

Side by side in one run, per seed and per M: (a) a student pre-trained on the M distilled rows, (b) on M random
rows of RUN/optimized with their own targets (the same number of optimizer steps as (a)), (c) on the whole
optimized set, (d) random init. Every student is the product's (``baselines.train_coopt``: 1 - cos on
standardised targets, the same augmentation) and every backbone is scored by the same linear probe. The probe
trains on t10k[5000:5000+P] and tests on t10k[0:T]: images no teacher, student or distillation saw.
The distillation is the product's own stage (``coopt_ray.distill.stage.run_distill``, on Ray Train).

CPU protocol (the committed numbers, 2 cores; see the settings block of distill.json):
    python benchmarks/distill.py              # ~45 min with runs/demo (make demo) already optimized
GPU protocol (a device machine): the paper's distillation and a full pre-training budget:
    python benchmarks/distill.py --steps 20000 --lr 1e-4 --pool-width 128 --pool-size 10 --pool-steps 1000 \
        --real-batch 1024 --workers 1 --use-gpu --full-seeds 3 --steps-small convnet3_w128:20000,resnet10t:20000 \
        --epochs-full convnet3_w128:50,resnet10t:50 --archs convnet3_w128,resnet10t
    python benchmarks/distill.py --quick      # smoke check: 1 seed, M=50, tiny everything (~3 min)
Writes benchmarks/results/distill[_quick].json and distill[_quick].png.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

import numpy as np

from common import RESULTS, ROOT, FinalProbe, log, machine, read_rows, start_ray, write_json

from coopt_ray import baselines as B  # noqa: E402
from coopt_ray.config import load_config  # noqa: E402
from coopt_ray.data import fashion_mnist_split  # noqa: E402
from coopt_ray.images import arrays_to_rgb  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--run", default=str(ROOT / "runs" / "demo"), help="an optimized run (default runs/demo; "
                    "optimized with configs/fashion-mnist.yaml when missing)")
    ap.add_argument("--sizes", default="500,1000", help="M values")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--full-seeds", type=int, default=None, help="seeds for (c), the whole set (default: --seeds; "
                    "resnet10t's (c) is the costliest part of the CPU run)")
    ap.add_argument("--full-seeds-arch", default="resnet10t:1", help="per-arch override of --full-seeds "
                    "(an empty string: none)")
    ap.add_argument("--steps", type=int, default=300, help="distillation outer steps")
    ap.add_argument("--lr", type=float, default=3e-3, help="distillation AdamW lr (the paper: 1e-4 over 160k steps)")
    ap.add_argument("--pool-width", type=int, default=16)
    ap.add_argument("--pool-size", type=int, default=4)
    ap.add_argument("--pool-steps", type=int, default=100)
    ap.add_argument("--real-batch", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--use-gpu", action="store_true")
    ap.add_argument("--archs", default="convnet3_w16,resnet10t", help="students (the pool's ConvNet and resnet10t)")
    ap.add_argument("--steps-small", default="convnet3_w16:400,resnet10t:60",
                    help="optimizer steps on (a) and (b), per arch")
    ap.add_argument("--epochs-full", default="convnet3_w16:3,resnet10t:1", help="epochs of (c), per arch")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--student-lr", type=float, default=1e-3)
    ap.add_argument("--no-augment", action="store_true", help="students train on un-augmented images (KRR-ST's "
                    "pre-training recipe; student.augment: false) instead of the product's default augmentations")
    ap.add_argument("--probe-images", type=int, default=2000)
    ap.add_argument("--test-images", type=int, default=2000)
    ap.add_argument("--probe-epochs", type=int, default=100)
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench-distill"))
    ap.add_argument("--drift-only", action="store_true", help="only add to --out how far each distilled set moved "
                    "from its starting rows (pixels, targets)")
    ap.add_argument("--note", default="", help="what this run changes (lever runs: shown in docs/results.md's levers table)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.quick:
        a.sizes, a.seeds, a.steps, a.archs = "50", 1, 20, "convnet3_w16"
        a.steps_small, a.epochs_full, a.probe_images, a.test_images, a.probe_epochs = \
            "convnet3_w16:20", "convnet3_w16:1", 500, 500, 20
        a.work = a.work + "-quick"
    a.sizes = [int(s) for s in a.sizes.split(",")]
    a.archs = a.archs.split(",")
    a.steps_small = {k: int(v) for k, v in (x.split(":") for x in a.steps_small.split(","))}
    a.epochs_full = {k: int(v) for k, v in (x.split(":") for x in a.epochs_full.split(","))}
    fs = {k: int(v) for k, v in (x.split(":") for x in a.full_seeds_arch.split(",") if x)}
    a.full_seeds = {arch: fs.get(arch, a.seeds if a.full_seeds is None else a.full_seeds) for arch in a.archs}
    a.out = Path(a.out or RESULTS / f"distill{'_quick' if a.quick else ''}.json")
    return a


def ensure_optimized(run: Path) -> None:
    if (run / "manifest.json").exists():
        return
    from coopt_ray.pipeline import run_optimize

    log(f"[distill-bench] no optimized set in {run}: optimizing with configs/fashion-mnist.yaml")
    start_ray()
    run_optimize(load_config(ROOT / "configs" / "fashion-mnist.yaml"), run, log=log)


def distill(a, run: Path, size: int, seed: int) -> dict:
    """The product's distill stage on a work folder that links RUN/optimized (its own config and outputs)."""
    from coopt_ray.distill.stage import run_distill

    w = Path(a.work) / f"m{size}-s{seed}"
    w.mkdir(parents=True, exist_ok=True)
    for name in ("optimized", "manifest.json"):
        if not (w / name).exists():
            os.symlink((run / name).resolve(), w / name)
    cfg = load_config(run / "config.yaml")
    d = dataclasses.replace(cfg.distill, size=size, steps=a.steps, lr=a.lr, pool_width=a.pool_width,
                            pool_size=a.pool_size, pool_steps=a.pool_steps, real_batch=a.real_batch,
                            workers=a.workers, use_gpu=a.use_gpu, checkpoint_every=max(50, a.steps // 4),
                            log_every=max(1, a.steps // 20))
    cfg = dataclasses.replace(cfg, seed=seed, distill=d)
    start_ray()
    res = run_distill(cfg, w, log=log)
    return {**{k: res[k] for k in ("seconds", "distill_seconds", "loss", "loss_steps", "plan")},
            "dir": str(w / "distilled" / "krr-st" / "data")}


def drift(d: Path, run: Path) -> dict:
    """How far a distilled set moved from the real rows it started from: mean |pixel change| (of 255, at 32 px)
    and mean |target change| in units of the optimized set's per-dimension std."""
    r = read_rows(d, columns=("id", "image", "target", "init_id"))
    x, y, init = r["image"], r["target"], r["init_id"]
    o = read_rows(run / "optimized")
    oid, ox, oy = o["id"], o["image"], o["target"]
    pos = {v: j for j, v in enumerate(oid)}
    j = [pos[i] for i in init]
    return {"pixel_abs_change": round(float(np.abs(x.astype(float) - ox[j]).mean()), 3),
            "target_change_in_stds": round(float((np.abs(y - oy[j]) / np.maximum(oy.std(0), 1e-9)).mean()), 4)}


def add_drift(a) -> dict:
    import json

    res = json.loads(a.out.read_text())
    for v in res["distill"].values():
        v["drift"] = drift(Path(v["dir"]), Path(a.run))
    write_json(a.out, res)
    return res


def main(argv=None) -> dict:
    import torch

    a = parse_args(argv)
    if a.drift_only:
        return add_drift(a)
    t0 = time.time()
    run = Path(a.run)
    ensure_optimized(run)
    x_te, y_te = fashion_mnist_split("test")
    probe_x, probe_y = arrays_to_rgb(x_te[5000:5000 + a.probe_images], 32), y_te[5000:5000 + a.probe_images]
    test_x, test_y = arrays_to_rgb(x_te[:a.test_images], 32), y_te[:a.test_images]
    log(f"[distill-bench] reading {run / 'optimized'}")
    o = read_rows(run / "optimized")
    ids, images, targets = o["id"], o["image"], o["target"]
    res = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
           "machine": machine(), "rows": len(ids), "distill": {}, "runs": []}

    def save():
        write_json(a.out, summarise(res, a))

    def student(arch, variant, size, seed, imgs, tgts, steps=None, epochs=None):
        prober = B.Prober(probe_x, probe_y, test_x, test_y, epochs=a.probe_epochs, seed=seed)
        if variant == "random_init":
            acc, secs = B.random_init_accuracy(arch, 32, seed, prober), 0.0
        else:
            if steps is not None:  # (a) and (b): a fixed number of optimizer steps over the M rows
                epochs = max(1, round(steps * a.batch_size / len(imgs)))
            _, hist = B.train_coopt(arch, imgs, tgts, epochs, batch_size=min(a.batch_size, len(imgs)),
                                    lr=a.student_lr, seed=seed, probe=FinalProbe(prober, epochs), log=lambda m: None,
                                    augment=not a.no_augment, device=B.pick_device(a.use_gpu))
            acc, secs = hist[-1]["probe_accuracy"], hist[-1]["train_seconds"]
        res["runs"].append({"arch": arch, "variant": variant, "size": size, "seed": seed, "rows": len(imgs),
                            "epochs": epochs, "probe_accuracy": acc, "train_seconds": secs})
        log(f"[distill-bench] {arch} {variant} M={size} seed {seed}: probe {acc:.4f} ({secs:.0f}s train)")
        save()

    for seed in range(a.seeds):
        torch.manual_seed(seed)
        for size in a.sizes:
            key = f"m{size}-s{seed}"
            res["distill"][key] = distill(a, run, size, seed)
            save()
        for arch in a.archs:
            student(arch, "random_init", 0, seed, images[:1], None)
            for size in a.sizes:
                dr = read_rows(Path(res["distill"][f"m{size}-s{seed}"]["dir"]))
                dx, dy = dr["image"], dr["target"]
                student(arch, "distilled", size, seed, dx, dy, steps=a.steps_small[arch])
                pick = np.sort(np.random.default_rng(10_000 + seed).choice(len(ids), size, replace=False))
                student(arch, "random_subset", size, seed, images[pick], targets[pick], steps=a.steps_small[arch])
            if seed < a.full_seeds[arch]:
                student(arch, "whole_set", len(ids), seed, images, targets, epochs=a.epochs_full[arch])
    res["seconds_total"] = round(time.time() - t0, 1)
    for v in res["distill"].values():
        v["drift"] = drift(Path(v["dir"]), run)
    save()
    plot(summarise(res, a), a)
    log(f"[distill-bench] wrote {a.out} in {res['seconds_total']:.0f}s")
    return res


def _ms(v):
    v = [x for x in v if x is not None]
    return {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)} if v else None


def summarise(res: dict, a) -> dict:
    """Means and stds per (arch, variant, M), and the goals."""
    table, goals = {}, {}
    for arch in a.archs:
        rows = [r for r in res["runs"] if r["arch"] == arch]
        t = {}
        for r in rows:
            k = r["variant"] if r["variant"] in ("random_init", "whole_set") else f"{r['variant']}_{r['size']}"
            t.setdefault(k, {"acc": [], "secs": []})
            t[k]["acc"].append(r["probe_accuracy"])
            t[k]["secs"].append(r["train_seconds"])
        table[arch] = {k: {"accuracy": _ms(v["acc"]), "train_seconds": _ms(v["secs"])} for k, v in t.items()}
        g = {}
        for size in a.sizes:
            da, db = table[arch].get(f"distilled_{size}"), table[arch].get(f"random_subset_{size}")
            if da and db and da["accuracy"] and db["accuracy"]:
                gap = da["accuracy"]["mean"] - db["accuracy"]["mean"]
                g[f"a_minus_b_{size}"] = {"points": round(100 * gap, 2), "stds": [round(100 * da["accuracy"]["std"], 2),
                                          round(100 * db["accuracy"]["std"], 2)],
                                          "met": bool(gap >= 0.02 and gap > max(da["accuracy"]["std"],
                                                                                 db["accuracy"]["std"]))}
        c, d = table[arch].get("whole_set"), table[arch].get("random_init")
        top = f"distilled_{max(a.sizes)}"
        if c and d and table[arch].get(top) and c["accuracy"] and d["accuracy"]:
            span = c["accuracy"]["mean"] - d["accuracy"]["mean"]
            closed = (table[arch][top]["accuracy"]["mean"] - d["accuracy"]["mean"]) / span if span else float("nan")
            sub = table[arch].get(top.replace("distilled", "random_subset"))
            control = ((sub["accuracy"]["mean"] - d["accuracy"]["mean"]) / span if span and sub and sub["accuracy"]
                       else None)
            ratio = table[arch][top]["train_seconds"]["mean"] / max(c["train_seconds"]["mean"], 1e-9)
            g["gap_closed"] = {"fraction": round(closed, 3), "met": bool(closed >= 0.6),
                               "random_subset_fraction": None if control is None else round(control, 3)}
            g["time_ratio"] = {"fraction": round(ratio, 4), "met": bool(ratio <= 0.05)}
        goals[arch] = g
    dist = [v for v in res["distill"].values()]
    res["summary"] = {"table": table, "goals": goals,
                      "distill_seconds": _ms([v["seconds"] for v in dist]),
                      "distill_seconds_by_size": {str(m): _ms([v["seconds"] for k, v in res["distill"].items()
                                                               if k.startswith(f"m{m}-")]) for m in a.sizes},
                      "distill_loss_first_last": _ms([v["loss"][0] - v["loss"][-1] for v in dist])}
    return res


def plot(res: dict, a) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for key, v in res["distill"].items():
        ax[0].plot(v["loss_steps"], v["loss"], label=key)
    ax[0].set(xlabel="outer step", ylabel="KRR loss (mse, standardised targets)", title="KRR-ST distillation")
    ax[0].legend(fontsize=7)
    labels, means, stds = [], [], []
    for arch, t in res["summary"]["table"].items():
        for k, v in sorted(t.items()):
            if v["accuracy"]:
                labels.append(f"{arch}\n{k}"), means.append(100 * v["accuracy"]["mean"]), stds.append(100 * v["accuracy"]["std"])
    ax[1].barh(range(len(labels)), means, xerr=stds)
    ax[1].set_yticks(range(len(labels)), labels, fontsize=6)
    ax[1].set(xlabel="linear-probe accuracy %", xlim=(min(means + [100]) - 5, max(means + [0]) + 3))
    fig.tight_layout()
    fig.savefig(a.out.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()
