"""The student network (timm backbone + small-image stem + linear head), its target transform, and checkpoints."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .config import STUDENT_LOSSES

STATE = "state.pt"           # inside a checkpoint dir: model/optimizer state + history (torch.save)
META = "meta.json"           # inside a checkpoint dir: epoch + fingerprint, readable without torch
CKPT_PREFIX = "checkpoint_epoch_"
WEIGHTS = "student.pt"       # RUN/student/student.pt: the final student's state dict
METRICS = "metrics.json"     # RUN/student/metrics.json


# ---------------------------------------------------------------- the network
def build_backbone(arch: str, image_size: int, in_chans: int = 3) -> torch.nn.Module:
    """A random-init timm backbone whose forward returns pooled penultimate features.

    ResNet-like models (``conv1`` + ``maxpool``) get a small-image stem when ``image_size <= 64``:
    a 3x3 stride-1 ``conv1`` and no max-pool (the CIFAR ResNet). Models that take ``img_size``
    (ViTs and friends) are built for ``image_size``.
    """
    import timm

    from .convnet import register_convnets

    register_convnets()
    if not timm.is_model(arch):
        raise ValueError(f"unknown timm architecture {arch!r}")
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=0, in_chans=in_chans, img_size=image_size)
    except TypeError:  # the architecture does not take img_size (CNNs)
        model = timm.create_model(arch, pretrained=False, num_classes=0, in_chans=in_chans)
    if image_size <= 64:
        adapt_stem(model, in_chans)
    model.feature_width = output_width(model, image_size, in_chans)
    return model


def output_width(model: torch.nn.Module, image_size: int, in_chans: int = 3) -> int:
    """Width of what ``model`` returns for one image (``num_features`` is not always it: timm's
    MobileNetV3 returns its ``conv_head`` width, 1024, with ``num_classes=0``)."""
    was = model.training
    with torch.no_grad():
        w = int(model.eval()(torch.zeros(1, in_chans, image_size, image_size)).shape[-1])
    model.train(was)
    return w


def adapt_stem(model: torch.nn.Module, in_chans: int = 3) -> bool:
    """Replace a ResNet stem by a 3x3 stride-1 conv and drop the max-pool; True when changed."""
    conv1 = getattr(model, "conv1", None)
    if conv1 is None or not hasattr(model, "maxpool"):
        return False
    if isinstance(conv1, torch.nn.Conv2d):
        out = conv1.out_channels
    elif hasattr(model, "bn1") and hasattr(model.bn1, "num_features"):  # deep stems (resnet*d, *t)
        out = model.bn1.num_features
    else:
        return False
    model.conv1 = torch.nn.Conv2d(in_chans, out, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = torch.nn.Identity()
    return True


class Student(torch.nn.Module):
    """Backbone -> a linear head onto the (standardised) aligned target space (``out_dim`` 0: none), and with
    ``heads`` ({participant: width}, ``student.heads``) one linear head per participant. ``forward`` returns the
    aligned head's output, or ``primary``'s when there is no aligned head; ``all_heads=True`` returns
    ``(aligned output or None, {participant: output})`` (through DDP too, which only syncs ``forward``)."""

    def __init__(self, arch: str, image_size: int, out_dim: int, heads: Optional[dict] = None,
                 primary: Optional[str] = None):
        super().__init__()
        self.backbone = build_backbone(arch, image_size)
        w = self.backbone.feature_width
        self.head = torch.nn.Linear(w, out_dim) if out_dim else None
        self.heads = torch.nn.ModuleDict({n: torch.nn.Linear(w, int(d)) for n, d in (heads or {}).items()})
        if self.head is None and primary not in self.heads:
            raise ValueError(f"a student without an aligned head needs a primary head among {list(self.heads)}, "
                             f"got {primary!r}")
        self.primary = primary

    def forward(self, x: torch.Tensor, all_heads: bool = False):
        f = self.backbone(x)
        if all_heads:
            return (None if self.head is None else self.head(f)), {n: h(f) for n, h in self.heads.items()}
        return self.head(f) if self.head is not None else self.heads[self.primary](f)


def feature_dim(arch: str, image_size: int) -> int:
    """Width of the pooled penultimate features of ``arch``."""
    return int(build_backbone(arch, image_size).feature_width)


# ---------------------------------------------------------------- targets
def target_transform(y: np.ndarray, whiten: bool = False, out_dim: Optional[int] = None,
                     eps: float = 1e-6, phi_s: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, P)`` with ``T(y) = (y - mean) @ P``.

    By default: per-dimension standardisation (P diagonal). With ``whiten``: PCA to ``min(out_dim, d)``
    components, each scaled to unit variance (RELA). With ``phi_s``: PHI-S, a rotation and one isotropic scale
    that give every dimension unit variance (:mod:`coopt_ray.phis`).
    """
    y = np.asarray(y, dtype=np.float64)
    if y.ndim != 2 or len(y) < 2:
        raise ValueError(f"need at least 2 target rows to standardise, got shape {y.shape}")
    mean = y.mean(0)
    return transform_from_moments(len(y), mean, (y - mean).T @ (y - mean) / len(y), whiten, out_dim, eps, phi_s)


