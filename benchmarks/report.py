"""The results tables of docs/results.md, generated from benchmarks/results/*.json.

    python benchmarks/report.py              # print the generated Markdown
    python benchmarks/report.py --docs       # rewrite docs/results.md between the generated-results markers
    python benchmarks/report.py --check      # exit 1 when docs/results.md differs from the JSON (tests run this)
    python benchmarks/report.py --quick      # the smoke-check JSON (*_quick.json), printed only

Every number between the markers comes from the JSON; the prose around them explains, never restates.
"""
from __future__ import annotations

import argparse
import json
import sys

from common import RESULTS, ROOT
from report_heads import heads_alignment_table, heads_goal_rows, heads_levers_table, heads_table, load_heads
from report_krr import (distill_levers_table, distill_table, krr_goal_rows, krr_signal_levers_table, krr_signal_table,
                        krr_setting_levers_table, krr_student_levers_table)
from report_labeled import labeled_goal_rows, labeled_table
from report_scale import scale_goal_rows, scale_table
from report_zoo import zoo_diversity_table

BEGIN, END = "<!-- generated:results:begin (benchmarks/report.py --docs) -->", "<!-- generated:results:end -->"
NAMES = {
    "coopt": "CoOpt (K=4, aligned, fixed ridge)", "byol": "BYOL (lightly heads and loss)",
    "simclr": "SimCLR (lightly heads and loss)", "supervised": "supervised (labels, upper bound)",
    "random_init": "random init", "noalign": "CoOpt, no alignment (raw, cut / zero-padded)",
    "randproj": "CoOpt, random projection instead of alignment", "central": "centralised: best teacher labels all data",
    "worst": "worst teacher alone", "labelfree": "CoOpt with 4 label-free teachers",
    "loo": "CoOpt, leave-one-out ridge", "weighted": "CoOpt, LOO ridge + rows weighted by map quality",
    "shared_0.2": "shared subset 0.2 %, fixed ridge", "shared_1": "shared subset 1 %, fixed ridge",
    "loo_shared_0.2": "shared subset 0.2 %, LOO ridge", "loo_shared_1": "shared subset 1 %, LOO ridge",
}
PAGE = ROOT / "docs" / "results.md"  # the page that holds every generated table


def pct(v):
    return "n/a" if not v else f"{100 * v['mean']:.2f} ± {100 * v['std']:.2f}"


