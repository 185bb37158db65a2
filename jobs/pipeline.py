"""Ray job entrypoint: the whole pipeline (optimize, [distill,] train, evaluate, report).

    ray job submit --working-dir . -- python jobs/pipeline.py --config configs/quick.yaml --out /mnt/shared/runs/quick
    ray job submit --working-dir . -- python jobs/pipeline.py --config configs/quick.yaml --rounds 3 --out /mnt/shared/runs/r3
"""
from __future__ import annotations

import sys
from pathlib import Path

from _common import load, log, main, parse_args


def run(argv=None) -> None:
    from coopt_ray.rounds import check_rounds_run

    args = parse_args("coopt run (all stages) as a Ray job", argv, rounds=True)
    if args.rounds is not None:  # a bad --rounds is refused at once, before the config's checks import torch
        check_rounds_run(Path(args.out).expanduser().resolve(), args.rounds)
    cfg, out = load(args, check_models=False)  # run_all builds a missing default zoo, then checks
    from coopt_ray import pipeline

    count = cfg.rounds.count if args.rounds is None else args.rounds
    if args.rounds is not None or count > 1:
        check_rounds_run(out, count)  # before any cluster work
        pipeline.run_all(cfg, out, address=args.address, log=log, rounds=count)
        for what, rel in (("per-round summary", "rounds.json"), ("rounds", "rounds"), ("report", "report/report.html")):
            log(f"[job] {what}: {out / rel}{'' if (out / rel).exists() else ' (not written)'}")
        return
    pipeline.run_all(cfg, out, address=args.address, log=log)
    distilled = [] if cfg.student.data == "optimized" else [("distilled set", cfg.student.data)]
    for what, rel in (("manifest", "manifest.json"), ("optimized dataset", "optimized"), *distilled, ("student", "student"),
                      ("evaluation", "eval.json"), ("report", "report/report.html")):
        path = out / rel
        log(f"[job] {what}: {path}{'' if path.exists() else ' (not written)'}")


if __name__ == "__main__":
    sys.exit(main(run))
