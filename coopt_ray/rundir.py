"""RUN's layout: paths, done markers, atomic JSON, recording (or refusing) the config, and RunError."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import yaml

from .config import Config, ConfigError, parse_config

DONE = "_DONE.json"          # a stage folder's done marker, written last
CONFIG = "config.yaml"       # the resolved config actually used
MANIFEST = "manifest.json"   # the optimized dataset's manifest (DESIGN.md §3)
EVAL = "eval.json"           # linear-probe accuracies
EMBEDDINGS = "embeddings"    # embeddings/<participant>/ Parquet parts + done marker
OPTIMIZED = "optimized"      # the merged optimized dataset (Parquet)
SHARED_ROWS = "shared_rows.parquet"  # S's rows as embedded by the participants that do not own them (student.heads)
ERRORS = "errors"            # errors/<participant>.parquet: id, participant, stage, error
ALIGN = "align"              # align/<participant>.npz: the alignment applied (W, b)
STUDENT = "student"          # student/: student.pt, metrics.json, Ray Train checkpoints
DISTILLED = "distilled"      # distilled/<method>/: a distilled set (Parquet) + distill.json + done marker
DISTILLED_PARTS = "data"     # distilled/<method>/data/: its Parquet part(s), columns as RUN/optimized's
REPORT = "report"            # report/: report.html + plots
SOURCE = "source"            # source/: the Fashion-MNIST unlabeled split converted to Parquet
ROUNDS = "rounds"            # rounds/<r>/: continual rounds, each a complete run folder
ROUNDS_SUMMARY = "rounds.json"  # RUN/rounds.json: the per-round summary
OPTIMIZE_SECTIONS = ("seed", "data", "participants", "shared", "score", "align")


class RunError(RuntimeError):
    """A run that cannot finish (for example, too many unreadable images); the message says why."""


def run_label(run: Path) -> str:
    """RUN's name for the dashboard: its folder name, or ``<RUN>-round<r>`` for a round folder RUN/rounds/<r>."""
    run = run.resolve()
    return f"{run.parent.parent.name}-round{run.name}" if run.parent.name == ROUNDS else run.name


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON via a temporary file and rename, so readers never see half a file."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=float))
    os.replace(tmp, path)


def write_parts_atomic(out: Path, table) -> Path:
    """``out/data/part-0.parquet`` from a pyarrow ``table``: written to ``data.tmp/`` and renamed over ``data/``,
    so a reader never sees half a set."""
    import pyarrow.parquet as pq

    tmp, final = out / (DISTILLED_PARTS + ".tmp"), out / DISTILLED_PARTS
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pq.write_table(table, tmp / "part-0.parquet")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def read_json(path: Path) -> Optional[dict]:
    """A JSON file's content, or None when it does not exist."""
    return json.loads(path.read_text()) if path.exists() else None


def read_done(d: Path) -> Optional[dict]:
    """The done-marker of a finished stage folder, or None."""
    return read_json(d / DONE)


def has_results(run: Path) -> bool:
    """Whether RUN holds finished optimize work (a participant's done marker or the manifest)."""
    return (run / MANIFEST).exists() or any((run / EMBEDDINGS).glob(f"*/{DONE}"))


def prepare_run_dir(cfg: Config, run: Path, sections=OPTIMIZE_SECTIONS) -> None:
    """Create RUN and record the config; refuse a RUN whose finished results came from a different config
    for ``sections`` (a RUN where nothing finished yet simply takes the new config)."""
    run.mkdir(parents=True, exist_ok=True)
    saved = run / CONFIG
    if saved.exists():
        old = parse_config(yaml.safe_load(saved.read_text()))
        diff = [s for s in sections if old.fingerprint(s) != cfg.fingerprint(s)]
        if diff and has_results(run):
            raise ConfigError(
                f"--out {run} was made with a different config (differs in: {', '.join(diff)}); "
                "use a new --out, or rerun with the config it was made with"
            )
        if diff and old.fingerprint("data") != cfg.fingerprint("data"):
            shutil.rmtree(run / SOURCE, ignore_errors=True)  # nothing finished yet: start afresh
    tmp = saved.with_name(CONFIG + ".tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    os.replace(tmp, saved)
