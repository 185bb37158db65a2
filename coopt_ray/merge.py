"""The merge stage: score, align and merge. The shared subset's embeddings pick the best model, every other
participant's targets are mapped into its space, and all shards become one optimized dataset + manifest."""
from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from .align import Alignment, coverage, fit_with_stats
from .config import Config, resolve_model
from .embeddings import column_matrix, shared_matrices
from .rundir import (ALIGN, EMBEDDINGS, ERRORS, MANIFEST, OPTIMIZE_SECTIONS, OPTIMIZED, SHARED_ROWS, RunError,
                     read_json, write_json_atomic)
from .uniformity import best_participant, uniformity

ERROR_SCHEMA = pa.schema([("id", pa.string()), ("participant", pa.string()), ("stage", pa.string()),
                          ("error", pa.string())])


def score_and_align(cfg: Config, run: Path) -> dict:
    """Uniformity per participant on S, the best one, and an alignment into its space for the others."""
    t0 = time.time()
    ids, mats = shared_matrices(cfg, run)
    values = {n: uniformity(x) for n, x in mats.items()}
    cover = coverage(mats) if len(ids) >= 3 else {n: float("nan") for n in mats}
    if cfg.score.method == "coverage":
        if len(ids) < 3:
            raise RunError(f"score.method: coverage needs at least 3 shared images every participant read, got "
                           f"{len(ids)}")
        best = best_participant(cover, higher_is_better=True)
    else:
        best = best_participant(values)
    t_score = time.time() - t0
    t1 = time.time()
    aligns: dict[str, Optional[Alignment]] = {}
    r2: dict[str, tuple] = {}
    ridges: dict[str, Optional[float]] = {}
    (run / ALIGN).mkdir(exist_ok=True)
    for n, x in mats.items():
        if n == best or not cfg.align.enabled:
            aligns[n], r2[n], ridges[n] = None, (None, None), None
            continue
        t, fit_r2, held, lam = fit_with_stats(x, mats[best], cfg.align.ridge, cfg.shared.heldout, cfg.seed,
                                              select=cfg.align.select)
        aligns[n], r2[n], ridges[n] = t, (fit_r2, held), lam
        np.savez(run / ALIGN / f"{n}.npz", W=t.W, b=t.b)
    return {"shared_ids": ids, "uniformity": values, "coverage": cover, "best": best, "alignments": aligns, "r2": r2, "ridge": ridges,
            "score_seconds": t_score, "align_seconds": time.time() - t1}


def _merge_batch(batch: pa.Table, maps: dict, own_dim: int) -> pa.Table:
    """Owned, readable rows of an embeddings batch as optimized rows, targets aligned per participant.

    ``maps`` holds, per participant name, ``(W, b, model, target_dim)``; W is None for the best participant.
    ``own_target`` keeps each row's unaligned embedding, zero-padded to ``own_dim`` (the widest participant's), for
    per-participant student heads. The participant comes from the Parquet file's folder (``embeddings/<name>/``).
    """
    from ray.data.extensions import ArrowTensorArray

    keep = pc.and_(batch.column("owned"), pc.equal(batch.column("error"), ""))
    batch = batch.filter(keep)
    names = [Path(p).parent.name for p in batch.column("path").to_pylist()]
    dim = next(iter(maps.values()))[3]
    y = np.zeros((batch.num_rows, dim), dtype=np.float32)
    own = np.zeros((batch.num_rows, own_dim), dtype=np.float32)
    for name in set(names):
        W, b, _, _ = maps[name]
        rows = np.array([n == name for n in names])
        x = column_matrix(batch.filter(pa.array(rows)).column("embedding"))
        y[rows] = x if W is None else (x.astype(np.float64) @ W + b).astype(np.float32)
        own[rows, :x.shape[1]] = x
    return pa.table({
        "id": batch.column("id"), "image": batch.column("image"), "label": batch.column("label"),
        "target": ArrowTensorArray.from_numpy(np.ascontiguousarray(y)),
        "participant": pa.array(names, pa.string()),
        "model": pa.array([maps[n][2] for n in names], pa.string()),
        "aligned": pa.array([maps[n][0] is not None for n in names], pa.bool_()),
        "own_target": ArrowTensorArray.from_numpy(own),
    })


