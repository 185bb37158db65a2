"""Linear-probe evaluation (DESIGN.md §1 step 7): frozen features -> linear classifier -> test accuracy.

The same probe scores teachers (zoo), baselines and the student, so all numbers are comparable.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch


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


# ---------------------------------------------------------------- the evaluate stage
class EvalSkipped(Exception):
    """No labeled probe/test split for this data source; the message says what to set."""


def _seeded_take(n: int, limit: Optional[int], seed: int, shuffle: bool) -> np.ndarray:
    idx = np.arange(n)
    if shuffle:
        idx = np.random.default_rng(seed).permutation(n)
    return idx if limit is None else idx[:limit]


def load_labeled(path: str, image_size: int, limit: Optional[int] = None, seed: int = 0):
    """A labeled split from a folder with class subfolders, or Parquet (``image`` bytes + ``label``).

    Returns ``(uint8 (N, S, S, 3) RGB images, int labels, class names)``; a seeded random ``limit``
    rows are kept (a folder lists classes in order, so the first rows would be one class).
    """
    from pathlib import Path

    from .data import decode_image, folder_classes, label_for, list_image_files
    from .train import resize_rgb

    p = Path(path).expanduser()
    if not p.exists():
        raise EvalSkipped(f"labeled split not found: {p}")
    if p.is_dir() and not any(p.rglob("*.parquet")):
        classes = folder_classes(p)
        if not classes:
            raise EvalSkipped(f"{p} has no class subfolders, so it has no labels for the probe")
        files = [f for f in list_image_files(p) if label_for(f, classes) >= 0]
        take = _seeded_take(len(files), limit, seed, shuffle=True)
        images, labels = [], []
        for i in take:
            try:
                images.append(resize_rgb(decode_image((p / files[i]).read_bytes()), image_size))
                labels.append(label_for(files[i], classes))
            except ValueError:
                continue
    else:
        import pyarrow.parquet as pq

        t = pq.read_table(str(p), columns=["image", "label"])
        take = _seeded_take(t.num_rows, limit, seed, shuffle=True)
        raw, lab = t.column("image").to_pylist(), t.column("label").to_pylist()
        images, labels = [], []
        for i in take:
            if lab[i] is None or lab[i] < 0:
                continue
            try:
                images.append(resize_rgb(decode_image(raw[i]), image_size))
                labels.append(int(lab[i]))
            except ValueError:
                continue
        classes = [str(c) for c in sorted(set(labels))]
    if not images:
        raise EvalSkipped(f"no readable labeled images in {p}")
    return np.stack(images), np.asarray(labels, dtype=np.int64), classes


def labeled_splits(cfg) -> dict:
    """The probe (train) and test splits for ``cfg``: images (uint8), labels and a description.

    Fashion-MNIST: probe = public train[0:10k] (``eval.probe_limit`` trims it), test = t10k
    (``eval.test_limit``). Other sources: ``eval.probe_path`` and ``eval.test_path`` (class
    subfolders or labeled Parquet); without them the stage is skipped with :class:`EvalSkipped`.
    """
    e = cfg.eval
    if e.probe_path or e.test_path:
        if not (e.probe_path and e.test_path):
            raise EvalSkipped("set both eval.probe_path and eval.test_path (labeled folders or Parquet)")
        px, py, _ = load_labeled(e.probe_path, cfg.data.image_size, e.probe_limit, cfg.seed)
        tx, ty, _ = load_labeled(e.test_path, cfg.data.image_size, e.test_limit, cfg.seed + 1)
        return {"probe": (px, py), "test": (tx, ty),
                "description": f"probe {e.probe_path} ({len(py)}), test {e.test_path} ({len(ty)})"}
    if cfg.data.source == "fashion-mnist":
        from .data import fashion_mnist_split

        px, py = fashion_mnist_split("public", cfg.data.path)
        tx, ty = fashion_mnist_split("test", cfg.data.path)
        px, py = px[: e.probe_limit], py[: e.probe_limit]
        tx, ty = tx[: e.test_limit], ty[: e.test_limit]
        return {"probe": (px, py), "test": (tx, ty),
                "description": f"Fashion-MNIST probe = public train[0:{len(py)}], test = t10k[0:{len(ty)}]"}
    raise EvalSkipped(
        f"data.source={cfg.data.source} has no labeled probe split: set eval.probe_path and eval.test_path "
        "to folders with one subfolder per class (or Parquet with image and label columns)"
    )


@torch.no_grad()
def backbone_features(backbone: torch.nn.Module, images_rgb: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Pooled penultimate features of a timm backbone for uint8 (N, S, S, 3) images (no augmentation)."""
    from .train import normalize_pixels, to_float_nchw

    backbone.eval()
    device = next(backbone.parameters()).device
    out = []
    for s in range(0, len(images_rgb), batch_size):
        x = normalize_pixels(to_float_nchw(torch.from_numpy(np.array(images_rgb[s:s + batch_size])).to(device)))
        out.append(backbone(x).float().cpu())
    return torch.cat(out).numpy()


