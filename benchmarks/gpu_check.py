"""The one prepared GPU check (issue 26): one GPU machine, no network, the offline zoo, < 8 minutes in all.

    bash cluster/install_offline.sh dist/coopt-bundle-py312.tar.xz && python benchmarks/gpu_check.py --out $OUT
    python benchmarks/gpu_check.py --cpu-smoke     # the same steps on the CPU, tiny: ~4 min on 2 loaded cores
The exact device call (with `make gpu-data`'s images for a machine without Fashion-MNIST): docs/gpu.md.

Steps, each a subprocess with its own timeout (a step that hangs cannot eat the others' time):
  zoo       coopt_ray.zoo.build_zoo on the device (what `coopt zoo build --device cuda` runs), with --data-dir
  optimize  ~40k images, 4 participant pools sharing the GPU (num_gpus 0.25 each, one wave)
  plain     a plain single-process GPU loop over the same rows (benchmarks/throughput.plain_optimize) and
            model-only images/s in fp32 and bf16 -> the optimize/plain ratio
  train     `coopt train` with student.use_gpu, 1 worker; then `coopt evaluate`
  krr-st    a short KRR-ST run (configs/fashion-mnist-distill.yaml's shape), use_gpu
  mdatm     a short M-DATM run (configs/fashion-mnist-mdatm.yaml's shape), use_gpu
nvidia-smi utilisation and memory are sampled once a second throughout; each step records its samples' mean/max.
The JSON (default benchmarks/results/gpu_check.json, and --out DIR/gpu_check.json too) is rewritten after every
step, so a run stopped at its limit still reports what it finished. --cpu-smoke writes WORK/gpu_check_cpu_smoke.json
and never the GPU run's file.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, log, machine, write_json  # noqa: E402

FMNIST_DEFAULT = "/usr/share/datasets/fashion-mnist"


# ---------------------------------------------------------------- nvidia-smi sampling
class GpuSampler:
    """Background thread: ``nvidia-smi --query-gpu=utilization.gpu,memory.used`` once a second (t, util %, MiB)."""

    def __init__(self, period: float = 1.0):
        self.samples: list[tuple[float, float, float]] = []
        self.period, self.error = period, None
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "GpuSampler":
        if shutil.which("nvidia-smi") is None:
            self.error = "no nvidia-smi"
        else:
            self._t.start()
        return self

    def _run(self) -> None:
        cmd = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"]
        while not self._stop.is_set():
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()
                util, mem = (float(v) for v in out[0].split(","))  # GPU 0
                self.samples.append((time.time(), util, mem))
            except Exception as e:  # noqa: BLE001 - a failed sample is recorded, never fatal
                self.error = str(e)[:200]
            self._stop.wait(self.period)

    def stop(self) -> None:
        self._stop.set()

    def window(self, t0: float, t1: float) -> Optional[dict]:
        s = [x for x in self.samples if t0 <= x[0] <= t1]
        if not s:
            return None
        u, m = [x[1] for x in s], [x[2] for x in s]
        return {"samples": len(s), "util_mean": round(sum(u) / len(u), 1), "util_max": max(u),
                "util_ge_70_share": round(sum(v >= 70 for v in u) / len(u), 3), "mem_max_mib": max(m)}


# ---------------------------------------------------------------- steps
class Step:
    """One subprocess: ``cmd`` with ``timeout`` seconds; ``figures()`` reads its results afterwards (may raise)."""

    def __init__(self, name: str, cmd: list[str], timeout: float, figures: Optional[Callable[[str], dict]] = None):
        self.name, self.cmd, self.timeout, self.figures = name, cmd, timeout, figures


def run_steps(steps: list[Step], doc: dict, save: Callable[[], None], sampler: Optional[GpuSampler] = None,
              env: Optional[dict] = None, cwd: Optional[Path] = None, deadline: Optional[float] = None) -> dict:
    """Run each step in turn, record {status, rc, seconds, figures, gpu, tail} in ``doc["steps"]`` and ``save()``
    after every step (and before the first). status: ok | failed | timeout | skipped (past ``deadline``)."""
    doc.setdefault("steps", {})
    for s in steps:
        doc["steps"][s.name] = {"status": "running", "cmd": " ".join(s.cmd), "timeout_s": s.timeout}
    save()
    for s in steps:
        rec = doc["steps"][s.name]
        left = None if deadline is None else deadline - time.time()
        if left is not None and left < 10:
            rec["status"] = "skipped"
            rec["why"] = "the check's overall limit was reached"
            save()
            continue
        timeout = s.timeout if left is None else min(s.timeout, left)
        log(f"[gpu_check] {s.name}: {rec['cmd'][:160]} (timeout {timeout:.0f}s)")
        t0 = time.time()
        try:
            p = subprocess.run(s.cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd,
                               start_new_session=True)
            rc, out = p.returncode, (p.stdout or "") + (p.stderr or "")
            rec["status"] = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired as e:
            rc = None
            out = _text(e.stdout) + _text(e.stderr)
            rec["status"] = "timeout"
        t1 = time.time()
        rec.update(rc=rc, seconds=round(t1 - t0, 2), tail=out[-1500:])
        if rec["status"] == "ok" and s.figures is not None:
            try:
                rec["figures"] = s.figures(out)
            except Exception as e:  # noqa: BLE001 - a step's figures failing is recorded, not fatal
                rec["figures_error"] = f"{type(e).__name__}: {e}"
        if sampler is not None:
            rec["gpu"] = sampler.window(t0, t1)
        log(f"[gpu_check] {s.name}: {rec['status']} in {rec['seconds']}s {json.dumps(rec.get('figures'))[:300]}")
        save()
    return doc


def _text(b) -> str:
    if b is None:
        return ""
    return b.decode(errors="replace") if isinstance(b, bytes) else b


def result_line(out: str, tag: str = "GPU_CHECK_RESULT") -> dict:
    """The JSON a helper subprocess printed on its ``GPU_CHECK_RESULT {...}`` line."""
    line = next(ln for ln in reversed(out.splitlines()) if ln.startswith(tag + " "))
    return json.loads(line.split(" ", 1)[1])


# ---------------------------------------------------------------- configs
def sizes(smoke: bool) -> dict:
    """The GPU mode's sizes, or the CPU smoke's: the same steps and code paths, tiny (2 pools, 1 epoch, 300 images).
    The GPU mode reads Fashion-MNIST train[0:50000] and t10k[0:2000] only (make gpu-data packs just those)."""
    if smoke:
        return dict(images=300, participants=2, batch=128, epochs=1, arch="test_vit", krr_steps=2, krr_size=50,
                    mdatm_iters=2, limit_lab=300, experts=2, probe_epochs=3, probe_limit=200, zoo_teachers=2,
                    zoo_train=300, device="cpu", gpu=0, frac=0, timeout_scale=3)
    return dict(images=40000, participants=4, batch=512, epochs=2, arch="resnet18", krr_steps=200, krr_size=1000,
                mdatm_iters=100, limit_lab=10000, experts=4, probe_epochs=50, probe_limit=2000, zoo_teachers=5,
                zoo_train=None, device="cuda", gpu=1, frac=0.25, timeout_scale=1)


def write_configs(work: Path, zoo: Path, z: dict, data_path: Optional[str]) -> dict:
    """optimize/train (one YAML), krr-st and mdatm configs, from the shipped configs' shapes."""
    import yaml

    use_gpu = z["gpu"] > 0
    base = yaml.safe_load((ROOT / "configs" / "fashion-mnist.yaml").read_text())
    base["zoo_dir"] = str(zoo)
    base["data"].update(limit=z["images"], path=data_path)
    base["participants"] = base["participants"][: z["participants"]]
    for p in base["participants"]:  # 4 pools, one wave on one GPU
        p.update(num_gpus=z["frac"], batch_size=z["batch"], actors=1)
    base["student"].update(arch=z["arch"], epochs=z["epochs"], batch_size=256, workers=1, use_gpu=use_gpu)
    base["eval"] = {"probe_epochs": z["probe_epochs"], "probe_limit": z["probe_limit"], "test_limit": z["probe_limit"]}
    out = {"optimize": work / "optimize.yaml", "krr": work / "krr.yaml", "mdatm": work / "mdatm.yaml"}
    out["optimize"].write_text(yaml.safe_dump(base))
    krr = yaml.safe_load((ROOT / "configs" / "fashion-mnist-distill.yaml").read_text())
    krr.update(zoo_dir=str(zoo), participants=base["participants"], data=base["data"])
    krr["distill"].update(size=z["krr_size"], real_batch=min(256, z["images"] // 2), steps=z["krr_steps"], workers=1,
                          use_gpu=use_gpu, checkpoint_every=max(2, z["krr_steps"] // 2),
                          log_every=max(1, z["krr_steps"] // 4), pool_steps=min(100, z["krr_steps"]))
    out["krr"].write_text(yaml.safe_dump(krr))
    md = yaml.safe_load((ROOT / "configs" / "fashion-mnist-mdatm.yaml").read_text())
    md["zoo_dir"] = str(zoo)
    md["data"]["path"] = data_path
    md["eval"] = {"test_limit": z["probe_limit"]}
    md["distill"].update(iterations=z["mdatm_iters"], labeled_limit=z["limit_lab"], experts=z["experts"],
                         use_gpu=use_gpu, checkpoint_every=max(2, z["mdatm_iters"] // 2),
                         log_every=max(1, z["mdatm_iters"] // 4), eval_runs=1, eval_epochs=50 if use_gpu else 5,
                         expert_epochs=10 if use_gpu else 4, range=[0, 8] if use_gpu else [0, 2])
    out["mdatm"].write_text(yaml.safe_dump(md))
    return out


# ---------------------------------------------------------------- figures of each step
def _json(p: Path) -> dict:
    return json.loads(p.read_text())


def optimize_figures(run: Path) -> Callable[[str], dict]:
    def f(_out):
        m = _json(run / "manifest.json")
        rows = sum(p["rows"] + p["shared_rows"] for p in m["participants"])
        return {"rows_embedded": rows, "timings": m["timings"],
                "embed_images_per_s": round(rows / m["timings"]["optimize"], 1),
                "per_participant_seconds": {p["name"]: p["seconds"] for p in m["participants"]}}
    return f


def train_figures(run: Path) -> Callable[[str], dict]:
    def f(_out):
        hist = []
        for name in ("student/metrics.json", "student/history.json", "student/train.json"):
            if (run / name).exists():
                hist = _json(run / name)
                break
        return {"history": hist, "files": sorted(str(p.relative_to(run)) for p in (run / "student").glob("*.json"))}
    return f


def plain_child(run: str, cfg_path: str, device: str) -> None:
    """Subprocess body: the plain loop over the optimize run's rows, and model-only fp32/bf16 images/s."""
    import torch

    from coopt_ray.config import load_config, resolve_model
    from coopt_ray.models import load_model
    from throughput import plain_optimize

    cfg = load_config(cfg_path)
    plain = plain_optimize(cfg, Path(run), threads=os.cpu_count() or 1, device=device)
    model_only = {}
    p = cfg.participants[0]
    model, _pre, _dim = load_model(resolve_model(cfg, p.model), p.pretrained, device)
    x = torch.randn(p.batch_size, 3, cfg.data.image_size, cfg.data.image_size, device=device)
    for mode in ("fp32", "bf16"):
        with torch.inference_mode(), torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                                                    enabled=mode == "bf16"):
            for _ in range(3):
                model.encode_image(x)
            _sync(device)
            t0, n = time.time(), 0
            while time.time() - t0 < 3.0:
                model.encode_image(x)
                n += x.shape[0]
            _sync(device)
            model_only[mode] = round(n / (time.time() - t0), 1)
    print("GPU_CHECK_RESULT " + json.dumps({"plain": plain, "model_only_images_per_s": {p.model: model_only}}), flush=True)


def zoo_child(args: str) -> None:
    """Subprocess body: ``build_zoo`` on the check's device and data (what `coopt zoo build --device` runs), with
    the first ``teachers`` specs and ``n_train`` public images (None: all; the smoke's are fewer)."""
    from coopt_ray.zoo import ZOO_SPECS, build_zoo

    a = json.loads(args)
    build_zoo(a["out"], specs=ZOO_SPECS[: a["teachers"]], n_train=a["n_train"], n_test=a["n_test"],
              data_path=a["data"], device=a["device"], probe_epochs=a["probe_epochs"])


def _sync(device: str) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (no GPU asked anywhere)")
    ap.add_argument("--out", default=None, help="also write gpu_check.json into this folder ($OUT on the device)")
    ap.add_argument("--json", default=None,
                    help="default benchmarks/results/gpu_check.json; --cpu-smoke: WORK/gpu_check_cpu_smoke.json")
    ap.add_argument("--work", default=None, help="scratch folder (default runs/gpu-check)")
    ap.add_argument("--zoo", default=None, help="zoo folder (default WORK/zoo, built by the zoo step)")
    ap.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX folder (default: the Debian package's; "
                    "on the device machine the unpacked make gpu-data archive)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for all steps together (default 450; --cpu-smoke 2400: 2 loaded cores)")
    ap.add_argument("--only", default="", help="comma list of steps to run (default all)")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    t_start = time.time()
    z = sizes(a.cpu_smoke)
    tag = "_cpu_smoke" if a.cpu_smoke else ""
    work = Path(a.work or ROOT / "runs" / f"gpu-check{tag.replace('_', '-')}")
    outs = [Path(a.json) if a.json else (work if a.cpu_smoke else RESULTS) / f"gpu_check{tag}.json"]
    if a.out:
        outs.append(Path(a.out) / f"gpu_check{tag}.json")
    if a.cpu_smoke and (RESULTS / "gpu_check.json").resolve() in {o.resolve() for o in outs}:
        raise SystemExit("gpu_check: --cpu-smoke never writes benchmarks/results/gpu_check.json (the GPU run's)")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    zoo = Path(a.zoo) if a.zoo else work / "zoo"
    doc = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "mode": "cpu-smoke" if a.cpu_smoke else "gpu",
           "sizes": z, "machine": machine(), "goals": {"optimize_vs_plain": 0.8, "train_gpu_util_mean": 70}}

    def save():
        doc["elapsed_s"] = round(time.time() - t_start, 1)
        for o in outs:
            write_json(o, doc)

    sampler = GpuSampler().start()
    data_path = a.data_dir
    cfgs = write_configs(work, zoo, z, data_path)
    py, run, md = sys.executable, work / "run", work / "mdatm"
    coopt = [py, "-m", "coopt_ray"]
    zoo_args = {"out": str(zoo), "device": z["device"], "data": data_path, "teachers": z["zoo_teachers"],
                "n_train": z["zoo_train"], "n_test": z["probe_limit"], "probe_epochs": 100 if z["gpu"] else 5}
    zoo_cmd = [py, str(Path(__file__).resolve()), "--_zoo", json.dumps(zoo_args)]
    steps = [
        Step("zoo", zoo_cmd, 150, lambda out: {"teachers": _json(zoo / "zoo.json")["teachers"]}),
        Step("optimize", coopt + ["optimize", "--config", str(cfgs["optimize"]), "--out", str(run)], 150,
             optimize_figures(run)),
        Step("plain", [py, str(Path(__file__).resolve()), "--_plain", str(run), str(cfgs["optimize"]), z["device"]], 90,
             result_line),
        Step("train", coopt + ["train", "--config", str(cfgs["optimize"]), "--run", str(run)], 120, train_figures(run)),
        Step("evaluate", coopt + ["evaluate", "--config", str(cfgs["optimize"]), "--run", str(run)], 60,
             lambda out: _json(run / "eval.json")),
        Step("krr-st", coopt + ["distill", "--config", str(cfgs["krr"]), "--run", str(run)], 90,
             lambda out: _json(next((run / "distilled" / "krr-st").glob("distill.json")))),
        Step("mdatm", coopt + ["distill", "--config", str(cfgs["mdatm"]), "--run", str(md)], 90,
             lambda out: _json(next((md / "distilled" / "mdatm").glob("distill.json")))),
    ]
    for s in steps:  # the CPU is far slower than the GPU these limits are sized for
        s.timeout *= z["timeout_scale"]
    budget = a.budget if a.budget is not None else 450 * (1 if z["timeout_scale"] == 1 else 5.3)
    only = {s for s in a.only.split(",") if s}
    if only:
        steps = [s for s in steps if s.name in only]
    env = {**os.environ, "COOPT_PROGRESS": "0", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    try:
        run_steps(steps, doc, save, sampler=sampler, env=env, cwd=ROOT, deadline=t_start + budget)
    finally:
        sampler.stop()
    st = doc["steps"]
    opt, plain = st.get("optimize", {}).get("figures"), st.get("plain", {}).get("figures")
    if opt and plain:
        doc["optimize_vs_plain_ratio"] = round(opt["embed_images_per_s"] / plain["plain"]["images_per_s"], 3)
    if st.get("train", {}).get("gpu"):
        doc["train_gpu_util_mean"] = st["train"]["gpu"]["util_mean"]
    doc["gpu_samples"] = [[round(t - t_start, 1), u, m] for t, u, m in sampler.samples]
    doc["sampler_error"] = sampler.error
    doc["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save()
    log(f"[gpu_check] done in {doc['elapsed_s']}s -> {', '.join(map(str, outs))}: "
        + ", ".join(f"{k} {v['status']}" for k, v in st.items()))
    return doc


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_plain":
        plain_child(*sys.argv[2:5])
    elif len(sys.argv) > 1 and sys.argv[1] == "--_zoo":
        zoo_child(sys.argv[2])
    else:
        main()
