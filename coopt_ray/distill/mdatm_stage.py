"""`coopt distill` with ``distill.method: mdatm``: labeled images -> ``ipc`` synthetic images per class in
RUN/distilled/mdatm/ (Parquet: id, image PNG, label), on Ray.

1. Experts (mdatm_experts.py): E ConvNet-3 trajectories, one Ray task each, with a done marker per expert.
2. Matching: chunks of ``checkpoint_every`` iterations, each one Ray task (``mdatm_matching``) that resumes from the
   last checkpoint (tensors only, loaded with ``weights_only=True``) and writes the next; iteration i draws from a
   generator seeded by (seed, i), so a resumed run repeats an uninterrupted one.
3. The scorer: ``eval_runs`` fresh ConvNet-3s trained on the written PNGs (Ray tasks), tested on the test split.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..cluster import check_tasks_fit, cluster_nodes, init_ray
from ..config import Config, ConfigError
from ..config_distill import distill_view, expert_epochs
from ..images import decode_image, encode_png
from ..labeled import EvalSkipped, distill_splits
from ..devices import check_cuda_usable, stage_device
from ..rundir import (DISTILLED, DISTILLED_PARTS as PARTS, DONE, prepare_run_dir, read_done, write_json_atomic,
                      write_parts_atomic)
from .mdatm import DSA, Matcher, correctly_classified, hard_labels, score_synthetic
from .mdatm_experts import load_trajectories, run_experts

METHOD = "mdatm"
DISTILL_JSON = "distill.json"
CKPT = "matching_{:06d}.pt"
MATCH_KEYS = ("ipc", "width", "syn_steps", "expert_steps", "range", "range_start", "range_grow", "lr_img", "lr_lr",
              "batch_syn", "expert_lr")


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprints(cfg: Config) -> dict:
    """What the experts, the matching (without its length) and the finished set depend on."""
    d, view = cfg.distill, distill_view(cfg.distill)
    data = {"seed": cfg.seed, "data": [cfg.data.source, cfg.data.path, cfg.data.image_size],
            "labeled": [d.labeled_path, d.labeled_limit]}
    experts = _hash({**data, "epochs": expert_epochs(d), "lr": d.expert_lr, "batch": d.expert_batch, "width": d.width,
                     "experts": "per-expert"})
    matching = _hash({"experts": experts, "count": d.experts, **{k: view[k] for k in MATCH_KEYS}})
    done = _hash({"matching": matching, "iterations": d.iterations, "eval": [d.eval_runs, d.eval_epochs],
                  "test": [cfg.eval.test_path, cfg.eval.test_limit]})
    return {"experts": experts, "matching": matching, "done": done}


def to_tensor(images: np.ndarray, mean=None, std=None):
    """uint8 (N, S, S, 3) -> normalised float NCHW (one channel when every image is grey), with the per-channel
    mean and std (computed from ``images`` unless given)."""
    if mean is None:
        gray = bool((images[..., 0] == images[..., 1]).all() and (images[..., 0] == images[..., 2]).all())
        x = torch.from_numpy(images[..., :1] if gray else images).permute(0, 3, 1, 2).float().div_(255.0)
        mean, std = x.mean((0, 2, 3)).tolist(), x.std((0, 2, 3)).clamp_min(1e-3).tolist()
    else:
        x = torch.from_numpy(images[..., :len(mean)]).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1), mean, std


def to_uint8(x: torch.Tensor, mean, std) -> np.ndarray:
    """Normalised float NCHW -> uint8 (N, S, S) grey or (N, S, S, 3) RGB, as the PNGs hold them."""
    px = x.detach().cpu() * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    arr = (px.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return arr[..., 0] if arr.shape[-1] == 1 else arr


def matching_chunk(ck_dir: str, exp_dir: str, experts: int, start_it: int, count: int, mc: dict, images, labels,
                   threads: int = 1) -> list[dict]:
    """Iterations ``start_it`` .. ``start_it + count - 1`` of the matching (a Ray task). Starts from checkpoint
    ``start_it`` (or initialises from correctly classified real images when ``start_it`` is 0), writes checkpoint
    ``start_it + count`` and returns the iterations' records."""
    torch.set_num_threads(max(1, threads))
    dev = stage_device(mc["use_gpu"], "distill.use_gpu")
    traj = [t.to(dev) for t in load_trajectories(Path(exp_dir), experts)]
    classes, ipc = mc["classes"], mc["ipc"]
    y = hard_labels(classes, ipc).to(dev)
    lo = ((0 - torch.tensor(mc["mean"])) / torch.tensor(mc["std"])).view(1, -1, 1, 1).to(dev)
    hi = ((1 - torch.tensor(mc["mean"])) / torch.tensor(mc["std"])).view(1, -1, 1, 1).to(dev)
    ck = Path(ck_dir)
    if start_it == 0:
        t_init = traj[0][min(mc["t_hi"], len(traj[0]) - 1)]
        pick = correctly_classified(t_init, images, labels, classes, ipc, mc["seed"], mc["width"])  # on dev
        x0, history = images[pick].to(dev), []
    else:
        state = torch.load(ck / CKPT.format(start_it), map_location=dev, weights_only=True)
        x0, history, pick = state["matcher"]["x"], state["history"], state["init"].cpu()
    m = Matcher(x0, y, classes, mc["lr_img"], mc["lr_lr"], mc["expert_lr"], mc["width"], bounds=(lo, hi))
    if start_it:
        m.load_state_dict(state["matcher"])
    aug = DSA()
    for it in range(start_it, start_it + count):
        gen = torch.Generator().manual_seed(mc["seed"] * 1_000_003 + it)
        t0 = time.time()
        rec = m.step(traj, it, gen, syn_steps=mc["syn_steps"], expert_steps=mc["expert_steps"], t_lo=mc["t_lo"],
                     t=mc["t"], t_hi=mc["t_hi"], expand_until=mc["grow"], batch_syn=mc["batch_syn"], aug=aug)
        history.append({"iteration": it + 1, **rec, "seconds": round(time.time() - t0, 4)})
    state = {"matcher": m.state_dict(), "iteration": start_it + count, "fingerprint": mc["fingerprint"],
             "history": history, "init": pick}  # init: the labeled rows the images started from
    tmp = ck / (CKPT.format(start_it + count) + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, ck / CKPT.format(start_it + count))
    return history[-count:]


