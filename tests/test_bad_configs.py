"""Bad configs and bad arguments (issue 5): each exits 2 with one line naming the problem, before Ray
starts and before RUN is created. tests/test_config.py covers unknown top-level/data keys, K = 0 as an
empty list, a missing image folder, a missing local-dir model folder and wrong value types; this file
adds the rest. The one check that needs a cluster (``num_gpus`` on a cluster without GPUs) runs the real
command and must fail in seconds, not hang waiting for actors.
"""
from __future__ import annotations

import json
import os
import time

import pytest
import yaml

from coopt_ray import rundir
from coopt_ray.config import ConfigError, load_config

from conftest import cli_errors, cli_here, forbid_ray_start, write_config


@pytest.fixture
def no_ray(monkeypatch):
    forbid_ray_start(monkeypatch)


def _participant(model, **kw):
    return {"name": kw.pop("name", "p0"), "model": model, "batch_size": 64, **kw}


# Each case: (id, config overrides given the tiny models, text the one error line must contain).
CASES = [
    ("unknown-participant-key",
     lambda m: {"participants": [{**_participant(m[0]), "modle": "x"}]}, "participants[0].modle"),
    ("unknown-student-key", lambda m: {"student": {"archh": "resnet18"}}, "student.archh"),
    ("whiten-and-phi-s", lambda m: {"student": {"whiten": True, "phi_s": True}},
     "'student.whiten' and 'student.phi_s' are two ways to standardise the targets: set one"),
    ("unknown-student-loss", lambda m: {"student": {"loss": "l2"}},
     "'student.loss' must be one of cos, cos+smooth-l1, mse, got 'l2'"),
    ("unknown-augment", lambda m: {"student": {"augment": "strong"}},
     "'student.augment' must be true, false or weak, got 'strong'"),
    ("unknown-heads", lambda m: {"student": {"heads": "all"}},
     "'student.heads' must be one of aligned, per-participant, both, got 'all'"),
    ("heads-on-distilled", lambda m: {"student": {"heads": "both", "data": "distilled/krr-st"}},
     "'student.heads: both' needs each participant's own targets"),
    ("unknown-timm-arch", lambda m: {"student": {"arch": "resnet-nope"}}, "'student.arch': unknown timm"),
    ("missing-checkpoint",
     lambda m: {"participants": [_participant("ViT-B-32", pretrained="/no/such.pt")]}, "/no/such.pt"),
    ("unknown-open-clip-tag",
     lambda m: {"participants": [_participant("ViT-B-32", pretrained="no_such_tag_2099")]},
     "unknown pretrained tag 'no_such_tag_2099'"),
    ("unknown-open-clip-arch", lambda m: {"participants": [_participant("ViT-Nope-99")]},
     "unknown open_clip architecture"),
    ("duplicate-names",
     lambda m: {"participants": [_participant(m[0], name="a"), _participant(m[1], name="a")]},
     "duplicates participant name 'a'"),
    ("no-participants-key", lambda m: {"participants": None}, "K = 0"),
    ("shared-bigger-than-data",
     lambda m: {"data": {"source": "fashion-mnist", "limit": 20}, "shared": {"fraction": 0.05, "min": 32}},
     "'shared.min': the shared subset (32 images) is bigger than the data (20 images)"),
    ("missing-fashion-mnist-dir", lambda m: {"data": {"source": "fashion-mnist", "path": "/no/such/fmnist"}},
     "'data.path' does not exist: /no/such/fmnist"),
    ("missing-parquet-path", lambda m: {"data": {"source": "parquet", "path": "/no/such/data.parquet"}},
     "'data.path' does not exist"),
    ("zero-limit", lambda m: {"data": {"source": "fashion-mnist", "limit": 0}}, "'data.limit'"),
    ("bad-source", lambda m: {"data": {"source": "imagenet"}}, "'data.source'"),
    ("negative-gpus", lambda m: {"participants": [_participant(m[0], num_gpus=-1)]},
     "participants[0].num_gpus"),
    ("zero-actors", lambda m: {"participants": [_participant(m[0], actors=0)]}, "participants[0].actors"),
]


