"""Shared argument handling for the ``ray job submit`` entrypoints (kept thin on purpose).

Run as a Ray job, the driver finds the cluster through ``RAY_ADDRESS`` (set by the job
supervisor) and connects with ``address="auto"``; run by hand it starts a local Ray unless
``--address`` says otherwise.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# The uploaded working dir (``--working-dir .``) is this file's parent's parent: import its code.
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def log(msg: str) -> None:
    from coopt_ray.cli import log_line

    log_line(msg)


def parse_args(description: str, argv=None, rounds: bool = False) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--config", required=True, help="YAML config (e.g. configs/quick.yaml)")
    ap.add_argument("--out", required=True,
                    help="run directory; on a multi-node cluster a path every node sees (e.g. /mnt/shared/runs/x)")
    ap.add_argument("--address", default=None,
                    help="Ray address; default: 'auto' when run as a Ray job (RAY_ADDRESS is set), else a local Ray")
    ap.add_argument("--zoo", default=None, help="teacher zoo directory (overrides zoo_dir in the config)")
    if rounds:
        ap.add_argument("--rounds", type=int, default=None,
                        help="continual rounds RUN/rounds/1..R (overrides rounds.count in the config)")
    args = ap.parse_args(argv)
    if args.address is None and os.environ.get("RAY_ADDRESS"):
        args.address = "auto"
    return args


def load(args, check_models: bool = True):
    """Config from ``args`` with the zoo override and file checks; the absolute run directory."""
    from coopt_ray.cli import load_checked

    if args.zoo:  # absolute: a job's driver runs in its copy of the working dir
        args = argparse.Namespace(**{**vars(args), "zoo": str(Path(args.zoo).expanduser().resolve())})
    cfg = load_checked(args, check_models=check_models)
    out = Path(args.out).expanduser().resolve()
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") and not Path(args.out).expanduser().is_absolute():
        log(f"[job] warning: --out {args.out} is relative, so it lands in this job's copy of the working dir "
            f"({out}); pass an absolute path on shared storage to keep the outputs")
    log(f"[job] config {args.config} -> run directory {out} (address: {args.address or 'local Ray'})")
    return cfg, out


def main(run) -> int:
    """Call ``run()``; config errors exit 2 and failed runs exit 1, each with one clear line."""
    from coopt_ray.config import ConfigError
    from coopt_ray.rundir import RunError

    try:
        run()
    except ConfigError as e:
        print(f"coopt job: config error: {e}", file=sys.stderr, flush=True)
        return 2
    except RunError as e:
        print(f"coopt job: run failed: {e}", file=sys.stderr, flush=True)
        return 1
    return 0
