"""The cluster: connecting to Ray, its live nodes, and planning what runs where (pools, train workers, tasks).

Every stage that asks Ray for resources plans against the live nodes first, so a request no node can hold
is a one-line ConfigError naming the key (exit 2) within seconds, never a wait on Ray's scheduler.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

from .config import ConfigError, ParticipantConfig, StudentConfig
from .devices import device_error_in

NODE_ID_LABEL = "ray.io/node-id"   # the label Ray gives every node (used to keep train workers off a node)


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
    # Ray 2.60's V2 Parquet reader starts a pool of 32 FooterReader actors (new worker processes) for every
    # read_parquet call, to read footers over a network store. Our reads are a few local or shared-storage files
    # per stage (embedding shards, split parts, the optimized set), which the V1 reader lists on the driver.
    ctx.use_datasource_v2 = False


def driver_node_id() -> Optional[str]:
    """The node this driver runs on (None when it cannot tell, e.g. over Ray Client)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:
        return None


# ---------------------------------------------------------------- participant pools (optimize)
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


def _place(dem: dict, count: int, free: list, selector: Optional[dict] = None) -> Optional[list]:
    """First-fit ``count`` actors of demand ``dem`` onto nodes (``free``: per-node resources, updated in place).

    GPU actors try GPU nodes first, CPU-only actors try nodes without GPUs first (as Ray's scheduler
    does). Returns the node index of each actor, or None (``free`` untouched) when they do not all fit.
    """
    gpu = "GPU" in dem
    order = sorted(range(len(free)), key=lambda j: (bool(free[j]["res"].get("GPU")) != gpu, j))
    trial = [dict(n["res"]) for n in free]
    where = []
    for _ in range(count):
        for j in order:
            if label_matches(free[j]["labels"], selector) and _fits(trial[j], dem):
                for k, v in dem.items():
                    trial[j][k] = trial[j].get(k, 0.0) - v
                where.append(j)
                break
        else:
            return None
    for j, res in enumerate(trial):
        free[j]["res"] = res
    return where


def _place_pool(p: ParticipantConfig, free: list) -> Optional[list]:
    """Node index of each of a participant pool's minimum actors, or None (see :func:`_place`)."""
    return _place(actor_demand(p), p.actors, free, getattr(p, "node_labels", None))


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



def live_nodes(log: Callable = print) -> Optional[list]:
    """Per-node resources when connected to Ray; None when not connected or the nodes cannot be listed
    (then placement is planned from cluster totals only, and the log says so)."""
    import ray

    if not ray.is_initialized():
        return None
    try:
        return cluster_nodes()
    except Exception as e:  # e.g. a Ray Client connection without node listing
        log(f"[cluster] warning: could not list the cluster's nodes ({type(e).__name__}: {e}); "
            "planning from cluster totals only, so an actor that fits no single node is not caught up front")
        return None


# ---------------------------------------------------------------- Ray Train workers (train, distill)
@dataclass
class WorkerPlan:
    """How many Ray Train workers, each with how many CPUs (and 1 GPU with use_gpu), on which nodes."""

    workers: int                      # 0: the loop runs in-process
    cpus: float                       # per worker
    threads: int                      # torch threads per worker
    nodes: list = field(default_factory=list)   # planned node id per worker
    avoid: Optional[str] = None       # a node kept free of workers (the driver's), as a label selector
    message: str = ""

    def label_selector(self) -> Optional[dict]:
        """Ray Train's ``ScalingConfig.label_selector`` for this plan (None: any node)."""
        return {NODE_ID_LABEL: f"!{self.avoid}"} if self.avoid else None


def _free_after_reserve(nodes: list, driver: Optional[str], reserve_cpus: float) -> list:
    """Per-node resources with ``reserve_cpus`` kept on the driver's node (Ray Data reads and the driver)."""
    free = _fresh(nodes)
    if nodes:
        j = next((j for j, n in enumerate(nodes) if n["id"] == driver), 0)
        free[j]["res"]["CPU"] = max(free[j]["res"].get("CPU", 0.0) - reserve_cpus, 0.0)
    return free


def _node_sizes(nodes: list, driver: Optional[str], key: str) -> str:
    return ", ".join(f"{n['resources'].get(key, 0.0):g}{' (driver node)' if n['id'] == driver else ''}"
                     for n in nodes) or "no nodes"


