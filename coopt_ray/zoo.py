"""Offline teacher zoo (DESIGN.md §5): tiny open_clip CLIP models pretrained on the public split.

Each teacher is a custom ``open_clip.CLIP`` config (different vision towers, widths, depths,
embedding dims and training lengths, so their quality differs), trained with open_clip's own
``ClipLoss`` on Fashion-MNIST train[0:10k] with captions made from class names, and saved as a
``local-dir:`` folder. It is then loaded back through ``models.load_model`` (the participants' code
path) and scored with the linear probe and the uniformity value. ``zoo.json`` lists the teachers;
the zoo is built once and cached.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .data import FASHION_MNIST_CLASSES, fashion_mnist_split
from .devices import stage_device
from .probe import embed_tensors, linear_probe, preprocess_arrays
from .models import LOCAL_DIR, load_model, save_local_dir
from .preprocess import open_clip_preprocess_cfg
from .rundir import write_json_atomic
from .uniformity import uniformity
from .zoo_train import class_subset, make_objective
from .zoo_specs import (CAPTION, CAPTION_MODES, PREPROCESS_CFG, ZOO_SPECS,
                        pixel_stat_captions)

ZOO_FORMAT = 1  # bump when training/scoring code changes in a way that invalidates cached zoos
ZOO_JSON = "zoo.json"
ENTRY_JSON = "zoo_entry.json"  # per-teacher record, written last inside its folder (resume marker)
UNIFORMITY_SAMPLE = 64
UNIFORMITY_SEED = 0



SPEC_DEFAULTS = {"epochs": 1, "lr": 1e-3, "weight_decay": 0.1, "batch_size": 256, "augment": False,
                 "seed": 0, "warmup_fraction": 0.1, "preprocess_cfg": PREPROCESS_CFG}


# ---------------------------------------------------------------- helpers
def _full_spec(spec: dict) -> dict:
    if "name" not in spec or "model_cfg" not in spec:
        raise ValueError(f"zoo spec needs 'name' and 'model_cfg': {spec}")
    out = copy.deepcopy(SPEC_DEFAULTS)
    out.update(copy.deepcopy(spec))
    return out


def specs_hash(specs: Sequence[dict], n_train: Optional[int], n_test: Optional[int],
               probe_epochs: int = 100) -> str:
    """Stable hash of everything that determines a zoo's contents (specs, data sizes, probe)."""
    blob = json.dumps({"format": ZOO_FORMAT, "specs": [_full_spec(s) for s in specs],
                       "n_train": n_train, "n_test": n_test, "probe_epochs": probe_epochs}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _has_weights(folder: Path) -> bool:
    return (folder / "open_clip_config.json").is_file() and any(folder.glob("*.safetensors"))


def _cpu_seconds() -> float:
    """CPU time of this process (all threads): a load-independent measure of training cost."""
    t = os.times()
    return t.user + t.system


def _eval_transform(preprocess_cfg: dict, image_size: int):
    """The eval transform ``open_clip`` builds for a local-dir model with this preprocess_cfg."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = open_clip_preprocess_cfg(preprocess_cfg)
    cfg["size"] = image_size
    return image_transform_v2(PreprocessCfg(**cfg), is_train=False)


def _augment(x: torch.Tensor, gen: torch.Generator, fill: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """Random shifts of up to ``pad`` pixels (background filled) and horizontal flips."""
    n, c, h, w = x.shape
    fill = fill.view(1, c, 1, 1).to(x)
    xp = torch.nn.functional.pad(x - fill, (pad, pad, pad, pad)) + fill
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    out = xp[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def _param_groups(model: torch.nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "logit_scale" in name or "embedding" in name or "bn" in name
         else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------- training one teacher
def train_teacher(spec: dict, pixels: torch.Tensor, labels: np.ndarray, device: str = "cpu",
                  progress: Callable[[str], None] = print):
    """Pretrain one tiny CLIP on preprocessed ``pixels`` (N,3,S,S) with the spec's ``objective``
    (:mod:`coopt_ray.zoo_train`; default ``clip``: class-name captions, or with ``captions: pixel-stats``
    label-free captions from :func:`pixel_stat_captions`), on the spec's ``classes`` only when it names them.
    Returns ``(model, final_loss)``.
    """
    import open_clip

    spec = _full_spec(spec)
    pixels, labels = class_subset(pixels, labels, spec.get("classes"))
    torch.manual_seed(int(spec["seed"]))
    gen = torch.Generator().manual_seed(int(spec["seed"]))
    model = open_clip.CLIP(**spec["model_cfg"]).to(device)
    model.train()
    mean = torch.tensor(spec["preprocess_cfg"].get("mean", PREPROCESS_CFG["mean"]), dtype=torch.float32)
    std = torch.tensor(spec["preprocess_cfg"].get("std", PREPROCESS_CFG["std"]), dtype=torch.float32)
    fill = (0.0 - mean) / std  # black background after normalisation
    mode = spec.get("captions", "classes")
    if mode not in CAPTION_MODES:
        raise ValueError(f"zoo spec {spec['name']}: 'captions' must be one of {CAPTION_MODES}, got {mode!r}")
    if mode == "classes":
        captions = ([CAPTION.format(c) for c in FASHION_MNIST_CLASSES], np.asarray(labels))
    else:
        captions = pixel_stat_captions(pixels, fill)
    objective = make_objective(spec, model, labels, captions, mean, std, device)
    n, bs = len(pixels), int(spec["batch_size"])
    if spec.get("classes") is not None or spec.get("objective", "clip") != "clip":
        progress(f"[zoo] {spec['name']}: objective {spec.get('objective', 'clip')}, "
                 f"classes {spec.get('classes', 'all')}: {n} images")
    if n == 0:
        raise ValueError("no training images")
    bs = min(bs, n)
    steps_per_epoch = max(1, n // bs)  # drop the ragged last batch: contrastive batches stay large
    total = max(1, int(math.ceil(float(spec["epochs"]) * steps_per_epoch)))
    warmup = int(float(spec["warmup_fraction"]) * total)
    groups = _param_groups(model, float(spec["weight_decay"]))
    if objective.params:  # a projection head or classifier that trains with the tower (not saved)
        groups.append({"params": objective.params, "weight_decay": float(spec["weight_decay"])})
    opt = torch.optim.AdamW(groups, lr=float(spec["lr"]))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(1, warmup) if s < warmup
        else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))

    t0 = time.time()
    try:  # the clip objective trains only its captions' token rows until finish() puts the table back
        step, epoch, loss_sum, loss_n, last = 0, 0, 0.0, 0, float("nan")
        n_epochs = int(math.ceil(total / steps_per_epoch))
        while step < total:
            perm = torch.randperm(n, generator=gen)
            for b in range(steps_per_epoch):
                if step >= total:
                    break
                idx = perm[b * bs:(b + 1) * bs]
                x = pixels[idx]
                if spec["augment"]:
                    x = _augment(x, gen, fill)
                loss = objective(x.to(device), idx, gen)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0, math.log(100))
                loss_sum, loss_n, step = loss_sum + loss.detach().double(), loss_n + 1, step + 1  # no per-step sync
            epoch += 1
            last = float(loss_sum) / max(1, loss_n)
            progress(f"[zoo] {spec['name']} epoch {epoch}/{n_epochs} step {step}/{total} "
                     f"loss {last:.4f} {time.time() - t0:.1f}s")
            loss_sum, loss_n = 0.0, 0
    finally:
        objective.finish()
    model.eval()
    return model, last


# ---------------------------------------------------------------- the zoo
def _load_cached(out: Path, h: str, names: list[str]) -> Optional[list[dict]]:
    zj = out / ZOO_JSON
    if not zj.is_file():
        return None
    try:
        doc = json.loads(zj.read_text())
    except (OSError, ValueError):
        return None
    teachers = doc.get("teachers", [])
    if doc.get("specs_hash") != h or [t.get("name") for t in teachers] != names:
        return None
    if not all(_has_weights(out / name) for name in names):
        return None
    for t in teachers:  # the zoo folder may have moved since it was built
        t["path"] = str((out / t["name"]).resolve())
        t["model"] = LOCAL_DIR + t["path"]
    return teachers


def build_zoo(out_dir: str | os.PathLike = "zoo", specs: Optional[Sequence[dict]] = None,
              n_train: Optional[int] = None, n_test: Optional[int] = None, force: bool = False,
              progress: Optional[Callable[[str], None]] = print, data_path: Optional[str] = None,
              num_threads: Optional[int] = 1, device: str = "cpu",
              probe_epochs: int = 100, jobs: Optional[int] = None) -> list[dict]:
    """Build (or reuse) the teacher zoo under ``out_dir``; return the teacher records.

    Each record: ``name, path, model ("local-dir:..."), embed_dim, probe_accuracy, uniformity,
    train_seconds, train_cpu_seconds, eval_seconds, final_loss, spec``. ``n_train``/``n_test`` trim the public and
    test splits (quick builds, tests). A zoo whose ``zoo.json`` has the same specs hash and whose
    folders exist is returned as is (``force`` rebuilds); a teacher finished by an interrupted
    build is reused. ``zoo.json`` is written last, atomically.

    ``num_threads`` (restored afterwards; None leaves torch's setting) defaults to 1: on a shared
    2-core machine, 2 torch threads made these tiny convs/attention 10-40x *slower* (OpenMP threads
    spin while the other core is busy), while 1 thread costs at most ~1.5x when the machine is idle.

    ``jobs`` teachers train at once, each in its own process (``None``: one per CPU core, at most 4, on the CPU;
    1 on CUDA). Each teacher's weights depend only on its spec and seed, so they are the same for any ``jobs``.
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"zoo device must be cpu or cuda, got {device!r}")
    device = str(stage_device(device == "cuda", "zoo build --device"))  # asked for cuda: cuda or a one-line error
    verbose, progress = progress is not None, progress or (lambda _msg: None)
    specs = [_full_spec(s) for s in (ZOO_SPECS if specs is None else specs)]
    names = [s["name"] for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"zoo spec names are not unique: {names}")
    out = Path(out_dir)
    h = specs_hash(specs, n_train, n_test, probe_epochs)
    if not force:
        cached = _load_cached(out, h, names)
        if cached is not None:
            progress(f"[zoo] {out}: cached ({len(cached)} teachers, specs hash {h})")
            return cached
    out.mkdir(parents=True, exist_ok=True)

    old_threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    if jobs is None:
        jobs = 1 if device != "cpu" else max(1, min(4, os.cpu_count() or 1))
    args = (n_train, n_test, force, data_path, device, probe_epochs)
    try:
        if jobs > 1 and len(specs) > 1:
            teachers = _build_parallel(out, specs, args, progress, verbose, jobs, num_threads)
        else:
            teachers = _build(out, specs, *args[:3], progress, *args[3:])
    finally:
        torch.set_num_threads(old_threads)
    write_json_atomic(out / ZOO_JSON, {"specs_hash": h, "n_train": n_train, "n_test": n_test,
                                        "probe_epochs": probe_epochs, "teachers": teachers})
    return teachers


def _build_parallel(out: Path, specs, args: tuple, progress, verbose: bool, jobs: int,
                    num_threads: Optional[int]) -> list[dict]:
    """Train ``jobs`` teachers at once, each in a fresh (spawned) process, in spec order; records in spec order.
    The children's progress lines come back through a queue and go to ``progress`` here, as they happen."""
    import multiprocessing
    import queue
    from concurrent.futures import ProcessPoolExecutor, wait

    t0, ctx = time.time(), multiprocessing.get_context("spawn")
    lines = ctx.Queue()
    progress(f"[zoo] training {len(specs)} teachers, {jobs} at a time")

    def drain(timeout: float) -> None:
        try:
            while True:
                progress(lines.get(timeout=timeout))
                timeout = 0
        except queue.Empty:
            pass

    with ProcessPoolExecutor(min(jobs, len(specs)), mp_context=ctx, initializer=_child_init,
                             initargs=(lines if verbose else None, num_threads)) as ex:
        futures = [ex.submit(_build_child, out, spec, args) for spec in specs]
        while wait(futures, timeout=0).not_done:
            drain(0.2)
        teachers = [f.result() for f in futures]
    drain(0.2)
    progress(f"[zoo] built {len(teachers)} teachers in {time.time() - t0:.1f}s")
    return teachers


_CHILD_LINES = None  # a build child's progress queue (_child_init)
# The preprocessed public and test images of the last teacher this process built, read only: the next teacher with
# the same preprocess (every one in ZOO_SPECS) reuses them, also when a parallel build's child trains several.
_PIXELS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _child_init(lines, num_threads: Optional[int]) -> None:
    global _CHILD_LINES
    _CHILD_LINES = lines
    if num_threads:
        torch.set_num_threads(num_threads)


def _build_child(out: Path, spec: dict, args: tuple) -> dict:
    """One teacher, in a process of its own (:func:`_build_parallel`)."""
    n_train, n_test, force, data_path, device, probe_epochs = args
    def say(line: str) -> None:  # the parent says when the whole build is done
        if _CHILD_LINES is not None and not line.startswith("[zoo] built "):
            _CHILD_LINES.put(line)

    return _build(out, [spec], n_train, n_test, force, say, data_path, device, probe_epochs)[0]


def _build(out: Path, specs, n_train, n_test, force, progress, data_path, device, probe_epochs):
    t_start = time.time()
    x_pub, y_pub = fashion_mnist_split("public", data_path)
    x_test, y_test = fashion_mnist_split("test", data_path)
    x_pub, y_pub = x_pub[:n_train], y_pub[:n_train]
    x_test, y_test = x_test[:n_test], y_test[:n_test]
    rng = np.random.default_rng(UNIFORMITY_SEED)
    uni_idx = np.sort(rng.choice(len(x_pub), size=min(UNIFORMITY_SAMPLE, len(x_pub)), replace=False))

    def pixels_for(preprocess):
        key = (data_path, n_train, n_test, repr(preprocess))
        if key not in _PIXELS:
            t = time.time()
            _PIXELS.clear()  # one set at a time (the zoo's teachers share one preprocess): ~250 MB
            _PIXELS[key] = (preprocess_arrays(preprocess, x_pub), preprocess_arrays(preprocess, x_test))
            progress(f"[zoo] preprocessed {len(x_pub)} public + {len(x_test)} test images "
                     f"{time.time() - t:.1f}s")
        return _PIXELS[key]

    teachers = []
    for spec in specs:
        name, folder = spec["name"], out / spec["name"]
        eh = specs_hash([spec], n_train, n_test, probe_epochs)
        entry_file = folder / ENTRY_JSON
        if not force and entry_file.is_file() and _has_weights(folder):
            try:
                entry = json.loads(entry_file.read_text())
            except (OSError, ValueError):
                entry = {}
            if entry.get("entry_hash") == eh:
                progress(f"[zoo] {name}: reusing finished teacher")
                entry.pop("entry_hash", None)
                entry["path"] = str(folder.resolve())
                entry["model"] = LOCAL_DIR + entry["path"]
                teachers.append(entry)
                continue

        image_size = spec["model_cfg"]["vision_cfg"].get("image_size", 224)
        train_px, _ = pixels_for(_eval_transform(spec["preprocess_cfg"], image_size))
        progress(f"[zoo] training {name} ({spec['epochs']} epochs on {len(train_px)} images)")
        t0, c0 = time.time(), _cpu_seconds()
        model, final_loss = train_teacher(spec, train_px, y_pub, device=device, progress=progress)
        train_seconds, train_cpu = time.time() - t0, _cpu_seconds() - c0

        tmp = out / f".{name}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        save_local_dir(model, spec["model_cfg"], tmp, spec["preprocess_cfg"])
        del model
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)

        # Score through exactly the code path participants use.
        t1 = time.time()
        loaded, preprocess, dim = load_model(LOCAL_DIR + str(folder), device=device)
        pub_px, test_px = pixels_for(preprocess)
        f_pub = embed_tensors(loaded, pub_px)
        f_test = embed_tensors(loaded, test_px)
        acc = linear_probe(f_pub, y_pub, f_test, y_test, epochs=probe_epochs, seed=0)
        uni = uniformity(f_pub[uni_idx])
        eval_seconds = time.time() - t1
        path = str(folder.resolve())
        entry = {"name": name, "path": path, "model": LOCAL_DIR + path, "embed_dim": int(dim),
                 "probe_accuracy": round(float(acc), 6), "uniformity": round(float(uni), 6),
                 "train_seconds": round(train_seconds, 2), "train_cpu_seconds": round(train_cpu, 2),
                 "eval_seconds": round(eval_seconds, 2),
                 "final_loss": round(float(final_loss), 6), "spec": spec}
        write_json_atomic(entry_file, {**entry, "entry_hash": eh})
        teachers.append(entry)
        progress(f"[zoo] {name}: embed_dim {dim} probe {acc:.4f} uniformity {uni:.4f} "
                 f"train {train_seconds:.1f}s eval {eval_seconds:.1f}s")
    progress(f"[zoo] built {len(teachers)} teachers in {time.time() - t_start:.1f}s")
    return teachers
