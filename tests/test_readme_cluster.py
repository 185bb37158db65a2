"""docs/cluster.md "On one machine" (the README's cluster sequence), run as a user runs it: the commands are read
from the page's code block (so the two cannot drift apart), executed in order by bash in the repository, and the
output lines the page shows under a command (``#   [optimize] ...``; "..." stands for text left out) must appear
in that command's output.

Both jobs must succeed (they are the Ray Jobs path's end-to-end check: jobs/optimize.py and jobs/pipeline.py submitted
with `ray job submit` to a cluster with token auth on), the optimize job's manifest must account for every image, the
pipeline job must write the manifest, eval.json and the report, its Ray Train
workers must have run on worker nodes, not on the head (the job's driver node), and `local.sh stop` must
leave none of the nodes' processes behind.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, readme_zoo_build

PAGE = REPO / "docs" / "cluster.md"
SECTION = "## On one machine: `cluster/local.sh`"


def readme_steps(text: str) -> list[tuple[str, list[str]]]:
    """``[(command, [expected output lines])]`` from the first bash block after SECTION."""
    body = text[text.index(SECTION):]
    block = body[body.index("```bash\n") + len("```bash\n"):]
    block = block[:block.index("```")]
    steps: list[tuple[str, list[str]]] = []
    cmd = ""
    for line in block.splitlines():
        if cmd:  # a continued command
            cmd += "\n" + line
        elif line.startswith("#"):
            want = line.lstrip("#").strip()
            if want and steps:
                steps[-1][1].append(want)
            continue
        else:
            cmd = line
        if not cmd.endswith("\\"):
            steps.append((cmd, []))
            cmd = ""
    return steps


def leftover(pattern: str, wait_s: float = 60) -> str:
    """Processes whose command line mentions ``pattern`` (pid and command), once those still exiting had up to
    ``wait_s`` to go ("" when none is left)."""
    deadline = time.time() + wait_s
    while True:
        pids = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
        if not pids or time.time() > deadline:
            break
        time.sleep(2)
    if not pids:
        return ""
    return subprocess.run(["ps", "-o", "pid,stat,args", "-p", ",".join(pids)], capture_output=True, text=True).stdout


def test_readme_steps_are_parsed():
    steps = readme_steps(PAGE.read_text())
    cmds = [re.sub(r"\s+#.*$", "", c) for c, _ in steps]
    assert cmds[0].startswith("make setup") and cmds[-1].startswith("cluster/local.sh stop")
    assert sum("ray job submit" in c for c in cmds) == 2 and any("jobs/pipeline.py" in c for c in cmds)
    assert all(want for c, want in steps if "ray job submit" in c)  # each job shows what it prints


@pytest.mark.slow
def test_readme_cluster_sequence_runs_as_documented(tmp_path):
    steps = readme_steps(PAGE.read_text())
    outs = [REPO / "runs" / n for n in ("quick-optimize", "quick")]
    for d in outs:  # the page's run folders: keep a user's, run fresh
        if d.exists():
            d.rename(d.with_name(f"{d.name}.kept-{os.getpid()}"))
    state = Path("/tmp") / f"crm-{os.getpid()}"  # short: Unix socket paths are limited to 107 bytes
    # STOP_WAIT_S: nodes that ran jobs can take 30 s or more to exit on SIGTERM; `stop` kills them after 3 s instead
    # of its default 10 (what is checked is that it stops exactly its own processes)
    env = dict(os.environ, COOPT_LOCAL_STATE=str(state), WAIT_S="300", STOP_WAIT_S="3")
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "readme.log"
    # The first step's `make zoo` already ran, from nothing, in the machine's idle time since the session began
    # (conftest: pytest_collection_finish); here the step runs again as written and finds the teachers built.
    t0 = time.time()
    rc, zoo_out = readme_zoo_build()
    log.write_text(f"$ make zoo (started when the session began, at nice 19)\n{zoo_out}\n")
    assert rc == 0, zoo_out[-4000:]
    seconds, ok = {"0. waited for the early make zoo": round(time.time() - t0, 1)}, False
    try:
        for k, (cmd, want) in enumerate(steps):
            t0 = time.time()
            out = subprocess.run(["bash", "-euo", "pipefail", "-c", cmd], cwd=REPO, env=env, text=True,
                                 capture_output=True, timeout=1500)
            seconds[f"{k + 1}. {cmd.split('#')[0].strip()[:70]}"] = round(time.time() - t0, 1)
            with log.open("a") as f:
                f.write(f"$ {cmd}\n{out.stdout}\n{out.stderr}\n")
            assert out.returncode == 0, f"{cmd}\n{(out.stdout + out.stderr)[-4000:]}"
            for w in want:  # "..." on the page stands for text left out
                for piece in filter(None, (p.strip() for p in w.split("..."))):
                    assert piece in out.stdout + out.stderr, f"the page says `{cmd[:60]}` prints {w!r}; see {log}"
            if "ray job submit" in cmd:
                assert re.search(r"Job '\S+' succeeded", out.stdout + out.stderr), (out.stdout + out.stderr)[-3000:]
        # the optimize job (jobs/optimize.py under `ray job submit`, token auth on) accounted for every image
        man = json.loads((outs[0] / "manifest.json").read_text())
        assert man["total_rows"] == 500 and man["optimized_rows"] + man["error_rows"] == 500, man
        assert [q["name"] for q in man["participants"]] == ["p0", "p1", "p2", "p3"]
        run = outs[1]
        for f in ("manifest.json", "eval.json", "report/report.html", "student/student.pt"):
            assert (run / f).exists(), f
        metrics = json.loads((run / "student" / "metrics.json").read_text())
        assert metrics["workers"] == 2 and len(metrics["worker_nodes"]) == 2
        assert metrics["driver_node"] and metrics["driver_node"] not in metrics["worker_nodes"], metrics
        # the last command, `local.sh stop`, stopped exactly the processes local.sh started
        assert not (state / "pids").exists()
        assert not leftover(f"{state}/t"), leftover(f"{state}/t")
        print("README cluster sequence, seconds per command:", json.dumps(seconds, indent=1))
        ok = True
    finally:
        subprocess.run([str(REPO / "cluster" / "local.sh"), "stop"], cwd=REPO, env=env, capture_output=True,
                       timeout=300)
        if ok:  # on failure keep the nodes' logs for the reader
            shutil.rmtree(state, ignore_errors=True)
        for d in outs:
            kept = d.with_name(f"{d.name}.kept-{os.getpid()}")
            if kept.exists():
                shutil.rmtree(d, ignore_errors=True)
                kept.rename(d)
