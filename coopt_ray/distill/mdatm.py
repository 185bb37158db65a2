"""M-DATM's math (Zhou et al. 2024, on DATM, Guo et al. ICLR 2024, on MTT, Cazenavette et al. CVPR 2022): the
expert ConvNet, differentiable siamese augmentation, expert trajectories, the unrolled student and the normalised
trajectory-matching loss. Pure torch, no Ray; the stage that runs it on Ray is not built yet (issue 12).

- Experts: ConvNet depth 3, every block ``width`` wide, instance norm, ReLU, 2x2 average pooling, trained with plain
  SGD (lr 0.01, no momentum, batch 256) on DSA views; the flat parameter vector is kept after every epoch.
- Matching: from epoch t of a trajectory, N SGD steps on the synthetic set with a learnable step size give
  theta_hat; loss = ||theta_hat - theta*_(t+M)||^2 / ||theta*_t - theta*_(t+M)||^2.
- M-DATM: fixed hard labels in class order and cross-entropy (M1); start epochs drawn from [T-, U] with U growing
  from T to T+ (DATM's difficulty alignment) inside a narrow range, default (0, 20) (M2).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..convnet import ConvNet

DSA_TRANSFORMS = ("color", "crop", "cutout", "flip", "scale", "rotate")


def expert_net(num_classes: int, in_chans: int = 3, img_size: int = 32, width: int = 128, depth: int = 3) -> ConvNet:
    """MTT's expert and evaluation network."""
    return ConvNet(width=width, depth=depth, in_chans=in_chans, img_size=img_size, num_classes=num_classes,
                   norm="instance", double=False)


# ---------------------------------------------------------------- differentiable siamese augmentation
class DSA:
    """DSA (Zhao & Bilen 2021) as MTT uses it: one transform per call, drawn at random from colour, crop, cutout,
    flip, scale, rotate, with per-image parameters drawn from ``gen``; differentiable in the images. The same
    generator state gives the same views (the "siamese" part)."""

    def __init__(self, scale: float = 1.2, rotate_deg: float = 15.0, crop: float = 0.125, cutout: float = 0.5,
                 transforms=DSA_TRANSFORMS):
        self.scale, self.rotate, self.crop, self.cutout = scale, rotate_deg, crop, cutout
        self.transforms = tuple(transforms)

    def __call__(self, x: torch.Tensor, gen: torch.Generator, which: Optional[str] = None) -> torch.Tensor:
        which = which or self.transforms[int(torch.randint(len(self.transforms), (1,), generator=gen))]
        n = x.shape[0]

        def u(lo, hi, *shape):
            return (torch.rand(n, *shape, generator=gen) * (hi - lo) + lo).to(x)

        if which == "color":
            x = x + u(-0.5, 0.5, 1, 1, 1)
            m = x.mean(1, keepdim=True)
            x = (x - m) * u(0.0, 2.0, 1, 1, 1) + m
            m = x.mean((1, 2, 3), keepdim=True)
            return (x - m) * u(0.5, 1.5, 1, 1, 1) + m
        if which == "flip":
            return torch.where(u(0, 1, 1, 1, 1) < 0.5, x.flip(3), x)
        if which == "cutout":
            h, w = x.shape[2:]
            ch, cw = int(h * self.cutout + 0.5), int(w * self.cutout + 0.5)
            cy = torch.randint(0, h + 1 - ch % 2, (n, 1, 1), generator=gen).to(x.device)
            cx = torch.randint(0, w + 1 - cw % 2, (n, 1, 1), generator=gen).to(x.device)
            yy, xx = torch.arange(h, device=x.device).view(1, h, 1), torch.arange(w, device=x.device).view(1, 1, w)
            keep = ~(((yy - cy).abs() < ch / 2) & ((xx - cx).abs() < cw / 2))
            return x * keep.unsqueeze(1).to(x)
        theta = torch.zeros(n, 2, 3).to(x)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0
        if which == "scale":
            theta[:, 0, 0], theta[:, 1, 1] = u(1 / self.scale, self.scale), u(1 / self.scale, self.scale)
        elif which == "rotate":
            a = u(-1.0, 1.0) * math.radians(self.rotate)
            theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = a.cos(), -a.sin(), a.sin(), a.cos()
        elif which == "crop":  # a translation by up to ``crop`` of the image, as MTT's padded random crop
            theta[:, 0, 2], theta[:, 1, 2] = u(-2 * self.crop, 2 * self.crop), u(-2 * self.crop, 2 * self.crop)
        else:
            raise ValueError(f"unknown DSA transform {which!r} (known: {', '.join(DSA_TRANSFORMS)})")
        grid = F.affine_grid(theta, list(x.shape), align_corners=True)
        return F.grid_sample(x, grid, align_corners=True)


