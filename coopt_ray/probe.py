"""The linear probe (frozen features -> linear classifier -> test accuracy) and the feature extractors it scores:
open_clip teachers on arrays, student backbones on RGB images. Shared by evaluate, zoo and the benchmarks."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .augment import normalize_pixels, to_float_nchw


# ---------------------------------------------------------------- the probe (pure torch, CPU)
def linear_probe(train_x, train_y, test_x, test_y, epochs: int = 100, lr: float = 1e-3,
                 batch_size: int = 256, seed: int = 0, last_k: int = 5) -> float:
    """Test accuracy of a linear classifier trained on frozen features.

    Features are standardised with the train split's mean/std; an ``nn.Linear`` is trained with
    Adam and cross-entropy on shuffled mini-batches for ``epochs`` epochs. Returns the mean test
    accuracy over the last ``last_k`` epochs (as RELA does), which smooths epoch-to-epoch noise.
    Labels are ints in ``[0, C)``; C is taken from both splits. Seeded and deterministic on CPU.
    """
    xtr = torch.as_tensor(np.asarray(train_x, dtype=np.float32))
    xte = torch.as_tensor(np.asarray(test_x, dtype=np.float32))
    ytr = torch.as_tensor(np.asarray(train_y, dtype=np.int64))
    yte = torch.as_tensor(np.asarray(test_y, dtype=np.int64))
    if xtr.ndim != 2 or xte.ndim != 2 or xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"linear_probe needs 2-D features of equal width, got {tuple(xtr.shape)} and {tuple(xte.shape)}")
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise ValueError("linear_probe: features and labels differ in length")
    if len(xtr) == 0 or len(xte) == 0:
        raise ValueError("linear_probe needs non-empty train and test splits")
    mean = xtr.mean(0, keepdim=True)
    std = xtr.std(0, keepdim=True, unbiased=False).clamp_min(1e-6)
    xtr = (xtr - mean) / std
    xte = (xte - mean) / std

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is fastest and immune to CPU contention
    try:
        return _fit_probe(xtr, ytr, xte, yte, epochs, lr, batch_size, seed, last_k)
    finally:
        torch.set_num_threads(threads)


def _fit_probe(xtr, ytr, xte, yte, epochs, lr, batch_size, seed, last_k) -> float:
    n_classes = int(max(ytr.max().item(), yte.max().item())) + 1
    gen = torch.Generator().manual_seed(seed)
    clf = torch.nn.Linear(xtr.shape[1], n_classes)
    with torch.no_grad():  # seeded init, independent of the global RNG
        bound = 1.0 / xtr.shape[1] ** 0.5
        clf.weight.copy_(torch.rand(clf.weight.shape, generator=gen) * 2 * bound - bound)
        clf.bias.zero_()
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    last_k = max(1, min(last_k, epochs))
    accs = []
    for epoch in range(epochs):
        perm = torch.randperm(len(xtr), generator=gen)
        for start in range(0, len(xtr), batch_size):
            idx = perm[start:start + batch_size]
            loss = torch.nn.functional.cross_entropy(clf(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if epoch >= epochs - last_k:
            with torch.no_grad():
                accs.append((clf(xte).argmax(1) == yte).float().mean().item())
    return float(np.mean(accs))


# ---------------------------------------------------------------- embedding arrays with a model
def _to_pil_rgb(arr: np.ndarray):
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(arr)).convert("RGB")


def preprocess_arrays(preprocess, images_uint8: np.ndarray) -> torch.Tensor:
    """Apply a model's own (PIL) ``preprocess`` to every (H,W) or (H,W,3) uint8 image; stack to NCHW."""
    images = np.asarray(images_uint8)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
        raise ValueError(f"expected uint8 images of shape (N,H,W) or (N,H,W,3), got {images.dtype} {images.shape}")
    if len(images) == 0:
        raise ValueError("no images to preprocess")
    return torch.stack([preprocess(_to_pil_rgb(a)) for a in images])


@torch.no_grad()
def embed_tensors(model, pixels: torch.Tensor, batch_size: int = 512,
                  device: Optional[str] = None) -> np.ndarray:
    """``model.encode_image`` over preprocessed NCHW tensors in batches -> float32 (N, D) array."""
    if device is None:
        device = next(model.parameters()).device
    out = []
    for start in range(0, len(pixels), batch_size):
        out.append(model.encode_image(pixels[start:start + batch_size].to(device)).float().cpu())
    return torch.cat(out).numpy()


def embed_arrays(model, preprocess, images_uint8: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Embed uint8 (N,H,W) grayscale or (N,H,W,3) RGB images with an open_clip model.

    Each image goes through the model's own ``preprocess`` exactly as participants do (grayscale is
    converted to RGB PIL first), then ``encode_image``; returns the raw float32 (N, D) embeddings.
    """
    was_training = model.training
    model.eval()
    try:
        chunk = max(batch_size, 4096)  # preprocess in chunks to bound memory for big inputs
        parts = [embed_tensors(model, preprocess_arrays(preprocess, images_uint8[s:s + chunk]), batch_size)
                 for s in range(0, len(images_uint8), chunk)]
    finally:
        model.train(was_training)
    return np.concatenate(parts)


@torch.no_grad()
def backbone_features(backbone: torch.nn.Module, images_rgb: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Pooled penultimate features of a timm backbone for uint8 (N, S, S, 3) images (eval mode, no augmentation;
    the backbone's training mode is restored afterwards)."""
    was = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    out = []
    try:
        for s in range(0, len(images_rgb), batch_size):
            x = normalize_pixels(to_float_nchw(torch.from_numpy(np.array(images_rgb[s:s + batch_size])).to(device)))
            out.append(backbone(x).float().cpu())
    finally:
        backbone.train(was)
    return torch.cat(out).numpy()
