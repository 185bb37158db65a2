"""docs/results.md's student-heads table (issue 27), from benchmarks/results/heads/fidelity_<zoo>[_augment].json (the
fidelity protocol on each zoo and augmentation setting) and benchmarks/results/fidelity.json (the same protocol: the
default zoo with RELA's augmentation, and SimCLR, which uses no teacher, so it is the same run on either zoo)."""
from __future__ import annotations

import json

from common import RESULTS, load_levers

ZOOS = {"zoo": "default zoo", "zoo-diverse": "diverse zoo"}  # K=4 of 5 nested CLIP-tiny teachers; K=3 that differ
ROWS = (("coopt", "aligned head (today's default)", True), ("heads_pp", "per-participant heads", True),
        ("heads_both", "per-participant + aligned heads", True),
        ("heads_all", "every teacher on every image, one head each", False),
        ("central", "centralised: the best-probing teacher labels every image", False),
        ("simclr", "SimCLR at its best lr (no teacher)", False), ("byol", "BYOL at its best lr (no teacher)", False))
NO_TEACHER = ("simclr", "byol")  # fidelity.json's runs: they use no teacher, so they are every column's
COLLAB = tuple(k for k, _, c in ROWS if c)
SAME = ("images", "epochs", "arch", "batch_size", "probe_images", "test_images", "probe_epochs")


def load_heads() -> dict:
    """``{column label: (zoo, result)}``: every heads JSON, plus fidelity.json (the default zoo with augmentation)
    when its protocol matches theirs: its keys fill that column where a heads JSON for it exists, else it is a
    column of its own; its SimCLR and BYOL fill every column."""
    cols = {}
    for p in sorted((RESULTS / "heads").glob("fidelity_*.json")):
        r = json.loads(p.read_text())
        zoo = p.stem[len("fidelity_"):].replace("_augment", "")
        cols[f"{ZOOS.get(zoo, zoo)}, augment {str(r['settings'].get('augment', 'true')).lower()}"] = (zoo, r)
    fid = RESULTS / "fidelity.json"
    if cols and fid.exists():
        f = json.loads(fid.read_text())
        ref = next(iter(cols.values()))[1]["settings"]
        if all(f["settings"].get(k) == ref.get(k) for k in SAME):
            label = f"{ZOOS['zoo']}, augment true"
            if label in cols:
                cols[label][1].update({k: v for k, v in f.items() if k not in cols[label][1]})
                cols[f"{label} (+ fidelity.json)"] = cols.pop(label)
            else:
                cols[f"{label} (fidelity.json)"] = ("zoo", f)
            for zoo, r in cols.values():
                for k in NO_TEACHER:
                    r.setdefault(k, f.get(k))
    return cols


def _pct(v) -> str:
    return "" if not v else f"{100 * v['mean']:.2f} ± {100 * v['std']:.2f} ({v['n']})"


def _best(cols: dict, zoo: str, keys) -> tuple:
    """The best (mean, key, column) over ``keys`` in the columns of ``zoo``; ``keys`` may be a predicate."""
    got = [(r[k]["mean"], k, c.split(", ", 1)[1]) for c, (z, r) in cols.items() if z == zoo for k in r
           if (keys(k) if callable(keys) else k in keys) and isinstance(r.get(k), dict) and "mean" in r[k]]
    return max(got) if got else None  # (mean, key, the column's setting)


def zoo_goals(cols: dict, zoo: str) -> dict:
    """Best collaborative setting against centralised, the best single teacher and SimCLR, each at its best
    setting over the measured columns, in points."""
    col = _best(cols, zoo, COLLAB)
    if col is None:
        return {}
    out = {"best_collaborative": f"{col[1]} ({col[2]})"}
    for name, keys in (("central", ("central",)), ("best_single", lambda k: k == "central" or k.startswith("solo_")),
                       ("simclr", ("simclr",)), ("heads_all", ("heads_all",))):
        b = _best(cols, zoo, keys)
        if b:
            out[f"minus_{name}"] = round(100 * (col[0] - b[0]), 2)
            out[f"{name}_is"] = f"{b[1]} ({b[2]})"
    return out


