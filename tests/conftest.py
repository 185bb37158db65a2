"""Shared fixtures: one local Ray for the session, tiny random-init open_clip models, tiny configs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("COOPT_PROGRESS", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray Train's controller looks at its workers every 2 s by default, so each run waits up to 2 s to see its workers
# start, finish or die; every test run pays that several times. Ray passes this on to the controller (and the
# nodes and job drivers the tests start inherit it).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Each worker group start also starts a PreemptionWatcher actor (one more Ray worker process, polling the GCS every
# 5 s for spot-instance drain notices); a local test cluster is never preempted. Product runs keep Ray's default.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# A raylet keeps at most num_cpus idle workers (4 on the session Ray) and kills the rest after 1 s idle; the suite's
# actors count against that, so the task workers of one stage (probes with torch and open_clip imported, Ray Data's
# read and write tasks) were killed before the next stage could reuse them, and every stage paid the imports again.
# 12 keeps them. tests/test_run.py + test_evaluate.py, alternating (2026-12-03): 224/225 s, 372/371 busy CPU-s and
# 68/67 processes at Ray's default; 202/187 s, 336/315 CPU-s and 58/59 processes at 12.
os.environ.setdefault("RAY_num_workers_soft_limit", "12")
# A node's log monitor lists its logs folder every 0.1 s to find new workers' files, until there are 1000 of them;
# then every 0.5 s (LOG_NAME_UPDATE_INTERVAL_S). The suite's long-lived session Ray and its nodes take the 0.5 s
# at once: a new worker's first lines reach the driver up to 0.4 s later, for half the log monitor's CPU
# (30 s idle with 144 log files: 0.65 CPU-s at Ray's default, 0.32 at 0).
os.environ.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "0")

REPO = Path(__file__).resolve().parents[1]


def tiny_clip_cfg(embed_dim: int, width: int = 32, layers: int = 1) -> dict:
    """A tiny open_clip CLIP config (32 px ViT, 1-layer text tower)."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": 32, "layers": layers, "width": width, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }


def make_tiny_model(out_dir: Path, embed_dim: int, seed: int = 0) -> str:
    """Save a random-init tiny open_clip model as a local-dir: folder; return its model string."""
    import open_clip
    import torch

    from coopt_ray.models import save_local_dir

    torch.manual_seed(seed)
    cfg = tiny_clip_cfg(embed_dim)
    save_local_dir(open_clip.CLIP(**cfg), cfg, out_dir, {"mean": [0.5] * 3, "std": [0.5] * 3})
    return f"local-dir:{out_dir}"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> list[str]:
    """Three tiny random-init open_clip models with different embed dims (16, 24, 32)."""
    root = tmp_path_factory.mktemp("models")
    return [make_tiny_model(root / f"m{i}", d, seed=i) for i, d in enumerate((16, 24, 32))]