def load(name: str):
    p = RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def fidelity_tables(r: dict) -> str:
    s = r["settings"]
    pool = s.get("pool") or s["images"] or 50000
    lines = [f"Student `{s['arch']}` on {s['images'] or 50000} unlabeled images (optimize stage over {pool}), "
             f"{s['epochs']} epochs, {s['seeds']} seeds, crop scale ({s.get('crop_min', 0.5)}, 1) for every method; "
             f"probe: {r.get('probe_protocol', '')} ({s['probe_images']} / {s['test_images']} images, "
             f"{s['probe_epochs']} probe epochs).", "",
             "| method | lr, batch (chosen on seed 0) | final probe accuracy % (mean ± std) | shared images |",
             "| --- | --- | --- | --- |"]
    coopt_setting = r.get("chosen", {}).get("coopt")
    for k, name in NAMES.items():
        if r.get(k):
            setting = r.get("chosen", {}).get(k) or (coopt_setting if k in r.get("optimize", {}) else None)
            cell = f"{setting[0]:g}, {setting[1]}" if setting else ""
            shared = r.get("optimize", {}).get(k, {}).get("shared_rows", "")
            lines.append(f"| {name} | {cell} | {pct(r[k])} | {shared} |")
    sweep = {k: v for k, v in r.items() if k.startswith("sweep/") and v}
    if sweep:
        lines += ["", "Learning-rate sweep, seed 0 (final probe accuracy %; the best per method is used above):", "",
                  "| method | setting | accuracy % |", "| --- | --- | --- |"]
        lines += [f"| {k.split('/')[1]} | {k.split('/', 2)[2]} | {100 * v['mean']:.2f} |" for k, v in sweep.items()]
    curves = r.get("curves", {})
    main = [k for k in ("coopt", "byol", "simclr", "supervised") if k in curves]
    if main:
        ep = curves[main[0]]["epoch"][1:]
        lines += ["", f"Accuracy after each epoch (mean of {s['seeds']} seeds):", "",
                  "| epoch | " + " | ".join(map(str, ep)) + " | training seconds |", "| --- " * (len(ep) + 2) + "|"]
        for k in main:
            c = curves[k]
            lines.append(f"| {k} | " + " | ".join(f"{100 * x:.2f}" for x in c["acc_mean"][1:]) +
                         f" | {c['train_seconds_mean'][-1]:.0f} |")
    t = r.get("time_to_byol_final")
    if t:
        c = t["coopt"]
        if c["epochs"] is None:
            tail = "does not reach it within the budget."
        else:
            tail = f"{c['epochs']} epochs / {c['seconds']:.0f} s of student training"
            if c.get("seconds_all_costs") is not None:
                tail += (f", {c['seconds_all_costs']:.0f} s with every cost (the teachers' training + the optimize "
                         f"stage over the whole pool + the student), {c['seconds_all_costs_prorated']:.0f} s with the "
                         f"teachers and the optimize stage pro-rated to the {s['images']} training images")
            tail += "."
        lines += ["", f"Time to BYOL's final accuracy ({100 * t['byol_final_accuracy']:.2f} %): BYOL "
                  f"{t['byol']['epochs']} epochs / {t['byol']['seconds']:.0f} s; CoOpt " + tail]
    uv = r.get("uniformity_vs_accuracy")
    if uv:
        lines += ["", f"Uniformity vs teacher probe accuracy (zoo.json) over {len(uv['teachers'])} teachers: Spearman "
                  f"rho = {uv['spearman_rho']}.", "", "| teacher | uniformity | probe accuracy % |",
                  "| --- | --- | --- |"]
        lines += [f"| {x['name']} | {x['uniformity']:.3f} | {100 * x['probe_accuracy']:.2f} |" for x in uv["teachers"]]
    cross = r.get("cross_arch")
    if cross:
        lines += ["", f"Cross-architecture reuse (the same optimized dataset; {s.get('cross_seeds', s['seeds'])} "
                  "seed(s) off the main architecture):", "",
                  "| student architecture | CoOpt % | BYOL % | random init % | CoOpt − BYOL (points) |",
                  "| --- | --- | --- | --- | --- |"]
        for arch, v in cross.items():
            d = f"{100 * (v['coopt']['mean'] - v['byol']['mean']):+.2f}" if v.get("coopt") and v.get("byol") else ""
            lines.append(f"| {arch} | {pct(v.get('coopt'))} | {pct(v.get('byol'))} | {pct(v.get('random_init'))} | {d} |")
    return "\n".join(lines)


