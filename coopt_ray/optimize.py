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
    placement: Optional[list] = None  # per wave: {participant index: [node id per actor]} (per-node plans)


def actor_demand(p: ParticipantConfig) -> dict:
    """Resources one actor of a participant's pool asks Ray for (all on one node)."""
    d = {"CPU": float(p.num_cpus)}
    if p.num_gpus:
        d["GPU"] = float(p.num_gpus)
    if p.accelerator_type:
        d[f"accelerator_type:{p.accelerator_type}"] = 0.001  # what Ray's accelerator_type= asks for
    for key, val in (p.resources or {}).items():
        d[key] = float(val)
    return d


def pool_demand(p: ParticipantConfig) -> dict:
    """Resources the minimum size of a participant's pool needs (cluster-wide)."""
    return {k: v * p.actors for k, v in actor_demand(p).items()}


def label_matches(labels: dict, selector: Optional[dict]) -> bool:
    """Whether a node's ``labels`` satisfy a Ray label selector (``v``, ``!v``, ``in(a,b)``, ``!in(a,b)``)."""
    for key, want in (selector or {}).items():
        want = str(want).strip()
        neg = want.startswith("!")
        want = want[1:] if neg else want
        if want.startswith("in(") and want.endswith(")"):
            ok = labels.get(key) in {v.strip() for v in want[3:-1].split(",")}
        else:
            ok = labels.get(key) == want
        if ok == neg:
            return False
    return True


def cluster_nodes() -> list[dict]:
    """Alive nodes of the connected Ray cluster: ``{"id", "resources", "labels"}`` (totals, not free)."""
    import ray

    return [{"id": n["NodeID"], "resources": dict(n.get("Resources") or {}), "labels": dict(n.get("Labels") or {})}
            for n in ray.nodes() if n.get("Alive")]


def _fits(free: dict, dem: dict) -> bool:
    return all(free.get(k, 0.0) + 1e-9 >= v for k, v in dem.items())


def _place_pool(p: ParticipantConfig, free: list) -> Optional[list]:
    """First-fit the pool's minimum actors onto nodes (``free``: per-node resources, updated in place).

    GPU actors try GPU nodes first, CPU-only actors try nodes without GPUs first (as Ray's scheduler
    does). Returns the node index of each actor, or None (``free`` untouched) when they do not all fit.
    """
    dem = actor_demand(p)
    sel = getattr(p, "node_labels", None)
    gpu = "GPU" in dem
    order = sorted(range(len(free)), key=lambda j: (bool(free[j]["res"].get("GPU")) != gpu, j))
    trial = [dict(n["res"]) for n in free]
    where = []
    for _ in range(p.actors):
        for j in order:
            if label_matches(free[j]["labels"], sel) and _fits(trial[j], dem):
                for k, v in dem.items():
                    trial[j][k] = trial[j].get(k, 0.0) - v
                where.append(j)
                break
        else:
            return None
    for j, res in enumerate(trial):
        free[j]["res"] = res
    return where


def _no_node_error(i: int, p: ParticipantConfig, nodes: list) -> ConfigError:
    dem = actor_demand(p)
    sel = getattr(p, "node_labels", None)
    want = ", ".join(f"{k}={v:g}" for k, v in dem.items())
    matching = [n for n in nodes if label_matches(n["labels"], sel)]
    if sel and not matching:
        return ConfigError(
            f"'participants[{i}].node_labels' ({p.name}): no node of the cluster carries labels {dict(sel)} "
            f"(node labels: {[{k: v for k, v in n['labels'].items() if not k.startswith('ray.io/node-id')} for n in nodes]})")
    best = max((sum(1 for k, v in dem.items() if n["resources"].get(k, 0.0) + 1e-9 >= v) for n in matching), default=0)
    sizes = "; ".join(
        ", ".join(f"{k}={n['resources'].get(k, 0.0):g}" for k in dem) for n in matching) or "none"
    return ConfigError(
        f"'participants[{i}]' ({p.name}) needs {p.actors} actor(s) of {{{want}}} each, and one actor must fit "
        f"on one node, but {'no node has that' if best < len(dem) else 'the nodes cannot hold them all'} "
        f"({len(matching)} node(s){' with matching labels' if sel else ''}: {sizes})")