def score_backbone(state: Optional[dict], arch: str, image_size: int, data: dict, epochs: int,
                   seed: int = 0, use_gpu: bool = False) -> dict:
    """Linear-probe accuracy of a student backbone (``state`` None: random init, seeded)."""
    import time

    from .train import build_backbone

    t0 = time.time()
    torch.manual_seed(seed)
    backbone = build_backbone(arch, image_size)
    if state is not None:
        backbone.load_state_dict(state)
    if use_gpu and torch.cuda.is_available():
        backbone = backbone.cuda()
    ftr = backbone_features(backbone, data["probe_rgb"])
    fte = backbone_features(backbone, data["test_rgb"])
    t1 = time.time()
    acc = linear_probe(ftr, data["probe_y"], fte, data["test_y"], epochs=epochs, seed=seed)
    return {"arch": arch, "probe_accuracy": acc, "feature_dim": int(ftr.shape[1]),
            "seconds": round(time.time() - t0, 3), "embed_seconds": round(t1 - t0, 3)}


def score_teacher(model: str, pretrained: Optional[str], data: dict, epochs: int, seed: int = 0,
                  use_gpu: bool = False) -> dict:
    """Linear-probe accuracy of a participant's open_clip image embeddings."""
    import time

    from .models import load_model, pick_device

    t0 = time.time()
    m, preprocess, dim = load_model(model, pretrained, pick_device(prefer_gpu=use_gpu))
    ftr = embed_arrays(m, preprocess, data["probe_raw"])
    fte = embed_arrays(m, preprocess, data["test_raw"])
    t1 = time.time()
    acc = linear_probe(ftr, data["probe_y"], fte, data["test_y"], epochs=epochs, seed=seed)
    return {"model": model, "probe_accuracy": acc, "embed_dim": int(dim),
            "seconds": round(time.time() - t0, 3), "embed_seconds": round(t1 - t0, 3)}


def _score_task(kind: str, args: dict, data: dict, state: Optional[dict] = None) -> dict:
    import os

    threads = int(os.environ.get("COOPT_EVAL_THREADS", "0") or 0)
    if threads:
        torch.set_num_threads(threads)
    data = {**data, "probe_y": np.array(data["probe_y"]), "test_y": np.array(data["test_y"])}  # writable
    if kind == "teacher":
        return score_teacher(data=data, **args)
    return score_backbone(state, data=data, **args)


