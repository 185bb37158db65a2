"""Participant model loading: open_clip (hub tags, checkpoint files, ``local-dir:``), trained students
(``student:RUN``), ``timm:`` and ``hf:`` models (families.py); the device is the caller's (devices.py holds the
rules)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

from .families import (ModelSpecError, PoolError, check_hf, check_timm, check_weights_file,  # noqa: F401
                       family_of, load_family)

LOCAL_DIR = "local-dir:"
STUDENT = "student:"         # student:RUN (or student:RUN/rounds/<r>): a trained coopt student as a participant
WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def check_model_spec(model: str, pretrained: Optional[str] = None, pool: str = "auto") -> None:
    """Cheap offline checks that ``model``/``pretrained`` (and ``pool``) name something loadable; raise
    ModelSpecError (PoolError for a pool the model cannot give). Whether hub weights can be had is hub.py's."""
    family = family_of(model)
    if family is not None:
        return (check_timm if family == "timm" else check_hf)(model, pretrained, pool)
    import open_clip

    if model.startswith(STUDENT):
        from .student import WEIGHTS, student_folder

        try:
            check_weights_file(student_folder(model[len(STUDENT):]) / WEIGHTS)
        except ValueError as e:
            raise ModelSpecError(str(e)) from None
        return
    if model.startswith(LOCAL_DIR):
        d = Path(model[len(LOCAL_DIR):])
        if not d.is_dir():
            raise ModelSpecError(f"model folder not found: {d} (build the zoo with: coopt zoo build)")
        if not (d / "open_clip_config.json").is_file():
            raise ModelSpecError(f"{d} has no open_clip_config.json")
        if not any(d.glob("*.safetensors")) and not any(d.glob("*.bin")) and not any(d.glob("*.pth")):
            raise ModelSpecError(f"{d} has no weights file (*.safetensors, *.bin or *.pth)")
        for f in sorted(d.glob("*.bin")) + sorted(d.glob("*.pt")) + sorted(d.glob("*.pth")):
            check_weights_file(f)
        return
    if model.startswith("hf-hub:"):
        return  # resolved by open_clip at load time (needs internet)
    if model.replace("/", "-") not in open_clip.list_models():
        raise ModelSpecError(f"unknown open_clip architecture {model!r}")
    if pretrained is None:
        return
    if open_clip.is_pretrained_cfg(model, pretrained):
        return
    if os.path.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
        if not Path(pretrained).is_file():
            raise ModelSpecError(f"checkpoint file not found: {pretrained}")
        check_weights_file(Path(pretrained))
        return
    tags = open_clip.list_pretrained_tags_by_model(model)
    raise ModelSpecError(
        f"unknown pretrained tag {pretrained!r} for {model} (known: {', '.join(tags) or 'none'})"
    )


def load_model(model: str, pretrained: Optional[str] = None, device: str = "cpu", pool: str = "auto"):
    """Load a participant model for embedding onto ``device`` (the caller picks it by the device rules, devices.py):
    returns ``(model, preprocess, embed_dim)``; ``model.encode_image`` gives the embedding whatever the family
    (``pool`` picks it for timm:/hf: models, families.FamilyEncoder).

    Weights load with ``weights_only=True``; a checkpoint that holds pickled objects is refused.
    """
    device = str(device)
    if family_of(model) is not None:
        return load_family(model, pretrained, device, pool)
    import open_clip

    if model.startswith(STUDENT):  # a trained student: its head's output space, its own input path
        from .student import StudentEncoder, load_student, student_preprocess

        student, meta = load_student(model[len(STUDENT):])
        return (StudentEncoder(student).to(device).eval(), student_preprocess(int(meta["image_size"])),
                int(meta["head_dim"]))
    m, _, preprocess = open_clip.create_model_and_transforms(
        model, pretrained=pretrained, device=device, weights_only=True
    )
    m.eval()
    if hasattr(m, "transformer"):  # only the image tower is used for targets
        m.transformer = None
    size = preprocess.transforms[0].size if hasattr(preprocess.transforms[0], "size") else 224
    size = size if isinstance(size, int) else size[0]
    with torch.no_grad():
        dim = int(m.encode_image(torch.zeros(1, 3, size, size, device=device)).shape[-1])
    return m, preprocess, dim


def save_local_dir(model: torch.nn.Module, model_cfg: dict, out_dir: str | os.PathLike,
                   preprocess_cfg: Optional[dict] = None, extra: Optional[dict] = None) -> Path:
    """Save ``model`` as an open_clip ``local-dir:`` folder (config JSON + safetensors weights)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or {}}
    if extra:
        cfg.update(extra)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / "open_clip_model.safetensors"))
    (out / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))
    return out
