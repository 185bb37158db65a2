"""Labeled distillation benchmark (M-DATM, trajectory matching): what IPC images per class are worth on Fashion-MNIST.

Side by side in one run, per IPC: (a) M-DATM's synthetic set, made by the product's own stage
(``coopt_ray.distill.mdatm_stage.run_mdatm``: experts and matching as Ray tasks), against (b) random real images,
IPC per class, a fresh seeded draw per scorer run, and (c) the control: the real images the matching started from
(DATM's initialisation, images an expert classifies correctly), unchanged, so the matching's own gain shows. Both are scored by the same scorer (the ECCV 2024 challenge's:
a fresh ConvNet-3, SGD lr 0.01, momentum 0.9, wd 5e-4, DSA, lr / 10 at half; ``runs`` runs averaged) on the
t10k test split. The published ConvNet numbers are printed beside them as anchors, not measured here.
Also measured: the expert stage's speed-up from training experts in parallel (2 Ray workers of 1 CPU against
1 worker of 2 CPUs, the same experts), and its projection for E experts on G GPUs.

The experts are trained once (the stage's own ``run_experts``) and shared by the IPC runs, which then find them
done; the expert seconds are reported once and count towards every IPC's cost.

CPU protocol (the committed numbers, 2 cores, ~25 min):
    python benchmarks/distill_labeled.py
GPU protocol (a device machine; the paper's widths and lengths):
    python benchmarks/distill_labeled.py --full --use-gpu
    python benchmarks/distill_labeled.py --quick     # smoke check, ~1 min
    python benchmarks/distill_labeled.py --plot-only # the plot again from the JSON
Writes benchmarks/results/distill_labeled[_quick|_full].json and .png.
"""
from __future__ import annotations

import argparse
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from common import RESULTS, ROOT, fresh_dir, log, machine, start_ray, write_json

from coopt_ray.config import parse_config  # noqa: E402

ANCHORS = {  # published ConvNet test accuracy % on Fashion-MNIST (DC paper's table; KIP: Nguyen et al. 2021)
    "DC": {1: 70.5, 10: 82.3}, "DSA": {1: 70.6, 10: 84.6}, "KIP images -> ConvNet": {1: 73.8, 10: 86.8},
    "random (DC paper)": {1: 51.4, 10: 73.8}, "whole dataset (DC paper)": {"all": 93.5},
}
# Shared by every IPC: the labeled images, the experts, the scorer. Per IPC: the matching.
PROTOCOLS = {
    "cpu": {"common": {"labeled_limit": 10000, "experts": 4, "expert_epochs": 10, "width": 32, "expert_steps": 2,
                       "syn_steps": 20, "lr_img": 100.0, "lr_lr": 1.0e-5, "eval_runs": 3, "eval_epochs": 500,
                       "cpus_per_worker": 1, "checkpoint_every": 50, "log_every": 50},
            "ipc": {1: {"range": [0, 4], "iterations": 300, "lr_lr": 1.0e-7},
                    10: {"range": [0, 8], "iterations": 400, "batch_syn": 50}},
            "speedup": {"experts": 2, "epochs": 2}},
    "full": {"common": {"labeled_limit": None, "experts": 10, "expert_epochs": 22, "width": 128, "expert_steps": 2,
                        "syn_steps": 80, "lr_img": 100.0, "lr_lr": 1.0e-5, "eval_runs": 3, "eval_epochs": 1000,
                        "cpus_per_worker": 2, "checkpoint_every": 500, "log_every": 100},
             "ipc": {1: {"range": [0, 4], "iterations": 5000, "lr_lr": 1.0e-7},
                     10: {"range": [0, 20], "iterations": 5000}},
             "speedup": {"experts": 4, "epochs": 2}},
    "quick": {"common": {"labeled_limit": 1000, "experts": 2, "expert_epochs": 3, "width": 8, "expert_steps": 1,
                         "syn_steps": 5, "lr_img": 100.0, "lr_lr": 1.0e-5, "eval_runs": 2, "eval_epochs": 20,
                         "cpus_per_worker": 1, "checkpoint_every": 10, "log_every": 10},
              "ipc": {1: {"range": [0, 2], "iterations": 10}, 10: {"range": [0, 2], "iterations": 10}},
              "speedup": {"experts": 2, "epochs": 1}},
}


def make_config(protocol: dict, ipc: int, use_gpu: bool, seed: int = 0):
    d = {"method": "mdatm", "ipc": ipc, **protocol["common"], **protocol["ipc"][ipc], "use_gpu": use_gpu}
    return parse_config({"seed": seed, "zoo_dir": str(ROOT / "zoo"),
                         "data": {"source": "fashion-mnist", "image_size": 28},
                         "participants": [{"name": "p0", "model": "local-dir:unused"}], "distill": d})