def heads_table(cols: dict) -> str:
    if not cols:
        return ""
    s = next(iter(cols.values()))[1]["settings"]
    lines = [f"Student `{s['arch']}` on {s['images']} images, {s['epochs']} epochs, lr {s['lrs'][0]:g}, batch "
             f"{s['batch_size']}, loss `{s.get('loss', 'cos')}`; probe {s['probe_images']} / {s['test_images']} "
             f"images, {s['probe_epochs']} epochs. The default zoo: K=4 of its 5 nested CLIP-tiny teachers; the "
             "diverse zoo: its 3 teachers, which differ (above). `augment` is `student.augment` for every student of teacher "
             "targets (SimCLR keeps its own views). Accuracy % as mean ± std (seeds); each JSON's `settings` holds "
             "its command line (`benchmarks/fidelity.py`).", "",
             "| setting | collaborative | " + " | ".join(cols) + " |", "| --- | --- |" + " --- |" * len(cols)]
    solos = sorted({k for _, r in cols.values() for k in r if k.startswith("solo_") and isinstance(r.get(k), dict)})
    for key, name, collab in ROWS + tuple((k, f"{k[5:]} alone labels every image", False) for k in solos):
        if any(r.get(key) for _, r in cols.values()):
            lines.append(f"| {name} | {'yes' if collab else 'no'} | "
                         + " | ".join(_pct(r.get(key)) for _, r in cols.values()) + " |")
    lines += ["", "Each zoo's best collaborative setting against the others at their best (over the columns above):", "",
              "| zoo | best collaborative | vs centralised | vs best single teacher | vs SimCLR | vs every teacher "
              "on every image |", "| --- | --- | --- | --- | --- | --- |"]
    for zoo in dict.fromkeys(z for z, _ in cols.values()):
        g = zoo_goals(cols, zoo)
        lines.append(f"| {ZOOS.get(zoo, zoo)} | {g.get('best_collaborative')} | "
                     + " | ".join(f"{g[f'minus_{n}']:+.2f} ({g[f'{n}_is']})" if f"minus_{n}" in g else "n/a"
                                  for n in ("central", "best_single", "simclr", "heads_all")) + " |")
    return "\n".join(lines)


def heads_alignment_table(cols: dict) -> str:
    """What the aligned head's targets are made of: per zoo, each participant's map into the best one's space (fit
    on S) with its R² on S and on S's held-out rows (the optimize run the aligned-head students trained on)."""
    lines = ["The aligned head's targets, per participant: the linear map into the best participant's space, fitted on "
             "the shared rows S (`optimize` in each JSON). Held-out R² is on S's rows left out of the fit; below 0, the "
             "map predicts that participant's images worse than the best space's mean does.", "",
             "| zoo | participant | teacher | uniformity | shared rows | R² on S | held-out R² |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    done = set()
    for zoo, r in cols.values():
        opt = r.get("optimize", {}).get("coopt")
        if zoo in done or not opt:
            continue
        done.add(zoo)
        for p in opt["participants"]:
            best = p["name"] == opt["best"]
            r2 = "(best: its own space)" if best else ("n/a" if p["align_r2"] is None else f"{p['align_r2']:.2f}")
            ho = "" if best or p["align_heldout_r2"] is None else f"{p['align_heldout_r2']:.2f}"
            lines.append(f"| {ZOOS.get(zoo, zoo)} | {p['name']} | {p['model'].rsplit('/', 1)[-1]} | "
                         f"{p['uniformity']:.3f} | {p['shared_rows']} | {r2} | {ho} |")
    return "\n".join(lines) if done else ""


def heads_goal_rows(cols: dict, row) -> None:
    """Issue 27's goals: on the diverse zoo vs centralised / the best single teacher / SimCLR; on the default zoo
    within 0.2 points of centralised."""
    g = zoo_goals(cols, "zoo-diverse")
    for name, target, limit in (("central", ">= +0.5 points", 0.5), ("best_single", ">= +1 point", 1.0),
                                ("simclr", ">= +2 points", 2.0)):
        v = g.get(f"minus_{name}")
        if v is not None:
            row(f"diverse zoo: best collaborative vs {name.replace('_', ' ')}, each at its best", target, f"{v:+.2f}",
                v >= limit)
    v = zoo_goals(cols, "zoo").get("minus_central")
    if v is not None:
        row("default zoo: best collaborative vs centralised, each at its best", ">= -0.2 points", f"{v:+.2f}", v >= -0.2)


def heads_levers_table() -> str:
    """Seed 0 on the diverse zoo, one lever per run (benchmarks/results/levers/heads_diverse_1seed_*.json)."""
    runs = load_levers("heads_diverse_1seed_*.json")
    if not runs:
        return ""
    keys = [k for k, _, _ in ROWS if any(r.get(k) for r in runs)]
    keys += sorted({k for r in runs for k in r if k.startswith("solo_") and isinstance(r.get(k), dict)})
    lines = ["Levers on the diverse zoo, seed 0 only (one run per line; `benchmarks/results/levers/heads_diverse_1seed_*"
             ".json`): probe accuracy %.", "",
             "| augment | loss | standardisation | " + " | ".join(keys) + " |", "| --- " * (len(keys) + 3) + "|"]
    merged: dict = {}  # runs with the same lever settings share a line
    for r in runs:
        s = r["settings"]
        lever = (str(s.get("augment", "true")).lower(), s.get("loss", "cos"), bool(s.get("phi_s")))
        merged.setdefault(lever, {}).update({k: r[k] for k in keys if isinstance(r.get(k), dict)})
    for (aug, loss, phis), got in sorted(merged.items()):
        lines.append(f"| {aug} | {loss} | {'PHI-S' if phis else 'per dimension'} | "
                     + " | ".join(f"{100 * got[k]['mean']:.2f}" if k in got else "" for k in keys) + " |")
    return "\n".join(lines)
