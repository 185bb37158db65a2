"""The offline teacher zoo's specs (DESIGN.md §5): tiny open_clip CLIP configs and how each one trains, plus the
label-free captions some benchmark zoos use. :mod:`coopt_ray.zoo` trains, scores and caches them."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

CAPTION = "a photo of a {}"
CAPTION_MODES = ("classes", "pixel-stats")  # spec key "captions" (absent = classes)
SIZES, SHAPES = ("small", "medium", "large"), ("tall", "square", "wide")


def pixel_stat_captions(pixels: torch.Tensor, fill: torch.Tensor) -> tuple[list[str], np.ndarray]:
    """Label-free captions: "a {small|medium|large} {tall|square|wide} shape" from each image's ink area and
    bounding-box aspect (tertiles over the training images), never from a label. Returns (captions, index)."""
    ink = (pixels - fill.view(1, -1, 1, 1)).abs().mean(1) > 0.2          # (N, H, W): off the background
    area = ink.float().mean((1, 2)).numpy()
    rows, cols = ink.any(2).float().sum(1).numpy(), ink.any(1).float().sum(1).numpy()
    aspect = (cols + 1) / (rows + 1)
    a_bin = np.digitize(area, np.quantile(area, [1 / 3, 2 / 3]))
    s_bin = np.digitize(aspect, np.quantile(aspect, [1 / 3, 2 / 3]))
    captions = [f"a {z} {h} shape" for z in SIZES for h in SHAPES]
    return captions, (a_bin * 3 + s_bin).astype(np.int64)


TEXT_CFG = {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}
PREPROCESS_CFG = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


def _vit(embed_dim: int, width: int, layers: int, head_width: int) -> dict:
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": 32, "patch_size": 4, "width": width, "layers": layers,
                       "head_width": head_width, "mlp_ratio": 2.0},
        "text_cfg": dict(TEXT_CFG),
    }


def _resnet(embed_dim: int, width: int, layers: Sequence[int]) -> dict:
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": 32, "layers": list(layers), "width": width},
        "text_cfg": dict(TEXT_CFG),
    }


# Quality is meant to fall from a to e (measured: linear probe ~0.87 down to ~0.6).
# ``epochs`` may be fractional: 0.5 trains on half of the public split once. Batch 64 gives more
# steps per epoch than 256 and trains these tiny towers better at the same compute; augmentation
# only pays off with longer training than this, so it is off.
ZOO_SPECS: list[dict] = [
    {"name": "clip-tiny-a", "model_cfg": _resnet(64, width=16, layers=[1, 1, 1, 1]),
     "epochs": 3, "lr": 2e-3, "batch_size": 64, "seed": 0},
    {"name": "clip-tiny-b", "model_cfg": _vit(96, width=64, layers=2, head_width=32),
     "epochs": 2, "lr": 2e-3, "batch_size": 64, "seed": 1},
    {"name": "clip-tiny-c", "model_cfg": _vit(48, width=48, layers=2, head_width=24),
     "epochs": 1.5, "lr": 2e-3, "batch_size": 64, "seed": 2},
    {"name": "clip-tiny-d", "model_cfg": _vit(80, width=32, layers=1, head_width=16),
     "epochs": 1, "lr": 2e-3, "batch_size": 64, "seed": 3},
    {"name": "clip-tiny-e", "model_cfg": _vit(32, width=32, layers=2, head_width=16),
     "epochs": 0.5, "lr": 2e-3, "batch_size": 64, "seed": 4},
]
for _s in ZOO_SPECS:
    _s["preprocess_cfg"] = dict(PREPROCESS_CFG)
del _s


# A zoo whose teachers know different things (`coopt zoo build --specs diverse`, issue 27): a caption-trained
# teacher that saw only classes 0-4, a label-free SimCLR teacher that saw every image but no label or caption,
# and a supervised teacher that saw only classes 5-9. Each alone misses what another knows, so their embeddings
# together should probe above the best one alone (benchmarks/zoo_diversity.py checks it).
DIVERSE_SPECS: list[dict] = [
    {"name": "clip-half-0to4", "model_cfg": _vit(64, width=64, layers=2, head_width=32),
     "epochs": 3, "lr": 2e-3, "batch_size": 64, "seed": 10, "classes": [0, 1, 2, 3, 4]},
    {"name": "simclr-free", "model_cfg": _vit(64, width=64, layers=2, head_width=32),
     "epochs": 2, "lr": 2e-3, "batch_size": 128, "seed": 11, "objective": "simclr"},
    {"name": "sup-half-5to9", "model_cfg": _vit(48, width=48, layers=2, head_width=24),
     "epochs": 3, "lr": 2e-3, "batch_size": 64, "seed": 12, "objective": "supervised", "classes": [5, 6, 7, 8, 9]},
]
for _s in DIVERSE_SPECS:
    _s["preprocess_cfg"] = dict(PREPROCESS_CFG)
del _s
ZOO_SETS = {"default": ZOO_SPECS, "diverse": DIVERSE_SPECS}
