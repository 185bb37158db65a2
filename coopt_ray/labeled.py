"""Labeled images: folders with class subfolders or Parquet (image + label), and the named splits the evaluate
stage probes on and M-DATM distills from (the Fashion-MNIST splits by default)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from .data import fashion_mnist_split, folder_classes, label_for, list_image_files, load_fashion_mnist
from .images import arrays_to_rgb, decode_image, resize_rgb


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


def distill_splits(cfg) -> dict:
    """M-DATM's labeled train set (``distill.labeled_path``, else the Fashion-MNIST train split, 60,000 images;
    ``distill.labeled_limit`` takes a seeded random subset) and the scorer's test split (``eval.test_path``,
    else Fashion-MNIST's t10k; ``eval.test_limit`` trims it). Images uint8 (N, S, S, 3) at data.image_size."""
    d, e, size = cfg.distill, cfg.eval, cfg.data.image_size
    if d.labeled_path:
        x, y, classes = load_labeled(d.labeled_path, size, d.labeled_limit, cfg.seed)
        names = _label_names(y, classes)
        present = set(names)
        classes = [c for c in classes if c in present]  # M-DATM's labels are 0..K-1 over the classes present
        index = {c: i for i, c in enumerate(classes)}
        y = np.asarray([index[n] for n in names], dtype=np.int64)
        train_desc = f"{d.labeled_path} ({len(y)} images)"
    elif cfg.data.source == "fashion-mnist":
        x, y = load_fashion_mnist("train", cfg.data.path)
        take = _seeded_take(len(y), d.labeled_limit, cfg.seed, shuffle=d.labeled_limit is not None)
        x, y, classes = arrays_to_rgb(x[take], size), y[take], [str(c) for c in range(10)]
        train_desc = f"Fashion-MNIST train ({len(y)} of 60000 images)"
    else:
        raise EvalSkipped(f"distill.method mdatm needs labeled images: data.source={cfg.data.source} has none, so "
                          "set distill.labeled_path to a folder with one subfolder per class (or Parquet with "
                          "image and label columns)")
    if e.test_path:
        tx, ty, tclasses = load_labeled(e.test_path, size, e.test_limit, cfg.seed + 1)
        tnames = _label_names(ty, tclasses)
        unknown = sorted(set(tnames) - set(classes))
        if unknown:
            raise EvalSkipped(f"eval.test_path {e.test_path} has classes the labeled images lack: {unknown[:5]}")
        index = {c: i for i, c in enumerate(classes)}
        ty = np.asarray([index[n] for n in tnames], dtype=np.int64)
        test_desc = f"{e.test_path} ({len(ty)} images)"
    elif cfg.data.source == "fashion-mnist" and not d.labeled_path:
        tx, ty = fashion_mnist_split("test", cfg.data.path)
        tx, ty = arrays_to_rgb(tx[: e.test_limit], size), ty[: e.test_limit]
        test_desc = f"Fashion-MNIST t10k[0:{len(ty)}]"
    else:
        raise EvalSkipped("distill.labeled_path is set: set eval.test_path to its labeled test split as well")
    return {"train": (x, y), "test": (tx, ty), "classes": classes,
            "description": f"train {train_desc}, test {test_desc}"}


def _label_names(y: np.ndarray, classes: list) -> list:
    """Each label's class name: a class folder's name (labels index ``classes``), or for Parquet, whose
    ``classes`` are its label values as strings, the value itself."""
    values = [str(v) for v in sorted(set(y.tolist()))]
    return [str(v) for v in y.tolist()] if classes == values else [classes[v] for v in y.tolist()]
