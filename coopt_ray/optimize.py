"""Ray Data embedding pipelines: one named actor pool per participant, streaming D(k) ∪ S to Parquet."""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .config import Config, ConfigError, ParticipantConfig, resolve_model
from .data import Source, decode_image, owner_of

DONE = "_DONE.json"


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
                tensors.append(self.preprocess(decode_image(data)))
                ok.append(i)
            except Exception as e:  # one bad image must never fail the batch
                errors[i] = str(e) if isinstance(e, ValueError) else f"preprocess failed: {type(e).__name__}: {e}"
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


def select_rows(batch: pa.Table, index: int, k: int, seed: int, shared_ids: frozenset) -> pa.Table:
    """Keep the rows of D(index) ∪ S, flagging ``owned`` and ``is_shared``."""
    ids = batch.column("id").to_pylist()
    owned = owner_of(ids, k, seed) == index
    shared = np.array([i in shared_ids for i in ids], dtype=bool)
    keep = owned | shared
    out = batch.append_column("owned", pa.array(owned)).append_column("is_shared", pa.array(shared))
    return out.filter(pa.array(keep))


@dataclass
class Plan:
    """Which participants run together (waves) and why."""

    waves: list
    message: str


def pool_demand(p: ParticipantConfig) -> dict:
    """Resources the minimum size of a participant's pool needs."""
    d = {"CPU": float(p.num_cpus) * p.actors}
    if p.num_gpus:
        d["GPU"] = float(p.num_gpus) * p.actors
    if p.accelerator_type:
        d[f"accelerator_type:{p.accelerator_type}"] = 0.001 * p.actors
    for key, val in (p.resources or {}).items():
        d[key] = float(val) * p.actors
    return d


def plan_waves(parts, resources: dict, reserve_cpus: float = 1.0) -> Plan:
    """Group participants into waves whose pool minimums fit the cluster at once.

    One CPU is held back for the read/select tasks. A participant that cannot fit even alone
    is a configuration error (e.g. ``num_gpus`` on a cluster with no GPUs), raised at once.
    """
    avail = dict(resources)
    avail["CPU"] = max(avail.get("CPU", 0.0) - reserve_cpus, 0.0)
    for i, p in enumerate(parts):
        for key, val in pool_demand(p).items():
            have = avail.get(key, 0.0)
            if val > have + 1e-9:
                what = "GPUs" if key == "GPU" else ("CPUs (one is kept for reading)" if key == "CPU" else key)
                raise ConfigError(
                    f"'participants[{i}]' ({p.name}) needs {val:g} {what} for {p.actors} actor(s), "
                    f"but the cluster has {have:g}"
                )
    waves, cur, used = [], [], {}
    for i, p in enumerate(parts):
        dem = pool_demand(p)
        fits = all(used.get(k, 0.0) + v <= avail.get(k, 0.0) + 1e-9 for k, v in dem.items())
        if cur and not fits:
            waves.append(cur)
            cur, used = [], {}
        cur.append(i)
        for k, v in dem.items():
            used[k] = used.get(k, 0.0) + v
    waves.append(cur)
    if len(waves) == 1:
        msg = f"all {len(parts)} participant pools fit the cluster at once"
    else:
        msg = (f"the cluster fits {max(len(w) for w in waves)} of {len(parts)} participant pools at once; "
               f"running them in {len(waves)} waves: "
               + " | ".join(",".join(parts[i].name for i in w) for w in waves))
    return Plan(waves=waves, message=msg)


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON via a temporary file and rename, so readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float))
    os.replace(tmp, path)


def read_done(d: Path) -> Optional[dict]:
    """The done-marker of a finished stage folder, or None."""
    f = d / DONE
    return json.loads(f.read_text()) if f.exists() else None


def embed_participant(cfg: Config, index: int, source: Source, shared_ids: frozenset, out_dir: Path) -> dict:
    """Stream D(index) ∪ S through participant ``index``'s actor pool into ``out_dir`` (Parquet)."""
    import ray.data

    p = cfg.participants[index]
    k = len(cfg.participants)
    t0 = time.time()
    ds = source.dataset(name=f"source_{p.name}")
    ds = ds.map_batches(
        select_rows, batch_format="pyarrow",
        fn_kwargs=dict(index=index, k=k, seed=cfg.seed, shared_ids=shared_ids),
    )
    cls = type(f"Participant_{p.name.replace('-', '_')}", (ParticipantEmbedder,), {})
    remote = {}
    if p.accelerator_type:
        remote["accelerator_type"] = p.accelerator_type
    if p.resources:
        remote["resources"] = dict(p.resources)
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


def embedding_dim(d: Path) -> int:
    """Embedding width stored in a participant's Parquet folder."""
    for f in sorted(d.glob("*.parquet")):
        t = pq.read_table(f, columns=["embedding"])
        if t.num_rows:
            return int(column_matrix(t.column("embedding")).shape[1])
    raise RuntimeError(f"{d} holds no embedding rows")


def column_matrix(col) -> np.ndarray:
    """A Parquet/Arrow tensor or list column as a float32 (n, d) matrix."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    n = len(col)
    if n == 0:
        return np.zeros((0, 0), dtype=np.float32)
    if isinstance(col.type, pa.ExtensionType):  # Ray tensor types (fixed or variable shape)
        arr = col.to_numpy()
        if arr.dtype == object:
            arr = np.stack([np.asarray(a, dtype=np.float32).ravel() for a in arr])
        return np.asarray(arr, dtype=np.float32).reshape(n, -1)
    flat = col.flatten()
    while pa.types.is_list(flat.type) or pa.types.is_large_list(flat.type) or pa.types.is_fixed_size_list(flat.type):
        flat = flat.flatten()
    return np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(n, -1)


def embed_all(cfg: Config, run: Path, source: Source, shared_ids: frozenset, resources: dict,
              log: Callable[[str], None] = print) -> list[dict]:
    """Run every participant's pool (waves planned from ``resources``), skipping finished ones."""
    emb_root = run / "embeddings"
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
        plan = plan_waves([cfg.participants[i] for i in todo], resources)
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

        for wave in plan.waves:
            wave_ids = [todo[j] for j in wave]
            if len(wave_ids) == 1:
                stats[wave_ids[0]] = one(wave_ids[0])
            else:
                with ThreadPoolExecutor(len(wave_ids)) as ex:
                    for i, s in zip(wave_ids, ex.map(one, wave_ids)):
                        stats[i] = s
    return [stats[i] for i in range(len(cfg.participants))]