# ---------------------------------------------------------------- parameters as one flat vector
def flat_params(model: torch.nn.Module) -> torch.Tensor:
    """Every parameter of ``model`` in one detached 1-D tensor (the trajectory's storage form)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def unflatten(model: torch.nn.Module, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{name: view}`` of ``flat`` shaped like ``model``'s parameters, for ``functional_call`` (keeps the graph)."""
    total = sum(p.numel() for p in model.parameters())
    if total != flat.numel():
        raise ValueError(f"a flat vector of {flat.numel()} values for a model of {total} parameters")
    out, i = {}, 0
    for name, p in model.named_parameters():
        out[name] = flat[i:i + p.numel()].view_as(p)
        i += p.numel()
    return out


def unroll(model: torch.nn.Module, start: torch.Tensor, x_syn: torch.Tensor, y_syn: torch.Tensor,
           syn_lr: torch.Tensor, steps: int, batch: int, gen: torch.Generator,
           aug: Optional[DSA] = None) -> torch.Tensor:
    """N SGD steps of the student from ``start`` on (augmented) synthetic batches, differentiable in ``x_syn`` and
    ``syn_lr``: ``theta <- theta - syn_lr * grad CE(model_theta(aug(x_b)), y_b)``. Returns the last parameters."""
    theta = start.detach().clone().requires_grad_(True)
    n = x_syn.shape[0]
    order = torch.randperm(n, generator=gen).to(x_syn.device)  # drawn on the CPU: the same order on any device
    pos = 0
    for _ in range(steps):
        if pos >= n:
            order, pos = torch.randperm(n, generator=gen).to(x_syn.device), 0
        idx = order[pos:pos + batch]
        pos += batch
        x = x_syn[idx]
        if aug is not None:
            x = aug(x, gen)
        loss = F.cross_entropy(functional_call(model, unflatten(model, theta), (x,)), y_syn[idx])
        grad = torch.autograd.grad(loss, theta, create_graph=True)[0]
        theta = theta - syn_lr * grad
    return theta


def matching_loss(theta_hat: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``||theta_hat - target||^2 / ||start - target||^2``: 1 when the student ends where it started, 0 on target."""
    return ((theta_hat - target) ** 2).sum() / ((start - target) ** 2).sum().clamp_min(1e-12)


def start_bound(it: int, t: int, t_hi: int, expand_until: int) -> int:
    """DATM's upper bound U on the start epoch at iteration ``it``: T at first, growing linearly to T+ by
    iteration ``expand_until`` (0: T+ from the start)."""
    if expand_until <= 0:
        return t_hi
    return int(round(t + (t_hi - t) * min(1.0, it / expand_until)))


def hard_labels(classes: int, ipc: int) -> torch.Tensor:
    """M-DATM's fixed labels: ``ipc`` images per class, in class order (M1)."""
    return torch.arange(classes).repeat_interleave(ipc)


# ---------------------------------------------------------------- experts
def train_expert(images: torch.Tensor, labels: torch.Tensor, classes: int, epochs: int, seed: int, lr: float = 0.01,
                 batch: int = 256, width: int = 128, aug: Optional[DSA] = None, log=None,
                 device: Optional[torch.device] = None) -> list[torch.Tensor]:
    """One expert trajectory: the flat parameters at init and after each of ``epochs`` epochs of plain SGD on
    ``images`` (float NCHW, normalised) with DSA views, on ``device`` (default: the images'). Returns ``epochs + 1``
    vectors, on the CPU."""
    device = torch.device(device) if device is not None else images.device
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)  # a CPU generator: the same draws on any device
    model = expert_net(classes, images.shape[1], images.shape[2], width).to(device)
    images, labels = images.to(device), labels.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0)
    traj = [flat_params(model).cpu()]
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=gen).to(device)
        total, seen = torch.zeros((), dtype=torch.float64, device=device), 0  # summed on the device: no per-step sync
        for s in range(0, len(images), batch):
            idx = order[s:s + batch]
            x = images[idx]
            if aug is not None:
                x = aug(x, gen)
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, seen = total + loss.detach().double() * len(idx), seen + len(idx)
        traj.append(flat_params(model).cpu())
        if log:
            log(f"[mdatm] expert seed {seed}: epoch {epoch + 1}/{epochs}  loss {float(total) / max(seen, 1):.4f}")
    return traj


@torch.no_grad()
def correctly_classified(flat: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, classes: int, ipc: int,
                         seed: int, width: int = 128) -> torch.Tensor:
    """DATM's initialisation: per class, ``ipc`` indices of real images the expert with parameters ``flat``
    classifies correctly (a seeded draw; falls back to misclassified ones when a class has too few). The expert
    runs on ``flat``'s device; the indices come back on the CPU."""
    dev = flat.device
    model = expert_net(classes, images.shape[1], images.shape[2], width).to(dev).eval()
    pred = torch.cat([functional_call(model, unflatten(model, flat), (images[s:s + 512].to(dev),)).argmax(1).cpu()
                      for s in range(0, len(images), 512)])
    labels = labels.cpu()
    gen = torch.Generator().manual_seed(seed)
    out = []
    for c in range(classes):
        idx = (labels == c).nonzero().flatten()
        if len(idx) < ipc:
            raise ValueError(f"class {c} has {len(idx)} images, fewer than ipc = {ipc}")
        idx = idx[torch.randperm(len(idx), generator=gen)]
        ok = pred[idx] == c
        out.append(torch.cat([idx[ok], idx[~ok]])[:ipc])
    return torch.cat(out)


