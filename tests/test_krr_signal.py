"""Issue 29's instruments for KRR-ST: the real batch's padded crop and flip, a grey (one-channel) synthetic set,
the drift of X_s and Y_s beside the random-walk floor, and the held-out KRR loss under fresh pool models."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from coopt_ray.augment import pad_crop_flip, random_pad_crop_flip
from coopt_ray.config import load_config
from coopt_ray.config_distill import distill_view
from coopt_ray.distill.krr_st import SyntheticSet, heldout_krr_loss, linear_lr, random_walk_floor
from coopt_ray.distill.stage import run_distill, synthetic_channels
from coopt_ray.images import decode_image

from conftest import write_config
from test_distill import distill_config, make_optimized


def test_pad_crop_flip_known_answers():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5) + 1
    no = torch.zeros(2, dtype=torch.bool)
    assert torch.equal(pad_crop_flip(x, torch.full((2, 2), 2), no, 2), x)  # offset (pad, pad): the image itself
    assert torch.equal(pad_crop_flip(x, torch.full((2, 2), 2), ~no, 2), x.flip(3))
    out = pad_crop_flip(x, torch.tensor([[0, 0], [4, 1]]), no, 2)
    assert torch.equal(out[0, :, 2:, 2:], x[0, :, :3, :3]) and not out[0, :, :2].any() and not out[0, :, :, :2].any()
    assert torch.equal(out[1, :, :3, 1:], x[1, :, 2:, :4]) and not out[1, :, 3:].any() and not out[1, :, :, 0].any()
    g = torch.Generator().manual_seed(0)
    y = random_pad_crop_flip(x, g, pad=2)
    assert y.shape == x.shape and not torch.equal(y, x)
    assert torch.equal(random_pad_crop_flip(x, torch.Generator().manual_seed(0), pad=2), y)  # the generator decides


def test_random_walk_floor_is_the_root_sum_of_squared_learning_rates():
    assert random_walk_floor(0.01, 1.0, 100, 100) == pytest.approx(0.01 * 10)  # constant lr: lr * sqrt(steps)
    assert random_walk_floor(0.01, 1.0, 100, 25) == pytest.approx(0.01 * 5)
    assert random_walk_floor(0.02, 0.5, 4, 4) == pytest.approx(np.sqrt(sum(linear_lr(0.02, 0.5, t, 4) ** 2
                                                                           for t in range(4))))
    assert random_walk_floor(0.02, 0.5, 4, 4) == pytest.approx(np.sqrt(0.02**2 + 0.0175**2 + 0.015**2 + 0.0125**2))
    assert random_walk_floor(0.02, 0.5, 4, 0) == 0.0


def test_heldout_krr_loss_is_zero_on_the_synthetic_rows_themselves_and_fixed_by_its_seed():
    g = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(8, 3, 16, 16, generator=g), torch.randn(8, 4, generator=g)
    xr, yr = torch.randn(40, 3, 16, 16, generator=g), torch.randn(40, 4, generator=g)
    on_itself = heldout_krr_loss(xs, ys, xs, ys, models=3, width=8, seed=1)
    assert len(on_itself) == 3 and max(on_itself) < 1e-3  # KRR interpolates its own rows (lambda = 1e-6 tr K)
    a = heldout_krr_loss(xs, ys, xr, yr, models=3, width=8, seed=1, batch=16)
    assert a == pytest.approx(heldout_krr_loss(xs, ys, xr, yr, models=3, width=8, seed=1, batch=40), rel=1e-5)
    assert min(a) > 0.5 and a != heldout_krr_loss(xs, ys, xr, yr, models=3, width=8, seed=2)


def test_a_grey_synthetic_set_shows_the_pool_three_equal_channels_and_learns_one():
    s = SyntheticSet(np.random.default_rng(0).random((4, 1, 8, 8)), np.zeros((4, 2)))
    x, _ = s()
    assert x.shape == (4, 3, 8, 8)
    raw = s.rgb()
    assert torch.equal(raw[:, 0], raw[:, 1]) and torch.equal(raw[:, 1], raw[:, 2])
    x.sum().backward()
    assert s.x.grad.shape == (4, 1, 8, 8)
    grey = np.repeat(np.random.default_rng(1).random((3, 1, 4, 4)), 3, axis=1)
    colour = grey.copy()
    colour[1, 2, 0, 0] += 0.1
    assert synthetic_channels(grey, "auto") == 1 and synthetic_channels(colour, "auto") == 3
    assert synthetic_channels(colour, 1) == 1 and synthetic_channels(grey, 3) == 3


def test_new_distill_keys_leave_existing_fingerprints_alone(tmp_path):
    base = load_config(write_config(tmp_path / "a.yaml", ["local-dir:/unused"]))
    assert not {"real_augment", "channels"} & set(distill_view(base.distill))
    grey = load_config(write_config(tmp_path / "b.yaml", ["local-dir:/unused"],
                                    distill={"channels": "auto", "real_augment": True}))
    assert distill_view(grey.distill)["channels"] == "auto" and distill_view(grey.distill)["real_augment"] is True
    assert grey.fingerprint() != base.fingerprint()
    mdatm = load_config(write_config(tmp_path / "c.yaml", ["local-dir:/unused"], distill={"method": "mdatm"}))
    assert not {"real_augment", "channels"} & set(distill_view(mdatm.distill))


def test_a_grey_augmented_distillation_logs_its_drift_beside_the_floor(tmp_path, ray_session):
    run = tmp_path / "run"
    make_optimized(run, n=200)
    cfg = distill_config(tmp_path, size=10, steps=6, real_batch=32, workers=0, checkpoint_every=3, log_every=3,
                         channels="auto", real_augment=True)
    lines: list[str] = []
    res = run_distill(cfg, run, log=lines.append)
    assert res["channels"] == 1 and any("(crop and flip), 1 image channel" in ln for ln in lines)
    h = res["history"]
    assert [e["step"] for e in h] == [3, 6] and all(e["x_drift"] > 0 and e["y_drift"] > 0 for e in h)
    assert h[-1]["floor"] == pytest.approx(random_walk_floor(1e-2, cfg.distill.lr_final, 6, 6), rel=1e-4)
    assert h[-1]["floor_pixels"] == pytest.approx(255 * h[-1]["floor"], rel=1e-3)
    d = res["drift"]
    assert d["x_over_floor"] == pytest.approx(h[-1]["x_drift"] / h[-1]["floor_pixels"], rel=1e-2)
    assert any("[distill] drift: pixels" in ln for ln in lines)
    imgs = np.stack([np.asarray(decode_image(b)) for b in
                     pq.read_table(run / "distilled" / "krr-st" / "data").column("image").to_pylist()])
    assert imgs.shape == (10, 32, 32, 3) and (imgs[..., 0] == imgs[..., 2]).all()  # stored as grey RGB
    assert json.loads((run / "distilled" / "krr-st" / "distill.json").read_text())["drift"] == d


def test_the_signal_benchmark_judges_its_goals_from_known_numbers():
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "benchmarks"))
    import krr_signal
    from report_krr import krr_goal_rows, krr_signal_table

    def seed(fall, over, accs):
        students = [{"recipe": rc, "variant": v, "probe_accuracy": a, "train_seconds": 1.0}
                    for (rc, v), a in accs.items()]
        return {"signal": {"loss_initial": 1.0, "loss_distilled": 1 - fall, "loss_random": 1.1, "heldout_fall": fall,
                           "x_drift": over, "floor_pixels": 1.0, "x_over_floor": over, "y_drift": 0.1, "floor": 0.1,
                           "y_over_floor": 1.0},
                "distill": {"seconds": 60.0}, "students": students}

    res = {"seeds": {"0": seed(0.12, 1.5, {("mse", "distilled"): 0.80, ("mse", "paired"): 0.78, ("mse", "whole"): 0.84,
                                          ("product", "distilled"): 0.70, ("product", "paired"): 0.70}),
                     "1": seed(0.10, 2.1, {("mse", "distilled"): 0.82, ("mse", "paired"): 0.78, ("mse", "whole"): 0.84,
                                          ("product", "distilled"): 0.72, ("product", "paired"): 0.74})}}
    g = krr_signal.summarise(res)["summary"]["goals"]
    assert g["heldout_fall_10pct"] is True and g["drift_2x_floor"] is False  # mean fall 11 %, mean drift 1.8x
    assert g["mse"] == {"distilled_minus_paired_points": 3.0, "seeds": 2, "spread_points": 1.0,
                        "beats_paired_beyond_spread": True, "gap_closed": 0.5, "closes_half_the_gap": True}
    assert g["product"]["distilled_minus_paired_points"] == -1.0 and not g["product"]["beats_paired_beyond_spread"]
    rows = []
    krr_goal_rows(res, lambda *r: rows.append(r))
    assert ("KRR-ST: pixel drift of X_s against the random-walk floor", ">= 2x", "1.80x", False) in rows
    res["settings"] = {"size": 10, "steps": 5, "lr": 1e-3, "lr_final": 1e-3, "real_batch": 8, "real_augment": "true",
                       "channels": "auto", "pool_size": 2, "pool_width": 16, "pool_steps": 0, "eval_models": 3,
                       "student_steps": 4, "batch_size": 2, "probe_images": 10, "test_images": 10, "probe_epochs": 1,
                       "product_arch": "resnet10t"}
    res.update(train_rows=90, heldout_rows=10)
    text = krr_signal_table(res)
    assert "| 1 | 1.0000 -> 0.9000 | 10.0 % |" in text and "| distilled (X_s, Y_s) | 81.00 ± 1.00 (2) | 71.00 ± 1.00 (2) |" in text
