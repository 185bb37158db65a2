"""docs/results.md's zoo-diversity table, from benchmarks/results/zoo_diversity.json (benchmarks/zoo_diversity.py)."""
from __future__ import annotations


def zoo_diversity_table(r: dict) -> str:
    p = r["protocol"]
    lines = [f"Linear probe on {p['probe_images']:,} images of {p['probe_split']} (no teacher trained on them), "
             f"tested on {p['test_images']:,} of {p['test_split']}, {p['probe_epochs']} epochs; a zoo passes when "
             f"all its teachers together probe at least {p['margin_points']:g} points above its best one alone "
             "(`python benchmarks/zoo_diversity.py`).", "",
             "| zoo | each teacher alone % | best alone % | top two together % | all together % | all - best, points "
             "| passes |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, z in r["zoos"].items():
        alone = ", ".join(f"{t} {100 * v:.2f}" for t, v in z["teachers"].items())
        lines.append(f"| `{name}` | {alone} | {100 * z['best_alone']:.2f} | {100 * z['top2_together']:.2f} | "
                     f"{100 * z['all_together']:.2f} | {z['gain_all_over_best_points']:+.2f} | "
                     f"{'yes' if z['passes'] else 'no'} |")
    return "\n".join(lines)
