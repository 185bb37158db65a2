"""The optimize stage: split the images, then one named Ray Data actor pool per participant streams D(k) ∪ S
through its model and writes every embedding (the image's new target) to RUN/embeddings/<name>/ (Parquet)."""
from __future__ import annotations

import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .cluster import init_ray, live_nodes, plan_waves
from .config import Config, resolve_model
from .data import Source, owner_of, shared_subset
from .embeddings import embedding_dim
from .images import decode_image
from .rundir import DONE, EMBEDDINGS, read_done, write_json_atomic


class ParticipantEmbedder:
    """Callable class for ``map_batches``: decodes images and writes psi_k(x) as each row's target.

    Each participant gets its own subclass (``Participant_<name>``) so the dashboard tells pools apart.
    """

    def __init__(self, model: str, pretrained: Optional[str], use_gpu: bool, threads: int = 1):
        import torch

        from .models import load_model, pick_device

        torch.set_num_threads(max(1, threads))
        self.device = pick_device(prefer_gpu=use_gpu)
        self.model, self.preprocess, self.dim = load_model(model, pretrained, self.device)

    def __call__(self, batch: dict) -> dict:
        import torch

        n = len(batch["id"])
        errors = [""] * n
        tensors, ok = [], []
        for i, data in enumerate(batch["image"]):
            try:
                img = decode_image(data)
            except ValueError as e:  # an unreadable image is an error row with its reason, never a failed batch
                errors[i] = str(e)
                continue
            # Anything else (a bug, MemoryError) fails the batch: Ray retries it, and a persistent failure
            # fails the run loudly instead of being filed as a bad image under max_error_fraction.
            tensors.append(self.preprocess(img))
            ok.append(i)
        emb = np.zeros((n, self.dim), dtype=np.float32)
        if ok:
            with torch.no_grad():
                x = torch.stack(tensors).to(self.device)
                emb[ok] = self.model.encode_image(x).float().cpu().numpy()
        owned = batch["owned"]
        image = np.array([b if o else b"" for b, o in zip(batch["image"], owned)], dtype=object)
        return {
            "id": batch["id"], "embedding": emb, "is_shared": batch["is_shared"], "owned": owned,
            "error": np.array(errors, dtype=object), "image": image, "label": batch["label"],
        }


def select_rows(batch: pa.Table, index: int, k: int, seed: int, shared_ids: frozenset, shares=None) -> pa.Table:
    """Keep the rows of D(index) ∪ S, flagging ``owned`` and ``is_shared``."""
    ids = batch.column("id").to_pylist()
    owned = owner_of(ids, k, seed, shares) == index
    shared = np.array([i in shared_ids for i in ids], dtype=bool)
    keep = owned | shared
    out = batch.append_column("owned", pa.array(owned)).append_column("is_shared", pa.array(shared))
    return out.filter(pa.array(keep))


def embed_participant(cfg: Config, index: int, source: Source, shared_ids: frozenset, out_dir: Path) -> dict:
    """Stream D(index) ∪ S through participant ``index``'s actor pool into ``out_dir`` (Parquet)."""
    import ray.data

    p = cfg.participants[index]
    k = len(cfg.participants)
    t0 = time.time()
    ds = source.dataset(name=f"source_{p.name}")
    ds = ds.map_batches(
        select_rows, batch_format="pyarrow",
        fn_kwargs=dict(index=index, k=k, seed=cfg.seed, shared_ids=shared_ids,
                       shares=[q.share for q in cfg.participants]),
    )
    cls = type(f"Participant_{p.name.replace('-', '_')}", (ParticipantEmbedder,), {})
    remote = {}
    if p.accelerator_type:
        remote["accelerator_type"] = p.accelerator_type
    if p.resources:
        remote["resources"] = dict(p.resources)
    if getattr(p, "node_labels", None):
        remote["label_selector"] = {str(k): str(v) for k, v in p.node_labels.items()}
    ds = ds.map_batches(
        cls,
        fn_constructor_kwargs=dict(model=resolve_model(cfg, p.model), pretrained=p.pretrained,
                                   use_gpu=p.num_gpus > 0, threads=max(1, int(p.num_cpus))),
        compute=ray.data.ActorPoolStrategy(min_size=p.actors, max_size=p.actors_max or p.actors),
        num_gpus=p.num_gpus, num_cpus=p.num_cpus, batch_size=p.batch_size, batch_format="numpy",
        **remote,
    )
    ds.set_name(f"embed_{p.name}")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ds.write_parquet(str(tmp))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    t = pq.read_table(out_dir, columns=["owned", "is_shared", "error"])
    owned = t.column("owned").to_numpy(zero_copy_only=False)
    bad = np.array([e != "" for e in t.column("error").to_pylist()], dtype=bool)
    dim = embedding_dim(out_dir)
    stats = {
        "participant": p.name, "rows": int(owned.sum()), "input_rows": int(t.num_rows),
        "shared_rows": int(t.column("is_shared").to_numpy(zero_copy_only=False).sum()),
        "error_rows": int((owned & bad).sum()), "embed_dim": dim,
        "seconds": round(time.time() - t0, 3), "fingerprint": cfg.fingerprint("seed", "data", "participants", "shared"),
    }
    write_json_atomic(out_dir / DONE, stats)
    return stats