@pytest.mark.parametrize("over,needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_exits_2_with_one_line(over, needle, tmp_path, tiny_models, no_ray):
    cfg = write_config(tmp_path / "c.yaml", tiny_models, **over(tiny_models))
    out = tmp_path / "run"
    rc, err = cli_errors(["optimize", "--config", str(cfg), "--out", str(out)])
    assert rc == 2, err
    assert len(err) == 1, err
    assert err[0].startswith("coopt: config error: ") and needle in err[0], err
    assert not out.exists(), "a bad config must not create the run directory"


def test_fashion_mnist_dir_without_idx_files(tmp_path, tiny_models, no_ray):
    (tmp_path / "empty").mkdir()
    cfg = write_config(tmp_path / "c.yaml", tiny_models, data={"source": "fashion-mnist", "path": str(tmp_path / "empty")})
    rc, err = cli_errors(["optimize", "--config", str(cfg), "--out", str(tmp_path / "run")])
    assert rc == 2 and len(err) == 1 and "no Fashion-MNIST IDX files" in err[0], err


def test_local_dir_without_weights(tmp_path, tiny_models, no_ray):
    d = tmp_path / "noweights"
    d.mkdir()
    src = tiny_models[0][len("local-dir:"):]
    (d / "open_clip_config.json").write_text(open(os.path.join(src, "open_clip_config.json")).read())
    cfg = write_config(tmp_path / "c.yaml", [f"local-dir:{d}"])
    rc, err = cli_errors(["optimize", "--config", str(cfg), "--out", str(tmp_path / "run")])
    assert rc == 2 and len(err) == 1 and "participants[0].model" in err[0] and "no weights file" in err[0], err


def test_invalid_yaml(tmp_path, no_ray):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("seed: 0\nparticipants: [\n  - {name: p0\n")
    rc, err = cli_errors(["optimize", "--config", str(cfg), "--out", str(tmp_path / "run")])
    assert rc == 2 and len(err) == 1 and "not valid YAML" in err[0], err


@pytest.mark.parametrize("argv,needle", [
    (["optimize", "--out", "R"], "the following arguments are required: --config"),
    (["optimize", "--config", "C", "--out", "R", "--max-error-fraction", "abc"], "invalid float value: 'abc'"),
    (["optimize", "--config", "C", "--out", "R", "--max-error-fraction", "1.5"], "'--max-error-fraction'"),
    (["optimise", "--config", "C", "--out", "R"], "invalid choice: 'optimise'"),
    ([], "the following arguments are required: command"),
], ids=["no-config", "fraction-not-a-number", "fraction-out-of-range", "unknown-command", "no-command"])
def test_bad_arguments_exit_2_with_one_line(argv, needle, tmp_path, tiny_models, no_ray):
    cfg = write_config(tmp_path / "c.yaml", tiny_models)
    argv = [str(cfg) if a == "C" else str(tmp_path / "run") if a == "R" else a for a in argv]
    rc, err = cli_errors(argv)
    assert rc == 2, err
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_num_gpus_on_cpu_cluster_fails_fast_and_the_fixed_config_then_runs_there(tmp_path, tiny_models, ray_session):
    """The real command on a running Ray that has no GPUs (the session's; `coopt` run in this process, which has
    joined it as a job's driver joins its cluster): placement planning refuses at once (exit 2, one error line),
    instead of waiting for GPU actors that can never start. The RUN it left holds no results, so the corrected
    config then runs to the end on the same --out."""
    import ray

    from coopt_ray.pipeline import run_optimize

    parts = [_participant(m, name=f"p{i}", num_gpus=1) for i, m in enumerate(tiny_models[:2])]
    cfg = write_config(tmp_path / "gpu.yaml", tiny_models, participants=parts, data={"limit": 120})
    out = tmp_path / "run"
    assert ray.is_initialized() and ray.cluster_resources().get("GPU", 0) == 0
    t0 = time.time()
    rc, stdout, stderr = cli_here(["optimize", "--config", cfg, "--out", out])
    took = time.time() - t0
    errs = [ln for ln in stderr.splitlines() if ln.startswith("coopt:")]
    assert rc == 2, (stdout + stderr)[-3000:]
    assert len(errs) == 1 and "config error" in errs[0] and "GPUs" in errs[0] and "participants[0]" in errs[0], errs
    assert "the cluster has 0" in errs[0], errs  # planned against the live cluster's nodes
    # Without the planning check the driver would wait DataContext.wait_for_min_actors_s (300 s) for GPU
    # actors that can never start.
    assert took < 60, f"{took:.1f}s: must fail at planning"
    print(f"num_gpus refusal: {took:.1f}s")
    assert not (out / "manifest.json").exists() and not list(out.rglob("_DONE.json"))  # no results

    # the corrected config on the same --out: participants[0] (the one the refusal named) on CPUs
    fixed = load_config(write_config(tmp_path / "cpu.yaml", tiny_models[:1], data={"limit": 120}))
    man = run_optimize(fixed, out, log=lambda *_: None)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert [q["num_gpus"] for q in saved["participants"]] == [0.0]
    assert man["total_rows"] == 120 and man["optimized_rows"] + man["error_rows"] == 120


def test_changed_config_is_refused_once_results_exist(tmp_path, tiny_models):
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_models))
    run = tmp_path / "run"
    rundir.prepare_run_dir(cfg, run)
    (run / "embeddings" / "p0").mkdir(parents=True)
    (run / "embeddings" / "p0" / "_DONE.json").write_text(json.dumps({"rows": 1}))
    other = load_config(write_config(tmp_path / "d.yaml", tiny_models, seed=1))
    with pytest.raises(ConfigError, match=r"was made with a different config \(differs in: seed\)"):
        rundir.prepare_run_dir(other, run)
    rundir.prepare_run_dir(cfg, run)  # the same config resumes
