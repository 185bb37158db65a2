"""Target matrices the fidelity benchmark trains on, read from finished optimize runs.

Every function returns ``(idx, y, part)`` sorted by ``idx``: indices into Fashion-MNIST's unlabeled split,
the target matrix and each row's participant name. The variants that are not the product's own output
(no alignment, a random projection, row weights) are built from the same run's embeddings so that only the
one thing being compared differs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from coopt_ray.align import loo_r2  # noqa: E402
from coopt_ray.data import PUBLIC_SIZE  # noqa: E402
from coopt_ray.embeddings import column_matrix, shared_matrices  # noqa: E402


def _index(ids) -> np.ndarray:
    return np.array([int(i.split("/")[1]) - PUBLIC_SIZE for i in ids])


def _sorted(idx, y, part):
    order = np.argsort(idx)
    return idx[order], y[order], np.asarray(part)[order]


def optimized_targets(run: Path):
    """RUN/optimized as the product wrote it."""
    t = pq.read_table(run / "optimized", columns=["id", "target", "participant"])
    return _sorted(_index(t.column("id").to_pylist()), column_matrix(t.column("target")),
                   t.column("participant").to_pylist())


def shard_embeddings(run: Path, manifest: dict):
    """Per participant (in manifest order): (idx, raw embeddings) of its owned, readable rows."""
    out = {}
    for p in manifest["participants"]:
        t = pq.read_table(run / "embeddings" / p["name"], columns=["id", "embedding", "owned", "error"])
        t = t.filter(pc.and_(t.column("owned"), pc.equal(t.column("error"), "")))
        out[p["name"]] = (_index(t.column("id").to_pylist()), column_matrix(t.column("embedding")))
    return out


def unaligned_targets(run: Path, manifest: dict):
    """"No alignment": every participant's raw psi_k(x), cut or zero-padded to the best model's width."""
    d = manifest["target_dim"]
    idx, ys, part = [], [], []
    for name, (i, x) in shard_embeddings(run, manifest).items():
        y = np.zeros((len(x), d), np.float32)
        y[:, :min(d, x.shape[1])] = x[:, :d]
        idx.append(i), ys.append(y), part.extend([name] * len(i))
    return _sorted(np.concatenate(idx), np.concatenate(ys), part)


def random_projection_targets(run: Path, manifest: dict, seed: int = 0):
    """The natural alternative to alignment (the paper's W without T): each participant's embeddings
    standardised per dimension on its own shard, then projected to the best model's width by a fixed random
    Gaussian matrix (scaled by 1/sqrt(d_k)); the best model's own targets are standardised only."""
    d = manifest["target_dim"]
    rng = np.random.default_rng(seed)
    idx, ys, part = [], [], []
    for name, (i, x) in shard_embeddings(run, manifest).items():
        z = (x - x.mean(0)) / np.maximum(x.std(0), 1e-6)
        y = z if name == manifest["best"] else z @ (rng.normal(size=(x.shape[1], d)) / np.sqrt(x.shape[1]))
        idx.append(i), ys.append(y.astype(np.float32)), part.extend([name] * len(i))
    return _sorted(np.concatenate(idx), np.concatenate(ys), part)


def alignment_weights(run: Path, cfg, manifest: dict, part: np.ndarray) -> tuple[np.ndarray, dict]:
    """Row weights by alignment quality: the best participant's rows weigh 1, every other participant's its
    map's leave-one-out R^2 on S (clipped to [0.05, 1]). Returns (weights per row, weight per participant)."""
    _, mats = shared_matrices(cfg, run)
    best = manifest["best"]
    w = {n: 1.0 if n == best else float(np.clip(loo_r2(x, mats[best]), 0.05, 1.0)) for n, x in mats.items()}
    return np.array([w[p] for p in part], dtype=np.float32), w


def check_merged(run: Path, manifest: dict, y: np.ndarray, idx: np.ndarray, part: np.ndarray) -> None:
    """Sanity check that RUN/optimized holds the run's own maps (guards the variants above against drift)."""
    emb = shard_embeddings(run, manifest)
    for name, (i, x) in emb.items():
        if name == manifest["best"] or not len(i):
            continue
        a = np.load(run / "align" / f"{name}.npz")
        j = np.searchsorted(idx, i[:5])
        np.testing.assert_allclose(y[j], (x[:5].astype(np.float64) @ a["W"] + a["b"]), rtol=1e-4, atol=1e-4)



def head_targets(run: Path, manifest: dict, idx: np.ndarray) -> dict:
    """``student.heads: per-participant`` on the rows ``idx`` (sorted): ``baselines.train_coopt``'s ``heads`` with
    each participant's own embedding of the images of its shard, and every participant's of the images of S."""
    names = [p["name"] for p in manifest["participants"]]
    dims = [int(p["embed_dim"]) for p in manifest["participants"]]
    own = np.zeros((len(idx), len(names), max(dims)), np.float32)
    train = np.zeros((len(idx), len(names)), bool)
    stats = np.zeros_like(train)
    shared = set(manifest.get("shared_ids") or [])
    for k, name in enumerate(names):
        t = pq.read_table(run / "embeddings" / name, columns=["id", "embedding", "owned", "error"])
        t = t.filter(pc.equal(t.column("error"), ""))
        ids, owned = t.column("id").to_pylist(), np.array(t.column("owned").to_pylist(), bool)
        use = owned | np.array([i in shared for i in ids], bool)
        j = _index(ids)
        pos = np.searchsorted(idx, j)
        hit = use & (pos < len(idx)) & (idx[np.minimum(pos, len(idx) - 1)] == j)
        x = column_matrix(t.column("embedding"))
        own[pos[hit], k, :x.shape[1]] = x[hit]
        train[pos[hit], k] = True
        stats[pos[hit & owned], k] = True
    return {"names": names, "dims": dims, "own": own, "train": train, "stats": stats, "aligned": False}


def all_teacher_targets(solo: dict, idx: np.ndarray) -> dict:
    """"All teachers on every image" (RADIO's setting, not a collaborative one): ``heads`` from single-teacher runs
    ``{name: (run, manifest)}``, each teacher's raw embedding of every image, for every head."""
    names = list(solo)
    per = {n: optimized_targets(run) for n, (run, _) in solo.items()}
    dims = [per[n][1].shape[1] for n in names]
    own = np.zeros((len(idx), len(names), max(dims)), np.float32)
    for k, n in enumerate(names):
        i, y, _ = per[n]
        pos = np.searchsorted(i, idx)
        if not np.array_equal(i[np.minimum(pos, len(i) - 1)], idx):
            raise RuntimeError(f"teacher {n}'s single-teacher run lacks some of the training images")
        own[:, k, :y.shape[1]] = y[pos]
    full = np.ones((len(idx), len(names)), bool)
    return {"names": names, "dims": dims, "own": own, "train": full, "stats": full, "aligned": False}


def subset_heads(heads: dict, keep: np.ndarray) -> dict:
    return {**heads, **{k: heads[k][keep] for k in ("own", "train", "stats")}}
