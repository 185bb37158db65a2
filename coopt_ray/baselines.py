"""Students trained in-process on arrays, for the benchmarks: CoOpt targets, BYOL, SimCLR, supervised.

Every method shares one loop (:func:`fit`): the same timm backbone (``student.build_backbone``), AdamW
with the same lr / weight decay, batch size and epochs, and the same per-epoch linear probe
(``probe.linear_probe`` on frozen pooled features). Only the objective differs:

* ``coopt``: ``student.Student`` regressing standardised targets (``student.target_transform``) with
  ``1 - cos``, on ``augment.BatchAugment`` views, exactly as ``train.train_loop_per_worker`` does;
* ``byol`` / ``simclr``: lightly's heads, losses and momentum helpers, on two ``BatchAugment`` views;
* ``supervised``: cross-entropy on the labels (an upper bound), on ``BatchAugment`` views.

Every method takes the same ``crop_min`` (RandomResizedCrop scale (crop_min, 1); RELA's 0.5 by default).

No Ray here: the benchmarks compare objectives, so all methods run the same plain loop. Every method takes a
``device`` (default the CPU); :func:`pick_device` gives it by the shared device rules (``devices.stage_device``:
CUDA only when asked, and then CUDA or a one-line error). On CUDA the loop runs under bf16 autocast with cudnn
autotuning and TF32; on the CPU nothing changes (no autocast), so CPU results do not move.
"""
from __future__ import annotations

import copy
import time
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .devices import autocast, cuda_speed_habits, stage_device
from .augment import BatchAugment, make_augment, normalize_pixels, to_float_nchw
from .heads import TorchHeads, head_transforms, moments_by_head, per_head_loss
from .probe import backbone_features, linear_probe
from .student import Student, build_backbone, feature_dim, student_loss, target_transform

METHODS = ("coopt", "byol", "simclr", "supervised")


def pick_device(use_gpu: bool, key: str = "--use-gpu") -> torch.device:
    """The device a benchmark's students train on: the CPU unless ``use_gpu``; then CUDA or a DeviceError."""
    return stage_device(use_gpu, key)


# ---------------------------------------------------------------- features and the probe
class Prober:
    """Linear-probe accuracy of a backbone: probe split -> classifier -> test split (RELA's protocol)."""

    def __init__(self, probe_x: np.ndarray, probe_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 epochs: int = 100, seed: int = 0):
        self.px, self.py, self.tx, self.ty = probe_x, probe_y, test_x, test_y
        self.epochs, self.seed = epochs, seed

    def __call__(self, backbone: torch.nn.Module) -> float:
        return linear_probe(backbone_features(backbone, self.px), self.py,
                            backbone_features(backbone, self.tx), self.ty, epochs=self.epochs, seed=self.seed)


