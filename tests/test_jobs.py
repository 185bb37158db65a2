"""Ray Jobs: a local head started with ``ray start --head`` (token auth on), jobs/ submitted through
``JobSubmissionClient`` with the token, exactly as on a real cluster (``--working-dir`` upload included).

The head runs as ``ray start --head --block`` in its own process group, so the test stops exactly the
processes it started (never ``ray stop``, which would stop every Ray on the machine). Here: the dashboard refuses
requests without the token, and a bad config fails the job with one line. A job that succeeds end to end is the
README's cluster sequence (tests/test_readme_cluster.py: jobs/optimize.py and jobs/pipeline.py under `ray job submit`,
token auth on), which took over this module's optimize-job test (issue 25).
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, write_config

VENV_BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalHead:
    """``ray start --head`` on free ports, a private temp dir and a private token."""

    def __init__(self, num_cpus: int = 3, attempts: int = 3):
        self.token = secrets.token_hex(16)
        self.env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, COOPT_PROGRESS="0",
                        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        self.env.pop("RAY_ADDRESS", None)
        self.proc = None
        for attempt in range(attempts):  # an overloaded machine can miss Ray's fixed 30 s raylet start-up wait
            self._start(num_cpus)
            if self._ready():
                return
            out = self.tail()
            self.stop()
        raise RuntimeError(f"ray start --head failed {attempts} times; last output:\n{out}")

    def _start(self, num_cpus: int) -> None:
        self.temp = tempfile.mkdtemp(prefix="cj", dir="/tmp")  # short: Unix socket paths are limited
        self.port, self.dash = _free_port(), _free_port()
        cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
               f"--port={self.port}", f"--num-cpus={num_cpus}", "--num-gpus=0", f"--temp-dir={self.temp}",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dash}",
               f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
               f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}",
               f"--ray-client-server-port={_free_port()}"]
        self.log = open(Path(self.temp) / "head.log", "w")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=REPO)
        self.url = f"http://127.0.0.1:{self.dash}"

    def _ready(self, timeout: float = 240) -> bool:
        """The node is up (``ray start`` says so) and the Jobs API answers with the token."""
        deadline = time.time() + timeout
        while time.time() < deadline and self.proc.poll() is None:
            if "Ray runtime started" in self.tail():
                try:
                    self.client().list_jobs()
                    return True
                except Exception:
                    pass
            time.sleep(0.5)
        return False

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.url, headers={"Authorization": f"Bearer {self.token}"})

    def tail(self) -> str:
        self.log.flush()
        return (Path(self.temp) / "head.log").read_text()[-3000:]

    def stop(self) -> None:
        """SIGTERM the ``ray start --block`` process (it stops its node), then its whole process group."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)  # after a job has run it can take 15 s or more; its group is killed next
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # leftovers of this head only (its own session)
        except ProcessLookupError:
            pass
        self.log.close()
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def head():
    h = LocalHead()
    try:
        yield h
    finally:
        h.stop()


def _wait(client, job_id, timeout=900):
    from ray.job_submission import JobStatus

    deadline = time.time() + timeout
    while True:
        st = client.get_job_status(job_id)
        if st in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return st, client.get_job_logs(job_id)
        if time.time() > deadline:
            client.stop_job(job_id)
            pytest.fail(f"job {job_id} still {st} after {timeout}s:\n{client.get_job_logs(job_id)[-3000:]}")
        time.sleep(0.5)


@pytest.mark.slow
def test_dashboard_refuses_requests_without_the_token(head):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        req = urllib.request.Request(f"{head.url}/api/jobs/", headers=headers)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code in (401, 403)


@pytest.mark.slow
def test_bad_config_job_fails_with_one_clear_line(head, tmp_path, tiny_models):
    from ray.job_submission import JobStatus

    client = head.client()
    cfg = write_config(tmp_path / "bad.yaml", tiny_models[:1], data={"limit": 200, "colour": "red"})
    job_id = client.submit_job(entrypoint=f"python jobs/optimize.py --config {cfg} --out {tmp_path / 'run'}",
                               runtime_env={"working_dir": str(REPO)})
    status, logs = _wait(client, job_id, timeout=300)
    assert status == JobStatus.FAILED
    assert "coopt job: config error: unknown key 'data.colour'" in logs


# ------------------------------------------------------------------ the entrypoints themselves (no Ray)
def test_entrypoints_parse_arguments_and_connect_to_the_job_cluster(monkeypatch):
    sys.path.insert(0, str(REPO / "jobs"))
    try:
        import _common
    finally:
        sys.path.remove(str(REPO / "jobs"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert _common.parse_args("x", ["--config", "c", "--out", "o"]).address is None  # local Ray
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # set by the job supervisor for the driver
    assert _common.parse_args("x", ["--config", "c", "--out", "o"]).address == "auto"
    assert _common.parse_args("x", ["--config", "c", "--out", "o", "--address", "ray://h:10001"]).address \
        == "ray://h:10001"


@pytest.mark.parametrize("job", ["optimize", "distill", "pipeline"])
def test_entrypoint_bad_config_exits_2_before_ray_starts(job, tmp_path, monkeypatch):
    cfg = write_config(tmp_path / "bad.yaml", ["local-dir:/nonexistent"], seed="zero")
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    t0 = time.time()
    out = subprocess.run([sys.executable, str(REPO / "jobs" / f"{job}.py"), "--config", str(cfg), "--out",
                          str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "coopt job: config error: 'seed' must be an integer" in out.stderr
    assert time.time() - t0 < 60 and not (tmp_path / "run").exists()
    assert "[ray]" not in out.stdout + out.stderr  # no "[ray] connected" line

    # The same entrypoint in-process, with every way to start Ray made to fail the test: exit 2 all the same.
    import ray

    from conftest import forbid_ray_start, job_here

    forbid_ray_start(monkeypatch, f"jobs/{job}.py started Ray for a bad config")
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail(f"jobs/{job}.py called ray.init for a bad config"))
    assert job_here(monkeypatch, job, ["--config", cfg, "--out", tmp_path / "run"])[0] == 2
    assert not (tmp_path / "run").exists()
