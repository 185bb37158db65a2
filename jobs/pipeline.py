"""Ray job entrypoint: the whole pipeline (optimize, [distill,] train, evaluate, report).

    ray job submit --working-dir . -- python jobs/pipeline.py --config configs/quick.yaml --out /mnt/shared/runs/quick
"""
from __future__ import annotations

import sys

from _common import load, log, main, parse_args


def run(argv=None) -> None:
    args = parse_args("coopt run (all stages) as a Ray job", argv)
    cfg, out = load(args, check_models=False)  # run_all builds a missing default zoo, then checks
    from coopt_ray import pipeline

    if not hasattr(pipeline, "run_all"):  # the full pipeline lands in coopt_ray.pipeline.run_all
        raise SystemExit("coopt job: this coopt_ray has no pipeline.run_all yet; use jobs/optimize.py")
    pipeline.run_all(cfg, out, address=args.address, log=log)
    distilled = [] if cfg.student.data == "optimized" else [("distilled set", cfg.student.data)]
    for what, rel in (("manifest", "manifest.json"), ("optimized dataset", "optimized"), *distilled, ("student", "student"),
                      ("evaluation", "eval.json"), ("report", "report/report.html")):
        path = out / rel
        log(f"[job] {what}: {path}{'' if path.exists() else ' (not written)'}")


if __name__ == "__main__":
    sys.exit(main(run))
