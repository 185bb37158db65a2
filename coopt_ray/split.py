"""The split, once at the source: Ray tasks give every image its owner and its membership of S (pure functions of
its id: data.owner_of, data.in_shared) and write RUN/source/ partitioned by owner, Hive style (``part=<k>/`` holds
D(k) outside S, ``part=S/`` holds S), so participant k reads only ``part=<k>`` and ``part=S`` and the driver
holds nothing per image."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .config import Config, ConfigError, DataConfig
from .data import (PUBLIC_SIZE, count_images, fashion_mnist_dir, fashion_mnist_split, folder_classes, in_shared,
                   iter_image_files, label_for, normalise_parquet_batch, owner_of, parquet_files, shared_threshold,
                   webdataset_keys, webdataset_rows, webdataset_shards)
from .images import encode_png
from .rundir import DONE, SOURCE, RunError, read_done, write_json_atomic

SHARED_PART = "S"
CHUNK = 10_000  # rows per file the Fashion-MNIST and image-folder tasks write
SPLIT_SCHEMA = pa.schema([("id", pa.string()), ("image", pa.binary()), ("path", pa.string()),
                          ("label", pa.int64()), ("owner", pa.int64()), ("shared", pa.bool_())])


@dataclass(frozen=True)
class Split:
    """RUN/source/ as written: the partition folders, and the counts read from its done marker."""

    root: Path
    total: int
    shared: int
    rows: dict            # part name ("0".."K-1", "S") -> rows
    bytes: dict           # part name -> bytes on disk
    source_bytes: int     # bytes of the input the split read
    image_root: Optional[str] = None  # image folders: rows hold paths under this folder, read by the participant
    seconds: float = 0.0  # how long the split took when it ran

    def parts_for(self, index: int) -> list[str]:
        """The partition folders participant ``index`` reads: its own and S's (those that hold rows)."""
        return [str(self.root / f"part={p}") for p in (str(index), SHARED_PART) if self.rows.get(p)]

    def bytes_for(self, index: int) -> int:
        return sum(self.bytes.get(p, 0) for p in (str(index), SHARED_PART))