def eval_fingerprint(cfg, train_done: dict) -> str:
    import dataclasses
    import hashlib
    import json

    blob = json.dumps({"student": train_done.get("fingerprint"), "eval": dataclasses.asdict(cfg.eval),
                       "participants": [dataclasses.asdict(p) for p in cfg.participants],
                       "image_size": cfg.data.image_size, "data": cfg.data.path, "seed": cfg.seed},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_evaluate(cfg, run, address: Optional[str] = None, log=print) -> dict:
    """The evaluate stage: the same linear probe for the student, every teacher and a random-init
    student of the same architecture; writes RUN/eval.json and returns its content.

    Each scorer is one Ray task (1 CPU, or a GPU where the participant/student asks for one).
    """
    import json
    import time
    from pathlib import Path

    import ray

    from .config import resolve_model
    from .optimize import read_done, write_json_atomic
    from .pipeline import RunError, init_ray
    from .train import arrays_to_rgb

    run = Path(run)
    done = read_done(run / "student")
    if not done or not (run / "student" / "student.pt").exists():
        raise RunError(f"{run} has no trained student; run `coopt train --config CFG --run {run}` first")
    out_path = run / "eval.json"
    fp = eval_fingerprint(cfg, done)
    if out_path.exists():
        old = json.loads(out_path.read_text())
        if old.get("fingerprint") == fp:
            log(f"[evaluate] already done: {out_path}; skipping")
            return old
    t_start = time.time()
    meta = json.loads((run / "student" / "metrics.json").read_text())
    try:
        splits = labeled_splits(cfg)
    except EvalSkipped as e:
        log(f"[evaluate] skipped: {e}")
        res = {"skipped": str(e), "student": {"arch": meta["arch"], "probe_accuracy": None},
               "teachers": {}, "random_init": None, "seconds": {}, "fingerprint": fp}
        write_json_atomic(out_path, res)
        return res
    (px, py), (tx, ty) = splits["probe"], splits["test"]
    log(f"[evaluate] linear probe ({cfg.eval.probe_epochs} epochs): {splits['description']}")
    size = int(meta["image_size"])
    data = {"probe_raw": px, "test_raw": tx, "probe_y": py, "test_y": ty,
            "probe_rgb": arrays_to_rgb(px, size), "test_rgb": arrays_to_rgb(tx, size)}
    init_ray(address, log=log)
    data_ref = ray.put(data)
    from .train import load_student_backbone

    backbone, _ = load_student_backbone(run)
    state_ref = ray.put({k: v.cpu() for k, v in backbone.state_dict().items()})
    epochs, seed, s_gpu = cfg.eval.probe_epochs, cfg.seed, cfg.student.use_gpu
    remote = ray.remote(_score_task)
    jobs = {}
    sopts = {"num_cpus": 1, "num_gpus": 1 if s_gpu else 0}
    bargs = {"arch": meta["arch"], "image_size": size, "epochs": epochs, "seed": seed, "use_gpu": s_gpu}
    jobs[remote.options(name="probe_student", **sopts).remote("backbone", bargs, data_ref, state_ref)] = \
        ("student", None)
    jobs[remote.options(name="probe_random_init", **sopts).remote("backbone", bargs, data_ref, None)] = \
        ("random_init", None)
    for p in cfg.participants:
        opts = {"num_cpus": 1, "num_gpus": p.num_gpus}
        args = {"model": resolve_model(cfg, p.model), "pretrained": p.pretrained, "epochs": epochs,
                "seed": seed, "use_gpu": p.num_gpus > 0}
        jobs[remote.options(name=f"probe_{p.name}", **opts).remote("teacher", args, data_ref)] = ("teacher", p.name)
    results: dict = {}
    pending = list(jobs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        kind, name = jobs[ready[0]]
        r = ray.get(ready[0])
        results[(kind, name)] = r
        label = name or kind.replace("_", "-")
        log(f"[evaluate] {label:<12} probe accuracy {r['probe_accuracy']:.4f}  ({r['seconds']:.1f}s)")
    teachers = {p.name: results[("teacher", p.name)] for p in cfg.participants}
    student = {**results[("student", None)], "epochs": meta["epochs"], "rows": meta["rows"]}
    rnd = results[("random_init", None)]
    best_t = max(teachers, key=lambda n: teachers[n]["probe_accuracy"])
    res = {
        "student": student, "teachers": teachers, "random_init": rnd,
        "best_teacher": best_t,
        "probe": {"description": splits["description"], "probe_rows": int(len(py)), "test_rows": int(len(ty)),
                  "epochs": epochs, "classes": int(max(py.max(), ty.max()) + 1)},
        "seconds": {"student": student["seconds"], "random_init": rnd["seconds"],
                    **{n: t["seconds"] for n, t in teachers.items()}, "total": round(time.time() - t_start, 3)},
        "fingerprint": fp,
    }
    write_json_atomic(out_path, res)
    log(f"[evaluate] student {student['probe_accuracy']:.4f} vs random-init {rnd['probe_accuracy']:.4f} "
        f"vs best teacher {best_t} {teachers[best_t]['probe_accuracy']:.4f} -> {out_path}")
    return res
