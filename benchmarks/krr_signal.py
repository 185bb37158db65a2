"""KRR-ST, checked step by step (issue 29): does the distillation write a signal, and can a student read it?

Per seed, side by side in one run:
1. **Signal before students.** The product's distill stage (``run_distill``) runs on the optimized set minus
   ``--heldout`` rows it never draws. Its drift (X_s in pixels of 255, Y_s in target stds) is set beside the
   random-walk floor ``sqrt(sum lr_t^2)``; the KRR loss on the held-out rows is measured under ``--eval-models``
   freshly initialised pool ConvNets for the starting rows (X_0, Y_0), the distilled rows (X_s, Y_s) and M random
   rows with their targets.
2. **Students.** Each recipe trains the same number of optimizer steps on every variant, then the linear probe
   (trained on t10k[5000:5000+P], tested on t10k[0:T]: images no teacher, student or distillation saw):
   ``mse``: the pool architecture with MSE on un-augmented images (the reference's pre-training); ``product``:
   ``student.loss: cos`` with RELA's augmentations, as ``coopt train``. Variants: ``distilled``; ``paired`` (the
   distillation's own starting rows with their own targets); ``random`` (M other random rows with targets);
   ``whole`` (every step a fresh batch of the whole training set: the headroom); ``labeled_random`` (the paper's
   "Random": cross-entropy on M random labelled images, once per seed); ``random_init``; and, when ``--variants``
   names them, ``images_only`` (the learned images with the starting rows' targets) and ``targets_only`` (the
   starting images with the learned targets).

CPU protocol (2 cores, about 15 min a seed: 8-9 for the distillation, 5 for the labelled "Random"; settings in the JSON):
    python benchmarks/krr_signal.py --run runs/demo-s7 --seeds 3 --recipes mse
The M = 10 levers (results/levers/krr_signal_m10*.json, 3 seeds, about 23 min each; then the product recipe and the
halves of the distilled set on the trained-pool run, about 25 min more):
    python benchmarks/krr_signal.py --run runs/demo-s7 --size 10 --recipes mse --work runs/bench-krr-m10 \
        --out benchmarks/results/levers/krr_signal_m10.json
    python benchmarks/krr_signal.py --run runs/demo-s7 --size 10 --pool-steps 300 --recipes mse \
        --work runs/bench-krr-m10-pool300 --out benchmarks/results/levers/krr_signal_m10_pool300.json
    python benchmarks/krr_signal.py --run runs/demo-s7 --size 10 --pool-steps 300 --recipes mse,product --merge \
        --variants distilled,paired,random,whole,random_init,images_only,targets_only \
        --work runs/bench-krr-m10-pool300 --out benchmarks/results/levers/krr_signal_m10_pool300.json
GPU protocol (a device machine): ``--use-gpu --pool-width 128 --steps 20000 --eval-models 20``.
Smoke check: ``--quick`` (1 seed, M=20, 30 steps, ~2 min). Writes benchmarks/results/krr_signal[_quick].json
and .png. The committed run is the CPU protocol; its seed 0 distillation came from a ``--signal-only`` run in the
same ``--work`` (a finished distillation is reused). Drift against the floor is a matter of steps and lr: Adam's
noise walk grows as lr * sqrt(steps) and the signal as lr * steps until X_s reaches its optimum (about 8/255 from the
start here), so 3,000 steps at lr 3e-4 reach it with a third of the floor of 1,000 steps at 1e-3
(results/levers/krr_signal_steps1000_lr1e-3.json: 1.48-1.65x; 3,000 steps at 1e-3: 1.41x).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np

from common import RESULTS, ROOT, FinalProbe, log, machine, read_rows, start_ray, write_json

from coopt_ray import baselines as B  # noqa: E402
from coopt_ray.config import load_config  # noqa: E402
from coopt_ray.data import fashion_mnist_split  # noqa: E402
from coopt_ray.images import arrays_to_rgb  # noqa: E402

VARIANTS = ("distilled", "paired", "random", "whole")
# Only when --variants names them: which half of the distilled set a student reads (the learned images with the
# starting rows' own targets; the starting images with the learned targets).
SWAPS = ("images_only", "targets_only")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--run", default=str(ROOT / "runs" / "demo"), help="an optimized run (make demo's runs/demo)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0, help="run seeds first-seed .. seeds-1")
    ap.add_argument("--merge", action="store_true", help="keep the seeds already in --out (another run's) and add these")
    ap.add_argument("--size", type=int, default=100, help="M synthetic rows")
    ap.add_argument("--steps", type=int, default=3000, help="distillation outer steps")
    ap.add_argument("--lr", type=float, default=3e-4, help="AdamW lr on X_s and Y_s")
    ap.add_argument("--lr-final", type=float, default=1e-3, help="LinearLR end factor (the product default)")
    ap.add_argument("--real-batch", type=int, default=1024)
    ap.add_argument("--real-augment", choices=("true", "false"), default="true")
    ap.add_argument("--channels", default="auto", help="1, 3 or auto (distill.channels)")
    ap.add_argument("--pool-size", type=int, default=4)
    ap.add_argument("--pool-width", type=int, default=16)
    ap.add_argument("--pool-steps", type=int, default=0)
    ap.add_argument("--workers", type=int, default=0, help="distill.workers (0: in the driver)")
    ap.add_argument("--heldout", type=int, default=2000, help="real rows the distillation never draws")
    ap.add_argument("--eval-models", type=int, default=20, help="fresh pool ConvNets for the held-out KRR loss")
    ap.add_argument("--recipes", default="mse,product")
    ap.add_argument("--signal-only", action="store_true", help="step 1 only: the distillation and its signal")
    ap.add_argument("--variants", default=",".join(VARIANTS + ("random_init", "labeled_random")),
                    help="the student variants to train (a lever on the students alone: skip the 5-min labelled one; "
                         f"add {' and '.join(SWAPS)} to see which half of the distilled set a student reads)")
    ap.add_argument("--student-steps", type=int, default=400, help="optimizer steps per student (every variant)")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--student-lr", type=float, default=1e-3)
    ap.add_argument("--product-arch", default="resnet10t")
    ap.add_argument("--probe-images", type=int, default=2000)
    ap.add_argument("--test-images", type=int, default=2000)
    ap.add_argument("--probe-epochs", type=int, default=100)
    ap.add_argument("--use-gpu", action="store_true")
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench-krr-signal"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--replot", action="store_true", help="only re-summarise and re-plot --out")
    a = ap.parse_args(argv)
    if a.quick:
        a.seeds, a.size, a.steps, a.real_batch, a.heldout, a.eval_models = 1, 20, 30, 128, 300, 3
        a.student_steps, a.batch_size, a.probe_images, a.test_images, a.probe_epochs = 20, 20, 300, 300, 10
        a.work = a.work + "-quick"
    a.channels = a.channels if a.channels == "auto" else int(a.channels)
    a.out = Path(a.out or RESULTS / f"krr_signal{'_quick' if a.quick else ''}.json")
    return a


def split_heldout(run: Path, work: Path, n_heldout: int) -> tuple[Path, list[str]]:
    """``work/optimized``: RUN/optimized without ``n_heldout`` rows (a fixed draw, the same for every seed), and
    their ids; ``work/manifest.json`` links RUN's."""
    import pyarrow.parquet as pq

    from coopt_ray.rundir import write_parts_atomic

    t = pq.read_table(str(run / "optimized"))
    ids = t.column("id").to_pylist()
    held = set(np.asarray(ids)[np.random.default_rng(2929).choice(len(ids), n_heldout, replace=False)].tolist())
    train = work / "optimized"
    if not train.exists():
        keep = np.array([i not in held for i in ids])
        write_parts_atomic(train, t.filter(keep))
    if not (work / "manifest.json").exists():
        os.symlink((run / "manifest.json").resolve(), work / "manifest.json")
    return train, sorted(held)


