"""Ray Train worker planning and task checks against node shapes (no Ray): every worker fits on one node,
and a request no node can hold is a one-line ConfigError naming the key, never a wait."""
from __future__ import annotations

import dataclasses

import pytest

from coopt_ray.cluster import NODE_ID_LABEL, check_tasks_fit, plan_workers
from coopt_ray.config import ConfigError, StudentConfig


def _node(name, cpu, gpu=0):
    res = {"CPU": float(cpu)}
    if gpu:
        res["GPU"] = float(gpu)
    return {"id": name, "resources": res, "labels": {NODE_ID_LABEL: name}}


def _student(**kw):
    return dataclasses.replace(StudentConfig(), **kw)


def test_one_big_node_splits_its_cpus_minus_the_reserve():
    plan = plan_workers(_student(workers=2), [_node("head", 8)], driver="head")
    assert (plan.workers, plan.cpus, plan.threads) == (2, 3.5, 3)  # (8 - 1) / 2
    assert plan.nodes == ["head", "head"] and plan.label_selector() is None
    plan = plan_workers(_student(workers=3), [_node("head", 4)], driver="head")
    assert plan.cpus == 1.0 and plan.threads == 1


def test_small_head_and_one_cpu_gpu_nodes_the_readme_cluster():
    # cluster/local.sh start 2 + add 2: a 2-CPU head (the driver's node) and four 1-CPU, 1-GPU nodes.
    # Sizing from the cluster's total (6 CPUs) gave 2.5 CPUs per worker, which no node holds: a hang.
    nodes = [_node("head", 2)] + [_node(f"w{i}", 1, 1) for i in range(4)]
    plan = plan_workers(_student(workers=2), nodes, driver="head")
    assert plan.cpus == 1.0 and len(plan.nodes) == 2 and "head" not in plan.nodes
    assert plan.label_selector() == {NODE_ID_LABEL: "!head"}  # Ray Train keeps them off the driver's node
    assert all(max(n["resources"]["CPU"] for n in nodes) >= plan.cpus for _ in plan.nodes)
    # three nodes (start 2): the same two workers, one per GPU node
    plan = plan_workers(_student(workers=2), nodes[:3], driver="head")
    assert sorted(plan.nodes) == ["w0", "w1"] and plan.cpus == 1.0


def test_gpu_workers_go_to_gpu_nodes_only():
    nodes = [_node("head", 16), _node("g1", 4, 1), _node("g2", 4, 1)]
    plan = plan_workers(_student(workers=2, use_gpu=True), nodes, driver="head")
    assert sorted(plan.nodes) == ["g1", "g2"] and plan.cpus == 4.0
    with pytest.raises(ConfigError, match=r"^'student.workers': 3 worker\(s\) of at least \{CPU=0.25, GPU=1\}"):
        plan_workers(_student(workers=3, use_gpu=True), nodes, driver="head")
    with pytest.raises(ConfigError, match=r"^'student.use_gpu': no node of the cluster has a whole GPU"):
        plan_workers(_student(workers=1, use_gpu=True), [_node("head", 8)], driver="head")


def test_fractional_cpus():
    # a 1.5-CPU node and a 2-CPU driver node (1 CPU reserved there): sizes in quarter CPUs, the largest wins
    nodes = [_node("head", 2), _node("a", 1.5)]
    plan = plan_workers(_student(workers=1), nodes, driver="head")
    assert plan.cpus == 1.5 and plan.nodes == ["a"] and plan.label_selector() == {NODE_ID_LABEL: "!head"}
    plan = plan_workers(_student(workers=2), nodes, driver="head")
    assert plan.cpus == 1.0 and sorted(plan.nodes) == ["a", "head"] and plan.label_selector() is None
    plan = plan_workers(_student(workers=3), nodes, driver="head")
    assert plan.cpus == 0.75 and sorted(plan.nodes) == ["a", "a", "head"] and plan.threads == 1
    assert plan_workers(_student(workers=4), nodes, driver="head").cpus == 0.5


def test_fixed_sizes_that_fit_no_node_fail_naming_the_key():
    nodes = [_node("head", 2)] + [_node(f"w{i}", 1, 1) for i in range(4)]
    with pytest.raises(ConfigError, match=r"^'student.cpus_per_worker': 2 worker\(s\) of \{CPU=2.5\} must each fit on one node"):
        plan_workers(_student(workers=2, cpus_per_worker=2.5), nodes, driver="head")
    assert plan_workers(_student(workers=2, cpus_per_worker=1.0), nodes, driver="head").cpus == 1.0
    with pytest.raises(ConfigError, match=r"^'student.workers': 40 worker\(s\)") as e:
        plan_workers(_student(workers=40), nodes, driver="head")
    assert "\n" not in str(e.value) and "CPUs per node: 2 (driver node), 1, 1, 1, 1" in str(e.value)


def test_in_process_needs_no_plan():
    plan = plan_workers(_student(workers=0), [], driver=None)
    assert plan.workers == 0 and plan.threads >= 1 and plan.label_selector() is None


def test_tasks_must_fit_one_node():
    nodes = [_node("head", 2), _node("w1", 1, 1)]
    check_tasks_fit([("student.use_gpu", {"CPU": 1.0}), ("participants[0].num_gpus", {"CPU": 1.0, "GPU": 1.0})], nodes)
    with pytest.raises(ConfigError, match=r"^'participants\[1\].num_gpus': a task of \{CPU=1, GPU=2\} fits on no node"):
        check_tasks_fit([("participants[1].num_gpus", {"CPU": 1.0, "GPU": 2.0})], nodes)
    with pytest.raises(ConfigError, match=r"^'student.use_gpu'"):
        check_tasks_fit([("student.use_gpu", {"CPU": 1.0, "GPU": 1.0})], [_node("head", 4)])


def test_live_nodes_says_when_it_cannot_list_them(ray_session, monkeypatch):
    from coopt_ray import cluster

    def fail():
        raise RuntimeError("no node listing over this connection")

    monkeypatch.setattr(cluster, "cluster_nodes", fail)
    logs: list = []
    assert cluster.live_nodes(logs.append) is None
    assert len(logs) == 1 and "could not list the cluster's nodes" in logs[0] and "cluster totals only" in logs[0]
