"""Student training: the network, augmentations, target standardisation, the loop in-process
(``ScalingConfig(num_workers=0)``), including resume. The stage on 2 Ray Train workers is in test_run.py."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from coopt_ray.augment import BatchAugment
from coopt_ray.student import Student, adapt_stem, build_backbone, latest_checkpoint, load_state, target_transform
from coopt_ray.rows import subset_ids
from coopt_ray.train import train_loop_per_worker

ARCH = "resnet10t"  # the smallest timm ResNet: keeps the Ray tests quick on 2 cores


# ---------------------------------------------------------------- network
def test_resnet18_gets_small_image_stem():
    m = build_backbone("resnet18", 32)
    assert isinstance(m.conv1, torch.nn.Conv2d)
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert isinstance(m.maxpool, torch.nn.Identity)
    with torch.no_grad():
        assert m.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 512)


def test_large_images_keep_the_imagenet_stem():
    m = build_backbone(ARCH, 96)
    assert not isinstance(m.maxpool, torch.nn.Identity)
    assert adapt_stem(torch.nn.Linear(2, 2)) is False  # not a ResNet: left alone


def test_vit_is_built_for_the_image_size():
    m = build_backbone("vit_tiny_patch16_224", 32)
    with torch.no_grad():
        assert m.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, m.feature_width)


def test_student_head_takes_the_backbone_output_width():
    """MobileNetV3 returns its 1024-wide conv_head output, not num_features (288): the head must fit it."""
    m = build_backbone("mobilenetv3_small_050", 32)
    assert m.feature_width == 1024 != m.num_features
    s = Student("mobilenetv3_small_050", 32, 16)
    with torch.no_grad():
        assert s.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 16)


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown timm architecture 'no-such-net'"):
        build_backbone("no-such-net", 32)


def test_student_head_maps_to_target_dim():
    s = Student(ARCH, 16, 7)
    with torch.no_grad():
        assert s.eval()(torch.zeros(3, 3, 16, 16)).shape == (3, 7)


# ---------------------------------------------------------------- augmentation
def test_augment_is_per_image_seeded_and_in_range():
    aug = BatchAugment(32)
    x = torch.rand(1, 3, 28, 28).repeat(16, 1, 1, 1)  # the same image 16 times
    a = aug(x, torch.Generator().manual_seed(0))
    b = aug(x, torch.Generator().manual_seed(0))
    assert a.shape == (16, 3, 32, 32) and a.dtype == torch.float32
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    assert torch.equal(a, b)
    diffs = [(a[0] - a[i]).abs().mean().item() for i in range(1, 16)]
    assert min(diffs) > 1e-4  # each copy got its own crop/flip/jitter


def test_augment_grayscale_input_and_identity_crop():
    aug = BatchAugment(8, scale=(1.0, 1.0), ratio=(1.0, 1.0), p_jitter=0.0, p_gray=0.0, p_flip=0.0)
    x = torch.rand(4, 1, 8, 8)
    out = aug(x, torch.Generator().manual_seed(1))
    assert out.shape == (4, 3, 8, 8)
    assert torch.allclose(out, x.expand(-1, 3, -1, -1), atol=1e-5)  # full-image crop is the identity


def test_weak_augment_crops_and_flips_but_keeps_the_colours():
    from coopt_ray.augment import make_augment

    assert make_augment(8, False) is None
    flat = torch.rand(16, 3, 1, 1).expand(-1, -1, 8, 8).contiguous()  # one colour per image
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    weak, strong = make_augment(8, "weak")(flat, gen()), make_augment(8, True)(flat, gen())
    assert torch.allclose(weak, flat, atol=1e-6)  # a crop or flip of one colour is that colour, exactly
    assert (strong - flat).abs().amax(dim=(1, 2, 3)).gt(1e-3).sum() >= 8  # jitter/grey change most (p = 0.8)
    ramp = torch.linspace(0, 1, 8).view(1, 1, 1, 8).expand(16, 3, 8, 8).contiguous()  # dark left, bright right
    moved = make_augment(8, "weak")(ramp, gen())
    assert (moved - ramp).abs().amax(dim=(1, 2, 3)).gt(1e-3).sum() >= 8  # crops and flips still happen
    flipped = moved[:, :, :, 0].mean((1, 2)) > moved[:, :, :, -1].mean((1, 2))
    assert 0 < int(flipped.sum()) < 16  # some images flipped (bright left), some not
    with pytest.raises(ValueError, match="true, false or weak"):
        make_augment(8, "strong")


# ---------------------------------------------------------------- targets
def test_standardise_targets():
    rng = np.random.default_rng(0)
    y = rng.normal(3.0, 5.0, size=(500, 6))
    mean, P = target_transform(y)
    z = (y - mean) @ P
    assert P.shape == (6, 6)
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(0), 1, atol=1e-4)


def test_whiten_targets_pca_to_student_dim():
    rng = np.random.default_rng(1)
    y = rng.normal(size=(2000, 5)) @ rng.normal(size=(5, 8))  # rank-5 targets in 8 dims
    mean, P = target_transform(y, whiten=True, out_dim=4)
    z = (y - mean) @ P
    assert P.shape == (8, 4)
    np.testing.assert_allclose(np.cov(z, rowvar=False), np.eye(4), atol=1e-2)


def test_subset_ids_is_seeded_and_exact():
    ids = [f"train/{i}" for i in range(1000)]
    a, b = subset_ids(ids, 100, 0), subset_ids(ids, 100, 0)
    assert a == b and len(a) == 100
    assert subset_ids(ids, 100, 1) != a
    assert subset_ids(ids, None, 0) is None and subset_ids(ids, 5000, 0) is None
    assert max(int(i.split("/")[1]) for i in a) > 500  # spread over the data, not its head


# ---------------------------------------------------------------- the loop, in-process
def _tiny_dataset(n=48, size=16, dim=6):
    import ray.data

    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, size=(n, size, size, 3), dtype=np.uint8)
    tgt = rng.normal(size=(n, dim)).astype(np.float32)
    return ray.data.from_items([{"image": imgs[i], "target": tgt[i]} for i in range(n)]), tgt


def _loop_config(tgt, tmp_path, epochs, **kw):
    mean, P = target_transform(tgt)
    return {"arch": ARCH, "image_size": 16, "target_dim": tgt.shape[1], "target_mean": mean.tolist(),
            "target_proj": P.tolist(), "epochs": epochs, "batch_size": 16, "lr": 1e-3, "weight_decay": 0.01,
            "seed": 0, "fingerprint": "t", "threads": 2, "local_checkpoint_dir": str(tmp_path / "ck"),
            "log": False, **kw}


def test_train_loop_in_process_reports_checkpoints_and_resumes(ray_session, tmp_path):
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    ds, tgt = _tiny_dataset()

    def fit(epochs, **kw):
        return TorchTrainer(train_loop_per_worker, train_loop_config=_loop_config(tgt, tmp_path, epochs, **kw),
                            scaling_config=ScalingConfig(num_workers=0), datasets={"train": ds}).fit()

    r1 = fit(1)
    assert r1.metrics["epoch"] == 1 and np.isfinite(r1.metrics["loss"]) and r1.metrics["images"] == 48
    latest = latest_checkpoint(tmp_path / "ck")
    assert latest is not None and latest[1] == {"epoch": 0, "fingerprint": "t"}
    st = load_state(latest[0])
    assert st["epoch"] == 0 and len(st["history"]) == 1 and "backbone.conv1.weight" in st["model"]

    r2 = fit(3, resume_from=str(latest[0]))  # a rerun picks up after epoch 1 instead of starting over
    assert r2.return_value["start_epoch"] == 1
    assert [h["epoch"] for h in r2.return_value["history"]] == [1, 2, 3]
    assert r2.metrics["epoch"] == 3
    kept = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert kept == ["checkpoint_epoch_0001", "checkpoint_epoch_0002"]  # older ones pruned


def test_training_loss_falls_on_learnable_targets(ray_session, tmp_path):
    """Targets that depend on the image (stripe orientation survives crops, flips and colour jitter):
    the loss after 4 epochs is clearly below the first epoch's, on a fixed seed."""
    import ray.data
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    rng = np.random.default_rng(0)
    n, size, dim = 64, 16, 6
    stripes = (np.arange(size) // 2 % 2 * 200 + 30).astype(np.uint8)
    horiz = np.repeat(np.repeat(stripes[:, None], size, 1)[..., None], 3, 2)
    imgs = np.stack([horiz if i % 2 else horiz.transpose(1, 0, 2) for i in range(n)])
    v = rng.normal(size=dim).astype(np.float32)
    tgt = np.stack([(v if i % 2 else -v) + 0.1 * rng.normal(size=dim).astype(np.float32) for i in range(n)])
    ds = ray.data.from_items([{"image": imgs[i], "target": tgt[i]} for i in range(n)])
    r = TorchTrainer(train_loop_per_worker, train_loop_config=_loop_config(tgt, tmp_path, 4),
                     scaling_config=ScalingConfig(num_workers=0), datasets={"train": ds}).fit()
    loss = [h["loss"] for h in r.return_value["history"]]
    assert len(loss) == 4 and loss[-1] < 0.7 * loss[0], loss


# ---------------------------------------------------------------- the stage
# (2 Ray Train workers, skip and resume: tests/test_run.py, on the run `coopt run` makes there)
def test_train_needs_an_optimized_run(tmp_path, tiny_models):
    from conftest import write_config
    from coopt_ray.config import load_config
    from coopt_ray.rundir import RunError
    from coopt_ray.train import run_train

    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_models[:1]))
    with pytest.raises(RunError, match="coopt optimize"):
        run_train(cfg, tmp_path / "nothing")


