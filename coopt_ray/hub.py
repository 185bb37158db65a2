"""Whether a participant's hub weights can be had, checked on the driver before any Ray work, for every family:
the Hugging Face hub cache first (open_clip, timm and transformers weights all live there), then one short request
(HF_HUB_OFFLINE=1: the cache only). Endpoint and timeout are arguments, so tests point them at a closed port."""
from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from .families import HF, HF_FILES, HF_WEIGHTS, TIMM, hf_source, is_weights_file, timm_names

TIMEOUT_S = 3.0
OC_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def hub_needs(model: str, pretrained: Optional[str]) -> list[tuple[str, str, tuple[str, ...]]]:
    """What loading ``model``/``pretrained`` downloads: ``[("hf", repo, alternative files)`` (any one will do) or
    ``("url", url, (cache path,))]``; empty for folders, files and students."""
    if model.startswith(TIMM):
        if is_weights_file(pretrained):
            return []
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(timm_names(model, pretrained)[1])
        if cfg is None:
            return []
        if cfg.hf_hub_id:
            f = cfg.hf_hub_filename
            return [("hf", cfg.hf_hub_id, (f,) if f else ("model.safetensors", "pytorch_model.bin"))]
        if cfg.url:
            import torch.hub

            return [("url", cfg.url, (str(Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)),))]
        return []
    if model.startswith(HF):
        src, folder = hf_source(model)
        return [] if folder else [("hf", src, (f,)) for f in HF_FILES] + [("hf", src, HF_WEIGHTS)]
    if model.startswith("hf-hub:"):
        repo = model[len("hf-hub:"):]
        return [("hf", repo, ("open_clip_config.json",)), ("hf", repo, OC_WEIGHTS)]
    if ":" in model or not pretrained or is_weights_file(pretrained):
        return []
    import open_clip

    if not open_clip.is_pretrained_cfg(model, pretrained):
        return []
    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if cfg.get("hf_hub"):
        repo, f = os.path.split(cfg["hf_hub"])
        files = ((f[:-4] + ".safetensors", f) if f.endswith((".bin", ".pth")) else (f,)) if f else OC_WEIGHTS
        return [("hf", repo, files)]
    if cfg.get("url"):
        url = cfg["url"]
        return [("url", url, (os.path.expanduser(os.path.join("~/.cache/clip", os.path.basename(url))),))]
    return []


def offline() -> bool:
    return any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE") for k in ("HF_HUB_OFFLINE",
                                                                                      "TRANSFORMERS_OFFLINE"))


def hub_cache_dir() -> str:
    """The HF hub cache, read from the environment now (HF_HUB_CACHE, HF_HOME), not at import."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def cached(repo: str, filename: str, cache_dir: Optional[str] = None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo, filename, cache_dir=cache_dir or hub_cache_dir()), str)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *a, **k):  # a redirect (to the CDN) already says the file exists
        return None


def probe_url(url: str, timeout: float = TIMEOUT_S, token: Optional[str] = None) -> Optional[str]:
    """None when ``url`` answers a HEAD request with 2xx/3xx within ``timeout`` seconds, else why not."""
    req = urllib.request.Request(url, method="HEAD", headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        urllib.request.build_opener(_NoRedirect).open(req, timeout=timeout).close()
        return None
    except urllib.error.HTTPError as e:
        if 300 <= e.code < 400:
            return None
        return f"HTTP {e.code}" + (" (gated or private: log in with `hf auth login`)" if e.code in (401, 403) else
                                   " (no such repo or file)" if e.code == 404 else "")
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return f"hub unreachable within {timeout:g} s ({reason})"


def hub_problem(model: str, pretrained: Optional[str], endpoint: Optional[str] = None,
                timeout: float = TIMEOUT_S) -> Optional[str]:
    """None when every file ``model``/``pretrained`` downloads is in the HF cache (or the url cache) or answers on
    the hub, else one line: what is missing and why it cannot be had."""
    needs = hub_needs(model, pretrained)
    if not needs:
        return None
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    token = None
    for kind, where, files in needs:
        if kind == "hf" and any(cached(where, f) for f in files):
            continue
        if kind == "url" and Path(files[0]).is_file():
            continue
        shown = f"{where}/{files[0]}" if kind == "hf" else where
        if offline():
            return f"{shown} is not in the HF cache ({hub_cache_dir()}) and HF_HUB_OFFLINE=1 (cache only)"
        if kind == "hf" and token is None:
            try:
                from huggingface_hub import get_token

                token = get_token() or ""
            except Exception:  # noqa: BLE001 - no token: anonymous requests
                token = ""
        why = None
        for f in files if kind == "hf" else (None,):
            why = probe_url(f"{endpoint}/{where}/resolve/main/{f}" if kind == "hf" else where, timeout, token)
            if why is None or "unreachable" in why:
                break
        if why is not None:
            return f"{shown} is not in the HF cache ({hub_cache_dir()}) and cannot be downloaded: {why}"
    return None


def predownload_hint(model: str, pretrained: Optional[str]) -> str:
    """What the user runs (on a machine with internet) to put the weights in the HF cache."""
    repos = sorted({w for k, w, _ in hub_needs(model, pretrained) if k == "hf"})
    urls = [w for k, w, _ in hub_needs(model, pretrained) if k == "url"]
    return " && ".join([f"hf download {r}" for r in repos] + [f"curl -LO {u}" for u in urls])
