"""Every shipped config validates; every bad config exits 2 with one line naming the key, before Ray."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from coopt_ray import models
from coopt_ray.config import ConfigError, load_config
from coopt_ray.preflight import check_paths

from conftest import REPO, cli_errors, forbid_ray_start, write_config

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_configs_dir_is_not_empty():
    names = {c.name for c in CONFIGS}
    assert {"fashion-mnist.yaml", "cifar10-clip.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_validates(path):
    from coopt_ray import zoo

    cfg = load_config(path)
    assert cfg.participants
    zoo_names = {s["name"] for s in zoo.ZOO_SPECS}
    for p in cfg.participants:
        if p.model.startswith("local-dir:"):
            assert Path(p.model[len("local-dir:"):]).name in zoo_names, p.model
        else:
            models.check_model_spec(p.model, p.pretrained)  # arch + hub tag are known to open_clip
    if cfg.data.source == "fashion-mnist":
        check_paths(cfg, check_models=False)


@pytest.fixture
def no_ray(monkeypatch):
    forbid_ray_start(monkeypatch)


BAD = [
    ({"datta": {}}, "datta"),
    ({"data": {"source": "fashion-mnist", "limitt": 3}}, "data.limitt"),
    ({"participants": []}, "participants"),
    ({"shared": {"fraction": 0.0}}, "shared.fraction"),
    ({"shared": {"fraction": 1.5}}, "shared.fraction"),
    ({"data": {"source": "images", "path": "/nonexistent/images"}}, "data.path"),
    ({"student": {"epochs": "ten"}}, "student.epochs"),
]


@pytest.mark.parametrize("over,key", BAD, ids=[k for _, k in BAD])
def test_bad_config_exits_2_naming_key(over, key, tmp_path, tiny_models, no_ray):
    cfg = write_config(tmp_path / "c.yaml", tiny_models, **over)
    rc, err = cli_errors(["optimize", "--config", cfg, "--out", tmp_path / "run"])
    assert rc == 2
    assert len(err) == 1 and key in err[0], err


def test_missing_model_folder(tmp_path, tiny_models, no_ray):
    cfg = write_config(tmp_path / "c.yaml", tiny_models[:1] + [f"local-dir:{tmp_path}/nope"])
    rc, err = cli_errors(["optimize", "--config", cfg, "--out", tmp_path / "run"])
    assert rc == 2 and "participants[1].model" in err[0] and "not found" in err[0]


def test_missing_config_file(tmp_path, no_ray):
    rc, err = cli_errors(["optimize", "--config", tmp_path / "absent.yaml", "--out", tmp_path / "run"])
    assert rc == 2 and "absent.yaml" in err[0]


def test_config_error_on_command_line(tmp_path, tiny_models):
    """The real console path: exit code 2, one stderr line, no traceback."""
    cfg = write_config(tmp_path / "c.yaml", tiny_models, participants=[])
    p = subprocess.run([sys.executable, "-m", "coopt_ray", "optimize", "--config", str(cfg), "--out",
                        str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "participants" in p.stderr
    assert not (tmp_path / "r").exists()


def test_parse_roundtrip(tmp_path, tiny_models):
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_models))
    again = load_config(_dump(tmp_path / "d.yaml", cfg.to_dict()))
    assert again == cfg and again.fingerprint() == cfg.fingerprint()


def _dump(path, d):
    path.write_text(yaml.safe_dump(d))
    return path


def test_config_error_type():
    with pytest.raises(ConfigError, match="K = 0"):
        from coopt_ray.config import parse_config

        parse_config({"participants": []})