def latest_matching(ck: Path, fingerprint: str, upto: int, log) -> tuple[int, list]:
    """The last usable checkpoint at or before iteration ``upto`` (0: none) and the history it holds."""
    its = sorted(int(p.stem.split("_")[1]) for p in ck.glob("matching_*.pt"))
    for it in reversed([i for i in its if i <= upto]):
        try:
            state = torch.load(ck / CKPT.format(it), map_location="cpu", weights_only=True)
        except Exception as e:  # a torn or foreign file: fall back to an earlier one
            log(f"[mdatm] checkpoint {CKPT.format(it)} unusable ({type(e).__name__}); trying an earlier one")
            continue
        if state.get("fingerprint") != fingerprint:
            log(f"[mdatm] checkpoints in {ck} were made with other matching settings; starting afresh")
            return 0, []
        return it, list(state["history"])
    return 0, []


def score_task(x, y, tx, ty, classes: int, epochs: int, seed: int, width: int, use_gpu: bool, threads: int) -> float:
    torch.set_num_threads(max(1, threads))
    dev = stage_device(use_gpu, "distill.use_gpu")
    return score_synthetic(x.to(dev), y.to(dev), tx.to(dev), ty.to(dev), classes, epochs, seed, width)


def mdatm_demands(cfg: Config) -> list:
    """``(config key, resources)`` of M-DATM's Ray tasks: experts and scorers (a GPU share each with use_gpu), the
    matching task (a whole GPU with use_gpu)."""
    d = cfg.distill
    cpus = float(d.cpus_per_worker or 1)
    if not d.use_gpu:
        return [("distill.cpus_per_worker", {"CPU": cpus})]
    return [("distill.use_gpu", {"CPU": cpus, "GPU": 1.0}),
            ("distill.gpu_fraction", {"CPU": cpus, "GPU": d.gpu_fraction})]


def score_sets(sets: dict, test, classes: int, d, seed: int, log) -> dict:
    """Each named (x, y) set scored by ``d.eval_runs`` scorer runs as Ray tasks: {name: [accuracy, ...]}."""
    import ray

    if d.eval_runs == 0:
        return {}
    task = ray.remote(score_task)
    tx, ty = ray.put(test[0]), ray.put(test[1])
    cpus = d.cpus_per_worker or 1
    gpus = d.gpu_fraction if d.use_gpu else 0  # a small ConvNet: several scorers share a GPU
    refs = {(name, r): task.options(name=f"mdatm_score_{name}_{r}", num_cpus=cpus, num_gpus=gpus).remote(
        x, y, tx, ty, classes, d.eval_epochs, seed + r, d.width, d.use_gpu, int(cpus))
        for name, (x, y) in sets.items() for r in range(d.eval_runs)}
    out = {name: [] for name in sets}
    for (name, r), ref in refs.items():
        out[name].append(ray.get(ref))
        log(f"[mdatm] scorer {name} run {r + 1}/{d.eval_runs}: test accuracy {out[name][-1]:.4f}")
    return out


