"""Continual-rounds benchmark: does the student get better round after round when it joins the pool?

Every arm is the product's own `coopt run --rounds R` (``pipeline.run_all`` on a local Ray: real actor pools, Ray
Train, the evaluate stage's linear probe), side by side in one run, per seed:
- ``extra``: round r's student joins round r + 1 as one more participant (K + 1 shards);
- ``replace``: it takes the place of the participant with the worst uniformity;
- ``relabel``: it owns every image; the 4 teachers embed only S;
- ``extra+warm``: ``extra`` with ``rounds.warm_start`` (round r + 1's student starts from round r's weights);
- ``control: warm, no join``: the warm start alone: round r's student starts from round r - 1's and trains on
  round 1's optimized set again (train + evaluate stages only), so the warm start's extra epochs are separated
  from what the joining student adds.
Round 1 is the same run in every arm (the same config), so it is computed once per seed and copied.

The student is the main fidelity table's (resnet10t on 1,000 images, batch 64) with 4 epochs a round (the table's 6
do not fit 3 seeds x 5 arms x 4 rounds on 2 cores), drawn from a pool of --pool Fashion-MNIST images that the 4 zoo
teachers (clip-tiny-a..d) and the students embed; the probe is the evaluate stage's (public train[0:1000] ->
t10k[0:1000], 50 epochs).

CPU protocol (the committed numbers, 2 cores):
    python benchmarks/rounds.py                # 3 seeds x 4 rounds x 4 arms + control
GPU protocol (a device machine): the whole unlabeled split, resnet18, 20 epochs, 10 rounds (the paper's count):
    python benchmarks/rounds.py --pool 50000 --student-limit 0 --arch resnet18 --epochs 20 --rounds 10 --use-gpu
  (--gpus G, default 1: the student trains on G Ray Train workers, one GPU each, and the K participant pools share
  the G GPUs in one wave, G/K of a GPU each)
    python benchmarks/rounds.py --quick        # smoke check: 1 seed, 2 rounds, tiny everything
Writes benchmarks/results/rounds[_quick].json and rounds[_quick].png.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from pathlib import Path

import numpy as np

from common import RESULTS, ROOT, log, machine, start_ray, write_json, zoo_teachers

from coopt_ray.config import parse_config  # noqa: E402
from coopt_ray.rundir import EVAL, STUDENT  # noqa: E402

ARMS = (("extra", "extra", False), ("replace", "replace", False), ("relabel", "relabel", False),
        ("extra+warm", "extra", True))
CONTROL = "control: warm, no join"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=None, help="default 3 (quick 1)")
    ap.add_argument("--rounds", type=int, default=None, help="default 4 (quick 2)")
    ap.add_argument("--pool", type=int, default=None, help="unlabeled images the rounds run on (default 2000)")
    ap.add_argument("--student-limit", type=int, default=None, help="rows each student trains on (default 1000; "
                    "0: all)")
    ap.add_argument("--arch", default="resnet10t")
    ap.add_argument("--epochs", type=int, default=None, help="student epochs per round (default 4)")
    ap.add_argument("--use-gpu", action="store_true")
    ap.add_argument("--gpus", type=int, default=1, help="GPUs the GPU protocol uses (student workers; pools share them)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-rounds"))
    a = ap.parse_args(argv)
    q = a.quick
    a.seeds = a.seeds or (1 if q else 3)
    a.rounds = a.rounds or (2 if q else 4)
    a.pool = a.pool or (600 if q else 2000)
    a.student_limit = (300 if q else 1000) if a.student_limit is None else a.student_limit
    a.epochs = a.epochs or (1 if q else 4)
    a.probe = 300 if q else 1000
    a.probe_epochs = 10 if q else 50
    return a


def base_config(a, teachers: list[dict], seed: int, join: str, warm: bool):
    gpu = min(1.0, a.gpus / len(teachers)) if a.use_gpu else 0  # K pools share the GPUs in one wave
    return parse_config({
        "seed": seed, "zoo_dir": str(ROOT / "zoo"),
        "data": {"source": "fashion-mnist", "image_size": 32, "limit": a.pool},
        "participants": [{"name": f"p{i}", "model": t["model"], "batch_size": 512, "num_gpus": gpu}
                         for i, t in enumerate(teachers)],
        "shared": {"fraction": 0.01, "min": 16},
        "align": {"ridge": 1e-2},
        "student": {"arch": a.arch, "epochs": a.epochs, "batch_size": 64,
                    "workers": max(1, a.gpus) if a.use_gpu else 2, "use_gpu": a.use_gpu,
                    "limit": a.student_limit or None},
        "eval": {"probe_epochs": a.probe_epochs, "probe_limit": a.probe, "test_limit": a.probe},
        "rounds": {"count": a.rounds, "join": join, "warm_start": warm},
    })


def control_rounds(a, cfg, round1: Path, out: Path) -> list[dict]:
    """The warm start alone: round r trains from round r - 1's student on round 1's optimized set again."""
    from coopt_ray.evaluate import run_evaluate
    from coopt_ray.rundir import read_json
    from coopt_ray.train import run_train

    rows = [{"round": 1, "student_probe": read_json(round1 / EVAL)["student"]["probe_accuracy"]}]
    prev = round1
    for r in range(2, a.rounds + 1):
        d = out / str(r)
        if not (d / EVAL).exists():
            shutil.rmtree(d, ignore_errors=True)
            shutil.copytree(round1, d, ignore=shutil.ignore_patterns(STUDENT, EVAL, "report", "_DONE.json"))
            c = dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, init=str(prev / STUDENT)))
            run_train(c, d, log=lambda s: None)
            run_evaluate(c, d, log=lambda s: None)
        rows.append({"round": r, "student_probe": read_json(d / EVAL)["student"]["probe_accuracy"]})
        log(f"[rounds] {CONTROL} round {r}: {100 * rows[-1]['student_probe']:.2f}%")
        prev = d
    return rows


def summarise(per_seed: dict, rounds: int) -> dict:
    """Per arm: mean and std of the student probe per round, the gain last - first, the goals."""
    out = {}
    for arm, runs in per_seed.items():
        acc = np.array([[100 * r["student_probe"] for r in rows] for rows in runs])  # seeds x rounds
        gain = acc[:, -1] - acc[:, 0]
        mean = acc.mean(0)
        out[arm] = {
            "probe_mean": mean.round(3).tolist(), "probe_std": acc.std(0).round(3).tolist(),
            "gain_mean": round(float(gain.mean()), 3), "gain_std": round(float(gain.std()), 3),
            "worst_round_vs_first": round(float((mean[1:] - mean[0]).min()), 3) if rounds > 1 else 0.0,
            "goal_gain_1_5": bool(gain.mean() >= 1.5 and gain.mean() > gain.std()),
            "goal_no_round_below_first": bool((mean[1:] >= mean[0]).all()),
        }
        if arm != CONTROL:  # which round's student (if any) the score picked as the alignment target
            out[arm]["student_first_best_round"] = [next((r["round"] for r in rows if r["student_is_best"]), None)
                                                    for rows in runs]
            out[arm]["student_uniformity_rank"] = [  # per seed, per round from 2: the joining student's rank (1 = best)
                [1 + sorted(q["uniformity"] for q in r["participants"]).index(
                    next(q["uniformity"] for q in r["participants"] if q["name"] == f"student-r{r['round'] - 1}"))
                 for r in rows[1:]] for rows in runs]
    return out


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for arm, s in summary.items():
        rs = np.arange(1, len(s["probe_mean"]) + 1)
        ax.errorbar(rs, s["probe_mean"], yerr=s["probe_std"], marker="o", capsize=3, label=arm,
                    linestyle=":" if arm == CONTROL else "-")
    ax.set(xlabel="round", ylabel="student linear-probe accuracy (%)", title="continual rounds (mean ± std over seeds)")
    ax.set_xticks(rs)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    from coopt_ray.pipeline import run_all

    a = parse_args(argv)
    t_all = time.time()
    teachers = [t for t in zoo_teachers(ROOT / "zoo", a.quick) if t["name"] != "clip-tiny-e"][:4]
    start_ray()
    out = Path(a.out + ("-quick" if a.quick else ""))
    per_seed: dict = {name: [] for name, _, _ in ARMS}
    per_seed[CONTROL] = []
    seconds: dict = {name: [] for name in per_seed}
    for seed in range(a.seeds):
        first = None
        for name, join, warm in ARMS:
            run = out / f"seed{seed}" / name.replace("+", "_")
            cfg = base_config(a, teachers, seed, join, warm)
            if first is not None and not (run / "rounds" / "1").exists():  # round 1 is the same run in every arm
                shutil.copytree(first, run / "rounds" / "1")
            t = time.time()
            log(f"[rounds] seed {seed} arm {name}: {a.rounds} rounds in {run}")
            summary = run_all(cfg, run, log=lambda s: None if s.startswith(("[optimize]", "[train]", "[evaluate]",
                                                                             "[run]", "[report]")) else log(s),
                              rounds=a.rounds)
            seconds[name].append(round(time.time() - t, 1))
            per_seed[name].append(summary["rounds"])
            first = first or run / "rounds" / "1"
        t = time.time()
        per_seed[CONTROL].append(control_rounds(a, base_config(a, teachers, seed, "extra", True), first,
                                                out / f"seed{seed}" / "control"))
        seconds[CONTROL].append(round(time.time() - t, 1))
    summary = summarise(per_seed, a.rounds)
    for arm, s in summary.items():
        log(f"[rounds] {arm:<24} " + "  ".join(f"r{i + 1} {m:.2f}±{sd:.2f}" for i, (m, sd) in
                                               enumerate(zip(s["probe_mean"], s["probe_std"])))
            + f"  gain {s['gain_mean']:+.2f}±{s['gain_std']:.2f}")
    suffix = "_quick" if a.quick else ""
    doc = {"settings": {k: v for k, v in vars(a).items() if k != "out"}, "teachers": [t["name"] for t in teachers],
           "machine": machine(), "summary": summary, "per_seed": per_seed, "seconds": seconds,
           "total_seconds": round(time.time() - t_all, 1)}
    write_json(RESULTS / f"rounds{suffix}.json", doc)
    plot(summary, RESULTS / f"rounds{suffix}.png")
    log(f"[rounds] wrote {RESULTS / f'rounds{suffix}.json'} in {time.time() - t_all:.0f}s")


if __name__ == "__main__":
    main()
