"""Pipeline speed: optimize vs a plain PyTorch loop, actor scaling, score+align overhead, Ray Train vs a
plain loop, and the driver's peak memory for small vs large inputs.

    python benchmarks/throughput.py --quick     # 3,000 images; RSS at 6k vs 50k with one teacher
    python benchmarks/throughput.py             # 50,000 images, K=4 everywhere

Writes benchmarks/results/throughput[_quick].json. Compared numbers are always measured in the same run,
one after the other, so machine load affects both sides alike (it still adds noise).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from common import RESULTS, ROOT, fresh_dir, log, machine, optimize_config, start_ray, write_json, zoo_teachers


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--images", type=int, help="images for the optimize comparison (default 50k, quick 3,000)")
    ap.add_argument("--rss-sizes", default="6000,50000", help="data sizes for the driver-memory check")
    ap.add_argument("--rss-teachers", type=int, help="teachers in the memory runs (default 4, quick 1)")
    ap.add_argument("--rss-ballast", type=int, default=500, help="MB the control memory run holds on top")
    ap.add_argument("--train-arch", help="student for the training comparison (default resnet18, quick test_vit)")
    ap.add_argument("--train-images", type=int, help="rows for the training comparison (default all, quick 2,000)")
    ap.add_argument("--train-epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--zoo", default=str(ROOT / "zoo"))
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip", default="", help="comma list: optimize,scaling,train,rss")
    a = ap.parse_args(argv)
    q = a.quick
    for k, v in dict(images=3000 if q else None, rss_teachers=1 if q else 4, train_arch="test_vit" if q else "resnet18",
                     train_images=2000 if q else None).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    tag = "_quick" if q else ""
    a.work = Path(a.work or ROOT / "runs" / f"bench-throughput{tag.replace('_', '-')}")
    a.out = Path(a.out or RESULTS / f"throughput{tag}.json")
    a.rss_sizes = [int(s) for s in a.rss_sizes.split(",") if s]
    a.skip = {s for s in a.skip.split(",") if s}
    return a


# ---------------------------------------------------------------- plain single-process loops
def plain_optimize(cfg, run: Path, threads: int, device: str = "cpu") -> dict:
    """decode + preprocess + encode of exactly the rows run_optimize embeds (D(k) ∪ S per participant), on
    ``device`` (on CUDA: inference mode, bf16 autocast, pinned host memory, non-blocking copies)."""
    import pyarrow.parquet as pq
    import torch

    from coopt_ray.config import resolve_model
    from coopt_ray.data import owner_of, shared_subset
    from coopt_ray.devices import autocast
    from coopt_ray.images import decode_image
    from coopt_ray.models import load_model

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    t = pq.read_table(run / "source", columns=["id", "image"])
    ids = t.column("id").to_pylist()
    blobs = t.column("image").to_pylist()
    shared = set(shared_subset(ids, cfg.shared.fraction, cfg.shared.min, cfg.seed))
    owner = owner_of(ids, len(cfg.participants), cfg.seed)
    per, total_rows, t_all = [], 0, time.time()
    for k, p in enumerate(cfg.participants):
        rows = [i for i, (id_, o) in enumerate(zip(ids, owner)) if o == k or id_ in shared]
        t0 = time.time()
        model, preprocess, dim = load_model(resolve_model(cfg, p.model), p.pretrained, device)
        t_load = time.time() - t0
        dev = torch.device(device)
        with torch.inference_mode(), autocast("auto", dev):
            for s in range(0, len(rows), p.batch_size):
                x = torch.stack([preprocess(decode_image(blobs[i])) for i in rows[s:s + p.batch_size]])
                if dev.type == "cuda":
                    x = x.pin_memory().to(dev, non_blocking=True)
                model.encode_image(x).float().cpu().numpy()
        dt = time.time() - t0
        per.append({"participant": p.name, "model": p.model, "rows": len(rows), "seconds": round(dt, 3),
                    "load_seconds": round(t_load, 3), "images_per_s": round(len(rows) / dt, 1)})
        total_rows += len(rows)
    torch.set_num_threads(old)
    secs = time.time() - t_all
    return {"threads": threads, "device": str(device), "rows": total_rows, "seconds": round(secs, 3),
            "images_per_s": round(total_rows / secs, 1), "per_model": per}


def optimize_once(cfg, run: Path) -> dict:
    from coopt_ray.pipeline import run_optimize

    fresh_dir(run)
    t0 = time.time()
    man = run_optimize(cfg, run, log=lambda m: None)
    wall = time.time() - t0
    rows = sum(p["rows"] + p["shared_rows"] for p in man["participants"])  # owned + S (S counted per model)
    emb = man["timings"]["optimize"]
    return {"rows_embedded": rows, "total_rows": man["total_rows"], "timings": man["timings"], "wall_seconds": round(wall, 3),
            "embed_images_per_s": round(rows / emb, 1), "end_to_end_images_per_s": round(rows / wall, 1),
            "per_participant_seconds": {p["name"]: p["seconds"] for p in man["participants"]}}


def projection(per_model: list[dict], images: int, k: int, shared: int) -> list[dict]:
    """On paper: optimize wall time for ``images`` with K participants on G devices (one pool per device,
    greedy waves), from the measured per-model rates; the rates are this machine's CPU rates."""
    rates = [m["images_per_s"] for m in per_model][:k]
    work = [(images / k + shared) / r for r in rates]
    out = []
    for g in (1, 2, 4, 8):
        lanes = [0.0] * g
        for w in sorted(work, reverse=True):
            lanes[lanes.index(min(lanes))] += w
        t = max(lanes)
        out.append({"devices": g, "participants": k, "seconds": round(t, 1),
                    "images_per_s": round((images + k * shared) / t, 1)})
    return out