# ---------------------------------------------------------------- the shared loop
def fit(model: torch.nn.Module, backbone: torch.nn.Module, step: Callable[[np.ndarray, torch.Generator], torch.Tensor],
        n: int, epochs: int, batch_size: int, lr: float, weight_decay: float, seed: int,
        probe: Optional[Callable[[torch.nn.Module], float]] = None, after_step: Optional[Callable] = None,
        log: Callable[[str], None] = print, name: str = "", device: torch.device | str = "cpu") -> list[dict]:
    """Train ``model`` on ``device`` for ``epochs`` over ``n`` rows; ``step(idx, gen)`` returns the batch loss
    (computed on ``device``: the methods below move their batches there).

    After every epoch (and once before training, epoch 0) ``probe(backbone)`` is recorded. Returns one
    dict per epoch: epoch, loss, train_seconds (cumulative, probe time excluded), probe_accuracy.
    """
    device = torch.device(device)
    cuda_speed_habits(device)
    model.to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    hist = [{"epoch": 0, "loss": None, "train_seconds": 0.0,
             "probe_accuracy": probe(backbone) if probe else None}]
    steps_per_epoch = max(1, n // batch_size)
    total_steps, k, elapsed = steps_per_epoch * epochs, 0, 0.0
    for epoch in range(1, epochs + 1):
        model.train()
        t0 = time.time()
        perm = torch.randperm(n, generator=gen).numpy()
        losses = []
        for b in range(steps_per_epoch):
            idx = perm[b * batch_size:(b + 1) * batch_size]
            with autocast("auto", device):
                loss = step(idx, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            k += 1
            if after_step:
                after_step(k, total_steps)
            losses.append(loss.detach().float())  # no host sync per step
        epoch_loss = torch.stack(losses).double().mean().item()
        elapsed += time.time() - t0
        acc = probe(backbone) if probe else None
        hist.append({"epoch": epoch, "loss": epoch_loss, "train_seconds": round(elapsed, 3),
                     "probe_accuracy": acc})
        log(f"[{name}] epoch {epoch}/{epochs} loss {hist[-1]['loss']:.4f} "
            f"train {elapsed:.0f}s probe {acc if acc is None else round(acc, 4)}")
    return hist


def _on(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x if x.device == device else x.pin_memory().to(device, non_blocking=True)


def _aug_batch(images: np.ndarray, idx: np.ndarray, aug: BatchAugment, gen: torch.Generator,
               device: torch.device = torch.device("cpu")) -> torch.Tensor:
    return normalize_pixels(aug(to_float_nchw(_on(torch.from_numpy(images[idx]), device)), gen))


# ---------------------------------------------------------------- the methods
def train_coopt(arch: str, images: np.ndarray, targets: np.ndarray, epochs: int, batch_size: int = 256,
                lr: float = 1e-3, weight_decay: float = 0.01, seed: int = 0, whiten: bool = False,
                probe=None, log=print, crop_min: float = 0.5,
                weights: Optional[np.ndarray] = None, augment: bool | str = True,
                device: torch.device | str = "cpu", loss: str = "cos",
                phi_s: bool = False, heads: Optional[dict] = None) -> tuple[torch.nn.Module, list[dict]]:
    """CoOpt student: regress standardised targets with ``loss`` (``student.loss``: ``1 - cos`` by default, the train
    stage's objective); ``weights`` (one per row, optional) weight each row's loss; ``augment`` is ``student.augment``:
    True (RELA's), "weak" (crop and flip only) or False (the un-augmented images).

    ``heads`` (``student.heads``, :mod:`coopt_ray.heads`): ``names``, ``dims`` (each participant's width), ``own``
    (N, K, D: participant k's embedding of each image, zero where it has none), ``train`` (N, K: the heads each
    image trains), ``stats`` (N, K: the rows each head is standardised on, its own shard) and ``aligned`` (also the
    aligned head on ``targets``, every image once)."""
    torch.manual_seed(seed)
    size = images.shape[1]
    fdim = feature_dim(arch, size)
    mean, proj = target_transform(targets, whiten=whiten, out_dim=fdim, phi_s=phi_s)
    device = torch.device(device)
    y = torch.from_numpy((targets.astype(np.float32) - mean) @ proj).to(device)
    torch.manual_seed(seed)
    hd = _heads_setup(heads, fdim, whiten, phi_s, device) if heads else None
    aligned = hd is None or heads["aligned"]
    student = Student(arch, size, y.shape[1] if aligned else 0, heads=hd[0].out_dims() if hd else None,
                      primary=heads["names"][0] if heads else None)
    aug = make_augment(size, augment, crop_min) or (lambda x, gen: x)
    w = None if weights is None else torch.as_tensor(np.asarray(weights, dtype=np.float32), device=device)

    def step(idx, gen):
        t = torch.from_numpy(idx).to(device)
        x = _aug_batch(images, idx, aug, gen, device)
        if hd is None:
            return student_loss(student(x), y[t], loss, None if w is None else w[t])
        a, outs = student(x, all_heads=True)
        total = per_head_loss(outs, hd[1][t], hd[2][t], hd[3], loss)[0]
        return total if a is None else total + student_loss(a, y[t], loss, None if w is None else w[t])

    hist = fit(student, student.backbone, step, len(images), epochs, batch_size, lr, weight_decay, seed,
               probe, log=log, name=f"coopt/{arch}", device=device)
    return student.backbone, hist


def _heads_setup(heads: dict, fdim: int, whiten: bool, phi_s: bool, device: torch.device):
    """(HeadTransforms, own, train mask, TorchHeads) for :func:`train_coopt`'s ``heads``."""
    names, own = list(heads["names"]), np.asarray(heads["own"], dtype=np.float32)
    dims = {n: int(d) for n, d in zip(names, heads["dims"])}
    t = head_transforms(moments_by_head(own, np.asarray(heads["stats"]), names), dims, whiten, phi_s, fdim)
    return (t, torch.from_numpy(own).to(device), torch.as_tensor(np.asarray(heads["train"]), device=device),
            TorchHeads(t, device))


def train_supervised(arch: str, images: np.ndarray, labels: np.ndarray, epochs: int, batch_size: int = 256,
                     lr: float = 1e-3, weight_decay: float = 0.01, seed: int = 0, probe=None,
                     log=print, crop_min: float = 0.5, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, list[dict]]:
    """Supervised upper bound: cross-entropy on the true labels, same augmentations as CoOpt."""
    torch.manual_seed(seed)
    size = images.shape[1]
    device = torch.device(device)
    labels_t = torch.as_tensor(np.asarray(labels, dtype=np.int64), device=device)
    student = Student(arch, size, int(labels_t.max()) + 1)
    aug = BatchAugment(size, scale=(crop_min, 1.0))

    def step(idx, gen):
        return F.cross_entropy(student(_aug_batch(images, idx, aug, gen, device)).float(),
                               labels_t[torch.from_numpy(idx).to(device)])

    hist = fit(student, student.backbone, step, len(images), epochs, batch_size, lr, weight_decay, seed,
               probe, log=log, name=f"supervised/{arch}", device=device)
    return student.backbone, hist


def two_views(images: np.ndarray, idx: np.ndarray, aug: BatchAugment, gen: torch.Generator,
              device: torch.device = torch.device("cpu")):
    """Two independent ``BatchAugment`` views of each image: the same augmentation code (and crop scale) as the
    CoOpt and supervised students, so no method pays for a slower per-image implementation."""
    x = to_float_nchw(_on(torch.from_numpy(images[idx]), device))
    return normalize_pixels(aug(x, gen)), normalize_pixels(aug(x, gen))


class BYOL(torch.nn.Module):
    """BYOL from lightly's modules: online backbone+projector+predictor, momentum backbone+projector."""

    def __init__(self, backbone: torch.nn.Module, hidden: int = 1024, out: int = 256):
        super().__init__()
        from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        self.backbone = backbone
        self.projection_head = BYOLProjectionHead(backbone.feature_width, hidden, out)
        self.prediction_head = BYOLPredictionHead(out, hidden, out)
        self.backbone_momentum = copy.deepcopy(backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

    def forward(self, x):
        return self.prediction_head(self.projection_head(self.backbone(x)))

    def forward_momentum(self, x):
        return self.projection_head_momentum(self.backbone_momentum(x)).detach()


def train_byol(arch: str, images: np.ndarray, epochs: int, batch_size: int = 256, lr: float = 1e-3,
               weight_decay: float = 0.01, seed: int = 0, probe=None, log=print,
               momentum=(0.99, 1.0), crop_min: float = 0.5,
               device: torch.device | str = "cpu") -> tuple[torch.nn.Module, list[dict]]:
    """BYOL baseline with lightly's heads, NegativeCosineSimilarity and update_momentum."""
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.utils import update_momentum
    from lightly.utils.scheduler import cosine_schedule

    torch.manual_seed(seed)
    model = BYOL(build_backbone(arch, images.shape[1]))
    crit = NegativeCosineSimilarity()
    aug = BatchAugment(images.shape[1], scale=(crop_min, 1.0))
    m = [momentum[0]]

    device = torch.device(device)

    def step(idx, gen):
        x0, x1 = two_views(images, idx, aug, gen, device)
        p0, p1 = model(x0), model(x1)
        z0, z1 = model.forward_momentum(x0), model.forward_momentum(x1)
        return 0.5 * (crit(p0, z1) + crit(p1, z0))

    def after_step(k, total):
        m[0] = cosine_schedule(k, total, momentum[0], momentum[1])
        update_momentum(model.backbone, model.backbone_momentum, m=m[0])
        update_momentum(model.projection_head, model.projection_head_momentum, m=m[0])

    hist = fit(model, model.backbone, step, len(images), epochs, batch_size, lr, weight_decay, seed,
               probe, after_step=after_step, log=log, name=f"byol/{arch}", device=device)
    return model.backbone, hist


def train_simclr(arch: str, images: np.ndarray, epochs: int, batch_size: int = 256, lr: float = 1e-3,
                 weight_decay: float = 0.01, seed: int = 0, probe=None, log=print,
                 temperature: float = 0.5, crop_min: float = 0.5,
                 device: torch.device | str = "cpu") -> tuple[torch.nn.Module, list[dict]]:
    """SimCLR baseline with lightly's SimCLRProjectionHead and NTXentLoss."""
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead

    torch.manual_seed(seed)
    backbone = build_backbone(arch, images.shape[1])
    head = SimCLRProjectionHead(backbone.feature_width, backbone.feature_width, 128)
    model = torch.nn.ModuleDict({"backbone": backbone, "head": head})
    crit = NTXentLoss(temperature=temperature)
    aug = BatchAugment(images.shape[1], scale=(crop_min, 1.0))

    device = torch.device(device)

    def step(idx, gen):
        x0, x1 = two_views(images, idx, aug, gen, device)
        return crit(head(backbone(x0)).float(), head(backbone(x1)).float())

    hist = fit(model, backbone, step, len(images), epochs, batch_size, lr, weight_decay, seed,
               probe, log=log, name=f"simclr/{arch}", device=device)
    return backbone, hist


def random_init_accuracy(arch: str, image_size: int, seed: int, probe) -> float:
    """Probe accuracy of an untrained backbone (the floor every method must beat)."""
    torch.manual_seed(seed)
    return probe(build_backbone(arch, image_size))


def register_small_vit() -> str:
    """Register ``vit_tiny_patch4_32`` (timm's ViT-Tiny with 4 px patches) and return its name.

    ``student.build_backbone`` passes ``img_size`` only; a ViT-Tiny/16 at 32 px would see 2x2 patches,
    so the small-image variant the benchmarks use is registered under its own timm name.
    """
    import timm
    from timm.models import register_model

    name = "vit_tiny_patch4_32"
    if not timm.is_model(name):
        def vit_tiny_patch4_32(pretrained: bool = False, **kwargs):
            kwargs.setdefault("img_size", 32)
            return timm.create_model("vit_tiny_patch16_224", pretrained=pretrained, patch_size=4, **kwargs)

        register_model(vit_tiny_patch4_32)
    return name
