"""Participant input pipeline as data: the model's preprocessing read from its config (no weights loaded), the CPU
decode stage (encoded bytes -> fixed-shape uint8 NHWC at the model's input size) and the normalisation the embedder
runs on its device. Together they equal the model's own preprocess (open_clip's transform, the student's, timm's
create_transform, or a transformers image processor's PIL path: families.py)."""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from .images import PIXEL_MEAN, PIXEL_STD, decode_image, hf_pil_steps, open_clip_eval_steps, resize_rgb

if TYPE_CHECKING:  # the decode stage's workers never import torch; the functions that normalise import it
    import torch

PIXELS = "pixels"  # the decode stage's column: uint8 (N, H, W, 3), zeros on error rows


def _plain(family: str, cfg: dict) -> dict:
    size = cfg["size"]
    h, w = (size, size) if isinstance(size, int) else (size[0], size[1])
    mean, std = cfg["mean"], cfg["std"]
    mean = [float(mean)] * 3 if not isinstance(mean, (list, tuple)) else [float(v) for v in mean]
    std = [float(std)] * 3 if not isinstance(std, (list, tuple)) else [float(v) for v in std]
    interp = "bilinear" if cfg.get("interpolation") == "bilinear" else "bicubic"  # open_clip: anything else bicubic
    return {"family": family, "size": [int(h), int(w)], "resize_mode": cfg.get("resize_mode") or "shortest",
            "interpolation": interp, "mean": mean, "std": std, "fill_color": int(cfg.get("fill_color") or 0)}


def preprocess_params(model: str, pretrained: Optional[str] = None) -> dict:
    """The preprocessing ``load_model(model, pretrained)`` returns, as a plain dict, without loading weights:
    ``{family, size: [h, w], resize_mode, interpolation, mean, std, fill_color}``. open_clip models follow
    open_clip's own resolution (defaults, then the folder's or hub config's ``preprocess_cfg`` or the pretrained
    tag's, size from the model config's ``vision_cfg.image_size``); ``student:`` runs their training input path;
    ``timm:`` models timm's resolve_data_config of the name's pretrained config (plus ``crop_pct``), ``hf:`` models
    their image processor's settings (preprocessor_config.json, plus ``resize``)."""
    from .families import HF, TIMM, hf_params, timm_params
    from .models import LOCAL_DIR, STUDENT

    if model.startswith(TIMM):
        return timm_params(model, pretrained)
    if model.startswith(HF):
        return hf_params(model)
    if model.startswith(STUDENT):
        from .student import METRICS, student_folder

        s = int(json.loads((student_folder(model[len(STUDENT):]) / METRICS).read_text())["image_size"])
        return _plain("student", {"size": s, "resize_mode": "squash", "interpolation": "bilinear",
                                  "mean": list(PIXEL_MEAN), "std": list(PIXEL_STD)})
    if model.startswith(LOCAL_DIR):  # the folder's config file: the driver need not import open_clip (~3.5 s)
        full = json.loads((Path(model[len(LOCAL_DIR):]) / "open_clip_config.json").read_text())
    elif model.startswith("hf-hub:"):
        from open_clip.factory import _get_hf_config  # the config file only (open_clip's own lookup)

        full = _get_hf_config(model[len("hf-hub:"):])
    else:
        import open_clip

        name = model.replace("/", "-")
        full = {"model_cfg": open_clip.get_model_config(name) or {},
                "preprocess_cfg": open_clip.get_pretrained_cfg(name, pretrained) if pretrained else {}}
    cfg = open_clip_preprocess_cfg(full.get("preprocess_cfg"))
    cfg["size"] = (full.get("model_cfg", full).get("vision_cfg") or {}).get("image_size", 224)
    return _plain("open_clip", cfg)


# open_clip's PreprocessCfg defaults (open_clip/transform.py; the mean and std are its OPENAI_DATASET_MEAN/STD), so
# a local-dir: folder's preprocessing resolves without importing open_clip, whose import pulls in torchvision and
# transformers. tests/test_embed_stage.py checks this copy and the merge against open_clip's own.
OPEN_CLIP_PREPROCESS = {"size": 224, "mode": "RGB", "mean": (0.48145466, 0.4578275, 0.40821073),
                        "std": (0.26862954, 0.26130258, 0.27577711), "interpolation": "bicubic",
                        "resize_mode": "shortest", "fill_color": 0}