# ---------------------------------------------------------------- matching
class Matcher:
    """The synthetic set of M-DATM and its two optimizers: images ``x`` (SGD ``lr_img``, momentum 0.5) and the
    student's step size ``syn_lr`` (SGD ``lr_lr``, momentum 0.5, initialised to the experts' lr), with fixed hard
    labels (M1). ``step`` is one matching iteration against a randomly drawn expert and start epoch."""

    def __init__(self, x: torch.Tensor, labels: torch.Tensor, classes: int, lr_img: float, lr_lr: float,
                 lr_init: float = 0.01, width: int = 128, bounds: Optional[tuple] = None):
        self.x = x.detach().clone().requires_grad_(True)
        self.labels = labels.clone()
        self.syn_lr = torch.tensor(float(lr_init), device=x.device, requires_grad=True)  # on the unroll's device
        self.model = expert_net(classes, x.shape[1], x.shape[2], width).to(x.device)
        self.bounds = bounds  # per-channel (lo, hi) the images are kept in: the valid pixel range, normalised
        self.opt_img = torch.optim.SGD([self.x], lr=lr_img, momentum=0.5)
        self.opt_lr = torch.optim.SGD([self.syn_lr], lr=lr_lr, momentum=0.5)

    def step(self, trajectories: list, it: int, gen: torch.Generator, *, syn_steps: int, expert_steps: int,
             t_lo: int, t: int, t_hi: int, expand_until: int, batch_syn: int, aug: Optional[DSA]) -> dict:
        """One iteration: start epoch in [T-, U(it)], N unrolled steps from it, the normalised distance to the
        expert ``expert_steps`` epochs later; updates images and step size. Returns the loss and the draw."""
        hi = start_bound(it, t, t_hi, expand_until)
        start_ep = int(torch.randint(t_lo, hi + 1, (1,), generator=gen))
        e = int(torch.randint(len(trajectories), (1,), generator=gen))
        traj = trajectories[e]
        if start_ep + expert_steps >= len(traj):
            raise ValueError(f"expert {e} has {len(traj) - 1} epochs; start {start_ep} + M {expert_steps} needs more "
                             "(train experts for T+ + M epochs)")
        start, target = traj[start_ep], traj[start_ep + expert_steps]
        theta = unroll(self.model, start, self.x, self.labels, self.syn_lr, syn_steps, batch_syn, gen, aug)
        loss = matching_loss(theta, start, target)
        self.opt_img.zero_grad(set_to_none=True)
        self.opt_lr.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_img.step()
        self.opt_lr.step()
        with torch.no_grad():
            self.syn_lr.clamp_(min=1e-6)  # a negative step size would ascend the student's loss
            if self.bounds is not None:
                self.x.copy_(torch.maximum(torch.minimum(self.x, self.bounds[1]), self.bounds[0]))
        return {"loss": float(loss.detach()), "start_epoch": start_ep, "expert": e, "syn_lr": float(self.syn_lr.detach())}

    def state_dict(self) -> dict:
        """A copy (optimizer momentum included) that later steps do not change: tensors only, for weights_only loads."""
        import copy

        return copy.deepcopy({"x": self.x.detach(), "labels": self.labels, "syn_lr": self.syn_lr.detach(),
                              "opt_img": self.opt_img.state_dict(), "opt_lr": self.opt_lr.state_dict()})

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.x.copy_(state["x"])
            self.syn_lr.copy_(state["syn_lr"])
        self.labels = state["labels"].clone()
        self.opt_img.load_state_dict(state["opt_img"])
        self.opt_lr.load_state_dict(state["opt_lr"])


# ---------------------------------------------------------------- the challenge's scorer
def score_synthetic(x: torch.Tensor, y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, classes: int,
                    epochs: int, seed: int, width: int = 128, lr: float = 0.01, batch: int = 256) -> float:
    """Test accuracy of a fresh ConvNet-3 trained on ``(x, y)`` as the ECCV 2024 challenge scores a synthetic set:
    SGD (momentum 0.9, weight decay 5e-4), lr / 10 at half the epochs, DSA views, cross-entropy."""
    torch.manual_seed(seed)
    gen, aug = torch.Generator().manual_seed(seed), DSA()
    model = expert_net(classes, x.shape[1], x.shape[2], width).to(x.device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [epochs // 2], 0.1)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for s in range(0, len(x), batch):
            idx = order[s:s + batch]
            loss = F.cross_entropy(model(aug(x[idx], gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(test_x[s:s + 1024]).argmax(1) == test_y[s:s + 1024]).sum())
                   for s in range(0, len(test_x), 1024))
    return hits / len(test_x)
