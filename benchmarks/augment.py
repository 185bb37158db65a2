"""Batched augmentation speed: the package's hand-written BatchAugment against kornia.augmentation.

    pip install -e '.[bench]'                    # kornia (pinned), only the benchmark needs it
    python benchmarks/augment.py                 # 256-image batches of 32 px, 1 torch thread, 30 rounds

The same RELA pipeline both ways: RandomResizedCrop(scale 0.5-1) + horizontal flip + ColorJitter(0.8, 0.8,
0.8, 0.2, p 0.8) + grayscale (p 0.2), per-image parameters on a batch. Both run in this process,
interleaved round by round (the machine is noisy), on the same batch. Writes benchmarks/results/augment.json.
CPU protocol: 1 thread (one train worker's share on 2 cores). GPU protocol: --device cuda.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from common import RESULTS, log, machine, write_json

class KorniaAugment:
    """RELA's augmentations from kornia.augmentation (torchvision's ColorJitter formulas, random order)."""

    def __init__(self, size: int):
        import kornia.augmentation as K

        self.pipeline = torch.nn.Sequential(
            K.RandomResizedCrop((size, size), scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), align_corners=False),
            K.RandomHorizontalFlip(p=0.5), K.ColorJitter(0.8, 0.8, 0.8, 0.2, p=0.8), K.RandomGrayscale(p=0.2))

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        with torch.random.fork_rng(devices=[]):  # kornia draws from the global RNG
            torch.manual_seed(seed)
            return self.pipeline(x).clamp_(0, 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    from coopt_ray.augment import BatchAugment

    torch.set_num_threads(a.threads)
    x = torch.rand(a.batch, 3, a.size, a.size, generator=torch.Generator().manual_seed(0)).to(a.device)
    impls = {"kornia": KorniaAugment(a.size), "hand_written": BatchAugment(a.size)}
    secs = {k: [] for k in impls}
    for r in range(a.rounds + 2):  # two warm-up rounds, not counted
        for name, aug in impls.items():
            gen = torch.Generator().manual_seed(r)
            t0 = time.perf_counter()
            y = aug(x, gen)
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            if r >= 2:
                secs[name].append(time.perf_counter() - t0)
            assert y.shape == (a.batch, 3, a.size, a.size) and float(y.min()) >= 0 and float(y.max()) <= 1
    rate = {k: a.batch / float(np.median(v)) for k, v in secs.items()}
    res = {"machine": machine(), "batch": a.batch, "size": a.size, "threads": a.threads, "device": a.device,
           "rounds": a.rounds, "images_per_s": {k: round(v, 1) for k, v in rate.items()},
           "kornia_vs_hand_written": round(rate["kornia"] / rate["hand_written"], 3)}
    write_json(RESULTS / "augment.json", res)
    log(f"[augment] {a.batch} x {a.size}px on {a.device}, {a.threads} thread(s): kornia {rate['kornia']:.0f} img/s, "
        f"hand-written {rate['hand_written']:.0f} img/s (ratio {res['kornia_vs_hand_written']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
