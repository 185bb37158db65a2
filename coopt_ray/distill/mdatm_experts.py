"""M-DATM's expert stage on Ray (issue 12, in progress): E expert trajectories trained as Ray tasks in parallel,
each stored as a tensor-only safetensors file with its own done marker, so a killed run redoes only unfinished
experts. The matching stage and `distill.method: mdatm` are not wired yet."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from ..devices import stage_device
from .mdatm import DSA, train_expert

TRAJ = "expert_{:03d}.safetensors"   # tensor "trajectory": (epochs + 1, parameters)
DONE = "expert_{:03d}.json"          # written after the tensor file: epochs, seconds, fingerprint


def expert_task(i: int, images: torch.Tensor, labels: torch.Tensor, classes: int, epochs: int, lr: float,
                batch: int, width: int, seed: int, out_dir: str, fingerprint: str, threads: int = 1,
                augment: bool = True, use_gpu: bool = False) -> dict:
    """Train expert ``i`` (seed ``seed + i``) on the GPU it asked for (else the CPU) and write its trajectory, then
    its done marker."""
    from safetensors.torch import save_file

    torch.set_num_threads(max(1, threads))
    t0 = time.time()
    traj = train_expert(images, labels, classes, epochs, seed + i, lr=lr, batch=batch, width=width,
                        aug=DSA() if augment else None, device=stage_device(use_gpu, "distill.use_gpu"))
    out = Path(out_dir)
    tmp = out / (TRAJ.format(i) + ".tmp")
    save_file({"trajectory": torch.stack(traj).contiguous()}, str(tmp))
    os.replace(tmp, out / TRAJ.format(i))
    meta = {"expert": i, "epochs": epochs, "parameters": int(traj[0].numel()), "seconds": round(time.time() - t0, 3),
            "fingerprint": fingerprint}
    (out / DONE.format(i)).write_text(json.dumps(meta))
    return meta


def finished(out_dir: Path, i: int, fingerprint: str) -> Optional[dict]:
    """Expert ``i``'s done marker when its trajectory exists and was made with ``fingerprint``."""
    try:
        meta = json.loads((out_dir / DONE.format(i)).read_text())
    except (OSError, ValueError):
        return None
    return meta if meta.get("fingerprint") == fingerprint and (out_dir / TRAJ.format(i)).is_file() else None


def run_experts(images: torch.Tensor, labels: torch.Tensor, classes: int, out_dir: Path, experts: int, epochs: int,
                fingerprint: str, lr: float = 0.01, batch: int = 256, width: int = 128, seed: int = 0,
                num_cpus: float = 1, num_gpus: float = 0, augment: bool = True,
                log: Callable[[str], None] = print) -> list[dict]:
    """Train the unfinished experts as Ray tasks (named ``mdatm_expert_<i>``), all at once; Ray queues what the
    cluster cannot hold. Returns every expert's done marker."""
    import ray

    out_dir.mkdir(parents=True, exist_ok=True)
    metas = {i: finished(out_dir, i, fingerprint) for i in range(experts)}
    todo = [i for i, m in metas.items() if m is None]
    if len(todo) < experts:
        log(f"[mdatm] experts {sorted(set(range(experts)) - set(todo))} already done; training {todo or 'none'}")
    if todo:
        img_ref, lab_ref = ray.put(images), ray.put(labels)
        task = ray.remote(expert_task)
        refs = {task.options(name=f"mdatm_expert_{i}", num_cpus=num_cpus, num_gpus=num_gpus).remote(
            i, img_ref, lab_ref, classes, epochs, lr, batch, width, seed, str(out_dir), fingerprint,
            max(1, int(num_cpus)), augment, num_gpus > 0): i for i in todo}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            m = ray.get(ready[0])
            metas[refs[ready[0]]] = m
            log(f"[mdatm] expert {m['expert']}: {m['epochs']} epochs in {m['seconds']:.1f}s "
                f"({experts - len(pending)}/{experts} done)")
    return [metas[i] for i in range(experts)]


def load_trajectories(out_dir: Path, experts: int) -> list[torch.Tensor]:
    """Every expert's trajectory, (epochs + 1, parameters) each, from its safetensors file."""
    from safetensors.torch import load_file

    return [load_file(str(out_dir / TRAJ.format(i)))["trajectory"] for i in range(experts)]
