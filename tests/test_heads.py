"""student.heads: per-participant heads, their standardisation, the merge's own targets and the train stage."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from coopt_ray.heads import (HeadTransforms, TorchHeads, head_transforms, moments_by_head, multi_head_loss,
                             per_head_loss, weighted_mean)
from coopt_ray.student import Student, load_student, warm_start

ARCH = "convnet3_w16"  # coopt's ConvNet (BatchNorm, timm-registered): ~20x less compute than resnet10t per image


def _identity_heads(dims):
    """Heads whose transform is the identity (mean 0, P = I) for widths ``dims``."""
    names = [f"p{k}" for k in range(len(dims))]
    return HeadTransforms(names, list(dims), [np.zeros(d, np.float32) for d in dims],
                          [np.eye(d, dtype=np.float32) for d in dims])


# ---------------------------------------------------------------- the loss, known answers
def test_each_row_counts_only_in_its_own_head():
    """Rows of head 0 predicted exactly (cos loss 0), rows of head 1 predicted as the negative (cos loss 2): the mean
    over the batch is 1, and head 0's outputs for head 1's rows (here garbage) do not count."""
    th = TorchHeads(_identity_heads([3, 2]), torch.device("cpu"))
    own = torch.tensor([[1., 2., 3.], [0., 1., 0.], [1., 1., 0.], [2., -1., 0.]])  # rows 2, 3: width 2, zero-padded
    head = torch.tensor([0, 0, 1, 1])
    outs = {"p0": torch.cat([own[:2], torch.randn(2, 3)]),
            "p1": torch.cat([torch.randn(2, 2), -own[2:, :2]])}
    loss, sums, counts = per_head_loss(outs, own, head, th)
    assert loss.item() == pytest.approx(1.0, abs=1e-6)
    assert sums.tolist() == pytest.approx([0.0, 4.0], abs=1e-6) and counts.tolist() == [2.0, 2.0]


def test_head_transform_is_applied_per_head():
    """A head's target is (own[:, :d_k] - mean_k) @ P_k: the prediction 2 * (own - 1) has cos 1 (loss 0) under
    mean 1 and is wrong under mean 0."""
    t = HeadTransforms(["a"], [2], [np.ones(2, np.float32)], [np.eye(2, dtype=np.float32)])
    own = torch.tensor([[3., 0.], [0., 5.]])
    pred = {"a": 2 * (own - 1)}
    assert per_head_loss(pred, own, torch.tensor([0, 0]), TorchHeads(t, torch.device("cpu")))[0].item() == \
        pytest.approx(0.0, abs=1e-6)
    t0 = HeadTransforms(["a"], [2], [np.zeros(2, np.float32)], [np.eye(2, dtype=np.float32)])
    want = 1 - np.mean([12 / (np.sqrt(20) * 3), 40 / (np.sqrt(68) * 5)])  # cos([4, -2], [3, 0]), cos([-2, 8], [0, 5])
    assert per_head_loss(pred, own, torch.tensor([0, 0]), TorchHeads(t0, torch.device("cpu")))[0].item() == \
        pytest.approx(want, abs=1e-6)


def test_aligned_head_loss_is_added_on_rows_of_weight_one():
    th = TorchHeads(_identity_heads([2]), torch.device("cpu"))
    own = torch.tensor([[1., 0.], [0., 1.]])
    batch = {"own_target": own, "head": torch.tensor([0, 0]), "target_weight": torch.tensor([1., 0.])}
    y = torch.tensor([[1., 0.], [1., 0.]])
    aligned = torch.tensor([[-1., 0.], [1., 0.]])  # row 0 (weight 1): loss 2; row 1 (weight 0) would be 0
    loss, _, _ = multi_head_loss((aligned, {"p0": own}), batch, th, y)
    assert loss.item() == pytest.approx(2.0, abs=1e-6)
    loss_heads_only, _, _ = multi_head_loss((None, {"p0": own}), batch, th, y)
    assert loss_heads_only.item() == pytest.approx(0.0, abs=1e-6)
    assert weighted_mean(torch.tensor([3., 4.]), torch.zeros(2)).item() == 0.0  # a batch of S rows only


def test_per_head_standardisation_comes_from_each_heads_own_rows():
    rng = np.random.default_rng(0)
    a = rng.normal(5.0, 3.0, size=(200, 4))
    b = np.pad(rng.normal(-2.0, 0.5, size=(100, 2)), ((0, 0), (0, 2)))  # width 2, padded to 4
    own = np.concatenate([a, b])
    head = np.array([0] * 200 + [1] * 100)
    t = head_transforms(moments_by_head(own, head, ["a", "b"]), {"a": 4, "b": 2})
    assert t.out_dims() == {"a": 4, "b": 2}
    za = (a - t.means[0]) @ t.projs[0]
    zb = (b[:, :2] - t.means[1]) @ t.projs[1]
    for z in (za, zb):
        np.testing.assert_allclose(z.mean(0), 0, atol=1e-5)
        np.testing.assert_allclose(z.std(0), 1, atol=1e-3)
    phis = head_transforms(moments_by_head(own, head, ["a", "b"]), {"a": 4, "b": 2}, phi_s=True)
    np.testing.assert_allclose(np.cov(((a - phis.means[0]) @ phis.projs[0]).T).diagonal(), 1, atol=1e-5)
    with pytest.raises(ValueError, match="'b' has 1 row"):
        head_transforms(moments_by_head(own[:201], head[:201], ["a", "b"]), {"a": 4, "b": 2})


# ---------------------------------------------------------------- the network
def test_student_heads_forward_and_primary():
    torch.manual_seed(0)
    s = Student(ARCH, 16, 5, heads={"p0": 3, "p1": 7})
    x = torch.rand(2, 3, 16, 16)
    aligned, outs = s(x, all_heads=True)
    assert aligned.shape == (2, 5) and outs["p0"].shape == (2, 3) and outs["p1"].shape == (2, 7)
    torch.testing.assert_close(s(x), aligned)
    only = Student(ARCH, 16, 0, heads={"p0": 3, "p1": 7}, primary="p1")
    a2, outs2 = only(x, all_heads=True)
    assert a2 is None and not any(k.startswith("head.") for k in only.state_dict())
    torch.testing.assert_close(only(x), outs2["p1"])  # no aligned head: forward is the primary head
    with pytest.raises(ValueError, match="primary head"):
        Student(ARCH, 16, 0, heads={"p0": 3}, primary="nope")


def test_warm_start_loads_the_heads_that_match(tmp_path):
    torch.manual_seed(0)
    s = Student(ARCH, 16, 0, heads={"p0": 3, "p1": 7}, primary="p0")
    d = tmp_path / "student"
    d.mkdir()
    torch.save(s.state_dict(), d / "student.pt")
    (d / "metrics.json").write_text(json.dumps({"arch": ARCH, "image_size": 16, "head_dim": 3, "aligned_head": False,
                                                "heads": {"p0": 3, "p1": 7}, "primary_head": "p0"}))
    back, _ = load_student(tmp_path)
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(back(x), s.eval()(x))
    other = Student(ARCH, 16, 0, heads={"p0": 3, "p1": 9}, primary="p0")  # p1's width changed
    msg = warm_start(other, tmp_path)
    assert "heads.p0" in msg and "heads.p1" not in msg
    torch.testing.assert_close(other.heads["p0"].weight, s.heads["p0"].weight)


# ---------------------------------------------------------------- the merge's own targets (read-only, shared run)
def test_merge_keeps_every_rows_own_target_and_s_for_every_participant(shared_optimized):
    from coopt_ray.embeddings import column_matrix

    run = shared_optimized
    man = json.loads((run / "manifest.json").read_text())
    dims = {p["name"]: p["embed_dim"] for p in man["participants"]}
    opt = pq.read_table(run / "optimized", columns=["id", "participant", "own_target"])
    own = column_matrix(opt.column("own_target"))
    assert own.shape == (opt.num_rows, max(dims.values()))
    emb = {}
    for name in dims:
        t = pq.read_table(run / "embeddings" / name, columns=["id", "embedding", "error"])
        emb[name] = {i: e for i, e, err in zip(t.column("id").to_pylist(), column_matrix(t.column("embedding")),
                                               t.column("error").to_pylist()) if not err}
    for i, p, o in list(zip(opt.column("id").to_pylist(), opt.column("participant").to_pylist(), own))[::7]:
        np.testing.assert_allclose(o[:dims[p]], emb[p][i], rtol=1e-6)
        assert not o[dims[p]:].any()  # zero padding past the participant's width
    sh = pq.read_table(run / "shared_rows.parquet")
    owner = dict(zip(opt.column("id").to_pylist(), opt.column("participant").to_pylist()))
    want = {(i, n) for i in man["shared_ids"] for n in dims if owner[i] != n}
    got = list(zip(sh.column("id").to_pylist(), sh.column("participant").to_pylist()))
    assert set(got) == want and len(got) == len(want)  # S: every participant but the owner, once
    so = column_matrix(sh.column("own_target"))
    for (i, n), o in zip(got, so):
        np.testing.assert_allclose(o[:dims[n]], emb[n][i], rtol=1e-6)
    assert not column_matrix(sh.column("target")).any()
    img = dict(zip(pq.read_table(run / "optimized", columns=["id", "image"]).column("id").to_pylist(),
                   pq.read_table(run / "optimized", columns=["image"]).column("image").to_pylist()))
    assert all(b == img[i] for i, b in zip(sh.column("id").to_pylist(), sh.column("image").to_pylist()))


# ---------------------------------------------------------------- the train stage
def check_heads(run, m: dict, mode: str) -> None:
    """A train stage with ``student.heads: mode`` on RUN (its metrics ``m``): each head trained on its own rows and
    S, metrics.json says what each head learned, and the student loads back with its heads. (``both`` on two Ray
    Train workers, DDP with a ModuleDict of heads, is checked on tests/test_run.py's run.)"""
    man = json.loads((run / "manifest.json").read_text())
    names = [p["name"] for p in man["participants"]]
    owned = pq.read_table(run / "optimized", columns=["participant"]).column("participant").to_pylist()
    shared = pq.read_table(run / "shared_rows.parquet", columns=["participant"]).column("participant").to_pylist()
    assert m["heads_mode"] == mode and m["aligned_head"] == (mode == "both") and m["primary_head"] == man["best"]
    info = m["head_info"]
    assert set(info) == set(names)
    # every row of the epoch went to exactly one head (drop_last may leave a partial batch out)
    assert sum(i["rows"] for i in info.values()) == m["history"][-1]["images"]
    for n in names:
        avail = owned.count(n) + shared.count(n)
        assert 0 < info[n]["rows"] <= avail and np.isfinite(info[n]["loss"][-1])
        assert info[n]["target_dim"] == dict((p["name"], p["embed_dim"]) for p in man["participants"])[n]
    student, meta = load_student(run)
    x = torch.rand(2, 3, 32, 32)
    aligned, outs = student(x, all_heads=True)
    assert (aligned is not None) == (mode == "both") and set(outs) == set(names)
    assert student(x).shape[1] == meta["head_dim"]
    from coopt_ray.report import build_report

    page = build_report(run, log=lambda *_: None).read_text()
    assert "Student heads" in page and all(n in page for n in names)


@pytest.mark.slow
def test_train_stage_with_per_participant_heads(shared_optimized, tiny_models, tmp_path):
    """``per-participant`` (no aligned head) in the driver: each head trains on its own rows and S."""
    from conftest import copy_run, session_address, write_config
    from coopt_ray.config import load_config
    from coopt_ray.train import run_train

    run = copy_run(shared_optimized, tmp_path / "run")
    lines = []
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_models, student={
        "arch": ARCH, "epochs": 1, "batch_size": 50, "workers": 0, "heads": "per-participant"}))
    m = run_train(cfg, run, address=session_address(), log=lines.append)
    check_heads(run, m, "per-participant")
    assert any("[train] heads: per-participant" in ln for ln in lines)


