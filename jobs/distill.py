"""Ray job entrypoint: distill into RUN/distilled/<method>/: KRR-ST on a finished optimize run's RUN/optimized,
or M-DATM (``distill.method: mdatm``) on labeled images, which needs no optimize run.

    ray job submit --working-dir . -- python jobs/distill.py --config configs/fashion-mnist-distill.yaml \
        --out /mnt/shared/runs/fmnist
    ray job submit --working-dir . -- python jobs/distill.py --config configs/fashion-mnist-mdatm.yaml \
        --out /mnt/shared/runs/fmnist-mdatm
"""
from __future__ import annotations

import sys

from _common import load, log, main, parse_args


def run(argv=None) -> None:
    args = parse_args("coopt distill as a Ray job (after jobs/optimize.py on the same --out)", argv)
    cfg, out = load(args, check_models=False)  # distillation reads RUN/optimized or labeled images; no teacher runs
    from coopt_ray.distill.stage import distilled_dir, run_distill  # after the config checks: no torch for a bad one
    res = run_distill(cfg, out, address=args.address, log=log)
    d = distilled_dir(out, cfg.distill.method)
    log(f"[job] distilled set: {d / 'data'} ({res['size']} rows, loss {res['loss'][0]:.4f} -> {res['loss'][-1]:.4f})")
    log(f"[job] record: {d / 'distill.json'}")


if __name__ == "__main__":
    sys.exit(main(run))
