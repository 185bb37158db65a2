"""The optimize stage: split the images once at the source (split.py), then one named Ray Data actor pool per
participant streams D(k) ∪ S, read from its own partitions only, through its model and writes every embedding
(the image's new target) to RUN/embeddings/<name>/ (Parquet). The driver holds nothing per image."""
from __future__ import annotations

import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .cluster import init_ray, live_nodes, plan_waves, pool_demand
from .config import Config, resolve_model
from .embeddings import embedding_dim
from .preprocess import (PIXELS, decode_batch, norm_tensors, params_of_loaded, preprocess_params,
                         to_model_input)
from .rundir import DONE, EMBEDDINGS, read_done, write_json_atomic
from .split import Split, participant_dataset, run_split


class ParticipantEmbedder:
    """Callable class for ``map_batches``: embeds the decode stage's uint8 pixels (preprocess.decode_batch) and
    writes psi_k(x) as each row's target; error rows pass through with a zero embedding.

    The model runs under ``inference_mode``, with bf16 autocast per ``amp`` (auto: on CUDA only, so CPU results do
    not move), from pinned host memory with non-blocking copies on CUDA; embeddings come back float32. Each
    participant gets its own subclass (``Participant_<name>``) so the dashboard tells pools apart.
    """

    def __init__(self, model: str, pretrained: Optional[str], use_gpu: bool, threads: int = 1, amp: str = "auto",
                 params: Optional[dict] = None, key: str = "participants[*].num_gpus", pool: str = "auto"):
        import torch

        from .devices import amp_dtype, channels_last, stage_device
        from .models import load_model

        torch.set_num_threads(max(1, threads))
        self.device = stage_device(use_gpu, key)
        self.amp = amp
        amp_dtype(amp, self.device)  # a bad mode fails here, not on the first batch
        self.model, self.preprocess, self.dim = load_model(model, pretrained, self.device, pool)
        self.params = params or preprocess_params(model, pretrained)
        loaded = params_of_loaded(self.model)
        if loaded is not None and loaded != self.params:  # the decode stage would feed the model the wrong pixels
            raise RuntimeError(f"{model}: preprocessing read from its config {self.params} differs from the loaded "
                               f"model's {loaded}")
        self.mean, self.std = norm_tensors(self.params, self.device)
        self.fmt = channels_last(self.device)
        self._pinned = None

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) -> float32 (N, dim) embeddings."""
        import torch

        from .devices import autocast

        x = torch.from_numpy(np.ascontiguousarray(pixels))
        cuda = self.device.type == "cuda"
        if cuda:  # one reused pinned buffer: the host-to-device copy is asynchronous
            if self._pinned is None or self._pinned.numel() < x.numel():
                self._pinned = torch.empty(x.numel(), dtype=torch.uint8).pin_memory()
            x = self._pinned[:x.numel()].view(x.shape).copy_(x).to(self.device, non_blocking=True)
        with torch.inference_mode(), autocast(self.amp, self.device):
            x = to_model_input(x, self.mean, self.std)
            if self.fmt is not None:
                x = x.contiguous(memory_format=self.fmt)
            out = self.model.encode_image(x)
        return out.float().cpu().numpy()

    def __call__(self, batch: dict) -> dict:
        if PIXELS not in batch:  # raw rows (a direct call, not the pipeline): decode them here the same way
            batch = decode_batch(batch, self.params)
        n = len(batch["id"])
        errors = batch["error"]
        ok = np.array([not e for e in errors], dtype=bool)
        emb = np.zeros((n, self.dim), dtype=np.float32)
        if ok.any():
            emb[ok] = self.embed_pixels(batch[PIXELS][ok])
        return {
            "id": batch["id"], "embedding": emb, "is_shared": batch["is_shared"], "owned": batch["owned"],
            "error": np.asarray(errors, dtype=object), "image": batch["image"], "label": batch["label"],
        }


def output_counts(out_dir: Path) -> dict:
    """Rows, owned rows, shared rows and owned error rows of a participant's output, streamed in batches."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    c = dict(rows=0, owned=0, shared=0, errors=0)
    for b in pads.dataset(str(out_dir), format="parquet").to_batches(columns=["owned", "is_shared", "error"]):
        owned = b.column("owned")
        c["rows"] += b.num_rows
        c["owned"] += pc.sum(owned).as_py() or 0
        c["shared"] += pc.sum(b.column("is_shared")).as_py() or 0
        c["errors"] += pc.sum(pc.and_(owned, pc.not_equal(b.column("error"), ""))).as_py() or 0
    return c


def read_bytes_from_stats(ds) -> Optional[int]:
    """Bytes the participant's read operator produced, from Ray Data's stats of the finished write (the Arrow
    size of the rows read: the image bytes plus small columns); None when the stats do not say."""
    try:
        done = getattr(ds, "_write_ds", None) or ds  # write_parquet keeps the executed plan's stats here
        ops = [o for d in _with_parents(done._get_stats_summary()) for o in d.operators_stats]
        sizes = [o.output_size_bytes.sum for o in ops if o.operator_name.startswith("Read")
                 and "Write" not in o.operator_name and o.output_size_bytes]
        return int(sum(sizes)) if sizes else None
    except Exception:  # noqa: BLE001 - a private stats structure: report nothing rather than fail the run
        return None


def _with_parents(summary):
    yield summary
    for p in summary.parents:
        yield from _with_parents(p)


