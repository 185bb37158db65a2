"""Where `make test`'s time goes: group a `pytest --durations=0` log by kind of cost.

    make test PYTEST_ARGS="--durations=0" > test.log 2>&1     # a fresh clone (see the README's test section)
    python benchmarks/test_time.py test.log [--readme-log PATH] --out benchmarks/results/test_time_after.json

With ``COOPT_TEST_CPU_LOG=FILE`` set for the run (tests/conftest.py writes one JSON line per test: its wall seconds and
the machine's busy CPU-seconds over them), ``--cpu-log FILE`` adds each group's busy CPU-seconds and cores in use.

Each test's setup/call/teardown seconds go to the first group whose pattern matches its node id. The README cluster
sequence is split further from its own log (tmp_path/readme.log): the zoo build, the two Ray jobs and the rest.
Prints a Markdown table (seconds, share of pytest's total) and writes it with the raw rows as JSON.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

# (group, pattern on "path::test[param] phase"), first match wins; the kinds the issue asks to tell apart.
GROUPS = [
    ("README cluster sequence (local.sh, 2 Ray jobs)", r"test_readme_cluster\.py::test_readme_cluster_sequence"),
    ("kill tests (own Ray per killed driver, resume)", r"killed|kill_|_kill"),
    ("multi-node Ray clusters (placement)", r"test_placement\.py::.*(gpu_nodes|nodes_|node_labels_put|waves|"
                                            r"within_seconds|fourth|three_gpu|adding|of_the_live)"),
    ("Ray Jobs head (ray start --head, job submit)", r"test_jobs\.py::test_(dashboard|optimize_job|bad_config_job)"),
    ("subprocess CLI drivers (python start-up, imports)", r"test_jobs\.py|test_config\.py::test_config_error_on_command"
                                                         r"|test_rounds\.py::test_rounds_job"),
    ("shared session artefacts (optimized RUN, Ray start)", r" setup$"),
    ("pipeline runs on the session Ray (optimize/train/evaluate)", r"test_(run|optimize|distill|mdatm_stage|evaluate|"
                                                                  r"bad_images|split|webdataset|safety|rounds|families|"
                                                                  r"embed_stage|devices|heads)\.py"
                                                                  r"|test_bad_configs\.py::test_num_gpus"),
    ("in-process model training (students, zoo, baselines)", r"test_(train|zoo|student_learns|benchmarks_smoke|mdatm|"
                                                              r"export)\.py"),
    ("unit tests (math, configs, files)", r"."),
]
LINE = re.compile(r"^([0-9.]+)s (setup|call|teardown)\s+(\S+)")


def parse(text: str) -> list[dict]:
    """``[{"seconds", "phase", "test"}]`` from pytest's ``--durations`` lines."""
    return [{"seconds": float(m[1]), "phase": m[2], "test": m[3]} for m in map(LINE.match, text.splitlines()) if m]


def total_seconds(text: str) -> float:
    m = re.search(r"passed.* in ([0-9.]+)s", text)
    return float(m[1]) if m else float("nan")


def group_of(test: str, phase: str) -> str:
    """The first group whose pattern matches ``"path::test[param] phase"``."""
    return next(g for g, pat in GROUPS if re.search(pat, f"{test} {phase}"))


def group(rows: list[dict]) -> dict[str, float]:
    out = {g: 0.0 for g, _ in GROUPS}
    for r in rows:
        out[group_of(r["test"], r["phase"])] += r["seconds"]
    return out


def readme_parts(log: str) -> dict[str, float]:
    """The README sequence's own split: zoo build, optimize job, pipeline job stages (from its log lines)."""
    parts = {}
    if built := re.findall(r"\[zoo\] built \d+ teachers in ([0-9.]+)s", log):  # the whole build's line is last
        parts["zoo build (make zoo)"] = float(built[-1])
    done = [float(x) for x in re.findall(r"\[optimize\] done: .* in ([0-9.]+)s", log)]
    if done:
        parts["optimize job (2 waves)"] = done[0]
    if m := re.search(r"\[run\] stage seconds: (.*)", log):
        for k, v in re.findall(r"(\w+) ([0-9.]+)", m[1]):
            parts[f"pipeline job: {k}"] = float(v)
    return parts


def cpu_groups(cpu_rows: list[dict]) -> dict[str, list[float]]:
    """Per group: [wall seconds, busy CPU-seconds of the machine] from the conftest's per-test CPU log (a test's whole
    protocol, its fixtures' set-up included, so the set-up group has no rows of its own here)."""
    out = {g: [0.0, 0.0] for g, _ in GROUPS}
    for r in cpu_rows:
        name = group_of(r["test"], "call")
        out[name][0] += r["wall_s"]
        out[name][1] += r["cpu_s"]
    return out


def table(groups: dict[str, float], total: float, cpu: dict | None = None) -> str:
    cols = " busy CPU-s | cores |" if cpu else ""
    lines = ["| where the time goes | seconds | share |" + cols, "| --- | --- | --- |" + (" --- | --- |" if cpu else "")]
    for g, s in sorted(groups.items(), key=lambda kv: -kv[1]):
        extra = "" if not cpu else (f" {cpu[g][1]:.0f} | {cpu[g][1] / cpu[g][0]:.2f} |" if cpu[g][0] else " – | – |")
        lines.append(f"| {g} | {s:.0f} | {100 * s / total:.0f} % |" + extra)
    if cpu:
        wall, busy = (sum(v[i] for v in cpu.values()) for i in (0, 1))
        lines.append(f"| **pytest total** | **{total:.0f}** | | **{busy:.0f}** | **{busy / max(wall, 1e-9):.2f}** |")
    else:
        lines.append(f"| **pytest total** | **{total:.0f}** | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log")
    ap.add_argument("--readme-log", default=None, help="the README cluster test's readme.log (its per-step split)")
    ap.add_argument("--cpu-log", default=None, help="COOPT_TEST_CPU_LOG's file: busy CPU-seconds per group")
    ap.add_argument("--out", default=None, help="JSON to write (groups, README split, rows)")
    a = ap.parse_args(argv)
    text = Path(a.log).read_text(errors="replace")
    rows, total = parse(text), total_seconds(text)
    groups = group(rows)
    cpu_rows = [json.loads(x) for x in Path(a.cpu_log).read_text().splitlines() if x.strip()] if a.cpu_log else []
    cpu = cpu_groups(cpu_rows) if cpu_rows else None
    print(table(groups, total, cpu))
    readme = readme_parts(Path(a.readme_log).read_text(errors="replace")) if a.readme_log else {}
    for k, v in readme.items():
        print(f"  README sequence: {k}: {v:.0f} s")
    if a.out:
        Path(a.out).write_text(json.dumps({"total_seconds": total, "groups": groups, "readme_sequence": readme,
                                           "cpu_groups": cpu, "rows": rows, "cpu_rows": cpu_rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
