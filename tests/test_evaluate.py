"""Linear-probe evaluation: the probe itself, labeled splits, and the stage on a local Ray."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from coopt_ray.evaluate import EvalSkipped, labeled_splits, load_labeled
from coopt_ray.probe import linear_probe

ARCH = "convnet3_w16"  # coopt's ConvNet (BatchNorm, timm-registered): ~20x less compute than resnet10t per image


def test_linear_probe_separable_and_chance():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 8)) * 4
    y = rng.integers(0, 3, size=600)
    x = centers[y] + rng.normal(size=(600, 8))
    assert linear_probe(x[:400], y[:400], x[400:], y[400:], epochs=30) > 0.95
    noise = rng.normal(size=(600, 8))
    assert linear_probe(noise[:400], y[:400], noise[400:], y[400:], epochs=30) < 0.6


def test_fashion_mnist_splits_follow_limits(tmp_path, tiny_models):
    from conftest import write_config
    from coopt_ray.config import load_config

    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_models[:1], eval={"probe_limit": 50, "test_limit": 30}))
    s = labeled_splits(cfg)
    (px, py), (tx, ty) = s["probe"], s["test"]
    assert px.shape == (50, 28, 28) and py.shape == (50,) and tx.shape == (30, 28, 28) and len(ty) == 30
    assert "public train[0:50]" in s["description"] and "t10k[0:30]" in s["description"]


def _image_folder(root, classes=("cat", "dog"), per_class=6, size=20):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    (root / "dog" / "broken.png").write_bytes(b"not an image")  # skipped, never fatal
    return root


def test_labeled_folder_is_resized_and_a_mixed_subset(tmp_path):
    root = _image_folder(tmp_path / "probe")
    x, y, classes = load_labeled(str(root), 32)
    assert x.shape == (12, 32, 32, 3) and x.dtype == np.uint8
    assert classes == ["cat", "dog"] and sorted(set(y.tolist())) == [0, 1]
    x5, y5, _ = load_labeled(str(root), 32, limit=5, seed=0)
    assert len(y5) <= 5 and len(set(y5.tolist())) == 2  # seeded shuffle, not the first class only


def test_images_source_without_labeled_split_is_skipped(tmp_path, tiny_models):
    from conftest import write_config
    from coopt_ray.config import load_config

    root = _image_folder(tmp_path / "imgs")
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_models[:1], data={"source": "images", "path": str(root)}))
    with pytest.raises(EvalSkipped, match="eval.probe_path and eval.test_path"):
        labeled_splits(cfg)
    cfg2 = load_config(write_config(tmp_path / "c2.yaml", tiny_models[:1],
                                    data={"source": "images", "path": str(root)},
                                    eval={"probe_path": str(root), "test_path": str(root)}))
    s = labeled_splits(cfg2)
    assert s["probe"][0].shape[1:] == (32, 32, 3)


def _fake_student(run, image_size=32, head_dim=16):
    """RUN/student as the train stage leaves it, with a random-init student (no training needed)."""
    from coopt_ray.student import Student

    out = run / "student"
    out.mkdir(parents=True)
    torch.manual_seed(1)
    torch.save(Student(ARCH, image_size, head_dim).state_dict(), out / "student.pt")
    (out / "metrics.json").write_text(json.dumps({"arch": ARCH, "image_size": image_size, "head_dim": head_dim,
                                                  "epochs": 1, "rows": 0, "history": []}))
    (out / "_DONE.json").write_text(json.dumps({"fingerprint": "fake", "final_loss": 0.0}))


def test_evaluate_stage_scores_student_teachers_and_random_init(ray_session, tmp_path, tiny_models):
    from conftest import write_config
    from coopt_ray.config import load_config
    from coopt_ray.evaluate import run_evaluate

    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_models[:2], student={"arch": ARCH},
                                   eval={"probe_epochs": 5, "probe_limit": 200, "test_limit": 100}))
    run = tmp_path / "run"
    _fake_student(run)
    logs = []
    ev = run_evaluate(cfg, run, log=logs.append)
    saved = json.loads((run / "eval.json").read_text())
    assert saved["student"]["arch"] == ARCH and saved["random_init"]["arch"] == ARCH
    assert set(saved["teachers"]) == {"p0", "p1"}
    # Known answers: each Ray task's accuracy is what the same scorer gives in-process on the same splits (the
    # tiny models are untrained; a trained teacher beating chance is tests/test_zoo.py's check, a trained student
    # beating random init tests/test_student_learns.py's). Student and random init are different weights.
    from coopt_ray.evaluate import score_backbone, score_teacher
    from coopt_ray.images import arrays_to_rgb

    (px, py), (tx, ty) = labeled_splits(cfg)["probe"], labeled_splits(cfg)["test"]
    data = {"probe_raw": px, "test_raw": tx, "probe_y": py, "test_y": ty,
            "probe_rgb": arrays_to_rgb(px, 32), "test_rgb": arrays_to_rgb(tx, 32)}
    state = {k[len("backbone."):]: v for k, v in torch.load(run / "student" / "student.pt", weights_only=True).items()
             if k.startswith("backbone.")}
    want = {"student": score_backbone(state, ARCH, 32, data, epochs=5, seed=cfg.seed),
            "random_init": score_backbone(None, ARCH, 32, data, epochs=5, seed=cfg.seed),
            "p0": score_teacher(tiny_models[0], None, data, epochs=5, seed=cfg.seed)}
    got = {"student": saved["student"], "random_init": saved["random_init"], "p0": saved["teachers"]["p0"]}
    for k in want:
        assert got[k]["probe_accuracy"] == pytest.approx(want[k]["probe_accuracy"], abs=1e-9), k
    assert saved["teachers"]["p0"]["embed_dim"] == 16 and saved["student"]["feature_dim"] == 64 * 4 * 4  # its last map, flattened
    assert {"student", "random_init", "p0", "p1", "total"} <= set(saved["seconds"])
    assert saved["probe"]["probe_rows"] == 200 and saved["probe"]["test_rows"] == 100
    assert any("probe accuracy" in line for line in logs)
    assert ev == saved
    logs.clear()
    assert run_evaluate(cfg, run, log=logs.append)["fingerprint"] == saved["fingerprint"]
    assert any("already done" in line for line in logs)


def test_evaluate_skips_images_source_with_a_message(ray_session, tmp_path, tiny_models):
    from conftest import write_config
    from coopt_ray.config import load_config
    from coopt_ray.evaluate import run_evaluate

    root = _image_folder(tmp_path / "imgs")
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_models[:1], data={"source": "images", "path": str(root)}))
    run = tmp_path / "run"
    _fake_student(run)
    logs = []
    ev = run_evaluate(cfg, run, log=logs.append)
    assert "eval.probe_path" in ev["skipped"] and json.loads((run / "eval.json").read_text())["skipped"]
    assert any(line.startswith("[evaluate] skipped:") for line in logs)


def test_evaluate_needs_a_trained_student(tmp_path, tiny_models):
    from conftest import write_config
    from coopt_ray.config import load_config
    from coopt_ray.evaluate import run_evaluate
    from coopt_ray.rundir import RunError

    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_models[:1]))
    with pytest.raises(RunError, match="coopt train"):
        run_evaluate(cfg, tmp_path / "run")