def embed_dataset(cfg: Config, index: int, split: Split):
    """Participant ``index``'s lazy pipeline: read D(index) ∪ S -> decode (CPU tasks: image bytes -> uint8 at the
    model's input size, error rows for unreadable images) -> its named actor pool (embeddings).

    The decode tasks are their own stage whenever their resources differ from the pool's actors (a GPU pool, or
    ``decode_cpus`` != ``num_cpus``); for a CPU pool asking the same, Ray Data fuses them into the actors."""
    import ray.data

    p = cfg.participants[index]
    ds = participant_dataset(split, index, name=f"source_{p.name}")
    cls = type(f"Participant_{p.name.replace('-', '_')}", (ParticipantEmbedder,), {})
    remote = {}
    if p.accelerator_type:
        remote["accelerator_type"] = p.accelerator_type
    if p.resources:
        remote["resources"] = dict(p.resources)
    if getattr(p, "node_labels", None):
        remote["label_selector"] = {str(k): str(v) for k, v in p.node_labels.items()}
    model = resolve_model(cfg, p.model)
    params = preprocess_params(model, p.pretrained)  # from the model's config: no weights on the driver
    ds = ds.map_batches(decode_batch, fn_kwargs=dict(params=params), batch_size=p.batch_size, batch_format="numpy",
                        num_cpus=p.decode_cpus)
    ds = ds.map_batches(
        cls,
        fn_constructor_kwargs=dict(model=model, pretrained=p.pretrained, use_gpu=p.num_gpus > 0,
                                   threads=max(1, int(p.num_cpus)), amp=p.amp, params=params,
                                   key=f"participants[{index}].num_gpus", pool=p.pool),
        compute=ray.data.ActorPoolStrategy(min_size=p.actors, max_size=p.actors_max or p.actors),
        num_gpus=p.num_gpus, num_cpus=p.num_cpus, batch_size=p.batch_size, batch_format="numpy",
        **remote,
    )
    ds.set_name(f"embed_{p.name}")
    return ds


def embed_participant(cfg: Config, index: int, split: Split, out_dir: Path) -> dict:
    """Stream D(index) ∪ S, read from participant ``index``'s partitions only, through its actor pool into
    ``out_dir`` (Parquet)."""
    p = cfg.participants[index]
    t0 = time.time()
    ds = embed_dataset(cfg, index, split)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ds.write_parquet(str(tmp))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    ray_read = read_bytes_from_stats(ds)
    c = output_counts(out_dir)
    stats = {
        "participant": p.name, "rows": c["owned"], "input_rows": c["rows"], "shared_rows": c["shared"],
        "error_rows": c["errors"], "embed_dim": embedding_dim(out_dir), "bytes_read": split.bytes_for(index),
        "ray_read_bytes": ray_read,
        "seconds": round(time.time() - t0, 3), "fingerprint": cfg.fingerprint("seed", "data", "participants", "shared"),
    }
    write_json_atomic(out_dir / DONE, stats)
    return stats


def rolling_ok(parts) -> bool:
    """Whether pools may start one by one as others finish: every pool asks for the same resources, with no
    node labels, accelerator types or custom resources that would tie it to particular nodes."""
    return len({tuple(sorted(pool_demand(p).items())) for p in parts}) == 1 and not any(
        p.accelerator_type or p.resources or getattr(p, "node_labels", None) for p in parts)


def embed_all(cfg: Config, run: Path, split: Split, resources: dict,
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
            s = embed_participant(cfg, i, split, emb_root / p.name)
            with lock:
                log(f"[optimize] {p.name}: {s['rows']} rows ({s['error_rows']} errors), dim {s['embed_dim']}, "
                    f"{s['seconds']:.1f}s, {s['input_rows'] / max(s['seconds'], 1e-9):.0f} images/s, "
                    f"read {s['bytes_read'] / 1e6:.1f} MB of {split.source_bytes / 1e6:.1f} MB")
            return s

        waves = [[todo[j] for j in w] for w in plan.waves]
        if len(waves) > 1 and rolling_ok([cfg.participants[i] for i in todo]):
            # Identical pools: any len(waves[0]) of them fit together, so the next starts as soon as one ends
            # instead of waiting for its whole wave (no core idles behind the wave's slowest pool).
            slots = max(len(w) for w in waves)
            log(f"[optimize] identical pools: running {slots} at a time, the next starting as one finishes")
            with ThreadPoolExecutor(slots) as ex:
                order = [i for w in waves for i in w]
                for i, s in zip(order, ex.map(one, order)):
                    stats[i] = s
            waves = []
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
    """Split the source once (Ray tasks) and embed every participant's D(k) ∪ S (finished participants are
    skipped).

    Returns ``{"total": images in the source, "participants": per-participant stats, "seconds": embed time,
    "split": split stats}``.
    """
    import ray

    init_ray(address, log=log)
    # Plan every pool before any work: a pool no node can hold is a one-line ConfigError now, not after the split.
    plan_waves(list(cfg.participants), ray.cluster_resources(), nodes=live_nodes(log))
    t0 = time.time()
    split = run_split(cfg, run, log=log)
    log(f"[optimize] {split.total} images, K={len(cfg.participants)} participants, |S|={split.shared} shared images")
    stats = embed_all(cfg, run, split, ray.cluster_resources(), log=log)
    return {"total": split.total, "participants": stats, "seconds": time.time() - t0,
            "split": {"shared": split.shared, "rows": split.rows, "bytes": split.bytes,
                      "source_bytes": split.source_bytes, "seconds": split.seconds}}
