"""Placement: per-node planning of the participants' pools, and a multi-node cluster on one machine.

The multi-node tests start their own ``ray.cluster_utils.Cluster`` (a head without GPUs, even on a GPU machine,
and worker nodes that each declare one GPU; ``COOPT_SIMULATED_GPUS=1`` tells the embedder those GPUs are only
declared, so it runs on the CPU instead of refusing). They shut down any Ray the session started first, and start
it again afterwards.

Pools running in waves on 2 GPU nodes and all at once on 4 (one per node) are checked on the README's own cluster
sequence, through Ray Jobs (tests/test_readme_cluster.py: ``check_placement``), rather than on a second cluster here.
"""
from __future__ import annotations

import os
import re
import socket
import time

import pytest

from coopt_ray.config import ConfigError, ParticipantConfig, load_config
from coopt_ray.cluster import label_matches, plan_waves
from coopt_ray.devices import SIMULATED_ENV

from conftest import write_config


def _node(i, cpu, gpu=0, labels=None, **extra):
    res = {"CPU": float(cpu), **extra}
    if gpu:
        res["GPU"] = float(gpu)
    return {"id": f"n{i}", "resources": res, "labels": labels or {}}


def _gpu_parts(n, **kw):
    return [ParticipantConfig(name=f"p{i}", model="m", num_gpus=1.0, **kw) for i in range(n)]


# ------------------------------------------------------------------ planning (no Ray)
def test_one_gpu_per_node_fits_one_actor_per_node():
    nodes = [_node(0, 2)] + [_node(i, 1, 1) for i in (1, 2, 3)]
    plan = plan_waves(_gpu_parts(3), {"CPU": 5.0, "GPU": 3.0}, nodes=nodes)
    assert plan.waves == [[0, 1, 2]] and "at once" in plan.message
    placed = [n for p in plan.placement[0].values() for n in p]
    assert sorted(placed) == ["n1", "n2", "n3"]


def test_two_gpu_nodes_three_participants_run_in_waves():
    nodes = [_node(0, 2), _node(1, 1, 1), _node(2, 1, 1)]
    plan = plan_waves(_gpu_parts(3), {"CPU": 4.0, "GPU": 2.0}, nodes=nodes)
    assert plan.waves == [[0, 1], [2]]
    assert "fits 2 of 3" in plan.message and "2 waves: p0,p1 | p2" in plan.message


def test_cluster_totals_are_not_enough_an_actor_must_fit_one_node():
    # 2 GPUs in total, but on a node with one CPU: only one 1-CPU/1-GPU actor fits there at a time.
    nodes = [_node(0, 4), _node(1, 1, 2)]
    assert plan_waves(_gpu_parts(2), {"CPU": 5.0, "GPU": 2.0}).waves == [[0, 1]]  # totals alone say yes
    assert plan_waves(_gpu_parts(2), {"CPU": 5.0, "GPU": 2.0}, nodes=nodes).waves == [[0], [1]]
    # an actor asking for 2 GPUs never fits nodes of 1 GPU each: a clear error, no hang
    nodes = [_node(0, 2), _node(1, 1, 1), _node(2, 1, 1)]
    big = [ParticipantConfig(name="big", model="m", num_gpus=2.0)]
    with pytest.raises(ConfigError, match=r"participants\[0\]' \(big\).*one actor must fit on one node"):
        plan_waves(big, {"CPU": 4.0, "GPU": 2.0}, nodes=nodes)


def test_no_gpus_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"needs 1 GPUs for 1 actor\(s\), but the cluster has 0"):
        plan_waves(_gpu_parts(1), {"CPU": 8.0}, nodes=[_node(0, 8)])


def test_first_fit_fills_earlier_waves():
    # p0 takes both GPUs of the only GPU node; p1 and p2 (one GPU each) share the next wave
    nodes = [_node(0, 4), _node(1, 4, 2)]
    parts = [ParticipantConfig(name="p0", model="m", num_gpus=2.0)] + _gpu_parts(3)[1:]
    plan = plan_waves(parts, {"CPU": 8.0, "GPU": 2.0}, nodes=nodes)
    assert plan.waves == [[0], [1, 2]]