def write_shared_rows(cfg: Config, run: Path, shared_ids: list, target_dim: int, own_dim: int) -> int:
    """RUN/shared_rows.parquet: every image of S as embedded by each participant that does not own it (its owner's
    embedding is in RUN/optimized), so per-participant heads train on all of S. Columns as RUN/optimized's, with a
    zero ``target``; only S's ids every participant read. Returns its rows."""
    from ray.data.extensions import ArrowTensorArray

    want = pa.array(list(shared_ids), pa.string())
    parts, images, others = [], {}, {}
    for p in cfg.participants:  # one read of S per participant: its owned rows keep the image bytes (preprocess.py)
        t = pads.dataset(str(run / EMBEDDINGS / p.name), format="parquet").to_table(
            columns=["id", "image", "label", "embedding", "owned"],
            filter=pads.field("is_shared") & (pads.field("error") == ""))
        t = t.filter(pc.is_in(t.column("id"), value_set=want))
        mine = t.filter(t.column("owned"))
        images.update(zip(mine.column("id").to_pylist(), mine.column("image").to_pylist()))
        others[p.name] = t.filter(pc.invert(t.column("owned")))
    for p in cfg.participants:
        t = others[p.name]
        x = column_matrix(t.column("embedding")) if t.num_rows else np.zeros((0, 1), np.float32)
        own = np.zeros((t.num_rows, own_dim), dtype=np.float32)
        own[:, :x.shape[1]] = x
        n = t.num_rows
        parts.append(pa.table({
            "id": t.column("id"), "image": pa.array([images[i] for i in t.column("id").to_pylist()], pa.binary()),
            "label": t.column("label"), "target": ArrowTensorArray.from_numpy(np.zeros((n, target_dim), np.float32)),
            "participant": pa.array([p.name] * n, pa.string()),
            "model": pa.array([resolve_model(cfg, p.model)] * n, pa.string()),
            "aligned": pa.array([False] * n, pa.bool_()),
            "own_target": ArrowTensorArray.from_numpy(own)}))
    out = pa.concat_tables(parts)
    tmp = run / (SHARED_ROWS + ".tmp")
    pq.write_table(out, tmp)
    os.replace(tmp, run / SHARED_ROWS)
    return out.num_rows


def write_errors(cfg: Config, run: Path) -> int:
    """Write RUN/errors/<participant>.parquet from the owned rows that failed; return their count."""
    err_dir = run / ERRORS
    err_dir.mkdir(exist_ok=True)
    total = 0
    for p in cfg.participants:
        # Only the failed rows come back to the driver (a filtered scan), never the participant's ids.
        t = pads.dataset(str(run / EMBEDDINGS / p.name), format="parquet").to_table(
            columns=["id", "error"], filter=pads.field("owned") & (pads.field("error") != ""))
        n = t.num_rows
        out = pa.table({"id": t.column("id"), "participant": pa.array([p.name] * n, pa.string()),
                        "stage": pa.array(["embed"] * n, pa.string()), "error": t.column("error")},
                       schema=ERROR_SCHEMA)
        pq.write_table(out, err_dir / f"{p.name}.parquet")
        total += n
    return total


def merge(cfg: Config, run: Path, aligns: dict, target_dim: int, own_dim: int,
          log: Callable[[str], None] = print) -> int:
    """Write RUN/optimized/ (Parquet parts) in one Ray Data pass over all participants; return its rows."""
    import ray.data

    out, tmp = run / OPTIMIZED, run / (OPTIMIZED + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    maps = {}
    for p in cfg.participants:
        t = aligns.get(p.name)
        maps[p.name] = (None if t is None else t.W, None if t is None else t.b,
                        resolve_model(cfg, p.model), target_dim)
    dirs = [str(run / EMBEDDINGS / p.name) for p in cfg.participants]
    ds = ray.data.read_parquet(dirs, file_extensions=["parquet"], include_paths=True)
    ds = ds.map_batches(_merge_batch, batch_format="pyarrow", fn_kwargs=dict(maps=maps, own_dim=own_dim))
    ds.set_name("merge")
    ds.write_parquet(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in out.glob("*.parquet"))
    log(f"[optimize] merged {rows} rows into {out}")
    return rows


def split_summary(cfg: Config, emb_stats: list[dict], split: Optional[dict]) -> Optional[dict]:
    """|S|, the source's bytes and each participant's bytes read: its two partitions on disk (and their share of
    the source), and the rows its read produced according to Ray Data's stats."""
    if not split:
        return None
    src = max(split["source_bytes"], 1)
    return {"shared": split["shared"], "source_bytes": split["source_bytes"], "seconds": split.get("seconds"),
            "bytes_read": {p.name: s.get("bytes_read") for p, s in zip(cfg.participants, emb_stats)},
            "read_fraction": {p.name: round(s["bytes_read"] / src, 4) for p, s in zip(cfg.participants, emb_stats)
                              if s.get("bytes_read") is not None},
            "ray_read_bytes": {p.name: s.get("ray_read_bytes") for p, s in zip(cfg.participants, emb_stats)}}


def build_manifest(cfg: Config, emb_stats: list[dict], scored: dict, total_rows: int, optimized_rows: int,
                   error_rows: int, timings: dict, split: Optional[dict] = None) -> dict:
    """The manifest.json content (DESIGN.md §3)."""
    from importlib.metadata import version  # not importing torch and open_clip into the driver for this

    best = scored["best"]
    dims = {s["participant"]: s["embed_dim"] for s in emb_stats}
    parts = []
    for p, s in zip(cfg.participants, emb_stats):
        r2, held = scored["r2"][p.name]
        parts.append({
            "name": p.name, "model": resolve_model(cfg, p.model), "pretrained": p.pretrained,
            "embed_dim": s["embed_dim"], "rows": s["rows"], "shared_rows": s["shared_rows"],
            "error_rows": s["error_rows"], "uniformity": scored["uniformity"][p.name],
            "coverage": _num(scored["coverage"][p.name]),
            "aligned": scored["alignments"].get(p.name) is not None,
            "align_r2": _num(r2), "align_heldout_r2": _num(held), "align_ridge": _num(scored["ridge"].get(p.name)),
            "seconds": s["seconds"],
        })
    return {
        "participants": parts, "best": best, "score_method": cfg.score.method, "target_dim": dims[best],
        "shared_ids": scored["shared_ids"], "shared_dropped": shared_dropped(emb_stats, scored),
        "total_rows": total_rows, "split": split_summary(cfg, emb_stats, split),
        "optimized_rows": optimized_rows, "error_rows": error_rows,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "fingerprint": cfg.fingerprint(*OPTIMIZE_SECTIONS),
        "versions": {"ray": version("ray"), "torch": version("torch"), "open_clip": version("open_clip_torch")},
    }


def shared_dropped(emb_stats: list[dict], scored: dict) -> int:
    """Images of S left out of scoring and alignment because some participant could not read them."""
    return max(s["shared_rows"] for s in emb_stats) - len(scored["shared_ids"])


def _num(v):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 6)


