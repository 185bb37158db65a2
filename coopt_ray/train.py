"""Student training on Ray Train (DESIGN.md §1 step 6).

A student of any timm architecture regresses the optimized targets:
``loss = 1 - cos(head(backbone(aug(x))), T(y))`` where ``T`` standardises the targets per dimension
(or PCA-whitens them, as RELA does, with ``student.whiten``). The targets are read from
``RUN/optimized/`` through Ray Data; no teacher runs here.

``train_loop_per_worker`` is a plain function: it runs in-process under
``ScalingConfig(num_workers=0)`` (unit tests) and on every worker under ``TorchTrainer``.
Each epoch is reported with a checkpoint; a rerun resumes from the latest one.
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

from .cluster import cluster_nodes, driver_node_id, fit_torch_trainer, init_ray, plan_workers
from .config import Config, student_view
from .devices import autocast, channels_last, check_cuda_usable, cuda_speed_habits, reduce_sums, train_device
from .augment import make_augment, normalize_pixels, to_float_nchw
from .rundir import (DISTILLED_PARTS, DONE, MANIFEST, OPTIMIZED, SHARED_ROWS, STUDENT, RunError, prepare_run_dir,
                     read_done, run_label, write_json_atomic)
from .heads import HeadTransforms, TorchHeads, head_transforms, multi_head_loss
from .rows import head_moments, row_moments, streamed_subset, training_dataset
from .student import (CKPT_PREFIX, METRICS, WEIGHTS, Student, feature_dim, init_fingerprint, latest_checkpoint,
                      load_state, student_loss, report_checkpoint, resume_state, transform_from_moments, usable_checkpoint, warm_start)

SHUFFLE_BUFFER = 2048       # rows in each worker's local shuffle buffer (reseeded every epoch)
HEAD_COLUMNS = ("own_target", "head", "target_weight")  # a training row's extra columns with student.heads
BATCH_DTYPES = {"image": torch.uint8, "target": torch.float32, "own_target": torch.float32, "head": torch.int64,
                "target_weight": torch.float32}


# ---------------------------------------------------------------- the training loop
def train_loop_per_worker(config: dict) -> dict:
    """Train the student on this worker's shard of ``train``; report each epoch with a checkpoint.

    ``config`` keys: arch, image_size, target_dim, target_mean (d), target_proj (d x k), epochs,
    batch_size (per worker), lr, weight_decay, seed, fingerprint; optional threads, use_gpu, amp
    (auto | bf16 | off: bf16 autocast), resume_from (a checkpoint folder used when Ray Train has none),
    checkpoint_root (the run's checkpoint folder: its newest complete checkpoint wins when newer than Ray
    Train's), local_checkpoint_dir (in-process runs: where checkpoints are kept), log (per-epoch lines on rank 0).
    """
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    device = train_device(bool(config.get("use_gpu")), "student.use_gpu")
    cuda_speed_habits(device)
    amp, fmt = config.get("amp", "auto"), channels_last(device)
    kind = config.get("loss", "cos")
    seed = int(config.get("seed", 0))
    torch.manual_seed(seed)  # identical init on every worker (DDP broadcasts rank 0's anyway)

    mean = torch.as_tensor(np.asarray(config["target_mean"], dtype=np.float32), device=device)
    proj = torch.as_tensor(np.asarray(config["target_proj"], dtype=np.float32), device=device)
    heads = HeadTransforms.from_config(config["heads"]) if config.get("heads") else None
    th = TorchHeads(heads, device) if heads else None
    aligned_head = heads is None or bool(config.get("aligned_head", True))
    student = Student(config["arch"], int(config["image_size"]), proj.shape[1] if aligned_head else 0,
                      heads=heads.out_dims() if heads else None, primary=config.get("primary_head"))

    state, resume_dir = resume_state(ray.train.get_checkpoint(), config)
    history: list = []
    start = 0
    if state is not None:
        student.load_state_dict(state["model"])
        history = list(state.get("history", []))
        start = int(state["epoch"]) + 1
    elif config.get("init_from"):  # student.init: a warm start from a trained student
        what = warm_start(student, config["init_from"])
        if rank == 0 and config.get("log", True):
            _say(f"[train] warm start: {what}")

    if fmt is not None:
        student = student.to(memory_format=fmt)
    if world > 1:
        import ray.train.torch as rtt

        model = rtt.prepare_model(student)
    else:
        model = student.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=float(config["lr"]),
                            weight_decay=float(config.get("weight_decay", 0.01)))
    if state is not None and "optimizer" in state:
        opt.load_state_dict(state["optimizer"])
    if state is not None and rank == 0 and config.get("log", True):
        _say(f"[train] resumed after epoch {start} from {resume_dir}")

    aug = make_augment(int(config["image_size"]), config.get("augment", True))
    shard = ray.train.get_dataset_shard("train")
    epochs = int(config["epochs"])
    bs = int(config["batch_size"])
    extra = {"fingerprint": config.get("fingerprint"), "target_mean": mean.cpu(), "target_proj": proj.cpu(),
             "arch": config["arch"], "image_size": int(config["image_size"])}
    nodes = _worker_nodes(world)
    for epoch in range(start, epochs):
        model.train()
        t0 = time.time()
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch * 1_009 + rank)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no per-step sync
        k = len(heads.names) if heads else 0
        head_sums = torch.zeros(2 * k, dtype=torch.float64, device=device)  # per head: loss sum, then rows
        seen = 0
        for batch in shard.iter_torch_batches(batch_size=bs, drop_last=True, dtypes=BATCH_DTYPES,
                                              local_shuffle_buffer_size=SHUFFLE_BUFFER,
                                              local_shuffle_seed=seed * 100_003 + epoch * 1_009 + rank):
            x = to_float_nchw(batch["image"].to(device))
            x = normalize_pixels(aug(x, gen) if aug is not None else x)
            if fmt is not None:
                x = x.contiguous(memory_format=fmt)
            y = (batch["target"].to(device) - mean) @ proj
            with autocast(amp, device):
                out = model(x, all_heads=True) if heads else model(x)
            if heads:  # in fp32, whatever the net ran in
                loss, hs, hc = multi_head_loss(out, {c: batch[c].to(device) for c in HEAD_COLUMNS}, th, y, kind)
                head_sums += torch.cat([hs, hc]).double()
            else:
                loss = student_loss(out, y, kind)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach().double() * len(x)
            seen += len(x)
        tot = reduce_sums([loss_sum, seen, *head_sums], device, world)  # one sync per epoch, on the loop's device
        if tot[1] == 0:
            raise RuntimeError(f"epoch {epoch + 1}: no full batch of {bs} rows on a worker; "
                               "lower student.batch_size or use more data")
        dt = time.time() - t0
        metrics = {"epoch": epoch + 1, "loss": tot[0] / tot[1], "images": int(tot[1]),
                   "seconds": round(dt, 3), "images_per_s": round(float(tot[1]) / max(dt, 1e-9), 2),
                   "nodes": nodes}
        if heads:  # each head's mean loss over its own rows this epoch
            metrics["head_loss"] = {n: tot[2 + j] / max(tot[2 + k + j], 1.0) for j, n in enumerate(heads.names)}
            metrics["head_rows"] = {n: int(tot[2 + k + j]) for j, n in enumerate(heads.names)}
        history.append(metrics)
        name = f"{CKPT_PREFIX}{epoch:04d}"
        if rank == 0 and config.get("log", True):
            _say(f"[train] epoch {epoch + 1}/{epochs}  loss {metrics['loss']:.4f}  "
                 f"{metrics['images']} images in {dt:.1f}s ({metrics['images_per_s']:.1f} img/s)")
        report_checkpoint(config, rank, name, metrics, model, opt, epoch, history, extra)
    return {"start_epoch": start, "history": history}


def _worker_nodes(world: int) -> list:
    """The Ray node id of every rank (rank order), so a run records where its workers really ran."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    if world > 1 and torch.distributed.is_initialized():
        nodes = [None] * world
        torch.distributed.all_gather_object(nodes, node)
        return nodes
    return [node]


def _say(line: str) -> None:
    """One progress line from a worker (Ray Train patches ``print``, which would log it twice)."""
    import sys

    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------- the stage (driver)
def train_fingerprint(cfg: Config, manifest: dict, with_epochs: bool = True, run: Optional[Path] = None) -> str:
    """What a finished (or resumable, without epochs) training depends on."""
    import dataclasses

    s = dataclasses.asdict(cfg.student)
    for k in ("workers", "use_gpu", "cpus_per_worker") + (() if with_epochs else ("epochs",)):
        s.pop(k, None)  # how many workers is not what is learned
    s = student_view(s)  # keys added later, at their "as before" values: older runs keep their fingerprints
    if s.get("augment", True) is True:
        s.pop("augment", None)  # the same for the switch's default (weak is a str: it stays)
    if s.get("init") is not None:
        s["init"] = [s["init"], init_fingerprint(s["init"])]  # the weights it starts from, not just the path
    data = manifest.get("fingerprint")
    if s.pop("data") != "optimized":  # a distilled set: what it was distilled with (RUN/distilled/<m>/_DONE.json)
        data = [data, (read_done(run / cfg.student.data) or {}).get("fingerprint")] if run else data
    blob = json.dumps({"student": s, "optimized": data,
                       "image_size": cfg.data.image_size, "seed": cfg.seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_own_targets(cfg: Config, run: Path, rows_dir: Path) -> None:
    """With ``student.heads`` other than aligned: RunError unless RUN's merge kept each participant's own targets."""
    import pyarrow.parquet as pq

    if cfg.student.heads == "aligned":
        return
    parts = sorted(Path(rows_dir).glob("*.parquet"))
    if not parts or "own_target" not in pq.read_schema(parts[0]).names or not (run / SHARED_ROWS).is_file():
        raise RunError(f"student.heads: {cfg.student.heads} needs each participant's own targets, which {run} "
                       "lacks (merged by an older version): delete RUN/manifest.json and rerun `coopt optimize`")


def head_dims(cfg: Config, manifest: dict) -> Optional[dict]:
    """Each participant's embedding width, where ``student.heads`` gives participants heads of their own."""
    if cfg.student.heads == "aligned":
        return None
    return {p["name"]: int(p["embed_dim"]) for p in manifest["participants"]}


def student_heads(cfg: Config, run: Path, dims: Optional[dict], moments: dict, keep, fdim: int):
    """``HeadTransforms`` for ``student.heads`` (None for ``aligned``, where ``dims``, :func:`head_dims`, is None):
    each participant's standardisation from ``moments``, its own rows' ``{name: (n, mean, cov)}``
    (:func:`rows.row_moments` over the training rows); a participant that owns none (``share: 0``) gets its rows
    of S instead. ``run_train`` has already checked that RUN has them (:func:`check_own_targets`)."""
    if dims is None:
        return None
    moments = dict(moments)
    few = {n: d for n, d in dims.items() if moments[n][0] < 2}  # share 0: its part of the data is S alone
    if few:
        moments.update(head_moments(run / SHARED_ROWS, few, keep))
    try:
        return head_transforms(moments, dims, whiten=cfg.student.whiten, phi_s=cfg.student.phi_s, out_dim=fdim)
    except ValueError as e:
        raise RunError(f"student.heads: {e}") from None


def heads_metrics(mode: str, heads: HeadTransforms, manifest: dict, history: list) -> dict:
    """What metrics.json says about the heads: per participant its teacher, widths, rows and loss by epoch."""
    models = {p["name"]: p["model"] for p in manifest["participants"]}
    last = history[-1] if history else {}
    return {
        "heads_mode": mode, "aligned_head": mode != "per-participant", "primary_head": manifest["best"],
        "heads": heads.out_dims(),
        "head_info": {n: {"model": models.get(n), "target_dim": d, "head_dim": o, "rows": last.get("head_rows", {}).get(n),
                          "loss": [h.get("head_loss", {}).get(n) for h in history]}
                      for (n, o), d in zip(heads.out_dims().items(), heads.dims)},
    }


def run_train(cfg: Config, run: str | os.PathLike, address: Optional[str] = None,
              log: Callable[[str], None] = print) -> dict:
    """The train stage: RUN/student/{student.pt, metrics.json, _DONE.json}; returns metrics.json content."""
    run = Path(run)
    s = cfg.student
    man_path = run / MANIFEST
    if not man_path.exists() or not (run / OPTIMIZED).is_dir():
        raise RunError(f"{run} has no optimized dataset; run `coopt optimize --config CFG --out {run}` first")
    manifest = json.loads(man_path.read_text())
    rows_dir = run / OPTIMIZED  # or a distilled set (student.data)
    if s.data != OPTIMIZED:
        if read_done(run / s.data) is None:
            raise RunError(f"student.data is {s.data} but {run / s.data} is not finished; run "
                           f"`coopt distill --config CFG --run {run}` first")
        rows_dir = run / s.data / DISTILLED_PARTS
    check_own_targets(cfg, run, rows_dir)  # before any Ray work
    prepare_run_dir(cfg, run)
    out = run / STUDENT
    out.mkdir(exist_ok=True)
    fp = train_fingerprint(cfg, manifest, run=run)
    done = read_done(out)
    if done and done.get("fingerprint") == fp and (out / WEIGHTS).exists():
        log(f"[train] already done: {out / WEIGHTS} (loss {done['final_loss']:.4f}); skipping")
        return json.loads((out / METRICS).read_text())
    (out / DONE).unlink(missing_ok=True)

    t_start = time.time()
    init_ray(address, log=log)
    driver = driver_node_id()
    plan = plan_workers(s, cluster_nodes(), driver=driver)  # before any work: a size no node holds fails now
    if s.use_gpu:
        check_cuda_usable("student.use_gpu", 1, log)  # a GPU that CUDA cannot use fails now, in one line
    workers, cpw, threads = plan.workers, plan.cpus, plan.threads
    keep = streamed_subset(rows_dir, s.limit, cfg.seed)  # ids and targets are streamed, never all held here
    # one pass over the rows: the aligned targets' moments and, with heads, each participant's own
    dims = head_dims(cfg, manifest)
    (rows, t_mean, t_cov), own = row_moments(rows_dir, keep, dims)
    fdim = feature_dim(s.arch, cfg.data.image_size)
    mean, proj = transform_from_moments(rows, t_mean, t_cov, whiten=s.whiten, out_dim=fdim, phi_s=s.phi_s)
    tdim = len(mean)
    heads = student_heads(cfg, run, dims, own, keep, fdim)
    world = max(1, workers)
    per_worker = max(2, s.batch_size // world)
    if rows // world < per_worker:
        per_worker = max(2, rows // world)
        log(f"[train] only {rows} rows for {world} worker(s): per-worker batch lowered to {per_worker}")

    name = f"coopt-train-{run_label(run)}"
    storage = (out / "ray_results").resolve()
    exp = storage / name
    rfp = train_fingerprint(cfg, manifest, with_epochs=False, run=run)
    latest = usable_checkpoint(exp, rfp, log, "train")
    log(f"[train] student {s.arch} on {rows} rows of {s.data} (target dim {tdim} -> {proj.shape[1]}"
        f"{', whitened' if s.whiten else ', PHI-S' if s.phi_s else ', standardised'}), {s.epochs} epochs, "
        f"{plan.message}, batch {per_worker}/worker, run name {name}")
    if heads:
        log(f"[train] heads: {s.heads}: " + ", ".join(f"{n} ({d} -> {o})" for (n, o), d in zip(
            heads.out_dims().items(), heads.dims)) + (" + aligned" if s.heads == "both" else "")
            + f"; primary {manifest['best']}")
    if latest and latest[1]["epoch"] + 1 >= s.epochs:
        log(f"[train] checkpoint {latest[0].name} already covers {s.epochs} epochs")
    else:
        if latest:
            log(f"[train] resuming after epoch {latest[1]['epoch'] + 1} from {latest[0]}")
        loop_cfg = {
            "arch": s.arch, "image_size": cfg.data.image_size, "target_dim": tdim,
            "target_mean": mean.tolist(), "target_proj": proj.tolist(), "epochs": s.epochs,
            "batch_size": per_worker, "lr": s.lr, "weight_decay": s.weight_decay, "seed": cfg.seed,
            "fingerprint": rfp, "threads": threads, "use_gpu": s.use_gpu, "amp": s.amp, "loss": s.loss, "augment": s.augment,
            "resume_from": str(latest[0]) if latest else None, "init_from": s.init,
            "local_checkpoint_dir": str(exp) if workers == 0 else None, "checkpoint_root": str(exp),
            "heads": heads.to_config() if heads else None, "aligned_head": s.heads != "per-participant",
            "primary_head": manifest["best"],
        }
        ds = training_dataset(rows_dir, cfg.data.image_size, keep, shuffle_seed=cfg.seed,
                              heads=heads.names if heads else None, shared_rows=run / SHARED_ROWS)
        fit_torch_trainer(train_loop_per_worker, loop_cfg, plan, s.use_gpu, name, storage, ds)
        latest = latest_checkpoint(exp)
        if latest is None:
            raise RunError(f"training finished without a checkpoint in {exp}")
    state = load_state(latest[0])
    tmp = out / (WEIGHTS + ".tmp")
    torch.save(state["model"], tmp)
    os.replace(tmp, out / WEIGHTS)
    history = state["history"]
    metrics = {
        "arch": s.arch, "image_size": cfg.data.image_size, "target_dim": tdim,
        "head_dim": int(proj.shape[1]) if not heads or s.heads != "per-participant" else
        heads.out_dims()[manifest["best"]], "whiten": s.whiten, "phi_s": s.phi_s, "loss_kind": s.loss, "data": s.data,
        "rows": rows, "epochs": s.epochs,
        "workers": workers, "cpus_per_worker": cpw, "batch_size_per_worker": per_worker,
        "worker_nodes": history[-1].get("nodes") if history else None, "driver_node": driver,
        "history": history, "loss": [h["loss"] for h in history],
        "seconds": {"train": round(sum(h["seconds"] for h in history), 3),
                    "stage": round(time.time() - t_start, 3)},
        "checkpoint": str(latest[0]), "fingerprint": fp,
    }
    if heads:
        metrics.update(heads_metrics(s.heads, heads, manifest, history))
    write_json_atomic(out / METRICS, metrics)
    write_json_atomic(out / DONE, {"fingerprint": fp, "final_loss": history[-1]["loss"], "epochs": s.epochs})
    log(f"[train] done: final loss {history[-1]['loss']:.4f} after {len(history)} epochs "
        f"in {time.time() - t_start:.1f}s -> {out / WEIGHTS}")
    return metrics
