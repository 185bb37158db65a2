"""docs/results.md's KRR-ST tables: the distillation benchmark (distill.json), its levers, and the step-by-step
signal check (krr_signal.json, issue 29)."""
from __future__ import annotations

from common import load_levers


def distill_table(r: dict) -> str:
    s, sm = r["settings"], r["summary"]
    by = sm.get("distill_seconds_by_size") or {}
    secs = ", ".join(f"{v['mean']:.0f} ± {v['std']:.0f} s at M = {m}" for m, v in by.items() if v)
    lines = [f"KRR-ST on the demo's optimized set ({r['rows']} rows), {s['steps']} outer steps, lr {s['lr']:g}, pool of "
             f"{s['pool_size']} ConvNet-{s['pool_width']} (reset every {s['pool_steps']} steps), real batch "
             f"{s['real_batch']}, {s['workers']} Ray Train workers: {secs} per distillation (every cost of the stage). "
             f"Students: {s['batch_size']} rows per step; (a) and (b) take the same optimizer steps "
             f"({', '.join(f'{k} {v}' for k, v in s['steps_small'].items())}); (c) "
             f"{', '.join(f'{k} {v} epoch(s)' for k, v in s['epochs_full'].items())}. Probe: t10k[5000:{5000 + s['probe_images']}] "
             f"-> t10k[0:{s['test_images']}], {s['probe_epochs']} epochs.", "",
             "| student | pre-training data | rows | probe accuracy % (mean ± std, seeds) | pre-training seconds |",
             "| --- | --- | --- | --- | --- |"]
    names = {"random_init": "(d) random init", "whole_set": "(c) the whole optimized set"}
    for arch, t in sm["table"].items():
        order = ["random_init"] + [f"{v}_{m}" for m in s["sizes"] for v in ("distilled", "random_subset")] + ["whole_set"]
        for k in order:
            v = t.get(k)
            if not v or not v["accuracy"]:
                continue
            variant, _, size = k.rpartition("_")
            name = names.get(k) or ("(a) distilled (KRR-ST)" if variant == "distilled" else "(b) random subset, own targets")
            rows = size if size.isdigit() else ("0" if k == "random_init" else str(r["rows"]))
            a = v["accuracy"]
            lines.append(f"| {arch} | {name} | {rows} | {100 * a['mean']:.2f} ± {100 * a['std']:.2f} ({a['n']}) | "
                         f"{v['train_seconds']['mean']:.0f} |")
    return "\n".join(lines)


def distill_levers_table(main: dict) -> str:
    """Seed 0 of the main run next to each lever run (benchmarks/results/levers/distill_*.json): one thing changed."""
    def seed0(r):
        out = {}
        for x in r["runs"]:
            if x["seed"] == 0 and x["variant"] in ("distilled", "random_subset"):
                out[(x["arch"], x["variant"], x["size"])] = x["probe_accuracy"]
        return out

    levers = load_levers("distill_*.json")
    runs = [("main run (above)", main)] + [(r["settings"].get("note") or "?", r) for r in levers]
    if len(runs) == 1:
        return ""
    keys = sorted({(a, m) for _, r in runs for (a, v, m) in seed0(r)})
    lines = ["Levers, seed 0 (one change each against the main run; the distillations are cached, so a lever that "
             "changes only the students reuses the main run's distilled sets): (a) distilled / (b) random subset, "
             "probe accuracy %; the KRR loss, first -> last logged window, and how far the "
             "synthetic rows moved from the real rows they started from:", "",
             "| lever | " + " | ".join(f"{a} M={m}" for a, m in keys) + " | KRR loss |",
             "| --- " * (len(keys) + 2) + "|"]
    for name, r in runs:
        acc = seed0(r)
        cells = []
        for a, m in keys:
            da, db = acc.get((a, "distilled", m)), acc.get((a, "random_subset", m))
            cells.append("" if da is None or db is None else f"{100 * da:.2f} / {100 * db:.2f} ({100 * (da - db):+.2f})")
        loss = "; ".join(f"{k.split('-')[0]}: {v['loss'][0]:.3f} -> {v['loss'][-1]:.3f}" + (
            f" (moved {v['drift']['pixel_abs_change']:.1f} / 255 per pixel, "
            f"{v['drift']['target_change_in_stds']:.3f} std per target)" if v.get("drift") else "")
            for k, v in r["distill"].items() if k.endswith("-s0"))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {loss} |")
    return "\n".join(lines)


SIGNAL_VARIANTS = (("distilled", "distilled (X_s, Y_s)"), ("paired", "paired control: the starting rows, own targets"),
                   ("random", "M random rows, own targets"), ("whole", "the whole set, same steps (headroom)"),
                   ("labeled_random", "the paper's Random: M labelled rows, cross-entropy"),
                   ("random_init", "random init"))


