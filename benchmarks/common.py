"""Shared helpers for the benchmark scripts: configs for optimize runs, data, JSON, machine info."""
from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from coopt_ray.config import parse_config  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def machine() -> dict:
    """What the numbers were measured on."""
    import torch

    info = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        info["load_avg_at_start"] = [round(x, 1) for x in os.getloadavg()]
    except OSError:
        pass
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        pass
    return info


def zoo_teachers(zoo_dir: Path, quick: bool) -> list[dict]:
    """The zoo's teacher records (built, or reused from cache, by ``coopt_ray.zoo.build_zoo``)."""
    from coopt_ray.zoo import ZOO_JSON, build_zoo

    zj = zoo_dir / ZOO_JSON
    if zj.exists():
        doc = json.loads(zj.read_text())
        teachers = doc["teachers"]
        for t in teachers:  # the folder may have moved since it was built
            t["path"] = str((zoo_dir / t["name"]).resolve())
            t["model"] = "local-dir:" + t["path"]
        return teachers
    if quick:  # do not race a full build of the shared zoo: a reduced one of our own
        q = ROOT / "runs" / "bench-zoo-quick"
        log(f"[bench] no {zj}: using a reduced zoo (2,000 public images) at {q}")
        return build_zoo(q, n_train=2000, n_test=2000)
    log(f"[bench] no {zj}: building the zoo there")
    return build_zoo(zoo_dir)


def optimize_config(teachers: list[dict], limit: Optional[int], seed: int = 0, shared_fraction: float = 0.0005,
                    shared_min: int = 16, align: bool = True, ridge: float = 1e-2, actors: int = 1,
                    batch_size: int = 512, num_cpus: float = 1.0, select: str = "fixed"):
    """A validated Config for ``run_optimize``: one participant per teacher record, Fashion-MNIST source."""
    raw = {
        "seed": seed,
        "data": {"source": "fashion-mnist", "image_size": 32, "limit": limit},
        "participants": [{"name": f"p{i}", "model": t["model"], "batch_size": batch_size, "num_gpus": 0,
                          "actors": actors, "num_cpus": num_cpus} for i, t in enumerate(teachers)],
        "shared": {"fraction": shared_fraction, "min": shared_min},
        "align": {"ridge": ridge, "enabled": align, "select": select},
        "student": {"arch": "resnet18", "epochs": 1, "batch_size": 256, "workers": 1},
    }
    return parse_config(raw, base_dir=str(ROOT))


def fresh_dir(p: Path) -> Path:
    shutil.rmtree(p, ignore_errors=True)
    p.mkdir(parents=True)
    return p


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_default))
    os.replace(tmp, path)


def read_rows(path: Path, ids=None, columns=("id", "image", "target")) -> dict:
    """Columns of a row set (RUN/optimized, a distilled data/ folder): "image" uint8 N x 32 x 32 x 3, "target"
    float32 N x D, "label" an int array, any other column a list; only ``ids``, in that order, when given."""
    import pyarrow.parquet as pq

    from coopt_ray.embeddings import column_matrix
    from coopt_ray.images import decode_image, resize_rgb

    t = pq.read_table(str(path), columns=list(columns), filters=[("id", "in", list(ids))] if ids is not None else None)
    got = t.column("id").to_pylist()
    at = {v: j for j, v in enumerate(got)}
    order = [at[i] for i in ids] if ids is not None else list(range(len(got)))
    out = {}
    for name in columns:
        if name == "target":
            out[name] = column_matrix(t.column(name))[order]
            continue
        vals = t.column(name).to_pylist()  # once per column: a scalar at a time is far slower
        picked = [vals[j] for j in order]
        if name == "image":
            out[name] = np.stack([resize_rgb(decode_image(b), 32) for b in picked])
        else:
            out[name] = np.asarray(picked) if name == "label" else picked
    return out


def load_levers(pattern: str) -> list[dict]:
    """The lever runs ``benchmarks/results/levers/<pattern>`` (one thing changed each), in file-name order."""
    return [json.loads(p.read_text()) for p in sorted((RESULTS / "levers").glob(pattern))]


def _default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))


def start_ray(tries: int = 5) -> None:
    """Start (or join) Ray via ``cluster.init_ray``, retrying: on an overloaded machine the raylet can miss
    Ray's fixed 30 s start-up window."""
    import ray

    from coopt_ray.cluster import init_ray

    for i in range(tries):
        try:
            init_ray("local", log=log)  # a fresh Ray of its own, never a `ray start` cluster on the machine
            return
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception on start-up timeouts
            if i == tries - 1:
                raise
            log(f"[bench] Ray did not start ({str(e)[:80]}...); retry {i + 2}/{tries}")
            ray.shutdown()
            time.sleep(5)


class FinalProbe:
    """Probes only after the last epoch (the ablations report final accuracy; a probe costs about as much
    as an epoch of a small student on 2 CPU cores). ``fit`` calls it before training and after each epoch."""

    def __init__(self, prober, epochs: int):
        self.prober, self.epochs, self.calls = prober, epochs, 0

    def __call__(self, backbone):
        self.calls += 1
        return self.prober(backbone) if self.calls == self.epochs + 1 else None
