"""The ``coopt`` command. Configs are validated (exit code 2, one line naming the key) before Ray starts."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from .config import Config, ConfigError, load_config
from .rundir import RunError


def log_line(msg: str) -> None:
    """Print one progress line. One write per line: the optimize stage's pool threads log at the same moment, and
    ``print`` writes the text and its newline apart, so two lines could run together."""
    sys.stdout.write(f"{msg}\n")
    sys.stdout.flush()


def load_checked(args, check_models: bool = True) -> Config:
    """The config of ``args.config`` with ``--max-error-fraction`` and ``--zoo`` applied, validated, then its paths
    checked (``coopt`` and the job entrypoints alike)."""
    cfg = load_config(args.config)
    if getattr(args, "max_error_fraction", None) is not None:
        if not 0 <= args.max_error_fraction <= 1:
            raise ConfigError(f"'--max-error-fraction' must be in [0, 1], got {args.max_error_fraction}")
        cfg = dataclasses.replace(cfg, max_error_fraction=args.max_error_fraction)
    if getattr(args, "zoo", None):
        cfg = dataclasses.replace(cfg, zoo_dir=args.zoo)
    from .preflight import check_paths  # after the config's own checks: a bad value exits before torch loads

    check_paths(cfg, check_models=check_models)
    return cfg


def cmd_optimize(args) -> int:
    cfg = load_checked(args)
    from .pipeline import run_optimize

    run_optimize(cfg, args.out, address=args.address, log=log_line)
    return 0


def cmd_zoo_build(args) -> int:
    from .zoo import build_zoo

    from .zoo_specs import ZOO_SETS

    teachers = build_zoo(args.out, specs=ZOO_SETS[args.specs], force=args.force, progress=log_line, device=args.device)
    log_line(f"[zoo] {len(teachers)} teachers in {os.path.abspath(args.out)}:")
    for t in teachers:
        log_line(f"  {t['name']:<14} dim {t['embed_dim']:>3}  probe {t['probe_accuracy']:.4f}  "
             f"uniformity {t.get('uniformity', float('nan')):.4f}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2), like config errors: no usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every ``coopt`` subcommand."""
    ap = _Parser(prog="coopt", description="Collaborative unlabeled-data optimization on Ray")
    sub = ap.add_subparsers(dest="command", required=True)

    def stage(name, fn, help_, out_flag="--out"):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", required=True, help="YAML config (see configs/)")
        p.add_argument(out_flag, required=True, dest="out", help="run directory")
        p.add_argument("--address", default=None, help="Ray cluster address (auto, ray://host:10001); default: $RAY_ADDRESS, else a cluster started "
                       "with `ray start` on this machine, else a new local Ray")
        p.add_argument("--zoo", default=None, help="teacher zoo directory (overrides zoo_dir in the config)")
        p.set_defaults(fn=fn)
        return p

    p = stage("optimize", cmd_optimize, "embed, score, align and merge into RUN/optimized/")
    p.add_argument("--max-error-fraction", type=float, default=None,
                   help="fail past this fraction of unreadable images (default from config: 0.05)")

    zoo = sub.add_parser("zoo", help="offline teacher zoo")
    zsub = zoo.add_subparsers(dest="zoo_command", required=True)
    zb = zsub.add_parser("build", help="pretrain the tiny open_clip teachers (cached)")
    zb.add_argument("--out", default="zoo", help="zoo directory (default: zoo)")
    zb.add_argument("--force", action="store_true", help="rebuild even if cached")
    zb.add_argument("--specs", choices=("default", "diverse"), default="default",
                    help="which teachers: default (five nested CLIP-tiny models, the offline default) or diverse "
                         "(CLIP on classes 0-4, label-free SimCLR, supervised on classes 5-9)")
    zb.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="train the teachers on this device (default cpu; cuda: a usable GPU or exit 2)")
    zb.set_defaults(fn=cmd_zoo_build)
    _register_more(sub, stage)
    return ap


def cmd_train(args) -> int:
    cfg = load_checked(args, check_models=False)  # the student reads RUN/optimized; no teacher runs here
    from .train import run_train

    run_train(cfg, args.out, address=args.address, log=log_line)
    return 0


