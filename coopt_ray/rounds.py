"""Continual rounds (`coopt run --rounds R`): round r's student joins round r + 1's participants. Each round is a
complete run folder RUN/rounds/<r>/, RUN/rounds.json the per-round summary, RUN/report/ its plots.

How the student joins (``rounds.join``):
- ``extra``: as one more participant next to the user's K, so every round from 2 on has K + 1 shards (round r's
  student takes round r - 1's place);
- ``replace``: in the place of the participant the score ranked last in round r (the highest uniformity value,
  or the lowest coverage with ``score.method: coverage``);
- ``relabel``: it owns every image (``share`` 1) and round 1's participants embed only S (``share`` 0), so every
  target is the student's, aligned into the best space like any other participant's.
With ``rounds.warm_start`` round r + 1's student starts from round r's weights (``student.init``).
The stages themselves come in as ``run_round`` (pipeline.py), so this module imports no stage.
"""
from __future__ import annotations

import dataclasses
import html
import os
import time
from pathlib import Path
from typing import Callable, Optional

import yaml

from .config import Config, ConfigError, RoundsConfig
from .rundir import CONFIG, DONE, EVAL, MANIFEST, REPORT, ROUNDS, ROUNDS_SUMMARY, STUDENT, read_json, write_json_atomic

STUDENT_PREFIX = "student-r"   # round r's student takes part in round r + 1 as participant student-r<r>


def student_participant(round_dir: Path, r: int, template) -> object:
    """Round r's student (its run folder ``round_dir``) as a participant, with ``template``'s placement."""
    return dataclasses.replace(template, name=f"{STUDENT_PREFIX}{r}", model=f"student:{round_dir.resolve()}",
                               pretrained=None, share=1.0)


def worst_participant(manifest: dict, score_method: str) -> str:
    """The participant the score ranked last in a finished round (ties: the later name)."""
    parts = manifest["participants"]
    if score_method == "coverage":  # higher is better: the worst is the lowest (a missing value never is)
        return max(parts, key=lambda p: (-(p["coverage"] if p["coverage"] is not None else float("inf")),
                                         p["name"]))["name"]
    return max(parts, key=lambda p: (p["uniformity"], p["name"]))["name"]


def round_config(base: Config, prev: Config, prev_dir: Path, prev_manifest: dict, r: int) -> Config:
    """The config of round ``r + 1`` from ``base`` (the user's), round r's config ``prev``, its folder and manifest."""
    join = base.rounds.join
    template = base.participants[0]
    if join == "extra":  # the user's K participants and the newest student: K + 1 shards in every round
        parts = base.participants + (student_participant(prev_dir, r, template),)
    elif join == "replace":
        worst = worst_participant(prev_manifest, base.score.method)
        parts = tuple(student_participant(prev_dir, r, p) if p.name == worst else p for p in prev.participants)
    else:  # relabel
        parts = tuple(dataclasses.replace(p, share=0.0) for p in base.participants) + (
            student_participant(prev_dir, r, template),)
    student = base.student
    if base.rounds.warm_start:
        student = dataclasses.replace(student, init=str((prev_dir / STUDENT).resolve()))
    return dataclasses.replace(base, participants=parts, student=student, rounds=RoundsConfig())


def round_summary(r: int, d: Path, cfg: Config, seconds: Optional[float]) -> dict:
    """One round's line in RUN/rounds.json, from its manifest, eval.json and participants."""
    man, ev = read_json(d / MANIFEST), read_json(d / EVAL) or {}
    teachers = ev.get("teachers") or {}
    parts = [{"name": p["name"], "model": p["model"], "rows": p["rows"], "uniformity": p["uniformity"],
              "coverage": p.get("coverage"), "probe_accuracy": (teachers.get(p["name"]) or {}).get("probe_accuracy")}
             for p in man["participants"]]
    best_t = ev.get("best_teacher")
    return {
        "round": r, "dir": str(d), "participants": parts, "best": man["best"],
        "student_is_best": man["best"].startswith(STUDENT_PREFIX), "target_dim": man["target_dim"],
        "student_probe": (ev.get("student") or {}).get("probe_accuracy"),
        "random_init_probe": (ev.get("random_init") or {}).get("probe_accuracy"),
        "best_teacher": best_t, "best_teacher_probe": teachers[best_t]["probe_accuracy"] if best_t else None,
        "warm_start": cfg.student.init, "seconds": seconds,
    }


