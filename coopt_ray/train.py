"""Student training on Ray Train (DESIGN.md §1 step 6).

A student of any timm architecture regresses the optimized targets:
``loss = 1 - cos(head(backbone(aug(x))), T(y))`` where ``T`` standardises the targets per dimension
(or PCA-whitens them, as RELA does, with ``student.whiten``). The targets are read from
``RUN/optimized/`` through Ray Data; no teacher runs here.

``train_loop_per_worker`` is a plain function: it runs in-process under
``ScalingConfig(num_workers=0)`` (unit tests) and on every worker under ``TorchTrainer``.
Each epoch is reported with a checkpoint; a rerun resumes from the latest one.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .config import Config

STATE = "state.pt"           # inside a checkpoint dir: model/optimizer state + history (torch.save)
META = "meta.json"           # inside a checkpoint dir: epoch + fingerprint, readable without torch
CKPT_PREFIX = "checkpoint_epoch_"
SHUFFLE_BUFFER = 2048       # rows in each worker's local shuffle buffer (reseeded every epoch)
PIXEL_MEAN = (0.5, 0.5, 0.5)
PIXEL_STD = (0.5, 0.5, 0.5)


# ---------------------------------------------------------------- the student network
def build_backbone(arch: str, image_size: int, in_chans: int = 3) -> torch.nn.Module:
    """A random-init timm backbone whose forward returns pooled penultimate features.

    ResNet-like models (``conv1`` + ``maxpool``) get a small-image stem when ``image_size <= 64``:
    a 3x3 stride-1 ``conv1`` and no max-pool (the CIFAR ResNet). Models that take ``img_size``
    (ViTs and friends) are built for ``image_size``.
    """
    import timm

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
    """Backbone -> linear head onto the (standardised) target space."""

    def __init__(self, arch: str, image_size: int, out_dim: int):
        super().__init__()
        self.backbone = build_backbone(arch, image_size)
        self.head = torch.nn.Linear(self.backbone.feature_width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def feature_dim(arch: str, image_size: int) -> int:
    """Width of the pooled penultimate features of ``arch``."""
    return int(build_backbone(arch, image_size).feature_width)


# ---------------------------------------------------------------- pixels and augmentation
def normalize_pixels(x: torch.Tensor) -> torch.Tensor:
    """Float NCHW in [0, 1] -> the student's input normalisation."""
    from torchvision.transforms.v2 import functional as TF

    return TF.normalize(x, list(PIXEL_MEAN), list(PIXEL_STD))


def to_float_nchw(images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC (RGB) -> float NCHW in [0, 1]."""
    return images.permute(0, 3, 1, 2).float().div_(255.0)


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
        return self.color(self.crop_flip(x, gen), gen)


_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _hue_rotate(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Rotate each image's hue by ``factor`` turns (per image), in YIQ space."""
    m = _RGB2YIQ.to(x.device, x.dtype)
    yiq = torch.einsum("ij,njhw->nihw", m, x)
    a = factor.to(x.dtype) * 2 * math.pi
    cos, sin = torch.cos(a).view(-1, 1, 1), torch.sin(a).view(-1, 1, 1)
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], cos * i - sin * q, sin * i + cos * q], 1)
    return torch.einsum("ij,njhw->nihw", torch.linalg.inv(m), yiq).clamp(0, 1)


