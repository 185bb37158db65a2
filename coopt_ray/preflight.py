"""Checks that need data or models (paths, image counts, the shared subset's size, timm archs, checkpoints, whether
hub weights can be had), run before any Ray work so a bad config fails in seconds with one line naming the key."""
from __future__ import annotations

from pathlib import Path

from .config import DEFAULT_FASHION_MNIST_DIR, Config, ConfigError, resolve_model
from .data import count_images, shared_size
from .hub import hub_problem, predownload_hint
from .models import ModelSpecError, PoolError, check_model_spec


def check_student_arch(arch: str) -> None:
    """``student.arch`` must name a timm architecture (a pretrained tag suffix is allowed)."""
    import difflib

    import timm

    from .convnet import register_convnets

    register_convnets()
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else " (see timm.list_models())"
        raise ConfigError(f"'student.arch': unknown timm architecture {arch!r}{hint}")


def check_paths(cfg: Config, *, check_models: bool = True) -> None:
    """File-system checks: data path, model folders/checkpoints, hub tags. Raise ConfigError."""
    d = cfg.data
    path = d.path or (DEFAULT_FASHION_MNIST_DIR if d.source == "fashion-mnist" else None)
    if path is not None and not Path(path).expanduser().exists():
        hint = " (install it with: apt-get install -y dataset-fashion-mnist)" if d.source == "fashion-mnist" else ""
        raise ConfigError(f"'data.path' does not exist: {path}{hint}")
    n = count_images(d)
    m = shared_size(n, cfg.shared.fraction, cfg.shared.min)
    if m > n:
        raise ConfigError(f"'shared.min': the shared subset ({m} images) is bigger than the data ({n} images)")
    check_student_arch(cfg.student.arch)
    if cfg.student.init:
        check_student_init(cfg)
    if not check_models:
        return
    for i, p in enumerate(cfg.participants):
        model = resolve_model(cfg, p.model)
        try:
            check_model_spec(model, p.pretrained, p.pool)
        except ModelSpecError as e:
            raise ConfigError(f"'participants[{i}].{'pool' if isinstance(e, PoolError) else 'model'}': {e}") from None
        check_hub(i, p.name, model, p.pretrained)


def check_hub(index: int, name: str, model: str, pretrained, endpoint=None, timeout=None) -> None:
    """Hub weights the participant's actors would download must be in the HF cache or answer on the hub now (a
    few seconds at most), not fail in the actor after minutes of retries; the line says what to do."""
    from .hub import TIMEOUT_S

    why = hub_problem(model, pretrained, endpoint=endpoint, timeout=timeout or TIMEOUT_S)
    if why is None:
        return
    tagged = pretrained and not model.startswith(("hf:", "hf-hub:"))
    what = f"{model} pretrained={pretrained}" if tagged else model
    raise ConfigError(f"'participants[{index}].{'pretrained' if tagged else 'model'}': participant {name}: hub "
                      f"weights for {what} cannot be had: {why}; pre-download them where the hub is reachable "
                      f"({predownload_hint(model, pretrained)}, into the HF cache every node reads: HF_HOME), or use "
                      "model: local-dir:FOLDER (open_clip), timm:/hf: with a weights file or local folder")


def check_student_init(cfg: Config) -> None:
    """``student.init`` must hold a trained student of the same ``student.arch`` and image size."""
    import json

    from .student import METRICS, student_folder

    try:
        d = student_folder(cfg.student.init)
    except ValueError as e:
        raise ConfigError(f"'student.init': {e}") from None
    meta = json.loads((d / METRICS).read_text())
    if meta.get("arch") != cfg.student.arch or int(meta.get("image_size", -1)) != cfg.data.image_size:
        raise ConfigError(f"'student.init': {d} holds a {meta.get('arch')} student at image size "
                          f"{meta.get('image_size')}; this config trains {cfg.student.arch} at {cfg.data.image_size}")
