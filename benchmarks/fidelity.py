"""Fidelity benchmark: CoOpt vs BYOL / SimCLR / supervised / random init, ablations, levers, cross-architecture.

Every method trains the same student architecture on the same unlabeled images for the same epochs in the same
in-process loop (``coopt_ray.baselines.fit``), with the same augmentation code and crop scale
(``augment.BatchAugment``), and is scored by the same linear probe. Each main method gets a learning-rate sweep on
seed 0 (``--lrs``; SimCLR also at batch ``--simclr-batch``); the setting with the best final seed-0 accuracy is
then run on the other seeds, and that is the number reported (the sweep is in the JSON). The probe trains on
labeled images from the tail of the unlabeled split, which neither the teachers (trained on public train[0:10k])
nor any student (the first ``--images`` of the pool) saw, and tests on t10k.

    python benchmarks/fidelity.py --quick          # 1 seed, 1 lr, small data, tiny student (~4 min with ./zoo built)
    python benchmarks/fidelity.py --seeds 3 --images 1000 --pool 50000 --epochs 6 --arch resnet10t \
        --batch-size 64 --probe-images 1000 --test-images 1000 --probe-epochs 50 --cross-seeds 1 \
        --cross-archs resnet10t,mobilenetv3_small_100,test_vit   # the committed CPU-sized run (~75 min)

GPU protocol (a device machine): the defaults without --quick (50k images, resnet18, 20 epochs, 3 seeds), plus
--use-gpu (every student trains on CUDA, baselines.pick_device; no usable GPU is an error, never a CPU run).
Writes benchmarks/results/fidelity[_quick].json and PNG plots next to it.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from common import RESULTS, ROOT, FinalProbe, log, machine, optimize_config, start_ray, write_json, zoo_teachers

import fidelity_targets as FT
from fidelity_summary import ABLATION_KEYS, MAIN, plot, summarise, uniformity_vs_accuracy

from coopt_ray import baselines as B  # noqa: E402
from coopt_ray.config import BOOL_OR, STUDENT_LOSSES  # noqa: E402
from coopt_ray.data import fashion_mnist_split, shared_size  # noqa: E402
from coopt_ray.images import arrays_to_rgb  # noqa: E402

SHARED_FRACTIONS = {"shared_0.2": 0.002, "shared_1": 0.01}
LABEL_FREE_ZOO = "zoo-label-free"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 seed, one lr, small data, tiny student")
    ap.add_argument("--seeds", type=int, help="number of seeds (default 3, quick 1)")
    ap.add_argument("--images", type=int, help="unlabeled training images (default all 50k, quick 2,000)")
    ap.add_argument("--pool", type=int, help="unlabeled images the optimize stage runs on (default: --images); "
                    "the students train on the first --images of them, so shared-subset fractions are of the pool")
    ap.add_argument("--epochs", type=int, help="student epochs (default 20, quick 4)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 256, quick 128")
    ap.add_argument("--arch", help="student architecture (default resnet18, quick test_vit)")
    ap.add_argument("--cross-archs", help="comma list for cross-architecture reuse")
    ap.add_argument("--cross-seeds", type=int, help="seeds for the cross-architecture runs (default --seeds)")
    ap.add_argument("--probe-images", type=int, help="labeled probe-train images from the unlabeled split's tail "
                    "(default 10,000, quick 1,000)")
    ap.add_argument("--test-images", type=int, help="test images (default 10,000, quick 1,000)")
    ap.add_argument("--probe-epochs", type=int, help="linear-probe epochs (default 100, quick 30)")
    ap.add_argument("--lrs", help="comma list of AdamW learning rates swept on seed 0 for every main method "
                    "(default 3e-4,1e-3,3e-3; quick 1e-3)")
    ap.add_argument("--simclr-batch", type=int, default=None, help="SimCLR is also swept at this batch size "
                    "(default 256; quick: off)")
    ap.add_argument("--crop-min", type=float, default=0.5, help="RandomResizedCrop scale (crop_min, 1), all methods")
    ap.add_argument("--whiten", action="store_true", help="CoOpt students regress PCA-whitened targets")
    ap.add_argument("--phi-s", action="store_true", help="CoOpt students regress PHI-S-standardised targets")
    ap.add_argument("--loss", default="cos", choices=STUDENT_LOSSES,
                    help="the CoOpt students' loss (student.loss)")
    ap.add_argument("--augment", default="true", choices=("true", "false", *BOOL_OR["student.augment"]),
                    help="the CoOpt students' augmentation (student.augment; the baselines keep theirs)")
    ap.add_argument("--methods", default="", help="comma list: train only these result keys (default all)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--zoo", default=str(ROOT / "zoo"), help="teacher zoo folder (built if missing)")
    ap.add_argument("--work", default=None, help="optimize runs go here (default runs/bench-fidelity[-quick])")
    ap.add_argument("--out", default=None, help="result JSON (default benchmarks/results/fidelity[_quick].json)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: main, ablations, cross")
    ap.add_argument("--replot", action="store_true", help="only re-summarise and re-plot the result JSON")
    ap.add_argument("--use-gpu", action="store_true", help="train every student on CUDA (the GPU protocol)")
    a = ap.parse_args(argv)
    q = a.quick
    d = dict(seeds=1 if q else 3, images=2000 if q else None, epochs=4 if q else 20, batch_size=128 if q else 256,
             arch="test_vit" if q else "resnet18",
             cross_archs=("test_vit,mobilenetv3_small_050" if q else "resnet18,mobilenetv3_small_100,vit_tiny_patch4_32"),
             probe_images=1000 if q else 10_000, test_images=1000 if q else 10_000, probe_epochs=30 if q else 100,
             lrs="1e-3" if q else "3e-4,1e-3,3e-3", simclr_batch=0 if q else 256)
    for k, v in d.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.cross_seeds = a.cross_seeds or a.seeds
    tag = "_quick" if q else ""
    a.work = Path(a.work or ROOT / "runs" / f"bench-fidelity{tag.replace('_', '-')}")
    a.out = Path(a.out or RESULTS / f"fidelity{tag}.json")
    a.cross_archs = [s for s in a.cross_archs.split(",") if s]
    a.lrs = [float(s) for s in str(a.lrs).split(",") if s]
    a.skip = {s for s in a.skip.split(",") if s}
    a.methods = {s for s in a.methods.split(",") if s}
    if a.pool is not None and a.images is not None and a.pool < a.images:
        ap.error(f"--pool {a.pool} is smaller than --images {a.images}")
    return a


# ---------------------------------------------------------------- optimized datasets
def label_free_teachers(a) -> list[dict]:
    """Four teachers with the zoo's architectures, trained on the public split with captions made from pixel
    statistics (``zoo.pixel_stat_captions``), never from labels."""
    from coopt_ray.zoo import ZOO_SPECS, build_zoo

    specs = [dict(s, name=s["name"].replace("clip-tiny", "free"), captions="pixel-stats") for s in ZOO_SPECS[:4]]
    return build_zoo(ROOT / "runs" / LABEL_FREE_ZOO, specs=specs, progress=log)


def optimize_specs(a, teachers: list[dict]) -> dict:
    """``{name: optimize_config kwargs}`` for every optimized dataset the benchmark trains on."""
    by_acc = sorted(teachers[:4], key=lambda t: t["probe_accuracy"])
    worst, best = by_acc[0], by_acc[-1]
    specs = {"coopt": dict(teachers=teachers[:4])}
    if "ablations" not in a.skip:
        specs["central"] = dict(teachers=[best])
        specs["worst"] = dict(teachers=[worst])
        specs["loo"] = dict(teachers=teachers[:4], select="loo")
        specs["labelfree"] = dict(teachers=None)  # resolved when first needed (builds the label-free zoo)
        for name, frac in SHARED_FRACTIONS.items():
            specs[name] = dict(teachers=teachers[:4], shared_fraction=frac, shared_min=2)
            specs[f"loo_{name}"] = dict(teachers=teachers[:4], shared_fraction=frac, shared_min=2, select="loo")
        for t in teachers[:4]:  # heads_all: every teacher on every image (the best one's is central's run)
            specs[f"solo_{t['name']}"] = dict(teachers=[t])
    return specs


class OptimizedSets:
    """Runs ``run_optimize`` for a dataset the first time it is needed; reuses embeddings across align variants."""

    def __init__(self, a, specs: dict, pool_size: int):
        self.a, self.specs, self.pool_size, self.runs, self.by_fp, self.by_emb = a, specs, pool_size, {}, {}, {}

    def __getitem__(self, name: str):
        if name not in self.runs:
            spec = dict(self.specs[name])
            if spec["teachers"] is None:
                spec["teachers"] = label_free_teachers(self.a)
            self.runs[name] = self._optimize(name, spec)
        return self.runs[name]

    def _optimize(self, name: str, spec: dict):
        from coopt_ray.pipeline import run_optimize

        a, runs, by_fp, by_emb = self.a, self.runs, self.by_fp, self.by_emb
        cfg = optimize_config(limit=a.pool or a.images, **spec)
        s = shared_size(self.pool_size, cfg.shared.fraction, cfg.shared.min)
        fp = f"{cfg.fingerprint('seed', 'data', 'participants', 'score', 'align')}/S{s}"
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
        return run, man, cfg, spec["teachers"]


# ---------------------------------------------------------------- jobs
def sweep_settings(a, method: str) -> list[tuple[float, int]]:
    grid = [(lr, a.batch_size) for lr in a.lrs]
    if method == "simclr" and a.simclr_batch and a.simclr_batch != a.batch_size:
        grid += [(lr, a.simclr_batch) for lr in a.lrs if lr >= 1e-3]
    return grid


def setting_key(method: str, lr: float, bs: int) -> str:
    return f"sweep/{method}/lr{lr:g}/b{bs}"


def chosen_setting(res: dict, a, method: str) -> tuple[float, int]:
    """The swept setting with the best final seed-0 accuracy (the default lr / batch if none ran)."""
    done = [(res["runs"][setting_key(method, lr, bs)]["0"][-1]["probe_accuracy"], lr, bs)
            for lr, bs in sweep_settings(a, method) if setting_key(method, lr, bs) in res["runs"]]
    if not done:
        return a.lrs[len(a.lrs) // 2], a.batch_size
    _, lr, bs = max(done, key=lambda t: (t[0], -abs(t[1] - 1e-3)))
    return lr, bs


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
           "machine": machine(), "runs": {}, "optimize": {}, "chosen": {},
           "probe_protocol": "probe-train: the last --probe-images of the unlabeled split (labels never seen by a "
                             "teacher or a student); test: the first --test-images of t10k"}
    res["uniformity_vs_accuracy"] = uniformity_vs_accuracy(teachers)

    x_unl, y_unl = fashion_mnist_split("unlabeled")
    sets = OptimizedSets(a, optimize_specs(a, teachers), a.pool or a.images or len(x_unl))
    n = a.images or len(x_unl) - a.probe_images
    if n + a.probe_images > len(x_unl):
        raise SystemExit(f"--images {n} + --probe-images {a.probe_images} exceed the unlabeled split")
    images, labels = arrays_to_rgb(x_unl[:n], 32), y_unl[:n]
    x_te, y_te = fashion_mnist_split("test")
    probe_x, probe_y = arrays_to_rgb(x_unl[-a.probe_images:], 32), y_unl[-a.probe_images:]
    test_x, test_y = arrays_to_rgb(x_te[:a.test_images], 32), y_te[:a.test_images]
    targets = {}

    def targets_for(name: str):
        """(row indices, targets, weights) of a dataset, optimizing first when needed."""
        if name not in targets:
            start_ray()
            base = {"noalign": "coopt", "randproj": "coopt", "weighted": "loo", "heads_pp": "coopt",
                    "heads_both": "coopt", "heads_all": "coopt"}.get(name, name)
            run, man, cfg, used = sets[base]
            info = {"run": str(run), "best": man["best"], "participants": [
                {k: p.get(k) for k in ("name", "model", "uniformity", "coverage", "aligned", "align_r2",
                                       "align_heldout_r2", "align_ridge", "shared_rows")} for p in man["participants"]],
                "shared_rows": len(man.get("shared_ids", [])), "timings": man["timings"],
                "teachers_train_seconds": round(sum(t.get("train_seconds", 0) for t in used), 1)}
            w = heads = None
            if name == "noalign":
                idx, y, part = FT.unaligned_targets(run, man)
                info["note"] = "coopt's embeddings, unaligned, cut/zero-padded to the best model's width"
            elif name == "randproj":
                idx, y, part = FT.random_projection_targets(run, man)
                info["note"] = "coopt's embeddings, standardised per participant, fixed random projection"
            else:
                idx, y, part = FT.optimized_targets(run)
                FT.check_merged(run, man, y, idx, part)
                if name == "weighted":
                    w, per = FT.alignment_weights(run, cfg, man, part)
                    info["weights"] = {k: round(v, 4) for k, v in per.items()}
                if name in ("heads_pp", "heads_both"):
                    heads = dict(FT.head_targets(run, man, idx), aligned=name == "heads_both")
                    info["note"] = "student.heads: " + ("both" if heads["aligned"] else "per-participant")
                elif name == "heads_all":
                    solo = {t["name"]: sets[f"solo_{t['name']}"][:2] for t in used}
                    heads = FT.all_teacher_targets(solo, idx)
                    info["note"] = "every teacher on every image, one head each (not collaborative: RADIO's setting)"
            keep = idx < n  # the pool may be larger than the training images
            if keep.sum() != n:
                log(f"[fidelity] {name}: {n - keep.sum()} images had no target; training on the {keep.sum()} that do")
            res["optimize"][name] = info
            targets[name] = (idx[keep], y[keep], None if w is None else w[keep],
                             None if heads is None else FT.subset_heads(heads, keep))
        return targets[name]

    def save():
        write_json(a.out, summarise(json.loads(json.dumps(res, default=float)), a))

    def train(key, arch, method, data, seed, lr, bs, final_only):
        prober = B.Prober(probe_x, probe_y, test_x, test_y, epochs=a.probe_epochs, seed=seed)
        if final_only and method != "random_init":
            prober = FinalProbe(prober, a.epochs)
        kw = dict(epochs=a.epochs, batch_size=bs, lr=lr, seed=seed, probe=prober, log=log, crop_min=a.crop_min,
                  device=B.pick_device(a.use_gpu))
        t0 = time.time()
        if method == "random_init":
            acc = B.random_init_accuracy(arch, 32, seed, prober)
            hist = [{"epoch": e, "loss": None, "train_seconds": 0.0, "probe_accuracy": acc} for e in range(a.epochs + 1)]
        elif method == "coopt":
            idx, y, w, heads = targets_for(data)
            hist = B.train_coopt(arch, images[idx], y, whiten=a.whiten, weights=w, loss=a.loss, phi_s=a.phi_s, heads=heads,
                                 augment={"true": True, "false": False}.get(a.augment, a.augment), **kw)[1]
        elif method == "supervised":
            hist = B.train_supervised(arch, images, labels, **kw)[1]
        else:
            hist = getattr(B, f"train_{method}")(arch, images, **kw)[1]
        res["runs"].setdefault(key, {})[str(seed)] = hist
        log(f"[fidelity] {key} seed {seed} (lr {lr:g}, batch {bs}): final {hist[-1]['probe_accuracy']:.4f} "
            f"({time.time() - t0:.0f}s)")
        save()

    def want(key):
        return not a.methods or key in a.methods

    if "main" not in a.skip:
        for m in MAIN:  # seed-0 sweeps first: they decide every later run's setting
            for lr, bs in sweep_settings(a, m):
                if want(m) or want(setting_key(m, lr, bs)):
                    train(setting_key(m, lr, bs), a.arch, m, "coopt", 0, lr, bs, False)
            lr, bs = res["chosen"][m] = chosen_setting(res, a, m)
            if setting_key(m, lr, bs) in res["runs"]:
                res["runs"][m] = {"0": res["runs"][setting_key(m, lr, bs)]["0"]}
        for seed in range(a.seeds):
            if want("random_init"):
                train("random_init", a.arch, "random_init", None, seed, 0.0, a.batch_size, False)
            for m in MAIN:
                if seed > 0 and want(m):
                    train(m, a.arch, m, "coopt", seed, *res["chosen"][m], False)
    lr_c, bs_c = res["chosen"].get("coopt") or chosen_setting(res, a, "coopt")
    best_spec = sets.specs.get("central", {}).get("teachers")
    solo = [k for k in sets.specs if k.startswith("solo_") and sets.specs[k]["teachers"] != best_spec]
    for seed in range(a.seeds):
        if "ablations" not in a.skip:
            for k in (*ABLATION_KEYS, *solo):  # solo_<teacher>: one teacher labels every image (central: the best)
                if want(k):
                    train(k, a.arch, "coopt", k, seed, lr_c, bs_c, True)
    for seed in range(a.cross_seeds):
        if "cross" not in a.skip:
            for arch in a.cross_archs:
                if arch == a.arch:
                    continue
                for m in ("random_init", "coopt", "byol"):
                    lr, bs = (0.0, a.batch_size) if m == "random_init" else res["chosen"].get(m) or chosen_setting(res, a, m)
                    if want(f"cross/{arch}/{m}"):
                        train(f"cross/{arch}/{m}", arch, m, "coopt", seed, lr, bs, True)
    if "coopt" in res["optimize"]:
        c = res["optimize"]["coopt"]
        res["costs"] = {"teachers_train_seconds": c["teachers_train_seconds"],
                        "optimize_seconds": c["timings"]["total"], "pool": a.pool or n, "images": n,
                        "share": round(n / (a.pool or n), 4)}
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
    for k in (*MAIN, "random_init", *ABLATION_KEYS):
        if res.get(k):
            log(f"  {k:16s} {res[k]['mean']:.4f} ± {res[k]['std']:.4f}")
    log(f"  chosen: {res.get('chosen')}")
    log(f"  goals: {res['goals']}")
    log(f"  time_to_byol_final: {res.get('time_to_byol_final')}")
    return res


if __name__ == "__main__":
    main()