# ---------------------------------------------------------------- targets
def target_transform(y: np.ndarray, whiten: bool = False, out_dim: Optional[int] = None,
                     eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, P)`` with ``T(y) = (y - mean) @ P``.

    Without ``whiten``: per-dimension standardisation (P diagonal). With ``whiten``: PCA to
    ``min(out_dim, d)`` components, each scaled to unit variance (RELA).
    """
    y = np.asarray(y, dtype=np.float64)
    if y.ndim != 2 or len(y) < 2:
        raise ValueError(f"need at least 2 target rows to standardise, got shape {y.shape}")
    mean = y.mean(0)
    if not whiten:
        std = y.std(0)
        return mean.astype(np.float32), np.diag(1.0 / np.maximum(std, eps)).astype(np.float32)
    k = min(out_dim or y.shape[1], y.shape[1])
    cov = np.cov(y - mean, rowvar=False).reshape(y.shape[1], y.shape[1])
    vals, vecs = np.linalg.eigh(cov)
    order = np.argsort(vals)[::-1][:k]
    P = vecs[:, order] / np.sqrt(np.maximum(vals[order], eps))
    return mean.astype(np.float32), P.astype(np.float32)


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


# ---------------------------------------------------------------- the training loop
def train_loop_per_worker(config: dict) -> dict:
    """Train the student on this worker's shard of ``train``; report each epoch with a checkpoint.

    ``config`` keys: arch, image_size, target_dim, target_mean (d), target_proj (d x k), epochs,
    batch_size (per worker), lr, weight_decay, seed, fingerprint; optional threads, use_gpu,
    resume_from (a checkpoint folder used when Ray Train has none), checkpoint_root (the run's
    checkpoint folder: its newest complete checkpoint wins when newer than Ray Train's), local_checkpoint_dir
    (in-process runs: where checkpoints are kept), log (print per-epoch lines on rank 0).
    """
    import ray.train
    from ray.train import Checkpoint

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    use_gpu = bool(config.get("use_gpu")) and torch.cuda.is_available()
    if use_gpu:
        import ray.train.torch as rtt

        device = rtt.get_device()
    else:
        device = torch.device("cpu")
    seed = int(config.get("seed", 0))
    torch.manual_seed(seed)  # identical init on every worker (DDP broadcasts rank 0's anyway)

    mean = torch.as_tensor(np.asarray(config["target_mean"], dtype=np.float32), device=device)
    proj = torch.as_tensor(np.asarray(config["target_proj"], dtype=np.float32), device=device)
    student = Student(config["arch"], int(config["image_size"]), proj.shape[1])

    state, resume_dir = _resume_state(ray.train.get_checkpoint(), config)
    history: list = []
    start = 0
    if state is not None:
        student.load_state_dict(state["model"])
        history = list(state.get("history", []))
        start = int(state["epoch"]) + 1

    if world > 1:
        import ray.train.torch as rtt

        model = rtt.prepare_model(student)
    else:
        model = student.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=float(config["lr"]),
                            weight_decay=float(config.get("weight_decay", 0.01)))
    if state is not None and "optimizer" in state:
        opt.load_state_dict(state["optimizer"])
    if state is not None and rank == 0 and config.get("log", True):
        _say(f"[train] resumed after epoch {start} from {resume_dir}")

    aug = BatchAugment(int(config["image_size"]))
    shard = ray.train.get_dataset_shard("train")
    epochs = int(config["epochs"])
    bs = int(config["batch_size"])
    extra = {"fingerprint": config.get("fingerprint"), "target_mean": mean.cpu(), "target_proj": proj.cpu(),
             "arch": config["arch"], "image_size": int(config["image_size"])}
    for epoch in range(start, epochs):
        model.train()
        t0 = time.time()
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch * 1_009 + rank)
        loss_sum = torch.zeros((), dtype=torch.float64)
        seen = 0
        for batch in shard.iter_torch_batches(batch_size=bs, drop_last=True,
                                              dtypes={"image": torch.uint8, "target": torch.float32},
                                              local_shuffle_buffer_size=SHUFFLE_BUFFER,
                                              local_shuffle_seed=seed * 100_003 + epoch * 1_009 + rank):
            x = to_float_nchw(batch["image"].to(device))
            x = normalize_pixels(aug(x, gen))
            y = (batch["target"].to(device) - mean) @ proj
            loss = (1 - F.cosine_similarity(model(x), y, dim=1)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(x)
            seen += len(x)
        tot = torch.tensor([float(loss_sum), float(seen)], dtype=torch.float64)
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(tot)
        if tot[1] == 0:
            raise RuntimeError(f"epoch {epoch + 1}: no full batch of {bs} rows on a worker; "
                               "lower student.batch_size or use more data")
        dt = time.time() - t0
        metrics = {"epoch": epoch + 1, "loss": float(tot[0] / tot[1]), "images": int(tot[1]),
                   "seconds": round(dt, 3), "images_per_s": round(float(tot[1]) / max(dt, 1e-9), 2)}
        history.append(metrics)
        name = f"{CKPT_PREFIX}{epoch:04d}"
        if rank == 0 and config.get("log", True):
            _say(f"[train] epoch {epoch + 1}/{epochs}  loss {metrics['loss']:.4f}  "
                 f"{metrics['images']} images in {dt:.1f}s ({metrics['images_per_s']:.1f} img/s)")
        local_root = config.get("local_checkpoint_dir")
        if local_root:  # in-process run: Ray Train keeps no copy, so keep it ourselves
            d = Path(local_root) / name
            if rank == 0:
                save_checkpoint(d, model, opt, epoch, history, extra)
                _prune(Path(local_root), keep=2)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(d)) if rank == 0 else None)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                ck = None
                if rank == 0:
                    save_checkpoint(Path(tmp), model, opt, epoch, history, extra)
                    ck = Checkpoint.from_directory(tmp)
                ray.train.report(metrics, checkpoint=ck, checkpoint_dir_name=name)
    return {"start_epoch": start, "history": history}


def _resume_state(ckpt, config: dict) -> tuple[Optional[dict], Optional[str]]:
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


def _say(line: str) -> None:
    """One progress line from a worker (Ray Train patches ``print``, which would log it twice)."""
    import sys

    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _prune(root: Path, keep: int) -> None:
    dirs = sorted(root.glob(f"{CKPT_PREFIX}*"), key=lambda d: d.name)
    for d in dirs[:-keep]:
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------- Ray Data input
def decode_batch(batch: dict, image_size: int) -> dict:
    """``map_batches`` fn: PNG/JPEG bytes -> uint8 (N, S, S, 3) RGB; targets pass through."""
    from .data import decode_image

    imgs, keep = [], []
    for i, data in enumerate(batch["image"]):
        try:
            imgs.append(resize_rgb(decode_image(data), image_size))
            keep.append(i)
        except ValueError:
            continue  # merged rows were readable once; never fail a batch on one image
    target = np.asarray(batch["target"], dtype=np.float32)
    if target.dtype == object:
        target = np.stack([np.asarray(t, dtype=np.float32) for t in batch["target"]])
    out = np.stack(imgs) if imgs else np.zeros((0, image_size, image_size, 3), np.uint8)
    return {"image": out, "target": target.reshape(len(batch["image"]), -1)[keep]}


def resize_rgb(img, size: int) -> np.ndarray:
    """PIL image -> uint8 (size, size, 3) RGB (bilinear), the one resize used in training and eval."""
    from PIL import Image

    img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def arrays_to_rgb(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N,H,W) or (N,H,W,3) arrays -> uint8 (N, size, size, 3), as the training input path does."""
    from PIL import Image

    return np.stack([resize_rgb(Image.fromarray(np.ascontiguousarray(a)), size) for a in images])


def _keep_ids(batch, ids: frozenset):
    import pyarrow as pa
    import pyarrow.compute as pc

    return batch.filter(pc.is_in(batch.column("id"), value_set=pa.array(sorted(ids), pa.string())))


def subset_ids(ids: list[str], limit: Optional[int], seed: int) -> Optional[frozenset]:
    """A seeded random subset of ``limit`` ids (None: use all)."""
    if limit is None or limit >= len(ids):
        return None
    h = np.array([int.from_bytes(hashlib.blake2b(f"student:{seed}:{i}".encode(), digest_size=8).digest(),
                                 "little") for i in ids], dtype=np.uint64)
    return frozenset(ids[j] for j in np.argsort(h, kind="stable")[:limit])


def training_dataset(opt_dir: Path, image_size: int, keep: Optional[frozenset] = None, shuffle_seed=None):
    """RUN/optimized as a Ray Dataset of decoded uint8 images + targets.

    The merged parts are grouped by participant, so the rows are globally shuffled once (seeded); the
    images are decoded once and the result is materialized in the object store (50k 32 px images are
    ~150 MB), so an epoch only streams the blocks (each worker adds a local shuffle buffer, reseeded per
    epoch) instead of re-reading, re-shuffling and re-decoding the Parquet every epoch.
    """
    import ray.data

    ds = ray.data.read_parquet(str(opt_dir), file_extensions=["parquet"]).select_columns(["id", "image", "target"])
    if keep is not None:
        ds = ds.map_batches(_keep_ids, batch_format="pyarrow", fn_kwargs={"ids": keep})
    ds = ds.random_shuffle(seed=shuffle_seed)
    ds = ds.map_batches(decode_batch, batch_format="numpy", fn_kwargs={"image_size": image_size},
                        batch_size=256)
    ds = ds.materialize()
    ds.set_name("student_train")
    return ds


def read_targets(opt_dir: Path) -> tuple[list[str], np.ndarray]:
    """Ids and the target matrix of RUN/optimized (driver side, for the standardisation statistics)."""
    import pyarrow.parquet as pq

    from .optimize import column_matrix

    t = pq.read_table(str(opt_dir), columns=["id", "target"])
    return t.column("id").to_pylist(), column_matrix(t.column("target"))


# ---------------------------------------------------------------- the stage (driver)
def train_fingerprint(cfg: Config, manifest: dict, with_epochs: bool = True) -> str:
    """What a finished (or resumable, without epochs) training depends on."""
    import dataclasses

    s = dataclasses.asdict(cfg.student)
    for k in ("workers", "use_gpu", "cpus_per_worker") + (() if with_epochs else ("epochs",)):
        s.pop(k, None)  # how many workers is not what is learned
    blob = json.dumps({"student": s, "optimized": manifest.get("fingerprint"),
                       "image_size": cfg.data.image_size, "seed": cfg.seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def plan_workers(cfg: Config, resources: dict) -> tuple[int, float, int]:
    """``(num_workers, cpus_per_worker, torch_threads)``; one CPU stays free for Ray Data."""
    s = cfg.student
    total = float(resources.get("CPU", os.cpu_count() or 1))
    if s.workers == 0:
        return 0, 0.0, max(1, int(os.cpu_count() or 1))
    cpw = getattr(s, "cpus_per_worker", None)
    if cpw is None:
        cpw = min(4.0, max(0.25, math.floor(4 * (total - 1) / s.workers) / 4))
    return s.workers, float(cpw), max(1, int(cpw))


def run_train(cfg: Config, run: str | os.PathLike, address: Optional[str] = None,
              log: Callable[[str], None] = print) -> dict:
    """The train stage: RUN/student/{student.pt, metrics.json, _DONE.json}; returns metrics.json content."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .optimize import DONE, read_done, write_json_atomic
    from .pipeline import RunError, init_ray, prepare_run_dir

    run = Path(run)
    man_path = run / "manifest.json"
    if not man_path.exists() or not (run / "optimized").is_dir():
        raise RunError(f"{run} has no optimized dataset; run `coopt optimize --config CFG --out {run}` first")
    manifest = json.loads(man_path.read_text())
    prepare_run_dir(cfg, run)
    out = run / "student"
    out.mkdir(exist_ok=True)
    fp = train_fingerprint(cfg, manifest)
    done = read_done(out)
    if done and done.get("fingerprint") == fp and (out / "student.pt").exists():
        log(f"[train] already done: {out / 'student.pt'} (loss {done['final_loss']:.4f}); skipping")
        return json.loads((out / "metrics.json").read_text())
    (out / DONE).unlink(missing_ok=True)

    t_start = time.time()
    s = cfg.student
    init_ray(address, log=log)
    ids, y = read_targets(run / "optimized")
    keep = subset_ids(ids, s.limit, cfg.seed)
    if keep is not None:
        y = y[np.fromiter((i in keep for i in ids), dtype=bool, count=len(ids))]
    rows = len(y)
    fdim = feature_dim(s.arch, cfg.data.image_size)
    mean, proj = target_transform(y, whiten=s.whiten, out_dim=fdim)
    workers, cpw, threads = plan_workers(cfg, ray.cluster_resources())
    world = max(1, workers)
    per_worker = max(2, s.batch_size // world)
    if rows // world < per_worker:
        per_worker = max(2, rows // world)
        log(f"[train] only {rows} rows for {world} worker(s): per-worker batch lowered to {per_worker}")

    name = f"coopt-train-{run.resolve().name}"
    storage = (out / "ray_results").resolve()
    exp = storage / name
    rfp = train_fingerprint(cfg, manifest, with_epochs=False)
    latest = latest_checkpoint(exp)
    if latest and latest[1].get("fingerprint") != rfp:
        log(f"[train] checkpoints in {exp} are from a different student config; starting over")
        shutil.rmtree(exp, ignore_errors=True)
        latest = None
    log(f"[train] student {s.arch} on {rows} rows (target dim {y.shape[1]} -> {proj.shape[1]}"
        f"{', whitened' if s.whiten else ', standardised'}), {s.epochs} epochs, "
        f"{'in-process' if workers == 0 else f'{workers} workers x {cpw:g} CPU'}"
        f"{' + GPU' if s.use_gpu else ''}, batch {per_worker}/worker, run name {name}")
    if latest and latest[1]["epoch"] + 1 >= s.epochs:
        log(f"[train] checkpoint {latest[0].name} already covers {s.epochs} epochs")
    else:
        if latest:
            log(f"[train] resuming after epoch {latest[1]['epoch'] + 1} from {latest[0]}")
        loop_cfg = {
            "arch": s.arch, "image_size": cfg.data.image_size, "target_dim": int(y.shape[1]),
            "target_mean": mean.tolist(), "target_proj": proj.tolist(), "epochs": s.epochs,
            "batch_size": per_worker, "lr": s.lr, "weight_decay": s.weight_decay, "seed": cfg.seed,
            "fingerprint": rfp, "threads": threads, "use_gpu": s.use_gpu,
            "resume_from": str(latest[0]) if latest else None,
            "local_checkpoint_dir": str(exp) if workers == 0 else None, "checkpoint_root": str(exp),
        }
        ds = training_dataset(run / "optimized", cfg.data.image_size, keep, shuffle_seed=cfg.seed)
        scaling = ScalingConfig(num_workers=workers, use_gpu=s.use_gpu,
                                resources_per_worker={"CPU": cpw} if workers else None)
        trainer = TorchTrainer(
            train_loop_per_worker, train_loop_config=loop_cfg, scaling_config=scaling,
            torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
            run_config=RunConfig(name=name, storage_path=str(storage),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2),
                                 # a dead worker restarts the group from the last epoch's checkpoint
                                 failure_config=FailureConfig(max_failures=3)),
            datasets={"train": ds},
        )
        trainer.fit()
        latest = latest_checkpoint(exp)
        if latest is None:
            raise RunError(f"training finished without a checkpoint in {exp}")
    state = load_state(latest[0])
    tmp = out / "student.pt.tmp"
    torch.save(state["model"], tmp)
    os.replace(tmp, out / "student.pt")
    history = state["history"]
    metrics = {
        "arch": s.arch, "image_size": cfg.data.image_size, "target_dim": int(y.shape[1]),
        "head_dim": int(proj.shape[1]), "whiten": s.whiten, "rows": rows, "epochs": s.epochs,
        "workers": workers, "batch_size_per_worker": per_worker,
        "history": history, "loss": [h["loss"] for h in history],
        "seconds": {"train": round(sum(h["seconds"] for h in history), 3),
                    "stage": round(time.time() - t_start, 3)},
        "checkpoint": str(latest[0]), "fingerprint": fp,
    }
    write_json_atomic(out / "metrics.json", metrics)
    write_json_atomic(out / DONE, {"fingerprint": fp, "final_loss": history[-1]["loss"], "epochs": s.epochs})
    log(f"[train] done: final loss {history[-1]['loss']:.4f} after {len(history)} epochs "
        f"in {time.time() - t_start:.1f}s -> {out / 'student.pt'}")
    return metrics


def load_student_backbone(run: str | os.PathLike) -> tuple[torch.nn.Module, dict]:
    """The trained student's backbone (eval mode) and RUN/student/metrics.json."""
    out = Path(run) / "student"
    meta = json.loads((out / "metrics.json").read_text())
    student = Student(meta["arch"], int(meta["image_size"]), int(meta["head_dim"]))
    student.load_state_dict(torch.load(out / "student.pt", map_location="cpu", weights_only=True))
    return student.backbone.eval(), meta
