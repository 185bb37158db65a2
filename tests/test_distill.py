"""`coopt distill` (KRR-ST): the loss against a hand computation, the model pool's resets, a tiny distillation on
2 Ray Train workers that lowers the loss and writes the Parquet, `coopt train` on the distilled set, resuming
(a killed worker; a rerun with more steps), and bad `distill:` values exiting 2 before Ray starts."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from coopt_ray import cli
from coopt_ray.config import load_config
from coopt_ray.convnet import ConvNet
from coopt_ray.data import fashion_mnist_split
from coopt_ray.distill.krr_st import ModelPool, krr_loss, linear_lr
from coopt_ray.distill.stage import run_distill
from coopt_ray.embeddings import column_matrix
from coopt_ray.augment import normalize_pixels
from coopt_ray.images import arrays_to_rgb, decode_image, encode_png
from coopt_ray.rundir import DONE

from conftest import forbid_ray_start, run_and_kill_a_train_worker, write_config

ROWS, DIM = 240, 8


# ---------------------------------------------------------------- the math
def test_krr_loss_matches_a_hand_computation():
    f_real = torch.tensor([[1., 0., 2.], [0., 1., 1.], [2., 1., 0.], [1., 1., 1.]])   # 4 real rows, 3 features
    f_syn = torch.tensor([[1., 2., 0.], [0., 1., 3.]])                                 # M = 2
    y_syn = torch.tensor([[1.], [-1.]])
    y_real = torch.tensor([[0.5], [0.], [1.], [-0.5]])
    # by hand: append ones; K_ss = [[6, 3], [3, 11]], trace 17, lambda = 1.7e-5; K_rs rows: [2, 7], [3, 5], [5, 2], [4, 5]
    k_ss = np.array([[6., 3.], [3., 11.]]) + 17e-6 * np.eye(2)
    k_rs = np.array([[2., 7.], [3., 5.], [5., 2.], [4., 5.]])
    pred = k_rs @ np.linalg.inv(k_ss) @ np.array([[1.], [-1.]])
    want = float(np.mean((pred - y_real.numpy()) ** 2))
    got = float(krr_loss(f_real, f_syn, y_real, y_syn))
    assert got == pytest.approx(want, rel=1e-5)
    # lambda -> 0: (K_ss)^-1 Y_s = [[11, -3], [-3, 6]] / 57 @ [1, -1] = [14, -9] / 57
    assert want == pytest.approx(np.mean((k_rs @ np.array([[14 / 57], [-9 / 57]]) - y_real.numpy()) ** 2), rel=1e-4)
    # the synthetic rows equal the real ones: kernel ridge regression interpolates (almost exactly)
    assert float(krr_loss(f_real, f_real, y_real, y_real)) < 1e-6
    # gradients reach the synthetic features and targets
    fs, ys = f_syn.clone().requires_grad_(), y_syn.clone().requires_grad_()
    krr_loss(f_real, fs, y_real, ys).backward()
    assert fs.grad.abs().sum() > 0 and ys.grad.abs().sum() > 0


def test_linear_lr_and_pool_resets():
    assert linear_lr(1.0, 1e-3, 0, 10) == 1.0 and linear_lr(1.0, 1e-3, 10, 10) == pytest.approx(1e-3)
    assert linear_lr(1.0, 0.5, 5, 10) == pytest.approx(0.75) and linear_lr(1.0, 0.5, 50, 10) == pytest.approx(0.5)
    x, y = torch.rand(6, 3, 16, 16), torch.randn(6, 4)
    pool = ModelPool(1, 4, 16, 4, reset=3, lr=0.1, seed=0, device=torch.device("cpu"))
    pool.age = [0]
    m = pool.get(0)
    assert not m.training and not any(p.requires_grad for p in m.parameters())
    w0 = m.features[0].weight.clone()
    for _ in range(3):
        assert pool.get(0) is m
        pool.train_step(0, x, y)
    assert not torch.equal(m.features[0].weight, w0) and pool.age == [3]
    assert pool.get(0) is not m and pool.age == [0] and pool.resets == 1  # re-initialised after 3 steps
    fresh = ModelPool(1, 4, 16, 4, reset=0, lr=0.1, seed=0, device=torch.device("cpu"))
    a = fresh.get(0)
    assert fresh.get(0) is not a and fresh.resets == 2  # reset 0: a fresh network at every use


# ---------------------------------------------------------------- a small optimized run
def make_optimized(run: Path, n: int = ROWS, dim: int = DIM) -> None:
    """RUN/optimized (Parquet, the merge stage's columns) + manifest: Fashion-MNIST images whose targets are a
    fixed random linear function of their pixels (so there is something to learn)."""
    from ray.data.extensions import ArrowTensorArray

    x, _ = fashion_mnist_split("unlabeled")
    imgs = arrays_to_rgb(x[:n], 32)
    w = np.random.default_rng(0).normal(size=(32 * 32, dim))
    y = ((imgs.mean(-1).reshape(n, -1) / 255.0) @ w / 32).astype(np.float32)
    (run / "optimized").mkdir(parents=True)
    pq.write_table(pa.table({
        "id": pa.array([f"unlabeled/{i}" for i in range(n)]), "image": pa.array([encode_png(a) for a in imgs]),
        "label": pa.nulls(n, pa.int64()), "target": ArrowTensorArray.from_numpy(y),
        "participant": pa.array(["p0"] * n), "model": pa.array(["m"] * n), "aligned": pa.array([False] * n),
    }), run / "optimized" / "part-0.parquet")
    (run / "manifest.json").write_text(json.dumps({"fingerprint": "test-optimized", "optimized_rows": n,
                                                   "best": "p0", "target_dim": dim}))


def distill_config(tmp_path: Path, **distill):
    d = {"size": 20, "steps": 12, "lr": 1e-2, "pool_size": 2, "pool_width": 16, "pool_steps": 0, "real_batch": 64,
         "workers": 2, "checkpoint_every": 4, "log_every": 2, **distill}
    return load_config(write_config(tmp_path / "c.yaml", ["local-dir:/unused"], distill=d,
                                    student={"arch": "convnet3_w16", "epochs": 2, "batch_size": 10, "workers": 0,
                                             "data": "distilled/krr-st"}))


def fixed_krr_loss(opt_dir: Path, x: np.ndarray, y: np.ndarray, nets: int = 3) -> float:
    """KRR loss of a synthetic set (uint8 NHWC images, raw targets) on 128 fixed real rows and fresh ConvNets."""
    t = pq.read_table(opt_dir, columns=["image", "target"]).slice(0, 128)
    real = np.stack([np.asarray(decode_image(b)) for b in t.column("image").to_pylist()])
    yr = column_matrix(t.column("target"))
    mean, std = yr.mean(0), yr.std(0)

    def px(a):
        return normalize_pixels(torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255)

    out = []
    for s in range(nets):
        torch.manual_seed(1000 + s)
        net = ConvNet(16, 3, 3, 32).eval()
        with torch.no_grad():
            out.append(float(krr_loss(net(px(real)), net(px(x)), torch.from_numpy((yr - mean) / std),
                                      torch.from_numpy((y - mean) / std))))
    return float(np.mean(out))


def read_set(d: Path):
    t = pq.read_table(d)
    imgs = np.stack([np.asarray(decode_image(b)) for b in t.column("image").to_pylist()])
    return t, imgs, column_matrix(t.column("target"))


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, ray_session):
    tmp = tmp_path_factory.mktemp("distill")
    run = tmp / "run"
    make_optimized(run)
    cfg = distill_config(tmp)
    lines: list[str] = []
    res = run_distill(cfg, run, log=lines.append)
    return run, cfg, res, lines, tmp


def test_tiny_distillation_on_two_workers_lowers_the_loss_and_writes_parquet(distilled):
    run, cfg, res, lines, _ = distilled
    d = run / "distilled" / "krr-st"
    assert (d / DONE).is_file() and (d / "distill.json").is_file()
    assert res["workers"] == 2 and res["pool_per_worker"] == [1, 1] and res["loss_steps"] == [2, 4, 6, 8, 10, 12]
    assert any("run name coopt-distill-run" in ln for ln in lines)
    t, imgs, y = read_set(d / "data")
    assert t.num_rows == 20 and set(t.column_names) >= {"id", "image", "target", "participant", "model", "init_id"}
    assert imgs.shape == (20, 32, 32, 3) and y.shape == (20, DIM)
    init = t.column("init_id").to_pylist()
    assert len(set(init)) == 20 and all(i.startswith("unlabeled/") for i in init)
    opt = pq.read_table(run / "optimized", columns=["id", "image", "target"])
    pos = {v: j for j, v in enumerate(opt.column("id").to_pylist())}
    x0 = np.stack([np.asarray(decode_image(opt.column("image")[pos[i]].as_py())) for i in init])
    y0 = column_matrix(opt.column("target"))[[pos[i] for i in init]]
    assert np.abs(imgs.astype(int) - x0).mean() > 1 and np.abs(y - y0).mean() > 1e-3  # both were learned
    before, after = fixed_krr_loss(run / "optimized", x0, y0), fixed_krr_loss(run / "optimized", imgs, y)
    assert after < 0.95 * before, (before, after)
    # rerun: the done marker matches, nothing is redone
    lines2: list[str] = []
    assert run_distill(cfg, run, log=lines2.append)["loss"] == res["loss"]
    assert any("already done" in ln for ln in lines2)


def test_coopt_train_on_the_distilled_set(distilled):
    from coopt_ray.train import run_train

    run, cfg, _, _, _ = distilled
    m = run_train(cfg, run, log=lambda s: None)
    assert m["rows"] == 20 and m["data"] == "distilled/krr-st" and len(m["history"]) == 2
    assert (run / "student" / "student.pt").is_file()


@pytest.mark.slow
def test_more_steps_resume_from_the_newest_checkpoint_and_a_killed_worker_from_its_last(distilled):
    """Asked for more steps, distillation resumes after the 12 it did (a new run finds the checkpoint); and when one
    of its two workers is SIGKILLed after a later checkpoint, FailureConfig restarts the worker group from that
    checkpoint. Every step runs once, bar those since the last checkpoint. (One Ray Train run checks both ways of
    resuming.)"""
    run, cfg, res, _, _ = distilled
    steps = 32  # checkpoints every 4 steps: the kill lands after step 16, 20 or 24's, before step 32
    more = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, steps=steps))
    exp = run / "distilled" / "krr-st" / "ray_results" / "coopt-distill-run"
    lines: list[str] = []
    k = run_and_kill_a_train_worker(lambda: run_distill(more, run, log=lines.append), exp, after=(16, 24), timeout=300)
    res2 = k["result"]
    assert any("resuming after step 12" in ln for ln in lines), lines
    assert res2["loss_steps"] == list(range(2, steps + 1, 2))
    assert res2["history"][:6] == res["history"], "steps before the first run's checkpoint were distilled again"
    assert res2["history"][:len(k["ckpt_history"])] == k["ckpt_history"], "steps before the checkpoint were distilled again"
    assert len(k["workers"]) >= 4, "no second worker group after the kill"
    assert pq.read_table(run / "distilled" / "krr-st" / "data").num_rows == 20


def test_train_on_a_distilled_set_that_does_not_exist_says_what_to_run(tmp_path):
    from coopt_ray.rundir import RunError
    from coopt_ray.train import run_train

    run = tmp_path / "run"
    make_optimized(run, n=40)
    with pytest.raises(RunError, match="coopt distill --config CFG --run"):
        run_train(distill_config(tmp_path), run, log=lambda s: None)


# ---------------------------------------------------------------- bad values
@pytest.mark.parametrize("over,needle", [
    ({"size": 1}, "'distill.size' must be >= 2"),
    ({"steps": 0}, "'distill.steps' must be >= 1"),
    ({"method": "kip"}, "'distill.method' must be one of krr-st"),
    ({"lr": -1.0}, "'distill.lr' must be > 0"),
    ({"lr_final": 2.0}, "'distill.lr_final' must be in (0, 1]"),
    ({"pool_steps": -1}, "'distill.pool_steps' must be >= 0"),
    ({"workers": 3, "pool_size": 2}, "must be >= distill.workers (3)"),
    ({"real_batch": "big"}, "'distill.real_batch' must be an integer"),
    ({"sizee": 10}, "unknown key 'distill.sizee'"),
    ({"channels": 2}, "'distill.channels' must be 1, 3 or auto, got 2"),
    ({"channels": "grey"}, "'distill.channels' must be an integer or auto, got 'grey'"),
    ({"real_augment": "yes"}, "'distill.real_augment' must be true or false, got 'yes'"),
], ids=["size", "steps", "method", "lr", "lr_final", "pool_steps", "pool<workers", "type", "unknown", "channels",
        "channels-name", "real_augment"])
def test_bad_distill_values_exit_2_with_one_line(over, needle, tmp_path, monkeypatch, capsys):
    forbid_ray_start(monkeypatch)
    cfg = write_config(tmp_path / "c.yaml", ["local-dir:/unused"], distill=over)
    rc = cli.main(["distill", "--config", str(cfg), "--run", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "run").exists()


def test_distill_size_larger_than_the_optimized_set_exits_2(tmp_path, monkeypatch, capsys):
    forbid_ray_start(monkeypatch)
    run = tmp_path / "run"
    make_optimized(run, n=30)
    cfg = write_config(tmp_path / "c.yaml", ["local-dir:/unused"], distill={"size": 50})
    rc = cli.main(["distill", "--config", str(cfg), "--run", str(run)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "'distill.size' (50) is larger than RUN/optimized (30 rows)" in err[0], err


def test_student_augment_switch_changes_what_training_depends_on(tmp_path):
    from coopt_ray.train import train_fingerprint

    on = distill_config(tmp_path)
    off = dataclasses.replace(on, student=dataclasses.replace(on.student, augment=False))
    weak = dataclasses.replace(on, student=dataclasses.replace(on.student, augment="weak"))
    man = {"fingerprint": "x"}
    assert len({train_fingerprint(c, man) for c in (on, off, weak)}) == 3
    assert train_fingerprint(on, man) == train_fingerprint(on, man)


@pytest.mark.slow
def test_coopt_run_includes_the_distill_stage_when_the_student_trains_on_it(tmp_path, tiny_models, shared_optimized,
                                                                            capsys):
    """`coopt run` with student.data: distilled/krr-st: optimize (done: a copy of the session's optimized RUN) ->
    distill -> train -> evaluate -> report, the student trained on the distilled rows, the report showing the
    distillation."""
    from conftest import copy_run

    copy_run(shared_optimized, tmp_path / "run")
    cfg = write_config(tmp_path / "c.yaml", tiny_models,
                       distill={"size": 20, "steps": 4, "pool_size": 1, "pool_width": 16, "real_batch": 32,
                                "workers": 0, "checkpoint_every": 2, "log_every": 2},
                       student={"arch": "convnet3_w16", "epochs": 1, "batch_size": 10, "workers": 0,
                                "data": "distilled/krr-st"},
                       eval={"probe_epochs": 5, "probe_limit": 200, "test_limit": 100})
    run = tmp_path / "run"
    assert cli.main(["run", "--config", str(cfg), "--out", str(run)]) == 0
    out = capsys.readouterr().out
    stages = [out.index(f"---- {s} ----") for s in ("optimize", "distill", "train", "evaluate", "report")]
    assert stages == sorted(stages)
    metrics = json.loads((run / "student" / "metrics.json").read_text())
    assert metrics["rows"] == 20 and metrics["data"] == "distilled/krr-st"
    assert (run / "report" / "distilled.png").stat().st_size > 1000 and (run / "report" / "distill_loss.png").is_file()
    assert "distilled.png" in (run / "report" / "report.html").read_text()


def test_target_standardise_round_trip_and_known_values():
    from coopt_ray.student import standardise, target_transform, unstandardise

    y = np.array([[1.0, 10.0], [3.0, 10.0], [5.0, 40.0], [7.0, 20.0]])  # means 4, 20; population stds sqrt(5), sqrt(150)
    mean, proj = target_transform(y)
    scale = np.diag(proj)
    np.testing.assert_allclose(mean, [4.0, 20.0])
    np.testing.assert_allclose(scale, [1 / np.sqrt(5), 1 / np.sqrt(150)], rtol=1e-6)
    z = standardise(y, mean, scale)
    np.testing.assert_allclose(z[:, 0], np.array([-3, -1, 1, 3]) / np.sqrt(5), rtol=1e-6)
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-6) and np.testing.assert_allclose(z.std(0), 1, rtol=1e-5)
    np.testing.assert_allclose(unstandardise(z, mean, scale), y, rtol=1e-6, atol=1e-5)
