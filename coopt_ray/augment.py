"""Pixels as tensors: uint8 NHWC -> float NCHW, the student's input normalisation, and RELA's batched per-image
augmentation (BatchAugment)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .images import PIXEL_MEAN, PIXEL_STD


# ---------------------------------------------------------------- tensors
def to_float_nchw(images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC (RGB) -> float NCHW in [0, 1]."""
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def normalize_pixels(x: torch.Tensor) -> torch.Tensor:
    """Float NCHW in [0, 1] -> the student's input normalisation."""
    from torchvision.transforms.v2 import functional as TF

    return TF.normalize(x, list(PIXEL_MEAN), list(PIXEL_STD))


def pad_crop_flip(x: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor, pad: int) -> torch.Tensor:
    """Each image of float NCHW ``x`` zero-padded by ``pad`` pixels and cropped back to its size at the offset
    ``shifts[i] = (dy, dx)`` in ``[0, 2 pad]`` (``(pad, pad)`` is the image itself), then flipped left-right where
    ``flips[i]``: a padded random crop and flip (KRR-ST's real-batch augmentation), one gather for the batch."""
    n, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad)).permute(0, 2, 3, 1)
    rows = shifts[:, :1].to(x.device) + torch.arange(h, device=x.device)
    cols = shifts[:, 1:].to(x.device) + torch.arange(w, device=x.device)
    cols = torch.where(flips.to(x.device)[:, None], cols.flip(1), cols)
    out = xp[torch.arange(n, device=x.device)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)