def write_parquet(out: Path, pixels: np.ndarray, labels: np.ndarray, class_names: list) -> Path:
    """RUN/distilled/mdatm/data/part-0.parquet: id, image (PNG), label, class; written aside and renamed."""
    import pyarrow as pa

    table = pa.table({"id": [f"{METHOD}/{i:06d}" for i in range(len(pixels))],
                      "image": pa.array([encode_png(p) for p in pixels], pa.binary()),
                      "label": pa.array(labels.tolist(), pa.int64()),
                      "class": [class_names[c] for c in labels.tolist()]})
    return write_parts_atomic(out, table)


def read_parquet_images(parts: Path) -> tuple[np.ndarray, np.ndarray]:
    """The written set back as uint8 (N, S, S, 3) and labels: what a user who downloads it gets."""
    import pyarrow.parquet as pq

    t = pq.read_table(str(parts), columns=["image", "label"])
    imgs = np.stack([np.asarray(decode_image(b), dtype=np.uint8) for b in t.column("image").to_pylist()])
    return imgs, np.asarray(t.column("label").to_pylist(), dtype=np.int64)


def rebuild_report(out: Path) -> Path:
    """``coopt report`` on an M-DATM RUN: report.html again from distill.json and the Parquet."""
    from .mdatm_report import write_report

    result = json.loads((out / DISTILL_JSON).read_text())
    imgs, labs = read_parquet_images(out / PARTS)
    return write_report(out, imgs, labs, result["classes"], result)


