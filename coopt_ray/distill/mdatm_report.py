"""RUN/distilled/mdatm/report.html: the synthetic images per class (one row each), the matching loss curve and
the scorer's accuracy."""
from __future__ import annotations

import html
import os
from pathlib import Path

import numpy as np


def class_grid(images: np.ndarray, labels: np.ndarray, classes: list, cell: int = 3) -> np.ndarray:
    """uint8 RGB mosaic: one row per class, its images left to right, a 1-pixel white gap, ``cell``x upscaled."""
    rgb = images if images.ndim == 4 else np.repeat(images[..., None], 3, axis=-1)
    s = rgb.shape[1]
    per = max(int((labels == c).sum()) for c in range(len(classes)))
    grid = np.full((len(classes) * (s + 1) + 1, per * (s + 1) + 1, 3), 255, np.uint8)
    for c in range(len(classes)):
        for j, i in enumerate(np.flatnonzero(labels == c)):
            grid[1 + c * (s + 1):1 + c * (s + 1) + s, 1 + j * (s + 1):1 + j * (s + 1) + s] = rgb[i]
    return grid.repeat(cell, 0).repeat(cell, 1)


def write_report(out: Path, images: np.ndarray, labels: np.ndarray, classes: list, result: dict) -> Path:
    """Write images.png, loss.png and report.html under ``out``; return the page's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    Image.fromarray(class_grid(images, labels, classes)).save(out / "images.png")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if result["loss"]:
        ax.plot(result["loss_steps"], result["loss"], lw=0.6, alpha=0.5, label="iteration")
        w = max(1, len(result["loss"]) // 20)
        smooth = np.convolve(result["loss"], np.ones(w) / w, mode="valid")
        ax.plot(result["loss_steps"][w - 1:], smooth, lw=1.5, label=f"mean of {w}")
        ax.legend()
    ax.set_xlabel("iteration")
    ax.set_ylabel("normalised matching loss")
    ax.set_title("M-DATM matching")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)
    e = html.escape
    acc = (f"{100 * result['accuracy']:.2f} % ± {100 * result['accuracy_std']:.2f} over {len(result['scores'])} "
           "scorer runs" if result["scores"] else "not scored (distill.eval_runs: 0)")
    rows = "".join(f"<tr><td>{i}</td><td>{e(str(c))}</td></tr>" for i, c in enumerate(classes))
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>M-DATM distilled set</title><style>"
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}td{padding:0 1em}</style></head><body>"
        f"<h1>M-DATM: {result['size']} images, {result['ipc']} per class</h1>"
        f"<p>From {e(result['source'])}. {len(result['experts'])} experts x {result['expert_epochs']} epochs, "
        f"{len(result['loss'])} matching iterations; learned step size {result['syn_lr']:.5f}. "
        f"Test accuracy of a fresh ConvNet-3 trained on these images: {acc}. "
        f"Wall time {result['seconds']:.0f} s (experts {result['expert_seconds']:.0f} s, matching "
        f"{result['matching_seconds']:.0f} s, scorer {result['score_seconds']:.0f} s).</p>"
        "<h2>Synthetic images, one row per class</h2><img src='images.png' style='image-rendering:pixelated'>"
        f"<table><tr><th>row / label</th><th>class</th></tr>{rows}</table>"
        "<h2>Matching loss</h2><img src='loss.png'></body></html>\n")
    path = out / "report.html"
    tmp = path.with_name("report.html.tmp")
    tmp.write_text(page)
    os.replace(tmp, path)
    return path
