"""The device rules (devices.py, DESIGN.md §6) on a machine without a GPU: not asked never touches CUDA, asked
and unusable is a one-line error naming the key (exit 2, before any Ray work), collectives reduce on the loop's
device, bf16 autocast runs through the real train loop on the CPU, and the planners refuse GPU requests the
cluster cannot meet before the first stage starts."""
from __future__ import annotations

import dataclasses
import os
import sys
import time

import numpy as np
import pytest
import torch

from conftest import write_config
from coopt_ray import cli, devices
from coopt_ray.cluster import NODE_ID_LABEL, check_tasks_fit, plan_workers
from coopt_ray.config import ConfigError, StudentConfig, load_config
from coopt_ray.devices import DeviceError, amp_dtype, reduce_sums, stage_device

NO_CUDA = not torch.cuda.is_available()
needs_no_cuda = pytest.mark.skipif(not NO_CUDA, reason="checks what happens on a machine whose CUDA is not usable")


def _node(name, cpu, gpu=0):
    res = {"CPU": float(cpu), **({"GPU": float(gpu)} if gpu else {})}
    return {"id": name, "resources": res, "labels": {NODE_ID_LABEL: name}}


@pytest.fixture
def cuda_forbidden(monkeypatch):
    """Every CUDA entry point raises when coopt_ray's code calls it (Ray's own code may ask: it reads False), and
    CUDA_VISIBLE_DEVICES is set as Ray leaves it on zero-GPU workers."""
    def forbidden(name):
        def probe(*a, **k):
            caller = sys._getframe(1).f_code.co_filename
            if f"{os.sep}coopt_ray{os.sep}" in caller:
                raise AssertionError(f"torch.cuda.{name} called from {caller} on a path that asked for no GPU")
            return False if name == "is_available" else 0
        return probe

    for name in ("is_available", "init", "device_count", "current_device", "set_device"):
        monkeypatch.setattr(torch.cuda, name, forbidden(name))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.delenv(devices.SIMULATED_ENV, raising=False)


# ---------------------------------------------------------------- stage_device
def test_not_asked_is_the_cpu_without_touching_cuda(cuda_forbidden):
    assert stage_device(False, "student.use_gpu") == torch.device("cpu")
    assert devices.train_device(False, "student.use_gpu") == torch.device("cpu")
    devices.cuda_speed_habits(torch.device("cpu"))  # a no-op on the CPU: touches nothing
    assert devices.channels_last(torch.device("cpu")) is None


@needs_no_cuda
def test_asked_without_a_usable_gpu_is_one_line_naming_the_key(monkeypatch):
    monkeypatch.delenv(devices.SIMULATED_ENV, raising=False)
    with pytest.raises(DeviceError) as e:
        stage_device(True, "student.use_gpu")
    msg = str(e.value)
    assert isinstance(e.value, ConfigError) and "\n" not in msg
    assert msg.startswith("'student.use_gpu' asks for a GPU, but ")
    assert "no CUDA device visible" in msg or "CUDA not usable: " in msg, msg
    monkeypatch.setenv(devices.SIMULATED_ENV, "1")  # GPUs only declared to Ray (test clusters): the CPU, on purpose
    assert stage_device(True, "student.use_gpu") == torch.device("cpu")


def test_the_reason_cuda_gives_is_reported(monkeypatch):
    monkeypatch.delenv(devices.SIMULATED_ENV, raising=False)
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)

    def old_driver():
        raise RuntimeError("The NVIDIA driver on your system is too old (found version 11040).\nmore text")

    monkeypatch.setattr(torch.cuda, "init", old_driver)
    with pytest.raises(DeviceError, match=r"^'participants\[0\].num_gpus' asks for a GPU, but CUDA not usable: "
                                          r"The NVIDIA driver on your system is too old \(found version 11040\).$"):
        stage_device(True, "participants[0].num_gpus")

    def no_gpus():
        raise RuntimeError("No CUDA GPUs are available")

    monkeypatch.setattr(torch.cuda, "init", no_gpus)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(DeviceError, match=r"no CUDA device visible \(CUDA_VISIBLE_DEVICES=''\)$"):
        stage_device(True, "eval.gpu_fraction")


