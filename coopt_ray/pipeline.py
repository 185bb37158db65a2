"""Stage orchestration: run directories, Ray start-up, and the optimize stage (split -> embed -> score ->
align -> merge). Each stage is skipped when its done-marker says it finished with the same config."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Optional

import yaml

from .config import Config, ConfigError, parse_config

OPTIMIZE_SECTIONS = ("seed", "data", "participants", "shared", "align")


class RunError(RuntimeError):
    """A run that cannot finish (for example, too many unreadable images); the message says why."""


def prepare_run_dir(cfg: Config, run: Path, sections=OPTIMIZE_SECTIONS) -> None:
    """Create RUN and record the config; refuse a RUN whose finished results came from a different config
    for ``sections`` (a RUN where nothing finished yet simply takes the new config)."""
    run.mkdir(parents=True, exist_ok=True)
    saved = run / "config.yaml"
    if saved.exists():
        old = parse_config(yaml.safe_load(saved.read_text()))
        diff = [s for s in sections if old.fingerprint(s) != cfg.fingerprint(s)]
        if diff and _has_results(run):
            raise ConfigError(
                f"--out {run} was made with a different config (differs in: {', '.join(diff)}); "
                "use a new --out, or rerun with the config it was made with"
            )
        if diff and old.fingerprint("data") != cfg.fingerprint("data"):
            import shutil  # nothing finished yet (e.g. the last try failed on its config): start afresh

            shutil.rmtree(run / "source", ignore_errors=True)
    tmp = saved.with_name("config.yaml.tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    os.replace(tmp, saved)


def _has_results(run: Path) -> bool:
    """Whether RUN holds finished optimize work (a participant's done marker or the manifest)."""
    from .optimize import DONE

    return (run / "manifest.json").exists() or any((run / "embeddings").glob(f"*/{DONE}"))


def init_ray(address: Optional[str] = None, num_cpus: Optional[int] = None, log: Callable = print) -> None:
    """Connect to ``address`` (``auto``, ``ray://...``) or start a local Ray; configure Ray Data."""
    import ray
    import ray.data

    if not ray.is_initialized():
        kwargs = {"address": address} if address else {"num_cpus": num_cpus}
        ray.init(**{k: v for k, v in kwargs.items() if v is not None}, log_to_driver=True)
        log(f"[ray] connected: {ray.cluster_resources()}")
    ctx = ray.data.DataContext.get_current()
    ctx.wait_for_min_actors_s = int(os.environ.get("COOPT_WAIT_FOR_ACTORS_S", "300"))
    ctx.enable_progress_bars = os.environ.get("COOPT_PROGRESS", "1") != "0"


def run_optimize(cfg: Config, run: str | os.PathLike, address: Optional[str] = None,
                 log: Callable[[str], None] = print) -> dict:
    """The optimize stage: returns the manifest (also written to RUN/manifest.json)."""
    import ray

    from . import merge as M
    from .data import Source, shared_subset
    from .optimize import embed_all

    run = Path(run)
    prepare_run_dir(cfg, run)
    manifest_path = run / "manifest.json"
    fp = cfg.fingerprint(*OPTIMIZE_SECTIONS)
    if manifest_path.exists():
        import json

        man = json.loads(manifest_path.read_text())
        if man.get("fingerprint") == fp:
            log(f"[optimize] already done: {manifest_path} ({man['optimized_rows']} rows); skipping")
            return man
    t_start = time.time()
    source = Source(cfg.data, run)
    total = len(source.ids)
    shared = frozenset(shared_subset(source.ids, cfg.shared.fraction, cfg.shared.min, cfg.seed))
    log(f"[optimize] {total} images, K={len(cfg.participants)} participants, |S|={len(shared)} shared images")
    init_ray(address, log=log)
    t0 = time.time()
    stats = embed_all(cfg, run, source, shared, ray.cluster_resources(), log=log)
    t_embed = time.time() - t0
    error_rows = M.write_errors(cfg, run)
    if total and error_rows / total > cfg.max_error_fraction:
        raise RunError(
            f"{error_rows} of {total} images ({error_rows / total:.1%}) could not be read, more than "
            f"max_error_fraction={cfg.max_error_fraction:g}; see {run / 'errors'} for each id and reason"
        )
    scored = M.score_and_align(cfg, run)
    for n, v in scored["uniformity"].items():
        r2, held = scored["r2"][n]
        extra = "best" if n == scored["best"] else (f"align R2 {r2:.3f} (held-out {held:.3f})"
                                                     if r2 is not None and held is not None else "not aligned")
        log(f"[optimize] {n}: uniformity {v:.4f}  {extra}")
    t0 = time.time()
    rows = M.merge(cfg, run, scored["alignments"], stats[[p.name for p in cfg.participants].index(scored["best"])]["embed_dim"], log=log)
    t_merge = time.time() - t0
    if rows + error_rows != total:
        raise RunError(f"row accounting failed: {rows} optimized + {error_rows} errors != {total} images")
    man = M.build_manifest(cfg, stats, scored, total, rows, error_rows, {
        "optimize": t_embed, "score": scored["score_seconds"], "align": scored["align_seconds"],
        "merge": t_merge, "total": time.time() - t_start,
    })
    M.write_json_atomic(manifest_path, man)
    log(f"[optimize] done: best={man['best']} target_dim={man['target_dim']} optimized_rows={rows} "
        f"error_rows={error_rows} total_rows={total} in {time.time() - t_start:.1f}s -> {manifest_path}")
    return man


def run_all(cfg: Config, run: str | os.PathLike, address: Optional[str] = None,
            log: Callable[[str], None] = print) -> dict:
    """`coopt run`: zoo (when missing) -> optimize -> train -> evaluate -> report; prints the probe table.

    The offline teacher zoo is built only when a participant's ``local-dir:`` folder is missing and
    ``zoo_dir`` is the default zoo; every stage skips itself when its done-marker matches.
    """
    import json

    from .config import Config as _Config, check_paths, resolve_model, zoo_path
    from .evaluate import run_evaluate
    from .report import build_report, summary_table
    from .train import run_train

    run = Path(run)
    t0 = time.time()
    times = {}
    missing = [p.name for p in cfg.participants if p.model.startswith("local-dir:")
               and not Path(resolve_model(cfg, p.model)[len("local-dir:"):]).is_dir()]
    if missing and Path(cfg.zoo_dir) == Path(_Config().zoo_dir):
        from .zoo import build_zoo

        log(f"[zoo] teacher folders missing for {', '.join(missing)}: building the zoo in {zoo_path(cfg)}")
        t = time.time()
        build_zoo(zoo_path(cfg), progress=log)
        times["zoo"] = time.time() - t
    check_paths(cfg)
    for stage, fn in (("optimize", lambda: run_optimize(cfg, run, address=address, log=log)),
                      ("train", lambda: run_train(cfg, run, address=address, log=log)),
                      ("evaluate", lambda: run_evaluate(cfg, run, address=address, log=log)),
                      ("report", lambda: build_report(run, log=log))):
        t = time.time()
        log(f"[run] ---- {stage} ----")
        fn()
        times[stage] = time.time() - t
    man = json.loads((run / "manifest.json").read_text())
    metrics = json.loads((run / "student" / "metrics.json").read_text())
    ev = json.loads((run / "eval.json").read_text())
    times["total"] = time.time() - t0
    log("[run] linear-probe accuracy (test split) and timings:")
    log(summary_table(man, metrics, ev))
    log("[run] stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
    log(f"[run] report: {run / 'report' / 'report.html'}")
    return {"manifest": man, "metrics": metrics, "eval": ev, "seconds": times}