def test_node_labels_and_accelerator_type_select_nodes():
    nodes = [_node(0, 2), _node(1, 1, 1, {"gpu": "T4"}, **{"accelerator_type:T4": 1.0}),
             _node(2, 1, 1, {"gpu": "A100"}, **{"accelerator_type:A100": 1.0})]
    tot = {"CPU": 4.0, "GPU": 2.0, "accelerator_type:T4": 1.0, "accelerator_type:A100": 1.0}
    a100 = [ParticipantConfig(name=f"a{i}", model="m", num_gpus=1.0, node_labels={"gpu": "A100"}) for i in range(2)]
    plan = plan_waves(a100, tot, nodes=nodes)
    assert plan.waves == [[0], [1]]  # only one node carries the label
    assert plan.placement == [{0: ["n2"]}, {1: ["n2"]}]
    t4 = ParticipantConfig(name="t", model="m", num_gpus=1.0, accelerator_type="T4")
    plan = plan_waves([a100[0], t4], tot, nodes=nodes)
    assert plan.waves == [[0, 1]] and plan.placement[0] == {0: ["n2"], 1: ["n1"]}
    with pytest.raises(ConfigError, match=r"node_labels' \(h\): no node of the cluster carries labels"):
        plan_waves([ParticipantConfig(name="h", model="m", num_gpus=1.0, node_labels={"gpu": "H100"})],
                   tot, nodes=nodes)
    assert label_matches({"gpu": "T4"}, {"gpu": "in(T4, A10)"})
    assert label_matches({"gpu": "T4"}, {"gpu": "!A100"}) and label_matches({}, {"gpu": "!A100"})
    assert not label_matches({"gpu": "T4"}, {"gpu": "!in(T4,A10)"})


def test_node_labels_config_is_validated(tmp_path):
    bad = write_config(tmp_path / "c.yaml", ["local-dir:x"])
    import yaml

    raw = yaml.safe_load(bad.read_text())
    raw["participants"][0]["node_labels"] = ["gpu=A100"]
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"participants\[0\]\.node_labels"):
        load_config(bad)
    raw["participants"][0]["node_labels"] = {"gpu": "A100"}
    bad.write_text(yaml.safe_dump(raw))
    assert load_config(bad).participants[0].node_labels == {"gpu": "A100"}


# ------------------------------------------------------------------ a real multi-node cluster
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GpuCluster:
    """A CPU head (2 CPUs) plus worker nodes that each declare 1 GPU and 1 CPU."""

    def __init__(self):
        import ray
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 2, "num_gpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1",
            "dashboard_port": _free_port()})
        self.workers = []
        ray.init(address=self.cluster.address, log_to_driver=False)

    def gpu_nodes(self, n: int) -> list[str]:
        """Add or remove GPU worker nodes until there are ``n``; return their node ids."""
        import ray

        while len(self.workers) < n:  # each GPU node carries a label naming it (for node_labels tests)
            self.workers.append(self.cluster.add_node(num_cpus=1, num_gpus=1,
                                                      labels={"coopt-test-node": f"gpu{len(self.workers)}"}))
        while len(self.workers) > n:
            self.cluster.remove_node(self.workers.pop())
        deadline = time.time() + 60
        while True:
            alive = [x for x in ray.nodes() if x["Alive"]]
            ids = [x["NodeID"] for x in alive if x["Resources"].get("GPU")]
            if len(ids) == n and len(alive) == n + 1:
                return ids
            assert time.time() < deadline, f"cluster did not settle at {n} GPU nodes: {alive}"
            time.sleep(0.5)


@pytest.fixture(scope="module")
def gpu_cluster():
    import ray

    ray.shutdown()  # the session's: these tests run after the others, bar the README sequence (conftest)
    old = os.environ.get(SIMULATED_ENV)
    os.environ[SIMULATED_ENV] = "1"  # the nodes inherit it: their GPUs are only declared, so GPU stages use the CPU
    c = GpuCluster()
    try:
        yield c
    finally:
        ray.shutdown()
        c.cluster.shutdown()
        if old is None:
            os.environ.pop(SIMULATED_ENV)
        else:
            os.environ[SIMULATED_ENV] = old
        # no new session Ray: conftest runs the tests on this cluster after every other test


@pytest.fixture
def short_actor_wait(monkeypatch):
    monkeypatch.setenv("COOPT_WAIT_FOR_ACTORS_S", "120")  # a placement bug fails, never hangs


