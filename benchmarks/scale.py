"""The data path at scale: the optimize stage on 50k and 500k synthetic images (K = 4 zoo teachers), side by side.

    python benchmarks/scale.py            # CPU protocol: 50k and 500k images (~40 min on 2 cores)
    python benchmarks/scale.py --quick    # 5k and 20k images (the smoke test's protocol)

Measures, each optimize run in its own fresh process (that process is the driver):
- the driver's peak memory (VmHWM) at both sizes, and a control driver that holds the ids and their hashes as
  the old code path did (a list built from the source plus the sorted hash array), whose figure must rise;
- optimize wall time, large / small;
- bytes each participant reads / the source's bytes, against 1/K + |S|/N: its partitions' size on disk, and the
  bytes its read operator produced according to Ray Data's stats;
- optimize images/s against the plain single-process loop over the same models and rows, at both sizes;
- the driver's Python heap peak (tracemalloc), which shows what the driver itself holds apart from native buffers;
- the placement levers on 2 cores, at the small size (one CPU is kept for reading): 1 CPU per actor (one pool at
  a time), 0.5 (two at a time) and 0.25 (all four at once, one wave); the large run uses the fastest.
Writes benchmarks/results/scale[_quick].json. GPU protocol: the same command on a GPU node with `--num-gpus 0.25`
(four pools share the GPU in one wave); the plain loop then runs on the GPU too.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, ROOT, fresh_dir, log, machine, start_ray, write_json, zoo_teachers
from coopt_ray.config import parse_config


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", help="small,large image counts (default 50000,500000; quick 5000,20000)")
    ap.add_argument("--shard-rows", type=int, default=10_000, help="images per synthetic Parquet shard")
    ap.add_argument("--num-gpus", type=float, default=0.0, help="per actor (GPU protocol: 0.25)")
    ap.add_argument("--zoo", default=str(ROOT / "zoo"))
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.sizes = [int(s) for s in (a.sizes or ("5000,20000" if a.quick else "50000,500000")).split(",")]
    tag = "_quick" if a.quick else ""
    a.work = Path(a.work or ROOT / "runs" / f"bench-scale{tag.replace('_', '-')}")
    a.out = Path(a.out or RESULTS / f"scale{tag}.json")
    return a


def scale_config(teachers: list[dict], src: str, limit: int, num_cpus: float, num_gpus: float = 0.0):
    raw = {
        "seed": 0, "data": {"source": "parquet", "path": src, "image_size": 32, "limit": limit},
        "participants": [{"name": f"p{i}", "model": t["model"], "batch_size": 512, "num_gpus": num_gpus,
                          "actors": 1, "num_cpus": num_cpus} for i, t in enumerate(teachers)],
        "shared": {"fraction": 0.0005, "min": 16},
        "student": {"arch": "resnet18", "epochs": 1, "batch_size": 256, "workers": 1},
    }
    return parse_config(raw, base_dir=str(ROOT))


# ---------------------------------------------------------------- one optimize run, in a fresh process
def child(spec: dict) -> None:
    """Subprocess body: run_optimize once and print the driver's own peak memory and the run's figures.
    ``hold_ids``: the control, holding what the old code path held on the driver (every id in a list, their
    hashes and the argsort that picked S)."""
    import numpy as np
    import pyarrow.parquet as pq

    from coopt_ray.pipeline import run_optimize
    from throughput import vm_hwm_mb

    import tracemalloc

    import ray

    from coopt_ray.cluster import plan_waves

    tracemalloc.start(1)  # the driver's Python heap: what the driver itself holds, apart from native buffers
    held = None
    cfg = scale_config(spec["teachers"], spec["src"], spec["limit"], spec["num_cpus"], spec["num_gpus"])
    if spec["hold_ids"]:
        from coopt_ray.data import _hash64

        ids = pq.read_table(spec["src"], columns=["id"]).slice(0, spec["limit"]).column("id").to_pylist()
        h = _hash64(ids, "shared:0")
        held = (ids, h, np.argsort(h, kind="stable"))
    run = fresh_dir(Path(spec["run"]))
    start_ray()
    waves = len(plan_waves(cfg.participants, ray.cluster_resources()).waves)
    t0 = time.time()
    man = run_optimize(cfg, run, log=lambda m: None)
    wall = time.time() - t0
    rows = sum(p["rows"] + p["shared_rows"] for p in man["participants"])
    print("SCALE_RESULT " + json.dumps({
        "images": man["total_rows"], "num_cpus": spec["num_cpus"], "hold_ids": spec["hold_ids"],
        "held_ids": 0 if held is None else len(held[0]), "vm_hwm_mb": vm_hwm_mb(),
        "py_heap_peak_mb": round(tracemalloc.get_traced_memory()[1] / 2**20, 1), "waves": waves,
        "wall_seconds": round(wall, 2),
        "timings": man["timings"], "rows_embedded": rows, "images_per_s": round(rows / wall, 1),
        "split": man["split"], "participants": {p["name"]: p["seconds"] for p in man["participants"]},
    }), flush=True)


def run_child(a, teachers, src: Path, limit: int, num_cpus: float, hold_ids: bool = False) -> dict:
    spec = dict(teachers=teachers, src=str(src), limit=limit, num_cpus=num_cpus, num_gpus=a.num_gpus,
                hold_ids=hold_ids, run=str(a.work / f"run_{limit}_{num_cpus}_{int(hold_ids)}"))
    log(f"[scale] optimize {limit} images, {num_cpus} CPU/actor{', control holding the ids' if hold_ids else ''}")
    p = subprocess.run([sys.executable, __file__, "--_child", json.dumps(spec)], capture_output=True, text=True,
                       env={**os.environ, "COOPT_PROGRESS": "0"}, cwd=str(Path(__file__).parent))
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("SCALE_RESULT ")), None)
    if line is None:
        raise RuntimeError(f"optimize on {limit} images failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    r = json.loads(line.split(" ", 1)[1])
    r["run"] = spec["run"]
    log(f"[scale]   {r['wall_seconds']}s, {r['images_per_s']} img/s, driver VmHWM {r['vm_hwm_mb']} MB, "
        f"Python heap peak {r['py_heap_peak_mb']} MB")
    return r


def plain(run: str, teachers, src: Path, limit: int, threads: int) -> dict:
    """The plain single-process loop (throughput.plain_optimize) over exactly the rows the run embedded."""
    from throughput import plain_optimize

    cfg = scale_config(teachers, str(src), limit, 1.0)
    return plain_optimize(cfg, Path(run), threads=threads)


def read_fractions(r: dict, k: int) -> dict:
    s = r["split"]
    want = 1 / k + s["shared"] / r["images"]
    got = s["read_fraction"]
    ray = [v for v in (s.get("ray_read_bytes") or {}).values() if v]
    return {"per_participant": got, "mean": round(sum(got.values()) / len(got), 4),
            "expected_1_over_k_plus_s": round(want, 4),
            "ray_stats_mean": round(sum(ray) / len(ray) / s["source_bytes"], 4) if ray else None}


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a._child:
        child(json.loads(a._child))
        return {}
    import ray

    sys.path.insert(0, str(Path(__file__).parent))
    teachers = zoo_teachers(Path(a.zoo), a.quick)[:4]
    small, large = a.sizes
    res = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k != "_child"},
           "machine": machine(), "teachers": [t["name"] for t in teachers]}
    a.work.mkdir(parents=True, exist_ok=True)
    src = a.work / f"synthetic-{large}"
    if not (src / "_DONE").exists():
        import make_synthetic as MS

        fresh_dir(src)
        start_ray()
        res["synthetic"] = MS.make_synthetic(large, src, "parquet", shards=max(1, large // a.shard_rows), seed=0)
        (src / "_DONE").write_text(json.dumps(res["synthetic"]))
        ray.shutdown()
        log(f"[scale] wrote {large} synthetic images in {res['synthetic']['seconds']}s -> {src}")
    else:
        res["synthetic"] = json.loads((src / "_DONE").read_text())

    def save():
        write_json(a.out, res)

    # The placement levers at the small size: which one the large runs use is picked here, by images/s.
    levers = {c: run_child(a, teachers, src, small, c) for c in (1.0, 0.5, 0.25)}
    best = max(levers, key=lambda c: levers[c]["images_per_s"])
    res["levers"] = {f"num_cpus_{c}": {"images_per_s": r["images_per_s"], "wall_seconds": r["wall_seconds"],
                                       "waves": r["waves"]} for c, r in levers.items()}
    res["levers"]["chosen_num_cpus"] = best
    save()
    runs = {small: levers[best], large: run_child(a, teachers, src, large, best)}
    res["runs"] = {str(n): r for n, r in runs.items()}
    save()
    ctrl = {n: run_child(a, teachers, src, n, best, hold_ids=True) for n in (small, large)}
    res["control"] = {str(n): r for n, r in ctrl.items()}
    save()
    res["plain"] = {}
    for n, r in runs.items():
        res["plain"][str(n)] = {t: plain(r["run"], teachers, src, n, t) for t in (1, os.cpu_count() or 1)}
        log(f"[scale] plain loop on {n} images: " + ", ".join(
            f"{t} thread(s) {p['images_per_s']} img/s" for t, p in res["plain"][str(n)].items()))
        save()
    k = len(teachers)
    res["summary"] = {
        "driver_mb": {str(n): r["vm_hwm_mb"] for n, r in runs.items()},
        "driver_ratio": round(runs[large]["vm_hwm_mb"] / runs[small]["vm_hwm_mb"], 3),
        "control_driver_mb": {str(n): r["vm_hwm_mb"] for n, r in ctrl.items()},
        "control_ratio": round(ctrl[large]["vm_hwm_mb"] / ctrl[small]["vm_hwm_mb"], 3),
        "control_growth_mb": round(ctrl[large]["vm_hwm_mb"] - ctrl[small]["vm_hwm_mb"], 1),
        "py_heap_peak_mb": {str(n): r["py_heap_peak_mb"] for n, r in runs.items()},
        "control_py_heap_peak_mb": {str(n): r["py_heap_peak_mb"] for n, r in ctrl.items()},
        "growth_mb": round(runs[large]["vm_hwm_mb"] - runs[small]["vm_hwm_mb"], 1),
        "wall_seconds": {str(n): r["wall_seconds"] for n, r in runs.items()},
        "wall_ratio": round(runs[large]["wall_seconds"] / runs[small]["wall_seconds"], 3),
        "size_ratio": large / small,
        "read_fraction": {str(n): read_fractions(r, k) for n, r in runs.items()},
        "vs_plain": {str(n): {f"{t}_thread": round(r["images_per_s"] / p["images_per_s"], 3)
                              for t, p in res["plain"][str(n)].items()} for n, r in runs.items()},
    }
    save()
    log(f"[scale] done -> {a.out}")
    for key, v in res["summary"].items():
        log(f"  {key}: {v}")
    return res


if __name__ == "__main__":
    main()