def plan_workers(s: StudentConfig, nodes: list, driver: Optional[str] = None, reserve_cpus: float = 1.0,
                 key: str = "student", max_cpus: float = 4.0) -> WorkerPlan:
    """Size ``s.workers`` Ray Train workers so that every one fits on one live node.

    ``reserve_cpus`` stay free on the driver's node. CPUs per worker are ``s.cpus_per_worker`` when set,
    else the largest multiple of 0.25 (at most ``max_cpus``) for which all workers fit; at equal size,
    workers go to nodes other than the driver's when they all fit there (the driver's node keeps
    its CPUs for Ray Data and the driver). With ``use_gpu`` every worker takes 1 GPU, on GPU nodes
    only. A request no node set can hold raises ConfigError naming ``<key>.<field>``.
    """
    gpu = bool(s.use_gpu)
    if s.workers == 0:
        if gpu:
            raise ConfigError(f"'{key}.use_gpu' needs Ray Train workers ({key}.workers >= 1): with workers: 0 the "
                              "loop runs in the driver, which Ray gave no GPU")
        return WorkerPlan(0, 0.0, max(1, int(os.cpu_count() or 1)), message="in-process")
    if gpu and not any(n["resources"].get("GPU", 0.0) >= 1 for n in nodes):
        raise ConfigError(f"'{key}.use_gpu': no node of the cluster has a whole GPU "
                          f"(GPUs per node: {_node_sizes(nodes, driver, 'GPU')})")
    fixed = s.cpus_per_worker
    top = max([n["resources"].get("CPU", 0.0) for n in nodes] or [0.0])
    sizes = [float(fixed)] if fixed else [q / 4 for q in range(int(min(max_cpus, top) * 4), 0, -1)]
    others = [n for n in nodes if n["id"] != driver]
    for c in sizes:
        dem = {"CPU": c, **({"GPU": 1.0} if gpu else {})}
        if driver and others:
            where = _place(dem, s.workers, _fresh(others))
            if where is not None:
                return _worker_plan(s, c, [others[j]["id"] for j in where], driver, gpu)
        where = _place(dem, s.workers, _free_after_reserve(nodes, driver, reserve_cpus))
        if where is not None:
            return _worker_plan(s, c, [nodes[j]["id"] for j in where], None, gpu)
    what = f"{{CPU={sizes[-1]:g}{', GPU=1' if gpu else ''}}}" if sizes else "{CPU>0}"
    have = (f"CPUs per node: {_node_sizes(nodes, driver, 'CPU')}, {reserve_cpus:g} kept on the driver's node"
            + (f"; GPUs per node: {_node_sizes(nodes, driver, 'GPU')}" if gpu else ""))
    if fixed:
        raise ConfigError(f"'{key}.cpus_per_worker': {s.workers} worker(s) of {what} must each fit on one node, "
                          f"but they do not ({have})")
    raise ConfigError(f"'{key}.workers': {s.workers} worker(s) of at least {what} do not fit on the cluster's "
                      f"nodes, one worker per node at most its size ({have}); lower {key}.workers")


def _worker_plan(s: StudentConfig, cpus: float, where: list, avoid: Optional[str], gpu: bool) -> WorkerPlan:
    msg = (f"{s.workers} workers x {cpus:g} CPU{' + 1 GPU' if gpu else ''} on {len(set(where))} node(s)"
           + (" (not the driver's)" if avoid else ""))
    return WorkerPlan(s.workers, cpus, max(1, int(math.floor(cpus))), list(where), avoid, msg)


# ---------------------------------------------------------------- single tasks (evaluate)
def check_tasks_fit(demands: list, nodes: list) -> None:
    """Each ``(config key, {resource: amount})`` must fit on at least one live node, else a ConfigError
    naming the key: a Ray task that no node can hold would wait forever."""
    for key, dem in demands:
        if dem.get("GPU") and not any(n["resources"].get("GPU", 0.0) > 0 for n in nodes):
            raise ConfigError(f"'{key}' asks for a GPU, but no node of the cluster has one "
                              f"(GPUs per node: {_node_sizes(nodes, None, 'GPU')})")
        if not any(_fits(n["resources"], dem) for n in nodes):
            want = ", ".join(f"{k}={v:g}" for k, v in dem.items())
            have = "; ".join(", ".join(f"{k}={n['resources'].get(k, 0.0):g}" for k in dem) for n in nodes)
            raise ConfigError(f"'{key}': a task of {{{want}}} fits on no node of the cluster ({have or 'no nodes'})")


def fit_torch_trainer(loop, loop_cfg: dict, plan: "WorkerPlan", use_gpu: bool, name: str, storage, dataset) -> None:
    """Run ``loop`` under a Ray Train ``TorchTrainer`` named ``name`` on ``plan``'s workers (nccl on GPU, gloo on
    CPU), ``dataset`` as its "train" dataset, checkpoints under ``storage`` (the newest two kept); a dead worker
    restarts the group from the last checkpoint (up to 3 times)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .devices import simulated_gpus  # declared-only GPUs run the loop on the CPU: gloo, as nccl needs CUDA

    w = plan.workers
    scaling = ScalingConfig(num_workers=w, use_gpu=use_gpu, resources_per_worker={"CPU": plan.cpus} if w else None,
                            label_selector=plan.label_selector() if w else None)
    trainer = TorchTrainer(loop, train_loop_config=loop_cfg, scaling_config=scaling,
                 torch_config=TorchConfig(backend="nccl" if use_gpu and not simulated_gpus() else "gloo"),
                 run_config=RunConfig(name=name, storage_path=str(storage),
                                      checkpoint_config=CheckpointConfig(num_to_keep=2),
                                      failure_config=FailureConfig(max_failures=3)),
                 datasets={"train": dataset})
    try:
        trainer.fit()
    except Exception as e:
        cause = device_error_in(e)
        if cause is not None:  # a worker that asked for a GPU and got none: the one line, not a traceback
            raise ConfigError(str(cause)) from e
        raise

