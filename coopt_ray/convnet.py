"""The dataset-distillation ConvNet (conv3x3-BN-ReLU-AvgPool2 blocks, flattened features), also a timm model.

KRR-ST's model pool (db-Lee/selfsup_dd) uses 3 blocks of widths 128-256-512 at 32 px: the features are the
last block's map, flattened (512 x 4 x 4 = 8,192). ``convnet3_w<base>`` registers the width ``base``-``2 base``-
``4 base`` variant with timm, so ``student.arch: convnet3_w128`` (the paper's) or ``convnet3_w32`` (the
CPU-sized one) trains and probes through the same code as every timm student.
"""
from __future__ import annotations

import torch

WIDTHS = (16, 32, 64, 128)   # registered bases: convnet3_w16 ... convnet3_w128


class ConvNet(torch.nn.Module):
    """``depth`` blocks (conv3x3 -> BatchNorm -> ReLU -> AvgPool2), widths doubling from ``width``; returns the
    flattened last map (``feature_width`` values per image). ``num_classes > 0`` adds a linear head.
    ``norm="instance", double=False`` is MTT's expert ConvNet (every block ``width`` wide, GroupNorm(C, C))."""

    def __init__(self, width: int = 128, depth: int = 3, in_chans: int = 3, img_size: int = 32,
                 num_classes: int = 0, norm: str = "batch", double: bool = True):
        super().__init__()
        layers, c, s = [], in_chans, img_size
        for i in range(depth):
            w = width * 2 ** i if double else width
            nrm = torch.nn.BatchNorm2d(w) if norm == "batch" else torch.nn.GroupNorm(w, w)  # instance norm (MTT)
            layers += [torch.nn.Conv2d(c, w, 3, padding=1), nrm, torch.nn.ReLU(inplace=norm == "batch"),
                       torch.nn.AvgPool2d(2)]
            c, s = w, s // 2
        self.features = torch.nn.Sequential(*layers, torch.nn.Flatten())
        self.feature_width = c * s * s
        self.num_features = self.feature_width
        self.head = torch.nn.Linear(self.feature_width, num_classes) if num_classes else torch.nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def register_convnets() -> None:
    """Register ``convnet3_w{16,32,64,128}`` with timm (idempotent)."""
    import timm
    from timm.models import register_model

    for base in WIDTHS:
        name = f"convnet3_w{base}"
        if timm.is_model(name):
            continue

        def make(pretrained: bool = False, _base=base, **kwargs):
            if pretrained:
                raise ValueError("the distillation ConvNet has no pretrained weights")
            return ConvNet(width=_base, depth=3, in_chans=kwargs.get("in_chans", 3),
                           img_size=kwargs.get("img_size", 32), num_classes=kwargs.get("num_classes", 0))

        make.__name__ = name
        register_model(make)
