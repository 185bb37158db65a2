"""`make bundle`: one offline install archive of what coopt_ray needs beyond torch, for a named Python version.

    python cluster/bundle.py --python-version 3.12 --out dist/coopt-bundle-py312.tar.xz [--have FILE]

Steps: resolve the project's pinned dependencies (pyproject.toml) for the target Python on manylinux x86_64 with
torch/torchvision replaced by empty stand-ins (the target already has its own torch), so the closure holds exactly
what torch does not bring; drop torch, torchvision, nvidia-* and triton; drop the packages the target is known to
have (``--have``: one name a line, e.g. cluster/bundle-have-h200.txt) when their wheel is large; download the rest as
wheels (pure-Python sdists are built into wheels here); strip every ELF member; trim Ray (no jars/, rllib/,
serve/, llm/, JS source maps); rewrite each RECORD; store every wheel uncompressed so the outer xz compresses across
them all; add
the project's own wheel, ``requirements.txt`` (what cluster/install_offline.sh installs) and ``bundle.json``.

Stdlib only (plus pip and ``strip``), so it runs before any venv exists.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Iterable, Optional

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = None

ROOT = Path(__file__).resolve().parents[1]
TORCH_STACK = ("torch", "torchvision")               # the target's own; never shipped, never pinned
NEVER = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*|cuda-.*)$")
# members left out of Ray's wheel: a folder prefix ("x/"), or "*suffix" (the dashboard's 6.7 MB of JS source maps)
RAY_DROP = ("ray/jars/", "ray/rllib/", "ray/serve/", "ray/llm/", "*.map")
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_27_x86_64", "manylinux_2_28_x86_64",
             "manylinux_2_24_x86_64", "manylinux1_x86_64", "manylinux_2_5_x86_64")
HAVE_MIN_BYTES = 2_000_000   # a --have package is left out only when its wheel is at least this large


def canon(name: str) -> str:
    """PEP 503 normalised name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def req_name(req: str) -> str:
    return canon(re.split(r"[\s\[<>=!~;@]", req.strip(), maxsplit=1)[0])


def project_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """The project's runtime dependencies, as pinned in pyproject.toml."""
    text = pyproject.read_text()
    if tomllib is not None:
        return list(tomllib.loads(text)["project"]["dependencies"])
    block = re.search(r"^dependencies\s*=\s*\[(.*?)^\]", text, re.S | re.M).group(1)  # pragma: no cover
    return re.findall(r'"([^"]+)"', block)


def read_have(path: Optional[str]) -> set[str]:
    """Names (one a line, '#' comments) of packages the target machine already has."""
    if not path:
        return set()
    out = set()
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.add(req_name(line))
    return out


