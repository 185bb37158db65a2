"""docs/results.md's student-heads table (issue 27), from benchmarks/results/heads/fidelity_<zoo>.json: the same
fidelity protocol on each zoo, the heads settings next to today's aligned head, centralised and SimCLR."""
from __future__ import annotations

import json

from common import RESULTS

ZOOS = {"zoo": "default zoo (5 nested CLIP-tiny teachers, K=4)",
        "zoo-diverse": "diverse zoo (3 teachers that differ, K=3)"}
ROWS = (("coopt", "aligned head (today's default)", True), ("heads_pp", "per-participant heads", True),
        ("heads_both", "per-participant + aligned heads", True),
        ("heads_all", "every teacher on every image (not collaborative)", False),
        ("central", "centralised: the best-probing teacher labels every image", False),
        ("simclr", "SimCLR at its best lr", False))


def load_heads() -> dict:
    out = {}
    for zoo in ZOOS:
        p = RESULTS / "heads" / f"fidelity_{zoo}.json"
        if p.exists():
            out[zoo] = json.loads(p.read_text())
    return out


def _pct(v) -> str:
    return "" if not v else f"{100 * v['mean']:.2f} ± {100 * v['std']:.2f} ({v['n']})"


def heads_table(res: dict) -> str:
    if not res:
        return ""
    any_r = next(iter(res.values()))
    s = any_r["settings"]
    lines = [f"Student `{s['arch']}` on {s['images']} images, {s['epochs']} epochs, lr {s['lrs'][0]:g}, batch "
             f"{s['batch_size']}, loss `{s.get('loss', 'cos')}`{', PHI-S' if s.get('phi_s') else ''}; probe "
             f"{s['probe_images']} / {s['test_images']} images, {s['probe_epochs']} epochs. Accuracy % as mean ± std "
             "(seeds); `python benchmarks/fidelity.py ... --methods coopt,central,heads_pp,heads_both,heads_all,...` "
             "with the command in each JSON's `settings`.", "",
             "| setting | collaborative | " + " | ".join(ZOOS[z] for z in res) + " |",
             "| --- | --- |" + " --- |" * len(res)]
    solos = sorted({k for r in res.values() for k in r if k.startswith("solo_") and r.get(k)})
    for key, name, collab in ROWS + tuple((k, f"{k[5:]} alone labels every image", False) for k in solos):
        if any(r.get(key) for r in res.values()):
            lines.append(f"| {name} | {'yes' if collab else 'no'} | " + " | ".join(_pct(r.get(key)) for r in res.values())
                         + " |")
    lines.append("| best collaborative - centralised, points | | " + " | ".join(
        f"{r['goals'].get('best_collaborative_minus_central_points', 'n/a')} ({r['goals'].get('best_collaborative')})"
        for r in res.values()) + " |")
    return "\n".join(lines)


def heads_goal_rows(res: dict, row) -> None:
    """Issue 27's goals: on the diverse zoo vs centralised / the best single teacher / SimCLR; on the default zoo
    within 0.2 points of centralised."""
    d = res.get("zoo-diverse")
    if d:
        g = d["goals"]
        for key, target, limit in (("best_collaborative_minus_central_points", ">= +0.5 points", 0.5),
                                   ("best_collaborative_minus_best_single_points", ">= +1 point", 1.0),
                                   ("best_collaborative_minus_simclr_points", ">= +2 points", 2.0)):
            v = g.get(key)
            row(f"diverse zoo: best collaborative ({g.get('best_collaborative')}) "
                f"{key.split('_minus_')[1].replace('_points', '').replace('_', ' ')}", target, v,
                None if v is None else v >= limit)
    z = res.get("zoo")
    if z:
        v = z["goals"].get("best_collaborative_minus_central_points")
        row(f"default zoo: best collaborative ({z['goals'].get('best_collaborative')}) vs centralised",
            ">= -0.2 points", v, None if v is None else v >= -0.2)