def expert_speedup(x, y, classes: int, sp: dict, work: Path, width: int, use_gpu: bool) -> dict:
    """The same experts trained by 1 worker of 2 CPUs (one at a time), then by 2 workers of 1 CPU (two at once)."""
    from coopt_ray.distill.mdatm_experts import run_experts

    out = {}
    for name, cpus in (("one_worker_2cpus", 2), ("two_workers_1cpu", 1)):
        t0 = time.time()
        run_experts(x, y, classes, fresh_dir(work / f"speedup_{name}"), sp["experts"], sp["epochs"], name,
                    width=width, num_cpus=cpus, num_gpus=int(use_gpu), log=log)
        out[name] = round(time.time() - t0, 2)
    out["speedup"] = round(out["one_worker_2cpus"] / out["two_workers_1cpu"], 3)
    return out


def real_scores(x_u8, y, test, classes: int, ipc: int, d, mean, std, seed: int, rows=None) -> list[float]:
    """Real images through the stage's scorer task: ``rows`` (the same set every run), or random ones, ``ipc`` per
    class, a fresh draw per scorer run."""
    import ray
    import torch

    from coopt_ray.distill.mdatm_stage import score_task, to_tensor

    task, tx, ty = ray.remote(score_task), ray.put(test[0]), ray.put(test[1])
    refs = []
    for r in range(d.eval_runs):
        rng = np.random.default_rng(seed + 1000 + r)
        pick = np.asarray(rows) if rows is not None else np.concatenate(
            [rng.choice(np.flatnonzero(y == c), ipc, replace=False) for c in range(classes)])
        xs, _, _ = to_tensor(x_u8[pick], mean, std)
        refs.append(task.options(name=f"random_score_ipc{ipc}_{r}", num_cpus=d.cpus_per_worker or 1,
                                 num_gpus=int(d.use_gpu)).remote(xs, torch.from_numpy(y[pick]), tx, ty, classes,
                                                                 d.eval_epochs, seed + r, d.width, d.use_gpu,
                                                                 int(d.cpus_per_worker or 1)))
    return [float(v) for v in ray.get(refs)]