# ---------------------------------------------------------------- wheels
def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _strip_elf(data: bytes, tmp: Path) -> bytes:
    """``strip --strip-unneeded`` of one ELF file's bytes (unchanged when strip fails or is missing)."""
    f = tmp / "elf"
    f.write_bytes(data)
    try:
        subprocess.run(["strip", "--strip-unneeded", str(f)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return data
    return f.read_bytes()


def is_dropped(name: str, drop: Iterable[str]) -> bool:
    """Whether a wheel member falls under one of ``drop``'s patterns: a prefix, or ``*suffix``."""
    return any(name.endswith(d[1:]) if d.startswith("*") else name.startswith(d) for d in drop)


def repack_wheel(src: Path, dst: Path, drop: Iterable[str] = (), strip: bool = False,
                 compression: int = zipfile.ZIP_STORED) -> dict:
    """Copy a wheel without the members ``drop`` names (see :func:`is_dropped`), ELF members stripped when
    ``strip``, and a RECORD that lists exactly the members kept, with their new hashes and sizes (pip checks it on
    install). Stored uncompressed by default, so an outer xz compresses it. Returns {members, dropped, bytes_in,
    bytes_out}."""
    drop = tuple(drop)
    kept, dropped, record_name = [], 0, None
    with zipfile.ZipFile(src) as zin, tempfile.TemporaryDirectory() as td:
        for info in zin.infolist():
            name = info.filename
            if name.endswith("/"):
                continue
            if name.endswith(".dist-info/RECORD"):
                record_name = name
                continue
            if is_dropped(name, drop):
                dropped += 1
                continue
            data = zin.read(name)
            if strip and data[:4] == b"\x7fELF":
                data = _strip_elf(data, Path(td))
            kept.append((info, data))
        if record_name is None:
            raise ValueError(f"{src.name}: no .dist-info/RECORD")
        rec = io.StringIO()
        for info, data in kept:
            rec.write(f"{info.filename},{_record_hash(data)},{len(data)}\n")
        rec.write(f"{record_name},,\n")
        tmp_dst = dst.with_name(dst.name + ".part")
        with zipfile.ZipFile(tmp_dst, "w", compression=compression) as zout:
            for info, data in kept:
                zi = zipfile.ZipInfo(info.filename, date_time=info.date_time)
                zi.external_attr = info.external_attr
                zi.compress_type = compression
                zout.writestr(zi, data)
            zi = zipfile.ZipInfo(record_name, date_time=(1980, 1, 1, 0, 0, 0))
            zi.compress_type = compression
            zout.writestr(zi, rec.getvalue())
        os.replace(tmp_dst, dst)
    return {"members": len(kept) + 1, "dropped": dropped, "bytes_in": src.stat().st_size,
            "bytes_out": dst.stat().st_size}


def check_record(whl: Path) -> list[str]:
    """Problems with a wheel's RECORD: members missing from it, entries without a member, wrong hashes/sizes."""
    problems = []
    with zipfile.ZipFile(whl) as z:
        names = {n for n in z.namelist() if not n.endswith("/")}
        rec_name = next(n for n in names if n.endswith(".dist-info/RECORD"))
        rows = {}
        for line in z.read(rec_name).decode().splitlines():
            if line.strip():
                path, h, size = line.rsplit(",", 2)
                rows[path] = (h, size)
        for n in sorted(names - set(rows)):
            problems.append(f"not in RECORD: {n}")
        for path, (h, size) in rows.items():
            if path not in names:
                problems.append(f"RECORD lists a missing member: {path}")
            elif path != rec_name:
                data = z.read(path)
                if h != _record_hash(data) or int(size) != len(data):
                    problems.append(f"hash/size mismatch: {path}")
    return problems


# ---------------------------------------------------------------- resolving
def _stub_wheel(name: str, version: str, out: Path) -> Path:
    """An empty wheel standing in for the target's own torch / torchvision while resolving."""
    di = f"{name}-{version}.dist-info"
    whl = out / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr(f"{di}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{di}/WHEEL", "Wheel-Version: 1.0\nGenerator: coopt-bundle\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{di}/RECORD", f"{di}/METADATA,,\n{di}/WHEEL,,\n{di}/RECORD,,\n")
    return whl


def pip_target_args(py: str) -> list[str]:
    args = ["--only-binary=:all:", "--python-version", py, "--implementation", "cp"]
    for p in PLATFORMS:
        args += ["--platform", p]
    return args


def resolve(reqs: list[str], py: str, work: Path, log=print) -> list[dict]:
    """The full install closure of ``reqs`` for Python ``py`` (pip's --dry-run report), torch stack stubbed.
    Pure-Python packages that publish only an sdist are built into wheels under work/local first."""
    stubs, local = work / "stubs", work / "local"
    stubs.mkdir(parents=True, exist_ok=True)
    local.mkdir(parents=True, exist_ok=True)
    reqs = list(reqs)
    for i, r in enumerate(reqs):
        name = req_name(r)
        if name in TORCH_STACK:
            version = re.search(r"==\s*([^\s,;]+)", r).group(1)
            reqs[i] = f"{name} @ {_stub_wheel(name, version, stubs).as_uri()}"
    for attempt in range(5):
        report = work / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
               "--report", str(report), "--target", str(work / "never"), "--find-links", str(local),
               *pip_target_args(py), *reqs]
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if p.returncode == 0:
            return [{"name": canon(i["metadata"]["name"]), "version": i["metadata"]["version"],
                     "url": i["download_info"]["url"], "requires": i["metadata"].get("requires_dist", [])}
                    for i in json.loads(report.read_text())["install"]]
        # a package with no wheel at all: build its sdist here (pure Python only), then resolve again
        out = "\n".join(ln for ln in p.stdout.splitlines() if not ln.startswith("WARNING: Location"))
        m = re.findall(r"depends on ([A-Za-z0-9_.\-]+)==([^\s;,]+)", out) or \
            re.findall(r"requirement ([A-Za-z0-9_.\-]+)==([^\s;,]+)", out)
        if not m:
            raise RuntimeError(f"pip could not resolve the bundle:\n{out[-3000:]}")
        name, ver = m[0]  # ver may hold a wildcard (antlr4-python3-runtime==4.9.*): pip takes it as it is
        log(f"[bundle] {name}=={ver} has no wheel: building one from its sdist")
        b = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(local), f"{name}=={ver}"],
                           capture_output=True, text=True)
        if b.returncode != 0:
            raise RuntimeError(f"could not build {name}=={ver}:\n{b.stderr[-2000:]}")
        if not list(local.glob("*.whl")):
            raise RuntimeError(f"building {name}=={ver} left no wheel")
    raise RuntimeError("pip could not resolve the bundle after building 5 sdists")


