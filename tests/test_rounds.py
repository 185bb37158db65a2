"""Continual rounds (issue 13): the weighted split, round configs for each join mode, a student loaded as a
participant through load_model, the warm start, bad `rounds:` values, and a 2-round `coopt run --rounds 2` killed in
round 2 that resumes without redoing round 1."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch

from coopt_ray import cli
from coopt_ray.config import load_config
from coopt_ray.data import _hash64, owner_of
from coopt_ray.rounds import round_config, worst_participant
from coopt_ray.student import METRICS, WEIGHTS, Student, warm_start

from conftest import REPO, cli_here, forbid_ray_start, kill_group, write_config


# ---------------------------------------------------------------- the weighted split
def test_shares_split_disjoint_complete_and_in_proportion():
    ids = [f"train/{i}" for i in range(20_000)]
    owner = owner_of(ids, 3, seed=7, shares=[0.0, 1.0, 3.0])
    assert set(np.unique(owner)) == {1, 2}  # share 0 owns nothing; every id has exactly one owner in range
    frac = np.bincount(owner, minlength=3) / len(ids)
    assert abs(frac[1] - 0.25) < 0.015 and abs(frac[2] - 0.75) < 0.015, frac
    assert (owner_of(ids, 3, seed=8, shares=[0.0, 1.0, 3.0]) != owner).any()  # the seed moves it
    # Equal shares are exactly the plain hash % k split (runs made before `share` existed keep their shards).
    plain = (_hash64(ids, "owner:7") % np.uint64(4)).astype(np.int64)
    assert (owner_of(ids, 4, 7, [2.0] * 4) == plain).all() and (owner_of(ids, 4, 7) == plain).all()
    with pytest.raises(ValueError, match="shares"):
        owner_of(ids, 2, 7, [0.0, -1.0])


# ---------------------------------------------------------------- round configs
@pytest.fixture
def base(tmp_path):
    return load_config(write_config(tmp_path / "c.yaml", ["local-dir:/a", "local-dir:/b", "local-dir:/c"],
                                    participants=[{"name": f"p{i}", "model": f"local-dir:/{c}", "batch_size": 64,
                                                   "num_cpus": 0.5 + i} for i, c in enumerate("abc")],
                                    rounds={"count": 3, "join": "extra"}))


def _manifest(uni: dict, cov: dict) -> dict:
    return {"participants": [{"name": n, "uniformity": u, "coverage": cov[n]} for n, u in uni.items()]}


def test_round_configs_for_each_join_mode(base, tmp_path):
    import dataclasses

    prev_dir = tmp_path / "run" / "rounds" / "1"
    man = _manifest({"p0": -1.9, "p1": -1.2, "p2": -1.5}, {"p0": 0.5, "p1": 0.7, "p2": 0.3})
    spec = f"student:{prev_dir.resolve()}"

    extra = round_config(base, base, prev_dir, man, 1)
    assert [p.name for p in extra.participants] == ["p0", "p1", "p2", "student-r1"]
    assert extra.participants[-1].model == spec and extra.participants[-1].num_cpus == 0.5  # placement of p0
    assert extra.rounds.count == 1 and extra.student.init is None

    rep = round_config(dataclasses.replace(base, rounds=dataclasses.replace(base.rounds, join="replace")),
                       base, prev_dir, man, 1)
    assert [p.name for p in rep.participants] == ["p0", "student-r1", "p2"]  # p1: the highest uniformity value
    assert rep.participants[1].model == spec and rep.participants[1].num_cpus == 1.5  # p1's placement
    assert worst_participant(man, "coverage") == "p2"  # with score.method coverage: the lowest coverage

    # Round 3 of replace: round 2's student can itself be the one replaced.
    man2 = _manifest({"p0": -1.9, "student-r1": -0.4, "p2": -1.5}, {"p0": 0.5, "student-r1": 0.1, "p2": 0.3})
    rep3 = round_config(dataclasses.replace(base, rounds=dataclasses.replace(base.rounds, join="replace")),
                        rep, tmp_path / "run" / "rounds" / "2", man2, 2)
    assert [p.name for p in rep3.participants] == ["p0", "student-r2", "p2"]

    ext3 = round_config(base, extra, tmp_path / "run" / "rounds" / "2", man2, 2)  # K + 1: the newest student only
    assert [p.name for p in ext3.participants] == ["p0", "p1", "p2", "student-r2"]

    rel = round_config(dataclasses.replace(base, rounds=dataclasses.replace(base.rounds, join="relabel")),
                       extra, prev_dir, man, 1)
    assert [(p.name, p.share) for p in rel.participants] == [("p0", 0.0), ("p1", 0.0), ("p2", 0.0),
                                                             ("student-r1", 1.0)]
    warm = round_config(dataclasses.replace(base, rounds=dataclasses.replace(base.rounds, warm_start=True)),
                        base, prev_dir, man, 1)
    assert warm.student.init == str((prev_dir / "student").resolve())
    # Keys added for rounds leave the fingerprints of configs that do not use them unchanged.
    assert "share" not in base.fingerprint_view()["participants"][0] and "init" not in base.fingerprint_view()["student"]
    assert rel.fingerprint("participants") != extra.fingerprint("participants")


# ---------------------------------------------------------------- the student as a participant
def _save_student(d: Path, arch="convnet3_w16", size=32, head=8, seed=0) -> Student:
    torch.manual_seed(seed)
    s = Student(arch, size, head).eval()
    (d / "student").mkdir(parents=True)
    torch.save(s.state_dict(), d / "student" / WEIGHTS)
    (d / "student" / METRICS).write_text(json.dumps({"arch": arch, "image_size": size, "head_dim": head}))
    return s


def test_a_trained_student_loads_as_a_participant_model(tmp_path):
    from PIL import Image

    from coopt_ray.augment import normalize_pixels
    from coopt_ray.models import ModelSpecError, check_model_spec, load_model

    s = _save_student(tmp_path / "run")
    check_model_spec(f"student:{tmp_path / 'run'}")
    model, prep, dim = load_model(f"student:{tmp_path / 'run'}", device="cpu")
    assert dim == 8
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)) for _ in range(3)]
    x = torch.stack([prep(im) for im in imgs])
    # The student's own input path: resize to 32, [0, 1], the student's normalisation; the head's output.
    ref = normalize_pixels(torch.stack([torch.from_numpy(np.array(im.resize((32, 32), Image.BILINEAR))).permute(
        2, 0, 1).float() / 255 for im in imgs]))
    with torch.no_grad():
        assert torch.allclose(model.encode_image(x), s(ref), atol=1e-5)
    with pytest.raises(ModelSpecError, match="no trained student"):
        check_model_spec(f"student:{tmp_path / 'nothing'}")


def test_warm_start_loads_the_backbone_and_a_matching_head(tmp_path):
    src = _save_student(tmp_path / "run", head=8, seed=1)
    same = Student("convnet3_w16", 32, 8)
    assert "head" in warm_start(same, tmp_path / "run")
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), src.state_dict().values()))
    other = Student("convnet3_w16", 32, 5)  # the target space changed between rounds
    head0 = other.head.weight.clone()
    assert "re-initialised" in warm_start(other, tmp_path / "run" / "student")
    assert torch.equal(other.head.weight, head0)
    assert all(torch.equal(a, b) for a, b in zip(other.backbone.state_dict().values(),
                                                 src.backbone.state_dict().values()))


# ---------------------------------------------------------------- bad values
@pytest.mark.parametrize("over,args,needle", [
    ({"rounds": {"count": 0}}, [], "'rounds.count' must be >= 1"),
    ({"rounds": {"join": "merge"}}, [], "'rounds.join' must be one of extra, replace, relabel"),
    ({"rounds": {"warm_start": "yes"}}, [], "'rounds.warm_start' must be true or false"),
    ({"rounds": {"cont": 2}}, [], "unknown key 'rounds.cont'"),
    ({}, ["--rounds", "0"], "'--rounds' (rounds.count) must be an integer >= 1"),
    ({"participants": [{"name": "p0", "model": "local-dir:/u", "share": -1}]}, [], "'participants[0].share'"),
    ({"participants": [{"name": "p0", "model": "local-dir:/u", "share": 0}]}, [], "at least one participant"),
    ({"student": {"init": "/no/such/run"}}, [], "'student.init': no trained student in /no/such/run"),
], ids=["count", "join", "warm_start", "unknown", "--rounds", "share<0", "no-owner", "init"])
def test_bad_rounds_values_exit_2_with_one_line(over, args, needle, tmp_path, monkeypatch, capsys):
    forbid_ray_start(monkeypatch)
    cfg = write_config(tmp_path / "c.yaml", ["local-dir:/unused"], **over)
    rc = cli.main(["run", "--config", str(cfg), "--out", str(tmp_path / "run"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "run").exists()


def test_rounds_job_with_a_bad_count_exits_2_before_ray_starts(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", ["local-dir:/unused"])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "pipeline.py"), "--config", str(cfg), "--out",
                          str(tmp_path / "run"), "--rounds", "-1"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 2 and "'--rounds' (rounds.count) must be an integer >= 1" in out.stderr, out.stderr
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- two rounds, killed in round 2
def _start(cfg: Path, run: Path, log: Path, address: Optional[str] = None) -> subprocess.Popen:
    """``coopt run --rounds 2`` with a local Ray of its own, or joining ``address``."""
    env = {**os.environ, "COOPT_PROGRESS": "0"}
    env.pop("RAY_ADDRESS", None)
    if address:
        env["RAY_ADDRESS"] = address
    return subprocess.Popen([sys.executable, "-m", "coopt_ray", "run", "--config", str(cfg), "--out", str(run),
                             "--rounds", "2"], cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


@pytest.mark.slow
def test_two_rounds_killed_in_round_two_resume_without_redoing_round_one(tmp_path, tiny_models, ray_session):
    cfg = write_config(tmp_path / "c.yaml", tiny_models[:2], data={"source": "fashion-mnist", "limit": 240},
                       student={"arch": "convnet3_w16", "epochs": 1, "batch_size": 32, "workers": 0},
                       eval={"probe_epochs": 5, "probe_limit": 200, "test_limit": 100})
    run, log = tmp_path / "run", tmp_path / "killed.log"
    r1, r2 = run / "rounds" / "1", run / "rounds" / "2"
    from conftest import session_address

    # Round 1 runs here, in pytest's own driver on the session's Ray (its warm workers): `--rounds 1`, which a
    # later `--rounds 2` on the same --out extends.
    rc, out1, err = cli_here(["run", "--config", cfg, "--out", run, "--rounds", "1"])
    assert rc == 0, (out1 + err)[-3000:]
    assert (r1 / "_DONE.json").exists() and not r2.exists()
    stamps = {f: (r1 / f).stat().st_mtime_ns for f in ("_DONE.json", "eval.json", "manifest.json", "student/student.pt")}

    # The killed driver joins the session's Ray (no start-up of its own): killing it ends its job, and Ray removes
    # that job's actors and tasks; what is checked here is what RUN keeps across the kill.
    p = _start(cfg, run, log, session_address())
    t0 = time.time()
    # Kill once round 2 has finished embedding its first participant.
    while p.poll() is None and not list((r2 / "embeddings").glob("*/_DONE.json")) and time.time() - t0 < 600:
        time.sleep(0.2)
    assert p.poll() is None, "finished or failed before it could be killed:\n" + log.read_text()[-3000:]
    kill_group(p)
    killed = log.read_text()
    assert "[rounds] round 1: already done" in killed and "==== round 1/2" not in killed, killed[-3000:]
    assert not (r2 / "_DONE.json").exists()
    assert stamps == {f: (r1 / f).stat().st_mtime_ns for f in stamps}  # the killed driver left round 1 alone

    # the resumed run: here, in pytest's own driver on the same Ray (its warm workers; no start-up of its own)
    rc, out, err = cli_here(["run", "--config", cfg, "--out", run, "--rounds", "2"])
    assert rc == 0, (out + err)[-3000:]
    assert "[rounds] round 1: already done" in out and "==== round 1/2" not in out
    assert stamps == {f: (r1 / f).stat().st_mtime_ns for f in stamps}  # round 1 untouched
    assert "already done" in out.split("==== round 2/2")[1]  # round 2's finished participant was not redone
    man2 = json.loads((r2 / "manifest.json").read_text())
    student = [q for q in man2["participants"] if q["name"] == "student-r1"]
    assert len(student) == 1 and student[0]["model"] == f"student:{r1.resolve()}" and student[0]["rows"] > 0
    assert man2["optimized_rows"] + man2["error_rows"] == 240
    for d in (r1, r2):
        ev = json.loads((d / "eval.json").read_text())
        assert 0 < ev["student"]["probe_accuracy"] <= 1
    assert "student-r1" in json.loads((r2 / "eval.json").read_text())["teachers"]
    summary = json.loads((run / "rounds.json").read_text())
    assert [s["round"] for s in summary["rounds"]] == [1, 2] and summary["join"] == "extra"
    assert [q["name"] for q in summary["rounds"][1]["participants"]] == ["p0", "p1", "student-r1"]
    page = (run / "report" / "report.html").read_text()
    assert "rounds_probe.png" in page and (run / "report" / "rounds_uniformity.png").stat().st_size > 1000
    assert "coopt-train-run-round2" in out  # the dashboard names say which round
    (run / "report" / "rounds_probe.png").unlink()
    assert cli.main(["report", "--run", str(run)]) == 0 and (run / "report" / "rounds_probe.png").exists()
