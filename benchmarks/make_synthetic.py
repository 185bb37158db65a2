"""Write N small PNG images for scale tests, as Parquet shards (id, image, label) or WebDataset tars (<key>.png,
<key>.cls, <key>.json), one Ray task per shard.

Images are Fashion-MNIST's unlabeled split cycled, each with its own seeded pixel noise and shift, so every image
is distinct, decodes like a real one and keeps a label; without Fashion-MNIST they are seeded noise (label -1).

    python benchmarks/make_synthetic.py --n 500000 --shards 64 --format parquet --out runs/synthetic-500k
    python benchmarks/make_synthetic.py --n 50000 --shards 16 --format webdataset --out runs/synthetic-wds-50k
Then `data: {source: parquet | webdataset, path: <out>}`.
"""
from __future__ import annotations

import argparse
import io
import json
import tarfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

from common import log, start_ray


def _base_images() -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    try:
        from coopt_ray.data import fashion_mnist_split

        return fashion_mnist_split("unlabeled")
    except Exception:  # noqa: BLE001 - no Fashion-MNIST here: noise images
        return None, None


def make_image(i: int, seed: int, base: Optional[np.ndarray], labels: Optional[np.ndarray]) -> tuple[bytes, int]:
    """Image ``i`` as PNG bytes and its label: a base image shifted and noised with an ``(seed, i)`` RNG."""
    from coopt_ray.images import encode_png

    rng = np.random.default_rng([seed, i])
    if base is None:
        return encode_png(rng.integers(0, 256, (28, 28), dtype=np.uint8)), -1
    img = np.roll(base[i % len(base)], tuple(rng.integers(-2, 3, 2)), axis=(0, 1)).astype(np.int16)
    img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
    return encode_png(img), int(labels[i % len(labels)])


def write_shard(shard: int, start: int, stop: int, out: str, fmt: str, seed: int, base_ref=None) -> int:
    """Images ``start..stop-1`` into shard ``shard`` of ``out`` (``fmt``: parquet or webdataset); returns bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    base, labels = base_ref if base_ref is not None else (None, None)
    rows = [make_image(i, seed, base, labels) for i in range(start, stop)]
    ids = [f"syn/{i:09d}" for i in range(start, stop)]
    path = Path(out) / (f"part-{shard:05d}.parquet" if fmt == "parquet" else f"shard-{shard:05d}.tar")
    tmp = path.with_name(path.name + ".tmp")
    if fmt == "parquet":
        pq.write_table(pa.table({"id": ids, "image": [r[0] for r in rows], "label": [r[1] for r in rows]}), tmp)
    else:
        with tarfile.open(tmp, "w") as tf:
            for i, (png, label) in zip(range(start, stop), rows):
                key = f"{i:09d}"
                for ext, data in (("png", png), ("cls", str(label).encode()),
                                  ("json", json.dumps({"index": i}).encode())):
                    ti = tarfile.TarInfo(f"{key}.{ext}")
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
    tmp.rename(path)
    return path.stat().st_size


def make_synthetic(n: int, out: str | Path, fmt: str = "parquet", shards: int = 16, seed: int = 0) -> dict:
    """Write ``n`` images in ``shards`` shards with Ray tasks; returns counts, bytes and seconds."""
    import ray

    if fmt not in ("parquet", "webdataset"):
        raise ValueError(f"format must be parquet or webdataset, got {fmt!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if __name__ != "__main__":  # imported (tests): ship this module's functions by value, workers cannot import it
        import sys

        from ray import cloudpickle

        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    base_ref = ray.put(_base_images())
    task = ray.remote(num_cpus=1)(write_shard)
    edges = np.linspace(0, n, shards + 1).astype(int)
    refs = [task.remote(s, int(a), int(b), str(out), fmt, seed, base_ref)
            for s, (a, b) in enumerate(zip(edges[:-1], edges[1:])) if b > a]
    sizes = ray.get(refs)
    return {"images": n, "shards": len(refs), "format": fmt, "bytes": int(sum(sizes)), "path": str(out),
            "seconds": round(time.time() - t0, 2)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--format", choices=("parquet", "webdataset"), default="parquet")
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    start_ray()
    r = make_synthetic(a.n, a.out, a.format, a.shards, a.seed)
    log(f"[synthetic] {r['images']} images in {r['shards']} {r['format']} shards, {r['bytes'] / 1e6:.1f} MB, "
        f"{r['seconds']:.1f}s -> {r['path']}")


if __name__ == "__main__":
    main()
