"""Ray job entrypoint: the optimize stage alone (embed, score, align, merge).

    ray job submit --working-dir . -- python jobs/optimize.py --config configs/quick.yaml --out /mnt/shared/runs/quick
"""
from __future__ import annotations

import sys

from _common import load, log, main, parse_args


def run(argv=None) -> None:
    args = parse_args("coopt optimize as a Ray job", argv)
    cfg, out = load(args)
    from coopt_ray.pipeline import run_optimize  # after the config checks: a bad config exits before torch loads
    man = run_optimize(cfg, out, address=args.address, log=log)
    log(f"[job] optimized dataset: {out / 'optimized'} ({man['optimized_rows']} rows, best model {man['best']})")
    log(f"[job] manifest: {out / 'manifest.json'}")
    log(f"[job] errors: {out / 'errors'} ({man['error_rows']} rows)")


if __name__ == "__main__":
    sys.exit(main(run))