def embed_all(cfg: Config, run: Path, source: Source, shared_ids: frozenset, resources: dict,
              log: Callable[[str], None] = print) -> list[dict]:
    """Run every participant's pool (waves planned from ``resources``), skipping finished ones."""
    emb_root = run / EMBEDDINGS
    emb_root.mkdir(parents=True, exist_ok=True)
    fp = cfg.fingerprint("seed", "data", "participants", "shared")
    stats: dict[int, dict] = {}
    todo = []
    for i, p in enumerate(cfg.participants):
        done = read_done(emb_root / p.name)
        if done and done.get("fingerprint") == fp:
            log(f"[optimize] {p.name}: already done ({done['rows']} rows), skipping")
            stats[i] = dict(done, skipped=True)
        else:
            todo.append(i)
    if todo:
        nodes = live_nodes(log)
        plan = plan_waves([cfg.participants[i] for i in todo], resources, nodes=nodes, indices=todo)
        log(f"[optimize] {plan.message}")
        lock = threading.Lock()

        def one(i):
            p = cfg.participants[i]
            log(f"[optimize] {p.name}: embedding D({p.name}) ∪ S with {p.model} "
                f"({p.actors} actor(s), num_gpus={p.num_gpus})")
            s = embed_participant(cfg, i, source, shared_ids, emb_root / p.name)
            with lock:
                log(f"[optimize] {p.name}: {s['rows']} rows ({s['error_rows']} errors), dim {s['embed_dim']}, "
                    f"{s['seconds']:.1f}s, {s['input_rows'] / max(s['seconds'], 1e-9):.0f} images/s")
            return s

        waves = [[todo[j] for j in w] for w in plan.waves]
        while waves:
            wave_ids = waves.pop(0)
            if len(wave_ids) == 1:
                stats[wave_ids[0]] = one(wave_ids[0])
            else:
                with ThreadPoolExecutor(len(wave_ids)) as ex:
                    for i, s in zip(wave_ids, ex.map(one, wave_ids)):
                        stats[i] = s
            if waves and nodes is not None:  # nodes joined or left meanwhile: plan the rest again
                now = live_nodes(log)
                if now is not None and sorted(n["id"] for n in now) != sorted(n["id"] for n in nodes):
                    import ray

                    nodes, rest = now, [i for w in waves for i in w]
                    plan = plan_waves([cfg.participants[i] for i in rest], ray.cluster_resources(), nodes=nodes,
                                      indices=rest)
                    log(f"[optimize] the cluster changed ({len(nodes)} nodes now); remaining: {plan.message}")
                    waves = [[rest[j] for j in w] for w in plan.waves]
    return [stats[i] for i in range(len(cfg.participants))]


def run_embed(cfg: Config, run: Path, address: Optional[str] = None, log: Callable[[str], None] = print) -> dict:
    """Split the source and embed every participant's D(k) ∪ S (finished participants are skipped).

    Returns ``{"total": images in the source, "participants": per-participant stats, "seconds": embed time}``.
    """
    import ray

    source = Source(cfg.data, run)
    total = len(source.ids)
    shared = frozenset(shared_subset(source.ids, cfg.shared.fraction, cfg.shared.min, cfg.seed))
    log(f"[optimize] {total} images, K={len(cfg.participants)} participants, |S|={len(shared)} shared images")
    init_ray(address, log=log)
    t0 = time.time()
    stats = embed_all(cfg, run, source, shared, ray.cluster_resources(), log=log)
    return {"total": total, "participants": stats, "seconds": time.time() - t0}