def distill_once(a, work: Path, seed: int) -> dict:
    from coopt_ray.distill.stage import run_distill

    run = Path(a.run)
    cfg = load_config(run / "config.yaml")
    d = dataclasses.replace(cfg.distill, size=a.size, steps=a.steps, lr=a.lr, lr_final=a.lr_final,
                            real_batch=a.real_batch, pool_size=a.pool_size, pool_width=a.pool_width,
                            pool_steps=a.pool_steps, real_augment=a.real_augment == "true", channels=a.channels,
                            workers=a.workers, use_gpu=a.use_gpu, checkpoint_every=max(50, a.steps // 5),
                            log_every=max(1, a.steps // 30))
    start_ray()
    return run_distill(dataclasses.replace(cfg, seed=seed, distill=d), work, log=log)


def heldout_losses(a, sets: dict, held: dict, y_all: np.ndarray, seed: int) -> dict:
    """Held-out KRR loss (mean and per model) of each (images, raw targets) set, standardised as the stage does."""
    import torch

    from coopt_ray.augment import normalize_pixels, to_float_nchw
    from coopt_ray.distill.krr_st import heldout_krr_loss
    from coopt_ray.student import standardise, target_transform

    mean, proj = target_transform(y_all)
    scale = np.diag(proj).astype(np.float32)

    def px(imgs):
        return normalize_pixels(to_float_nchw(torch.from_numpy(imgs)))

    xr, yr = px(held["image"]), torch.from_numpy(standardise(held["target"], mean, scale))
    out = {}
    for name, (imgs, tg) in sets.items():
        per = heldout_krr_loss(px(imgs), torch.from_numpy(standardise(tg, mean, scale)), xr, yr,
                               models=a.eval_models, width=a.pool_width, seed=10_000 + seed)
        out[name] = {"mean": float(np.mean(per)), "per_model": [round(v, 6) for v in per]}
    return out


def student_arch(a, recipe: str) -> str:
    """The ``mse`` recipe pre-trains the pool's own ConvNet; the others ``--product-arch``."""
    return f"convnet3_w{a.pool_width}" if recipe == "mse" else a.product_arch


def student(a, recipe: str, imgs: np.ndarray, tg, seed: int, prober, labels=None) -> tuple[float, float]:
    """Probe accuracy and train seconds of one student: ``--student-steps`` steps of ``--batch-size`` on ``imgs``
    (fewer rows than steps x batch: epochs over them; more: one pass over the first steps x batch)."""
    arch = student_arch(a, recipe)
    batch = min(a.batch_size, len(imgs))
    epochs = max(1, round(a.student_steps * batch / len(imgs)))
    imgs, tg = imgs[:a.student_steps * batch], None if tg is None else tg[:a.student_steps * batch]
    dev = B.pick_device(a.use_gpu)
    probe = FinalProbe(prober, epochs)
    if labels is not None:
        _, hist = B.train_supervised(arch, imgs, labels[:len(imgs)], epochs, batch_size=batch, lr=a.student_lr,
                                     seed=seed, probe=probe, log=lambda m: None, device=dev)
    else:
        _, hist = B.train_coopt(arch, imgs, tg, epochs, batch_size=batch, lr=a.student_lr, seed=seed, probe=probe,
                                log=lambda m: None, augment=recipe != "mse", loss="mse" if recipe == "mse" else "cos",
                                device=dev)
    return hist[-1]["probe_accuracy"], hist[-1]["train_seconds"]


def _ms(v):
    v = [x for x in v if x is not None]
    return {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)} if v else None


def summarise(res: dict) -> dict:
    """Means over seeds, and issue 29's goals."""
    seeds = list(res["seeds"].values())
    sig = {k: _ms([s["signal"][k] for s in seeds if k in s.get("signal", {})])
           for k in ("heldout_fall", "x_over_floor", "y_over_floor", "x_drift", "floor_pixels", "loss_initial",
                     "loss_distilled", "loss_random")}
    acc = {}
    for s in seeds:
        for r in s.get("students", []):
            acc.setdefault(r["recipe"], {}).setdefault(r["variant"], []).append(r["probe_accuracy"])
    table = {rc: {v: _ms(x) for v, x in d.items()} for rc, d in acc.items()}
    goals = {"heldout_fall_10pct": bool(sig["heldout_fall"] and sig["heldout_fall"]["mean"] >= 0.10),
             "drift_2x_floor": bool(sig["x_over_floor"] and sig["x_over_floor"]["mean"] >= 2.0)}
    for rc, t in table.items():
        d, p, w = t.get("distilled"), t.get("paired"), t.get("whole")
        if not (d and p):
            continue
        gain = d["mean"] - p["mean"]
        g = {"distilled_minus_paired_points": round(100 * gain, 2),
             "seeds": min(d["n"], p["n"]),
             "spread_points": round(100 * max(d["std"], p["std"]), 2) if min(d["n"], p["n"]) >= 2 else None,
             "beats_paired_beyond_spread": bool(d["n"] >= 2 and gain > max(d["std"], p["std"]))}
        if w:
            span = w["mean"] - p["mean"]
            g["gap_closed"] = round(gain / span, 3) if span > 0 else None
            g["closes_half_the_gap"] = bool(span > 0 and gain / span >= 0.5)
        goals[rc] = g
    res["summary"] = {"signal": sig, "table": table, "goals": goals}
    return res


def plot(res: dict, out: Path) -> None:
    """Left: the held-out KRR loss of each seed's starting, distilled and random rows. Right: the students."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    seeds = sorted(res["seeds"])
    for j, (k, name) in enumerate((("loss_initial", "starting rows"), ("loss_distilled", "distilled"),
                                   ("loss_random", "M random rows"))):
        ax[0].bar([int(s) + 0.27 * (j - 1) for s in seeds], [res["seeds"][s]["signal"][k] for s in seeds], 0.27,
                  label=name)
    ax[0].set(xlabel="seed", ylabel="KRR loss on held-out rows (fresh ConvNets)", title="signal before students")
    ax[0].legend(fontsize=8)
    labels, means, stds = [], [], []
    for rc, t in res["summary"]["table"].items():
        for v, m in t.items():
            labels.append(f"{rc}/{v}"), means.append(100 * m["mean"]), stds.append(100 * m["std"])
    ax[1].barh(range(len(labels)), means, xerr=stds)
    ax[1].set_yticks(range(len(labels)), labels, fontsize=7)
    ax[1].set(xlabel="linear-probe accuracy %", xlim=(min(means + [100]) - 2, max(means + [0]) + 1))
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


def main(argv=None) -> dict:
    import torch

    a = parse_args(argv)
    if a.replot:
        res = summarise(json.loads(a.out.read_text()))
        write_json(a.out, res)
        plot(res, a.out)
        return res
    t0 = time.time()
    run, work = Path(a.run), Path(a.work)
    if not (run / "manifest.json").exists():
        raise SystemExit(f"{run} has no optimized set: run `make demo` (or pass --run an optimized RUN)")
    work.mkdir(parents=True, exist_ok=True)
    train_dir, held_ids = split_heldout(run, work, a.heldout)
    log(f"[krr-signal] {a.heldout} held-out rows; reading the training rows of {train_dir}")
    labeled = ("id", "image", "target", "label")
    train = read_rows(train_dir, columns=labeled)
    held = read_rows(run / "optimized", held_ids, columns=labeled)
    x_te, y_te = fashion_mnist_split("test")
    prober_args = (arrays_to_rgb(x_te[5000:5000 + a.probe_images], 32), y_te[5000:5000 + a.probe_images],
                   arrays_to_rgb(x_te[:a.test_images], 32), y_te[:a.test_images])
    res = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
           "machine": machine(), "train_rows": len(train["id"]), "heldout_rows": len(held_ids), "seeds": {}}
    if a.merge and a.out.exists():  # earlier seeds of the same protocol (their settings stay in "runs_settings")
        old = json.loads(a.out.read_text())
        res["seeds"], res["runs_settings"] = old["seeds"], old.get("runs_settings", [old["settings"]])
        res["runs_settings"].append(res["settings"])

    def save():
        write_json(a.out, summarise(res))

    pos = {v: j for j, v in enumerate(train["id"])}
    for seed in range(a.first_seed, a.seeds):
        torch.manual_seed(seed)
        sw = work / f"s{seed}"
        sw.mkdir(exist_ok=True)
        for name in ("optimized", "manifest.json"):
            if not (sw / name).exists():
                os.symlink((work / name).resolve(), sw / name)
        dres = distill_once(a, sw, seed)
        dist = read_rows(Path(dres["data"]), columns=("id", "image", "target", "init_id"))
        init = [pos[i] for i in dist["init_id"]]
        rng = np.random.default_rng(50_000 + seed)
        others = np.setdiff1d(np.arange(len(train["id"])), init)
        rand = np.sort(rng.choice(others, a.size, replace=False))
        whole = rng.permutation(len(train["id"]))
        sets = {"initial": (train["image"][init], train["target"][init]), "distilled": (dist["image"], dist["target"]),
                "random": (train["image"][rand], train["target"][rand])}
        hl = heldout_losses(a, sets, held, train["target"], seed)
        dr = dres.get("drift", {})
        sig = {"loss_initial": hl["initial"]["mean"], "loss_distilled": hl["distilled"]["mean"],
               "loss_random": hl["random"]["mean"],
               "heldout_fall": 1 - hl["distilled"]["mean"] / hl["initial"]["mean"], **dr}
        kept = res["seeds"].get(str(seed), {}).get("students", [])  # --merge: students already trained
        res["seeds"][str(seed)] = {"distill": {k: dres[k] for k in ("seconds", "distill_seconds", "loss", "loss_steps",
                                                                     "channels", "plan")},
                                   "heldout": hl, "signal": sig, "students": kept}
        log(f"[krr-signal] seed {seed}: held-out KRR loss {sig['loss_initial']:.4f} -> {sig['loss_distilled']:.4f} "
            f"({100 * sig['heldout_fall']:+.1f} % fall; random rows {sig['loss_random']:.4f}); drift "
            f"{dr.get('x_drift', float('nan')):.2f}/255 = {dr.get('x_over_floor', float('nan')):.2f}x the floor")
        save()
        if a.signal_only:
            continue
        prober = B.Prober(*prober_args, epochs=a.probe_epochs, seed=seed)
        data = {"distilled": (dist["image"], dist["target"]), "paired": sets["initial"], "random": sets["random"],
                "whole": (train["image"][whole], train["target"][whole]),
                "images_only": (dist["image"], sets["initial"][1]), "targets_only": (sets["initial"][0], dist["target"])}
        jobs = [(rc, v) for rc in a.recipes.split(",") for v in VARIANTS + SWAPS + ("random_init",)] + [
            ("labels", "labeled_random")]
        done = {(r["recipe"], r["variant"]) for r in kept}
        wanted = set(a.variants.split(","))
        for rc, v in [j for j in jobs if j not in done and j[1] in wanted]:
            if v == "random_init":
                acc, secs = B.random_init_accuracy(student_arch(a, rc), 32, seed, prober), 0.0
            elif v == "labeled_random":
                acc, secs = student(a, "product", train["image"][rand], None, seed, prober, labels=train["label"][rand])
            else:
                acc, secs = student(a, rc, *data[v], seed, prober)
            res["seeds"][str(seed)]["students"].append({"recipe": rc, "variant": v, "probe_accuracy": acc,
                                                        "train_seconds": secs})
            log(f"[krr-signal] seed {seed} {rc}/{v}: probe {acc:.4f} ({secs:.0f}s)")
            save()
    res["seconds_total"] = round(time.time() - t0, 1)
    save()
    plot(summarise(res), a.out)
    log(f"[krr-signal] wrote {a.out} in {res['seconds_total']:.0f}s")
    return res


if __name__ == "__main__":
    main()
