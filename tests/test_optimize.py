"""Integration: `coopt optimize` on a local Ray with 3 tiny open_clip models of different dims."""
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from coopt_ray.config import load_config
from coopt_ray.cluster import plan_waves
from coopt_ray.embeddings import column_matrix, read_shared
from coopt_ray.rundir import DONE
from coopt_ray.pipeline import run_optimize
from coopt_ray.uniformity import uniformity

from conftest import copy_run, write_config


@pytest.fixture(scope="module")
def optimized(tmp_path_factory, tiny_models, shared_optimized):
    """The session's optimized RUN (write_config's defaults), copied: these tests delete markers and rerun."""
    tmp = tmp_path_factory.mktemp("opt")
    cfg = load_config(write_config(tmp / "c.yaml", tiny_models))
    run = copy_run(shared_optimized, tmp / "run")
    man = json.loads((run / "manifest.json").read_text())
    return cfg, run, man, []


def _optimized_table(run):
    return pq.read_table(run / "optimized")


def test_every_image_accounted_for(optimized):
    cfg, run, man, _ = optimized
    t = _optimized_table(run)
    errs = pq.read_table(run / "errors")
    assert man["total_rows"] == 300
    assert man["optimized_rows"] + man["error_rows"] == man["total_rows"]
    assert t.num_rows == man["optimized_rows"] and errs.num_rows == man["error_rows"]
    ids = t.column("id").to_pylist() + errs.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 300
    assert set(ids) == {f"train/{10000 + i}" for i in range(300)}
    assert sum(p["rows"] for p in man["participants"]) == 300


def test_best_is_argmin_uniformity_and_targets_have_its_dim(optimized):
    cfg, run, man, _ = optimized
    mats = {}
    for p in cfg.participants:
        ids, x = read_shared(run / "embeddings" / p.name)
        order = np.argsort(ids)
        mats[p.name] = x[order]
    values = {n: uniformity(x) for n, x in mats.items()}
    assert man["best"] == min(values, key=values.get)
    for p in man["participants"]:
        assert p["uniformity"] == pytest.approx(values[p["name"]], abs=1e-9)
        assert p["aligned"] == (p["name"] != man["best"])
        assert (p["align_r2"] is None) == (p["name"] == man["best"])
    dims = {p["name"]: p["embed_dim"] for p in man["participants"]}
    assert sorted(dims.values()) == [16, 24, 32]
    y = column_matrix(_optimized_table(run).column("target"))
    assert y.shape == (man["optimized_rows"], dims[man["best"]]) == (300, man["target_dim"])
    assert np.all(np.isfinite(y))


def test_best_targets_are_raw_embeddings_and_others_are_aligned(optimized):
    cfg, run, man, _ = optimized
    t = _optimized_table(run).to_pydict()
    best = man["best"]
    raw, maps = {}, {}
    for p in man["participants"]:  # every participant's embeddings and the map applied to them, read back
        emb = pq.read_table(run / "embeddings" / p["name"], columns=["id", "embedding"])
        raw[p["name"]] = dict(zip(emb.column("id").to_pylist(), column_matrix(emb.column("embedding"))))
        if p["name"] != best:
            a = np.load(run / "align" / f"{p['name']}.npz")
            maps[p["name"]] = (a["W"], a["b"])
    assert set(maps) == {p["name"] for p in man["participants"]} - {best}
    for i, pid, tgt, al in zip(t["id"], t["participant"], t["target"], t["aligned"]):
        x = raw[pid][i]
        if pid == best:
            np.testing.assert_allclose(np.asarray(tgt), x, atol=1e-6)
            assert not al
        else:
            W, b = maps[pid]
            assert W.shape == (x.shape[0], man["target_dim"])
            np.testing.assert_allclose(np.asarray(tgt), x.astype(np.float64) @ W + b, rtol=1e-4, atol=1e-4)
            assert al


def test_manifest_shape(optimized):
    _, run, man, _ = optimized
    on_disk = json.loads((run / "manifest.json").read_text())
    assert on_disk == man
    for k in ("participants", "best", "target_dim", "total_rows", "optimized_rows", "error_rows", "timings",
              "versions"):
        assert k in man
    assert set(man["timings"]) >= {"optimize", "score", "align", "merge"}
    assert man["versions"]["ray"] == "2.60.0"


def test_rerun_does_no_recomputation(optimized):
    cfg, run, man, _ = optimized
    marks = {p.name: os.stat(run / "embeddings" / p.name / DONE).st_mtime_ns for p in cfg.participants}
    opt_mtime = os.stat(run / "manifest.json").st_mtime_ns
    logs = []
    again = run_optimize(cfg, run, log=logs.append)
    assert again == man
    assert any("already done" in line for line in logs)
    assert os.stat(run / "manifest.json").st_mtime_ns == opt_mtime
    assert {p.name: os.stat(run / "embeddings" / p.name / DONE).st_mtime_ns for p in cfg.participants} == marks


def test_resume_recomputes_only_unfinished_participant(optimized):
    cfg, run, man, _ = optimized
    before = _optimized_table(run).to_pydict()
    (run / "manifest.json").unlink()
    (run / "embeddings" / "p1" / DONE).unlink()
    marks = {n: os.stat(run / "embeddings" / n / DONE).st_mtime_ns for n in ("p0", "p2")}
    logs = []
    again = run_optimize(cfg, run, log=logs.append)
    assert any("p0: already done" in line for line in logs)
    assert any("p1: embedding" in line for line in logs)
    assert {n: os.stat(run / "embeddings" / n / DONE).st_mtime_ns for n in ("p0", "p2")} == marks
    after = _optimized_table(run).to_pydict()
    a = dict(zip(before["id"], before["target"]))
    b = dict(zip(after["id"], after["target"]))
    assert a.keys() == b.keys()
    assert max(np.abs(np.asarray(a[k]) - np.asarray(b[k])).max() for k in a) < 1e-6
    assert again["best"] == man["best"]


def test_plan_waves_gpu_config_on_cpu_cluster_is_clear_error(optimized):
    import dataclasses

    from coopt_ray.config import ConfigError

    cfg = optimized[0]
    gpu = [dataclasses.replace(p, num_gpus=1.0) for p in cfg.participants]
    with pytest.raises(ConfigError, match="needs 1 GPUs"):
        plan_waves(gpu, {"CPU": 4.0})
    plan = plan_waves(gpu, {"CPU": 8.0, "GPU": 2.0})
    assert plan.waves == [[0, 1], [2]] and "2 waves" in plan.message
