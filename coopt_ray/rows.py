"""Row sets shaped like RUN/optimized (id, image PNG, target): decoded Ray Datasets, streamed target statistics and
seeded subsets, driver-side targets (for distillation)."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import numpy as np

from .embeddings import column_matrix
from .images import decode_image, resize_rgb
from .rundir import RunError


def decode_batch(batch: dict, image_size: int) -> dict:
    """``map_batches`` fn: PNG/JPEG bytes -> uint8 (N, S, S, 3) RGB; targets (and student.heads' columns) pass
    through.

    Every merged row was decoded once by its participant, so a row that no longer decodes means RUN/optimized
    was damaged: fail, naming the id, rather than train on fewer rows than metrics.json would report."""
    imgs = []
    for i, data in enumerate(batch["image"]):
        try:
            imgs.append(resize_rgb(decode_image(data), image_size))
        except ValueError as e:
            raise RunError(f"optimized row {batch['id'][i]!r} no longer decodes ({e}); RUN/optimized is damaged: "
                           "delete RUN/optimized and RUN/manifest.json and rerun `coopt optimize`") from None
    out = {"image": np.stack(imgs) if imgs else np.zeros((0, image_size, image_size, 3), np.uint8)}
    for k in ("target", "own_target"):  # tensor columns -> float32 matrices
        if k in batch:
            m = np.asarray(batch[k], dtype=np.float32)
            if m.dtype == object:
                m = np.stack([np.asarray(t, dtype=np.float32) for t in batch[k]])
            out[k] = m.reshape(len(batch["image"]), -1)
    for k in ("head", "target_weight"):  # per-row scalars (student.heads)
        if k in batch:
            out[k] = np.asarray(batch[k])
    return out


def _keep_ids(batch, ids: frozenset):
    import pyarrow as pa
    import pyarrow.compute as pc

    return batch.filter(pc.is_in(batch.column("id"), value_set=pa.array(sorted(ids), pa.string())))


def _student_hash(ids) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.blake2b(f"student:{seed}:{i}".encode(), digest_size=8).digest(), "little")
                     for seed, i in ids], dtype=np.uint64)


def subset_ids(ids: list[str], limit: Optional[int], seed: int) -> Optional[frozenset]:
    """A seeded random subset of ``limit`` ids (None: use all): the ``limit`` smallest seeded hashes."""
    if limit is None or limit >= len(ids):
        return None
    h = _student_hash((seed, i) for i in ids)
    return frozenset(ids[j] for j in np.argsort(h, kind="stable")[:limit])


def scan(rows_dir: Path, columns: list[str], batch_size: int = 65_536):
    """Record batches of some columns of a Parquet folder, streamed (the driver never holds them all)."""
    import pyarrow.dataset as pads

    return pads.dataset(str(rows_dir), format="parquet").to_batches(columns=columns, batch_size=batch_size)


def streamed_subset(rows_dir: Path, limit: Optional[int], seed: int) -> Optional[frozenset]:
    """``subset_ids`` over a Parquet folder's ids, streamed: memory grows with ``limit``, not with the rows."""
    import pyarrow.parquet as pq

    n = sum(pq.ParquetFile(f).metadata.num_rows for f in Path(rows_dir).glob("*.parquet"))
    if limit is None or limit >= n:
        return None
    best_h, best_ids = np.zeros(0, np.uint64), np.zeros(0, object)
    for b in scan(rows_dir, ["id"]):
        ids = b.column("id").to_pylist()
        best_h = np.concatenate([best_h, _student_hash((seed, i) for i in ids)])
        best_ids = np.concatenate([best_ids, np.array(ids, dtype=object)])
        if len(best_h) > limit:
            keep = np.argpartition(best_h, limit - 1)[:limit]
            best_h, best_ids = best_h[keep], best_ids[keep]
    return frozenset(best_ids.tolist())


def row_moments(rows_dir: Path, keep: Optional[frozenset] = None, dims: Optional[dict] = None,
                aligned: bool = True) -> tuple:
    """One streamed pass over a Parquet folder (only ``keep``'s ids when given): the rows, mean and covariance of
    its aligned ``target`` (``aligned``), and with ``dims`` (participant name -> embedding width) the same of each
    participant's own rows' ``own_target`` (its shard, unaligned). Returns ``((n, mean, cov) or None,
    {name: (n, mean, cov)})``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from .student import TargetMoments

    dims = dims or {}
    m, heads = TargetMoments(), {n: TargetMoments() for n in dims}
    value_set = pa.array(sorted(keep), pa.string()) if keep is not None else None
    columns = ["id"] + (["target"] if aligned else []) + (["participant", "own_target"] if dims else [])
    for b in scan(rows_dir, columns):
        if value_set is not None:
            b = b.filter(pc.is_in(b.column("id"), value_set=value_set))
        if aligned and b.num_rows:
            m.add(column_matrix(b.column("target")))
        for name, d in dims.items():
            t = b.filter(pc.equal(b.column("participant"), name))
            if t.num_rows:
                heads[name].add(column_matrix(t.column("own_target"))[:, :d])
    own = {}
    for name, h in heads.items():
        mean, cov = h.mean_cov() if h.n else (np.zeros(dims[name]), np.zeros((dims[name], dims[name])))
        own[name] = (h.n, mean, cov)
    return ((m.n, *m.mean_cov()) if aligned else None), own


def _head_columns(batch, names: list, weight: float):
    """``map_batches`` fn (student.heads): each row's participant as its head index, and the aligned head's weight."""
    import pyarrow as pa

    pos = {n: k for k, n in enumerate(names)}
    part = batch.column("participant").to_pylist()
    bad = sorted(set(part) - set(pos))
    if bad:
        raise RunError(f"rows of participant(s) {bad} are not among the run's participants {names}")
    batch = batch.drop_columns(["participant"])
    batch = batch.append_column("head", pa.array([pos[p] for p in part], pa.int64()))
    return batch.append_column("target_weight", pa.array([weight] * len(part), pa.float32()))


def _read_rows(path: Path, columns: list, keep: Optional[frozenset]):
    import ray.data

    ds = ray.data.read_parquet(str(path), file_extensions=["parquet"]).select_columns(columns)
    if keep is not None:
        ds = ds.map_batches(_keep_ids, batch_format="pyarrow", fn_kwargs={"ids": keep})
    return ds


def training_dataset(opt_dir: Path, image_size: int, keep: Optional[frozenset] = None, shuffle_seed=None,
                     heads: Optional[list] = None, shared_rows: Optional[Path] = None):
    """RUN/optimized as a Ray Dataset of decoded uint8 images + targets.

    With ``heads`` (the participants' names, student.heads) every row also carries ``own_target``, ``head`` and
    ``target_weight`` (1), and ``shared_rows`` (RUN/shared_rows.parquet) adds S's rows of the participants that do
    not own them, with weight 0 (see :mod:`coopt_ray.heads`).

    The merged parts are grouped by participant, so the rows are globally shuffled once (seeded); the
    images are decoded once and the result is materialized in the object store (50k 32 px images are
    ~150 MB), so an epoch only streams the blocks (each worker adds a local shuffle buffer, reseeded per
    epoch) instead of re-reading, re-shuffling and re-decoding the Parquet every epoch.
    """
    cols = ["id", "image", "target"] + (["participant", "own_target"] if heads else [])
    ds = _read_rows(opt_dir, cols, keep)
    if heads:
        ds = ds.map_batches(_head_columns, batch_format="pyarrow", fn_kwargs={"names": list(heads), "weight": 1.0})
        if shared_rows is not None and Path(shared_rows).is_file():
            extra = _read_rows(shared_rows, cols, keep).map_batches(
                _head_columns, batch_format="pyarrow", fn_kwargs={"names": list(heads), "weight": 0.0})
            ds = ds.union(extra)
    ds = ds.random_shuffle(seed=shuffle_seed)
    ds = ds.map_batches(decode_batch, batch_format="numpy", fn_kwargs={"image_size": image_size},
                        batch_size=256)
    ds = ds.materialize()
    ds.set_name("student_train")
    return ds


def head_moments(rows_dir: Path, dims: dict, keep: Optional[frozenset] = None) -> dict:
    """Per participant (``dims``: name -> embedding width), the rows, mean and covariance of its own rows'
    ``own_target`` (its shard, unaligned), streamed in one pass: ``{name: (n, mean, cov)}``."""
    return row_moments(rows_dir, keep, dims, aligned=False)[1]


def read_targets(opt_dir: Path) -> tuple[list[str], np.ndarray]:
    """Ids and the target matrix of RUN/optimized (driver side, for the standardisation statistics)."""
    import pyarrow.parquet as pq

    t = pq.read_table(str(opt_dir), columns=["id", "target"])
    return t.column("id").to_pylist(), column_matrix(t.column("target"))
