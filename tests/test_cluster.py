"""cluster/: launcher YAML, KubeRay manifests, Dockerfile and local.sh parse, match pyproject.toml's Ray and
Python versions, keep the dashboard on localhost and token auth on; configs/quick.yaml is the trimmed default."""
from __future__ import annotations

import copy
import os
import re
import subprocess
import sys

import pytest
import yaml

from conftest import REPO

CLUSTER = REPO / "cluster"
LAUNCHER = ("aws-gpu.yaml", "gcp-gpu.yaml")
KUBERAY = ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml")


def _pyproject():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def ray_version() -> str:
    deps = _pyproject()["dependencies"]
    pins = [re.match(r"ray(\[[^\]]*\])?==(\S+)$", d.replace(" ", "")) for d in deps]
    pins = [m.group(2) for m in pins if m]
    assert len(pins) == 1, deps
    return pins[0]


def python_ok(major_minor: str) -> bool:
    """Whether Python X.Y satisfies pyproject's requires-python."""
    from packaging.specifiers import SpecifierSet

    return SpecifierSet(_pyproject()["requires-python"]).contains(f"{major_minor}.0")


def _load(name):
    return list(yaml.safe_load_all((CLUSTER / name).read_text()))


def _images(obj):
    """Every container image named anywhere in a parsed YAML document."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("image", "head_image", "worker_image") and isinstance(v, str):
                yield v
            else:
                yield from _images(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _images(v)


def _check_image(image: str, ray: str):
    m = re.search(r"ray:?(\d+\.\d+\.\d+)-py(\d)(\d+)", image)
    assert m, f"image {image} does not name its Ray and Python versions"
    assert m.group(1) == ray, f"{image}: Ray {m.group(1)}, pyproject pins {ray}"
    assert python_ok(f"{m.group(2)}.{m.group(3)}"), f"{image}: Python {m.group(2)}.{m.group(3)} outside requires-python"
    return f"{m.group(2)}.{m.group(3)}"


def test_every_cluster_file_exists_and_parses():
    for name in LAUNCHER + KUBERAY:
        docs = _load(name)
        assert docs and all(isinstance(d, dict) for d in docs), name
    assert os.access(CLUSTER / "local.sh", os.X_OK)
    subprocess.run(["bash", "-n", str(CLUSTER / "local.sh")], check=True)


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_is_valid_for_ray_up(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _load(name)[0]
    validate_config(prepare_config(copy.deepcopy(cfg)))  # Ray's own schema, with provider defaults filled
    ray = ray_version()
    pys = {_check_image(i, ray) for i in _images(cfg)}
    assert len(pys) == 1
    # setup installs this package (pinned deps) and checks the versions it got
    setup = " ".join(cfg["setup_commands"])
    assert "pip install" in setup and "coopt_ray" in setup
    assert f"ray.__version__ == '{ray}'" in setup and f"sys.version_info[:2] == ({pys.pop().replace('.', ', ')})" in setup
    assert cfg["file_mounts"]["~/coopt_ray"] == "."
    # a CPU head and GPU worker node types with autoscaling bounds
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert gpu and all(0 <= t["min_workers"] <= t["max_workers"] for t in gpu.values())
    assert any(t["min_workers"] >= 1 for t in gpu.values())  # a GPU config never meets a GPU-less cluster
    assert sum(t["max_workers"] for t in gpu.values()) >= cfg["max_workers"] > 0
    assert all(t.get("labels", {}).get("gpu-type") for t in gpu.values())
    if name.startswith("gcp"):
        assert all(t["resources"].get("GPU") == 1 for t in gpu.values())
    else:
        assert all(t["node_config"]["InstanceType"].startswith(("g4dn", "g5", "p")) for t in gpu.values())
    # dashboard on localhost, token auth on every node
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in yaml.safe_dump(cfg)
    for cmds in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]):
        start = [c for c in cmds if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start)
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_manifest_matches_versions_and_keeps_dashboard_private(name):
    docs = {d["kind"]: d for d in _load(name)}
    ray = ray_version()
    assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    if name.endswith("rayjob.yaml"):
        job = docs["RayJob"]["spec"]
        assert job["submissionMode"] == "SidecarMode"  # submitter reaches the localhost-only dashboard
        assert job["entrypoint"].startswith("python /home/ray/coopt_ray/jobs/pipeline.py")
        spec = job["rayClusterSpec"]
    else:
        spec = docs["RayCluster"]["spec"]
    assert spec["rayVersion"] == ray
    assert spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert all(_check_image(i, ray) for i in _images(spec))
    groups = spec["workerGroupSpecs"]
    assert groups
    for g in groups:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        assert g["rayStartParams"]["num-gpus"] == "1"
        for c in g["template"]["spec"]["containers"]:
            assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    mounts = [m["mountPath"] for c in spec["headGroupSpec"]["template"]["spec"]["containers"]
              for m in c["volumeMounts"]]
    assert "/mnt/shared" in mounts


def test_dockerfile_and_local_script_match_versions():
    ray = ray_version()
    frm = re.search(r"^FROM (\S+)", (CLUSTER / "Dockerfile").read_text(), re.M).group(1)
    py = _check_image(frm, ray)
    for name in KUBERAY:  # the manifests' image is the Dockerfile's, tagged with the same versions
        for image in _images(_load(name)):
            assert _check_image(image, ray) == py
    sh = (CLUSTER / "local.sh").read_text()
    assert "export RAY_AUTH_MODE=token" in sh and "--dashboard-host=127.0.0.1" in sh
    assert "ray stop" not in sh.replace("(unlike `ray stop`)", "")  # stops only what it started
    assert ".venv/bin" in sh  # nodes (and so job drivers) run this project's venv: same Ray and Python
    assert "--num-gpus=1" in sh and "--num-gpus=0" in sh
    import ray as ray_mod

    assert ray_mod.__version__ == ray and python_ok(f"{sys.version_info.major}.{sys.version_info.minor}")


def test_quick_config_is_the_trimmed_offline_default():
    from coopt_ray.config import load_config

    quick, full = load_config(REPO / "configs" / "quick.yaml"), load_config(REPO / "configs" / "fashion-mnist.yaml")
    assert [(p.name, p.model) for p in quick.participants] == [(p.name, p.model) for p in full.participants[:3]]
    assert quick.data.source == full.data.source and quick.data.limit and 500 <= quick.data.limit <= 5000
    assert quick.student.epochs == 1 and quick.student.arch == full.student.arch
    assert quick.zoo_dir == full.zoo_dir
