"""timm: and hf: participants (DESIGN.md §8): offline spec checks, each family's own preprocessing as a plain dict
(no weights loaded), PIL steps equal to it, and loading behind one ``encode_image`` module (FamilyEncoder), so
nothing downstream knows the family."""
from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Optional

import torch

from .config import POOLS  # noqa: F401  auto | cls | pooled | mean (validated there, per participant)
from .images import PIL_RESAMPLE, hf_pil_steps

TIMM = "timm:"       # timm:<name>[.<tag>], pretrained: a hub tag or a weights file (omitted: the name's default)
HF = "hf:"           # hf:<repo id or local folder> (transformers vision model + preprocessor_config.json)
HF_TYPES = ("vit", "dinov2", "clip", "clip_vision_model", "siglip", "siglip_vision_model")
HF_NO_CLS = ("siglip", "siglip_vision_model")   # no class token: pooled is the MAP head, mean the patch tokens
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
HF_FILES = ("config.json", "preprocessor_config.json")
HF_EXTRA = "pip install 'coopt_ray[hf]' (transformers==5.24.0)"


class ModelSpecError(ValueError):
    """A model string that cannot be loaded; the message says why."""


class PoolError(ModelSpecError):
    """A ``pool`` the model cannot give (preflight names ``participants[i].pool``)."""


def family_of(model: str) -> Optional[str]:
    """``"timm"`` or ``"hf"`` for those specs, None for open_clip and ``student:``."""
    return "timm" if model.startswith(TIMM) else "hf" if model.startswith(HF) else None


def is_weights_file(pretrained: Optional[str]) -> bool:
    return bool(pretrained) and (os.path.sep in pretrained or pretrained.endswith(
        (".pt", ".pth", ".bin", ".safetensors")))


def check_weights_file(path: Path) -> None:
    """Refuse a torch checkpoint that holds pickled objects besides weights (a static scan of its pickle, before
    any work starts; the load itself uses ``weights_only=True`` as well). Safetensors hold no code."""
    if path.suffix in (".safetensors", ".npz", ".npy"):
        return
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # not a zip-format torch checkpoint: the weights_only load decides
        return
    if unsafe:
        raise ModelSpecError(f"checkpoint {path} holds pickled objects, not only weights "
                             f"({', '.join(unsafe[:3])}); refused (weights load with weights_only=True)")


# ---------------------------------------------------------------- timm
def timm_names(model: str, pretrained: Optional[str]) -> tuple[str, str]:
    """``(arch, name to create)``: the name carries the hub tag (``arch.tag``) unless weights come from a file."""
    name = model[len(TIMM):]
    arch = name.split(".")[0]
    if pretrained and not is_weights_file(pretrained):
        if "." in name:
            raise ModelSpecError(f"{model} already names a tag; drop 'pretrained: {pretrained}' or the tag")
        name = f"{name}.{pretrained}"
    return arch, name


def _timm_cfg(model: str, pretrained: Optional[str]) -> dict:
    from timm.models import get_pretrained_cfg

    arch, name = timm_names(model, pretrained)
    cfg = get_pretrained_cfg(arch if is_weights_file(pretrained) else name)
    return cfg.to_dict() if cfg is not None else {}


def check_timm(model: str, pretrained: Optional[str], pool: str = "auto") -> None:
    import difflib

    import timm

    arch, name = timm_names(model, pretrained)
    if not arch or not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        raise ModelSpecError(f"unknown timm architecture {arch!r}"
                             + (f"; did you mean {', '.join(close)}?" if close else " (see timm.list_models())"))
    if is_weights_file(pretrained):
        if not Path(pretrained).is_file():
            raise ModelSpecError(f"weights file not found: {pretrained}")
        check_weights_file(Path(pretrained))
    elif name not in timm.list_pretrained(arch + ".*") if "." in name else not _timm_cfg(model, pretrained):
        tags = [t.split(".", 1)[1] for t in timm.list_pretrained(arch + ".*")]
        raise ModelSpecError(f"timm has no pretrained weights {name!r} (tags: {', '.join(tags) or 'none'}); "
                             "give 'pretrained:' a known tag or a weights file")
    if pool == "cls":
        try:
            with torch.device("meta"):  # the architecture only: no memory, no weights
                net = timm.create_model(arch, pretrained=False, num_classes=0)
        except Exception:  # noqa: BLE001 - an arch that cannot build on meta: the load decides
            return
        if getattr(net, "cls_token", None) is None:
            raise PoolError(f"pool: cls needs a class token and {arch} has none (use pooled or mean)")