def stats(v: list) -> dict:
    return {"runs": v, "mean": float(np.mean(v)), "std": float(np.std(v))} if v else {}


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ipcs = sorted(res["ipc"], key=int)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    bars = [(k, lab) for k, lab in (("random", "random real"), ("init", "control: M-DATM's starting images"),
                                     ("mdatm", "M-DATM (ours)")) if all(res["ipc"][i].get(k) for i in ipcs)]
    for j, (key, label) in enumerate(bars):
        m = [100 * res["ipc"][i][key]["mean"] for i in ipcs]
        s = [100 * res["ipc"][i][key]["std"] for i in ipcs]
        ax.bar(np.arange(len(ipcs)) + (j - (len(bars) - 1) / 2) * 0.27, m, 0.27, yerr=s, label=label, capsize=3)
    for name, mark in (("DSA", "k_"), ("KIP images -> ConvNet", "r_")):
        ax.plot(range(len(ipcs)), [ANCHORS[name].get(int(i), np.nan) for i in ipcs], mark, ms=30, mew=2,
                label=f"{name} (published)")
    ax.set_xticks(range(len(ipcs)), [f"IPC {i}" for i in ipcs])
    ax.set_ylabel("test accuracy % (ConvNet-3 scorer)")
    ax.set_ylim(40, 95)
    ax.legend(fontsize=8)
    ax.set_title(f"Fashion-MNIST, {res['protocol']} protocol")
    for i in ipcs:
        loss = res["ipc"][i]["loss"]
        w = max(1, len(loss) // 20)
        axes[1].plot(np.convolve(loss, np.ones(w) / w, mode="valid"), label=f"IPC {i}")
    axes[1].set_xlabel("iteration")
    axes[1].set_ylabel(f"matching loss (moving mean of {max(1, len(loss) // 20)})")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke check")
    ap.add_argument("--full", action="store_true", help="the GPU protocol")
    ap.add_argument("--use-gpu", action="store_true")
    ap.add_argument("--ipcs", default="1,10")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench-mdatm"))
    ap.add_argument("--results", default=str(RESULTS), help="where the JSON and plots go")
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot from the protocol's JSON")
    args = ap.parse_args(argv)
    name = "quick" if args.quick else "full" if args.full else "cpu"
    if args.plot_only:
        import json

        stem = Path(args.results) / ("distill_labeled" + ("" if name == "cpu" else f"_{name}"))
        res = json.loads(stem.with_suffix(".json").read_text())
        plot(res, stem.with_suffix(".png"))
        return res
    protocol, ipcs = PROTOCOLS[name], [int(v) for v in args.ipcs.split(",")]
    work, out = fresh_dir(Path(args.work) / name), Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    start_ray()

    import torch

    from coopt_ray.config_distill import expert_epochs
    from coopt_ray.distill.mdatm_experts import run_experts
    from coopt_ray.distill.mdatm_stage import fingerprints, run_mdatm, to_tensor
    from coopt_ray.labeled import distill_splits

    cfgs = {i: make_config(protocol, i, args.use_gpu, args.seed) for i in ipcs}
    first = cfgs[ipcs[0]]
    d0 = first.distill
    splits = distill_splits(first)
    x_u8, y = splits["train"]
    x, mean, std = to_tensor(x_u8)
    k = len(splits["classes"])
    test = (to_tensor(splits["test"][0], mean, std)[0], torch.from_numpy(splits["test"][1]))
    log(f"[bench] {name} protocol: {splits['description']}; IPC {ipcs}")

    speed = expert_speedup(x, torch.from_numpy(y), k, protocol["speedup"], work, d0.width, args.use_gpu)
    log(f"[bench] expert speed-up, 2 workers x 1 CPU vs 1 worker x 2 CPUs: {speed['speedup']:.2f}x "
        f"({speed['one_worker_2cpus']:.1f} s vs {speed['two_workers_1cpu']:.1f} s)")

    shared = work / "experts"
    assert len({fingerprints(c)["experts"] for c in cfgs.values()}) == 1, "the IPC runs must share their experts"
    t0 = time.time()
    run_experts(x, torch.from_numpy(y), k, shared, d0.experts, expert_epochs(d0), fingerprints(first)["experts"],
                lr=d0.expert_lr, batch=d0.expert_batch, width=d0.width, seed=args.seed, num_cpus=d0.cpus_per_worker or 1,
                num_gpus=int(args.use_gpu), log=log)
    expert_seconds = time.time() - t0
    for i in ipcs:
        shutil.copytree(shared, work / f"ipc{i}" / "distilled" / "mdatm" / "experts")

    def one(i: int) -> dict:
        return run_mdatm(cfgs[i], work / f"ipc{i}", log=lambda m, i=i: log(f"[ipc {i}] {m}"))

    with ThreadPoolExecutor(len(ipcs)) as pool:  # the IPC runs' Ray tasks share the cluster
        runs = dict(zip(ipcs, pool.map(one, ipcs)))
    res = {"protocol": name, "machine": machine(), "settings": {"common": protocol["common"],
                                                                 "ipc": {str(i): protocol["ipc"][i] for i in ipcs},
                                                                 "labeled": splits["description"], "seed": args.seed,
                                                                 "speedup": protocol["speedup"]},
           "anchors": ANCHORS, "expert_speedup": speed, "expert_seconds": round(expert_seconds, 2), "ipc": {}}
    e = d0.experts
    res["expert_speedup"]["projection_gpus"] = {g: round(e / -(-e // g), 2) for g in (1, 2, 4, 8)}
    for i in ipcs:
        r = runs[i]
        rnd = real_scores(x_u8, y, test, k, i, cfgs[i].distill, mean, std, args.seed)
        init = real_scores(x_u8, y, test, k, i, cfgs[i].distill, mean, std, args.seed, rows=r["init_rows"])
        res["ipc"][str(i)] = {
            "mdatm": stats(r["scores"]), "random": stats(rnd), "init": stats(init),
            "matching_gain_points": round(100 * (np.mean(r["scores"]) - np.mean(init)), 2),
            "gain_points": round(100 * (np.mean(r["scores"]) - np.mean(rnd)), 2),
            "seconds": {"experts_shared": round(expert_seconds, 2), "matching": r["matching_seconds"],
                        "scorer": r["score_seconds"], "total_with_experts": round(expert_seconds + r["seconds"], 2)},
            "loss": r["loss"], "syn_lr": r["syn_lr"], "images": str(Path(r["data"]).parent / "images.png"),
        }
        log(f"[bench] IPC {i}: M-DATM {100 * np.mean(r['scores']):.2f} vs random {100 * np.mean(rnd):.2f} "
            f"({res['ipc'][str(i)]['gain_points']:+.2f} points); its starting images {100 * np.mean(init):.2f}")
        shutil.copy(Path(r["data"]).parent / "images.png",
                    out / f"distill_labeled{'' if name == 'cpu' else '_' + name}_ipc{i}.png")
    res["seconds"] = round(time.time() - t_all, 1)
    stem = "distill_labeled" + ("" if name == "cpu" else f"_{name}")
    write_json(out / f"{stem}.json", res)
    plot(res, out / f"{stem}.png")
    log(f"[bench] wrote {out / (stem + '.json')} in {res['seconds']:.0f} s")
    return res


if __name__ == "__main__":
    main()