def transform_from_moments(n: int, mean: np.ndarray, cov: np.ndarray, whiten: bool = False,
                           out_dim: Optional[int] = None, eps: float = 1e-6,
                           phi_s: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``target_transform`` from the targets' count, mean and (population) covariance, so the targets can be
    streamed through ``TargetMoments`` instead of held in memory."""
    if n < 2:
        raise ValueError(f"need at least 2 target rows to standardise, got {n}")
    if whiten and phi_s:
        raise ValueError("whiten and phi_s are two different standardisations: choose one")
    if phi_s:
        from .phis import phi_s_transform

        return phi_s_transform(mean, cov * n / (n - 1))
    if not whiten:
        std = np.sqrt(np.maximum(np.diag(cov), 0.0))
        return mean.astype(np.float32), np.diag(1.0 / np.maximum(std, eps)).astype(np.float32)
    k = min(out_dim or len(mean), len(mean))
    vals, vecs = np.linalg.eigh(cov * n / (n - 1))  # the sample covariance, as np.cov
    order = np.argsort(vals)[::-1][:k]
    P = vecs[:, order] / np.sqrt(np.maximum(vals[order], eps))
    return mean.astype(np.float32), P.astype(np.float32)


def row_loss(pred: torch.Tensor, y: torch.Tensor, kind: str = "cos") -> torch.Tensor:
    """The student's objective per row (``student.loss``), in fp32 whatever the net ran in: ``cos`` is
    ``1 - cos(pred, y)``; ``cos+smooth-l1`` is RADIO's ``0.9 (1 - cos) + 0.1 smooth-L1`` (beta 1, mean over
    dimensions); ``mse`` the mean squared error over dimensions."""
    pred, y = pred.float(), y.float()
    if kind not in STUDENT_LOSSES:
        raise ValueError(f"student loss must be one of {STUDENT_LOSSES}, got {kind!r}")
    if kind == "mse":
        return (pred - y).pow(2).mean(1)
    loss = 1 - torch.nn.functional.cosine_similarity(pred, y, dim=1)
    if kind == "cos+smooth-l1":
        loss = 0.9 * loss + 0.1 * torch.nn.functional.smooth_l1_loss(pred, y, reduction="none").mean(1)
    return loss


def student_loss(pred: torch.Tensor, y: torch.Tensor, kind: str = "cos",
                 weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`row_loss`, then the mean over rows, or with ``weights`` (one per row) ``sum(w * l) / sum(w)``."""
    loss = row_loss(pred, y, kind)
    return loss.mean() if weights is None else (loss * weights).sum() / weights.sum()