def test_streamed_subset_and_target_moments_match_the_in_memory_versions(tmp_path):
    """The driver streams RUN/optimized in batches: the same seeded subset and the same target transform as the
    in-memory reference, with small batches so the streaming is exercised."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.data.extensions import ArrowTensorArray

    from coopt_ray.rows import row_moments, scan, streamed_subset
    from coopt_ray.student import transform_from_moments

    rng = np.random.default_rng(3)
    ids = [f"x/{i}" for i in range(900)]
    y = (rng.normal(size=(900, 7)) @ rng.normal(size=(7, 7)) + 2.0).astype(np.float32)
    for j in range(3):
        sl = slice(300 * j, 300 * (j + 1))
        pq.write_table(pa.table({"id": ids[sl], "target": ArrowTensorArray.from_numpy(y[sl])}), tmp_path / f"p{j}.parquet")
    assert sum(b.num_rows for b in scan(tmp_path, ["id"], batch_size=64)) == 900
    keep = streamed_subset(tmp_path, 250, seed=5)
    assert keep == subset_ids(ids, 250, 5) and streamed_subset(tmp_path, None, 5) is None
    n, mean, cov = row_moments(tmp_path, keep)[0]
    sub = y[[i in keep for i in ids]]
    assert n == 250
    for whiten in (False, True):
        m1, p1 = transform_from_moments(n, mean, cov, whiten=whiten, out_dim=4)
        m2, p2 = target_transform(sub, whiten=whiten, out_dim=4)
        np.testing.assert_allclose(m1, m2, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.abs(p1), np.abs(p2), rtol=1e-3, atol=1e-4)  # eigenvector signs may flip


@pytest.mark.parametrize("turns", [0.0, 1.0, -1.0])
def test_hue_rotation_by_zero_or_a_full_turn_is_the_identity(turns):
    from coopt_ray.augment import _hue_rotate

    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.8 + 0.1
    y = _hue_rotate(x, torch.full((3,), turns))
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)
    assert (_hue_rotate(x, torch.full((3,), 0.5)) - x).abs().max() > 0.05  # control: half a turn moves colours


def test_weighted_student_loss_on_hand_values():
    from coopt_ray.student import cosine_loss

    pred = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    y = torch.tensor([[3.0, 0.0], [1.0, 0.0], [-1.0, -1.0]])  # cos = 1, 0, -1: losses 0, 1, 2
    assert float(cosine_loss(pred, y)) == pytest.approx(1.0)
    assert float(cosine_loss(pred, y, torch.tensor([1.0, 1.0, 1.0]))) == pytest.approx(1.0)
    assert float(cosine_loss(pred, y, torch.tensor([3.0, 1.0, 0.0]))) == pytest.approx(1 / 4)  # (0*3 + 1*1) / 4
    assert float(cosine_loss(pred, y, torch.tensor([0.0, 0.0, 2.0]))) == pytest.approx(2.0)
    assert cosine_loss(pred.bfloat16(), y).dtype == torch.float32  # computed in fp32 under autocast


def test_student_loss_kinds_on_hand_values():
    """student.loss: cos, RADIO's 0.9 cos + 0.1 smooth-L1, and mse, per row then (weighted) mean over rows."""
    from coopt_ray.student import student_loss

    pred = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([[3.0, 0.0], [0.0, 2.5]])  # cos 1 and 1: the cosine losses are 0; the distances are not
    assert float(student_loss(pred, y, "cos")) == pytest.approx(0.0, abs=1e-7)
    # smooth-L1 (beta 1) per row: [(|1-3| - 0.5) + 0] / 2 = 0.75 and [0 + 0.5 * 0.5^2] / 2 = 0.0625
    assert float(student_loss(pred, y, "cos+smooth-l1")) == pytest.approx(0.1 * (0.75 + 0.0625) / 2)
    assert float(student_loss(pred, y, "mse")) == pytest.approx(((4 + 0) / 2 + (0 + 0.25) / 2) / 2)
    assert float(student_loss(pred, y, "mse", torch.tensor([0.0, 1.0]))) == pytest.approx(0.125)
    assert float(student_loss(pred, -y, "cos+smooth-l1")) > 0.9 * 2 - 1e-6  # opposite directions: cos loss 2
    with pytest.raises(ValueError, match="got 'l2'"):
        student_loss(pred, y, "l2")