def run_mdatm(cfg: Config, run: str | os.PathLike, address: Optional[str] = None,
              log: Callable[[str], None] = print) -> dict:
    """The M-DATM stage: RUN/distilled/mdatm/{experts/, checkpoints/, data/, distill.json, report.html, _DONE.json}."""
    import ray

    from .mdatm_report import write_report

    run, d = Path(run), cfg.distill
    try:
        splits = distill_splits(cfg)
    except EvalSkipped as e:
        raise ConfigError(str(e)) from e
    prepare_run_dir(cfg, run)
    out = Path(run) / DISTILLED / METHOD
    out.mkdir(parents=True, exist_ok=True)
    fps = fingerprints(cfg)
    done = read_done(out)
    if done and done.get("fingerprint") == fps["done"] and (out / DISTILL_JSON).exists():
        log(f"[distill] already done: {out} ({done['size']} images); skipping")
        return json.loads((out / DISTILL_JSON).read_text())
    (out / DONE).unlink(missing_ok=True)
    t_start = time.time()
    (x_np, y_np), classes = splits["train"], splits["classes"]
    k = len(classes)
    x, mean, std = to_tensor(x_np)
    y = torch.from_numpy(y_np)
    counts = np.bincount(y_np, minlength=k)
    if counts.min() < d.ipc:
        raise ConfigError(f"'distill.ipc' ({d.ipc}) is more than class {classes[int(counts.argmin())]!r} has "
                          f"({int(counts.min())} images)")
    t_lo, t_hi = d.range
    epochs = expert_epochs(d)
    log(f"[mdatm] {splits['description']}; {k} classes, {x.shape[1]} channel(s) at {x.shape[2]} px; "
        f"{d.experts} experts x {epochs} epochs, then {d.iterations} iterations at ipc {d.ipc}")
    init_ray(address, log=log)
    check_tasks_fit(mdatm_demands(cfg), cluster_nodes())  # a task no node holds would wait forever
    cpus, gpus = d.cpus_per_worker or 1, int(d.use_gpu)  # the matching task: a whole GPU
    if d.use_gpu:
        check_cuda_usable("distill.use_gpu", d.gpu_fraction, log)
    t0 = time.time()
    metas = run_experts(x, y, k, out / "experts", d.experts, epochs, fps["experts"], lr=d.expert_lr,
                        batch=d.expert_batch, width=d.width, seed=cfg.seed, num_cpus=cpus,
                        num_gpus=d.gpu_fraction if d.use_gpu else 0, log=log)
    expert_wall = time.time() - t0

    ck = out / "checkpoints"
    ck.mkdir(exist_ok=True)
    it, history = latest_matching(ck, fps["matching"], d.iterations, log)
    mc = {"classes": k, "ipc": d.ipc, "mean": mean, "std": std, "seed": cfg.seed, "width": d.width,
          "lr_img": d.lr_img, "lr_lr": d.lr_lr, "expert_lr": d.expert_lr, "syn_steps": d.syn_steps,
          "expert_steps": d.expert_steps, "t_lo": t_lo, "t_hi": t_hi,
          "t": d.range_start if d.range_start is not None else (t_lo + t_hi) // 2,
          "grow": d.range_grow if d.range_grow is not None else d.iterations // 2,
          "batch_syn": d.batch_syn or k * d.ipc, "use_gpu": d.use_gpu, "fingerprint": fps["matching"]}
    if it:
        log(f"[mdatm] resuming the matching after iteration {it} from {ck / CKPT.format(it)}")
    img_ref = lab_ref = None
    task = ray.remote(matching_chunk)
    t0 = time.time()
    while it < d.iterations:
        n = min(d.checkpoint_every - it % d.checkpoint_every, d.iterations - it)
        if it == 0 and img_ref is None:
            img_ref, lab_ref = ray.put(x), ray.put(y)
        chunk = ray.get(task.options(name="mdatm_matching", num_cpus=cpus, num_gpus=gpus).remote(
            str(ck), str(out / "experts"), d.experts, it, n, mc, img_ref if it == 0 else None,
            lab_ref if it == 0 else None, int(cpus)))
        history += chunk
        it += n
        for h in chunk:
            if h["iteration"] % d.log_every == 0 or h["iteration"] == d.iterations:
                recent = [r["loss"] for r in history[max(0, h["iteration"] - d.log_every):h["iteration"]]]
                log(f"[mdatm] iteration {h['iteration']}/{d.iterations}  loss {np.mean(recent):.4f} "
                    f"(mean of last {len(recent)})  syn_lr {h['syn_lr']:.5f}  {h['seconds']:.2f}s/it")
    state = torch.load(ck / CKPT.format(d.iterations), map_location="cpu", weights_only=True)
    labels = hard_labels(k, d.ipc).numpy()
    parts = write_parquet(out, to_uint8(state["matcher"]["x"], mean, std), labels, classes)
    match_wall = time.time() - t0

    imgs, labs = read_parquet_images(parts)
    sx, _, _ = to_tensor(imgs, mean, std)
    tx, _, _ = to_tensor(splits["test"][0], mean, std)
    t0 = time.time()
    scores = score_sets({METHOD: (sx, torch.from_numpy(labs))}, (tx, torch.from_numpy(splits["test"][1])), k, d,
                        cfg.seed, log).get(METHOD, [])
    result = {
        "method": METHOD, "size": int(len(labels)), "ipc": d.ipc, "classes": classes, "channels": len(mean),
        "image_size": int(x.shape[2]), "mean": mean, "std": std, "data": str(parts), "source": splits["description"],
        "labeled_images": int(len(y_np)), "expert_epochs": epochs, "experts": metas,
        "expert_seconds": round(expert_wall, 3), "matching_seconds": round(match_wall, 3),
        "score_seconds": round(time.time() - t0, 3), "seconds": round(time.time() - t_start, 3),
        "loss": [h["loss"] for h in history], "loss_steps": [h["iteration"] for h in history],
        "syn_lr": history[-1]["syn_lr"] if history else d.expert_lr, "history": history,
        "init_rows": state["init"].tolist(),  # per synthetic image, the labeled image (row as loaded) it started from
        "scores": scores, "accuracy": float(np.mean(scores)) if scores else None,
        "accuracy_std": float(np.std(scores)) if scores else None,
        "config": distill_view(d), "fingerprint": fps["done"],
    }
    write_report(out, imgs, labs, classes, result)
    write_json_atomic(out / DISTILL_JSON, result)
    write_json_atomic(out / DONE, {"fingerprint": fps["done"], "size": result["size"], "accuracy": result["accuracy"]})
    acc = f", scorer accuracy {result['accuracy']:.4f} ± {result['accuracy_std']:.4f}" if scores else ""
    log(f"[distill] done: {result['size']} images ({d.ipc} per class), loss {result['loss'][0]:.4f} -> "
        f"{result['loss'][-1]:.4f}{acc} in {result['seconds']:.1f}s -> {parts}")
    return result