def check_rounds_run(run: Path, count: int) -> None:
    """Refuse a bad count, or an --out that holds a single-round run, before any work."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError(f"'--rounds' (rounds.count) must be an integer >= 1, got {count!r}")
    if (run / MANIFEST).exists():
        raise ConfigError(f"--out {run} holds a single-round run (manifest.json); rounds go to a new --out")


def run_rounds(cfg: Config, run: str | os.PathLike, count: int, run_round: Callable[[Config, Path], dict],
               log: Callable[[str], None] = print) -> dict:
    """Rounds 1..count, each ``run_round(config, RUN/rounds/<r>)``; a finished round (its ``_DONE.json`` matches its
    config) is skipped, so a killed run resumes in the round it stopped in. Returns RUN/rounds.json's content."""
    run = Path(run)
    check_rounds_run(run, count)
    (run / ROUNDS).mkdir(parents=True, exist_ok=True)
    user = dataclasses.replace(cfg, rounds=dataclasses.replace(cfg.rounds, count=count))
    (run / CONFIG).write_text(yaml.safe_dump(user.to_dict(), sort_keys=False))
    log(f"[rounds] {count} round(s), join={cfg.rounds.join}, warm_start={cfg.rounds.warm_start} -> {run / ROUNDS}")
    rcfg, rows = dataclasses.replace(cfg, rounds=RoundsConfig()), []
    for r in range(1, count + 1):
        d = run / ROUNDS / str(r)
        if r > 1:
            prev = run / ROUNDS / str(r - 1)
            rcfg = round_config(cfg, rcfg, prev, read_json(prev / MANIFEST), r - 1)
        fp = rcfg.fingerprint()
        done = read_json(d / DONE)
        if done and done.get("fingerprint") == fp:
            log(f"[rounds] round {r}: already done ({d}); skipping")
            seconds = done.get("seconds")
        else:
            log(f"[rounds] ==== round {r}/{count}: participants "
                + ", ".join(f"{p.name}{'' if p.share else ' (S only)'}" for p in rcfg.participants)
                + (f"; warm start from {rcfg.student.init}" if rcfg.student.init else "") + " ====")
            t = time.time()
            run_round(rcfg, d)
            seconds = round(time.time() - t, 3)
            write_json_atomic(d / DONE, {"round": r, "fingerprint": fp, "seconds": seconds})
        rows.append(round_summary(r, d, rcfg, seconds))
        s = rows[-1]
        log(f"[rounds] round {r}: student probe {_pct(s['student_probe'])}, best participant {s['best']}"
            f"{' (the student)' if s['student_is_best'] else ''}")
    first = next((s["round"] for s in rows if s["student_is_best"]), None)
    summary = {"join": cfg.rounds.join, "warm_start": cfg.rounds.warm_start, "count": count,
               "student_first_best_round": first, "rounds": rows}
    write_json_atomic(run / ROUNDS_SUMMARY, summary)
    page = write_rounds_report(run, summary)
    log("[rounds] per-round student probe accuracy: "
        + ", ".join(f"r{s['round']} {_pct(s['student_probe'])}" for s in rows))
    log(f"[rounds] the student is the best participant from round {first}" if first else
        "[rounds] no round's student became the best participant (uniformity)")
    log(f"[rounds] summary: {run / ROUNDS_SUMMARY}; report: {page}")
    return summary


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def write_rounds_report(run: Path, summary: dict) -> Path:
    """RUN/report/report.html: probe accuracy and uniformity per round, a table, links to each round's report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = run / REPORT
    out.mkdir(parents=True, exist_ok=True)
    rows = summary["rounds"]
    rs = [s["round"] for s in rows]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for key, label, style in (("student_probe", "student", "o-"), ("best_teacher_probe", "best participant probe", "s--"),
                              ("random_init_probe", "random-init student", "x:")):
        ys = [s[key] for s in rows]
        if any(y is not None for y in ys):
            ax.plot(rs, [float("nan") if y is None else 100 * y for y in ys], style, label=label)
    ax.set(xlabel="round", ylabel="linear-probe accuracy (%)", title=f"probe accuracy per round (join={summary['join']})")
    ax.set_xticks(rs)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "rounds_probe.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    names = sorted({p["name"] for s in rows for p in s["participants"]})
    for n in names:
        pts = [(s["round"], p["uniformity"]) for s in rows for p in s["participants"] if p["name"] == n]
        ax.plot(*zip(*pts), "o-" if n.startswith(STUDENT_PREFIX) else ".--", label=n)
    ax.set(xlabel="round", ylabel="uniformity on S (lower is better)", title="uniformity per participant and round")
    ax.set_xticks(rs)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "rounds_uniformity.png", dpi=110)
    plt.close(fig)
    head = "<tr><th>round</th><th>participants</th><th>best</th><th>student probe</th><th>best participant</th><th>seconds</th><th>report</th></tr>"
    body = "".join(
        f"<tr><td>{s['round']}</td><td>{html.escape(', '.join(p['name'] for p in s['participants']))}</td>"
        f"<td>{html.escape(s['best'])}</td><td>{_pct(s['student_probe'])}</td>"
        f"<td>{html.escape(str(s['best_teacher']))} {_pct(s['best_teacher_probe'])}</td>"
        f"<td>{'' if s['seconds'] is None else round(s['seconds'])}</td>"
        f"<td><a href='../{ROUNDS}/{s['round']}/{REPORT}/report.html'>round {s['round']}</a></td></tr>" for s in rows)
    page = out / "report.html"
    page.write_text(
        f"<html><head><meta charset='utf-8'><title>coopt rounds: {html.escape(run.name)}</title></head><body>"
        f"<h1>Continual rounds: {html.escape(str(run))}</h1><p>join={summary['join']}, warm_start="
        f"{summary['warm_start']}; the student is the best participant from round "
        f"{summary['student_first_best_round'] or '(never)'}.</p><table border=1 cellpadding=4>{head}{body}</table>"
        "<p><img src='rounds_probe.png'> <img src='rounds_uniformity.png'></p></body></html>")
    return page