def plan_waves(parts, resources: dict, reserve_cpus: float = 1.0, nodes: Optional[list] = None,
               indices: Optional[list] = None) -> Plan:
    """Group participants into waves whose pool minimums fit the cluster at once.

    ``resources`` are the cluster totals; one CPU is held back for the read/select tasks. With
    ``nodes`` (see :func:`cluster_nodes`) every actor must also fit on one node (bin-packing the pools'
    minimums onto nodes, honouring ``node_labels``). A participant that cannot fit even alone is a
    configuration error (e.g. ``num_gpus`` on a cluster with no GPUs), raised at once, before any work.
    Participants go into the first wave they fit (first-fit), so waves are as few as this greedy finds.
    ``indices`` are the config positions of ``parts`` (for error messages naming the key).
    """
    avail = dict(resources)
    avail["CPU"] = max(avail.get("CPU", 0.0) - reserve_cpus, 0.0)
    for j, p in enumerate(parts):
        i = indices[j] if indices is not None else j
        for key, val in pool_demand(p).items():
            have = avail.get(key, 0.0)
            if val > have + 1e-9:
                what = "GPUs" if key == "GPU" else ("CPUs (one is kept for reading)" if key == "CPU" else key)
                raise ConfigError(
                    f"'participants[{i}]' ({p.name}) needs {val:g} {what} for {p.actors} actor(s), "
                    f"but the cluster has {have:g}"
                )
        if nodes is not None and _place_pool(p, _fresh(nodes)) is None:
            raise _no_node_error(i, p, nodes)
    waves: list = []  # each: [indices, used (cluster-wide), per-node free, placement]
    for i, p in enumerate(parts):
        dem = pool_demand(p)
        for w in waves:
            if not all(w[1].get(k, 0.0) + v <= avail.get(k, 0.0) + 1e-9 for k, v in dem.items()):
                continue
            if nodes is not None:
                where = _place_pool(p, w[2])
                if where is None:
                    continue
                w[3][i] = [nodes[j]["id"] for j in where]
            break
        else:
            w = [[], {}, _fresh(nodes) if nodes is not None else None, {}]
            if nodes is not None:
                w[3][i] = [nodes[j]["id"] for j in _place_pool(p, w[2])]
            waves.append(w)
        w[0].append(i)
        for k, v in dem.items():
            w[1][k] = w[1].get(k, 0.0) + v
    plan_waves_ = [w[0] for w in waves]
    where = f" ({len(nodes)} node{'s' if len(nodes) != 1 else ''})" if nodes is not None else ""
    if len(waves) == 1:
        msg = (f"all {len(parts)} participant pools fit the cluster{where} at once" if len(parts) > 1
               else f"the participant pool fits the cluster{where}")
    else:
        msg = (f"the cluster{where} fits {max(len(w) for w in plan_waves_)} of {len(parts)} participant pools "
               f"at once; running them in {len(waves)} waves: "
               + " | ".join(",".join(parts[i].name for i in w) for w in plan_waves_))
    return Plan(waves=plan_waves_, message=msg,
                placement=[w[3] for w in waves] if nodes is not None else None)


def _fresh(nodes: list) -> list:
    return [{"res": dict(n["resources"]), "labels": n.get("labels") or {}} for n in nodes]


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
        nodes = _live_nodes()
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
                now = _live_nodes()
                if now is not None and sorted(n["id"] for n in now) != sorted(n["id"] for n in nodes):
                    import ray

                    nodes, rest = now, [i for w in waves for i in w]
                    plan = plan_waves([cfg.participants[i] for i in rest], ray.cluster_resources(), nodes=nodes,
                                      indices=rest)
                    log(f"[optimize] the cluster changed ({len(nodes)} nodes now); remaining: {plan.message}")
                    waves = [[rest[j] for j in w] for w in plan.waves]
    return [stats[i] for i in range(len(cfg.participants))]


def _live_nodes() -> Optional[list]:
    """Per-node resources when connected to Ray (None otherwise: plan from cluster totals only)."""
    try:
        import ray

        return cluster_nodes() if ray.is_initialized() else None
    except Exception:  # e.g. a Ray Client connection without node listing
        return None
