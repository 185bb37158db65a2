"""`coopt run` (one round, or continual rounds through rounds.py) and `coopt optimize`: the order of the stages
(zoo when missing -> optimize -> merge -> [distill, when student.data names a distilled set] -> train -> evaluate ->
report). Each stage skips itself when its done-marker says it finished with the same config."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Optional

from .cluster import check_tasks_fit, cluster_nodes, driver_node_id, init_ray, plan_waves, plan_workers
from .config import Config, resolve_model, zoo_path
from .devices import check_cuda_usable
from .distill.stage import run_distill
from .evaluate import probe_demands, run_evaluate
from .merge import finished_manifest, run_merge
from .optimize import run_embed
from .preflight import check_paths
from .report import build_report, summary_table
from .rounds import run_rounds
from .rundir import EVAL, MANIFEST, REPORT, STUDENT, prepare_run_dir, read_json
from .student import METRICS
from .train import run_train


def run_optimize(cfg: Config, run: str | os.PathLike, address: Optional[str] = None,
                 log: Callable[[str], None] = print) -> dict:
    """`coopt optimize`: the optimize stage (split, embed) then the merge stage (score, align, merge); returns
    the manifest (also RUN/manifest.json)."""
    run = Path(run)
    prepare_run_dir(cfg, run)
    man = finished_manifest(cfg, run)
    if man is not None:
        log(f"[optimize] already done: {run / MANIFEST} ({man['optimized_rows']} rows); skipping")
        return man
    t_start = time.time()
    embedded = run_embed(cfg, run, address=address, log=log)
    return run_merge(cfg, run, embedded, t_start, log=log)


def check_placements(cfg: Config, run: Path, address: Optional[str] = None, log: Callable[[str], None] = print) -> None:
    """Plan every stage this run will start on the live cluster (the optimize pools unless optimize finished,
    the distill workers when the student trains on a distilled set, the train workers, the probe tasks), and
    check CUDA on a GPU node when any of them asks for a GPU: a request the cluster cannot meet is a one-line
    ConfigError naming the key (exit 2) before the first stage, not after hours of optimize."""
    import ray

    init_ray(address, log=log)
    nodes, driver = cluster_nodes(), driver_node_id()
    gpu_keys = []
    if finished_manifest(cfg, run) is None:
        plan_waves(list(cfg.participants), ray.cluster_resources(), nodes=nodes)
        gpu_keys += [(f"participants[{i}].num_gpus", p.num_gpus) for i, p in enumerate(cfg.participants) if p.num_gpus]
    if cfg.student.data != "optimized":  # distill (krr-st) runs first, on Ray Train workers
        plan_workers(cfg.distill, nodes, driver=driver, key="distill")
        gpu_keys += [("distill.use_gpu", 1)] if cfg.distill.use_gpu else []
    plan_workers(cfg.student, nodes, driver=driver)
    gpu_keys += [("student.use_gpu", 1)] if cfg.student.use_gpu else []
    demands = probe_demands(cfg)
    check_tasks_fit(demands, nodes)
    gpu_keys += [(k, d["GPU"]) for k, d in demands if d.get("GPU")]
    if gpu_keys:
        check_cuda_usable(*min(gpu_keys, key=lambda kv: kv[1]), log)  # the smallest share: the likeliest free


def run_all(cfg: Config, run: str | os.PathLike, address: Optional[str] = None,
            log: Callable[[str], None] = print, rounds: Optional[int] = None) -> dict:
    """`coopt run`: one round in RUN, or with ``rounds`` (``--rounds R``) or ``rounds.count`` > 1 the continual
    rounds RUN/rounds/<r>/ (rounds.py), each one round of :func:`run_round`. Returns that round's or RUN/rounds.json's
    content."""
    if rounds is not None or cfg.rounds.count > 1:
        return run_rounds(cfg, run, cfg.rounds.count if rounds is None else rounds,
                          lambda c, d: run_round(c, d, address=address, log=log), log=log)
    return run_round(cfg, run, address=address, log=log)


def run_round(cfg: Config, run: str | os.PathLike, address: Optional[str] = None,
              log: Callable[[str], None] = print) -> dict:
    """zoo (when missing) -> optimize -> [distill] -> train -> evaluate -> report; prints the probe table.

    The offline teacher zoo is built only when a participant's ``local-dir:`` folder is missing and
    ``zoo_dir`` is the default zoo; every stage skips itself when its done-marker matches.
    """
    run = Path(run)
    t0 = time.time()
    times = {}
    check_placements(cfg, run, address=address, log=log)  # every stage's, before the first one starts
    missing = [p.name for p in cfg.participants if p.model.startswith("local-dir:")
               and not Path(resolve_model(cfg, p.model)[len("local-dir:"):]).is_dir()]
    if missing and Path(cfg.zoo_dir) == Path(Config().zoo_dir):
        from .zoo import build_zoo

        log(f"[zoo] teacher folders missing for {', '.join(missing)}: building the zoo in {zoo_path(cfg)}")
        t = time.time()
        build_zoo(zoo_path(cfg), progress=log)
        times["zoo"] = time.time() - t
    check_paths(cfg)
    stages = [("optimize", lambda: run_optimize(cfg, run, address=address, log=log))]
    if cfg.student.data != "optimized":  # the student trains on a distilled set: distill it first
        stages.append(("distill", lambda: run_distill(cfg, run, address=address, log=log)))
    for stage, fn in (*stages,
                      ("train", lambda: run_train(cfg, run, address=address, log=log)),
                      ("evaluate", lambda: run_evaluate(cfg, run, address=address, log=log)),
                      ("report", lambda: build_report(run, log=log))):
        t = time.time()
        log(f"[run] ---- {stage} ----")
        fn()
        times[stage] = time.time() - t
    man = read_json(run / MANIFEST)
    metrics = read_json(run / STUDENT / METRICS)
    ev = read_json(run / EVAL)
    times["total"] = time.time() - t0
    log("[run] linear-probe accuracy (test split) and timings:")
    log(summary_table(man, metrics, ev))
    log("[run] stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
    log(f"[run] report: {run / REPORT / 'report.html'}")
    return {"manifest": man, "metrics": metrics, "eval": ev, "seconds": times}
