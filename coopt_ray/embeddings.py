"""Participants' embedding folders (RUN/embeddings/<name>/) and Parquet tensor columns as numpy matrices."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .config import Config
from .rundir import EMBEDDINGS


def column_matrix(col) -> np.ndarray:
    """A Parquet/Arrow tensor or list column as a float32 (n, d) matrix."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    n = len(col)
    if n == 0:
        return np.zeros((0, 0), dtype=np.float32)
    if isinstance(col.type, pa.ExtensionType):  # Ray tensor types (fixed or variable shape)
        arr = col.to_numpy()
        if arr.dtype == object:
            arr = np.stack([np.asarray(a, dtype=np.float32).ravel() for a in arr])
        return np.asarray(arr, dtype=np.float32).reshape(n, -1)
    flat = col.flatten()
    while pa.types.is_list(flat.type) or pa.types.is_large_list(flat.type) or pa.types.is_fixed_size_list(flat.type):
        flat = flat.flatten()
    return np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(n, -1)


def embedding_dim(d: Path) -> int:
    """Embedding width stored in a participant's Parquet folder."""
    for f in sorted(d.glob("*.parquet")):
        t = pq.read_table(f, columns=["embedding"])
        if t.num_rows:
            return int(column_matrix(t.column("embedding")).shape[1])
    raise RuntimeError(f"{d} holds no embedding rows")


def read_shared(emb_dir: Path) -> tuple[list[str], np.ndarray]:
    """Ids and embeddings of the readable shared rows S of one participant."""
    t = pq.read_table(emb_dir, columns=["id", "embedding", "is_shared", "error"],
                      filters=[("is_shared", "==", True)])
    t = t.filter(pc.equal(t.column("error"), ""))
    return t.column("id").to_pylist(), column_matrix(t.column("embedding"))


def shared_matrices(cfg: Config, run: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """S's embeddings for every participant, restricted to ids every participant could read, same order."""
    per = {}
    for p in cfg.participants:
        ids, x = read_shared(run / EMBEDDINGS / p.name)
        per[p.name] = dict(zip(ids, x))
    common = sorted(set.intersection(*(set(d) for d in per.values())))
    if len(common) < 2:
        raise RuntimeError(f"only {len(common)} shared images were readable by every participant; need >= 2")
    return common, {n: np.stack([d[i] for i in common]) for n, d in per.items()}
