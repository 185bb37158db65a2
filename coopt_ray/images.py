"""Pixels without torch: decode, encode, resize, arrays -> RGB, and the student's pixel normalisation constants.

Ray Data's decode and split tasks import only this (numpy and PIL), so their worker processes start without
importing torch; the tensor side (normalisation, augmentation) is augment.py."""
from __future__ import annotations

import io

import numpy as np

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
