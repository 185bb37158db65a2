"""Markdown tables from benchmarks/results/{fidelity,throughput}[_quick].json (pasted into the README).

    python benchmarks/report.py --quick > benchmarks/results/tables_quick.md
"""
from __future__ import annotations

import argparse
import json

from common import RESULTS

NAMES = {
    "coopt": "CoOpt (K=4, aligned)", "byol": "BYOL (lightly)", "simclr": "SimCLR (lightly)",
    "supervised": "supervised (labels, upper bound)", "random_init": "random init",
    "noalign": "CoOpt, no alignment", "central": "centralised: best teacher labels all data",
    "worst": "worst teacher alone", "shared_0.05": "shared subset 0.05 %", "shared_0.2": "shared subset 0.2 %",
    "shared_1": "shared subset 1 %",
}


def pct(v):
    return "n/a" if not v else f"{100 * v['mean']:.2f} ± {100 * v['std']:.2f}"


def fidelity_tables(r: dict) -> str:
    s = r["settings"]
    pool = s.get("pool") or s["images"] or 50000
    lines = [f"Student `{s['arch']}`, trained on {s['images'] or 50000} unlabeled images (optimize stage over "
             f"{pool}), {s['epochs']} epochs, batch "
             f"{s['batch_size']}, AdamW lr {s['lr']:g}, {s['seeds']} seed(s); probe: {s['probe_images']} labeled "
             f"public images -> {s['test_images']} test images, {s['probe_epochs']} probe epochs.", "",
             "| method | final probe accuracy % (mean ± std) | shared images |", "| --- | --- | --- |"]
    for k, name in NAMES.items():
        if r.get(k):
            shared = r.get("optimize", {}).get(k, {}).get("shared_rows", "")
            lines.append(f"| {name} | {pct(r[k])} | {shared} |")
    t = r.get("time_to_byol_final")
    if t:
        lines += ["", f"Time to BYOL's final accuracy ({100 * t['byol_final_accuracy']:.2f} %): BYOL "
                  f"{t['byol']['epochs']} epochs / {t['byol']['seconds']:.0f} s of training; CoOpt "
                  + (f"{t['coopt']['epochs']} epochs / {t['coopt']['seconds']:.0f} s."
                     if t["coopt"]["epochs"] is not None else "does not reach it within the budget.")]
    g = r.get("goals", {})
    if g:
        lines += ["", "Goal quantities: " + ", ".join(f"`{k}` = {v}" for k, v in g.items())]
    uv = r.get("uniformity_vs_accuracy")
    if uv:
        lines += ["", f"Uniformity vs teacher probe accuracy over {len(uv['teachers'])} zoo teachers: Spearman "
                  f"rho = {uv['spearman_rho']} (p = {uv['p_value']}; -1 means lower uniformity <=> better teacher).",
                  "", "| teacher | uniformity | probe accuracy % |", "| --- | --- | --- |"]
        lines += [f"| {t['name']} | {t['uniformity']:.3f} | {100 * t['probe_accuracy']:.2f} |" for t in uv["teachers"]]
    cross = r.get("cross_arch")
    if cross:
        lines += ["", "| student architecture | CoOpt % | BYOL % | random init % | CoOpt − BYOL (points) |",
                  "| --- | --- | --- | --- | --- |"]
        for arch, v in cross.items():
            d = (f"{100 * (v['coopt']['mean'] - v['byol']['mean']):+.2f}" if v.get("coopt") and v.get("byol") else "")
            lines.append(f"| {arch} | {pct(v.get('coopt'))} | {pct(v.get('byol'))} | {pct(v.get('random_init'))} | {d} |")
    return "\n".join(lines)