def test_heads_setting_changes_what_training_depends_on_and_its_default_does_not(tmp_path, tiny_models):
    """Runs trained before student.heads existed keep their fingerprints: the default is left out of them."""
    import dataclasses

    from conftest import write_config
    from coopt_ray.config import load_config, student_view
    from coopt_ray.train import train_fingerprint

    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_models))
    assert "heads" not in student_view(dataclasses.asdict(cfg.student))
    assert "heads" not in cfg.fingerprint_view()["student"]
    man = {"fingerprint": "x"}
    fps = {train_fingerprint(dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, heads=h)), man)
           for h in ("aligned", "per-participant", "both")}
    assert len(fps) == 3


def test_rows_that_train_several_heads_sum_their_losses():
    """The benchmarks' form: own (N, K, D) and a mask (N, K). A row of S trains both heads: loss 0 on head 0 and
    2 on head 1 sums to 2; a row that trains head 0 only adds 0; mean over 2 rows is 1."""
    th = TorchHeads(_identity_heads([2, 2]), torch.device("cpu"))
    own = torch.tensor([[[1., 0.], [0., 1.]], [[1., 1.], [5., 5.]]])
    mask = torch.tensor([[True, True], [True, False]])
    outs = {"p0": own[:, 0], "p1": -own[:, 1]}  # head 1 is wrong on row 1 too, but row 1 does not train it
    loss, sums, counts = per_head_loss(outs, own, mask, th)
    assert loss.item() == pytest.approx(1.0, abs=1e-6)
    assert sums.tolist() == pytest.approx([0.0, 2.0], abs=1e-6) and counts.tolist() == [2.0, 1.0]
    m = moments_by_head(own.numpy(), np.array([[True, False], [True, True]]), ["p0", "p1"])
    assert m["p0"][0] == 2 and m["p1"][0] == 1
    np.testing.assert_allclose(m["p1"][1], [5.0, 5.0])  # head 1's statistics: row 1 only