def _run(tmp_path, models, names, limit=200):
    from coopt_ray.pipeline import run_optimize

    parts = [{"name": n, "model": m, "batch_size": 64, "num_gpus": 1} for n, m in zip(names, models)]
    cfg = load_config(write_config(tmp_path / "c.yaml", models, participants=parts, data={"limit": limit}))
    logs: list[str] = []
    t0 = time.time()
    man = run_optimize(cfg, tmp_path / "run", log=logs.append)
    return man, logs, time.time() - t0


def _actor_nodes(names) -> dict:
    """Participant name -> node ids of its pool's actors (from the state API of the cluster this process is connected
    to, named by its GCS address: never another Ray that runs on the machine)."""
    import ray
    from ray.util.state import list_actors

    out: dict = {n: set() for n in names}
    for a in list_actors(address=ray.get_runtime_context().gcs_address, detail=True, limit=10_000,
                         raise_on_missing_output=False):
        m = re.search(r"Participant_(\w+)\)", a.class_name or "")
        if m and m.group(1) in out and a.node_id:
            out[m.group(1)].add(a.node_id)
    return out


@pytest.mark.slow
def test_cluster_without_gpus_fails_within_seconds(gpu_cluster, tmp_path, tiny_models, short_actor_wait):
    gpu_cluster.gpu_nodes(0)
    with pytest.raises(ConfigError, match=r"needs 1 GPUs for 1 actor\(s\), but the cluster has 0") as e:
        t0 = time.time()
        _run(tmp_path, tiny_models[:1], ["z0"])
    assert time.time() - t0 < 30, e.value


@pytest.mark.slow
def test_adding_a_gpu_node_lets_more_pools_run_at_once(gpu_cluster):
    """The plan comes from the live cluster: no config change, one more node, one wave fewer."""
    import ray

    from coopt_ray.cluster import cluster_nodes

    parts = _gpu_parts(4)
    gpu_cluster.gpu_nodes(3)
    before = plan_waves(parts, ray.cluster_resources(), nodes=cluster_nodes())
    gpu_cluster.gpu_nodes(4)
    after = plan_waves(parts, ray.cluster_resources(), nodes=cluster_nodes())
    assert before.waves == [[0, 1, 2], [3]] and "fits 3 of 4" in before.message
    assert after.waves == [[0, 1, 2, 3]] and "all 4 participant pools fit the cluster (5 nodes)" in after.message


@pytest.mark.slow
def test_node_labels_of_the_live_cluster_select_the_node(gpu_cluster):
    import ray

    from coopt_ray.cluster import cluster_nodes

    gpu_cluster.gpu_nodes(4)
    nodes = cluster_nodes()
    want = next(n["id"] for n in nodes if n["labels"].get("coopt-test-node") == "gpu2")
    parts = [ParticipantConfig(name=f"l{i}", model="m", num_gpus=1.0, node_labels={"coopt-test-node": "gpu2"})
             for i in range(2)]
    plan = plan_waves(parts, ray.cluster_resources(), nodes=nodes)
    assert plan.waves == [[0], [1]] and plan.placement == [{0: [want]}, {1: [want]}]


@pytest.mark.slow
def test_node_labels_put_the_pool_on_the_labelled_node(gpu_cluster, tmp_path, tiny_models, short_actor_wait):
    import yaml

    from coopt_ray.cluster import cluster_nodes

    gpu_cluster.gpu_nodes(4)
    want = next(n["id"] for n in cluster_nodes() if n["labels"].get("coopt-test-node") == "gpu3")
    from coopt_ray.optimize import embed_all
    from coopt_ray.split import run_split

    cfg_path = write_config(tmp_path / "c.yaml", tiny_models[:1], data={"limit": 100})
    raw = yaml.safe_load(cfg_path.read_text())
    raw["participants"][0].update(name="lab", num_gpus=1, node_labels={"coopt-test-node": "gpu3"})
    cfg_path.write_text(yaml.safe_dump(raw))
    cfg = load_config(cfg_path)
    run = tmp_path / "run"
    run.mkdir()
    split = run_split(cfg, run, log=print)
    import ray

    stats = embed_all(cfg, run, split, ray.cluster_resources(), log=print)
    assert stats[0]["rows"] == 100
    assert _actor_nodes(["lab"])["lab"] == {want}
