"""Safety (issue 5): model weights load with ``weights_only=True`` and a tampered checkpoint is refused;
participants exchange data only as Parquet (no pickles in RUN); cluster files keep the dashboard on
localhost and token auth on (tests/test_cluster.py checks each shipped file's structure; this file is a
cross-cutting guard over every file in cluster/ and jobs/, present or future)."""
from __future__ import annotations

import ast
import builtins
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from coopt_ray import cli, models
from coopt_ray.optimize import ParticipantEmbedder
from coopt_ray.rundir import DONE

from conftest import REPO, forbid_ray_start, tiny_clip_cfg, write_config


class Tampered:
    """Unpickling this runs ``open(marker, "w")``: a stand-in for arbitrary code in a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_models):
    """A tiny open_clip arch registered by name, a clean checkpoint, a tampered one, and a tampered local-dir."""
    import open_clip
    from safetensors.torch import load_file

    d = tmp_path_factory.mktemp("ckpt")
    marker = d / "CODE_RAN"
    src = Path(tiny_models[0][len("local-dir:"):])
    state = load_file(str(src / "open_clip_model.safetensors"))
    (d / "coopt-tiny-safety.json").write_text(json.dumps(tiny_clip_cfg(16)))
    open_clip.add_model_config(d / "coopt-tiny-safety.json")  # arch name: coopt-tiny-safety
    torch.save(state, d / "clean.pt")
    torch.save({"state_dict": state, "extra": Tampered(marker)}, d / "tampered.pt")
    local = d / "tampered-dir"
    local.mkdir()
    shutil.copy(src / "open_clip_config.json", local)
    torch.save({"state_dict": state, "extra": Tampered(marker)}, local / "open_clip_pytorch_model.bin")
    return {"arch": "coopt-tiny-safety", "clean": d / "clean.pt", "tampered": d / "tampered.pt",
            "local": f"local-dir:{local}", "marker": marker}


def test_clean_checkpoint_file_loads(checkpoints):
    """Control: the same weights without the pickled object load fine through the same path."""
    models.check_model_spec(checkpoints["arch"], str(checkpoints["clean"]))
    _, _, dim = models.load_model(checkpoints["arch"], str(checkpoints["clean"]), device="cpu")
    assert dim == 16


def test_tampered_checkpoint_file_is_refused(checkpoints):
    c = checkpoints
    with pytest.raises(models.ModelSpecError, match=r"holds pickled objects, not only weights \(io\.open\)"):
        models.check_model_spec(c["arch"], str(c["tampered"]))
    with pytest.raises(Exception, match="Weights only load failed"):
        models.load_model(c["arch"], str(c["tampered"]), device="cpu")
    assert not c["marker"].exists(), "the checkpoint's pickled code ran"


def test_tampered_local_dir_is_refused_in_the_driver_and_in_the_actor(checkpoints):
    c = checkpoints
    with pytest.raises(models.ModelSpecError, match="holds pickled objects"):
        models.check_model_spec(c["local"])
    # What a pool actor does on start (e.g. when a job skipped the driver-side checks): refuses too.
    with pytest.raises(Exception, match="Weights only load failed"):
        ParticipantEmbedder(c["local"], None, use_gpu=False)
    assert not c["marker"].exists(), "the checkpoint's pickled code ran"


def test_tampered_model_in_config_exits_2_before_ray(checkpoints, tmp_path, tiny_models, capsys, monkeypatch):
    forbid_ray_start(monkeypatch, "Ray was started for a tampered model")
    cfg = write_config(tmp_path / "c.yaml", [tiny_models[0], checkpoints["local"]])
    rc = cli.main(["optimize", "--config", str(cfg), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "participants[1].model" in err[0] and "pickled objects" in err[0], err
    assert not checkpoints["marker"].exists()


def _calls(tree, name):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            dotted = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
                dotted = f"{f.value.id}.{f.attr}"
            if dotted == name or dotted.endswith("." + name):
                yield node


def _kw(call, key):
    for k in call.keywords:
        if k.arg == key:
            return k.value.value if isinstance(k.value, ast.Constant) else "<expr>"
    return None


def test_every_weight_load_in_the_code_is_weights_only():
    """Static guard over coopt_ray/ and jobs/: torch.load and open_clip model creation always pass
    weights_only=True; np.load never allows pickles; nothing imports pickle to move data."""
    files = sorted((REPO / "coopt_ray").rglob("*.py")) + sorted((REPO / "jobs").rglob("*.py"))
    assert REPO / "coopt_ray" / "distill" / "mdatm_stage.py" in files  # subpackages are scanned too
    seen = set()
    for f in files:
        tree = ast.parse(f.read_text())
        for call in _calls(tree, "torch.load"):
            seen.add(f.name)
            assert _kw(call, "weights_only") is True, f"{f.name}:{call.lineno}: torch.load without weights_only=True"
        for name in ("create_model_and_transforms", "create_model"):
            for call in _calls(tree, name):
                if "open_clip" in ast.unparse(call.func):
                    assert _kw(call, "weights_only") is True, f"{f.name}:{call.lineno}: {name} without weights_only"
        for call in _calls(tree, "np.load"):
            assert _kw(call, "allow_pickle") in (None, False), f"{f.name}:{call.lineno}: np.load(allow_pickle=True)"
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n in ("pickle", "cloudpickle", "dill") for n in names), f"{f.name} imports pickle"
    assert {"student.py", "mdatm_stage.py"} <= seen  # the scan found the loads it guards, subpackages included


# ---------------------------------------------------------------- data exchange: Parquet only
def test_run_directory_holds_parquet_and_json_only(shared_optimized):
    run = shared_optimized  # a finished optimize RUN (3 participants), read only
    files = [f for f in run.rglob("*") if f.is_file()]
    assert not [f for f in files if f.suffix in (".pkl", ".pickle", ".pt", ".pth", ".bin", ".npy")]
    for sub in ("embeddings", "optimized", "errors"):
        for f in (run / sub).rglob("*"):
            if f.is_file():
                assert f.suffix == ".parquet" or f.name == DONE, f"{f.relative_to(run)}: not Parquet or a marker"
                if f.name == DONE:
                    json.loads(f.read_text())
    assert list((run / "embeddings").rglob("*.parquet")) and list((run / "optimized").glob("*.parquet"))
    for f in (run / "align").glob("*"):  # alignment maps: plain arrays, readable without pickle
        assert f.suffix == ".npz"
        with np.load(f, allow_pickle=False) as z:
            assert set(z.files) == {"W", "b"}
    json.loads((run / "manifest.json").read_text())


# ---------------------------------------------------------------- cluster files
HEAD_MARKERS = ("ray start --head", "headGroupSpec", "head_start_ray_commands")


def _cluster_files():
    return [f for d in ("cluster", "jobs") for f in sorted((REPO / d).glob("**/*"))
            if f.is_file() and f.suffix in (".yaml", ".yml", ".sh", ".py", "") and "__pycache__" not in f.parts]


def test_cluster_files_keep_dashboard_on_localhost_and_token_auth_on():
    files = _cluster_files()
    if not any(f.parent.name == "cluster" for f in files):
        pytest.skip("no cluster/ files in this checkout (written by the cluster engineer); nothing to check")
    heads = 0
    for f in files:
        text = f.read_text()
        rel = f.relative_to(REPO)
        for m in re.finditer(r"dashboard[-_]host[\"']?\s*[=:]\s*[\"']?([^\s\"',}]+)", text):
            assert m.group(1) in ("127.0.0.1", "localhost"), f"{rel}: dashboard host {m.group(1)}"
        assert "0.0.0.0" not in text, f"{rel}: listens on all interfaces"
        assert not re.search(r"RAY_AUTH_MODE[\"']?\s*[=:]\s*[\"']?disabled", text), f"{rel}: token auth disabled"
        if any(h in text for h in HEAD_MARKERS):
            heads += 1
            assert re.search(r"RAY_AUTH_MODE[\"']?\s*[=:]\s*[\"']?token", text) or \
                re.search(r"authOptions:\s*\n\s*mode:\s*token", text), f"{rel}: starts a head without token auth"
    assert heads >= 1, "expected at least one file in cluster/ that starts a Ray head"
