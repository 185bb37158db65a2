"""docs/results.md's scale table and goal rows, from benchmarks/results/scale.json (benchmarks/scale.py)."""
from __future__ import annotations


def _sizes(r: dict) -> tuple[str, str]:
    small, large = r["settings"]["sizes"]
    return str(small), str(large)


def scale_table(r: dict) -> str:
    s, (a, b) = r["summary"], _sizes(r)
    runs, plain = r["runs"], r["plain"]
    thr = sorted(plain[a], key=int)
    lev = {k: v for k, v in r["levers"].items() if k.startswith("num_cpus_")}
    rows = [
        ("images (synthetic PNG in Parquet shards, K = 4 zoo teachers)", f"{int(a):,}", f"{int(b):,}"),
        ("optimize wall time, s (split, embed, score, align, merge)", runs[a]["wall_seconds"],
         f"{runs[b]['wall_seconds']} ({s['wall_ratio']}x for {s['size_ratio']:g}x the images)"),
        ("split at the source, s", runs[a]["split"]["seconds"], runs[b]["split"]["seconds"]),
        ("optimize, images/s (rows embedded / wall)", runs[a]["images_per_s"], runs[b]["images_per_s"]),
    ]
    for t in thr:
        rows.append((f"plain single-process loop, {t} thread(s), images/s", plain[a][t]["images_per_s"],
                     plain[b][t]["images_per_s"]))
        rows.append((f"**optimize / plain loop ({t} thread(s))**", s["vs_plain"][a][f"{t}_thread"],
                     s["vs_plain"][b][f"{t}_thread"]))
    rows += [
        ("**driver peak memory (VmHWM), MB**", s["driver_mb"][a], f"{s['driver_mb'][b]} (ratio {s['driver_ratio']})"),
        ("control: the driver also holds every id and its hash (the old code path), MB", s["control_driver_mb"][a],
         f"{s['control_driver_mb'][b]} (ratio {s['control_ratio']})"),
        ("driver Python heap peak (tracemalloc), MB", s["py_heap_peak_mb"][a], s["py_heap_peak_mb"][b]),
        ("control: driver Python heap peak, MB", s["control_py_heap_peak_mb"][a], s["control_py_heap_peak_mb"][b]),
        ("bytes read per participant / source bytes, on disk (mean; expected 1/K + \\|S\\|/N)",
         f"{s['read_fraction'][a]['mean']} ({s['read_fraction'][a]['expected_1_over_k_plus_s']})",
         f"{s['read_fraction'][b]['mean']} ({s['read_fraction'][b]['expected_1_over_k_plus_s']})"),
        ("the same from Ray Data's stats (the read operator's output bytes)",
         s["read_fraction"][a].get("ray_stats_mean"), s["read_fraction"][b].get("ray_stats_mean")),
    ]
    lines = [f"| quantity | {int(a):,} images | {int(b):,} images |", "| --- | --- | --- |"]
    lines += [f"| {q} | {x} | {y} |" for q, x, y in rows]
    lines += ["", f"Placement levers at {int(a):,} images (2 cores, one CPU kept for reading; the "
              f"{int(b):,}-image runs use {r['levers']['chosen_num_cpus']} CPU per actor, the fastest):", "",
              "| CPUs per actor | pools at once | optimize images/s | wall s |", "| --- | --- | --- | --- |"]
    for k, v in lev.items():
        c = float(k.rsplit("_", 1)[1])
        lines.append(f"| {c:g} | {4 // v['waves'] if v['waves'] else '?'} of 4 | "
                     f"{v['images_per_s']} | {v['wall_seconds']} |")
    return "\n".join(lines)


def scale_goal_rows(r: dict, row) -> None:
    s, (a, b) = r["summary"], _sizes(r)
    row(f"driver peak memory, {int(a) // 1000}k vs {int(b) // 1000}k images", "ratio <= 1.2",
        f"{s['driver_mb'][a]} vs {s['driver_mb'][b]} MB ({s['driver_ratio']}); Python heap "
        f"{s['py_heap_peak_mb'][a]} vs {s['py_heap_peak_mb'][b]} MB, control {s['control_py_heap_peak_mb'][a]} vs "
        f"{s['control_py_heap_peak_mb'][b]} MB", s["driver_ratio"] <= 1.2)
    row(f"optimize wall time, {int(b) // 1000}k / {int(a) // 1000}k", "<= 11x", f"{s['wall_ratio']}x",
        s["wall_ratio"] <= 11)
    rf = s["read_fraction"][b]
    row("bytes read per participant / source bytes", "about 1/K + \\|S\\|/N",
        f"{rf['mean']} vs {rf['expected_1_over_k_plus_s']}", abs(rf["mean"] - rf["expected_1_over_k_plus_s"]) <= 0.02)
    for key in sorted(s["vs_plain"][b]):
        lo, hi = s["vs_plain"][a][key], s["vs_plain"][b][key]
        row(f"optimize vs plain loop ({key.replace('_', ' ')}(s)), {int(a) // 1000}k -> {int(b) // 1000}k",
            ">= 0.8 at the large size, rising", f"{lo} -> {hi}", hi >= 0.8 and hi > lo)