def cosine_loss(pred: torch.Tensor, y: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``student_loss(pred, y, "cos", weights)``: ``1 - cos`` per row, mean or weighted mean over rows."""
    return student_loss(pred, y, "cos", weights)


def standardise(y: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Per-dimension standardised targets ``(y - mean) * scale`` (``scale``: 1 / std per dimension)."""
    return (np.asarray(y, dtype=np.float32) - mean) * scale


def unstandardise(z: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The inverse of :func:`standardise`: back to the optimized set's target space."""
    return np.asarray(z, dtype=np.float32) / scale + mean


class TargetMoments:
    """Count, mean and covariance of target rows added batch by batch (memory d x d, not rows x d)."""

    def __init__(self):
        self.n, self.s, self.ss = 0, None, None

    def add(self, y: np.ndarray) -> None:
        y = np.asarray(y, dtype=np.float64)
        if self.s is None:
            self.s, self.ss = np.zeros(y.shape[1]), np.zeros((y.shape[1], y.shape[1]))
        self.n += len(y)
        self.s += y.sum(0)
        self.ss += y.T @ y

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        mean = self.s / max(self.n, 1)
        return mean, self.ss / max(self.n, 1) - np.outer(mean, mean)


# ---------------------------------------------------------------- checkpoints
def save_checkpoint(d: Path, model, optimizer, epoch: int, history: list, extra: dict) -> None:
    """Write ``state.pt`` (state dicts + plain python) and ``meta.json`` into folder ``d``."""
    d.mkdir(parents=True, exist_ok=True)
    m = model.module if hasattr(model, "module") else model
    state = {"model": m.state_dict(), "optimizer": optimizer.state_dict(), "epoch": int(epoch),
             "history": [dict(h) for h in history], **extra}
    torch.save(state, d / STATE)
    (d / META).write_text(json.dumps({"epoch": int(epoch), "fingerprint": extra.get("fingerprint")}))


def load_state(d: str | os.PathLike) -> dict:
    """A checkpoint folder's ``state.pt`` (loaded with ``weights_only=True``)."""
    return torch.load(Path(d) / STATE, map_location="cpu", weights_only=True)


def latest_checkpoint(root: Path) -> Optional[tuple[Path, dict]]:
    """The newest complete ``checkpoint_epoch_*`` folder under ``root`` and its meta, or None."""
    best = None
    if not root.is_dir():
        return None
    for d in root.glob(f"{CKPT_PREFIX}*"):
        if not (d / STATE).is_file() or not (d / META).is_file():
            continue
        try:
            meta = json.loads((d / META).read_text())
        except ValueError:
            continue
        if best is None or meta["epoch"] > best[1]["epoch"]:
            best = (d, meta)
    return best


def resume_state(ckpt, config: dict) -> tuple[Optional[dict], Optional[str]]:
    """The newest readable checkpoint: Ray Train's own, ``resume_from``, or the newest complete one in
    ``checkpoint_root`` (a worker killed right after its checkpoint was persisted, before Ray Train
    registered it, must not cost that epoch again). Candidates are ranked by their ``meta.json`` epoch and
    only the newest loadable ``state.pt`` is read. Returns ``(state, folder)`` or ``(None, None)``."""
    dirs = [d for d in (ckpt.path if ckpt is not None else None, config.get("resume_from")) if d]
    root = config.get("checkpoint_root")
    if root:
        found = latest_checkpoint(Path(root))
        if found is not None and found[1].get("fingerprint") == config.get("fingerprint"):
            dirs.append(str(found[0]))

    def epoch_of(d: str) -> int:
        try:
            return int(json.loads((Path(d) / META).read_text())["epoch"])
        except (OSError, ValueError, KeyError):
            return -1

    for d in sorted(dirs, key=epoch_of, reverse=True):
        try:
            return load_state(d), d
        except (OSError, RuntimeError, EOFError, KeyError, ValueError):
            continue  # a checkpoint still being copied: take the next one
    return None, None


def report_checkpoint(config: dict, rank: int, name: str, metrics: dict, model, optimizer, epoch: int,
                      history: list, extra: dict) -> None:
    """Inside a Ray Train loop: report ``metrics`` with a checkpoint folder ``name`` written by rank 0 (every rank
    holds the same model). In-process runs (``config["local_checkpoint_dir"]``) keep the folders themselves,
    the newest two, since Ray Train keeps no copy there."""
    import tempfile

    import ray.train
    from ray.train import Checkpoint

    local_root = config.get("local_checkpoint_dir")
    if local_root:
        d = Path(local_root) / name
        if rank == 0:
            save_checkpoint(d, model, optimizer, epoch, history, extra)
            prune_checkpoints(Path(local_root), keep=2)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(d)) if rank == 0 else None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        ck = None
        if rank == 0:
            save_checkpoint(Path(tmp), model, optimizer, epoch, history, extra)
            ck = Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ck, checkpoint_dir_name=name)