def timm_plain(data: dict) -> dict:
    """timm's data config (resolve_data_config) as the plain preprocessing dict."""
    _, h, w = data["input_size"]
    return {"family": "timm", "size": [int(h), int(w)], "resize_mode": data.get("crop_mode") or "center",
            "interpolation": data.get("interpolation") or "bilinear", "crop_pct": float(data.get("crop_pct") or 0.875),
            "mean": [float(v) for v in data["mean"]], "std": [float(v) for v in data["std"]], "fill_color": 0}


def timm_params(model: str, pretrained: Optional[str]) -> dict:
    from timm.data import resolve_data_config

    return timm_plain(resolve_data_config({}, pretrained_cfg=_timm_cfg(model, pretrained)))


def timm_transform(p: dict):
    """timm's own eval transform (create_transform) for the dict's values."""
    from timm.data import create_transform

    return create_transform(input_size=(3, *p["size"]), interpolation=p["interpolation"], mean=tuple(p["mean"]),
                            std=tuple(p["std"]), crop_pct=p["crop_pct"], crop_mode=p["resize_mode"])


# ---------------------------------------------------------------- hf (transformers)
def hf_source(model: str) -> tuple[str, bool]:
    """``(repo id or folder, is_folder)``: an existing folder, or anything path-like, is a folder."""
    src = model[len(HF):]
    p = Path(src).expanduser()
    if p.is_dir() or src.startswith(("/", ".", "~")) or src.count("/") != 1:
        return str(p), True
    return src, False


def need_transformers() -> None:
    if importlib.util.find_spec("transformers") is None:
        raise ModelSpecError(f"hf: models need the transformers package: {HF_EXTRA}")


def check_hf(model: str, pretrained: Optional[str], pool: str = "auto") -> None:
    need_transformers()
    if pretrained:
        raise ModelSpecError(f"{model} takes its weights from the repo or folder; drop 'pretrained: {pretrained}'")
    src, folder = hf_source(model)
    if not folder:
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", src):
            raise ModelSpecError(f"{model}: not a hub repo id (org/name) nor an existing folder")
        return  # the hub check (preflight) decides whether it can be had
    d = Path(src)
    if not d.is_dir():
        raise ModelSpecError(f"model folder not found: {d}")
    for f in HF_FILES:
        if not (d / f).is_file():
            raise ModelSpecError(f"{d} has no {f}" + (" (save the image processor with save_pretrained)"
                                                      if f.startswith("pre") else ""))
    if not any((d / f).is_file() for f in HF_WEIGHTS):
        raise ModelSpecError(f"{d} has no weights ({', '.join(HF_WEIGHTS)})")
    for f in d.glob("*.bin"):
        check_weights_file(f)
    check_hf_type(json.loads((d / "config.json").read_text()).get("model_type"), model, pool)


def check_hf_type(model_type: Optional[str], model: str, pool: str) -> None:
    if model_type not in HF_TYPES:
        raise ModelSpecError(f"{model}: model_type {model_type!r} is not a supported vision model "
                             f"(supported: {', '.join(HF_TYPES)})")
    if pool == "cls" and model_type in HF_NO_CLS:
        raise PoolError(f"pool: cls needs a class token and {model_type} has none (use pooled or mean)")


def hf_processor(src: str):
    """The model's image processor, PIL backend (reads preprocessor_config.json only, never weights)."""
    need_transformers()
    from transformers import AutoImageProcessor
    from transformers.utils import logging

    logging.set_verbosity_error()
    return AutoImageProcessor.from_pretrained(src, backend="pil")