def vm_hwm_mb() -> float:
    """This process's own peak resident memory (VmHWM, MB). Unlike ``ru_maxrss``, which on Linux keeps the
    peak of the forked copy of the parent across exec (so a child started by a big benchmark reports the
    benchmark's peak), VmHWM belongs to the process's current address space, which starts empty at exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)  # kB
    raise RuntimeError("no VmHWM in /proc/self/status (not Linux?)")


def rss_child(teachers_json: str, size: int, work: str, ballast_mb: int = 0) -> None:
    """Subprocess body: run_optimize on ``size`` images, print the driver's own peak memory (VmHWM, MB).

    ``ballast_mb`` > 0 is the control: the driver also holds that many MB of touched memory, so its figure
    must rise by about that much; a measurement that did not would not be measuring this process.
    """
    import resource

    from coopt_ray.pipeline import run_optimize

    ballast = np.ones(ballast_mb * 2**20 // 8) if ballast_mb else None  # np.ones touches every page
    teachers = json.loads(teachers_json)
    cfg = optimize_config(teachers, limit=size)
    run = fresh_dir(Path(work))
    start_ray()
    t0 = time.time()
    man = run_optimize(cfg, run, log=lambda m: None)
    print("RSS_RESULT " + json.dumps({
        "size": size, "total_rows": man["total_rows"], "ballast_mb": ballast_mb, "vm_hwm_mb": vm_hwm_mb(),
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "seconds": round(time.time() - t0, 1), "held": 0 if ballast is None else int(ballast.nbytes >> 20)}), flush=True)


def plain_train(arch: str, images: np.ndarray, targets: np.ndarray, epochs: int, batch_size: int, threads: int,
                device: str = "cpu") -> dict:
    import torch

    from coopt_ray import baselines as B

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    _, hist = B.train_coopt(arch, images, targets, epochs=epochs, batch_size=batch_size, log=lambda m: None,
                            device=device)
    torch.set_num_threads(old)
    steps = len(images) // batch_size
    per_epoch = [h["train_seconds"] - p["train_seconds"] for p, h in zip(hist, hist[1:])]
    return {"threads": threads, "device": str(device), "epochs": epochs, "samples_per_epoch": steps * batch_size,
            "epoch_seconds": [round(s, 3) for s in per_epoch],
            "samples_per_s": round(steps * batch_size / min(per_epoch), 2),
            "samples_per_s_mean": round(steps * batch_size * len(per_epoch) / sum(per_epoch), 2)}


# ---------------------------------------------------------------- main
def main(argv=None) -> dict:
    a = parse_args(argv)
    import ray

    os.environ.setdefault("COOPT_PROGRESS", "0")
    teachers = zoo_teachers(Path(a.zoo), a.quick)
    k4 = teachers[:4]
    res = {"settings": {k: (str(v) if isinstance(v, Path) else sorted(v) if isinstance(v, set) else v)
                        for k, v in vars(a).items()}, "machine": machine()}
    a.work.mkdir(parents=True, exist_ok=True)

    def save():
        write_json(a.out, res)

    start_ray()
    res["machine"]["ray_resources"] = ray.cluster_resources()
    cfg1 = optimize_config(k4, limit=a.images)
    if "optimize" not in a.skip:
        log(f"[throughput] optimize: run_optimize, K={len(k4)}, {a.images or 'all'} images, 1 actor each")
        opt = optimize_once(cfg1, a.work / "opt_1actor")
        log(f"[throughput] optimize: {opt['embed_images_per_s']} img/s in the embed stage "
            f"({opt['end_to_end_images_per_s']} end to end)")
        plain = plain_optimize(cfg1, a.work / "opt_1actor", threads=1)
        log(f"[throughput] plain loop (1 thread, like one actor): {plain['images_per_s']} img/s")
        plain_all = plain_optimize(cfg1, a.work / "opt_1actor", threads=os.cpu_count() or 1)
        log(f"[throughput] plain loop ({plain_all['threads']} threads): {plain_all['images_per_s']} img/s")
        res["optimize"] = {"ray": opt, "plain_1_thread": plain, "plain_all_threads": plain_all}
        res["optimize_vs_plain_ratio"] = round(opt["embed_images_per_s"] / plain["images_per_s"], 3)
        res["optimize_vs_plain_ratio_end_to_end"] = round(opt["end_to_end_images_per_s"] / plain["images_per_s"], 3)
        res["optimize_vs_plain_all_threads_ratio"] = round(opt["embed_images_per_s"] / plain_all["images_per_s"], 3)
        tm = opt["timings"]
        res["score_align_seconds"] = round(tm["score"] + tm["align"], 4)
        res["score_align_share"] = round((tm["score"] + tm["align"]) / tm["optimize"], 6)
        n_full = 50_000
        res["scaling_projection"] = {
            "note": "on paper, from measured per-model CPU rates (plain loop, 1 thread): optimize time for 50k "
                    "images with K=4 participants when each pool has its own device; a GPU raises every rate "
                    "but the shape (max over lanes) is the same",
            "rows": projection(plain["per_model"], n_full, len(k4), max(16, int(np.ceil(0.0005 * n_full))))}
        save()
    if "scaling" not in a.skip:
        cfg1h = optimize_config(k4, limit=a.images, actors=1, num_cpus=0.5)
        cfg2 = optimize_config(k4, limit=a.images, actors=2, num_cpus=0.5)
        log("[throughput] scaling: 1 vs 2 actors per participant (0.5 CPU each so both fit the 1 free CPU)")
        one = optimize_once(cfg1h, a.work / "opt_1actor_half")
        two = optimize_once(cfg2, a.work / "opt_2actors")
        res["scaling"] = {"actors_1": one, "actors_2": two,
                          "speedup_2_vs_1": round(two["embed_images_per_s"] / one["embed_images_per_s"], 3)}
        log(f"[throughput] scaling: 1 actor {one['embed_images_per_s']} img/s, 2 actors {two['embed_images_per_s']} img/s")
        save()
    if "train" not in a.skip:
        res["train"] = train_compare(a, cfg1)
        res["train_vs_plain_ratio"] = res["train"]["ratio"]
        save()
    ray.shutdown()
    if "rss" not in a.skip:
        res["rss"] = driver_memory(a, teachers)
        save()
    save()
    log(f"[throughput] done -> {a.out}")
    for k in ("optimize_vs_plain_ratio", "optimize_vs_plain_ratio_end_to_end", "score_align_share",
              "train_vs_plain_ratio", "rss"):
        log(f"  {k}: {res.get(k)}")
    return res


def driver_memory(a, teachers: list[dict]) -> dict:
    """The optimize driver's own peak memory (VmHWM) at each of ``--rss-sizes``, each in a fresh process,
    plus a control run on the smallest size holding ``--rss-ballast`` MB more: its figure must move."""
    # quick: the smallest teacher(s) (the zoo lists them largest first), the driver's work is the same
    rss_t = teachers[-a.rss_teachers:] if a.quick else teachers[:a.rss_teachers]
    runs = [(size, 0) for size in a.rss_sizes] + [(min(a.rss_sizes), a.rss_ballast)]
    out = []
    for size, ballast in runs:
        log(f"[throughput] driver memory: run_optimize on {size} images, K={a.rss_teachers}"
            f"{f', control holding {ballast} MB more' if ballast else ''} (fresh process)")
        cmd = [sys.executable, __file__, "--_rss-child", json.dumps(rss_t), str(size),
               str(a.work / f"rss_{size}_{ballast}"), str(ballast)]
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "COOPT_PROGRESS": "0"},
                           cwd=str(Path(__file__).parent))
        line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RSS_RESULT ")), None)
        if line is None:
            raise RuntimeError(f"memory run on {size} images failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
        out.append(json.loads(line.split(" ", 1)[1]))
        log(f"[throughput]   {out[-1]}")
    plain = [r for r in out if not r["ballast_mb"]]
    small, large, control = plain[0], plain[-1], out[-1]
    return {"teachers": [t["name"] for t in rss_t], "runs": out, "measure": "VmHWM of the driver process",
            "small_images": small["total_rows"], "large_images": large["total_rows"],
            "small_mb": small["vm_hwm_mb"], "large_mb": large["vm_hwm_mb"],
            "growth_mb": round(large["vm_hwm_mb"] - small["vm_hwm_mb"], 1),
            "control_ballast_mb": control["ballast_mb"],
            "control_rise_mb": round(control["vm_hwm_mb"] - small["vm_hwm_mb"], 1)}


def train_compare(a, cfg) -> dict:
    """Ray Train (1 worker, TorchTrainer) vs the plain loop on the same model, rows, batch and threads."""
    import dataclasses

    from coopt_ray.data import PUBLIC_SIZE, fashion_mnist_split
    from coopt_ray.images import arrays_to_rgb
    from coopt_ray.rows import read_targets, subset_ids
    from coopt_ray.train import run_train

    run = a.work / "opt_1actor"
    if not (run / "manifest.json").exists():
        optimize_once(cfg, run)
    s = dataclasses.replace(cfg.student, arch=a.train_arch, epochs=a.train_epochs, batch_size=a.batch_size,
                            workers=1, limit=a.train_images, cpus_per_worker=1.0)
    tcfg = dataclasses.replace(cfg, student=s)
    import shutil

    shutil.rmtree(run / "student", ignore_errors=True)
    log(f"[throughput] train: Ray Train, {a.train_arch}, 1 worker x 1 CPU, {a.train_epochs} epochs")
    t0 = time.time()
    m = run_train(tcfg, run, log=lambda x: None)
    wall = time.time() - t0
    hist = m["history"]
    ray_rate = max(h["images_per_s"] for h in hist)
    ray_mean = sum(h["images"] for h in hist) / sum(h["seconds"] for h in hist)
    ids, y = read_targets(run / "optimized")
    keep = subset_ids(ids, a.train_images, tcfg.seed)
    if keep is not None:
        sel = np.array([i in keep for i in ids])
        ids, y = [i for i, k in zip(ids, sel) if k], y[sel]
    x_unl, _ = fashion_mnist_split("unlabeled")
    images = arrays_to_rgb(x_unl[[int(i.split("/")[1]) - PUBLIC_SIZE for i in ids]], 32)
    log("[throughput] train: plain loop, same model/rows/batch, 1 thread")
    plain = plain_train(a.train_arch, images, y, a.train_epochs, a.batch_size, threads=1)
    out = {"arch": a.train_arch, "rows": len(ids),
           "ray": {"history": hist, "samples_per_s": ray_rate, "samples_per_s_mean": round(ray_mean, 2),
                   "stage_seconds": round(wall, 2)},
           "plain": plain, "ratio": round(ray_rate / plain["samples_per_s"], 3),
           "ratio_mean_over_epochs": round(ray_mean / plain["samples_per_s_mean"], 3)}
    log(f"[throughput] train: Ray {ray_rate} samples/s vs plain {plain['samples_per_s']} -> {out['ratio']}")
    return out


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_rss-child":
        rss_child(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]) if len(sys.argv) > 5 else 0)
    else:
        main()