def finished_manifest(cfg: Config, run: Path) -> Optional[dict]:
    """RUN's manifest when it was made with this config's optimize sections (the stage is done), else None."""
    man = read_json(run / MANIFEST)
    return man if man and man.get("fingerprint") == cfg.fingerprint(*OPTIMIZE_SECTIONS) else None


def run_merge(cfg: Config, run: Path, embedded: dict, t_start: float, log: Callable[[str], None] = print) -> dict:
    """Errors table, score, align, merge and manifest from the embed stage's output (``embedded``: see
    ``optimize.run_embed``); checks that every image is an optimized row or an error row."""
    total, stats = embedded["total"], embedded["participants"]
    error_rows = write_errors(cfg, run)
    if total and error_rows / total > cfg.max_error_fraction:
        raise RunError(
            f"{error_rows} of {total} images ({error_rows / total:.1%}) could not be read, more than "
            f"max_error_fraction={cfg.max_error_fraction:g}; see {run / ERRORS} for each id and reason"
        )
    scored = score_and_align(cfg, run)
    dropped = shared_dropped(stats, scored)
    if dropped:
        log(f"[optimize] warning: {dropped} shared image(s) could not be read by every participant; S for "
            f"scoring and alignment is the {len(scored['shared_ids'])} every participant read "
            f"(manifest: shared_dropped; the reasons are in {run / ERRORS} or the participants' embeddings)")
    for n, v in scored["uniformity"].items():
        r2, held = scored["r2"][n]
        extra = "best" if n == scored["best"] else (
            f"align R2 {r2:.3f} (held-out {held:.3f}, ridge {scored['ridge'][n]:g})"
            if r2 is not None and held is not None else "not aligned")
        log(f"[optimize] {n}: uniformity {v:.4f}  coverage {scored['coverage'][n]:.3f}  {extra}")
    t0 = time.time()
    best_dim = stats[[p.name for p in cfg.participants].index(scored["best"])]["embed_dim"]
    own_dim = max(st["embed_dim"] for st in stats)
    rows = merge(cfg, run, scored["alignments"], best_dim, own_dim, log=log)
    write_shared_rows(cfg, run, scored["shared_ids"], best_dim, own_dim)
    t_merge = time.time() - t0
    if rows + error_rows != total:
        raise RunError(f"row accounting failed: {rows} optimized + {error_rows} errors != {total} images")
    man = build_manifest(cfg, stats, scored, total, rows, error_rows, {
        "optimize": embedded["seconds"], "score": scored["score_seconds"], "align": scored["align_seconds"],
        "merge": t_merge, "total": time.time() - t_start,
    }, split=embedded.get("split"))
    write_json_atomic(run / MANIFEST, man)
    log(f"[optimize] done: best={man['best']} target_dim={man['target_dim']} optimized_rows={rows} "
        f"error_rows={error_rows} total_rows={total} in {time.time() - t_start:.1f}s -> {run / MANIFEST}")
    return man