def test_heads_on_a_run_merged_without_own_targets_fail_before_ray(shared_optimized, tiny_models, tmp_path,
                                                                      monkeypatch):
    """A RUN merged before student.heads existed has no own_target column: one clear error, no Ray started."""
    import shutil

    from conftest import forbid_ray_start, write_config
    from coopt_ray.config import load_config
    from coopt_ray.rundir import RunError
    from coopt_ray.train import run_train

    run = tmp_path / "run"
    (run / "optimized").mkdir(parents=True)
    shutil.copy(shared_optimized / "manifest.json", run / "manifest.json")
    t = pq.read_table(shared_optimized / "optimized").drop_columns(["own_target"])
    pq.write_table(t, run / "optimized" / "part-0.parquet")
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_models, student={"heads": "per-participant"}))
    forbid_ray_start(monkeypatch)
    with pytest.raises(RunError, match="needs each participant's own targets.*rerun `coopt optimize`"):
        run_train(cfg, run)


def test_a_participant_that_owns_no_rows_is_standardised_on_its_rows_of_s(tmp_path):
    """share: 0 (it embeds only S): its head's statistics come from RUN/shared_rows.parquet, the others' from their
    own rows in RUN/optimized; the transforms give each head's rows mean 0 and std 1."""
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    from conftest import write_config
    from coopt_ray.config import load_config
    from coopt_ray.rows import head_moments
    from coopt_ray.train import head_dims, student_heads

    rng = np.random.default_rng(1)
    run = tmp_path / "run"
    (run / "optimized").mkdir(parents=True)
    a, b = rng.normal(3.0, 2.0, size=(40, 4)), rng.normal(-1.0, 0.5, size=(12, 4))

    def rows(n, part, own):
        return pa.table({"id": [f"{part}/{i}" for i in range(n)], "participant": [part] * n,
                         "own_target": ArrowTensorArray.from_numpy(own.astype(np.float32))})
    pq.write_table(rows(40, "a", a), run / "optimized" / "part-0.parquet")
    pq.write_table(rows(12, "b", b), run / "shared_rows.parquet")
    cfg = load_config(write_config(tmp_path / "c.yaml", ["local-dir:/unused", "local-dir:/unused2"],
                                   participants=[{"name": "a", "model": "local-dir:/u"},
                                                 {"name": "b", "model": "local-dir:/v", "share": 0}],
                                   student={"heads": "per-participant"}))
    man = {"participants": [{"name": "a", "embed_dim": 4}, {"name": "b", "embed_dim": 4}], "best": "a"}
    dims = head_dims(cfg, man)
    t = student_heads(cfg, run, dims, head_moments(run / "optimized", dims), None, fdim=8)
    for k, x in enumerate((a, b)):
        z = (x - t.means[k]) @ t.projs[k]
        np.testing.assert_allclose(z.mean(0), 0, atol=1e-4)
        np.testing.assert_allclose(z.std(0), 1, atol=1e-3)


