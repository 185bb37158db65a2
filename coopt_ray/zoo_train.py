"""What a zoo teacher learns from (spec key ``objective``), one batch at a time.

* ``clip`` (the default zoo): open_clip's ``ClipLoss`` against captions made from class names (``captions:
  classes``) or, label-free, from pixel statistics (``captions: pixel-stats``);
* ``simclr``: label-free and caption-free: lightly's ``SimCLRProjectionHead`` and ``NTXentLoss`` on two
  ``augment.BatchAugment`` views of each image (the image tower only);
* ``supervised``: cross-entropy through a linear classifier on the image tower's embedding.

``classes`` (a list of Fashion-MNIST class indices) keeps only those classes' images, so two teachers can know
different halves of the data. The heads (projection, classifier) train with the tower and are not saved: a
teacher is its open_clip model, read by participants through ``models.load_model`` like any other.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

OBJECTIVES = ("clip", "simclr", "supervised")


def class_subset(pixels: torch.Tensor, labels: np.ndarray, classes: Optional[Sequence[int]]):
    """The images (and labels) of ``classes`` only; all of them when ``classes`` is None."""
    if classes is None:
        return pixels, np.asarray(labels)
    keep = np.isin(np.asarray(labels), np.asarray(list(classes)))
    if not keep.any():
        raise ValueError(f"zoo spec classes {list(classes)}: no training image has one of these labels")
    return pixels[torch.from_numpy(keep)], np.asarray(labels)[keep]


class ClipObjective:
    """open_clip's ClipLoss between the image embeddings and their captions' embeddings."""

    def __init__(self, model, captions: list[str], caption_index: np.ndarray, context_length: int, device: str):
        import open_clip

        self.model, self.params = model, []
        self.tokens = open_clip.tokenize(captions, context_length=context_length).to(device)
        self.y = torch.as_tensor(np.asarray(caption_index, dtype=np.int64))
        self.loss = open_clip.loss.ClipLoss()

    def __call__(self, x: torch.Tensor, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        img = self.model.encode_image(x, normalize=True)
        # the few distinct captions are encoded once per step and gathered per image: the same loss and
        # gradients as encoding every image's caption
        txt = self.model.encode_text(self.tokens, normalize=True)[self.y[idx].to(x.device)]
        return self.loss(img, txt, self.model.logit_scale.exp())


class SimCLRObjective:
    """SimCLR on the image tower: two augmented views of each image, lightly's projection head and NT-Xent."""

    def __init__(self, model, embed_dim: int, image_size: int, mean: torch.Tensor, std: torch.Tensor, device: str,
                 temperature: float = 0.2, crop_min: float = 0.5):
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead

        from .augment import BatchAugment

        self.model = model
        self.head = SimCLRProjectionHead(embed_dim, 2 * embed_dim, 64).to(device)
        self.params = list(self.head.parameters())
        self.loss = NTXentLoss(temperature=temperature)
        self.aug = BatchAugment(image_size, scale=(crop_min, 1.0))
        self.mean, self.std = mean.view(1, -1, 1, 1).to(device), std.view(1, -1, 1, 1).to(device)

    def _view(self, x01: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return (self.aug(x01, gen) - self.mean) / self.std

    def __call__(self, x: torch.Tensor, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x01 = (x * self.std + self.mean).clamp(0, 1)  # the zoo's pixels are normalised; BatchAugment wants [0, 1]
        z0 = self.head(self.model.encode_image(self._view(x01, gen)))
        z1 = self.head(self.model.encode_image(self._view(x01, gen)))
        return self.loss(z0, z1)


class SupervisedObjective:
    """Cross-entropy through a linear classifier on the image embedding, over the spec's classes."""

    def __init__(self, model, embed_dim: int, labels: np.ndarray, device: str):
        classes = np.unique(np.asarray(labels))
        remap = {int(c): k for k, c in enumerate(classes)}
        self.model = model
        self.fc = torch.nn.Linear(embed_dim, len(classes)).to(device)
        self.params = list(self.fc.parameters())
        self.y = torch.as_tensor([remap[int(v)] for v in labels], dtype=torch.int64)

    def __call__(self, x: torch.Tensor, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        logits = self.fc(self.model.encode_image(x))
        return torch.nn.functional.cross_entropy(logits, self.y[idx].to(x.device))


def make_objective(spec: dict, model, labels: np.ndarray, clip_captions: tuple[list[str], np.ndarray],
                   mean: torch.Tensor, std: torch.Tensor, device: str):
    """The spec's objective for ``model`` (``clip_captions``: captions and each image's caption index)."""
    kind = spec.get("objective", "clip")
    if kind not in OBJECTIVES:
        raise ValueError(f"zoo spec {spec['name']}: 'objective' must be one of {OBJECTIVES}, got {kind!r}")
    cfg = spec["model_cfg"]
    dim, size = int(cfg["embed_dim"]), int(cfg["vision_cfg"].get("image_size", 224))
    if kind == "simclr":
        return SimCLRObjective(model, dim, size, mean, std, device)
    if kind == "supervised":
        return SupervisedObjective(model, dim, labels, device)
    ctx = cfg.get("text_cfg", {}).get("context_length", 77)
    return ClipObjective(model, clip_captions[0], clip_captions[1], ctx, device)