def levers_table(files) -> str:
    """One row per lever run (benchmarks/results/levers/*.json): its settings and final accuracies."""
    keys = ("coopt", "byol", "noalign", "central", "worst", "shared_0.05", "shared_0.2", "shared_1")
    lines = ["| run | pool | targets | epochs | probe / test | seeds | " + " | ".join(keys) + " |",
             "| --- " * (6 + len(keys)) + "|"]
    for f in files:
        r = json.loads(f.read_text())
        s = r["settings"]
        rows = [(f.stem, s["seeds"], [r[k]["mean"] if r.get(k) else None for k in keys])]
        if s["seeds"] > 1:  # the lever runs are seed 0: its row of this run is the paired comparison
            seed0 = [r["runs"].get(k, {}).get("0", [{}])[-1].get("probe_accuracy") for k in keys]
            rows.append((f"{f.stem} (seed 0 only)", 1, seed0))
        for name, seeds, vals in rows:
            cells = ["" if v is None else f"{100 * v:.2f}" for v in vals]
            lines.append(f"| {name} | {s.get('pool') or s['images']} | "
                         f"{'whitened' if s.get('whiten') else 'standardised'} | {s['epochs']} | "
                         f"{s['probe_images']} / {s['test_images']} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def throughput_tables(r: dict) -> str:
    lines = ["| quantity | value |", "| --- | --- |"]
    o = r.get("optimize")
    if o:
        lines += [
            f"| optimize (run_optimize, embed stage), images/s | {o['ray']['embed_images_per_s']} |",
            f"| optimize end to end (incl. Ray start, score, align, merge), images/s | {o['ray']['end_to_end_images_per_s']} |",
            f"| plain single-process loop, 1 thread (one actor's CPU), images/s | {o['plain_1_thread']['images_per_s']} |",
            f"| plain single-process loop, {o['plain_all_threads']['threads']} threads, images/s | {o['plain_all_threads']['images_per_s']} |",
            f"| **optimize_vs_plain_ratio** (embed stage / plain 1 thread) | **{r['optimize_vs_plain_ratio']}** |",
            f"| optimize_vs_plain_ratio end to end | {r['optimize_vs_plain_ratio_end_to_end']} |",
            f"| **score_align_share** (score + align / optimize) | **{r['score_align_share']}** ({r['score_align_seconds']} s) |",
        ]
    sc = r.get("scaling")
    if sc:
        lines.append(f"| 1 vs 2 actors per participant (0.5 CPU each), images/s | {sc['actors_1']['embed_images_per_s']} vs "
                     f"{sc['actors_2']['embed_images_per_s']} (x{sc['speedup_2_vs_1']}) |")
    t = r.get("train")
    if t:
        lines += [f"| Ray Train student ({t['arch']}, 1 worker x 1 CPU), samples/s | {t['ray']['samples_per_s']} |",
                  f"| plain PyTorch loop, same model/rows/batch, 1 thread, samples/s | {t['plain']['samples_per_s']} |",
                  f"| **train_vs_plain_ratio** | **{r['train_vs_plain_ratio']}** |"]
    m = r.get("rss")
    if m and "runs" in m:  # the driver's own peak (VmHWM) in fresh processes, with a control that must move
        k = len(m["teachers"])
        lines += [f"| optimize driver peak memory (VmHWM), {m['small_images']} images (K={k}), MB | {m['small_mb']} |",
                  f"| optimize driver peak memory (VmHWM), {m['large_images']} images (K={k}), MB | {m['large_mb']} |",
                  f"| control: {m['small_images']} images with {m['control_ballast_mb']} MB more held by the driver, "
                  f"rise in MB | {m['control_rise_mb']} |"]
    proj = r.get("scaling_projection")
    if proj:
        lines += ["", "Projection (on paper, from the plain loop's per-model rates, not the Ray pipeline's; 50k images, "
                      "K=4, one pool per device):", "",
                  "| devices | seconds | images/s |", "| --- | --- | --- |"]
        lines += [f"| {p['devices']} | {p['seconds']} | {p['images_per_s']} |" for p in proj["rows"]]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    tag = "_quick" if a.quick else ""
    for name, fn in (("fidelity", fidelity_tables), ("throughput", throughput_tables),
                     ("memory", lambda r: throughput_tables({"rss": r["rss"]}))):
        p = RESULTS / f"{name}{tag}.json"
        if p.exists():
            print(f"### {name}{tag}\n\n{fn(json.loads(p.read_text()))}\n")
    levers = sorted((RESULTS / "levers").glob("*.json"))
    if levers and not a.quick:
        print(f"### levers (final probe accuracy %)\n\n{levers_table(levers)}\n")


if __name__ == "__main__":
    main()
