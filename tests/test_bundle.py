"""The offline bundle (cluster/bundle.py, cluster/install_offline.sh) and benchmarks/gpu_check.py's step machinery.

Building the real bundle downloads ~250 MB, so these tests check its logic on a small scale: the wheel trim on a fake
wheel, the manifest computed from pyproject.toml on a fake closure, the install script's refusal of a bundle for
another Python. A real bundle in dist/ (from `make bundle`) is checked for size and contents when one is there.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "cluster"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bundle  # noqa: E402

BUDGET = 60_000_000


def _fake_wheel(path: Path, files: dict[str, bytes]) -> Path:
    di = "pkg-1.0.dist-info"
    files = {**files, f"{di}/METADATA": b"Metadata-Version: 2.1\nName: pkg\nVersion: 1.0\n",
             f"{di}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\nTag: py3-none-any\n"}
    rec = "".join(f"{n},{bundle._record_hash(d)},{len(d)}\n" for n, d in files.items()) + f"{di}/RECORD,,\n"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for n, d in files.items():
            z.writestr(n, d)
        z.writestr(f"{di}/RECORD", rec)
    return path


def test_trim_wheel_drops_dirs_strips_elf_and_rewrites_record(tmp_path):
    elf = Path("/bin/true").read_bytes()
    src = _fake_wheel(tmp_path / "pkg-1.0-py3-none-any.whl", {
        "pkg/__init__.py": b"X = 1\n", "pkg/jars/big.jar": b"j" * 1000, "pkg/rllib/a.py": b"a = 2\n",
        "pkg/core/tool": elf, "pkg/web/main.js": b"f()", "pkg/web/main.js.map": b"{}"})
    assert bundle.check_record(src) == []
    out = tmp_path / "out" / src.name
    out.parent.mkdir()
    info = bundle.repack_wheel(src, out, drop=("pkg/jars/", "pkg/rllib/", "*.map"),
                               strip=shutil.which("strip") is not None)
    assert info["dropped"] == 3
    with zipfile.ZipFile(out) as z:
        names = set(z.namelist())
        assert not {"pkg/jars/big.jar", "pkg/rllib/a.py", "pkg/web/main.js.map"} & names
        assert {"pkg/__init__.py", "pkg/core/tool", "pkg/web/main.js", "pkg-1.0.dist-info/RECORD"} <= names
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())  # the outer xz compresses it
        tool = z.read("pkg/core/tool")
        rec = z.read("pkg-1.0.dist-info/RECORD").decode()
    assert "jars" not in rec and "rllib" not in rec and ".map" not in rec
    assert tool[:4] == b"\x7fELF" and len(tool) <= len(elf)
    assert bundle.check_record(out) == []  # every member listed with its new hash and size
    # pip accepts the repacked wheel
    target = tmp_path / "site"
    p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--target", str(target), str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert (target / "pkg" / "__init__.py").exists() and not (target / "pkg" / "jars").exists()


def test_check_record_catches_a_stale_record(tmp_path):
    src = _fake_wheel(tmp_path / "pkg-1.0-py3-none-any.whl", {"pkg/__init__.py": b"X = 1\n"})
    bad = tmp_path / "bad.whl"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w") as zout:
        for i in zin.infolist():
            data = zin.read(i.filename)
            zout.writestr(i, b"X = 2\n" if i.filename == "pkg/__init__.py" else data)
    assert any("mismatch" in p for p in bundle.check_record(bad))


def test_manifest_from_pyproject_leaves_out_the_torch_stack_and_large_packages_the_target_has():
    reqs = bundle.project_requirements()
    names = {bundle.req_name(r) for r in reqs}
    assert {"ray", "torch", "torchvision", "open-clip-torch", "timm", "lightly"} <= names
    closure = [{"name": bundle.req_name(r), "version": "1", "url": "", "requires": []} for r in reqs]
    closure += [{"name": n, "version": "1", "url": "", "requires": []}
                for n in ("nvidia-cudnn-cu13", "triton", "grpcio", "ftfy")]
    have = {"numpy", "scipy", "pyarrow", "pyyaml", "grpcio"}
    sizes = {"numpy": 16_000_000, "scipy": 35_000_000, "pyarrow": 55_000_000, "pyyaml": 800_000,
             "grpcio": 7_000_000, "ray": 79_000_000}
    man = bundle.manifest(reqs, closure, have, sizes)
    shipped = {n for n, _ in man["shipped"]}
    left = {n: why for n, _, why in man["left_out"]}
    assert not shipped & {"torch", "torchvision", "nvidia-cudnn-cu13", "triton"}
    assert {"numpy", "scipy", "pyarrow", "grpcio"} <= set(left)      # large and on the target
    assert {"ray", "pyyaml", "ftfy", "open-clip-torch", "timm", "lightly"} <= shipped  # pyyaml: small, kept
    assert "ray[data,train,default]==2.60.0" in man["install"]        # Ray keeps its tested pin
    assert not any(bundle.req_name(r) in ("torch", "torchvision") for r in man["install"])
    assert all("==" not in r for r in man["install"] if bundle.req_name(r) != "ray")


def test_install_script_refuses_a_bundle_for_another_python(tmp_path):
    stage = tmp_path / "coopt-bundle-py27"
    (stage / "wheels").mkdir(parents=True)
    (stage / "bundle.json").write_text(json.dumps({"python": "2.7"}))
    (stage / "requirements.txt").write_text("")
    arc = tmp_path / "b.tar.xz"
    with tarfile.open(arc, "w:xz") as t:
        t.add(stage, arcname=stage.name)
    p = subprocess.run(["bash", str(ROOT / "cluster" / "install_offline.sh"), str(arc)], capture_output=True, text=True,
                       env={**os.environ, "PYTHON": sys.executable})
    assert p.returncode == 2
    assert "bundle is for Python 2.7" in p.stderr


def test_data_archive_keeps_the_first_images_of_each_split(tmp_path):
    import gzip

    import numpy as np

    from coopt_ray.data import fashion_mnist_split

    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    full = {"train": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8), "t10k": rng.integers(0, 256, (6, 28, 28),
                                                                                            dtype=np.uint8)}
    for split, x in full.items():
        y = np.arange(len(x), dtype=np.uint8) % 10
        with gzip.open(src / f"{split}-images-idx3-ubyte.gz", "wb") as f:
            f.write(b"\0\0\x08\x03" + np.array(x.shape, ">u4").tobytes() + x.tobytes())
        (src / f"{split}-labels-idx1-ubyte").write_bytes(b"\0\0\x08\x01" + np.array([len(y)], ">u4").tobytes()
                                                         + y.tobytes())  # raw, not gzipped: both are read
    arc = tmp_path / "d.tar.xz"
    assert bundle.pack_data(src, arc, train=10, test=4, log=lambda _m: None, preset=1) == arc.stat().st_size
    with tarfile.open(arc) as t:
        t.extractall(tmp_path / "x")
    d = str(tmp_path / "x" / "fashion-mnist")
    want = {"public": (10, full["train"][:10]), "test": (4, full["t10k"][:4])}
    for name, (n, x) in want.items():
        got, labels = fashion_mnist_split(name, d)
        assert got.shape == (n, 28, 28) and np.array_equal(got, x) and list(labels) == [i % 10 for i in range(n)]
    with pytest.raises(FileNotFoundError):
        bundle.add_data(tmp_path / "none", tmp_path / "y")


def _real_bundle() -> Path | None:
    found = sorted((ROOT / "dist").glob("coopt-bundle-py*.tar.xz"))
    return found[-1] if found else None


@pytest.mark.skipif(_real_bundle() is None, reason="no dist/coopt-bundle-py*.tar.xz (make bundle)")
def test_real_bundle_size_and_contents():
    arc = _real_bundle()
    assert arc.stat().st_size <= BUDGET, f"{arc.name}: {arc.stat().st_size / 1e6:.1f} MB > 60 MB"
    names, wheels, files = [], [], {}
    with tarfile.open(arc, "r|xz") as t:  # one streaming pass: seeking back in an xz stream decompresses it again
        for m in t:
            names.append(m.name)
            base = m.name.split("/")[-1]
            if base.endswith(".whl"):
                wheels.append(base)
            if base in ("bundle.json", "requirements.txt") or (base.startswith("ray-") and base.endswith(".whl")):
                files[base if not base.endswith(".whl") else "ray.whl"] = t.extractfile(m).read()
    top = names[0].split("/")[0]
    meta = json.loads(files["bundle.json"])
    reqs = files["requirements.txt"].decode().split()
    with zipfile.ZipFile(io.BytesIO(files["ray.whl"])) as z:
        ray_names = z.namelist()
        rec = z.read(next(n for n in ray_names if n.endswith(".dist-info/RECORD"))).decode()
    assert top == f"coopt-bundle-py{meta['python'].replace('.', '')}"
    assert any(w.startswith("coopt_ray-") for w in wheels)
    assert any(w.startswith("open_clip_torch-") for w in wheels)
    assert not any(w.split("-")[0].lower() in ("torch", "torchvision", "triton") or w.startswith("nvidia_")
                   for w in wheels)
    assert not any(bundle.req_name(r) in ("torch", "torchvision") for r in reqs)
    if meta["ray_trimmed"]:
        assert not any(bundle.is_dropped(n, bundle.RAY_DROP) for n in ray_names)
        assert not any(bundle.is_dropped(line.rsplit(",", 2)[0], bundle.RAY_DROP) for line in rec.splitlines())
    assert set(meta["wheels"]) == set(wheels)


# ---------------------------------------------------------------- gpu_check's machinery
def test_gpu_check_steps_record_status_figures_and_timeouts(tmp_path):
    import gpu_check as G

    out = tmp_path / "gpu_check.json"
    doc, saved = {}, []

    def save():
        G.write_json(out, doc)
        saved.append(json.loads(out.read_text()))

    py = sys.executable
    steps = [
        G.Step("ok", [py, "-c", "print('GPU_CHECK_RESULT {\"x\": 3}')"], 30, G.result_line),
        G.Step("fails", [py, "-c", "import sys; print('boom'); sys.exit(3)"], 30),
        G.Step("hangs", [py, "-c", "import time; print('started', flush=True); time.sleep(60)"], 1.5),
        G.Step("bad-figures", [py, "-c", "pass"], 30, G.result_line),
        G.Step("late", [py, "-c", "pass"], 30),
    ]
    t0 = time.time()
    G.run_steps(steps, doc, save, deadline=time.time() + 12)
    st = json.loads(out.read_text())["steps"]
    assert time.time() - t0 < 30
    assert st["ok"]["status"] == "ok" and st["ok"]["rc"] == 0 and st["ok"]["figures"] == {"x": 3}
    assert st["fails"]["status"] == "failed" and st["fails"]["rc"] == 3 and "boom" in st["fails"]["tail"]
    assert st["hangs"]["status"] == "timeout" and st["hangs"]["rc"] is None and st["hangs"]["seconds"] < 10
    assert st["bad-figures"]["status"] == "ok" and "figures_error" in st["bad-figures"]
    assert st["late"]["status"] in ("ok", "skipped")
    # written before the first step and after every step: a run stopped at its limit still reports
    assert len(saved) == len(steps) + 1
    assert saved[0]["steps"]["ok"]["status"] == "running"
    assert saved[1]["steps"]["ok"]["status"] == "ok" and saved[1]["steps"]["fails"]["status"] == "running"


def test_gpu_check_deadline_skips_the_rest(tmp_path):
    import gpu_check as G

    doc = {}
    G.run_steps([G.Step("a", [sys.executable, "-c", "pass"], 5)], doc, lambda: None, deadline=time.time() + 1)
    assert doc["steps"]["a"]["status"] == "skipped"


def test_gpu_sampler_window():
    import gpu_check as G

    s = G.GpuSampler()
    s.samples = [(10.0, 20.0, 1000.0), (11.0, 80.0, 3000.0), (12.0, 90.0, 2000.0), (20.0, 0.0, 0.0)]
    w = s.window(10.5, 12.5)
    assert w == {"samples": 2, "util_mean": 85.0, "util_max": 90.0, "util_ge_70_share": 1.0, "mem_max_mib": 3000.0}
    assert s.window(30, 40) is None


def test_gpu_check_configs_are_valid_and_ask_for_the_gpu(tmp_path):
    import gpu_check as G

    from coopt_ray.config import load_config

    z = G.sizes(smoke=False)
    cfgs = G.write_configs(tmp_path, tmp_path / "zoo", z, None)
    cfg = load_config(cfgs["optimize"])
    assert [p.num_gpus for p in cfg.participants] == [0.25] * 4   # 4 pools, one wave on one GPU
    assert cfg.student.use_gpu and cfg.student.workers == 1 and cfg.data.limit == 40000
    for k in ("krr", "mdatm"):
        assert load_config(cfgs[k]).distill.use_gpu
    # what the GPU mode reads lies inside the data archive (make gpu-data): train[0:50000], t10k[0:2000]
    assert cfg.data.limit + 10_000 <= 50_000 and load_config(cfgs["mdatm"]).eval.test_limit <= 2000
    assert cfg.eval.test_limit <= 2000 and load_config(cfgs["mdatm"]).distill.labeled_limit <= 50_000
    (tmp_path / "s").mkdir()
    smoke = G.write_configs(tmp_path / "s", tmp_path / "zoo", G.sizes(smoke=True), "/data")
    sc = load_config(smoke["optimize"])
    assert not sc.student.use_gpu and len(sc.participants) == 2 and sc.data.path == "/data"
    assert [load_config(smoke[k]).data.path for k in ("krr", "mdatm")] == ["/data", "/data"]


def test_gpu_check_smoke_never_writes_the_gpu_runs_json(tmp_path):
    import gpu_check as G

    with pytest.raises(SystemExit, match="never writes"):
        G.main(["--cpu-smoke", "--work", str(tmp_path / "w"), "--json", str(G.RESULTS / "gpu_check.json")])
    assert not (tmp_path / "w").exists()   # refused before any work
