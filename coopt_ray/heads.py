"""Per-participant student heads (``student.heads``), RADIO / Theia style: one linear head per teacher on the shared
backbone, each regressing its own teacher's standardised embedding, so no teacher is folded into another's space.

Modes:
* ``aligned``: today's single head on the aligned targets (nothing here is used);
* ``per-participant``: head k sees only the rows whose target came from participant k: the images of its shard
  D(k), and every image of the shared subset S (which every participant embedded), so S trains every head;
* ``both``: the per-participant heads plus the aligned head on every image once, which ties the partitions together
  (RADIO saw students learn to tell teacher partitions apart and switch modes).

A training row carries ``head`` (its participant's index), ``own_target`` (that participant's raw embedding, zero-padded
to the widest participant's width) and ``target_weight`` (1 for an optimized row, 0 for a shared-subset row of a
participant that does not own it, so the aligned head sees each image once). Each head's standardisation (per
dimension, PCA whitening or PHI-S, as ``student.whiten`` / ``student.phi_s``) comes from its participant's own rows:
statistics of its shard are the only thing besides targets that leave it. Pure torch and numpy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from .student import TargetMoments, row_loss, transform_from_moments


@dataclass
class HeadTransforms:
    """Per head, in participant order: name, raw width, and ``T_k(y) = (y[:, :dim_k] - mean_k) @ proj_k``."""
    names: list
    dims: list
    means: list
    projs: list

    def out_dims(self) -> dict:
        return {n: int(p.shape[1]) for n, p in zip(self.names, self.projs)}

    def to_config(self) -> dict:
        return {"names": list(self.names), "dims": [int(d) for d in self.dims],
                "means": [np.asarray(m).tolist() for m in self.means],
                "projs": [np.asarray(p).tolist() for p in self.projs]}

    @classmethod
    def from_config(cls, d: dict) -> "HeadTransforms":
        return cls(list(d["names"]), [int(x) for x in d["dims"]],
                   [np.asarray(m, dtype=np.float32) for m in d["means"]],
                   [np.asarray(p, dtype=np.float32) for p in d["projs"]])


def head_transforms(moments: dict, dims: dict, whiten: bool = False, phi_s: bool = False,
                    out_dim: Optional[int] = None) -> HeadTransforms:
    """Per-head standardisations from each participant's own-row moments ``{name: (n, mean, cov)}`` (participant
    order as ``dims``); a participant with fewer than 2 rows of its own cannot be standardised: ValueError naming it."""
    names, ds, means, projs = [], [], [], []
    for name, d in dims.items():
        n, mean, cov = moments[name]
        if n < 2:
            raise ValueError(f"participant {name!r} has {n} row(s) of its own: a per-participant head needs at least 2 "
                             "(give it share > 0 or use student.heads: aligned)")
        m, p = transform_from_moments(n, mean[:d], cov[:d, :d], whiten=whiten, out_dim=out_dim, phi_s=phi_s)
        names.append(name), ds.append(int(d)), means.append(m), projs.append(p)
    return HeadTransforms(names, ds, means, projs)


def moments_by_head(own: np.ndarray, head: np.ndarray, names: Sequence[str], weight: Optional[np.ndarray] = None) -> dict:
    """``{name: (n, mean, cov)}`` of each head's targets over its rows (``weight > 0`` when given: owned rows only).

    ``own`` (N, D) with ``head`` (N,) the head index of each row, as the train stage's rows; or ``own`` (N, K, D),
    head k's target of each row, with ``head`` (N, K) a mask of the rows each head's statistics come from."""
    out = {}
    for k, name in enumerate(names):
        rows = head[:, k].astype(bool) if head.ndim == 2 else (head == k)
        if weight is not None:
            rows = rows & (weight > 0)
        x = own[rows, k] if own.ndim == 3 else own[rows]
        m = TargetMoments()
        if len(x):
            m.add(x)
        d = own.shape[-1]
        mean, cov = m.mean_cov() if m.n else (np.zeros(d), np.zeros((d, d)))
        out[name] = (m.n, mean, cov)
    return out


class TorchHeads:
    """``HeadTransforms`` as tensors on the loop's device."""

    def __init__(self, t: HeadTransforms, device: torch.device):
        self.names = list(t.names)
        self.dims = list(t.dims)
        self.means = [torch.as_tensor(m, dtype=torch.float32, device=device) for m in t.means]
        self.projs = [torch.as_tensor(p, dtype=torch.float32, device=device) for p in t.projs]


def per_head_loss(outs: dict, own: torch.Tensor, head: torch.Tensor, heads: TorchHeads,
                  kind: str = "cos") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean over the batch of each row's loss on its own head: row i counts only in head ``head[i]``.

    Every head runs on every row (so every parameter is in the graph, as DDP wants) and the others are masked out.
    The benchmarks also pass ``own`` (N, K, D) with head k's target of each row and ``head`` (N, K), a mask of the
    heads each row trains (a row may train several: its loss is then their sum).
    Returns ``(loss, per-head loss sums, per-head row counts)``; the sums are detached."""
    total = torch.zeros((), dtype=torch.float32, device=own.device)
    sums, counts = [], []
    for k, name in enumerate(heads.names):
        yk = own[:, k] if own.dim() == 3 else own
        y = (yk[:, :heads.dims[k]].float() - heads.means[k]) @ heads.projs[k]
        mask = head[:, k].float() if head.dim() == 2 else (head == k).float()
        lk = row_loss(outs[name], y, kind) * mask
        total = total + lk.sum()
        sums.append(lk.detach().sum())
        counts.append(mask.sum())
    return total / max(len(own), 1), torch.stack(sums), torch.stack(counts)


def weighted_mean(loss: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``sum(w l) / sum(w)``, 0 when every weight is 0 (a batch of shared-subset rows only)."""
    return (loss * weight).sum() / weight.sum().clamp_min(1e-12)


def multi_head_loss(out, batch: dict, heads: TorchHeads, aligned_y: Optional[torch.Tensor],
                    kind: str = "cos") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training loss for ``student(x, all_heads=True)``'s ``(aligned output or None, {name: output})``:
    the per-participant heads' loss plus, with an aligned head, its loss on the rows of weight 1.
    ``batch`` holds ``own_target``, ``head`` and ``target_weight``; ``aligned_y`` the standardised aligned targets.
    Returns ``(loss, per-head loss sums, per-head row counts)``."""
    aligned, outs = out
    loss, sums, counts = per_head_loss(outs, batch["own_target"], batch["head"], heads, kind)
    if aligned is not None:
        loss = loss + weighted_mean(row_loss(aligned, aligned_y, kind), batch["target_weight"].float())
    return loss, sums, counts
