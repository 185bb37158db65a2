"""Pixels without torch: decode, encode, resize, arrays -> RGB, open_clip's eval resize and crop, and the student's
pixel normalisation constants.

Ray Data's decode and split tasks import only this (numpy and PIL), so their worker processes start without
importing torch or open_clip; the tensor side (normalisation, augmentation) is augment.py."""
from __future__ import annotations

import io

import numpy as np

PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}  # transformers'
PIXEL_MEAN = (0.5, 0.5, 0.5)
PIXEL_STD = (0.5, 0.5, 0.5)


# ---------------------------------------------------------------- decoding and resizing
def decode_image(data: bytes) -> "PIL.Image.Image":  # noqa: F821
    """Decode encoded image bytes to an RGB PIL image; raise ValueError with a reason."""
    from PIL import Image, UnidentifiedImageError

    if data is None or len(data) == 0:
        raise ValueError("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        img.draft("RGB", (512, 512))  # JPEG: decode huge images at reduced size
        img.load()
    except UnidentifiedImageError:
        raise ValueError("not a recognised image format") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"unreadable image: {e}") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        img = Image.fromarray(a.astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    return img.convert("RGB")


def encode_png(arr: np.ndarray) -> bytes:
    """PNG bytes of a uint8 HxW or HxWx3 array."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


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


# ---------------------------------------------------------------- open_clip's eval transform, in PIL alone
def _resize(img, hw, interp):
    """torchvision's ``F.resize`` of a PIL image to ``[h, w]``: unchanged when already that size."""
    return img if (img.height, img.width) == tuple(hw) else img.resize((hw[1], hw[0]), interp)


def _shortest_edge(img, s: int) -> list:
    """torchvision's ``Resize(s)`` output size: the shorter edge to ``s``, the longer one in proportion (truncated)."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(s * long / short)
    return [new_long, s] if w <= h else [s, new_long]


def _keep_ratio(img, hw, longest: float) -> list:
    """open_clip's ``ResizeKeepRatio`` output size (its random scale and aspect off, as in eval)."""
    h, w = img.height, img.width
    rh, rw = h / hw[0], w / hw[1]
    ratio = max(rh, rw) * longest + min(rh, rw) * (1.0 - longest)
    return [round(h / ratio), round(w / ratio)]


def _crop_or_pad(img, hw, fill: int):
    """torchvision's ``center_crop`` (``fill`` 0) and open_clip's ``center_crop_or_pad``: pad to at least ``hw``
    with ``fill``, then crop the centre."""
    from PIL import ImageOps

    (ch, cw), (h, w) = hw, (img.height, img.width)
    if cw > w or ch > h:
        border = ((cw - w) // 2 if cw > w else 0, (ch - h) // 2 if ch > h else 0,
                  (cw - w + 1) // 2 if cw > w else 0, (ch - h + 1) // 2 if ch > h else 0)
        img = ImageOps.expand(img, border=border, fill=(fill,) * len(img.getbands()))
        if (img.height, img.width) == (ch, cw):
            return img
    top, left = int(round((img.height - ch) / 2.0)), int(round((img.width - cw) / 2.0))
    return img.crop((left, top, left + cw, top + ch))


def open_clip_eval_steps(size, resize_mode: str = "shortest", interpolation: str = "bicubic", fill_color: int = 0):
    """PIL image -> PIL image at ``size`` ([h, w]), as open_clip's ``image_transform(size, is_train=False, ...)``
    resizes, crops and converts it before its ToTensor (open_clip 3.3: ``longest`` keeps the ratio and pads with
    ``fill_color``; ``squash`` stretches; ``shortest`` resizes the shorter edge, with bicubic for a non-square
    size whatever ``interpolation`` says, then crops the centre). tests/test_embed_stage.py checks it against
    open_clip's own transform, pixel for pixel."""
    from PIL import Image

    hw = [int(size[0]), int(size[1])]
    interp = Image.BILINEAR if interpolation == "bilinear" else Image.BICUBIC
    if resize_mode not in ("shortest", "longest", "squash"):
        raise ValueError(f"resize_mode must be shortest, longest or squash, got {resize_mode!r}")

    def run(img):
        if resize_mode == "longest":
            img = _crop_or_pad(_resize(img, _keep_ratio(img, hw, 1.0), interp), hw, fill_color)
        elif resize_mode == "squash":
            img = _resize(img, hw, interp)
        elif hw[0] == hw[1]:
            img = _crop_or_pad(_resize(img, _shortest_edge(img, hw[0]), interp), hw, 0)
        else:
            img = _crop_or_pad(_resize(img, _keep_ratio(img, hw, 0.0), Image.BICUBIC), hw, 0)
        return img.convert("RGB")

    return run


# ---------------------------------------------------------------- a transformers image processor's PIL path
def hf_pil_steps(p: dict):
    """PIL image -> PIL image at ``p['size']``, as the PIL image processor resizes and centre-crops."""
    resample = {v: k for k, v in PIL_RESAMPLE.items()}[p["interpolation"]]
    ch, cw = p["size"]

    def run(img):
        if p["resize_mode"] == "squash":
            h, w = p["resize"]
        else:  # shortest edge to p["resize"], the long edge int(s * long / short) (transformers' rule)
            W, H = img.size
            s, short, long_ = p["resize"], min(W, H), max(W, H)
            h, w = (int(s * long_ / short), s) if W <= H else (s, int(s * long_ / short))
        if img.size != (w, h):
            img = img.resize((w, h), resample=resample)
        if (h, w) != (ch, cw):
            top, left = (h - ch) // 2, (w - cw) // 2
            img = img.crop((left, top, left + cw, top + ch))
        return img

    return run