def open_clip_preprocess_cfg(overlay: Optional[dict]) -> dict:
    """open_clip's ``merge_preprocess_dict(PreprocessCfg(), overlay)``: the defaults, then the overlay's known keys
    that are not None."""
    out = dict(OPEN_CLIP_PREPROCESS)
    out.update({k: v for k, v in (overlay or {}).items() if k in out and v is not None})
    return out


def params_of_loaded(model) -> Optional[dict]:
    """The same dict from a loaded model (what its preprocess really uses): open_clip's, or a timm:/hf: model's
    (families.FamilyEncoder.loaded_params); None for students."""
    import open_clip

    if isinstance(getattr(model, "loaded_params", None), dict):
        return model.loaded_params
    if not hasattr(model, "visual"):
        return None
    return _plain("open_clip", open_clip.get_model_preprocess_cfg(model))


@functools.lru_cache(maxsize=8)
def _pil_steps(key: str):
    """PIL image -> PIL/array at the model's input size: the model's eval transform up to (not including) its
    ToTensor, so the pixels are exactly the ones it would normalise. open_clip's, transformers' and the student's
    run on PIL alone (images.py: a decode task imports neither torch nor the model's library); timm's comes from
    families.py, which imports torch and timm."""
    p = json.loads(key)
    if p["family"] == "student":
        size = p["size"][0]
        return lambda img: resize_rgb(img, size)
    if p["family"] == "hf":
        return hf_pil_steps(p)
    if p["family"] != "timm":  # open_clip's eval transform, without importing torch or open_clip
        return open_clip_eval_steps(p["size"], p["resize_mode"], p["interpolation"], p["fill_color"])
    from .families import timm_transform

    steps = []
    for t in timm_transform(p).transforms:
        if type(t).__name__ in ("MaybeToTensor", "ToTensor"):
            break
        steps.append(t)
    else:
        raise RuntimeError(f"timm's eval transform has no ToTensor step: {p}")

    def run(img):
        for t in steps:
            img = t(img)
        return img

    return run


def pixel_fn(params: dict):
    """Decoded RGB PIL image -> uint8 (H, W, 3) at the model's input size."""
    steps = _pil_steps(json.dumps(params, sort_keys=True))
    h, w = params["size"]

    def to_pixels(img) -> np.ndarray:
        a = np.asarray(steps(img), dtype=np.uint8)
        if a.shape != (h, w, 3):  # a bug, not a bad image: fail loudly
            raise RuntimeError(f"preprocessing gave shape {a.shape}, expected {(h, w, 3)}")
        return a

    return to_pixels


def decode_batch(batch: dict, params: dict) -> dict:
    """The decode stage (a Ray Data ``map_batches`` task, numpy batches): encoded image bytes -> ``pixels``
    uint8 (N, H, W, 3) at the model's input size. An unreadable image (or a file that could not be read:
    ``read_error``) becomes an error row with its reason in ``error`` and zero pixels, never a failed batch;
    anything else (a bug, MemoryError) fails the batch loudly. Every row flows on; images not owned by this
    participant are emptied (only the owner's copy reaches the optimized set)."""
    n = len(batch["id"])
    errors = [str(e) for e in batch["read_error"]] if "read_error" in batch else [""] * n
    h, w = params["size"]
    pixels = np.zeros((n, h, w, 3), dtype=np.uint8)
    to_pixels = pixel_fn(params)
    for i, data in enumerate(batch["image"]):
        if errors[i]:  # the file could not be read (image folders)
            continue
        try:
            img = decode_image(data)
        except ValueError as e:  # an unreadable image is an error row with its reason, never a failed batch
            errors[i] = str(e)
            continue
        pixels[i] = to_pixels(img)
    owned = batch["owned"]
    image = np.array([b if o else b"" for b, o in zip(batch["image"], owned)], dtype=object)
    return {"id": batch["id"], PIXELS: pixels, "error": np.array(errors, dtype=object), "is_shared": batch["is_shared"],
            "owned": owned, "image": image, "label": batch["label"]}


def norm_tensors(params: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) as float32 (1, 3, 1, 1) tensors on ``device``."""
    import torch

    mean = torch.tensor(params["mean"], dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(params["std"], dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return mean, std


def to_model_input(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC (on the model's device) -> float32 NCHW, normalised as open_clip's ToTensor + Normalize do
    (x / 255, then (x - mean) / std, in float32: the same operations, so the same numbers)."""
    from .augment import to_float_nchw

    return to_float_nchw(pixels).sub_(mean).div_(std)
