"""docs/results.md's labeled-distillation table and goal rows (M-DATM, benchmarks/distill_labeled.py's JSON)."""
from __future__ import annotations


def labeled_table(r: dict) -> str:
    """M-DATM vs random real images per IPC, the published anchors beside them, seconds and the expert speed-up."""
    c, a = r["settings"]["common"], r["anchors"]
    ipcs = sorted(r["ipc"], key=int)
    per = "; ".join(f"IPC {i}: range {r['settings']['ipc'][i]['range']}, {r['settings']['ipc'][i]['iterations']} "
                    f"iterations" + (f", batch_syn {r['settings']['ipc'][i]['batch_syn']}"
                                     if r["settings"]["ipc"][i].get("batch_syn") else "") for i in ipcs)
    lines = [f"{r['protocol'].upper()} protocol: {r['settings']['labeled']}; {c['experts']} experts x "
             f"{c['expert_epochs']} epochs, ConvNet-3 width {c['width']}, N = {c['syn_steps']}, M = "
             f"{c['expert_steps']}, lr_img {c['lr_img']:g}; {per}. Scorer: {c['eval_runs']} runs of "
             f"{c['eval_epochs']} epochs, the same for every row; random real images are a fresh draw per run. "
             "Test accuracy % on t10k, mean ± std:", "",
             "| set | " + " | ".join(f"IPC {i}" for i in ipcs) + " |", "| --- " * (len(ipcs) + 1) + "|"]
    for key, name in (("mdatm", "M-DATM (ours, this run)"), ("random", "random real images (this run)"),
                      ("init", "control: the real images M-DATM started from, unchanged (this run)")):
        if not all(r["ipc"][i].get(key) for i in ipcs):
            continue
        lines.append(f"| {name} | " + " | ".join(f"{100 * r['ipc'][i][key]['mean']:.2f} ± "
                                               f"{100 * r['ipc'][i][key]['std']:.2f}" for i in ipcs) + " |")
    lines.append("| M-DATM - random, points | " + " | ".join(f"{r['ipc'][i]['gain_points']:+.2f}" for i in ipcs) + " |")
    if all("matching_gain_points" in r["ipc"][i] for i in ipcs):
        lines.append("| M-DATM - its starting images, points | " +
                     " | ".join(f"{r['ipc'][i]['matching_gain_points']:+.2f}" for i in ipcs) + " |")
    for name, v in a.items():
        if "all" in v:
            continue
        lines.append(f"| {name}, published | " + " | ".join(str(v.get(i, v.get(int(i), "—"))) for i in ipcs) + " |")
    whole = next((v["all"] for v in a.values() if "all" in v), None)
    secs = "; ".join(f"IPC {i}: matching {r['ipc'][i]['seconds']['matching']:.0f} s, scorer "
                     f"{r['ipc'][i]['seconds']['scorer']:.0f} s, {r['ipc'][i]['seconds']['total_with_experts']:.0f} s "
                     "with the experts" for i in ipcs)
    sp = r["expert_speedup"]
    sps = r["settings"].get("speedup") or {"experts": 2, "epochs": 2}  # the CPU protocol's, for JSON written before
    # the setting was recorded
    proj = ", ".join(f"{g} GPU{'s' if int(g) > 1 else ''} {v:g}x" for g, v in sp["projection_gpus"].items())
    lines += ["", f"Whole dataset, published: {whole}. Seconds, every cost: experts {r['expert_seconds']:.0f} s "
              f"(trained once, shared by the IPC runs, which ran side by side); {secs}.",
              f"Expert stage in parallel: the same {sps['experts']} experts ({sps['epochs']} epochs each) take "
              f"{sp['one_worker_2cpus']:.1f} s on 1 Ray worker of 2 CPUs and {sp['two_workers_1cpu']:.1f} s on 2 "
              f"workers of 1 CPU: {sp['speedup']:.2f}x. Experts are independent tasks, so E = {c['experts']} experts "
              f"on G GPUs project to E / ceil(E / G) times one GPU's speed: {proj}."]
    return "\n".join(lines)


def labeled_goal_rows(r: dict, row) -> None:
    """The issue's goals, CPU protocol: IPC 10 >= random + 5 points, IPC 1 >= random + 10; full: IPC 10 >= DSA."""
    for i, need in (("1", 10), ("10", 5)):
        if i in r["ipc"]:
            g = r["ipc"][i]["gain_points"]
            row(f"M-DATM IPC {i} vs random real IPC {i} ({r['protocol']} protocol, same run)", f">= +{need} points",
                f"{g:+.2f}", g >= need)
    if r["protocol"] == "full" and "10" in r["ipc"]:
        m = 100 * r["ipc"]["10"]["mdatm"]["mean"]
        row("M-DATM IPC 10, full protocol", ">= 84.6 (DSA)", f"{m:.2f}", m >= 84.6)
