"""The zoo's teacher objectives (coopt_ray/zoo_train.py) and the diverse zoo's specs, on tiny models."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_clip_cfg
from coopt_ray import zoo
from coopt_ray.data import FASHION_MNIST_CLASSES
from coopt_ray.zoo_specs import DIVERSE_SPECS, PREPROCESS_CFG, ZOO_SETS
from coopt_ray.zoo_train import OBJECTIVES, class_subset, make_objective


def test_class_subset_keeps_exactly_the_named_classes():
    px = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1)
    y = np.array([0, 5, 1, 5, 9, 0])
    sub, ys = class_subset(px, y, [0, 5])
    assert ys.tolist() == [0, 5, 5, 0] and sub.flatten().tolist() == [0.0, 1.0, 3.0, 5.0]
    same, ya = class_subset(px, y, None)
    assert same is px and ya.tolist() == y.tolist()
    with pytest.raises(ValueError, match=r"classes \[3\]: no training image"):
        class_subset(px, y, [3])


def _tiny(objective: str, **extra):
    import open_clip

    spec = {"name": f"t-{objective}", "model_cfg": tiny_clip_cfg(16), "objective": objective,
            "preprocess_cfg": PREPROCESS_CFG, **extra}
    torch.manual_seed(0)
    return spec, open_clip.CLIP(**spec["model_cfg"])


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_each_objective_fits_one_batch(objective):
    """Known behaviour: 60 Adam steps on one fixed batch drive every objective's loss well down (for CLIP, two
    images share each caption, so its floor is log 2 per direction)."""
    spec, model = _tiny(objective)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(20, 3, 32, 32, generator=gen) * 2 - 1
    y = np.arange(20) % 10  # the ten class captions, each on two images
    captions = ([f"a photo of a {c}" for c in FASHION_MNIST_CLASSES], y)
    obj = make_objective(spec, model, y, captions, torch.full((3,), 0.5), torch.full((3,), 0.5), "cpu")
    opt = torch.optim.Adam(list(model.parameters()) + obj.params, lr=3e-3)
    idx = torch.arange(20)
    losses = []
    for _ in range(60):
        loss = obj(x, idx, torch.Generator().manual_seed(1))  # the same views each step: a fixed target
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert np.isfinite(losses).all() and losses[-1] < 0.6 * losses[0], losses


def test_clip_teacher_training_only_its_token_rows_gives_the_same_weights_bit_for_bit(monkeypatch):
    """Known answer: the zoo trains a CLIP teacher's token embedding only in the rows its captions use
    (zoo_train.UsedTokenRows); with the whole 49,408-row table in the optimizer instead, every weight comes out the
    same, bit for bit, and the rows no caption uses keep their initial values."""
    import open_clip

    from coopt_ray import zoo_train

    spec = {"name": "t-rows", "model_cfg": tiny_clip_cfg(16), "epochs": 1, "lr": 3e-3, "batch_size": 16,
            "seed": 3, "preprocess_cfg": PREPROCESS_CFG}
    gen = torch.Generator().manual_seed(0)
    pixels, labels = torch.rand(96, 3, 32, 32, generator=gen) * 2 - 1, np.arange(96) % 10
    seen: list = []
    make = zoo_train.UsedTokenRows.__init__

    def spy(self, model, tokens):
        make(self, model, tokens)
        seen.append((len(self.used), tokens.unique().tolist()))

    monkeypatch.setattr(zoo_train.UsedTokenRows, "__init__", spy)
    rows, _ = zoo.train_teacher(spec, pixels, labels, progress=lambda _: None)
    assert len(seen) == 1 and seen[0][0] == len(seen[0][1]) < 100  # a few dozen rows trained, not 49,408
    assert isinstance(rows.token_embedding, torch.nn.Embedding) and rows.token_embedding.num_embeddings == 49408

    monkeypatch.setattr(zoo_train, "used_token_rows", lambda model, tokens: None)  # the whole table trains
    full, _ = zoo.train_teacher(spec, pixels, labels, progress=lambda _: None)
    a, b = rows.state_dict(), full.state_dict()
    assert list(a) == list(b) and [k for k in a if not torch.equal(a[k], b[k])] == []

    torch.manual_seed(int(spec["seed"]))
    init = open_clip.CLIP(**spec["model_cfg"]).token_embedding.weight  # what train_teacher started from
    moved = (a["token_embedding.weight"] != init).any(1).nonzero().flatten().tolist()
    assert moved and set(moved) <= set(seen[0][1])  # only caption tokens moved


def test_supervised_objective_maps_any_class_subset_to_its_own_classifier():
    spec, model = _tiny("supervised")
    obj = make_objective(spec, model, np.array([5, 9, 7, 5]), ([], None), torch.zeros(3), torch.ones(3), "cpu")
    assert obj.fc.out_features == 3 and obj.y.tolist() == [0, 2, 1, 0]


def test_unknown_objective_is_named():
    spec, model = _tiny("byol")
    with pytest.raises(ValueError, match=r"t-byol: 'objective' must be one of \('clip', 'simclr', 'supervised'\), got 'byol'"):
        make_objective(spec, model, np.zeros(2), ([], None), torch.zeros(3), torch.ones(3), "cpu")


def test_diverse_zoo_builds_each_kind_of_teacher_on_its_classes(tmp_path):
    """The diverse specs, shortened, through build_zoo: each teacher trains on what its spec says and loads back
    through the participants' code path."""
    assert ZOO_SETS["diverse"] is DIVERSE_SPECS and ZOO_SETS["default"] is zoo.ZOO_SPECS
    assert {s.get("objective", "clip") for s in DIVERSE_SPECS} == set(OBJECTIVES)
    specs = [dict(s, epochs=1, batch_size=32) for s in DIVERSE_SPECS]
    lines: list[str] = []
    teachers = zoo.build_zoo(tmp_path / "z", specs=specs, n_train=200, n_test=100, probe_epochs=5, jobs=1,
                             progress=lines.append)
    labels = zoo.fashion_mnist_split("public")[1][:200]
    assert f"[zoo] clip-half-0to4: objective clip, classes [0, 1, 2, 3, 4]: {int((labels < 5).sum())} images" in lines
    assert f"[zoo] sup-half-5to9: objective supervised, classes [5, 6, 7, 8, 9]: {int((labels >= 5).sum())} images" in lines
    assert "[zoo] simclr-free: objective simclr, classes all: 200 images" in lines
    assert [t["name"] for t in teachers] == [s["name"] for s in DIVERSE_SPECS]
    assert all(0 < t["probe_accuracy"] <= 1 and t["embed_dim"] == s["model_cfg"]["embed_dim"]
               for t, s in zip(teachers, DIVERSE_SPECS))

    # benchmarks/zoo_diversity.py on this small zoo: each teacher alone, the top two and all of them together
    import json
    import sys

    sys.path.insert(0, str(zoo.Path(__file__).resolve().parents[1] / "benchmarks"))
    import zoo_diversity

    out = tmp_path / "zd.json"
    assert zoo_diversity.main(["--zoo", str(tmp_path / "z"), "--probe-images", "120", "--test-images", "80",
                               "--probe-epochs", "3", "--out", str(out)]) == 0
    z = json.loads(out.read_text())["zoos"]["z"]
    assert set(z["teachers"]) == {s["name"] for s in DIVERSE_SPECS} and z["best"] == max(z["teachers"], key=z["teachers"].get)
    assert z["best_alone"] == z["teachers"][z["best"]] and len(z["top2"]) == 2 and 0 < z["all_together"] <= 1
    assert z["gain_all_over_best_points"] == round(100 * (z["all_together"] - z["best_alone"]), 2)
    assert z["passes"] == (z["gain_all_over_best_points"] >= 2.0)