def usable_checkpoint(exp: Path, fingerprint: str, log, tag: str) -> Optional[tuple[Path, dict]]:
    """The newest checkpoint under a Ray Train experiment folder when it was made with ``fingerprint``; a folder
    of checkpoints from another config is removed (logged as ``[tag] ...``) and None returned."""
    latest = latest_checkpoint(exp)
    if latest and latest[1].get("fingerprint") != fingerprint:
        log(f"[{tag}] checkpoints in {exp} were made with a different config; starting over")
        shutil.rmtree(exp, ignore_errors=True)
        return None
    return latest


def prune_checkpoints(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoint folders under ``root``."""
    dirs = sorted(root.glob(f"{CKPT_PREFIX}*"), key=lambda d: d.name)
    for d in dirs[:-keep]:
        shutil.rmtree(d, ignore_errors=True)



def load_student_backbone(out: str | os.PathLike) -> tuple[torch.nn.Module, dict]:
    """The trained student's backbone (eval mode) and metrics from its folder (RUN/student)."""
    student, meta = load_student(out)
    return student.backbone.eval(), meta


# ---------------------------------------------------------------- the student as a participant (student:RUN)
class StudentEncoder(torch.nn.Module):
    """A trained student as a participant model: ``encode_image`` is its head's output (the target space it
    learned), on the images prepared by :func:`student_preprocess`."""

    def __init__(self, student: Student):
        super().__init__()
        self.student = student

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)


def student_preprocess(image_size: int):
    """PIL image -> normalised float CHW tensor, the student's own training input path (resize, [0,1], normalise)."""
    from .augment import normalize_pixels
    from .images import resize_rgb

    def prep(img) -> torch.Tensor:
        x = torch.from_numpy(resize_rgb(img, image_size).copy()).permute(2, 0, 1).float().div_(255.0)
        return normalize_pixels(x)

    return prep


def student_folder(path: str | os.PathLike) -> Path:
    """The student folder behind a ``student:`` spec: a run folder (its student/) or the student folder itself;
    ValueError naming what is missing."""
    p = Path(path).expanduser()
    for d in (p / "student", p):
        if (d / WEIGHTS).is_file() and (d / METRICS).is_file():
            return d
    raise ValueError(f"no trained student in {p} (expected {p / 'student' / WEIGHTS} and {METRICS}; "
                     "train one with `coopt run` or `coopt train`)")


def load_student(path: str | os.PathLike, map_location="cpu") -> tuple[Student, dict]:
    """The whole trained student (backbone + heads, eval mode) and its metrics, from a run or student folder."""
    d = student_folder(path)
    meta = json.loads((d / METRICS).read_text())
    aligned = meta.get("aligned_head", True)  # students trained before student.heads have only the aligned head
    student = Student(meta["arch"], int(meta["image_size"]), int(meta["head_dim"]) if aligned else 0,
                      heads=meta.get("heads"), primary=meta.get("primary_head"))
    student.load_state_dict(torch.load(d / WEIGHTS, map_location=map_location, weights_only=True))
    return student.eval(), meta


def _prefixed(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def warm_start(student: Student, path: str | os.PathLike) -> str:
    """Load a trained student's weights into ``student`` (``student.init``): the backbone always, and every head
    (aligned or a participant's) whose name and shape match (the target space can change between rounds). Returns
    what was loaded, for the log."""
    d = student_folder(path)
    state = torch.load(d / WEIGHTS, map_location="cpu", weights_only=True)
    student.backbone.load_state_dict(_prefixed(state, "backbone."))
    mods = ([("head", student.head)] if student.head is not None else []) + [
        (f"heads.{n}", h) for n, h in student.heads.items()]
    got = []
    for prefix, mod in mods:
        sub, own = _prefixed(state, prefix + "."), mod.state_dict()
        if sub.keys() == own.keys() and all(own[k].shape == v.shape for k, v in sub.items()):
            mod.load_state_dict(sub)
            got.append(prefix)
    if got:
        return f"backbone and {', '.join(got)} from {d}"
    return f"backbone from {d} (head re-initialised: the target space changed)"


def init_fingerprint(path: Optional[str]) -> Optional[str]:
    """What a warm start depends on: the init student's own training fingerprint (None without ``student.init``)."""
    if not path:
        return None
    try:
        from .rundir import DONE

        done = json.loads((student_folder(path) / DONE).read_text())
    except (ValueError, OSError):
        return str(path)
    return done.get("fingerprint")
