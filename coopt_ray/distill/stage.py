"""`coopt distill`: shrink RUN/optimized to M synthetic rows (KRR-ST) on Ray Train -> RUN/distilled/krr-st/
(``method: mdatm``, labeled images -> RUN/distilled/mdatm/, is mdatm_stage.py).

The driver standardises the targets (per dimension, as the student does), draws the M initial rows (seeded),
plans the workers (``distill.workers``, ``use_gpu``, ``cpus_per_worker``: the same planner as the student) and
runs :func:`krr_st.distill_loop_per_worker` under a TorchTrainer named ``coopt-distill-<RUN>``. Every worker
reads its own real rows from RUN/optimized through Ray Data. The result has RUN/optimized's columns (id, image
as PNG, target in the original target space) plus ``init_id``, the real row each synthetic row started from.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..cluster import cluster_nodes, driver_node_id, fit_torch_trainer, init_ray, plan_workers
from ..config import Config, ConfigError
from ..config_distill import distill_view
from ..devices import check_cuda_usable
from ..embeddings import column_matrix
from ..images import decode_image, encode_png, resize_rgb
from ..rows import read_targets, training_dataset
from ..rundir import (DISTILLED, DONE, MANIFEST, OPTIMIZED, RunError, prepare_run_dir, read_done, run_label,
                      write_json_atomic, write_parts_atomic)
from ..student import latest_checkpoint, load_state, standardise, target_transform, unstandardise, usable_checkpoint
from .krr_st import distill_loop_per_worker

DISTILL_JSON = "distill.json"


def distill_fingerprint(cfg: Config, manifest: dict, resumable: bool = False) -> str:
    """What a finished distillation depends on (``resumable``: what its checkpoints depend on, without the
    number of steps and the logging). Workers and devices are left out: they do not change what is learned
    in expectation, and a cluster that grows must be able to finish a run."""
    d = distill_view(cfg.distill)
    for k in ("use_gpu", "cpus_per_worker", "log_every") + (("steps", "checkpoint_every") if resumable else ()):
        d.pop(k)
    if cfg.distill.amp != "auto":  # bf16 features change what is learned; the default keeps older fingerprints
        d["amp"] = cfg.distill.amp
    blob = json.dumps({"distill": d, "optimized": manifest.get("fingerprint"), "image_size": cfg.data.image_size,
                       "seed": cfg.seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def drift_summary(history: list[dict]) -> dict:
    """The last history entry's drift of X_s and Y_s beside the random-walk floor, and their ratios ({} for a run
    logged before drift was)."""
    h = history[-1] if history else {}
    if "x_drift" not in h:
        return {}
    return {"x_drift": h["x_drift"], "y_drift": h["y_drift"], "floor": h["floor"], "floor_pixels": h["floor_pixels"],
            "x_over_floor": round(h["x_drift"] / max(h["floor_pixels"], 1e-12), 3),
            "y_over_floor": round(h["y_drift"] / max(h["floor"], 1e-12), 3)}


def distilled_dir(run: Path, method: str) -> Path:
    return Path(run) / DISTILLED / method


def initial_rows(opt_dir: Path, ids: list[str], size: int, seed: int, image_size: int):
    """The M real rows the synthetic set starts from (a seeded draw): ids, float images (M,3,S,S) in [0,1], targets."""
    import pyarrow.parquet as pq

    pick = sorted(np.random.default_rng(seed).choice(len(ids), size=size, replace=False).tolist())
    want = [ids[i] for i in pick]
    t = pq.read_table(str(opt_dir), columns=["id", "image", "target"], filters=[("id", "in", want)])
    order = {v: j for j, v in enumerate(t.column("id").to_pylist())}
    rows = [order[i] for i in want]
    imgs = t.column("image").to_pylist()
    x = np.stack([resize_rgb(decode_image(imgs[j]), image_size) for j in rows]).astype(np.float32) / 255.0
    y = column_matrix(t.column("target"))[rows]
    return want, np.ascontiguousarray(x.transpose(0, 3, 1, 2)), y


def synthetic_channels(x0: np.ndarray, setting) -> int:
    """``distill.channels`` for these starting images (M,3,S,S): 1, 3, or ``auto`` (1 when every image is grey)."""
    if setting == "auto":
        return 1 if np.array_equal(x0[:, :1].repeat(3, axis=1), x0) else 3
    return int(setting)


def write_distilled(out: Path, x: np.ndarray, y: np.ndarray, init_ids: list[str], method: str) -> Path:
    """RUN/distilled/<method>/data/part-0.parquet: id, image (PNG), label (null), target, participant, model,
    aligned, init_id; written to a temporary folder and renamed."""
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    if x.shape[1] == 1:  # a grey X_s (distill.channels: 1) is stored as RGB, as every other image
        x = np.repeat(x, 3, axis=1)
    pixels = np.clip(np.rint(x.transpose(0, 2, 3, 1) * 255.0), 0, 255).astype(np.uint8)
    n = len(pixels)
    table = pa.table({
        "id": pa.array([f"{method}/{i:06d}" for i in range(n)], pa.string()),
        "image": pa.array([encode_png(p) for p in pixels], pa.binary()),
        "label": pa.nulls(n, pa.int64()),
        "target": ArrowTensorArray.from_numpy(np.ascontiguousarray(y.astype(np.float32))),
        "participant": pa.array([method] * n, pa.string()),
        "model": pa.array([method] * n, pa.string()),
        "aligned": pa.array([True] * n, pa.bool_()),
        "init_id": pa.array(init_ids, pa.string()),
    })
    return write_parts_atomic(out, table)


def run_distill(cfg: Config, run: str | os.PathLike, address: Optional[str] = None,
                log: Callable[[str], None] = print) -> dict:
    """The distill stage: RUN/distilled/<method>/{data/, distill.json, _DONE.json}; returns distill.json.
    ``method: mdatm`` distills labeled images instead (mdatm_stage.py) and needs no optimize run."""
    run, d = Path(run), cfg.distill
    if d.method == "mdatm":
        from .mdatm_stage import run_mdatm

        return run_mdatm(cfg, run, address, log)
    if not (run / MANIFEST).exists() or not (run / OPTIMIZED).is_dir():
        raise RunError(f"{run} has no optimized dataset; run `coopt optimize --config CFG --out {run}` first")
    manifest = json.loads((run / MANIFEST).read_text())
    prepare_run_dir(cfg, run)
    out = distilled_dir(run, d.method)
    out.mkdir(parents=True, exist_ok=True)
    fp = distill_fingerprint(cfg, manifest)
    done = read_done(out)
    if done and done.get("fingerprint") == fp and (out / DISTILL_JSON).exists():
        log(f"[distill] already done: {out} ({done['size']} rows, final loss {done['final_loss']:.4f}); skipping")
        return json.loads((out / DISTILL_JSON).read_text())
    (out / DONE).unlink(missing_ok=True)

    t_start = time.time()
    ids, y = read_targets(run / OPTIMIZED)
    if d.size > len(ids):
        raise ConfigError(f"'distill.size' ({d.size}) is larger than RUN/optimized ({len(ids)} rows)")
    init_ray(address, log=log)
    plan = plan_workers(d, cluster_nodes(), driver=driver_node_id(), key="distill")
    if d.use_gpu:
        check_cuda_usable("distill.use_gpu", 1, log)
    world = max(1, plan.workers)
    real = d.real_batch // world
    if real * world > len(ids) // 2:
        real = max(2, len(ids) // (2 * world))
        log(f"[distill] only {len(ids)} real rows: real batch lowered to {real} per worker")
    pool = [d.pool_size // world + (r < d.pool_size % world) for r in range(world)]
    mean, proj = target_transform(y)
    scale = np.diag(proj).astype(np.float32)  # per-dimension 1 / std
    init_ids, x0, y0 = initial_rows(run / OPTIMIZED, ids, d.size, cfg.seed, cfg.data.image_size)
    y0 = standardise(y0, mean, scale)
    channels = synthetic_channels(x0, d.channels)
    if channels == 1:
        x0 = np.ascontiguousarray(x0[:, :1])

    name = f"coopt-distill-{run_label(run)}"
    storage = (out / "ray_results").resolve()
    exp = storage / name
    rfp = distill_fingerprint(cfg, manifest, resumable=True)
    latest = usable_checkpoint(exp, rfp, log, "distill")
    log(f"[distill] {d.method}: {d.size} synthetic rows from {len(ids)} real ones (target dim {y.shape[1]}), "
        f"{d.steps} steps, pool {d.pool_size} ConvNet-{d.pool_width} (reset every {d.pool_steps} steps), "
        f"real batch {real}/worker{' (crop and flip)' if d.real_augment else ''}, "
        f"{channels} image channel{'s' if channels > 1 else ''}, {plan.message}, run name {name}")
    if latest and latest[1]["epoch"] + 1 >= d.steps:
        log(f"[distill] checkpoint {latest[0].name} already covers {d.steps} steps")
    else:
        if latest:
            log(f"[distill] resuming after step {latest[1]['epoch'] + 1} from {latest[0]}")
        loop_cfg = {
            "x0": x0, "y0": y0.astype(np.float32), "target_mean": mean, "target_scale": scale, "steps": d.steps,
            "lr": d.lr, "lr_final": d.lr_final, "real_batch": real, "pool": pool, "pool_width": d.pool_width,
            "pool_steps": d.pool_steps, "pool_lr": d.pool_lr, "real_augment": d.real_augment, "seed": cfg.seed,
            "fingerprint": rfp,
            "checkpoint_every": d.checkpoint_every, "log_every": d.log_every, "threads": plan.threads,
            "use_gpu": d.use_gpu, "amp": d.amp, "resume_from": str(latest[0]) if latest else None,
            "local_checkpoint_dir": str(exp) if plan.workers == 0 else None, "checkpoint_root": str(exp),
        }
        ds = training_dataset(run / OPTIMIZED, cfg.data.image_size, None, shuffle_seed=cfg.seed)
        fit_torch_trainer(distill_loop_per_worker, loop_cfg, plan, d.use_gpu, name, storage, ds)
        latest = latest_checkpoint(exp)
        if latest is None:
            raise RunError(f"distillation finished without a checkpoint in {exp}")
    state = load_state(latest[0])
    xs = state["model"]["x"].numpy()
    ys = unstandardise(state["model"]["y"].numpy(), mean, scale)
    parts = write_distilled(out, xs, ys, init_ids, d.method)
    history = state["history"]
    result = {
        "method": d.method, "size": d.size, "steps": d.steps, "real_rows": len(ids), "target_dim": int(y.shape[1]),
        "workers": plan.workers, "plan": plan.message, "real_batch_per_worker": real, "pool_per_worker": pool,
        "seconds": round(time.time() - t_start, 3),
        "distill_seconds": round(sum(h["seconds"] for h in history), 3),
        "loss": [h["loss"] for h in history], "loss_steps": [h["step"] for h in history],
        "history": history, "config": dataclasses.asdict(d), "fingerprint": fp, "data": str(parts),
        "channels": channels, "drift": drift_summary(history),
    }
    write_json_atomic(out / DISTILL_JSON, result)
    write_json_atomic(out / DONE, {"fingerprint": fp, "size": d.size, "final_loss": result["loss"][-1]})
    log(f"[distill] done: {d.size} rows, loss {result['loss'][0]:.4f} -> {result['loss'][-1]:.4f} "
        f"in {result['seconds']:.1f}s -> {parts}")
    if result["drift"]:
        dr = result["drift"]
        log(f"[distill] drift: pixels {dr['x_drift']:.2f}/255, targets {dr['y_drift']:.4f} std; a random walk of "
            f"these steps: {dr['floor_pixels']:.2f}/255, {dr['floor']:.4f} std (x {dr['x_over_floor']:.2f}, "
            f"y {dr['y_over_floor']:.2f} times the floor)")
    return result