def _pm(v) -> str:
    return "" if not v else f"{100 * v['mean']:.2f} ± {100 * v['std']:.2f} ({v['n']})"


def _gain(g: dict) -> str:
    """A recipe's distilled - paired points with the seed spread, from krr_signal's goals."""
    return f"{g.get('distilled_minus_paired_points', 0):+.2f} (spread {g.get('spread_points') or 0:.2f})"


def krr_signal_table(r: dict) -> str:
    """Issue 29's check: the signal before students (per seed), then the students per recipe."""
    s, sm = r["settings"], r["summary"]
    lines = [f"KRR-ST on {r['train_rows']} rows of the demo's optimized set ({r['heldout_rows']} more held out: the "
             f"distillation never draws them), M = {s['size']}, {s['steps']} outer steps, AdamW lr {s['lr']:g} "
             f"(end factor {s['lr_final']:g}), real batch {s['real_batch']}"
             f"{' with crop and flip' if s['real_augment'] == 'true' else ''}, channels {s['channels']}, pool of "
             f"{s['pool_size']} ConvNet-{s['pool_width']} (reset every {s['pool_steps']} steps; 0: a fresh network "
             f"every step). Held-out KRR loss: mean over {s['eval_models']} freshly initialised pool ConvNets, the "
             "same for every set. Drift: mean absolute change from the starting rows; floor: the random walk "
             "sqrt(sum lr_t^2) of those steps (`benchmarks/krr_signal.py`).", "",
             "| seed | held-out KRR loss: start -> distilled | fall | M random rows | pixel drift (of 255) / floor | "
             "target drift (std) / floor | distill seconds |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for seed, v in r["seeds"].items():
        g = v["signal"]
        lines.append(f"| {seed} | {g['loss_initial']:.4f} -> {g['loss_distilled']:.4f} | {100 * g['heldout_fall']:.1f} % | "
                     f"{g['loss_random']:.4f} | {g.get('x_drift', 0):.2f} / {g.get('floor_pixels', 0):.2f} "
                     f"({g.get('x_over_floor', 0):.2f}x) | {g.get('y_drift', 0):.4f} / {g.get('floor', 0):.4f} "
                     f"({g.get('y_over_floor', 0):.2f}x) | {v['distill']['seconds']:.0f} |")
    if not sm["table"]:
        return "\n".join(lines)
    recipes = [k for k in ("mse", "product") if k in sm["table"]]
    heads = {"mse": f"pool ConvNet-{s['pool_width']}, MSE, no augmentation",
             "product": f"{s['product_arch']}, 1 - cos, RELA's augmentation (coopt train)"}
    lines += ["", f"Students: {s['student_steps']} optimizer steps of {s['batch_size']} rows on every variant, then the "
              f"linear probe (t10k[5000:{5000 + s['probe_images']}] -> t10k[0:{s['test_images']}], "
              f"{s['probe_epochs']} epochs). Probe accuracy %, mean ± std (seeds):", "",
              "| pre-training data | " + " | ".join(heads[k] for k in recipes) + " |",
              "| --- |" + " --- |" * len(recipes)]
    for key, name in SIGNAL_VARIANTS:
        cells = [_pm(sm["table"].get("labels" if key == "labeled_random" else k, {}).get(key)) for k in recipes]
        if key == "labeled_random":
            cells = [f"{cells[0]} ({s['product_arch']})"] + [""] * (len(recipes) - 1) if any(cells) else cells
        if any(cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def krr_signal_levers_table(main: dict) -> str:
    """Seed 0's signal in the main run beside each lever run (benchmarks/results/levers/krr_signal_*.json): what
    moves the drift against the random-walk floor and the held-out fall."""
    levers = load_levers("krr_signal_*.json")
    if not levers:
        return ""
    lines = ["Seed 0 of the signal check under other settings (one run each, `benchmarks/results/levers/krr_signal_*.json`):",
             "", "| run | M | steps | lr | pool_steps | held-out fall | pixel drift / floor | distill seconds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in [("main run (above)", main)] + [("lever", r) for r in levers]:
        s, v = r["settings"], r["seeds"].get("0")
        if not v:
            continue
        g = v["signal"]
        lines.append(f"| {name} | {s['size']} | {s['steps']} | {s['lr']:g} | {s['pool_steps']} | "
                     f"{100 * g['heldout_fall']:.1f} % | "
                     f"{g.get('x_drift', 0):.2f} / {g.get('floor_pixels', 0):.2f} ({g.get('x_over_floor', 0):.2f}x) | "
                     f"{v['distill']['seconds']:.0f} |")
    return "\n".join(lines)


def krr_student_levers_table(main: dict) -> str:
    """The MSE students on the main run's distilled and paired sets at other student lengths
    (benchmarks/results/levers/krr_students_*.json: the same distillations, only the students retrained)."""
    levers = load_levers("krr_students_*.json")
    if not levers:
        return ""
    lines = ["The same distilled and paired sets under MSE students of other lengths "
             "(`benchmarks/results/levers/krr_students_*.json`; probe accuracy %, mean ± std over seeds):", "",
             "| student steps | distilled | paired | whole set | distilled - paired |", "| --- | --- | --- | --- | --- |"]
    for r in sorted([main] + levers, key=lambda r: r["settings"]["student_steps"]):
        t, g = r["summary"]["table"].get("mse", {}), r["summary"]["goals"].get("mse", {})
        if not t:
            continue
        lines.append(f"| {r['settings']['student_steps']} | {_pm(t.get('distilled'))} | {_pm(t.get('paired'))} | "
                     f"{_pm(t.get('whole'))} | {_gain(g)} |")
    return "\n".join(lines)


def krr_setting_levers_table(main: dict) -> str:
    """Whole protocols at other M and pool settings, students included (the lever runs of
    benchmarks/results/levers/krr_signal_*.json with students on every seed): does any setting let a student read
    the signal, and which half of the distilled set (images, targets) does it read?"""
    runs = sorted([main] + load_levers("krr_signal_*.json"),
                  key=lambda r: (r["settings"]["size"], r["settings"]["pool_steps"], r["settings"]["steps"]))
    rows = [(r, rc) for r in runs for rc in ("mse", "product")
            if r["summary"]["table"].get(rc) and r["summary"]["goals"].get(rc, {}).get("seeds", 0) >= 2]
    if len({id(r) for r, _ in rows}) < 2:
        return ""
    lines = ["Whole protocols at other sizes and pools, 3 seeds each (probe accuracy %, mean ± std over seeds; "
             "mse: the pool ConvNet-16 with MSE, no augmentation; product: `coopt train`'s resnet10t with 1 - cos and "
             "augmentation; images only: the distilled images with the starting rows' targets; targets only: the "
             "starting images with the distilled targets; gap closed: (distilled - paired) / (whole - paired)):", "",
             "| M | steps | lr | pool_steps | recipe | held-out fall | drift / floor | distilled | paired | "
             "M random rows | whole set | images only | targets only | distilled - paired | gap closed |",
             "|" + " --- |" * 15]
    for r, rc in rows:
        s, sig = r["settings"], r["summary"]["signal"]
        t, g = r["summary"]["table"][rc], r["summary"]["goals"][rc]
        fall, drift, gap = sig.get("heldout_fall") or {}, sig.get("x_over_floor") or {}, g.get("gap_closed")
        lines.append(f"| {s['size']} | {s['steps']} | {s['lr']:g} | {s['pool_steps']} | {rc} | "
                     f"{100 * fall.get('mean', 0):.1f} % | {drift.get('mean', 0):.2f}x | {_pm(t.get('distilled'))} | "
                     f"{_pm(t.get('paired'))} | {_pm(t.get('random'))} | {_pm(t.get('whole'))} | "
                     f"{_pm(t.get('images_only')) or '–'} | {_pm(t.get('targets_only')) or '–'} | "
                     f"{_gain(g)} | {'–' if gap is None else f'{100 * gap:+.0f} %'} |")
    return "\n".join(lines)


def krr_goal_rows(r: dict, row) -> None:
    g = r["summary"]["goals"]
    sig = r["summary"]["signal"]
    fall, drift = sig.get("heldout_fall"), sig.get("x_over_floor")
    row("KRR-ST: held-out KRR loss, starting -> distilled rows", ">= 10 % lower",
        None if not fall else f"{100 * fall['mean']:.1f} % ± {100 * fall['std']:.1f}", g["heldout_fall_10pct"])
    row("KRR-ST: pixel drift of X_s against the random-walk floor", ">= 2x",
        None if not drift else f"{drift['mean']:.2f}x", g["drift_2x_floor"])
    for rc in ("mse", "product"):
        v = g.get(rc)
        if not v:
            continue
        row(f"KRR-ST ({rc} students): distilled vs paired control", "> the seed spread",
            f"{v['distilled_minus_paired_points']:+.2f} " + (f"(spread {v['spread_points']:.2f}, {v['seeds']} seeds)"
                                                              if v["spread_points"] is not None else "(1 seed)"),
            v["beats_paired_beyond_spread"])
        if "gap_closed" in v:
            gc = v["gap_closed"]
            row(f"KRR-ST ({rc} students): share of the paired -> whole-set gap closed", ">= 50 %",
                "n/a" if gc is None else f"{100 * gc:.0f} %", v["closes_half_the_gap"])