def write_config(path: Path, models: list[str], **over) -> Path:
    """Write a small config using ``models`` as participants; ``over`` updates top-level sections."""
    cfg = {
        "seed": 0,
        "data": {"source": "fashion-mnist", "limit": 300},
        "participants": [{"name": f"p{i}", "model": m, "batch_size": 64} for i, m in enumerate(models)],
        "shared": {"fraction": 0.05, "min": 16},
        "align": {"ridge": 1.0e-3},
        # convnet3_w16 (coopt's own 3-block ConvNet, registered with timm): a step of 16 images takes 16 ms on one
        # core, against 364 ms for resnet10t and 785 ms for resnet18 with the small-image stem; tests about a ResNet
        # (its stem, the timm and ONNX export, the student-learns check) name one
        "student": {"arch": "convnet3_w16", "epochs": 1, "batch_size": 64, "workers": 2},
        # num_cpus 2: two probes at a time on the 4-CPU session Ray; the rest reuse their workers (one torch import each)
        "eval": {"probe_epochs": 20, "probe_limit": 500, "test_limit": 500, "num_cpus": 2},
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    path.write_text(yaml.safe_dump(cfg))
    return path


def forbid_ray_start(monkeypatch, why: str = "Ray was started for a bad config") -> None:
    """Make every stage's ``init_ray`` (each module imports its own name) fail the test if called."""
    import importlib
    import pkgutil

    import coopt_ray

    def boom(*a, **k):
        raise AssertionError(why)

    # Import every module before patching any: a module first imported after coopt_ray.cluster was patched
    # would bind the patch as its own ``init_ray``, and the undo would then "restore" the patch for good.
    mods = [importlib.import_module(info.name) for info in pkgutil.walk_packages(coopt_ray.__path__, prefix="coopt_ray.")
            if not info.name.endswith("__main__")]
    for mod in mods:
        if hasattr(mod, "init_ray"):
            monkeypatch.setattr(mod, "init_ray", boom)


def start_local_ray():
    """The session's local Ray (more logical CPUs than workers: 2 physical cores); no-op if Ray is up.

    Tests that need their own cluster (tests/test_placement.py) shut it down; they run last
    (:func:`pytest_collection_modifyitems`).
    """
    import ray

    if not ray.is_initialized():
        # num_gpus=0: "a local cluster without GPUs" must stay true on a machine that has one
        ray.init(num_cpus=4, num_gpus=0, include_dashboard=False, log_to_driver=False)
    return ray


def session_address() -> str:
    """The GCS address of the session's local Ray, so a test's subprocess driver can join it (``RAY_ADDRESS``)
    instead of paying for a Ray start of its own."""
    import ray

    start_local_ray()
    return ray.get_runtime_context().gcs_address


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session."""
    yield start_local_ray()
    import ray

    ray.shutdown()


@pytest.fixture(scope="session")
def shared_optimized(tmp_path_factory, tiny_models, ray_session) -> Path:
    """One optimized RUN for the session: ``write_config``'s defaults over the three tiny models (300 images).
    Read it as is; a test that writes into a RUN takes its own copy (:func:`copy_run`)."""
    from coopt_ray.config import load_config
    from coopt_ray.pipeline import run_optimize

    root = tmp_path_factory.mktemp("shared_optimized")
    run_optimize(load_config(write_config(root / "c.yaml", tiny_models)), root / "run", log=lambda *_: None)
    return root / "run"


def train_worker_actors() -> dict[str, tuple[str, int]]:
    """{actor id: (state, pid)} of the connected Ray cluster's Ray Train worker actors, dead or alive (the kill tests
    pick their victim among the new ones, so other people's Ray processes are never touched)."""
    import ray._private.state as state

    return {aid: (a.get("State"), int(a.get("Pid") or 0)) for aid, a in state.actors().items()
            if "RayTrainWorker" in a.get("ActorClassName", "")}


def run_and_kill_a_train_worker(fn, exp: Path, after: tuple[int, int], timeout: float = 900) -> dict:
    """Run ``fn()`` (a Ray Train run with 2 workers, checkpointing under ``exp``) in a thread. Once its newest readable
    checkpoint follows epoch/step ``after[0]..after[1]`` (1-based) and both of its workers are alive, SIGKILL one of
    them, mid-run. Returns ``{"result": fn(), "pid": the victim's pid, "after": the checkpoint it followed,
    "ckpt_history": that checkpoint's history, "workers": the run's worker actor ids, both groups}``."""
    import signal
    import threading
    import time

    from coopt_ray.student import latest_checkpoint, load_state

    before = set(train_worker_actors())
    out: dict = {}

    def work():
        try:
            out["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            out["error"] = e

    th = threading.Thread(target=work, daemon=True)
    t0 = time.time()
    th.start()
    while "pid" not in out and th.is_alive() and time.time() - t0 < timeout:
        latest = latest_checkpoint(exp)
        if latest is not None and after[0] <= latest[1]["epoch"] + 1 <= after[1]:
            alive = {a: pid for a, (st, pid) in train_worker_actors().items() if a not in before and st == "ALIVE" and pid}
            if len(alive) == 2:
                try:
                    history = load_state(latest[0])["history"]
                except (OSError, RuntimeError, EOFError):
                    time.sleep(0.05)  # still being written or pruned: look again shortly, without spinning
                    continue
                pid = sorted(alive.items())[-1][1]
                os.kill(pid, signal.SIGKILL)
                out.update(pid=pid, after=latest[1]["epoch"] + 1, ckpt_history=history)
        time.sleep(0.05)
    th.join(timeout=timeout)
    assert not th.is_alive(), "the run did not finish after a worker was killed"
    if "error" in out:
        raise out["error"]
    assert "pid" in out, "the run finished before a worker could be killed"
    out["workers"] = {a for a in train_worker_actors() if a not in before}
    return out


# ---------------------------------------------------------------- processes of the kill tests (by pid, never `ray stop`)
def _stat(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (state is [0], ppid [1], session [3])."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2:].split()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def session_pids(sid: int) -> set[int]:
    """Pids of live processes in session ``sid``: a driver started with start_new_session and all it spawned
    (Ray's GCS, raylet, dashboard and workers keep the driver's session)."""
    out = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                f = _stat(int(d))
            except (OSError, ValueError):
                continue
            if int(f[3]) == sid and f[0] != "Z":
                out.add(int(d))
    return out


def wait_gone(pids: set[int], timeout: float) -> set[int]:
    """Wait until none of ``pids`` is alive (zombies count as gone); return those still alive."""
    import time

    end = time.time() + timeout
    while True:
        alive = set()
        for p in pids:
            try:
                if _stat(p)[0] != "Z":
                    alive.add(p)
            except (OSError, ValueError):
                pass
        if not alive or time.time() > end:
            return alive
        time.sleep(0.5)


def kill_group(p: subprocess.Popen) -> set[int]:
    """SIGKILL the driver's whole process group; return the pids of its session at that moment."""
    import signal

    pids = session_pids(p.pid)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    return pids


def _here(fn) -> tuple[int, str, str]:
    """``fn()`` with stdout and stderr captured: ``(exit code, stdout, stderr)``; argparse's exit is an exit code."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = fn()
        except SystemExit as e:
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def cli_here(argv) -> tuple[int, str, str]:
    """``coopt ARGV`` in this process (on the session's Ray when it is up: no Python or Ray start-up to pay for, and
    its warm workers); ``(exit code, stdout, stderr)``."""
    from coopt_ray.cli import main

    return _here(lambda: main([str(a) for a in argv]))


def cli_errors(argv) -> tuple[int, list[str]]:
    """``coopt ARGV`` in this process: ``(exit code, stderr's lines)``, for the one-line error checks."""
    rc, _, err = cli_here(argv)
    return rc, err.strip().splitlines()


def job_here(monkeypatch, job: str, argv) -> tuple[int, str, str]:
    """``jobs/<job>.py ARGV`` in this process, through the entrypoint's own ``main`` (its exit code and one-line
    errors), as a job's driver runs it: ``(exit code, stdout, stderr)``."""
    import runpy

    monkeypatch.syspath_prepend(str(REPO / "jobs"))
    mod = runpy.run_path(str(REPO / "jobs" / f"{job}.py"))
    return _here(lambda: mod["main"](lambda: mod["run"]([str(a) for a in argv])))


def copy_run(src: Path, dst: Path) -> Path:
    """A private copy of a shared RUN (its stages already done, so they are skipped where the config matches)."""
    import shutil

    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------- the README's zoo, built in the machine's idle time
README_SEQUENCE = "tests/test_readme_cluster.py::test_readme_cluster_sequence_runs_as_documented"
_zoo_build: dict = {}


def pytest_collection_modifyitems(session, config, items):
    """Tests on a multi-node cluster of their own (the ``gpu_cluster`` fixture of tests/test_placement.py) run after
    the others: the driver can join one cluster at a time, so they shut the session's Ray down, and every test after
    them would pay for a new one and for its workers' start-ups again. The README's cluster sequence, which needs no
    Ray in this process, runs last: its early `make zoo` (see :func:`pytest_collection_finish`) has had the whole
    suite's idle time to finish, rather than being waited for, and no idle session Ray (its raylet and pooled
    workers: 0.08-0.14 of a core) shares the cores with the page's cluster."""
    own = [it for it in items if "gpu_cluster" in getattr(it, "fixturenames", ())]
    readme = [it for it in items if it.nodeid == README_SEQUENCE]
    items[:] = [it for it in items if it not in own and it not in readme] + own + readme


def _lowest_priority() -> None:
    """This process and all it starts run only when the CPU would otherwise be idle (SCHED_IDLE: a test's thread
    that wakes takes the core at once, so torch's thread pools in the tests are not held up), and at nice 19.

    It runs in a session of its own (``start_new_session``), and a kernel with autogroup scheduling
    (``/proc/sys/kernel/sched_autogroup_enabled``) shares the CPU between sessions first, whatever their tasks' nice
    or policy: on this host a SCHED_IDLE, nice 19 busy loop in its own session got 0.68 of a core against 0.36 for
    each of two nice 0 loops in pytest's. So the session's autogroup is set to nice 19 as well."""
    os.nice(19)
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    try:
        Path("/proc/self/autogroup").write_text("19")
    except OSError:  # no autogroup scheduling in this kernel, or not allowed here: the nice and policy above apply
        pass


def pytest_collection_finish(session):
    """When the README's cluster sequence is selected, start its first step's `make zoo` now, at the lowest CPU
    priority (SCHED_IDLE, nice 19), so the teachers train in the time the other tests leave the two cores idle (they
    wait on process start-ups). The sequence, run after the other tests, waits for this build, then runs
    `make setup && make zoo` itself, as the page says, which finds the teachers built (:func:`readme_zoo_build`)."""
    import tempfile

    if not any(item.nodeid == README_SEQUENCE for item in session.items):
        return
    log = Path(tempfile.mkdtemp(prefix="coopt-readme-zoo-")) / "make-zoo.log"
    _zoo_build["log"] = log
    _zoo_build["proc"] = start_in_idle_time(["make", "zoo"], log)


def start_in_idle_time(cmd: list, log: Path):
    """``cmd`` in the repository, in a process group and session of its own (killed as one), at the lowest CPU
    priority (:func:`_lowest_priority`), its output to ``log``."""
    import subprocess

    return subprocess.Popen(cmd, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, preexec_fn=_lowest_priority)


def readme_zoo_build(timeout: float = 1500) -> tuple[int, str]:
    """Wait for the session's early `make zoo` (if one was started); its exit status and output."""
    proc = _zoo_build.get("proc")
    if proc is None:
        return 0, ""
    rc = proc.wait(timeout=timeout)
    return rc, _zoo_build["log"].read_text()


def pytest_sessionfinish(session, exitstatus):
    import signal

    proc = _zoo_build.get("proc")
    if proc is not None and proc.poll() is None:  # the session ended early (-x, Ctrl-C): stop the build with it
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# ---------------------------------------------------------------- where the suite's time goes (issue 25)
def _busy_cpu_s() -> float:
    """Busy CPU-seconds of the whole machine so far (/proc/stat: every state but idle and iowait), so a test's
    cost includes the Ray processes it used, which are not its children."""
    f = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(f) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """With COOPT_TEST_CPU_LOG=FILE: one JSON line per test (wall seconds and the machine's busy CPU-seconds over
    setup, call and teardown); benchmarks/test_time.py reads it."""
    log = os.environ.get("COOPT_TEST_CPU_LOG")
    if not log:
        return (yield)
    import json
    import time

    t0, c0 = time.time(), _busy_cpu_s()
    try:
        return (yield)
    finally:
        with open(log, "a") as f:
            f.write(json.dumps({"test": item.nodeid, "wall_s": round(time.time() - t0, 2),
                                "cpu_s": round(_busy_cpu_s() - c0, 2)}) + "\n")
