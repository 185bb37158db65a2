"""docs/cluster.md "On one machine" (the README's cluster sequence), run as a user runs it: the commands are read
from the page's code block (so the two cannot drift apart), executed in order by bash in the repository, and the
output lines the page shows under a command (``#   [optimize] ...``; "..." stands for text left out) must appear
in that command's output.

Both jobs must succeed (they are the Ray Jobs path's end-to-end check: jobs/optimize.py and jobs/pipeline.py submitted
with `ray job submit` to a cluster with token auth on), the optimize job's manifest must account for every image, the
pipeline job must write the manifest, eval.json and the report, its Ray Train
workers must have run on worker nodes, not on the head (the job's driver node), and `local.sh stop` must
leave none of the nodes' processes behind.

The two jobs are also the suite's check of placement on a live multi-node cluster (the planning itself is tested
without Ray in tests/test_placement.py). From the cluster's actor table (`ray list actors`, asked through the
dashboard with the token) and each job's log: with 2 GPU nodes the first two pools run at once on different GPU
nodes and the third starts when one of them finishes; with 3 GPU nodes all three pools run at once, one per GPU node,
none on the head.
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


def cluster_state(env: dict, what: str, *flags: str) -> list[dict]:
    """``ray list <what>`` of the page's cluster, through its dashboard with the token, as JSON."""
    out = subprocess.run([str(REPO / ".venv" / "bin" / "ray"), "list", what, "--address", "http://127.0.0.1:8265",
                          "--format", "json", "--limit", "10000", *flags], cwd=REPO, text=True, capture_output=True,
                         env=dict(env, RAY_AUTH_MODE="token"), timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def pool_nodes(env: dict) -> dict[str, dict[str, set]]:
    """``{job id: {participant: node ids of its pool's actors}}``; Ray Data names a pool's actors after the class,
    ``MapWorker(MapBatches(Participant_<name>))``."""
    out: dict = {}
    for a in cluster_state(env, "actors", "--detail"):
        m = re.search(r"Participant_(\w+)\)", a.get("class_name") or "")
        if m and a.get("node_id"):
            out.setdefault(a["job_id"], {}).setdefault(m.group(1), set()).add(a["node_id"])
    return out


def pool_order(log: str, names) -> tuple[dict, dict]:
    """Where in the job's log each participant's "embedding" (its pool starts) and "N rows" (it finished) line
    begins (character offsets: lines the driver's pool threads print at the same moment can share a line)."""
    start = {n: log.index(f"[optimize] {n}: embedding") for n in names}
    done = {n: re.search(rf"\[optimize\] {n}: \d+ rows", log).start() for n in names}
    return start, done


def check_placement(env: dict, log: str, seen: dict, gpu_nodes: int) -> dict:
    """The job that just ran (its pools are the actors not in ``seen``) placed its pools as the page says, on a
    cluster with ``gpu_nodes`` GPU nodes; returns the actor table's pools for the next call."""
    names = ["p0", "p1", "p2"]
    pools = pool_nodes(env)
    new = {j: v for j, v in pools.items() if j not in seen}
    assert len(new) == 1, f"expected one new job's pools, got {new}"
    where = next(iter(new.values()))
    gpu = {n["node_id"] for n in cluster_state(env, "nodes") if not n["is_head_node"] and n["state"] == "ALIVE"}
    assert len(gpu) == gpu_nodes and set(where) == set(names), (where, gpu)
    assert all(len(v) == 1 for v in where.values()) and set().union(*where.values()) <= gpu, (where, gpu)
    start, done = pool_order(log, names)
    if gpu_nodes == 2:  # two waves: p0 and p1 together on different nodes, p2 as soon as one of them finished
        assert where["p0"] != where["p1"], where
        assert "identical pools: running 2 at a time, the next starting as one finishes" in log
        assert max(start["p0"], start["p1"]) < min(done["p0"], done["p1"]) < start["p2"], (start, done)
    else:  # all three pools at once, one per GPU node
        assert len(set().union(*where.values())) == 3, where
        assert max(start.values()) < min(done.values()), (start, done)
    return pools


def test_readme_steps_are_parsed():
    steps = readme_steps(PAGE.read_text())
    cmds = [re.sub(r"\s+#.*$", "", c) for c, _ in steps]
    assert cmds[0].startswith("make setup") and cmds[-1].startswith("cluster/local.sh stop")
    assert sum("ray job submit" in c for c in cmds) == 2 and any("jobs/pipeline.py" in c for c in cmds)
    assert all(want for c, want in steps if "ray job submit" in c)  # each job shows what it prints


def test_the_early_zoo_build_runs_in_idle_time_only(tmp_path):
    """What starts the sequence's `make zoo` early (conftest.start_in_idle_time) gives it nice 19 and SCHED_IDLE, and
    where the kernel shares the CPU between sessions first (autogroup scheduling), its session's group nice 19 too:
    without that, a new session gets as much CPU as all of pytest's."""
    from conftest import _stat, start_in_idle_time

    proc = start_in_idle_time(["python3", "-c", "import time; time.sleep(60)"], tmp_path / "out.log")
    try:
        pid = proc.pid
        stat = _stat(pid)
        assert int(stat[16]) == 19 and int(stat[38]) == os.SCHED_IDLE, (stat[16], stat[38])  # nice, policy
        assert os.getsid(pid) == pid != os.getsid(0)  # a session of its own: killed as one group
        enabled = Path("/proc/sys/kernel/sched_autogroup_enabled")
        if enabled.exists() and enabled.read_text().strip() == "1":
            group = Path(f"/proc/{pid}/autogroup").read_text().split()
            mine = Path("/proc/self/autogroup").read_text().split()  # empty in the root group (a CI runner's pytest)
            assert group[-2:] == ["nice", "19"] and group[:1] != mine[:1], (group, mine)
    finally:
        proc.kill()
        proc.wait()


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
    jobs: dict = {}  # job id -> its pools' nodes, from the actor table after each job
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
                jobs = check_placement(env, out.stdout + out.stderr, jobs, gpu_nodes=2 if not jobs else 3)
        # the optimize job (jobs/optimize.py under `ray job submit`, token auth on) accounted for every image
        man = json.loads((outs[0] / "manifest.json").read_text())
        assert man["total_rows"] == 500 and man["optimized_rows"] + man["error_rows"] == 500, man
        assert [q["name"] for q in man["participants"]] == ["p0", "p1", "p2"]
        run = outs[1]
        for f in ("manifest.json", "eval.json", "report/report.html", "student/student.pt"):
            assert (run / f).exists(), f
        man = json.loads((run / "manifest.json").read_text())  # the 3 pools at once also accounted for every image
        assert man["optimized_rows"] + man["error_rows"] == man["total_rows"] == 500, man
        assert sum(q["rows"] for q in man["participants"]) == 500, man["participants"]
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
