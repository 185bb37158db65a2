"""`coopt run` end to end on a local Ray (tiny open_clip teachers, 300 images: a copy of the session's optimized
RUN, a 2-worker student with an aligned head and one per participant), rerun skipping, `coopt report`, resuming training on 2 workers (a new run, and a killed worker), stage commands in the wrong order,
and the zoo hook."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from conftest import cli_here

ARCH = "convnet3_w16"  # coopt's ConvNet (BatchNorm, timm-registered): ~20x less compute than resnet10t per image


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_models, shared_optimized):
    """`coopt run` to the end on a copy of the session's optimized RUN (its optimize stage is skipped: the same
    config sections), so train (2 Ray Train workers; student.heads: both, the aligned head and one per participant),
    evaluate and report run here."""
    from conftest import copy_run, write_config

    root = tmp_path_factory.mktemp("full")
    cfg = write_config(root / "c.yaml", tiny_models,
                       student={"arch": ARCH, "epochs": 1, "batch_size": 32, "workers": 2, "heads": "both"},
                       eval={"probe_epochs": 5, "probe_limit": 200, "test_limit": 100})
    copy_run(shared_optimized, root / "run")
    rc, out, err = cli_here(["run", "--config", cfg, "--out", root / "run"])
    assert rc == 0, err
    assert "[optimize] already done" in out
    return cfg, root / "run", out


def test_run_writes_every_stage_and_prints_the_table(full_run):
    from test_heads import check_heads

    _, run, out = full_run
    check_heads(run, json.loads((run / "student" / "metrics.json").read_text()), "both")  # DDP, a ModuleDict of heads
    for rel in ("manifest.json", "optimized", "student/student.pt", "student/metrics.json", "student/_DONE.json",
                "eval.json", "report/report.html"):
        assert (run / rel).exists(), rel
    for png in ("uniformity", "align_r2", "shared_pca", "loss", "probe"):
        assert (run / "report" / f"{png}.png").stat().st_size > 1000
    ev = json.loads((run / "eval.json").read_text())
    assert set(ev["teachers"]) == {"p0", "p1", "p2"}
    table = out[out.index("linear-probe accuracy"):]
    for name in ("p0", "p1", "p2"):
        acc = ev["teachers"][name]["probe_accuracy"]
        assert any(line.strip().startswith(name) and f"{acc:.4f}" in line for line in table.splitlines())
    assert f"student {ARCH}" in table and f"{ev['student']['probe_accuracy']:.4f}" in table
    assert f"random-init {ARCH}" in table and f"{ev['random_init']['probe_accuracy']:.4f}" in table
    assert "train " in table and "probe " in table  # timings
    for stage in ("optimize", "train", "evaluate", "report"):
        assert f"---- {stage} ----" in out


def test_rerun_skips_finished_stages(full_run):
    cfg, run, _ = full_run
    before = (run / "student" / "student.pt").stat().st_mtime_ns
    rc, out, err = cli_here(["run", "--config", cfg, "--out", run])
    assert rc == 0, err
    assert "[optimize] already done" in out and "[train] already done" in out and "[evaluate] already done" in out
    assert (run / "student" / "student.pt").stat().st_mtime_ns == before


def test_report_command_rebuilds_the_page(full_run):
    import shutil

    _, run, _ = full_run
    shutil.rmtree(run / "report")
    rc, out, err = cli_here(["report", "--run", run])
    assert rc == 0, err
    page = (run / "report" / "report.html").read_text()
    assert "Linear probe" in page and f"student {ARCH}" in page and 'src="shared_pca.png"' in page
    assert all(f">{n}" in page for n in ("p0", "p1", "p2"))


@pytest.mark.slow
def test_train_stage_on_two_workers_resumes_from_its_checkpoint(full_run):
    """The run's 2-worker training (1 epoch) left Ray Train's checkpoint. A new ``run_train`` for 4 epochs resumes
    after epoch 1, not from scratch; and when one of its workers is SIGKILLed after a later epoch's checkpoint, while
    the next epoch runs, FailureConfig restarts the worker group from that checkpoint: training ends with 4 epochs,
    none trained again. (One Ray Train run checks both ways of resuming; the worker kill was a test of its own in
    test_reliability.py.)"""
    import dataclasses
    import time

    import numpy as np
    import torch

    from coopt_ray.config import load_config
    from coopt_ray.train import run_train
    from conftest import run_and_kill_a_train_worker, wait_gone

    cfg_path, run, _ = full_run
    m = json.loads((run / "student" / "metrics.json").read_text())
    assert m["workers"] == 2 and m["rows"] == 300 and len(m["history"]) == 1
    import pyarrow.parquet as pq

    extra = pq.read_metadata(run / "shared_rows.parquet").num_rows  # S's rows of the participants not owning them
    assert m["history"][0]["images"] == 2 * 16 * ((300 + extra) // 2 // 16)  # 2 workers x full batches of 16
    assert np.isfinite(m["loss"][0])
    exp = run / "student" / "ray_results" / f"coopt-train-{run.name}"
    assert (exp / "checkpoint_epoch_0000" / "state.pt").is_file()
    assert (exp / "checkpoint_manager_snapshot.json").is_file()  # Ray Train's own record of the run
    sd = torch.load(run / "student" / "student.pt", weights_only=True)
    assert sd["head.weight"].shape[0] == json.loads((run / "manifest.json").read_text())["target_dim"]

    epochs = 4
    cfg = load_config(cfg_path)
    cfg2 = dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, epochs=epochs))
    logs: list = []
    t0 = time.time()
    # killed after epoch 2's or 3's checkpoint (this run's, not the last one), while the next epoch runs
    k = run_and_kill_a_train_worker(lambda: run_train(cfg2, run, log=logs.append), exp, after=(2, epochs - 1))
    assert wait_gone({k["pid"]}, 10) == set()

    m2 = k["result"]
    assert any("resuming after epoch 1" in line for line in logs), logs
    assert [h["epoch"] for h in m2["history"]] == list(range(1, epochs + 1))
    assert m2["history"][0] == m["history"][0]  # epoch 1 came from the first run's checkpoint, not a retrain
    assert m2["history"][:len(k["ckpt_history"])] == k["ckpt_history"], "epochs before the checkpoint were trained again"
    assert (exp / f"checkpoint_epoch_{epochs - 1:04d}" / "state.pt").is_file()
    workers = k["workers"]
    assert len(workers) >= 4, f"expected a second worker group after the kill, saw {len(workers)} workers"
    print(f"\ntrain worker kill: killed pid {k['pid']} after epoch {k['after']}'s checkpoint; "
          f"{len(workers)} worker actors in all; finished {epochs} epochs in {time.time() - t0:.0f}s")


def test_stages_in_the_wrong_order_fail_with_a_hint(tmp_path, tiny_models):
    from conftest import write_config

    cfg = write_config(tmp_path / "c.yaml", tiny_models[:1], student={"arch": ARCH})
    rc, _, err = cli_here(["train", "--config", cfg, "--run", tmp_path / "empty"])
    assert rc == 1 and "coopt optimize" in err
    rc, _, err = cli_here(["evaluate", "--config", cfg, "--run", tmp_path / "empty"])
    assert rc == 1 and "coopt train" in err
    rc, _, err = cli_here(["report", "--run", tmp_path / "empty"])
    assert rc == 1 and "manifest.json" in err


def test_run_builds_the_default_zoo_only_when_a_teacher_is_missing(tmp_path, tiny_models, monkeypatch):
    from conftest import write_config

    calls = []

    class Stop(Exception):
        pass

    def fake_build_zoo(out_dir, progress=print, **kw):
        calls.append(str(out_dir))
        raise Stop()

    monkeypatch.setitem(sys.modules, "coopt_ray.zoo", types.SimpleNamespace(build_zoo=fake_build_zoo))
    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path / "c.yaml", tiny_models[:1], student={"arch": ARCH})
    text = (tmp_path / "c.yaml").read_text().replace(tiny_models[0], "local-dir:clip-missing")
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(Stop):
        cli_here(["run", "--config", cfg, "--out", tmp_path / "run"])
    assert calls == [str(tmp_path / "zoo")]
    calls.clear()
    rc, _, err = cli_here(["run", "--config", cfg, "--out", tmp_path / "run", "--zoo", tmp_path / "elsewhere"])
    assert rc == 2 and "model folder not found" in err and calls == []  # a non-default zoo is never built


def test_progress_lines_are_written_whole(monkeypatch):
    """The optimize stage's pool threads log at the same moment: each line must go out in one write (text and newline
    together), or two lines can run together in a job's log. Both the CLI and the job entrypoints log this way."""
    import importlib

    from coopt_ray.cli import log_line

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
    try:
        common = importlib.import_module("_common")
    finally:
        sys.path.pop(0)
    writes: list[str] = []
    monkeypatch.setattr(sys, "stdout", types.SimpleNamespace(write=writes.append, flush=lambda: None))
    log_line("[optimize] p0: embedding")
    common.log("[job] manifest: m.json")
    assert writes == ["[optimize] p0: embedding\n", "[job] manifest: m.json\n"]
