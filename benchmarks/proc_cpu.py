"""Which processes a command's CPU goes to: sample every process's CPU time while the command runs, then sum it by kind
of process (Ray's own process titles: ``ray::RayTrainWorker``, ``ray::MapWorker(...)``, ``ray::_fetch_parquet_file_info``,
raylet, ...).

    python benchmarks/proc_cpu.py --out benchmarks/results/test_procs.txt -- .venv/bin/python -m pytest -q tests/test_run.py

Every process on the machine is sampled each 0.2 s (``/proc/PID/stat``: user + system time), so a process that lives
less than that is missed, and whatever else the machine runs at the time is counted too (processes already running
count only what they use while the command runs; one whose command line was never seen, a kernel thread or a
process first sampled as a zombie, is named ``[its name]``): run it on an otherwise idle machine.
A Ray worker is counted under the last title it had that is not ``IDLE``.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import time
from pathlib import Path

NAMED = ("gcs_server", "raylet", "dashboard/agent", "dashboard.py", "runtime_env/agent", "log_monitor", "monitor.py",
         "pytest", "default_worker", "jobs/", "coopt")


def kind(cmdline: str) -> str:
    """The kind of process a command line says: a Ray title without ids (``ray::MapWorker(...)``), a named Ray or
    project process, or the command line's first 50 characters."""
    if cmdline.startswith("ray::"):
        return re.sub(r"[\d_-]+", "", cmdline.split()[0])[:60]
    return next((k for k in NAMED if k in cmdline[:200]), cmdline[:50])


def sample(seen: dict, me: int, tick: float) -> None:
    """Update ``seen`` (pid -> [CPU seconds, last command line that is not IDLE]) from /proc."""
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) == me:
            continue
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
            cmd = Path(f"/proc/{p}/cmdline").read_text().replace("\0", " ").strip()
        except OSError:
            continue
        f = stat.rsplit(")", 1)[1].split()
        # no command line (a kernel thread, or a zombie: an exited child its parent has not reaped yet): its name,
        # used only until a real command line is seen, and never over one seen before
        rec = seen.setdefault(p, [0.0, cmd or f"[{stat[stat.index('(') + 1:stat.rindex(')')]}]"])
        rec[0] = max(rec[0], (int(f[11]) + int(f[12])) / tick)
        if cmd and "IDLE" not in cmd:
            rec[1] = cmd


def table(seen: dict, top: int = 40) -> str:
    agg: dict = collections.defaultdict(lambda: [0, 0.0])
    for cpu, cmd in seen.values():
        if cpu >= 0.05:
            row = agg[kind(cmd)]
            row[0] += 1
            row[1] += cpu
    rows = sorted(agg.items(), key=lambda kv: -kv[1][1])
    lines = ["| CPU-s | processes | kind |", "| --- | --- | --- |"]
    lines += [f"| {c:.1f} | {n} | `{k}` |" for k, (n, c) in rows[:top]]
    lines.append(f"| **{sum(c for _, c in agg.values()):.1f}** | {sum(n for n, _ in agg.values())} | all |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="also write the table here")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND ...")
    a = ap.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        ap.error("give the command to measure after --")
    seen: dict = {}
    tick, me = os.sysconf("SC_CLK_TCK"), os.getpid()
    sample(seen, me, tick)  # what the processes already running had used: not the command's
    base = {p: rec[0] for p, rec in seen.items()}
    t0 = time.time()
    proc = subprocess.Popen(cmd)
    while proc.poll() is None:
        sample(seen, me, tick)
        time.sleep(0.2)
    seen = {p: [cpu - base.get(p, 0.0), cmd] for p, (cpu, cmd) in seen.items()}
    out = f"`{' '.join(cmd)}`: exit {proc.returncode}, {time.time() - t0:.0f} s\n\n{table(seen)}\n"
    print(out)
    if a.out:
        Path(a.out).write_text(out)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
