"""The evaluate stage (DESIGN.md §1 step 7): the same linear probe (probe.py) scores the student, every
teacher and a random-init student on a labeled split (one Ray task per teacher, one for the two students); writes
RUN/eval.json."""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .cluster import check_tasks_fit, cluster_nodes, init_ray
from .config import resolve_model
from .images import arrays_to_rgb
from .labeled import EvalSkipped, labeled_splits, load_labeled  # noqa: F401 (the stage's public names)
from .devices import check_cuda_usable, stage_device
from .models import load_model
from .probe import backbone_features, embed_arrays, linear_probe
from .rundir import EVAL, STUDENT, RunError, read_done, read_json, write_json_atomic
from .student import METRICS, WEIGHTS, build_backbone, load_student_backbone


# ---------------------------------------------------------------- the evaluate stage
def score_backbone(state: Optional[dict], arch: str, image_size: int, data: dict, epochs: int,
                   seed: int = 0, use_gpu: bool = False) -> dict:
    """Linear-probe accuracy of a student backbone (``state`` None: random init, seeded)."""
    t0 = time.time()
    torch.manual_seed(seed)
    backbone = build_backbone(arch, image_size)
    if state is not None:
        backbone.load_state_dict(state)
    backbone = backbone.to(stage_device(use_gpu, "student.use_gpu"))
    ftr = backbone_features(backbone, data["probe_rgb"])
    fte = backbone_features(backbone, data["test_rgb"])
    t1 = time.time()
    acc = linear_probe(ftr, data["probe_y"], fte, data["test_y"], epochs=epochs, seed=seed)
    return {"arch": arch, "probe_accuracy": acc, "feature_dim": int(ftr.shape[1]),
            "seconds": round(time.time() - t0, 3), "embed_seconds": round(t1 - t0, 3)}


def score_teacher(model: str, pretrained: Optional[str], data: dict, epochs: int, seed: int = 0,
                  use_gpu: bool = False, key: str = "participants[*].num_gpus", pool: str = "auto") -> dict:
    """Linear-probe accuracy of a participant's image embeddings, any family (``key``: the config key that asked
    for a GPU, named if none is usable)."""
    t0 = time.time()
    m, preprocess, dim = load_model(model, pretrained, str(stage_device(use_gpu, key)), pool)
    ftr = embed_arrays(m, preprocess, data["probe_raw"])
    fte = embed_arrays(m, preprocess, data["test_raw"])
    t1 = time.time()
    acc = linear_probe(ftr, data["probe_y"], fte, data["test_y"], epochs=epochs, seed=seed)
    return {"model": model, "probe_accuracy": acc, "embed_dim": int(dim),
            "seconds": round(time.time() - t0, 3), "embed_seconds": round(t1 - t0, 3)}


def _score_task(kind: str, args: dict, data: dict, state: Optional[dict] = None) -> dict:
    """One probe task: ``{"teacher": ...}``, or for ``kind`` "backbones" the trained student and the random-init
    student of its architecture one after the other (one worker process, one import of torch and timm, not two)."""
    threads = int(os.environ.get("COOPT_EVAL_THREADS", "0") or 0)
    if threads:
        torch.set_num_threads(threads)
    data = {**data, "probe_y": np.array(data["probe_y"]), "test_y": np.array(data["test_y"])}  # writable
    if kind == "teacher":
        return {"teacher": score_teacher(data=data, **args)}
    return {"student": score_backbone(state, data=data, **args), "random_init": score_backbone(None, data=data, **args)}


