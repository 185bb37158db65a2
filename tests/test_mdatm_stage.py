"""`coopt distill` with ``distill.method: mdatm`` (coopt_ray/distill/mdatm_stage.py): experts and matching on Ray
write RUN/distilled/mdatm/ (Parquet id, image PNG, label), a rerun skips, more iterations resume from the checkpoint,
a resumed matching repeats an uninterrupted one, a killed expert stage keeps its finished experts, and bad values
exit 2 with one line before Ray starts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import REPO, forbid_ray_start, kill_group, write_config
from coopt_ray import cli
from coopt_ray.config import load_config

TINY = {"method": "mdatm", "ipc": 2, "labeled_limit": 500, "experts": 2, "expert_epochs": 1, "range": [0, 0],
        "expert_steps": 1, "syn_steps": 3, "width": 4, "iterations": 3, "checkpoint_every": 2, "log_every": 1,
        "eval_runs": 1, "eval_epochs": 2, "lr_img": 10.0}


def _cfg(tmp_path, name="c.yaml", **distill):
    return write_config(tmp_path / name, ["local-dir:/unused"], data={"source": "fashion-mnist", "image_size": 16},
                        distill={**TINY, **distill}, eval={"test_limit": 200})


def test_mdatm_stage_writes_the_labeled_set_skips_when_done_and_resumes_for_more_iterations(tmp_path, ray_session):
    from coopt_ray.distill.stage import run_distill

    run, lines = tmp_path / "run", []
    res = run_distill(load_config(_cfg(tmp_path)), run, log=lines.append)
    out = run / "distilled" / "mdatm"
    t = pq.read_table(str(out / "data"))
    assert t.column_names == ["id", "image", "label", "class"]
    assert t.column("label").to_pylist() == [c for c in range(10) for _ in range(2)]  # hard labels, class order
    from coopt_ray.images import decode_image

    img = decode_image(t.column("image")[0].as_py())
    assert img.size == (16, 16) and res["channels"] == 1  # Fashion-MNIST is grey: one channel
    assert len(res["loss"]) == 3 and res["loss_steps"] == [1, 2, 3] and len(res["experts"]) == 2
    assert len(res["scores"]) == 1 and 0.0 <= res["accuracy"] <= 1.0
    init = np.asarray(res["init_rows"])  # each synthetic image's starting row, of its own class
    from coopt_ray.labeled import distill_splits

    labels = distill_splits(load_config(_cfg(tmp_path)))["train"][1]
    assert len(set(init.tolist())) == 20 and labels[init].tolist() == t.column("label").to_pylist()
    assert json.loads((out / "_DONE.json").read_text())["size"] == 20
    page = (out / "report.html").read_text()
    assert "images.png" in page and "2 per class" in page and (out / "images.png").stat().st_size > 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["matching_000002.pt", "matching_000003.pt"]
    state = torch.load(out / "checkpoints" / "matching_000003.pt", weights_only=True)  # tensors only
    assert state["iteration"] == 3 and len(state["history"]) == 3

    lines.clear()
    run_distill(load_config(_cfg(tmp_path)), run, log=lines.append)
    assert any("already done" in s for s in lines) and not any("iteration" in s for s in lines)
    (out / "report.html").unlink()
    assert cli.main(["report", "--run", str(run)]) == 0 and "2 per class" in (out / "report.html").read_text()

    lines.clear()
    res5 = run_distill(load_config(_cfg(tmp_path, "c5.yaml", iterations=5)), run, log=lines.append)
    assert any("experts [0, 1] already done; training none" in s for s in lines), lines
    assert any("resuming the matching after iteration 3" in s for s in lines), lines
    assert res5["loss_steps"] == [1, 2, 3, 4, 5] and res5["loss"][:3] == res["loss"]


def test_a_resumed_matching_repeats_an_uninterrupted_one(tmp_path):
    from coopt_ray.distill.mdatm_experts import expert_task
    from coopt_ray.distill.mdatm_stage import CKPT, matching_chunk

    torch.manual_seed(0)
    x, y = torch.randn(60, 1, 8, 8), torch.arange(3).repeat(20)
    exp = tmp_path / "experts"
    exp.mkdir()
    for i in range(2):
        expert_task(i, x, y, 3, 3, 0.05, 20, 4, 0, str(exp), "f")
    mc = {"classes": 3, "ipc": 2, "mean": [0.0], "std": [1.0], "seed": 1, "width": 4, "lr_img": 10.0, "lr_lr": 1e-5,
          "expert_lr": 0.01, "syn_steps": 3, "expert_steps": 1, "t_lo": 0, "t": 1, "t_hi": 2, "grow": 2,
          "batch_syn": 4, "use_gpu": False, "fingerprint": "m"}
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    whole.mkdir(), parts.mkdir()
    h_whole = matching_chunk(str(whole), str(exp), 2, 0, 4, mc, x, y)
    h_parts = matching_chunk(str(parts), str(exp), 2, 0, 2, mc, x, y) + matching_chunk(str(parts), str(exp), 2, 2, 2,
                                                                                            mc, None, None)
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in h_whole]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in h_parts]
    a = torch.load(whole / CKPT.format(4), weights_only=True)["matcher"]
    b = torch.load(parts / CKPT.format(4), weights_only=True)["matcher"]
    assert torch.equal(a["x"], b["x"]) and torch.equal(a["syn_lr"], b["syn_lr"])
    assert not torch.equal(a["x"], x[:6])  # the images moved
    assert float(a["x"].min()) >= 0.0 and float(a["x"].max()) <= 1.0  # kept in the valid pixel range


@pytest.mark.slow
def test_a_killed_expert_stage_keeps_its_finished_experts_and_the_job_finishes_it(tmp_path, ray_session, monkeypatch):
    cfg = _cfg(tmp_path, experts=3, expert_epochs=2, labeled_limit=3000, width=16, cpus_per_worker=2)
    run, log = tmp_path / "run", tmp_path / "first.log"
    from conftest import session_address

    # The killed driver joins the session's Ray (no start-up of its own). Killing it ends its job, and Ray removes
    # that job's tasks; what is checked here is what RUN keeps across the kill.
    # A placement group holds 2 of the session Ray's 4 CPUs until the kill, so the experts (2 CPUs each) train one at a
    # time: the third waits behind the second and cannot start once its driver is dead. With two at once, a quick host
    # once finished all three before Ray stopped the killed driver's running tasks.
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    hold = placement_group([{"CPU": 2}])
    ray.get(hold.ready(), timeout=60)
    env = {**os.environ, "RAY_ADDRESS": session_address()}
    proc = subprocess.Popen([sys.executable, "-m", "coopt_ray", "distill", "--config", str(cfg), "--run", str(run)],
                            cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    exp = run / "distilled" / "mdatm" / "experts"
    deadline = time.time() + 240

    def finished() -> list[int]:
        return [i for i in range(3) if (exp / f"expert_{i:03d}.json").exists()]

    try:
        while not finished():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        kill_group(proc)
    finally:
        remove_placement_group(hold)
    first = finished()
    assert len(first) < 3, "the experts finished before the kill; make them slower"
    kept = {i: (exp / f"expert_{i:03d}.safetensors").stat().st_mtime_ns for i in first}
    # jobs/distill.py finishes it, run here in pytest's driver on the same Ray (its warm workers)
    from conftest import job_here

    rc, out, err = job_here(monkeypatch, "distill", ["--config", cfg, "--out", run])
    assert rc == 0, (out + err)[-3000:]
    assert "already done; training" in out, out
    assert not [i for i in first if f"expert {i}:" in out], out  # finished experts not retrained
    assert {i: (exp / f"expert_{i:03d}.safetensors").stat().st_mtime_ns for i in first} == kept
    assert (run / "distilled" / "mdatm" / "_DONE.json").exists() and "[job] distilled set" in out


@pytest.mark.parametrize("over,needle", [
    ({"ipc": 0}, "'distill.ipc' must be >= 1"),
    ({"experts": 0}, "'distill.experts' must be >= 1"),
    ({"range": [5, 2]}, "'distill.range' must be [T-, T+]"),
    ({"range": "early"}, "'distill.range' must be [T-, T+]"),
    ({"range_start": 9, "range": [0, 4]}, "'distill.range_start' must lie in distill.range [0, 4]"),
    ({"expert_epochs": 3, "range": [0, 4], "expert_steps": 2}, "'distill.expert_epochs' (3) must be >= T+ + expert_steps"),
    ({"lr_img": 0.0}, "'distill.lr_img' must be > 0"),
    ({"eval_runs": -1}, "'distill.eval_runs' must be >= 0"),
    ({"labeled_limit": 0}, "'distill.labeled_limit' must be a positive integer"),
    ({"labeled_path": "/nonexistent/labeled"}, "labeled split not found: /nonexistent/labeled"),
    ({"ipc": 60, "labeled_limit": 100}, "'distill.ipc' (60) is more than class"),
], ids=["ipc", "experts", "range-order", "range-type", "range_start", "expert_epochs", "lr_img", "eval_runs",
        "labeled_limit", "labeled_path", "ipc>class"])
def test_bad_mdatm_values_exit_2_with_one_line(over, needle, tmp_path, monkeypatch, capsys):
    forbid_ray_start(monkeypatch)
    cfg = _cfg(tmp_path, **over)
    rc = cli.main(["distill", "--config", str(cfg), "--run", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0], err


def test_the_krr_fingerprint_ignores_the_mdatm_keys_and_the_labeled_splits_resize(tmp_path):
    from coopt_ray.config_distill import distill_view
    from coopt_ray.labeled import distill_splits

    a = load_config(write_config(tmp_path / "a.yaml", ["local-dir:/unused"]))
    b = load_config(write_config(tmp_path / "b.yaml", ["local-dir:/unused"], distill={"ipc": 7, "width": 8}))
    assert a.fingerprint() == b.fingerprint() and "ipc" not in distill_view(a.distill)
    m = load_config(_cfg(tmp_path, "m.yaml", labeled_limit=30))
    assert "ipc" in distill_view(m.distill) and "pool_size" not in distill_view(m.distill)
    s = distill_splits(m)
    assert s["train"][0].shape == (30, 16, 16, 3) and s["test"][0].shape == (200, 16, 16, 3)
    assert s["train"][0].dtype == np.uint8 and len(s["classes"]) == 10


def test_a_labeled_parquet_source_maps_its_labels_to_classes_and_the_test_split_follows(tmp_path):
    import pyarrow as pa

    from coopt_ray.images import encode_png
    from coopt_ray.labeled import EvalSkipped, distill_splits

    def parquet(path, labels):
        img = encode_png(np.full((8, 8), 100, np.uint8))
        path.mkdir()
        pq.write_table(pa.table({"image": [img] * len(labels), "label": labels}), path / "part-0.parquet")

    parquet(tmp_path / "train", [3, 7, 7, 12, 3, 12])
    parquet(tmp_path / "test", [12, 3])
    cfg = load_config(_cfg(tmp_path, labeled_path=str(tmp_path / "train"), labeled_limit=None))
    with pytest.raises(EvalSkipped, match="set eval.test_path"):
        distill_splits(cfg)
    cfg = load_config(write_config(tmp_path / "p.yaml", ["local-dir:/unused"], data={"image_size": 16},
                                   distill={**TINY, "labeled_path": str(tmp_path / "train")},
                                   eval={"test_path": str(tmp_path / "test")}))
    s = distill_splits(cfg)
    names = [s["classes"][i] for i in s["train"][1]]
    assert sorted(s["classes"], key=int) == ["3", "7", "12"] and sorted(names) == ["12", "12", "3", "3", "7", "7"]
    assert sorted(s["classes"][i] for i in s["test"][1]) == ["12", "3"] and s["train"][0].shape[1:] == (16, 16, 3)
    parquet(tmp_path / "test2", [5])
    cfg2 = load_config(write_config(tmp_path / "q.yaml", ["local-dir:/unused"],
                                    distill={**TINY, "labeled_path": str(tmp_path / "train")},
                                    eval={"test_path": str(tmp_path / "test2")}))
    with pytest.raises(EvalSkipped, match=r"classes the labeled images lack: \['5'\]"):
        distill_splits(cfg2)
