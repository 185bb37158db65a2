"""The linear probe on synthetic features with known answers, and embedding uint8 arrays."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from coopt_ray.probe import embed_arrays, linear_probe, preprocess_arrays


def _blobs(n: int, dim: int, classes: int, seed: int, spread: float = 8.0):
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(123).normal(size=(classes, dim)) * spread  # same for both splits
    y = rng.integers(0, classes, size=n)
    x = centers[y] + rng.normal(size=(n, dim))
    return x.astype(np.float32), y


def test_probe_separable_blobs_near_perfect():
    xtr, ytr = _blobs(2000, 32, 10, seed=0)
    xte, yte = _blobs(1000, 32, 10, seed=1)
    xtr, xte = xtr * 50 + 7, xte * 50 + 7  # scale/offset must not matter: features are standardised
    acc = linear_probe(xtr, ytr, xte, yte, epochs=30)
    assert acc >= 0.99


def test_probe_random_labels_is_chance():
    rng = np.random.default_rng(0)
    xtr, xte = rng.normal(size=(2000, 32)), rng.normal(size=(1000, 32))
    ytr, yte = rng.integers(0, 10, 2000), rng.integers(0, 10, 1000)
    acc = linear_probe(xtr, ytr, xte, yte, epochs=30)
    assert abs(acc - 0.1) < 0.05


def test_probe_is_seeded_and_restores_threads():
    xtr, ytr = _blobs(500, 8, 3, seed=0, spread=0.7)
    xte, yte = _blobs(300, 8, 3, seed=1, spread=0.7)
    threads = torch.get_num_threads()
    a = linear_probe(xtr, ytr, xte, yte, epochs=10, seed=3)
    b = linear_probe(xtr, ytr, xte, yte, epochs=10, seed=3)
    assert a == b and 0.0 < a <= 1.0
    assert torch.get_num_threads() == threads


def test_probe_rejects_bad_shapes():
    with pytest.raises(ValueError):
        linear_probe(np.zeros((4, 3)), [0, 1, 0, 1], np.zeros((2, 5)), [0, 1])
    with pytest.raises(ValueError):
        linear_probe(np.zeros((4, 3)), [0, 1, 0], np.zeros((2, 3)), [0, 1])


def test_embed_arrays_matches_model_preprocess(tmp_path):
    """Grayscale and RGB uint8 arrays embed exactly as preprocess(PIL RGB) -> encode_image does."""
    from PIL import Image

    from coopt_ray.models import load_model

    from conftest import make_tiny_model

    m, preprocess, dim = load_model(make_tiny_model(tmp_path / "m", 24), device="cpu")
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    feats = embed_arrays(m, preprocess, gray, batch_size=3)
    assert feats.shape == (7, dim) and feats.dtype == np.float32
    with torch.no_grad():
        ref = m.encode_image(torch.stack([preprocess(Image.fromarray(a).convert("RGB")) for a in gray]))
    np.testing.assert_allclose(feats, ref.numpy(), rtol=1e-4, atol=1e-5)
    rgb = np.repeat(gray[..., None], 3, axis=-1)  # the same images as RGB give the same features
    np.testing.assert_allclose(embed_arrays(m, preprocess, rgb), feats, rtol=1e-4, atol=1e-5)
    assert preprocess_arrays(preprocess, gray).shape == (7, 3, 32, 32)
    with pytest.raises(ValueError):
        embed_arrays(m, preprocess, gray.astype(np.float32))
