"""A miniature teacher zoo built through the real code path: train, save, load back, probe, cache."""
from __future__ import annotations

import json

import numpy as np
import pytest

from coopt_ray import zoo
from coopt_ray.config import DEFAULT_FASHION_MNIST_DIR
from coopt_ray.data import fashion_mnist_dir, fashion_mnist_split
from coopt_ray.models import load_model
from coopt_ray.probe import embed_tensors, preprocess_arrays
from coopt_ray.uniformity import uniformity


def test_fashion_mnist_is_installed():
    """`make test` installs the dataset (`make data`); without it this module fails, it does not skip."""
    assert fashion_mnist_dir(DEFAULT_FASHION_MNIST_DIR).is_dir()

N_TRAIN, N_TEST = 300, 200


def _mini_specs():
    return [dict(s, epochs=1, batch_size=64) for s in zoo.ZOO_SPECS[:2]]


def _build(out, lines=None, **kw):
    args = dict(specs=_mini_specs(), n_train=N_TRAIN, n_test=N_TEST, num_threads=1, probe_epochs=20,
                progress=(lines.append if lines is not None else None))
    args.update(kw)
    return zoo.build_zoo(out, **args)


def _mtimes(out):
    return {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def test_default_specs_are_distinct_tiny_clips():
    specs = zoo.ZOO_SPECS
    assert len(specs) >= 5
    assert len({s["name"] for s in specs}) == len(specs)
    assert len({s["model_cfg"]["embed_dim"] for s in specs}) == len(specs)
    assert any(isinstance(s["model_cfg"]["vision_cfg"]["layers"], list) for s in specs)  # a ModifiedResNet
    assert all(s["model_cfg"]["vision_cfg"]["image_size"] == 32 for s in specs)
    assert len({s["epochs"] for s in specs}) > 1


@pytest.fixture(scope="module")
def mini_zoo(tmp_path_factory):
    """The two mini teachers built one at a time, once for this module: ``(folder, progress lines, records)``. The
    cache test below rebuilds in the folder without changing a weight; the parallel build compares against it."""
    out = tmp_path_factory.mktemp("mini") / "zoo"
    lines: list[str] = []
    return out, lines, _build(out, lines, jobs=1)


def test_mini_zoo_build_cache_and_load(mini_zoo):
    out, lines, teachers = mini_zoo
    assert any("epoch 1/1" in line and "loss" in line for line in lines)  # per-epoch progress

    doc = json.loads((out / "zoo.json").read_text())
    x_pub = fashion_mnist_split("public")[0][:N_TRAIN]
    assert [t["name"] for t in doc["teachers"]] == ["clip-tiny-a", "clip-tiny-b"]
    assert [t["name"] for t in teachers] == ["clip-tiny-a", "clip-tiny-b"]
    assert not list(out.glob("*.tmp*")) and not list(out.glob(".*.tmp*"))
    for t, spec in zip(doc["teachers"], _mini_specs()):
        assert set(t) >= {"name", "path", "embed_dim", "probe_accuracy", "train_seconds", "spec", "uniformity"}
        assert 0.0 < t["probe_accuracy"] <= 1.0
        assert t["train_seconds"] > 0
        assert t["spec"]["model_cfg"] == spec["model_cfg"]
        assert t["embed_dim"] == spec["model_cfg"]["embed_dim"]
        # the folder loads through the participants' code path and reports the same dim
        m, preprocess, dim = load_model(f"local-dir:{t['path']}", device="cpu")
        assert dim == t["embed_dim"]
        # the recorded uniformity is the value of the saved model on the zoo's seeded public sample
        idx = np.sort(np.random.default_rng(zoo.UNIFORMITY_SEED).choice(
            N_TRAIN, size=min(zoo.UNIFORMITY_SAMPLE, N_TRAIN), replace=False))
        uni = uniformity(embed_tensors(m, preprocess_arrays(preprocess, x_pub[idx])))
        assert t["uniformity"] == pytest.approx(uni, abs=2e-6)  # zoo.json rounds to 6 decimals
    assert max(t["probe_accuracy"] for t in doc["teachers"]) > 0.1 + 0.1  # clearly above chance

    # second call: cached, nothing retrained or rewritten
    before = _mtimes(out)
    lines2: list[str] = []
    again = _build(out, lines2)
    assert _mtimes(out) == before
    assert not any("epoch" in line for line in lines2)
    assert [(t["name"], t["probe_accuracy"]) for t in again] == [(t["name"], t["probe_accuracy"]) for t in teachers]

    # zoo.json lost (interrupted build): finished teachers are reused, zoo.json comes back
    (out / "zoo.json").unlink()
    weights = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    lines3: list[str] = []
    again = _build(out, lines3)
    assert not any("epoch" in line for line in lines3)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == weights
    assert json.loads((out / "zoo.json").read_text())["teachers"] == doc["teachers"]


def test_changed_specs_rebuild(tmp_path):
    out = tmp_path / "zoo"
    spec = [dict(zoo.ZOO_SPECS[-1], epochs=0.5, batch_size=64)]
    first = _build(out, specs=spec)
    h = json.loads((out / "zoo.json").read_text())["specs_hash"]
    lines: list[str] = []
    second = _build(out, lines, specs=[dict(spec[0], seed=99)])
    assert any("epoch" in line for line in lines)  # retrained
    assert json.loads((out / "zoo.json").read_text())["specs_hash"] != h
    assert second[0]["spec"]["seed"] == 99 and first[0]["spec"]["seed"] != 99
    # the images the first build preprocessed in this process were reused, not preprocessed again; other
    # images (a shorter public split) are
    assert not any("preprocessed" in line for line in lines), lines
    lines = []
    _build(tmp_path / "zoo2", lines, specs=spec, n_train=N_TRAIN - 100)
    assert any(f"preprocessed {N_TRAIN - 100} public + {N_TEST} test images" in line for line in lines), lines


@pytest.mark.slow
def test_parallel_build_trains_the_same_teachers_as_one_at_a_time(tmp_path, mini_zoo):
    """`jobs=2` trains each teacher in its own process; every teacher depends only on its spec and seed, so the
    weights and records equal a one-at-a-time build's (the module's, jobs=1), and the children's progress reaches
    the caller."""
    import torch
    from safetensors.torch import load_file

    lines: list[str] = []
    par = _build(tmp_path / "par", lines, jobs=2)
    seq_dir, _, seq = mini_zoo
    assert "[zoo] training 2 teachers, 2 at a time" in lines
    assert any(line.startswith("[zoo] clip-tiny-b epoch 1/1") for line in lines)  # from a child process
    for p, s in zip(par, seq):
        assert (p["name"], p["probe_accuracy"], p["uniformity"], p["final_loss"]) == \
            (s["name"], s["probe_accuracy"], s["uniformity"], s["final_loss"])
        wp = {k: v for f in sorted((tmp_path / "par" / p["name"]).glob("*.safetensors")) for k, v in load_file(f).items()}
        ws = {k: v for f in sorted((seq_dir / s["name"]).glob("*.safetensors")) for k, v in load_file(f).items()}
        assert wp and wp.keys() == ws.keys() and all(torch.equal(wp[k], ws[k]) for k in wp)
