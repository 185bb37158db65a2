"""`coopt report`: PNG plots and RUN/report/report.html from a run directory (no Ray needed).

Plots: uniformity per participant, alignment R^2, a 2-D PCA of the shared subset S's targets before
and after alignment (coloured by participant), the student's training loss, and the linear-probe
accuracies. Every input is optional except manifest.json; missing parts are noted in the page.
"""
from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .embeddings import read_shared
from .rundir import (ALIGN, DISTILLED, DISTILLED_PARTS, EMBEDDINGS, EVAL, MANIFEST, OPTIMIZED, REPORT, STUDENT, RunError,
                     read_json)

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
          "#bcbd22", "#17becf"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pca_2d(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` projected on their first two principal components (zero-padded if rank < 2)."""
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(0, keepdims=True)
    if len(x) < 2:
        return np.zeros((len(x), 2))
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    out = x @ vt[:2].T
    return np.pad(out, ((0, 0), (0, 2 - out.shape[1]))) if out.shape[1] < 2 else out


def shared_targets(run: Path, manifest: dict) -> tuple[dict, dict]:
    """S's embeddings per participant before alignment, and after (into the best model's space).

    Rows are restricted to the ids every participant read (``manifest['shared_ids']``), same order.
    """
    ids = manifest.get("shared_ids")
    before, after = {}, {}
    for p in manifest["participants"]:
        name = p["name"]
        d = run / EMBEDDINGS / name
        if not d.exists():
            continue
        got, x = read_shared(d)
        pos = {i: k for k, i in enumerate(got)}
        order = [pos[i] for i in (ids or got) if i in pos]
        x = x[order]
        before[name] = x
        npz = run / ALIGN / f"{name}.npz"
        if name == manifest["best"] or not p.get("aligned"):
            if name == manifest["best"]:
                after[name] = x
            elif x.shape[1] == manifest["target_dim"]:
                after[name] = x  # alignment disabled: targets are used as they are
        elif npz.exists():
            a = np.load(npz)
            after[name] = x.astype(np.float64) @ a["W"] + a["b"]
    return before, after


def _scatter(ax, groups: dict, title: str, best: str) -> None:
    names = list(groups)
    if not names:
        ax.set_title(title + " (no data)")
        return
    width = max(g.shape[1] for g in groups.values())
    stacked = np.concatenate([np.pad(g, ((0, 0), (0, width - g.shape[1]))) for g in groups.values()])
    z = pca_2d(stacked)
    start = 0
    for i, n in enumerate(names):
        k = len(groups[n])
        ax.scatter(z[start:start + k, 0], z[start:start + k, 1], s=18, alpha=0.75, color=COLORS[i % len(COLORS)],
                   marker="*" if n == best else "o", label=f"{n}{' (best)' if n == best else ''}")
        start += k
    ax.set_title(title)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(fontsize=8)


def build_report(run: str | os.PathLike, log: Callable[[str], None] = print) -> Path:
    """Write RUN/report/*.png and RUN/report/report.html; return the HTML path."""

    run = Path(run)
    manifest = read_json(run / MANIFEST)
    if manifest is None:
        raise RunError(f"{run} has no manifest.json; run `coopt optimize` (or `coopt run`) first")
    ev = read_json(run / EVAL)
    metrics = read_json(run / STUDENT / "metrics.json")
    out = run / REPORT
    out.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    parts = manifest["participants"]
    best = manifest["best"]
    names = [p["name"] for p in parts]
    figs: list[tuple[str, str]] = []

    # uniformity
    fig, ax = plt.subplots(figsize=(6, 3.5))
    vals = [p["uniformity"] for p in parts]
    ax.bar(names, vals, color=[COLORS[0] if n != best else COLORS[2] for n in names])
    ax.set_title(f"Uniformity on S (lower is better; green = the target, by {manifest.get('score_method', 'uniformity')})")
    ax.set_ylabel("log mean exp(-2||zi - zj||²)")
    for i, v in enumerate(vals):
        ax.annotate(f"{v:.3f}", (i, v), ha="center", va="top" if v < 0 else "bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "uniformity.png", dpi=100)
    plt.close(fig)
    figs.append(("uniformity.png", "Uniformity value per participant on the shared subset S."))

    # alignment R^2
    aligned = [p for p in parts if p.get("aligned")]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if aligned:
        xs = np.arange(len(aligned))
        r2 = [p["align_r2"] if p["align_r2"] is not None else np.nan for p in aligned]
        held = [p["align_heldout_r2"] if p["align_heldout_r2"] is not None else np.nan for p in aligned]
        ax.bar(xs - 0.2, r2, 0.4, label="R² on S (fit)", color=COLORS[0])
        ax.bar(xs + 0.2, held, 0.4, label="R² held-out part of S", color=COLORS[1])
        ax.set_xticks(xs, [p["name"] for p in aligned])
        ax.axhline(0, color="k", lw=0.5)
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no participant was aligned", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(f"Alignment into {best}'s space")
    fig.tight_layout()
    fig.savefig(out / "align_r2.png", dpi=100)
    plt.close(fig)
    figs.append(("align_r2.png", "Fit quality of each linear alignment T(k) (ridge least squares on S)."))

    # PCA of S before/after
    try:
        before, after = shared_targets(run, manifest)
    except Exception as e:  # embeddings pruned or unreadable: the rest of the report still stands
        log(f"[report] no PCA of S: {e}")
        before, after = {}, {}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    _scatter(axes[0], before, "S before alignment (dims zero-padded)", best)
    _scatter(axes[1], after, f"S after alignment (in {best}'s space)", best)
    fig.tight_layout()
    fig.savefig(out / "shared_pca.png", dpi=100)
    plt.close(fig)
    figs.append(("shared_pca.png", "2-D PCA of the shared subset's targets, coloured by participant: before "
                                   "alignment each model has its own space; after, all sit in the best model's."))

    # training loss
    if metrics and metrics.get("history"):
        h = metrics["history"]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([e["epoch"] for e in h], [e["loss"] for e in h], marker="o", label="total")
        for k, (n, info) in enumerate((metrics.get("head_info") or {}).items()):
            ax.plot([e["epoch"] for e in h], info["loss"], marker=".", ls="--", color=COLORS[(k + 1) % len(COLORS)],
                    label=f"head {n}")
        if metrics.get("head_info"):
            ax.legend(fontsize=7)
        ax.set_xlabel("epoch")
        ax.set_ylabel("1 - cos(ŷ, y)")
        ax.set_title(f"Student {metrics['arch']} training loss")
        fig.tight_layout()
        fig.savefig(out / "loss.png", dpi=100)
        plt.close(fig)
        figs.append(("loss.png", "Mean training loss per epoch (all workers)."))

    # probe accuracies
    rows = probe_rows(ev) if ev else []
    if rows:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        labels = [r[0] for r in rows]
        accs = [r[2] for r in rows]
        cols = [COLORS[2] if r[1] == "student" else COLORS[7] if r[1] == "random init" else COLORS[0] for r in rows]
        ax.bar(labels, accs, color=cols)
        for i, a in enumerate(accs):
            ax.annotate(f"{a:.3f}", (i, a), ha="center", va="bottom", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("test accuracy")
        ax.set_title("Linear probe (frozen features)")
        plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
        fig.tight_layout()
        fig.savefig(out / "probe.png", dpi=100)
        plt.close(fig)
        figs.append(("probe.png", "Linear-probe test accuracy: teachers, the student, and a random-init student."))

    dist = read_json(run / DISTILLED / "krr-st" / "distill.json")
    if dist:
        figs += distilled_figures(run / DISTILLED / "krr-st", run / OPTIMIZED, dist, out, plt, log)

    page = _html(run, manifest, metrics, ev, rows, figs)
    path = out / "report.html"
    tmp = path.with_name("report.html.tmp")
    tmp.write_text(page)
    os.replace(tmp, path)
    log(f"[report] {len(figs)} plots and {path}")
    return path


def probe_rows(ev: dict) -> list[tuple[str, str, float, Optional[float]]]:
    """(name, kind, accuracy, seconds) rows for the table: teachers, student, random init."""
    if not ev or ev.get("skipped"):
        return []
    rows = []
    secs = ev.get("seconds", {})
    for n, t in ev.get("teachers", {}).items():
        rows.append((n, "teacher", float(t["probe_accuracy"]), secs.get(n)))
    s = ev["student"]
    rows.append((f"student {s['arch']}", "student", float(s["probe_accuracy"]), secs.get("student")))
    r = ev.get("random_init")
    if r:
        rows.append((f"random-init {r['arch']}", "random init", float(r["probe_accuracy"]), secs.get("random_init")))
    return rows


def _table(header: list[str], rows: list[list]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def distilled_figures(d: Path, optimized: Path, dist: dict, out: Path, plt, log, n: int = 12) -> list[tuple[str, str]]:
    """The distillation's loss curve and a grid of synthetic images: the real rows they started from (top) and
    the distilled ones (bottom)."""
    import pyarrow.parquet as pq

    from .images import decode_image

    figs = []
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(dist["loss_steps"], dist["loss"], marker=".")
    ax.set(xlabel="outer step", ylabel="KRR loss (mse, standardised targets)",
           title=f"{dist['method']} distillation: M = {dist['size']}")
    fig.tight_layout()
    fig.savefig(out / "distill_loss.png", dpi=100)
    plt.close(fig)
    figs.append(("distill_loss.png", f"Distillation loss (mean over workers and each logging window), "
                                     f"{dist['steps']} steps in {dist['seconds']:.0f} s."))
    try:
        t = pq.read_table(str(d / DISTILLED_PARTS), columns=["id", "image", "init_id"]).slice(0, n)
        init = pq.read_table(str(optimized), columns=["id", "image"],
                             filters=[("id", "in", t.column("init_id").to_pylist())])
        by_id = dict(zip(init.column("id").to_pylist(), init.column("image").to_pylist()))
        pairs = [(by_id.get(i), b) for i, b in zip(t.column("init_id").to_pylist(), t.column("image").to_pylist())]
    except Exception as e:  # noqa: BLE001 - the rest of the report still stands
        log(f"[report] no distilled image grid: {e}")
        return figs
    fig, axes = plt.subplots(2, len(pairs), figsize=(1.1 * len(pairs), 2.6), squeeze=False)
    for j, (a, b) in enumerate(pairs):
        for i, img in enumerate((a, b)):
            axes[i][j].axis("off")
            if img is not None:
                axes[i][j].imshow(np.asarray(decode_image(img)))
    axes[0][0].set_title("initial (real rows)", fontsize=8, loc="left")
    axes[1][0].set_title("distilled", fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(out / "distilled.png", dpi=100)
    plt.close(fig)
    figs.append(("distilled.png", f"The first {len(pairs)} synthetic rows: the real image each started from (top) "
                                  "and the distilled image (bottom)."))
    return figs


def _html(run: Path, manifest: dict, metrics: Optional[dict], ev: Optional[dict], rows, figs) -> str:
    e = html.escape
    parts = manifest["participants"]
    probe = {n: t["probe_accuracy"] for n, t in (ev or {}).get("teachers", {}).items()}
    ptab = _table(["participant", "model", "dim", "rows", "shared", "uniformity", "coverage", "probe acc", "aligned",
                   "ridge", "R² fit", "R² held-out", "seconds"],
                  [[p["name"] + (" (best)" if p["name"] == manifest["best"] else ""), p["model"], p["embed_dim"],
                    p["rows"], p["shared_rows"], p["uniformity"], p.get("coverage"), probe.get(p["name"]), p["aligned"],
                    p.get("align_ridge"), p["align_r2"], p["align_heldout_r2"], p["seconds"]] for p in parts])
    method = manifest.get("score_method", "uniformity")
    sec = [f"<h1>coopt report: {e(str(run))}</h1>",
           f"<p>{manifest['optimized_rows']} optimized rows + {manifest['error_rows']} error rows = "
           f"{manifest['total_rows']} images; best model <b>{e(manifest['best'])}</b>, target dim "
           f"{manifest['target_dim']}, |S| = {len(manifest.get('shared_ids', []))}.</p>",
           "<h2>Participants</h2>",
           f"<p>The best model is chosen by <b>{e(method)}</b> (score.method). Uniformity: lower is better; "
           "coverage: the mean leave-one-out R² with which a participant's space predicts every other "
           "participant's on S, higher is better; probe acc: the teacher's linear-probe accuracy when the "
           "run was evaluated on labels.</p>", ptab]
    if rows:
        sec += ["<h2>Linear probe</h2>",
                f"<p>{e(ev['probe']['description'])}; {ev['probe']['epochs']} probe epochs.</p>",
                _table(["model", "kind", "probe accuracy", "seconds"], [list(r) for r in rows])]
    elif ev and ev.get("skipped"):
        sec += ["<h2>Linear probe</h2>", f"<p>skipped: {e(ev['skipped'])}</p>"]
    else:
        sec += ["<h2>Linear probe</h2>", "<p>not evaluated yet (run <code>coopt evaluate</code>).</p>"]
    if metrics:
        sec += ["<h2>Student training</h2>",
                _table(["arch", "rows", "epochs", "workers", "final loss", "train seconds"],
                       [[metrics["arch"], metrics["rows"], metrics["epochs"], metrics["workers"],
                         metrics["loss"][-1] if metrics["loss"] else None, metrics["seconds"]["train"]]])]
    if metrics and metrics.get("head_info"):
        sec += heads_section(metrics)
    sec.append("<h2>Plots</h2>")
    for f, cap in figs:
        sec.append(f'<figure><img src="{e(f)}" alt="{e(f)}"><figcaption>{e(cap)}</figcaption></figure>')
    t = manifest.get("timings", {})
    sec.append("<h2>Timings (optimize)</h2>" + _table(list(t), [list(t.values())]))
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}figure{margin:1em 0}"
             "img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>coopt report</title>"
            f"<style>{style}</style></head><body>{''.join(sec)}</body></html>\n")


def heads_section(metrics: dict) -> list:
    """What each per-participant head learned (student.heads): its rows and its loss on them, first and last epoch."""
    e, info = html.escape, metrics["head_info"]
    kind = metrics.get("loss_kind", "cos")
    return ["<h2>Student heads</h2>",
            f"<p>student.heads: <b>{e(metrics['heads_mode'])}</b>. Each participant's head regresses that teacher's "
            f"own embedding, standardised on its own rows, on its shard and on S (loss {e(kind)} on its rows)"
            + ("; the aligned head regresses the merged targets on every image" if metrics["aligned_head"] else "")
            + f". Without an aligned head the student's output is head <b>{e(str(metrics['primary_head']))}</b>'s "
            "(the best participant's space). The linear probe reads the backbone, not a head.</p>",
            _table(["head", "teacher", "target dim", "head dim", "rows (last epoch)", "loss, epoch 1", "loss, last"],
                   [[n, i.get("model"), i["target_dim"], i["head_dim"], i["rows"], i["loss"][0] if i["loss"] else None,
                     i["loss"][-1] if i["loss"] else None] for n, i in info.items()])]


def summary_table(manifest: dict, metrics: Optional[dict], ev: Optional[dict]) -> str:
    """The one table `coopt run` prints: teacher, student and random-init probe accuracies + timings."""
    if not ev or ev.get("skipped"):
        return f"[run] no probe table: {ev.get('skipped') if ev else 'not evaluated'}"
    secs = ev.get("seconds", {})
    parts = {p["name"]: p for p in manifest["participants"]}
    lines = [f"{'':2}{'model':<34}{'kind':<13}{'probe acc':>10}   time (s)"]
    lines.append("  " + "-" * 78)
    for n, t in ev["teachers"].items():
        p = parts.get(n, {})
        tag = " *best" if n == manifest.get("best") else ""
        name = f"{n} {Path(t['model'].replace('local-dir:', '')).name}{tag}"
        lines.append(f"  {name:<34}{'teacher':<13}{t['probe_accuracy']:>10.4f}   "
                     f"embed {p.get('seconds', 0):.1f} + probe {secs.get(n, 0):.1f}")
    s = ev["student"]
    tr = (metrics or {}).get("seconds", {}).get("train", 0.0)
    ep = (metrics or {}).get("epochs", "?")
    lines.append(f"  {'student ' + s['arch']:<34}{'student':<13}{s['probe_accuracy']:>10.4f}   "
                 f"train {tr:.1f} ({ep} ep) + probe {secs.get('student', 0):.1f}")
    r = ev["random_init"]
    lines.append(f"  {'random-init ' + r['arch']:<34}{'baseline':<13}{r['probe_accuracy']:>10.4f}   "
                 f"probe {secs.get('random_init', 0):.1f}")
    lines.append(f"  ({ev['probe']['description']}; {ev['probe']['epochs']} probe epochs; "
                 f"* = the alignment target, best by {manifest.get('score_method', 'uniformity')})")
    return "\n".join(lines)
