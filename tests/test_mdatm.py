"""M-DATM's math (coopt_ray/distill/mdatm.py), against known answers: the normalised matching loss by hand, the
unrolled student against explicit SGD steps and its step-size gradient against finite differences, DSA views
(reproducible per seed, differentiable), DATM's start-epoch bound, and a tiny expert that learns."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from coopt_ray.distill.mdatm import (DSA, DSA_TRANSFORMS, Matcher, correctly_classified, expert_net, flat_params, hard_labels,
                                     matching_loss, start_bound, train_expert, unflatten, unroll)


def test_matching_loss_by_hand():
    start, target = torch.tensor([0.0, 0.0, 0.0]), torch.tensor([3.0, 4.0, 0.0])
    assert float(matching_loss(torch.tensor([3.0, 0.0, 0.0]), start, target)) == pytest.approx(16 / 25)
    assert float(matching_loss(start, start, target)) == 1.0 and float(matching_loss(target, start, target)) == 0.0


def _tiny(seed=0):
    torch.manual_seed(seed)
    model = expert_net(3, in_chans=1, img_size=8, width=4).double()
    x = torch.randn(7, 1, 8, 8, dtype=torch.float64)
    y = hard_labels(3, 3)[:7]
    return model, x, y


def test_unroll_equals_explicit_sgd_steps_and_its_lr_gradient_matches_finite_differences():
    model, x, y = _tiny()
    start, lr = flat_params(model), 0.05
    out = unroll(model, start, x, y, torch.tensor(lr, dtype=torch.float64), steps=4, batch=3,
                 gen=torch.Generator().manual_seed(5))
    # The same batches (the same generator draws: a permutation, refreshed when used up) with torch.optim.SGD.
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(5)
    order, pos = torch.randperm(7, generator=gen), 0
    for _ in range(4):
        if pos >= 7:
            order, pos = torch.randperm(7, generator=gen), 0
        idx = order[pos:pos + 3]
        pos += 3
        opt.zero_grad()
        F.cross_entropy(ref(x[idx]), y[idx]).backward()
        opt.step()
    assert torch.allclose(out, flat_params(ref), atol=1e-10)

    target = start + 0.01 * torch.randn(start.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def loss_at(v, xs=x):
        t = torch.tensor(v, dtype=torch.float64, requires_grad=True)
        xs = xs.clone().requires_grad_(True)
        loss = matching_loss(unroll(model, start, xs, y, t, 4, 3, torch.Generator().manual_seed(5)), start, target)
        loss.backward()
        return float(loss.detach()), float(t.grad), xs.grad

    val, g, gx = loss_at(lr)
    eps = 1e-5
    fd = (loss_at(lr + eps)[0] - loss_at(lr - eps)[0]) / (2 * eps)
    assert g == pytest.approx(fd, rel=1e-4) and g != 0
    assert gx.abs().sum() > 0  # the images get a gradient through every unrolled step


def test_unflatten_rejects_a_vector_of_the_wrong_size():
    model, _, _ = _tiny()
    flat = flat_params(model)
    assert torch.equal(unflatten(model, flat)["head.bias"], model.head.bias.detach())
    with pytest.raises(ValueError, match="parameters"):
        unflatten(model, flat[:-1])


@pytest.mark.parametrize("which", DSA_TRANSFORMS)
def test_dsa_views_are_reproducible_and_differentiable(which):
    x = torch.rand(5, 3, 16, 16, requires_grad=True)
    aug = DSA()
    a = aug(x, torch.Generator().manual_seed(3), which)
    b = aug(x, torch.Generator().manual_seed(3), which)
    c = aug(x, torch.Generator().manual_seed(4), which)
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    (a * torch.randn_like(a)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    if which == "flip":
        for i in range(5):
            assert torch.equal(a[i], x[i]) or torch.equal(a[i], x[i].flip(2))


def test_start_bound_grows_from_t_to_t_plus():
    assert [start_bound(i, 10, 20, 100) for i in (0, 50, 100, 500)] == [10, 15, 20, 20]
    assert start_bound(0, 10, 20, 0) == 20
    assert hard_labels(3, 2).tolist() == [0, 0, 1, 1, 2, 2]


def test_a_tiny_expert_learns_and_initialises_from_correct_images():
    torch.manual_seed(0)
    y = torch.arange(2).repeat(60)
    x = torch.randn(120, 1, 8, 8) * 0.3 + (y.view(-1, 1, 1, 1) * 2 - 1) * 0.8  # class = brightness
    traj = train_expert(x, y, classes=2, epochs=3, seed=0, lr=0.05, batch=16, width=4)
    assert len(traj) == 4 and not torch.equal(traj[0], traj[-1])
    model = expert_net(2, 1, 8, 4).eval()

    def acc(flat):
        from torch.func import functional_call
        with torch.no_grad():
            return float((functional_call(model, unflatten(model, flat), (x,)).argmax(1) == y).float().mean())

    assert acc(traj[-1]) > 0.9 and acc(traj[-1]) > acc(traj[0])
    idx = correctly_classified(traj[-1], x, y, classes=2, ipc=5, seed=0, width=4)
    assert y[idx].tolist() == [0] * 5 + [1] * 5 and len(set(idx.tolist())) == 10
    with pytest.raises(ValueError, match="fewer than ipc"):
        correctly_classified(traj[-1], x, y, classes=2, ipc=61, seed=0, width=4)


def test_matching_iterations_pull_the_student_towards_the_expert_and_checkpoint_round_trip():
    torch.manual_seed(0)
    y = torch.arange(2).repeat(40)
    x = torch.randn(80, 1, 8, 8) * 0.3 + (y.view(-1, 1, 1, 1) * 2 - 1) * 0.8
    trajs = [train_expert(x, y, classes=2, epochs=4, seed=s, lr=0.05, batch=16, width=4) for s in range(2)]
    idx = correctly_classified(trajs[0][-1], x, y, classes=2, ipc=3, seed=0, width=4)
    # One expert and one start epoch, the whole synthetic set in every unrolled batch: each iteration descends the
    # same matching loss, so it must fall (on any CPU; a mix of draws at a large lr is too noisy to show it: the
    # loss of 30 such steps ended 7 % below and 14 % above where it started on two machines).
    m = Matcher(x[idx], y[idx], classes=2, lr_img=0.1, lr_lr=1e-5, lr_init=0.05, width=4)
    kw = dict(syn_steps=6, expert_steps=2, t_lo=0, t=0, t_hi=0, expand_until=10, batch_syn=6, aug=None)

    def fixed_draw():  # the matching loss from the one start the steps draw, the same batches each time
        return float(matching_loss(unroll(m.model, trajs[0][0], m.x, m.labels, m.syn_lr, 6, 6,
                                          torch.Generator().manual_seed(0)), trajs[0][0], trajs[0][2]).detach())

    before = fixed_draw()
    gen = torch.Generator().manual_seed(0)
    steps = [m.step(trajs[:1], it, gen, **kw) for it in range(20)]
    assert all(r["expert"] == 0 and r["start_epoch"] == 0 and 0 < r["loss"] < 10 for r in steps)
    assert fixed_draw() < 0.8 * before  # the images learn to reproduce the expert's progress (0.509 -> 0.26)
    assert not torch.equal(m.x.detach(), x[idx]) and torch.equal(m.labels, y[idx])
    state = m.state_dict()
    m2 = Matcher(x[idx], y[idx], classes=2, lr_img=1.0, lr_lr=1e-5, lr_init=0.05, width=4)
    m2.load_state_dict(state)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    torch.manual_seed(1)
    a = m.step(trajs, 30, g1, **kw)
    torch.manual_seed(1)
    b = m2.step(trajs, 30, g2, **kw)
    assert a == b and torch.equal(m.x, m2.x)  # a resumed matcher continues exactly
    with pytest.raises(ValueError, match="T\\+ \\+ M"):
        m.step(trajs, 0, gen, **{**kw, "expert_steps": 5})


def test_experts_train_as_ray_tasks_and_a_rerun_redoes_only_unfinished_ones(tmp_path, ray_session):
    from coopt_ray.distill.mdatm_experts import DONE, TRAJ, load_trajectories, run_experts

    torch.manual_seed(0)
    y = torch.arange(2).repeat(50)
    x = torch.randn(100, 1, 8, 8)
    kw = dict(classes=2, out_dir=tmp_path / "experts", experts=2, epochs=2, fingerprint="f1", lr=0.05, batch=20,
              width=4, log=lambda s: None)
    metas = run_experts(x, y, **kw)
    assert [m["expert"] for m in metas] == [0, 1] and all(m["epochs"] == 2 for m in metas)
    trajs = load_trajectories(tmp_path / "experts", 2)
    assert [tuple(t.shape) for t in trajs] == [(3, metas[0]["parameters"])] * 2 and not torch.equal(trajs[0], trajs[1])
    t0 = (tmp_path / "experts" / TRAJ.format(0)).stat().st_mtime_ns
    (tmp_path / "experts" / DONE.format(1)).unlink()  # expert 1 was killed before its marker
    lines = []
    run_experts(x, y, **{**kw, "log": lines.append})
    assert "experts [0] already done; training [1]" in lines[0]
    assert (tmp_path / "experts" / TRAJ.format(0)).stat().st_mtime_ns == t0
    assert torch.equal(load_trajectories(tmp_path / "experts", 2)[1], trajs[1])  # seeded: the same trajectory
    lines.clear()
    run_experts(x, y, **{**kw, "fingerprint": "f2", "log": lines.append})  # another config: every expert again
    assert not any("already done" in s for s in lines)


@pytest.mark.parametrize("which,kw", [("scale", {"scale": 1.0}), ("crop", {"crop": 0.0}), ("rotate", {"rotate_deg": 0.0})])
def test_dsa_identity_settings_leave_images_unchanged(which, kw):
    """Known answers: scale 1, crop 0 and a 0-degree rotation are the identity map (align_corners grid)."""
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    y = DSA(**kw)(x, torch.Generator().manual_seed(1), which=which)
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)
    assert not torch.allclose(DSA()(x, torch.Generator().manual_seed(1), which=which), x, atol=1e-3)  # control
