"""Exporting a trained student (`coopt export`): its backbone as timm-loadable safetensors + config.json, or ONNX.

``--format timm`` writes ``DIR/model.safetensors`` (the backbone's state dict, timm's own key names) and
``DIR/config.json`` in timm's layout (``architecture``, ``model_args``, ``pretrained_cfg`` with the student's
input size and normalisation), plus a ``coopt`` key recording the small-image stem change. Students at
``image_size <= 64`` with a ResNet stem have a 3x3 stride-1 ``conv1`` and no max-pool (student.adapt_stem), which
no ``timm.create_model`` argument builds. So:

- :func:`load_timm_backbone` (``create_model`` + the recorded stem change + a strict load) loads every export;
- ``timm.create_model(arch, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=..., num_classes=0),
  pretrained_filter_fn=stem_filter)`` loads it too: :func:`stem_filter` makes the stem change before timm loads;
- without ``pretrained_filter_fn`` plain timm builds its ImageNet stem. With ``num_classes=0`` in the overlay the
  load is strict and fails on the stem's keys; without it timm loads non-strictly and only logs a warning, with
  the stem left random. Exports without a stem change (larger images, ViTs) load through plain timm as they are.

``--format onnx`` writes ``DIR/model.onnx`` (the backbone, or with ``--with-head`` backbone + head) with a dynamic
batch axis, through torch's dynamo exporter (``torch.onnx.export(dynamo=True)``, needs onnx + onnxscript: the
``export`` extra), and ``DIR/onnx.json`` naming the input, output and preprocessing.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

from .images import PIXEL_MEAN, PIXEL_STD
from .student import adapt_stem, load_student

FORMATS = ("timm", "onnx")
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
ONNX_FILE = "model.onnx"
ONNX_META = "onnx.json"
INPUT_NAME = "pixel_values"


class ExportError(ValueError):
    """A bad export request (no trained student, unknown format, missing package): one line, exit code 2."""


# ---------------------------------------------------------------- the stem
def stem_change(backbone: torch.nn.Module) -> dict:
    """What :func:`coopt_ray.student.adapt_stem` did to ``backbone``: ``{"changed": False}``, or the new ``conv1``
    (3x3, stride 1, padding 1, no bias) and the max-pool replaced by ``Identity``."""
    conv1, pool = getattr(backbone, "conv1", None), getattr(backbone, "maxpool", None)
    if (isinstance(conv1, torch.nn.Conv2d) and conv1.kernel_size == (3, 3) and conv1.stride == (1, 1)
            and isinstance(pool, torch.nn.Identity)):
        return {"changed": True, "conv1": {"in_channels": conv1.in_channels, "out_channels": conv1.out_channels,
                                           "kernel_size": 3, "stride": 1, "padding": 1, "bias": False},
                "maxpool": "Identity", "made_by": "coopt_ray.student.adapt_stem"}
    return {"changed": False}


def stem_filter(state_dict: dict, model: torch.nn.Module) -> dict:
    """A timm ``pretrained_filter_fn``: when the weights hold a 3x3 ``conv1.weight`` that the freshly built model
    does not have (the small-image stem), make the same stem change on ``model`` before timm loads them. Leaves
    everything else alone, so it is safe for every export."""
    w = state_dict.get("conv1.weight")
    have = model.state_dict().get("conv1.weight")
    if w is not None and tuple(w.shape[-2:]) == (3, 3) and (have is None or have.shape != w.shape):
        adapt_stem(model, in_chans=int(w.shape[1]))
    return state_dict


# ---------------------------------------------------------------- timm
def timm_config(backbone: torch.nn.Module, meta: dict) -> dict:
    """config.json in timm's layout for ``backbone`` (read by ``timm.create_model("local-dir:DIR")``), with the
    student's input size and normalisation and a ``coopt`` key recording the stem change."""
    size, stem = int(meta["image_size"]), stem_change(backbone)
    src = dict(getattr(backbone, "pretrained_cfg", None) or {})
    args = {k: v for k, v in (getattr(backbone, "_model_args", None) or {}).items() if _jsonable(v)}
    args.setdefault("num_classes", 0)
    pretrained_cfg = {
        "input_size": [int(args.get("in_chans", 3)), size, size],
        "fixed_input_size": bool(src.get("fixed_input_size", False)),
        "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",   # images.resize_rgb: a plain resize
        "mean": list(PIXEL_MEAN), "std": list(PIXEL_STD), "num_classes": 0,
        "first_conv": "conv1" if stem["changed"] else src.get("first_conv"),
        "classifier": src.get("classifier"),
        "description": f"coopt_ray student backbone ({meta['arch']}, {size} px)",
    }
    return {
        "architecture": meta["arch"],
        "num_classes": 0,
        "num_features": int(_width(backbone, size)),
        "model_args": args,
        "pretrained_cfg": {k: v for k, v in pretrained_cfg.items() if v is not None},
        "coopt": {"stem": stem, "image_size": size, "head_dim": int(meta["head_dim"]),
                  "load": "coopt_ray.export.load_timm_backbone(DIR)"},
    }


