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


class UsedTokenRows(torch.nn.Module):
    """Stands in for a CLIP text tower's token embedding while a teacher trains: only the rows of the tokens the
    captions use are parameters. The captions use a few dozen of the 49,408 rows, and the others get zero gradients,
    so under Adam(W) without weight decay (zoo._param_groups never decays an embedding) they never move: m = v = 0
    gives an update of exactly 0. Training these rows alone gives the same weights, bit for bit, while each step's
    optimizer and backward work on U x width numbers instead of 49,408 x width (3.2 M for the zoo's text towers:
    about 40 % of a teacher's training CPU). :meth:`put_back` writes the trained rows into the table and puts the
    table back in the model."""

    def __init__(self, model, tokens: torch.Tensor):
        super().__init__()
        self.table = model.token_embedding
        self.used = torch.unique(tokens)
        index = torch.full((self.table.num_embeddings,), -1, dtype=torch.long, device=tokens.device)
        index[self.used] = torch.arange(len(self.used), device=tokens.device)
        self.register_buffer("index", index, persistent=False)
        self.weight = torch.nn.Parameter(self.table.weight.detach()[self.used].clone())  # "token_embedding.weight"
        model.token_embedding = self

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(self.index[text], self.weight)

    def put_back(self, model) -> None:
        with torch.no_grad():
            self.table.weight[self.used] = self.weight
        model.token_embedding = self.table


def used_token_rows(model, tokens: torch.Tensor) -> Optional[UsedTokenRows]:
    """Train only the used rows of ``model``'s token embedding (:class:`UsedTokenRows`); None where the model has
    no plain token table (a CustomTextCLIP's text tower is left as it is)."""
    if not isinstance(getattr(model, "token_embedding", None), torch.nn.Embedding):
        return None
    return UsedTokenRows(model, tokens)


class Objective:
    """What every teacher objective has: :meth:`finish`, called once training ends."""

    def finish(self) -> None:
        """After training: undo what the objective changed in the model for training (nothing here)."""


class ClipObjective(Objective):
    """open_clip's ClipLoss between the image embeddings and their captions' embeddings. Until :meth:`finish`, the
    model's token embedding trains only the rows the captions use (:class:`UsedTokenRows`)."""

    def __init__(self, model, captions: list[str], caption_index: np.ndarray, context_length: int, device: str):
        import open_clip

        self.model, self.params = model, []
        self.tokens = open_clip.tokenize(captions, context_length=context_length).to(device)
        self.y = torch.as_tensor(np.asarray(caption_index, dtype=np.int64))
        self.loss = open_clip.loss.ClipLoss()
        self.rows = used_token_rows(model, self.tokens)

    def finish(self) -> None:
        """After training: the full token table, with the trained rows, back in the model."""
        if self.rows is not None:
            self.rows.put_back(self.model)
            self.rows = None

    def __call__(self, x: torch.Tensor, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        img = self.model.encode_image(x, normalize=True)
        # the few distinct captions are encoded once per step and gathered per image: the same loss and
        # gradients as encoding every image's caption
        txt = self.model.encode_text(self.tokens, normalize=True)[self.y[idx].to(x.device)]
        return self.loss(img, txt, self.model.logit_scale.exp())


class SimCLRObjective(Objective):
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


class SupervisedObjective(Objective):
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