def eval_fingerprint(cfg, train_done: dict) -> str:
    view = cfg.fingerprint_view()  # its eval section leaves out where a probe runs (gpu_fraction, num_cpus)
    blob = json.dumps({"student": train_done.get("fingerprint"), "eval": view["eval"],
                       "participants": view["participants"],
                       "image_size": cfg.data.image_size, "data": cfg.data.path, "seed": cfg.seed},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _demand(opts: dict) -> dict:
    return {"CPU": float(opts["num_cpus"]), **({"GPU": float(opts["num_gpus"])} if opts["num_gpus"] else {})}


def probe_options(cfg) -> dict:
    """Ray options of each probe task: ``{"student": ..., <participant name>: ...}``; ``eval.num_cpus`` CPUs, plus
    ``eval.gpu_fraction`` of a GPU where the student or the participant asked for a GPU.

    Probes the cluster cannot run at once wait for a worker: Ray hands a finished probe's worker (torch and the
    model libraries already imported) to the next probe of the same shape, so fewer processes start."""
    frac, cpus = cfg.eval.gpu_fraction, cfg.eval.num_cpus
    out = {"student": {"num_cpus": cpus, "num_gpus": frac if cfg.student.use_gpu else 0}}
    for p in cfg.participants:
        out[p.name] = {"num_cpus": cpus, "num_gpus": frac if p.num_gpus > 0 else 0}
    return out


def probe_demands(cfg) -> list:
    """``(config key, resources)`` of every probe task, for :func:`cluster.check_tasks_fit`."""
    opts = probe_options(cfg)
    return [("student.use_gpu", _demand(opts["student"]))] + [
        (f"participants[{i}].num_gpus", _demand(opts[p.name])) for i, p in enumerate(cfg.participants)]


def run_evaluate(cfg, run, address: Optional[str] = None, log=print) -> dict:
    """The evaluate stage: the same linear probe for the student, every teacher and a random-init
    student of the same architecture; writes RUN/eval.json and returns its content.

    Each teacher is scored in one Ray task, the student and the random init together in another (1 CPU, plus
    ``eval.gpu_fraction`` of a GPU where the participant/student asks for one).
    """
    import ray

    run = Path(run)
    done = read_done(run / STUDENT)
    if not done or not (run / STUDENT / WEIGHTS).exists():
        raise RunError(f"{run} has no trained student; run `coopt train --config CFG --run {run}` first")
    out_path = run / EVAL
    fp = eval_fingerprint(cfg, done)
    if out_path.exists():
        old = json.loads(out_path.read_text())
        if old.get("fingerprint") == fp:
            log(f"[evaluate] already done: {out_path}; skipping")
            return old
    t_start = time.time()
    meta = read_json(run / STUDENT / METRICS)
    try:
        splits = labeled_splits(cfg)
    except EvalSkipped as e:
        log(f"[evaluate] skipped: {e}")
        res = {"skipped": str(e), "student": {"arch": meta["arch"], "probe_accuracy": None},
               "teachers": {}, "random_init": None, "seconds": {}, "fingerprint": fp}
        write_json_atomic(out_path, res)
        return res
    (px, py), (tx, ty) = splits["probe"], splits["test"]
    log(f"[evaluate] linear probe ({cfg.eval.probe_epochs} epochs): {splits['description']}")
    size = int(meta["image_size"])
    data = {"probe_raw": px, "test_raw": tx, "probe_y": py, "test_y": ty,
            "probe_rgb": arrays_to_rgb(px, size), "test_rgb": arrays_to_rgb(tx, size)}
    backbone, _ = load_student_backbone(run / STUDENT)
    epochs, seed, s_gpu = cfg.eval.probe_epochs, cfg.seed, cfg.student.use_gpu
    popts = probe_options(cfg)
    sopts = popts["student"]
    init_ray(address, log=log)
    demands = probe_demands(cfg)
    check_tasks_fit(demands, cluster_nodes())  # a task no node holds would wait forever
    gpu_keys = [(k, d["GPU"]) for k, d in demands if d.get("GPU")]
    if gpu_keys:
        check_cuda_usable(*gpu_keys[0], log)
    data_ref = ray.put(data)
    state_ref = ray.put({k: v.cpu() for k, v in backbone.state_dict().items()})
    remote = ray.remote(_score_task)
    jobs = {}
    bargs = {"arch": meta["arch"], "image_size": size, "epochs": epochs, "seed": seed, "use_gpu": s_gpu}
    jobs[remote.options(name="probe_student", **sopts).remote("backbones", bargs, data_ref, state_ref)] = None
    for i, p in enumerate(cfg.participants):
        opts = popts[p.name]
        args = {"model": resolve_model(cfg, p.model), "pretrained": p.pretrained, "epochs": epochs,
                "seed": seed, "use_gpu": p.num_gpus > 0, "key": f"participants[{i}].num_gpus", "pool": p.pool}
        jobs[remote.options(name=f"probe_{p.name}", **opts).remote("teacher", args, data_ref)] = p.name
    results: dict = {}
    pending = list(jobs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        name = jobs[ready[0]]
        for kind, r in ray.get(ready[0]).items():
            results[(kind, name)] = r
            label = name or kind.replace("_", "-")
            log(f"[evaluate] {label:<12} probe accuracy {r['probe_accuracy']:.4f}  ({r['seconds']:.1f}s)")
    teachers = {p.name: results[("teacher", p.name)] for p in cfg.participants}
    student = {**results[("student", None)], "epochs": meta["epochs"], "rows": meta["rows"]}
    rnd = results[("random_init", None)]
    best_t = max(teachers, key=lambda n: teachers[n]["probe_accuracy"])
    res = {
        "student": student, "teachers": teachers, "random_init": rnd,
        "best_teacher": best_t,
        "probe": {"description": splits["description"], "probe_rows": int(len(py)), "test_rows": int(len(ty)),
                  "epochs": epochs, "classes": int(max(py.max(), ty.max()) + 1)},
        "seconds": {"student": student["seconds"], "random_init": rnd["seconds"],
                    **{n: t["seconds"] for n, t in teachers.items()}, "total": round(time.time() - t_start, 3)},
        "fingerprint": fp,
    }
    write_json_atomic(out_path, res)
    log(f"[evaluate] student {student['probe_accuracy']:.4f} vs random-init {rnd['probe_accuracy']:.4f} "
        f"vs best teacher {best_t} {teachers[best_t]['probe_accuracy']:.4f} -> {out_path}")
    return res