def select(closure: list[dict], have: set[str], sizes: dict[str, int]) -> tuple[list[dict], list[dict]]:
    """(shipped, left out): never the torch stack / CUDA wheels; a package the target has only when small."""
    ship, out = [], []
    for pkg in closure:
        n = pkg["name"]
        if NEVER.match(n):
            out.append({**pkg, "why": "torch stack / CUDA: the target's own"})
        elif n in have and sizes.get(n, 0) >= HAVE_MIN_BYTES:
            out.append({**pkg, "why": "the target has it (--have) and its wheel is large"})
        else:
            ship.append(pkg)
    return ship, out


def manifest(reqs: list[str], closure: list[dict], have: set[str], sizes: dict[str, int]) -> dict:
    """What the bundle holds and what install_offline.sh installs: the pure decision, no downloads."""
    ship, out = select(closure, have, sizes)
    top = [r for r in reqs if req_name(r) not in TORCH_STACK]
    # top-level requirements: ray keeps its pin (the tested version); the rest by name, so a package the target
    # already has at another version stays as it is (the project itself installs with --no-deps)
    install = [r if req_name(r) == "ray" else re.split(r"[<>=!~;]", r, maxsplit=1)[0].strip() for r in top]
    return {"shipped": sorted((p["name"], p["version"]) for p in ship),
            "left_out": sorted((p["name"], p["version"], p["why"]) for p in out),
            "install": install}


def _download(pkgs: list[dict], py: str, dest: Path) -> dict[str, Path]:
    """Each package's wheel in dest (local file URLs copied, the rest downloaded in one pip call)."""
    dest.mkdir(parents=True, exist_ok=True)
    remote = []
    for p in pkgs:
        if p["url"].startswith("file://"):
            shutil.copy(p["url"][len("file://"):], dest)
        else:
            remote.append(p["url"])
    if remote:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest),
                        *pip_target_args(py), *remote], check=True)
    out = {}
    for f in dest.glob("*.whl"):
        out[canon(f.name.split("-")[0])] = f
    return out


FMNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def add_data(src: Path, dest: Path, limits: Optional[dict[str, Optional[int]]] = None) -> list[str]:
    """Fashion-MNIST's IDX files from ``src`` (gzipped or not) into ``dest`` uncompressed: the outer xz packs
    them to ~26 MB, against 31 MB for the four .gz files. ``limits`` ({"train": N, "t10k": M}) keeps only the
    first N / M images and labels of a split (the header's count rewritten), for the GPU check's data archive."""
    import gzip
    import struct

    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for stem in FMNIST_FILES:
        gz, raw = src / (stem + ".gz"), src / stem
        if gz.exists():
            with gzip.open(gz, "rb") as f:
                data = f.read()
        elif raw.exists():
            data = raw.read_bytes()
        else:
            raise FileNotFoundError(f"--data {src}: {stem}[.gz] missing")
        n = (limits or {}).get(stem.split("-")[0])
        if n is not None:  # IDX: 2 zero bytes, type, ndim, ndim big-endian uint32 sizes, then the uint8 items
            ndim = data[3]
            shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
            n = min(n, shape[0])
            per = len(data[4 + 4 * ndim:]) // shape[0]
            data = data[:4] + struct.pack(f">{ndim}I", n, *shape[1:]) + data[4 + 4 * ndim:4 + 4 * ndim + n * per]
        (dest / stem).write_bytes(data)
        out.append(stem)
    return out


def pack_data(src: Path, out: Path, train: Optional[int], test: Optional[int], log=print,
              preset: int = 9 | lzma.PRESET_EXTREME) -> int:
    """An archive of only Fashion-MNIST's IDX files (``fashion-mnist/``, uncompressed inside, xz -9e outside),
    train and t10k cut to their first ``train`` / ``test`` images; returns its bytes. `make gpu-data`: the images
    benchmarks/gpu_check.py reads on a GPU machine that lacks the dataset (train[0:50000], t10k[0:2000]: ~20 MB)."""
    with tempfile.TemporaryDirectory() as td:
        files = add_data(src, Path(td) / "fashion-mnist", {"train": train, "t10k": test})
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".part")
        with tarfile.open(tmp, "w:xz", preset=preset) as tar:
            tar.add(Path(td) / "fashion-mnist", arcname="fashion-mnist")
        os.replace(tmp, out)
    log(f"[bundle] {out}: {out.stat().st_size / 1e6:.1f} MB ({', '.join(files)}; train {train}, t10k {test})")
    return out.stat().st_size