def random_pad_crop_flip(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """:func:`pad_crop_flip` with offsets uniform in ``[0, 2 pad]`` and flips with p = 0.5, drawn from ``gen``."""
    n = x.shape[0]
    return pad_crop_flip(x, torch.randint(0, 2 * pad + 1, (n, 2), generator=gen),
                         torch.rand(n, generator=gen) < 0.5, pad)


class BatchAugment:
    """RELA's augmentations, sampled per image but applied to a whole batch at once.

    RandomResizedCrop (scale 0.5-1, ratio 3/4-4/3) and the horizontal flip are one batched
    ``grid_sample`` with a per-image affine; ColorJitter(0.8, 0.8, 0.8, 0.2) with p=0.8
    (brightness, contrast, saturation with per-image factors in a random order; hue as a
    per-image rotation of the chroma plane in YIQ space) and grayscale with p=0.2 use
    ``torchvision.transforms.v2`` functional ops on the batch. Input and output: float NCHW in [0, 1].
    """

    def __init__(self, size: int, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), jitter=(0.8, 0.8, 0.8, 0.2),
                 p_jitter: float = 0.8, p_gray: float = 0.2, p_flip: float = 0.5):
        self.size, self.scale, self.ratio = int(size), scale, ratio
        self.jitter, self.p_jitter, self.p_gray, self.p_flip = jitter, p_jitter, p_gray, p_flip

    @staticmethod
    def _u(n, lo, hi, gen, device):
        return torch.rand(n, generator=gen, device="cpu").to(device) * (hi - lo) + lo

    def crop_boxes(self, n: int, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
        """Per-image (x0, y0, cw, ch) in pixels, as RandomResizedCrop.get_params samples them."""
        tries = 10
        area = h * w
        s = torch.empty(n, tries).uniform_(self.scale[0], self.scale[1], generator=gen) * area
        logr = torch.empty(n, tries).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]), generator=gen)
        r = torch.exp(logr)
        cw = torch.sqrt(s * r).round()
        ch = torch.sqrt(s / r).round()
        ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
        first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
        idx = first.clamp_min(0)
        cw = cw.gather(1, idx[:, None]).squeeze(1)
        ch = ch.gather(1, idx[:, None]).squeeze(1)
        bad = first < 0  # fallback: the whole image (ratio within bounds here)
        cw = torch.where(bad, torch.full_like(cw, w), cw)
        ch = torch.where(bad, torch.full_like(ch, h), ch)
        x0 = torch.floor(torch.rand(n, generator=gen) * (w - cw + 1))
        y0 = torch.floor(torch.rand(n, generator=gen) * (h - ch + 1))
        return torch.stack([x0, y0, cw, ch], 1)

    def crop_flip(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, _, h, w = x.shape
        box = self.crop_boxes(n, h, w, gen).to(x.device, x.dtype)
        flip = (torch.rand(n, generator=gen) < self.p_flip).to(x.device)
        sx, sy = box[:, 2] / w, box[:, 3] / h
        tx = (box[:, 0] + box[:, 2] / 2) / w * 2 - 1
        ty = (box[:, 1] + box[:, 3] / 2) / h * 2 - 1
        sx = torch.where(flip, -sx, sx)
        theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, tx, sy, ty
        grid = F.affine_grid(theta, (n, x.shape[1], self.size, self.size), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def color(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        n, dev = x.shape[0], x.device
        b, c, s, hue = self.jitter
        fb = self._u(n, max(0.0, 1 - b), 1 + b, gen, dev).view(n, 1, 1, 1)
        fc = self._u(n, max(0.0, 1 - c), 1 + c, gen, dev).view(n, 1, 1, 1)
        fs = self._u(n, max(0.0, 1 - s), 1 + s, gen, dev).view(n, 1, 1, 1)
        fh = self._u(n, -hue, hue, gen, dev)
        y = x
        for op in torch.randperm(4, generator=gen).tolist():
            if op == 0:
                y = (y * fb).clamp(0, 1)
            elif op == 1:
                mean = TF.rgb_to_grayscale(y).mean(dim=(1, 2, 3), keepdim=True)
                y = (fc * y + (1 - fc) * mean).clamp(0, 1)
            elif op == 2:
                y = (fs * y + (1 - fs) * TF.rgb_to_grayscale(y, num_output_channels=3)).clamp(0, 1)
            else:
                y = _hue_rotate(y, fh)
        on = (torch.rand(n, generator=gen) < self.p_jitter).to(dev).view(n, 1, 1, 1)
        x = torch.where(on, y, x)
        gray = (torch.rand(n, generator=gen) < self.p_gray).to(dev).view(n, 1, 1, 1)
        return torch.where(gray, TF.rgb_to_grayscale(x, num_output_channels=3), x)

    def __call__(self, x: torch.Tensor, gen: Optional[torch.Generator] = None) -> torch.Tensor:
        if gen is None:
            gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = self.crop_flip(x, gen)
        return x if self.p_jitter == 0 and self.p_gray == 0 else self.color(x, gen)


def make_augment(size: int, setting=True, crop_min: float = 0.5) -> Optional[BatchAugment]:
    """The student's augmentation for ``student.augment``: true, RELA's (crop, flip, colour jitter, grey); "weak",
    the crop and flip alone (the colours stay the teacher's); false, none (None)."""
    if setting is False:
        return None
    if setting is True:
        return BatchAugment(size, scale=(crop_min, 1.0))
    if setting == "weak":
        return BatchAugment(size, scale=(crop_min, 1.0), p_jitter=0.0, p_gray=0.0)
    raise ValueError(f"augment must be true, false or weak, got {setting!r}")


_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)  # once, not per batch (an inverse on the GPU per batch syncs and costs)


def _hue_rotate(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Rotate each image's hue by ``factor`` turns (per image), in YIQ space."""
    m = _RGB2YIQ.to(x.device, x.dtype)
    yiq = torch.einsum("ij,njhw->nihw", m, x)
    a = factor.to(x.dtype) * 2 * math.pi
    cos, sin = torch.cos(a).view(-1, 1, 1), torch.sin(a).view(-1, 1, 1)
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], cos * i - sin * q, sin * i + cos * q], 1)
    return torch.einsum("ij,njhw->nihw", _YIQ2RGB.to(x.device, x.dtype), yiq).clamp(0, 1)