def split_fingerprint(cfg: Config) -> str:
    """What the split depends on: the seed, the data and shared sections, K and the shares."""
    d = cfg.fingerprint_view()
    key = {"seed": cfg.seed, "data": d["data"], "shared": d["shared"], "k": len(cfg.participants),
           "shares": [p.share for p in cfg.participants]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def assign(t: pa.Table, k: int, seed: int, shares, threshold: float) -> pa.Table:
    """Rows (id, image, label[, path]) -> SPLIT_SCHEMA rows plus the ``part`` column they are written under."""
    ids = t.column("id").to_pylist()
    owner = owner_of(ids, k, seed, shares)
    shared = in_shared(ids, seed, threshold)
    n = t.num_rows
    path = t.column("path") if "path" in t.column_names else pa.array([""] * n, pa.string())
    part = np.where(shared, SHARED_PART, owner.astype(str))
    return pa.table({"id": t.column("id"), "image": t.column("image"), "path": path, "label": t.column("label"),
                     "owner": owner, "shared": shared}, schema=SPLIT_SCHEMA).append_column("part", pa.array(part))


def write_parts(t: pa.Table, root: str, stem: str) -> None:
    """Write an assigned table as ``root/part=<p>/<stem>.parquet`` files, one per part present."""
    part = t.column("part")
    for p in pc.unique(part).to_pylist():
        d = Path(root) / f"part={p}"
        d.mkdir(parents=True, exist_ok=True)
        pq.write_table(t.filter(pc.equal(part, p)).drop_columns(["part"]), d / f"{stem}.parquet")


def _fashion_mnist_task(path: Optional[str], a: int, b: int, root: str, k: int, seed: int, shares, t: float) -> None:
    """Images a..b-1 of the unlabeled split, converted to PNG rows and written into their parts."""
    x, y = fashion_mnist_split("unlabeled", path)
    ids = [f"train/{PUBLIC_SIZE + i}" for i in range(a, b)]
    rows = pa.table({"id": ids, "image": pa.array([encode_png(v) for v in x[a:b]], pa.binary()),
                     "label": pa.array(y[a:b], pa.int64())})
    write_parts(assign(rows, k, seed, shares, t), root, f"fmnist-{a:09d}")


def _images_task(image_root: str, limit: Optional[int], root: str, k: int, seed: int, shares, t: float) -> int:
    """List an image folder (streamed, ``limit`` files at most) into path rows; returns the files' bytes."""
    classes = folder_classes(image_root)
    size, chunk, n = 0, [], 0

    def flush():
        rows = pa.table({"id": chunk, "image": pa.array([b""] * len(chunk), pa.binary()), "path": chunk,
                         "label": pa.array([label_for(r, classes) for r in chunk], pa.int64())})
        write_parts(assign(rows, k, seed, shares, t), root, f"list-{n // CHUNK:06d}")

    for rel in iter_image_files(image_root):
        if limit is not None and n >= limit:
            break
        chunk.append(rel)
        n += 1
        try:
            size += os.path.getsize(os.path.join(image_root, rel))
        except OSError:
            pass  # unreadable: an error row in its participant
        if len(chunk) == CHUNK:
            flush()
            chunk = []
    if chunk:
        flush()
    return size


def _parquet_task(f: str, index: int, rows: int, root: str, k: int, seed: int, shares, t: float) -> None:
    """The first ``rows`` rows of Parquet file number ``index`` (all of it unless ``data.limit`` ends inside it),
    written into their parts, one record batch at a time."""
    pf = pq.ParquetFile(f)
    left, j = rows, 0
    for b in pf.iter_batches(batch_size=CHUNK, columns=[c for c in ("id", "image", "label")
                                                          if c in pf.schema_arrow.names]):
        b = pa.Table.from_batches([b]).slice(0, left)
        write_parts(assign(normalise_parquet_batch(b), k, seed, shares, t), root, f"file{index:06d}-{j:05d}")
        left, j = left - b.num_rows, j + 1
        if left <= 0:
            break


def _webdataset_batch(batch: dict, prefixed: bool, keep: Optional[dict], k: int, seed: int, shares,
                      t: float) -> pa.Table:
    return assign(webdataset_rows(batch, prefixed, keep), k, seed, shares, t)


def _duplicate(part_dir: str) -> Optional[str]:
    """An id that occurs twice in one partition folder (equal ids always share a partition), or None."""
    ids = pq.read_table(part_dir, columns=["id"]).column("id")
    if pc.count_distinct(ids).as_py() == len(ids):
        return None
    vc = pc.value_counts(ids)
    return vc.filter(pc.greater(vc.field("counts"), 1))[0]["values"].as_py()


def _limited(files: list, counts: list[int], limit: Optional[int]) -> list[tuple]:
    """(file, rows to read) in order, up to ``limit`` rows in all."""
    out, left = [], float("inf") if limit is None else limit
    for f, n in zip(files, counts):
        if left <= 0:
            break
        out.append((f, int(min(n, left))))
        left -= n
    return out


def _webdataset_plan(d: DataConfig, remote) -> tuple[list, Optional[dict], bool, int]:
    """WebDataset shards to read, the ``limit`` keep map (the last shard's first keys, one shard's at most),
    whether ids carry their shard's name, and the shards' bytes."""
    files = webdataset_shards(Path(d.path).expanduser().resolve())
    keys = ray_get(remote(_key_range).remote(str(f)) for f in files)
    ranges = sorted((lo, hi) for n, lo, hi in keys if n)
    # Keys repeat across shards only where key ranges overlap: then ids carry the shard's name.
    prefixed = any(b[0] <= a[1] for a, b in zip(ranges, ranges[1:]))
    plan = _limited(files, [n for n, _, _ in keys], d.limit)
    keep = None
    if plan and plan[-1][1] < keys[len(plan) - 1][0]:
        f, r = plan[-1]
        keep = {f.stem: set(ray_get([remote(_first_keys).remote(str(f), r)])[0])}
    files = [f for f, _ in plan]
    return files, keep, prefixed, sum(os.path.getsize(f) for f in files)


def _key_range(shard: str) -> tuple[int, Optional[str], Optional[str]]:
    keys = webdataset_keys(Path(shard))
    return len(keys), min(keys, default=None), max(keys, default=None)


def _first_keys(shard: str, r: int) -> list[str]:
    return webdataset_keys(Path(shard))[:r]


def ray_get(refs, what: str = "", log: Optional[Callable[[str], None]] = None):
    """``ray.get`` of a list of task refs in order; with ``log``, a progress line about every tenth of them."""
    import ray

    refs = list(refs)
    if log is None or len(refs) < 10:
        return ray.get(refs)
    pending, step, t0 = list(refs), max(1, len(refs) // 10), time.time()
    while pending:
        _, pending = ray.wait(pending, num_returns=min(step, len(pending)))
        log(f"[split] {what}: {len(refs) - len(pending)}/{len(refs)} done ({time.time() - t0:.0f}s)")
    return ray.get(refs)


def load_split(root: Path, fingerprint: str) -> Optional[Split]:
    done = read_done(root)
    if not done or done.get("fingerprint") != fingerprint:
        return None
    return Split(root, done["total"], done["shared"], done["rows"], done["bytes"], done["source_bytes"],
                 done.get("image_root"), done.get("seconds", 0.0))


def run_split(cfg: Config, run: Path, log: Callable[[str], None] = print) -> Split:
    """Write RUN/source/ (partitioned by owner, plus S) unless it is already there for this split; Ray must be up."""
    import ray
    import ray.data

    root, fp, d = run / SOURCE, split_fingerprint(cfg), cfg.data
    done = load_split(root, fp)
    if done:
        log(f"[split] already done: {done.total} images, |S|={done.shared} ({root})")
        return done
    t0 = time.time()
    k, seed, shares = len(cfg.participants), cfg.seed, [p.share for p in cfg.participants]
    n = count_images(d)
    t = shared_threshold(n, cfg.shared.fraction, cfg.shared.min)
    tmp = run / (SOURCE + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    args = (str(tmp), k, seed, shares, t)
    how = dict(k=k, seed=seed, shares=shares, t=t)
    remote = ray.remote(num_cpus=1)
    log(f"[split] {n} images of {d.source} into K={k} owner partitions + S (expected |S|={round(t * n)}) "
        f"-> {root}")
    image_root, check_unique = None, d.source in ("parquet", "webdataset")
    if d.source == "fashion-mnist":
        src = fashion_mnist_dir(d.path)
        source_bytes = sum(f.stat().st_size for f in src.glob("train-*"))
        edges = list(range(0, n, CHUNK)) + [n]
        ray_get((remote(_fashion_mnist_task).remote(d.path, a, b, *args) for a, b in zip(edges, edges[1:])),
                "chunks", log)
    elif d.source == "images":
        image_root = str(Path(d.path).expanduser().resolve())
        source_bytes = ray_get([remote(_images_task).remote(image_root, d.limit, *args)])[0]
    elif d.source == "parquet":  # one task per file
        files = parquet_files(Path(d.path).expanduser().resolve())
        plan = _limited(files, [pq.ParquetFile(f).metadata.num_rows for f in files], d.limit)
        source_bytes = sum(os.path.getsize(f) for f, _ in plan)
        ray_get((remote(_parquet_task).remote(str(f), i, r, *args) for i, (f, r) in enumerate(plan)), "files", log)
    else:  # Ray Data's WebDataset reader; raw member bytes: a bad image is an error row in its participant
        files, keep, prefixed, source_bytes = _webdataset_plan(d, remote)
        ds = ray.data.read_webdataset([str(f) for f in files], decoder=None)
        ds = ds.map_batches(_webdataset_batch, batch_format="numpy", batch_size=None,
                            fn_kwargs=dict(prefixed=prefixed, keep=keep, **how))
        ds.set_name("split")
        ds.write_parquet(str(tmp), partition_cols=["part"])
    parts = sorted(p.name.split("=", 1)[1] for p in tmp.glob("part=*"))
    files = {p: list((tmp / f"part={p}").glob("*.parquet")) for p in parts}
    rows = {p: sum(pq.ParquetFile(f).metadata.num_rows for f in fs) for p, fs in files.items()}
    if check_unique:
        for p, dup in zip(parts, ray_get(remote(_duplicate).remote(str(tmp / f"part={p}")) for p in parts)):
            if dup is not None:
                raise ConfigError(f"'data.path': ids in {d.path} are not unique ({dup!r} occurs more than once)")
    total = sum(rows.values())
    if total == 0:
        raise ConfigError(f"'data.path': no images found in {d.path}")
    if not rows.get(SHARED_PART):
        raise RunError(f"the shared subset S came out empty ({n} images, expected |S|={t * n:.1f}); "
                       "raise shared.min or shared.fraction")
    done = {"fingerprint": fp, "total": total, "shared": rows[SHARED_PART], "rows": rows,
            "bytes": {p: sum(f.stat().st_size for f in fs) for p, fs in files.items()},
            "source_bytes": int(source_bytes), "image_root": image_root, "seconds": round(time.time() - t0, 3)}
    write_json_atomic(tmp / DONE, done)
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    log(f"[split] {total} images: " + ", ".join(f"part={p} {rows[p]}" for p in parts)
        + f" in {done['seconds']:.1f}s")
    return load_split(root, fp)


def read_files(batch: pa.Table, image_root: str) -> pa.Table:
    """Image-folder rows: read each file's bytes (an unreadable file keeps empty bytes and its reason)."""
    images, errors = [], []
    for rel in batch.column("path").to_pylist():
        try:
            with open(os.path.join(image_root, rel), "rb") as f:
                images.append(f.read())
            errors.append("")
        except OSError as e:
            images.append(b"")
            errors.append(f"cannot read file: {e.strerror or e}")
    return batch.set_column(batch.schema.get_field_index("image"), "image", pa.array(images, pa.binary())) \
        .append_column("read_error", pa.array(errors, pa.string()))


def participant_rows(batch: pa.Table, index: int) -> pa.Table:
    """Split rows -> the embedder's input: ``owned`` (owner == index) and ``is_shared`` flags."""
    owned = pc.equal(batch.column("owner"), index)
    out = batch.drop_columns(["owner", "shared", "path"])
    return out.append_column("owned", owned).append_column("is_shared", batch.column("shared"))


def participant_dataset(split: Split, index: int, name: str):
    """Participant ``index``'s rows, D(index) ∪ S, read from its two partitions only."""
    import ray.data

    ds = ray.data.read_parquet(split.parts_for(index), partitioning=None, file_extensions=["parquet"])
    if split.image_root:
        ds = ds.map_batches(read_files, batch_format="pyarrow", fn_kwargs=dict(image_root=split.image_root))
    ds = ds.map_batches(participant_rows, batch_format="pyarrow", fn_kwargs=dict(index=index))
    ds.set_name(name)
    return ds