def build(py: str, out: Path, have_file: Optional[str], work: Optional[Path] = None, trim_ray: bool = True,
          data: Optional[Path] = None, log=print) -> dict:
    t0 = time.time()
    work = Path(work or tempfile.mkdtemp(prefix="coopt-bundle-"))
    reqs = project_requirements()
    log(f"[bundle] resolving {len(reqs)} pinned requirements for Python {py} (torch stack stubbed)")
    closure = resolve(reqs, py, work, log=log)
    have = read_have(have_file)
    dl = _download([p for p in closure if not NEVER.match(p["name"])], py, work / "download")
    sizes = {n: f.stat().st_size for n, f in dl.items()}
    man = manifest(reqs, closure, have, sizes)
    tag = f"coopt-bundle-py{py.replace('.', '')}"
    stage = work / tag
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "wheels").mkdir(parents=True)
    trimmed = None
    for name, _version in man["shipped"]:
        src = dl[name]
        if name == "ray" and trim_ray:
            trimmed = repack_wheel(src, stage / "wheels" / src.name, drop=RAY_DROP, strip=True)
            log(f"[bundle] ray trimmed: {trimmed}")
        else:
            repack_wheel(src, stage / "wheels" / src.name, strip=True)  # same members, ELF stripped, stored
    log("[bundle] building the project's wheel")
    src = work / "src"  # a copy: setuptools leaves build/ in the folder it builds
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(ROOT / "coopt_ray", src / "coopt_ray", ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, src / f)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(stage / "wheels"), str(src)],
                   check=True)
    data_files = add_data(data, stage / "data" / "fashion-mnist") if data else []
    (stage / "requirements.txt").write_text("\n".join(man["install"]) + "\n")
    meta = {"python": py, "platforms": list(PLATFORMS), "ray_trimmed": trimmed, "ray_dropped": list(RAY_DROP) if trim_ray else [],
            "have_file": have_file, "have_min_bytes": HAVE_MIN_BYTES, "built": time.strftime("%Y-%m-%d %H:%M:%S"),
            "needs_on_target": sorted({p[0] for p in man["left_out"]}), "data": data_files, **man,
            "wheels": sorted(f.name for f in (stage / "wheels").glob("*.whl"))}
    (stage / "bundle.json").write_text(json.dumps(meta, indent=1))
    out.parent.mkdir(parents=True, exist_ok=True)
    log(f"[bundle] packing {out} (xz -9)")
    tmp = out.with_name(out.name + ".part")
    with tarfile.open(tmp, "w:xz", preset=9) as tar:
        tar.add(stage, arcname=tag)
    os.replace(tmp, out)
    meta["bytes"] = out.stat().st_size
    log(f"[bundle] {out}: {meta['bytes'] / 1e6:.1f} MB, {len(meta['wheels'])} wheels, {time.time() - t0:.0f}s")
    return meta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python-version", default="3.12")
    ap.add_argument("--out", default=None, help="default: dist/coopt-bundle-pyXY.tar.xz")
    ap.add_argument("--have", default=None, help="file: packages the target already has (left out when large)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    ap.add_argument("--full-ray", action="store_true", help="ship Ray's wheel untrimmed")
    ap.add_argument("--data", default=None, help="a Fashion-MNIST IDX folder to carry as data/fashion-mnist (optional)")
    ap.add_argument("--data-only", default=None, metavar="OUT",
                    help="write only a data archive of --data to OUT (no wheels); see --data-train/--data-test")
    ap.add_argument("--data-train", type=int, default=None, help="--data-only: the first N train images (default all)")
    ap.add_argument("--data-test", type=int, default=None, help="--data-only: the first N t10k images (default all)")
    a = ap.parse_args(argv)
    if a.data_only:
        pack_data(Path(a.data or "/usr/share/datasets/fashion-mnist"), Path(a.data_only), a.data_train, a.data_test)
        return 0
    out = Path(a.out or ROOT / "dist" / f"coopt-bundle-py{a.python_version.replace('.', '')}.tar.xz")
    build(a.python_version, out, a.have, Path(a.work) if a.work else None, trim_ray=not a.full_ray,
          data=Path(a.data) if a.data else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