def export_timm(backbone: torch.nn.Module, meta: dict, out: Path) -> list[Path]:
    """Write ``out/model.safetensors`` and ``out/config.json`` for ``backbone``; returns the two paths."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in backbone.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / WEIGHTS_FILE).chmod(0o644)  # safetensors writes it owner-only; an export is meant to be shared
    (out / CONFIG_FILE).write_text(json.dumps(timm_config(backbone, meta), indent=2) + "\n")
    return [out / WEIGHTS_FILE, out / CONFIG_FILE]


def load_timm_backbone(path: str | os.PathLike, num_classes: Optional[int] = None) -> torch.nn.Module:
    """A ``coopt export --format timm`` folder as a timm model (eval mode): ``timm.create_model`` with the
    recorded ``model_args``, the recorded stem change, then a strict load of ``model.safetensors``. Its forward
    returns the pooled features, or with ``num_classes`` a fresh linear classifier's logits (``reset_classifier``)
    to fine-tune. ``model.pretrained_cfg`` holds the student's input size and normalisation, so
    ``timm.data.resolve_data_config(model=model)`` gives its preprocessing."""
    import timm
    from safetensors.torch import load_file

    from .convnet import register_convnets

    d = Path(path)
    cfg = json.loads((d / CONFIG_FILE).read_text())
    register_convnets()  # students of the distillation ConvNet (convnet3_w*) are coopt_ray's own timm models
    args = dict(cfg.get("model_args") or {})
    model = timm.create_model(cfg["architecture"], pretrained=False, **args)
    stem = (cfg.get("coopt") or {}).get("stem") or {}
    if stem.get("changed") and not adapt_stem(model, int(args.get("in_chans", 3))):
        raise ValueError(f"{d / CONFIG_FILE} records a stem change that {cfg['architecture']} does not take")
    model.load_state_dict(load_file(str(d / WEIGHTS_FILE)), strict=True)
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.get("pretrained_cfg", {}).items()}
    model.pretrained_cfg = {**(getattr(model, "pretrained_cfg", None) or {}), **saved}
    if num_classes:
        if hasattr(model, "reset_classifier"):
            model.reset_classifier(int(num_classes))
        else:  # the distillation ConvNet: its forward ends in ``head``
            model.head = torch.nn.Linear(int(cfg["num_features"]), int(num_classes))
    return model.eval()


# ---------------------------------------------------------------- onnx
def export_onnx(net: torch.nn.Module, meta: dict, out: Path, with_head: bool,
                opset: Optional[int] = None) -> list[Path]:
    """Write ``out/model.onnx`` (``net``: the backbone, or the whole student) with a dynamic batch axis, and
    ``out/onnx.json``; returns the two paths. The dynamo exporter traces at batch 2 (batch 1 would specialise)."""
    for mod in ("onnx", "onnxscript"):
        try:
            __import__(mod)
        except ImportError:
            raise ExportError(f"--format onnx needs the '{mod}' package: pip install 'coopt_ray[export]'") from None
    import warnings

    out.mkdir(parents=True, exist_ok=True)
    size, chans = int(meta["image_size"]), 3
    net = net.eval()
    x = torch.zeros(2, chans, size, size)
    output = "embedding" if with_head else "features"
    with torch.no_grad():
        width = int(net(x).shape[-1])
    big = sum(p.numel() * p.element_size() for p in net.state_dict().values()) > 1.5 * 2 ** 30  # protobuf's 2 GiB
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(net, (x,), input_names=[INPUT_NAME], output_names=[output], opset_version=opset,
                                 dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, verbose=False,
                                 external_data=big)
    prog.save(str(out / ONNX_FILE), external_data=big)
    info = {"arch": meta["arch"], "with_head": bool(with_head), "input": INPUT_NAME,
            "input_shape": ["batch", chans, size, size], "output": output, "output_shape": ["batch", width],
            "preprocess": {"resize": [size, size], "interpolation": "bilinear", "scale": "pixels / 255",
                           "mean": list(PIXEL_MEAN), "std": list(PIXEL_STD)},
            "stem": stem_change(net.backbone if with_head else net), "exporter": "torch.onnx.export(dynamo=True)",
            "torch": torch.__version__}
    (out / ONNX_META).write_text(json.dumps(info, indent=2) + "\n")
    return [out / ONNX_FILE, out / ONNX_META]


# ---------------------------------------------------------------- the command
def export_student(run: str | os.PathLike, out: str | os.PathLike, fmt: str, with_head: bool = False) -> list[Path]:
    """``coopt export``: the trained student of ``run`` (a RUN folder or its student/ folder) into ``out`` in
    ``fmt`` (``timm`` or ``onnx``). Bad requests raise :class:`ExportError` with one line. Returns the files."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if with_head and fmt != "onnx":
        raise ExportError("--with-head applies to --format onnx; the timm export is the backbone "
                          "(load_timm_backbone(DIR, num_classes=N) adds a fresh head)")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file, not a folder")
    try:
        student, meta = load_student(run)
    except ValueError as e:
        raise ExportError(str(e).splitlines()[0]) from None
    except Exception as e:  # a truncated or foreign student.pt: torch's errors are many-lined and many-typed
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise ExportError(f"cannot load the student of {run}: {first[:200]}") from None
    if fmt == "timm":
        return export_timm(student.backbone, meta, out)
    return export_onnx(student if with_head else student.backbone, meta, out, with_head)


def _width(model: torch.nn.Module, size: int) -> int:
    w = getattr(model, "feature_width", None)
    if w is None:
        from .student import output_width

        w = output_width(model, size)
    return int(w)


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False
