"""Reliability (issue 5): a killed driver, a killed participant actor, a killed train worker — nothing lost.

* Driver killed: ``coopt optimize`` runs as its own process (with its own local Ray, 2 CPUs, so the three
  participant pools run one at a time) and is SIGKILLed, process group and all, once a participant has
  finished. Its Ray processes must die with it. The rerun on the same --out finishes without embedding the
  finished participants again, and gives the same optimized set as an uninterrupted run. A changed config
  on that --out is refused (exit 2), not mixed in.
* Participant actor killed: one pool actor's process is SIGKILLed while it embeds; Ray Data's actor
  restarts and task retries (its defaults for actor pools: max_restarts=-1, max_task_retries=-1) finish the
  run with every row accounted for exactly once.
* Train worker killed: ``tests/test_run.py::test_train_stage_on_two_workers_resumes_from_its_checkpoint``
  (FailureConfig restarts the worker group from the last checkpoint).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow.parquet as pq
import pytest

from coopt_ray.config import load_config
from coopt_ray.data import PUBLIC_SIZE, fashion_mnist_split, owner_of, shared_subset, write_array_source
from coopt_ray.embeddings import column_matrix
from coopt_ray.rundir import DONE
from coopt_ray.pipeline import run_optimize

from conftest import (REPO, _cmdline, _stat, cli_here, forbid_ray_start, kill_group, session_pids, wait_gone,
                      write_config)

PARTS = ("p0", "p1", "p2")


# ---------------------------------------------------------------- helpers
def cli_env() -> dict:
    # RAY_ADDRESS=local: always a fresh local Ray (never a cluster someone started with `ray start`);
    # 2 CPUs whatever the machine: one CPU is kept for reading, so one participant pool runs at a time.
    return dict(os.environ, COOPT_PROGRESS="0", RAY_ADDRESS="local", RAY_OVERRIDE_RESOURCES=json.dumps({"CPU": 2}))


def start_cli(cfg: Path, out: Path, log: Path, env: Optional[dict] = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "coopt_ray", "optimize", "--config", str(cfg), "--out", str(out)],
                            cwd=REPO, env=env or cli_env(), stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def optimized_by_id(run: Path) -> dict:
    t = pq.read_table(run / "optimized")
    y = column_matrix(t.column("target"))
    d = t.drop(["target", "image"]).to_pydict()
    return {i: (y[k], d["participant"][k], d["aligned"][k], d["label"][k]) for k, i in enumerate(d["id"])}


def done_marks(run: Path) -> dict:
    return {p: (run / "embeddings" / p / DONE).stat().st_mtime_ns
            for p in PARTS if (run / "embeddings" / p / DONE).exists()}


# ---------------------------------------------------------------- 1. driver killed mid-optimize
LIMIT = 300  # write_config's default: the uninterrupted reference is the session's shared optimized RUN


@pytest.mark.slow
def test_driver_killed_mid_optimize_resumes_without_loss(tmp_path, tiny_models, shared_optimized):
    cfg_path = write_config(tmp_path / "c.yaml", tiny_models)
    run, log = tmp_path / "run", tmp_path / "killed.log"
    t0 = time.time()

    # Start, wait for the first participant's done marker, then SIGKILL the driver's process group.
    for _ in range(2):
        p = start_cli(cfg_path, run, log)
        while p.poll() is None and not done_marks(run) and time.time() - t0 < 900:
            time.sleep(0.1)
        if p.poll() is None:
            break
        assert "timed out during startup" in log.read_text(), log.read_text()[-3000:]  # only Ray's start may fail
    assert p.poll() is None, "the driver exited before it could be killed:\n" + log.read_text()[-3000:]
    dashboards = [_cmdline(pid) for pid in session_pids(p.pid) if "dashboard/dashboard.py" in _cmdline(pid)]
    ray_pids = kill_group(p)
    t_kill = time.time() - t0
    assert len(ray_pids) > 3, "expected the driver's local Ray processes in its session"
    # Safety, in passing: the local Ray the CLI starts keeps its dashboard on localhost.
    assert all("--host=127.0.0.1" in c for c in dashboards), dashboards

    # A killed driver's local Ray dies with it: GCS, raylet, dashboard, workers (checked by pid, no `ray stop`), all
    # within 60 s of the kill. What could still act goes first: the GCS, the raylet and every registered worker
    # (`ray::...`). Workers that were still starting when their raylet died (`default_worker.py`, asleep: they can
    # neither register nor run anything) take about 25 s more to give up, so the rerun below starts once only they are
    # left, and they are checked after it.
    doomed, killed = ray_pids | session_pids(p.pid), time.time()

    def could_act() -> list[int]:  # alive, and not a worker still starting
        return [q for q in wait_gone(doomed, timeout=0) if "default_worker.py" not in _cmdline(q)]

    while could_act() and time.time() - killed < 60:
        time.sleep(0.2)

    def check_all_gone() -> None:
        left = wait_gone(doomed, timeout=max(0.0, 60 - (time.time() - killed)))
        for pid in left:  # clean up what this test started before failing
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert not left, f"Ray processes of the killed driver still alive 60 s after the kill: " \
                         f"{[(q, _cmdline(q)[:80]) for q in sorted(left)]}"

    if could_act():
        check_all_gone()  # fails, naming them
    finished = done_marks(run)
    assert 1 <= len(finished) < len(PARTS), f"kill should land mid-run, finished: {sorted(finished)}"
    assert not (run / "manifest.json").exists() and not (run / "optimized").exists()

    # The rerun on the same --out finishes; the finished participants are not embedded again.
    t1 = time.time()
    # (the rerun runs here, on the session's Ray, as the reference did: what is checked is RUN, not Ray's start-up)
    rc, rerun_log, err = cli_here(["optimize", "--config", cfg_path, "--out", run])
    assert rc == 0, (rerun_log + err)[-3000:]
    t_rerun = time.time() - t1
    check_all_gone()
    for name, mtime in finished.items():
        assert (run / "embeddings" / name / DONE).stat().st_mtime_ns == mtime, f"{name} was recomputed"
        assert f"{name}: already done" in rerun_log
    for name in set(PARTS) - set(finished):
        assert f"{name}: embedding" in rerun_log
    assert not list((run / "embeddings").glob("*.tmp")), "a killed participant's partial output was left behind"
    man = json.loads((run / "manifest.json").read_text())
    assert man["total_rows"] == LIMIT and man["optimized_rows"] + man["error_rows"] == LIMIT

    # Same ids and targets (within 1e-6) as an uninterrupted run of the same config: the session's shared RUN
    # (write_config's defaults over the same tiny models, optimized once in-process on the session's Ray).
    ref_run = shared_optimized
    ref = json.loads((ref_run / "manifest.json").read_text())
    assert ref["fingerprint"] == man["fingerprint"], "the reference was optimized with another config"
    got, want = optimized_by_id(run), optimized_by_id(ref_run)
    assert len(got) == LIMIT and got.keys() == want.keys()
    assert man["best"] == ref["best"]
    diff = max(float(np.abs(got[i][0] - want[i][0]).max()) for i in want)
    assert diff <= 1e-6, f"targets differ from the uninterrupted run by {diff}"
    assert all(got[i][1:] == want[i][1:] for i in want)  # participant, aligned, label

    # A changed config on the same --out is refused with a clear message, not mixed in.
    before = {f: f.stat().st_mtime_ns for f in run.rglob("*") if f.is_file()}
    changed = write_config(tmp_path / "changed.yaml", tiny_models, seed=1)
    with pytest.MonkeyPatch.context() as mp:
        forbid_ray_start(mp, "a changed config must be refused before any cluster work")
        rc, _, err = cli_here(["optimize", "--config", changed, "--out", run])
    err = err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "was made with a different config (differs in: seed)" in err[0], err
    assert {f: f.stat().st_mtime_ns for f in run.rglob("*") if f.is_file()} == before
    print(f"\ndriver kill: killed at {t_kill:.0f}s with {sorted(finished)} done; rerun {t_rerun:.0f}s; "
          f"max target diff {diff:.2e}")


# ---------------------------------------------------------------- 2. participant actor killed mid-stream
def _my_actor_pids(name: str) -> dict[str, int]:
    """{actor id: pid} of this Ray cluster's live pool actors of participant ``name``, from the actor table
    of the cluster this process is connected to (so other people's Ray processes are never touched). Ray
    Data names pool actors after the class: ``MapWorker(...->MapBatches(Participant_<name>))``."""
    import ray._private.state as state

    return {aid: int(a["Pid"]) for aid, a in state.actors().items()
            if a.get("State") == "ALIVE" and a.get("Pid") and f"Participant_{name})" in a.get("ActorClassName", "")}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    f = _stat(pid)
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def streamed_source(tmp_path_factory):
    """2000 Fashion-MNIST images as a Parquet source of 20 files, so the pools see a stream of blocks."""
    x, y = fashion_mnist_split("unlabeled")
    n = 2000
    ids = [f"train/{PUBLIC_SIZE + i}" for i in range(n)]
    out = tmp_path_factory.mktemp("stream") / "source"
    write_array_source(x[:n], y[:n], ids, out, rows_per_file=100)
    return out, ids


@pytest.mark.slow
def test_participant_actor_killed_mid_stream(tmp_path, tiny_models, ray_session, streamed_source):
    src, ids = streamed_source
    # limit 1600 of the 2000 rows: every pool must also see exactly the first 1600 ids of the source.
    ids = ids[:1600]
    parts = PARTS[:2]
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_models,
                                   data={"source": "parquet", "path": str(src), "limit": len(ids)},
                                   participants=[{"name": n, "model": m, "batch_size": 8}
                                                 for n, m in zip(parts, tiny_models)]))
    run = tmp_path / "run"
    result: dict = {}

    def work():
        try:
            result["manifest"] = run_optimize(cfg, run, log=lambda s: None)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            result["error"] = e

    t0 = time.time()
    th = threading.Thread(target=work, daemon=True)
    th.start()
    victim, seen = None, {}
    while victim is None and th.is_alive() and time.time() - t0 < 900:
        for aid, pid in _my_actor_pids("p0").items():
            try:
                cpu = _cpu_seconds(pid)
            except (OSError, ValueError):
                continue
            seen.setdefault(aid, cpu)  # CPU time when first seen ALIVE, i.e. with its model loaded
            # Kill once it has been embedding for a while (its CPU time grows) and p0 has not finished.
            if cpu - seen[aid] >= 0.3 and not (run / "embeddings" / "p0" / DONE).exists():
                os.kill(pid, signal.SIGKILL)  # a crash while it works
                victim = (aid, pid, cpu - seen[aid])
                break
        time.sleep(0.05)
    t_kill = time.time() - t0
    th.join(timeout=900)
    assert not th.is_alive(), "optimize did not finish after the actor was killed"
    if "error" in result:
        raise result["error"]
    assert victim is not None, "the run finished before an actor could be killed mid-stream"
    assert wait_gone({victim[1]}, 10) == set()

    import ray._private.state as state

    restarts = state.actors().get(victim[0], {}).get("NumRestarts", 0)
    man = result["manifest"]
    opt = pq.read_table(run / "optimized", columns=["id"]).column("id").to_pylist()
    errs = pq.read_table(run / "errors", columns=["id"]).column("id").to_pylist()
    assert man["total_rows"] == len(ids)
    assert man["optimized_rows"] + man["error_rows"] == man["total_rows"]
    assert len(opt) == man["optimized_rows"] and len(errs) == man["error_rows"] == 0
    assert len(set(opt)) == len(opt), "duplicate ids after the actor restart"
    assert sorted(opt) == sorted(ids)
    # p0's own output holds exactly D(p0) ∪ S, each row once: no lost and no doubled batches.
    shared = set(shared_subset(ids, cfg.shared.fraction, cfg.shared.min, cfg.seed))
    want = {i for i, o in zip(ids, owner_of(ids, len(parts), cfg.seed)) if o == 0} | shared
    got = pq.read_table(run / "embeddings" / "p0", columns=["id"]).column("id").to_pylist()
    assert len(got) == len(set(got)) and set(got) == want
    print(f"\nactor kill: killed pid {victim[1]} at {t_kill:.0f}s after {victim[2]:.1f} CPU-s of embedding; "
          f"actor restarts recorded: {restarts}; run finished in {time.time() - t0:.0f}s")