def hf_plain(d: dict, where: str = "hf") -> dict:
    """An image processor's settings (``to_dict()``) as the plain preprocessing dict; refuses what the decode
    stage cannot reproduce (no fixed input size, padding, a rescale other than 1/255)."""
    def bad(why):
        return ModelSpecError(f"{where}: its image processor {why}; the decode stage needs a fixed-size input")

    if not d.get("do_resize", True) or d.get("do_pad"):
        raise bad("does not resize to a fixed size" if not d.get("do_resize", True) else "pads")
    if d.get("do_rescale", True) is False or abs(float(d.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        raise bad("does not rescale by 1/255")
    size, crop = d.get("size") or {}, d.get("crop_size") or {}
    if "height" in size and "width" in size:
        mode, resize = "squash", [int(size["height"]), int(size["width"])]
        out = resize
    elif "shortest_edge" in size and d.get("do_center_crop"):
        mode, resize = "shortest", int(size["shortest_edge"])
        out = None
    else:
        raise bad(f"resizes by {size}")
    if d.get("do_center_crop"):
        out = [int(crop["height"]), int(crop["width"])]
    norm = d.get("do_normalize", True)
    return {"family": "hf", "size": out, "resize_mode": mode, "resize": resize,
            "interpolation": PIL_RESAMPLE.get(int(d.get("resample", 2)), "bilinear"),
            "mean": [float(v) for v in d["image_mean"]] if norm else [0.0] * 3,
            "std": [float(v) for v in d["image_std"]] if norm else [1.0] * 3, "fill_color": 0}


def hf_params(model: str) -> dict:
    src, _ = hf_source(model)
    return hf_plain(hf_processor(src).to_dict(), model)


# ---------------------------------------------------------------- loading
class FamilyEncoder(torch.nn.Module):
    """A timm or transformers model behind ``encode_image(x) -> (N, dim)``; ``pool`` picks the embedding:

    - timm: ``pooled`` (= ``auto``) is the model's own head pooling (``forward_head(pre_logits=True)``: the class
      token for most ViTs incl. DINOv2, the MAP head for SigLIP, the average for CNNs); ``cls`` the class token of
      ``forward_features``; ``mean`` the mean of its patch tokens (spatial mean for CNNs).
    - hf: ``pooled`` is ``pooler_output`` (``auto`` for dinov2, clip, siglip); ``cls`` is
      ``last_hidden_state[:, 0]`` (``auto`` for vit, whose pooler is often untrained); ``mean`` the patch tokens'
      mean.
    ``loaded_params`` is the preprocessing dict read from the loaded model (checked against the config's)."""

    def __init__(self, family: str, net: torch.nn.Module, pool: str, loaded_params: dict, prefix: int):
        super().__init__()
        self.family, self.net, self.pool, self.loaded_params, self.prefix = family, net, pool, loaded_params, prefix

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        if self.family == "timm":
            if self.pool in ("auto", "pooled"):
                return self.net(x)
            f = self.net.forward_features(x)
            if self.pool == "cls":
                return f[:, 0]
            if f.ndim == 4:
                return f.mean((1, 2) if getattr(self.net, "output_fmt", "NCHW") == "NHWC" else (2, 3))
            return f[:, self.prefix:].mean(1)
        out = self.net(pixel_values=x)
        if self.pool == "pooled":
            return out.pooler_output
        if self.pool == "cls":
            return out.last_hidden_state[:, 0]
        return out.last_hidden_state[:, self.prefix:].mean(1)


def hf_auto_pool(model_type: str) -> str:
    return "cls" if model_type == "vit" else "pooled"


def load_family(model: str, pretrained: Optional[str], device: str, pool: str = "auto"):
    """Load a timm: or hf: model onto ``device``: ``(FamilyEncoder, preprocess (PIL -> tensor), embed_dim)``."""
    if model.startswith(TIMM):
        import timm
        from timm.data import resolve_data_config

        check_timm(model, pretrained, pool)
        arch, name = timm_names(model, pretrained)
        if is_weights_file(pretrained):
            net = timm.create_model(arch, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=pretrained))
        else:
            net = timm.create_model(name, pretrained=True, num_classes=0)
        params = timm_plain(resolve_data_config({}, model=net))
        enc = FamilyEncoder("timm", net, pool, params, int(getattr(net, "num_prefix_tokens", 0) or 0))
        preprocess = timm_transform(params)
    else:
        need_transformers()
        from torchvision.transforms import functional as F
        from transformers import AutoConfig, AutoModel, CLIPVisionModel, SiglipVisionModel
        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()
        src, _ = hf_source(model)
        mtype = AutoConfig.from_pretrained(src).model_type
        check_hf_type(mtype, model, pool)
        cls = {"clip": CLIPVisionModel, "siglip": SiglipVisionModel}.get(mtype, AutoModel)
        net = cls.from_pretrained(src, dtype=torch.float32)
        params = hf_plain(hf_processor(src).to_dict(), model)
        pool = hf_auto_pool(mtype) if pool == "auto" else pool
        enc = FamilyEncoder("hf", net, pool, params, 0 if mtype in HF_NO_CLS else 1)
        steps = hf_pil_steps(params)

        def preprocess(img):
            return F.normalize(F.to_tensor(steps(img.convert("RGB"))), params["mean"], params["std"])
    enc = enc.to(device).eval()
    with torch.no_grad():
        dim = int(enc.encode_image(torch.zeros(1, 3, *enc.loaded_params["size"], device=device)).shape[-1])
    return enc, preprocess, dim