@needs_no_cuda
def test_zoo_build_on_cuda_exits_2_with_one_line(tmp_path, capsys):
    rc = cli.main(["zoo", "build", "--device", "cuda", "--out", str(tmp_path / "zoo")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "'zoo build --device' asks for a GPU, but " in err[0], err
    assert not (tmp_path / "zoo").exists()


# ---------------------------------------------------------------- collectives on the loop's device
def test_reduce_sums_hands_all_reduce_one_float64_tensor_on_the_loop_device(monkeypatch):
    seen = []

    def all_reduce(t, *a, **k):
        seen.append((t.device, t.dtype, tuple(t.shape)))
        raise StopIteration  # a meta tensor cannot come back to the host: stop once it was handed over

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    meta = torch.device("meta")  # stands in for cuda: any device other than the CPU
    with pytest.raises(StopIteration):
        reduce_sums([torch.zeros((), device=meta), 7], meta, world=2)
    assert seen == [(meta, torch.float64, (2,))]


def test_reduce_sums_through_a_real_gloo_group(monkeypatch, tmp_path):
    import torch.distributed as dist

    assert reduce_sums([torch.tensor(1.5), 4], torch.device("cpu"), world=1) == [1.5, 4.0]  # no group: no call
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        calls = []
        real = dist.all_reduce
        monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: (calls.append(t.device), real(t, *a, **k))[1])
        assert reduce_sums([torch.tensor(2.25, dtype=torch.float64), 3], torch.device("cpu"), world=2) == [2.25, 3.0]
        assert calls == [torch.device("cpu")]
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- the real train loop, in-process
def _train_once(tmp_path, monkeypatch, amp, loss=None, losses=None):
    """One epoch of train_loop_per_worker in-process; returns (autocast state seen in the forward, reductions)."""
    import ray.data
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from coopt_ray import train
    from coopt_ray.student import Student, target_transform

    forward = []

    class Watched(Student):
        def forward(self, x):
            forward.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
            return super().forward(x)

    reductions = []
    real = train.reduce_sums

    def watched_reduce(values, device, world=1):
        reductions.append((device, [v.device for v in values if torch.is_tensor(v)]))
        return real(values, device, world)

    if losses is not None:  # record what student.loss the loop asked for, and what each step's loss was
        real_loss = train.student_loss

        def watched_loss(pred, y, kind="cos", weights=None):
            value = real_loss(pred, y, kind, weights)
            losses.append((kind, float(value)))
            return value

        monkeypatch.setattr(train, "student_loss", watched_loss)
    monkeypatch.setattr(train, "Student", Watched)
    monkeypatch.setattr(train, "reduce_sums", watched_reduce)
    rng = np.random.default_rng(0)
    n, size, dim = 32, 16, 4
    imgs = rng.integers(0, 255, size=(n, size, size, 3), dtype=np.uint8)
    tgt = rng.normal(size=(n, dim)).astype(np.float32)
    mean, proj = target_transform(tgt)
    cfg = {"arch": "resnet10t", "image_size": size, "target_dim": dim, "target_mean": mean.tolist(),
           "target_proj": proj.tolist(), "epochs": 1, "batch_size": 16, "lr": 1e-3, "seed": 0, "fingerprint": "d",
           "threads": 1, "use_gpu": False, "amp": amp, "local_checkpoint_dir": str(tmp_path / amp), "log": False}
    if loss is not None:
        cfg["loss"] = loss
    ds = ray.data.from_items([{"image": imgs[i], "target": tgt[i]} for i in range(n)])
    r = TorchTrainer(train.train_loop_per_worker, train_loop_config=cfg, scaling_config=ScalingConfig(num_workers=0),
                     datasets={"train": ds}).fit()
    assert np.isfinite(r.return_value["history"][0]["loss"]) and r.return_value["history"][0]["images"] == n
    if losses is not None:
        losses.append(("epoch", r.return_value["history"][0]["loss"]))
    return forward, reductions


def test_train_loop_bf16_autocast_on_the_cpu_reduces_on_its_device(ray_session, tmp_path, monkeypatch, cuda_forbidden):
    forward, reductions = _train_once(tmp_path, monkeypatch, "bf16")
    assert forward and all(f == (True, torch.bfloat16) for f in forward), forward  # the net ran under bf16 autocast
    cpu = torch.device("cpu")
    assert reductions == [(cpu, [cpu])], reductions  # one reduction per epoch, its sums on the loop's device


def test_train_loop_auto_amp_leaves_the_cpu_in_fp32(ray_session, tmp_path, monkeypatch):
    forward, _ = _train_once(tmp_path, monkeypatch, "auto")
    assert forward and not any(enabled for enabled, _ in forward)  # CPU results do not move
    assert amp_dtype("auto", torch.device("cuda")) == torch.bfloat16 and amp_dtype("off", torch.device("cuda")) is None


def test_train_loop_trains_with_the_configured_student_loss(ray_session, tmp_path, monkeypatch):
    seen: list = []
    _train_once(tmp_path, monkeypatch, "off", loss="mse", losses=seen)
    steps, (_, epoch) = seen[:-1], seen[-1]
    assert len(steps) == 2 and {k for k, _ in steps} == {"mse"}  # 32 rows, batch 16
    assert epoch == pytest.approx(np.mean([v for _, v in steps]), rel=1e-6)  # the epoch reports that loss


def test_the_two_student_probe_task_and_weak_augment_stay_off_cuda_when_not_asked(cuda_forbidden):
    """The evaluate stage's one task for the student and the random init (use_gpu false), and student.augment:
    weak, run on the CPU without calling any CUDA entry point (cuda_forbidden fails the test if they do)."""
    from coopt_ray.augment import make_augment
    from coopt_ray.evaluate import _score_task, score_backbone
    from coopt_ray.student import build_backbone

    rng = np.random.default_rng(0)
    data = {"probe_rgb": rng.integers(0, 255, (20, 16, 16, 3), dtype=np.uint8), "probe_y": np.arange(20) % 2,
            "test_rgb": rng.integers(0, 255, (10, 16, 16, 3), dtype=np.uint8), "test_y": np.arange(10) % 2}
    state = build_backbone("resnet10t", 16).state_dict()
    args = {"arch": "resnet10t", "image_size": 16, "epochs": 2, "use_gpu": False}
    out = _score_task("backbones", args, data, state)
    assert set(out) == {"student", "random_init"}
    # the random init scored after the student in the same task is the one scored alone (seeded, no state leaks)
    assert out["random_init"]["probe_accuracy"] == score_backbone(None, data=data, **args)["probe_accuracy"]
    x = make_augment(16, "weak")(torch.rand(4, 3, 16, 16), torch.Generator().manual_seed(0))
    assert x.device == torch.device("cpu") and x.shape == (4, 3, 16, 16)


# ---------------------------------------------------------------- M-DATM on the task's device
def test_mdatm_step_size_lives_on_the_images_device():
    from coopt_ray.distill.mdatm import Matcher, hard_labels

    x = torch.zeros(4, 1, 8, 8, device="meta")  # any device but the CPU
    m = Matcher(x, hard_labels(2, 2).to("meta"), 2, lr_img=1.0, lr_lr=1e-5, width=4)
    assert m.syn_lr.device == x.device and m.x.device == x.device
    assert {p.device for p in m.model.parameters()} == {x.device}


# ---------------------------------------------------------------- planning: refused up front
def test_planner_refuses_use_gpu_with_workers_0_and_gpus_the_cluster_lacks():
    s = dataclasses.replace(StudentConfig(), workers=0, use_gpu=True)
    with pytest.raises(ConfigError, match=r"^'student.use_gpu' needs Ray Train workers \(student.workers >= 1\)"):
        plan_workers(s, [_node("head", 8, gpu=1)], driver="head")
    with pytest.raises(ConfigError, match=r"^'distill.use_gpu' needs Ray Train workers"):
        plan_workers(s, [_node("head", 8, gpu=1)], driver="head", key="distill")
    with pytest.raises(ConfigError, match=r"^'student.use_gpu': no node of the cluster has a whole GPU"):
        plan_workers(dataclasses.replace(s, workers=1), [_node("head", 8)], driver="head")
    with pytest.raises(ConfigError, match=r"^'eval.gpu_fraction' asks for a GPU, but no node of the cluster has one"):
        check_tasks_fit([("eval.gpu_fraction", {"CPU": 1.0, "GPU": 0.25})], [_node("head", 8), _node("w", 4)])
    check_tasks_fit([("eval.gpu_fraction", {"CPU": 1.0, "GPU": 0.25})], [_node("head", 8), _node("g", 4, gpu=1)])


@pytest.mark.parametrize("over,needle", [
    ({"student": {"workers": 0, "use_gpu": True}}, "'student.use_gpu' needs Ray Train workers"),
    ({"student": {"amp": "fp8"}}, "'student.amp' must be one of auto, bf16, off"),
    ({"eval": {"gpu_fraction": 0}}, "'eval.gpu_fraction' must be a number in (0, 1]"),
    ({"eval": {"gpu_fraction": 2}}, "'eval.gpu_fraction' must be a number in (0, 1]"),
    ({"distill": {"method": "mdatm", "gpu_fraction": -0.5}}, "'distill.gpu_fraction' must be a number in (0, 1]"),
    ({"distill": {"workers": 0, "use_gpu": True}}, "'distill.use_gpu' needs Ray Train workers"),
    ({"eval": {"num_cpus": 0}}, "'eval.num_cpus' must be a number > 0, got 0"),
], ids=["student-gpu-workers-0", "amp", "fraction-0", "fraction-2", "distill-fraction", "distill-gpu-workers-0",
        "eval-cpus-0"])
def test_device_keys_are_validated(over, needle, tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write_config(tmp_path / "c.yaml", ["local-dir:/unused"], **over))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_probe_tasks_take_the_configured_gpu_share(tmp_path):
    from coopt_ray.evaluate import probe_demands

    parts = [{"name": "g", "model": "local-dir:/a", "num_gpus": 1}, {"name": "c", "model": "local-dir:/b"}]
    cfg = load_config(write_config(tmp_path / "c.yaml", [], participants=parts,
                                   student={"use_gpu": True}, eval={"gpu_fraction": 0.5, "num_cpus": 3}))
    assert probe_demands(cfg) == [("student.use_gpu", {"CPU": 3.0, "GPU": 0.5}),
                                  ("participants[0].num_gpus", {"CPU": 3.0, "GPU": 0.5}),
                                  ("participants[1].num_gpus", {"CPU": 3.0})]
    d = tmp_path / "d.yaml"
    d.write_text("participants: [{name: a, model: 'local-dir:/a'}]\n")
    assert (load_config(d).eval.gpu_fraction, load_config(d).eval.num_cpus) == (0.25, 1.0)  # the defaults
    # where a probe runs is not what it measures: a run's eval result stays valid when only these change
    assert cfg.fingerprint("eval") == load_config(write_config(tmp_path / "e.yaml", [], participants=parts,
                                                               student={"use_gpu": True})).fingerprint("eval")


def test_coopt_run_refuses_a_gpu_student_before_optimize(ray_session, tmp_path, tiny_models, monkeypatch, capsys):
    """`coopt run` with student.use_gpu on a cluster without GPUs: exit 2 and one line in seconds, and the optimize
    stage never starts (it used to run in full first)."""
    from coopt_ray import pipeline

    real_nodes = pipeline.cluster_nodes
    monkeypatch.setattr(pipeline, "cluster_nodes", lambda: [  # the session's cluster, explicitly without GPUs
        {**n, "resources": {k: v for k, v in n["resources"].items() if k != "GPU"}} for n in real_nodes()])

    def no_optimize(*a, **k):
        raise AssertionError("optimize started before every stage's placement was checked")

    monkeypatch.setattr(pipeline, "run_optimize", no_optimize)
    cfg = write_config(tmp_path / "c.yaml", tiny_models[:1], student={"use_gpu": True, "workers": 1})
    t0 = time.time()
    rc = cli.main(["run", "--config", str(cfg), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "'student.use_gpu': no node of the cluster has a whole GPU" in err[0], err
    assert time.time() - t0 < 30
    assert not (tmp_path / "run" / "embeddings").exists()


def test_a_device_error_inside_ray_train_is_found():
    from coopt_ray.devices import device_error_in

    class WorkerGroupError(Exception):  # Ray Train's shape: worker rank -> the worker's exception
        def __init__(self, failures):
            super().__init__("training failed")
            self.worker_failures = failures

    inner = DeviceError("'student.use_gpu' asks for a GPU, but no CUDA device visible")
    assert device_error_in(WorkerGroupError({0: RuntimeError("x"), 1: inner})) is inner
    assert device_error_in(WorkerGroupError({0: RuntimeError("x")})) is None