def test_row_moments_reads_the_aligned_and_every_heads_moments_in_one_pass_the_same_as_apart(tmp_path):
    """The train stage's one pass over the rows (rows.row_moments): the aligned targets' (n, mean, cov) and each
    participant's own-target moments equal, bit for bit, what a pass for each gives, with and without a subset."""
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    from coopt_ray.rows import head_moments, row_moments

    rng = np.random.default_rng(4)
    n = 300
    part = np.array(["a", "b", "c"])[rng.integers(0, 3, n)]
    own = rng.normal(2.0, 3.0, size=(n, 6)).astype(np.float32)
    for j in range(3):  # three files: the moments add up batch by batch
        sl = slice(100 * j, 100 * (j + 1))
        pq.write_table(pa.table({"id": [f"r{i}" for i in range(n)][sl], "participant": part[sl].tolist(),
                                 "target": ArrowTensorArray.from_numpy(rng.normal(size=(100, 5)).astype(np.float32)),
                                 "own_target": ArrowTensorArray.from_numpy(own[sl])}), tmp_path / f"p{j}.parquet")
    dims = {"a": 6, "b": 4, "c": 6}
    for keep in (None, frozenset(f"r{i}" for i in range(0, n, 3))):
        aligned, heads = row_moments(tmp_path, keep, dims)
        want = row_moments(tmp_path, keep)[0]  # a pass for the aligned targets alone
        assert aligned[0] == want[0] == (n if keep is None else len(keep))
        assert all(np.array_equal(x, y) for x, y in zip(aligned[1:], want[1:]))
        apart = head_moments(tmp_path, dims, keep)
        for name, d in dims.items():
            rows = (part == name) & (np.arange(n) % (1 if keep is None else 3) == 0)
            assert heads[name][0] == apart[name][0] == rows.sum() and heads[name][1].shape == (d,)
            assert all(np.array_equal(x, y) for x, y in zip(heads[name][1:], apart[name][1:]))
            np.testing.assert_allclose(heads[name][1], own[rows, :d].mean(0), rtol=1e-6, atol=1e-6)
    assert row_moments(tmp_path)[1] == {}  # aligned heads only: no per-participant pass