def alignment_table(r: dict) -> str:
    lines = [f"Alignment into the best model's space on the demo run (|S| = {r['shared_rows']}), R² on {r['eval_images']} "
             f"images no map saw; ceiling = the map fitted on {r['ceiling_fit_images']} pairs:", "",
             "| participant | dims | ceiling | fixed ridge | LOO ridge (chosen) | semi-supervised (best of grid) | "
             "PCR on shard PCs (k) | LOO + matched statistics | gap to ceiling, LOO | "
             "0.05 % / 0.2 % / 1 % of 50k, fixed | same, LOO |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for n, p in r["participants"].items():
        sz = p["sizes"]
        lines.append(f"| {n} | {p['dims'][0]} → {p['dims'][1]} | {p['ceiling']:.3f} | {p['fixed']:.3f} | "
                     f"{p['loo']:.3f} ({p['loo_ridge']:g}) | {p['semi_best_of_grid']:.3f} | {p['pcr']:.3f} ({p['pcr_k']}) | "
                     f"{p['loo_matched']:.3f} | {p['gap_loo']:.3f} | " +
                     " / ".join(f"{v['fixed']['mean']:.3f}" for v in sz.values()) + " | " +
                     " / ".join(f"{v['loo']['mean']:.3f}" for v in sz.values()) + " |")
    return "\n".join(lines)


def criteria_table(r: dict) -> str:
    lines = [f"Best-model criteria vs teacher probe accuracy, {len(r['teachers'])} zoo teachers, |S| = {r['shared']}, "
             f"{r['draws']} draws of S per domain (Spearman rho: mean over draws / of the draw-averaged score; "
             "share of draws that pick the best-probing teacher):", "",
             "| domain | uniformity (want −1) | coverage (want +1) | control: predicted by others |",
             "| --- | --- | --- | --- |"]
    for dn, d in r["domains"].items():
        cells = [f"{d[k]['rho_mean_over_draws']:+.2f} / {d[k]['rho_of_mean_score']:+.2f}; picks best "
                 f"{100 * d[k]['picks_the_best_teacher']:.0f} %" for k in ("uniformity", "coverage", "predicted_by_others")]
        lines.append(f"| {dn} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def throughput_table(r: dict, mem: dict) -> str:
    o, sc, t = r["optimize"], r["scaling"], r["train"]
    rows = [("optimize (run_optimize, embed stage), images/s", o["ray"]["embed_images_per_s"]),
            ("plain single-process loop, 1 thread, images/s", o["plain_1_thread"]["images_per_s"]),
            ("**optimize_vs_plain_ratio** (embed stage / plain 1 thread)", r["optimize_vs_plain_ratio"]),
            ("optimize_vs_plain_ratio end to end", r["optimize_vs_plain_ratio_end_to_end"]),
            ("score + align share of optimize", f"{r['score_align_share']} ({r['score_align_seconds']} s)"),
            ("1 vs 2 actors per participant (0.5 CPU each), images/s",
             f"{sc['actors_1']['embed_images_per_s']} vs {sc['actors_2']['embed_images_per_s']}"),
            (f"Ray Train student ({t['arch']}) vs plain loop, samples/s",
             f"{t['ray']['samples_per_s']} vs {t['plain']['samples_per_s']} ({r['train_vs_plain_ratio']})")]
    if mem:
        m = mem["rss"]
        rows += [(f"driver peak memory (VmHWM), {m['small_images']} vs {m['large_images']} images, MB",
                  f"{m['small_mb']} vs {m['large_mb']}"),
                 (f"control: {m['control_ballast_mb']} MB more held by the driver, rise in MB", m["control_rise_mb"])]
    return "\n".join(["| quantity | value |", "| --- | --- |"] + [f"| {a} | {b} |" for a, b in rows])


def rounds_table(r: dict) -> str:
    """Student probe accuracy per round and arm (benchmarks/rounds.py), mean ± std over seeds, and the gain."""
    s, sm = r["settings"], r["summary"]
    n = s["rounds"]
    lines = [f"`coopt run --rounds {n}` per arm, {s['seeds']} seeds; pool of {s['pool']} images, 4 zoo teachers, student "
             f"{s['arch']} on {s['student_limit'] or s['pool']} rows for {s['epochs']} epochs a round; probe "
             f"{s['probe']} public-train -> {s['probe']} t10k images, {s['probe_epochs']} epochs. Student probe "
             "accuracy %, mean ± std:", "",
             "| arm | " + " | ".join(f"round {i}" for i in range(1, n + 1)) + " | last - first | student best from round |",
             "| --- " * (n + 3) + "|"]
    for arm, v in sm.items():
        cells = [f"{m:.2f} ± {sd:.2f}" for m, sd in zip(v["probe_mean"], v["probe_std"])]
        best = ", ".join("never" if x is None else str(x) for x in v.get("student_first_best_round", [])) or "—"
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {v['gain_mean']:+.2f} ± {v['gain_std']:.2f} | {best} |")
    secs = r.get("seconds") or {}
    lines += ["", "Seconds per seed, every stage of every round (round 1 computed once and copied, control: train + "
              "evaluate only): " + ", ".join(f"{a} {sum(v) / len(v):.0f}" for a, v in secs.items() if v) + "."]
    warm, ctl = sm.get("extra+warm"), sm.get("control: warm, no join")
    if warm and ctl:
        lines.append(f"The warm start against its control (the same warm start, the student not joining): "
                     f"{warm['gain_mean']:+.2f} vs {ctl['gain_mean']:+.2f} points from round 1 to round {n}.")
    joined = [x for a, v in sm.items() for x in v.get("student_first_best_round", [])]
    if joined:
        lines.append(f"The joining student became the alignment target (the best uniformity) in "
                     f"{sum(x is not None for x in joined)} of {len(joined)} arm-seed runs.")
    ranks = {a: v["student_uniformity_rank"] for a, v in sm.items() if v.get("student_uniformity_rank")}
    if ranks:
        lines.append("The joining student's uniformity rank among the round's participants (1 = the alignment target), "
                     "per seed, rounds 2.." + str(n) + ": " + "; ".join(f"{a} {ranks[a]}" for a in ranks) + ".")
    return "\n".join(lines)


def goals_table(fid, ali, cri, thr, mem, dis=None, rnd=None, lab=None, sca=None, hds=None, krr=None) -> str:
    rows = []

    def row(goal, target, measured, ok):
        measured = "n/a" if measured is None else measured
        rows.append(f"| {goal} | {target} | {measured} | {'—' if ok is None else 'met' if ok else 'missed'} |")

    if fid:
        g, t = fid["goals"], fid.get("time_to_byol_final", {})
        row("CoOpt vs BYOL, equal epochs, each at its best lr", ">= +3 points", g.get("coopt_minus_byol_points"),
            g.get("coopt_minus_byol_points", -1) >= 3)
        if t:
            er = t.get("epoch_ratio")
            row("epochs CoOpt needs for BYOL's final accuracy", "<= 1/2 of BYOL's", f"{t['coopt']['epochs']} of "
                f"{t['byol']['epochs']} ({er})", er is not None and er <= 0.5)
            sa = t["coopt"].get("seconds_all_costs")
            row("seconds to BYOL's final accuracy, every cost included", "(reported)",
                f"CoOpt {sa} s vs BYOL {t['byol']['seconds']:.0f} s" if sa else "not reached", None)
        row("aligned vs unaligned", ">= +1 point", g.get("aligned_minus_unaligned_points"),
            g.get("aligned_minus_unaligned_points", -1) >= 1)
        row("aligned vs random projection", "(reported)", g.get("aligned_minus_random_projection_points"), None)
        sh = g.get("shared_0.05_share_of_1pct_gain")
        row("0.05 % shared subset, share of the 1 % gain", ">= 95 %", None if sh is None else f"{100 * sh:.0f} %",
            sh is not None and sh >= 0.95)
        for k, name in (("coopt_minus_central_points", "CoOpt (fixed ridge) vs centralised, 0.05 % shared"),
                        ("loo_minus_central_points", "CoOpt (LOO ridge) vs centralised, 0.05 % shared")):
            row(name, ">= 0 points", g.get(k), g.get(k, -1) >= 0)
        for k in ("labelfree_minus_byol_points", "labelfree_minus_simclr_points"):
            row(f"label-free teachers: {k.replace('_points', '').replace('_', ' ')}", "(reported)", g.get(k), None)
    if ali:
        gaps = ali["goal_within_0.15_of_ceiling"]["gaps_loo"]
        row(f"held-out R² within 0.15 of the linear ceiling, S of {ali['shared_rows']} images", "every participant",
            "gaps " + ", ".join(f"{x:.2f}" for x in gaps), max(gaps) <= 0.15)
    if cri:
        for dn, d in cri["domains"].items():
            if dn == "fashion-mnist":
                continue
            u, c = -d["uniformity"]["rho_mean_over_draws"], d["coverage"]["rho_mean_over_draws"]
            row(f"out of domain ({dn}): a criterion ranks teachers like their probe", ">= 0.8, right direction",
                f"uniformity {-u:+.2f}, coverage {c:+.2f}", max(u, c) >= 0.8)
    if thr:
        row("optimize stage vs plain loop", ">= 0.9", thr["optimize_vs_plain_ratio"], thr["optimize_vs_plain_ratio"] >= 0.9)
        row("score + align share of optimize", "<= 1 %", f"{100 * thr['score_align_share']:.3f} %",
            thr["score_align_share"] <= 0.01)
    if mem:
        m = mem["rss"]
        row("driver peak memory, 6k vs 50k images", "flat (< 5 % growth)", f"{m['small_mb']} vs {m['large_mb']} MB",
            m["large_mb"] <= 1.05 * m["small_mb"])
    if dis:
        for arch, g in dis["summary"]["goals"].items():
            for k, v in sorted(g.items()):
                if k.startswith("a_minus_b_"):
                    row(f"{arch}: distilled vs random subset, M = {k.rsplit('_', 1)[1]}", ">= +2 points, beyond the stds",
                        f"{v['points']:+.2f} (stds {v['stds'][0]:.2f} / {v['stds'][1]:.2f})", v["met"])
            if "gap_closed" in g:
                row(f"{arch}: distilled M = {max(dis['settings']['sizes'])} closes the random-init -> whole-set gap",
                    ">= 60 %", f"{100 * g['gap_closed']['fraction']:.0f} % (control, random subset: "
                    f"{100 * (g['gap_closed'].get('random_subset_fraction') or 0):.0f} %)", g["gap_closed"]["met"])
                row(f"{arch}: pre-training time, distilled vs whole set", "<= 5 %",
                    f"{100 * g['time_ratio']['fraction']:.1f} %", g["time_ratio"]["met"])
    if rnd:
        for arm, v in rnd["summary"].items():
            if arm.startswith("control"):
                continue
            row(f"rounds, {arm}: student probe, round 1 -> round {rnd['settings']['rounds']}",
                ">= +1.5 points, beyond the std", f"{v['gain_mean']:+.2f} ± {v['gain_std']:.2f}", v["goal_gain_1_5"])
            row(f"rounds, {arm}: no round below round 1", "every round", f"worst {v['worst_round_vs_first']:+.2f}",
                v["goal_no_round_below_first"])
    for r in lab or []:
        labeled_goal_rows(r, row)
    if sca:
        scale_goal_rows(sca, row)
    if hds:
        heads_goal_rows(hds, row)
    if krr:
        krr_goal_rows(krr, row)
    return "\n".join(["| goal | target | measured | status |", "| --- | --- | --- | --- |"] + rows)


def render() -> str:
    fid, ali, cri, thr, mem = load("fidelity"), load("alignment"), load("criteria"), load("throughput"), load("memory")
    dis, rnd, sca, zdv, krr = load("distill"), load("rounds"), load("scale"), load("zoo_diversity"), load("krr_signal")
    lab = [r for r in (load("distill_labeled"), load("distill_labeled_full")) if r]  # the CPU and GPU protocols
    parts = []
    if fid:
        parts += ["## Fidelity", "", fidelity_tables(fid)]
    if zdv:
        parts += ["", "## Do the zoo's teachers differ?", "", zoo_diversity_table(zdv)]
    hds = load_heads()
    if hds:
        parts += ["", "## Student heads", "", heads_table(hds)]
        for extra in (heads_alignment_table(hds), heads_levers_table()):
            if extra:
                parts += ["", extra]
    if ali:
        parts += ["", "## Alignment", "", alignment_table(ali)]
    if cri:
        parts += ["", "## Choosing the best model", "", criteria_table(cri)]
    if thr:
        parts += ["", "## Speed and memory", "", throughput_table(thr, mem)]
    if dis:
        parts += ["", "## Distillation (KRR-ST)", "", distill_table(dis)]
        lev = distill_levers_table(dis)
        if lev:
            parts += ["", lev]
    if krr:
        parts += ["", "### KRR-ST, step by step: is there a signal, and can a student read it?", "", krr_signal_table(krr)]
        for klev in (krr_signal_levers_table(krr), krr_student_levers_table(krr), krr_setting_levers_table(krr)):
            if klev:
                parts += ["", klev]
    if rnd:
        parts += ["", "## Continual rounds", "", rounds_table(rnd)]
    if lab:
        parts += ["", "## Labeled distillation (M-DATM)", "", "\n\n".join(labeled_table(r) for r in lab)]
    if sca:
        parts += ["", "## Scale: the data path at 50k and 500k images", "", scale_table(sca)]
    parts += ["", "## Against the goals", "", goals_table(fid, ali, cri, thr, mem, dis, rnd, lab, sca, hds, krr)]
    return "\n".join(parts) + "\n"


def replace_block(text: str, block: str) -> str:
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{PAGE.relative_to(ROOT)} has no generated-results markers ({BEGIN} ... {END})")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{block}{END}{tail}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--docs", "--readme", dest="docs", action="store_true", help="rewrite docs/results.md")
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args(argv)
    if a.quick:
        r = load("fidelity_quick")
        print(fidelity_tables(r) if r else "no fidelity_quick.json")
        return 0
    if not (a.check or a.docs):
        print(render())
        return 0
    text = PAGE.read_text()
    new = replace_block(text, render())
    if a.check:
        if new != text:
            print(f"{PAGE.relative_to(ROOT)}'s generated results differ from benchmarks/results/*.json; run "
                  "`python benchmarks/report.py --docs`", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