def cmd_distill(args) -> int:
    cfg = load_checked(args, check_models=False)  # distillation reads RUN/optimized; no teacher runs here
    from .distill.stage import run_distill

    run_distill(cfg, args.out, address=args.address, log=log_line)
    return 0


def cmd_evaluate(args) -> int:
    cfg = load_checked(args)
    from .evaluate import run_evaluate

    run_evaluate(cfg, args.out, address=args.address, log=log_line)
    return 0


def cmd_report(args) -> int:
    from .report import build_report
    from .rundir import MANIFEST, ROUNDS_SUMMARY, read_json

    summary = read_json(Path(args.run) / ROUNDS_SUMMARY)
    if summary is not None and not (Path(args.run) / MANIFEST).exists():  # a continual-rounds RUN
        from .rounds import write_rounds_report

        log_line(f"[report] {write_rounds_report(Path(args.run), summary)} (each round's own: RUN/rounds/<r>/report/)")
        return 0
    mdatm = Path(args.run) / "distilled" / "mdatm"
    if not (Path(args.run) / MANIFEST).exists() and (mdatm / "distill.json").exists():  # an M-DATM-only RUN
        from .distill.mdatm_stage import rebuild_report

        log_line(f"[report] {rebuild_report(mdatm)}")
        return 0
    build_report(args.run, log=log_line)
    return 0


def cmd_run(args) -> int:
    if args.rounds is not None:  # a bad --rounds is refused at once, before the config's checks import torch
        from .rounds import check_rounds_run

        check_rounds_run(Path(args.out), args.rounds)
    cfg = load_checked(args, check_models=False)  # run_all builds a missing default zoo, then checks models
    from .pipeline import run_all

    run_all(cfg, args.out, address=args.address, log=log_line, rounds=args.rounds)
    return 0


def cmd_export(args) -> int:
    from .export import ExportError, export_student

    try:
        files = export_student(args.run, args.out, args.format, with_head=args.with_head)
    except ExportError as e:
        print(f"coopt: export error: {e}", file=sys.stderr, flush=True)
        return 2
    log_line(f"[export] {args.format}: " + ", ".join(str(f) for f in files))
    return 0


def _register_more(sub, stage) -> None:
    """Later stages register here (train, evaluate, report, run, bench)."""
    stage("distill", cmd_distill, "distill RUN/optimized/ into a small synthetic set (KRR-ST) with Ray Train "
          "-> RUN/distilled/krr-st/", out_flag="--run")
    stage("train", cmd_train, "train the student on RUN/optimized/ (or student.data) with Ray Train", out_flag="--run")
    stage("evaluate", cmd_evaluate, "linear probe: student, teachers, random-init student -> RUN/eval.json",
          out_flag="--run")
    p = sub.add_parser("report", help="plots and RUN/report/report.html")
    p.add_argument("--run", required=True, help="run directory")
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser("export", help="the trained student's backbone as timm safetensors + config.json, or ONNX")
    p.add_argument("--run", required=True, help="run directory with a trained student (RUN/student/)")
    p.add_argument("--out", required=True, help="folder to write the export into")
    p.add_argument("--format", required=True, choices=("timm", "onnx"), help="timm: model.safetensors + config.json "
                   "(coopt_ray.export.load_timm_backbone); onnx: model.onnx with a dynamic batch axis")
    p.add_argument("--with-head", action="store_true", help="onnx: backbone + head (the student's target space)")
    p.set_defaults(fn=cmd_export)
    p = stage("run", cmd_run, "all stages: zoo (if missing) -> optimize -> train -> evaluate -> report")
    p.add_argument("--max-error-fraction", type=float, default=None,
                   help="fail past this fraction of unreadable images (default from config: 0.05)")
    p.add_argument("--rounds", type=int, default=None, help="continual rounds: RUN/rounds/1..R, round r's student "
                   "joins round r + 1's participants (overrides rounds.count; see rounds.join)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: returns the process exit code (2 for config errors)."""
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"coopt: config error: {e}", file=sys.stderr, flush=True)
        return 2
    except RunError as e:
        print(f"coopt: run failed: {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
