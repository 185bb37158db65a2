"""KRR-ST (Lee et al., ICLR 2024): the kernel-ridge-regression loss, the synthetic set, the ConvNet model pool,
and the Ray Train loop that learns the synthetic images and targets.

One outer step on every worker: take a pool model (eval mode), a batch of real rows with their standardised
targets (un-augmented: a target belongs to the un-augmented image), features ``f`` with a ones column,
``K_rs = f_r f_s^T``, ``K_ss = f_s f_s^T``, ``lambda = 1e-6 trace(K_ss)`` and
``loss = mse(K_rs (K_ss + lambda I)^-1 Y_s, Y_r)``. The gradients reach only ``X_s`` and ``Y_s``; with several
workers the synthetic set is wrapped in DDP, so its gradients are averaged over every worker's pool model and
real batch. Then the pool model takes one full-batch SGD step on ``mse(model(X_s), Y_s)``.

Pool resets: a model is re-initialised after ``pool_steps`` SGD steps of its own, and its counter restarts
(the released code never restarts it, so after ~10k steps its pool is freshly initialised networks every
step: ``pool_steps: 0`` reproduces that). Counters start staggered (a seeded draw in ``[0, pool_steps)``) so
resets are spread over time; the models themselves start untrained (the released code first trains each for
that many steps, which costs more than a CPU run can spend).
"""
from __future__ import annotations

import time
import numpy as np
import torch
import torch.nn.functional as F

from ..convnet import ConvNet
from ..devices import autocast, cuda_speed_habits, reduce_sums, train_device
from ..augment import normalize_pixels, random_pad_crop_flip, to_float_nchw
from ..student import report_checkpoint, resume_state

RIDGE = 1e-6                 # lambda = RIDGE * trace(K_ss), as released
SHUFFLE_BUFFER = 2048


# ---------------------------------------------------------------- the math
def _ones(f: torch.Tensor) -> torch.Tensor:
    return torch.cat([f, torch.ones(len(f), 1, dtype=f.dtype, device=f.device)], 1)


def krr_weights(f_syn: torch.Tensor, y_syn: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
    """``(K_ss + lambda I)^-1 Y_s`` with a ones column appended to the features and ``lambda = ridge * trace(K_ss)``."""
    fs = _ones(f_syn)
    k_ss = fs @ fs.T
    eye = torch.eye(len(fs), dtype=fs.dtype, device=fs.device)
    return torch.linalg.solve(k_ss + ridge * torch.trace(k_ss) * eye, y_syn)


def krr_predict(f_real: torch.Tensor, f_syn: torch.Tensor, y_syn: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
    """Kernel ridge regression from the synthetic rows to the real ones: ``K_rs (K_ss + lambda I)^-1 Y_s``, with a
    ones column appended to both feature matrices and ``lambda = ridge * trace(K_ss)``."""
    return (_ones(f_real) @ _ones(f_syn).T) @ krr_weights(f_syn, y_syn, ridge)


def krr_loss(f_real: torch.Tensor, f_syn: torch.Tensor, y_real: torch.Tensor, y_syn: torch.Tensor,
             ridge: float = RIDGE) -> torch.Tensor:
    """KRR-ST's outer loss: the mean squared error of :func:`krr_predict` against the real targets."""
    return F.mse_loss(krr_predict(f_real, f_syn, y_syn, ridge), y_real)


class SyntheticSet(torch.nn.Module):
    """The learnable rows: images ``x`` (M, C, S, S) in [0, 1] pixel space, C = 3 or 1 (one grey plane, shown to the
    pool as RGB), and standardised targets ``y`` (M, d). ``forward()`` returns the normalised RGB images and the
    targets (so DDP sees every parameter used)."""

    def __init__(self, x0: np.ndarray, y0: np.ndarray):
        super().__init__()
        self.x = torch.nn.Parameter(torch.tensor(np.array(x0, dtype=np.float32)))
        self.y = torch.nn.Parameter(torch.tensor(np.array(y0, dtype=np.float32)))

    def rgb(self) -> torch.Tensor:
        return self.x.expand(-1, 3, -1, -1) if self.x.shape[1] == 1 else self.x

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return normalize_pixels(self.rgb()), self.y


def linear_lr(lr: float, final: float, step: int, steps: int) -> float:
    """The learning rate of outer step ``step`` (0-based): linear from ``lr`` to ``final * lr`` over ``steps``
    (as LinearLR; computed from the step, so a run resumed with more ``steps`` follows the new schedule)."""
    return lr * (1.0 + (final - 1.0) * min(step, steps) / max(1, steps))


def random_walk_floor(lr: float, final: float, steps: int, stop: int) -> float:
    """``sqrt(sum of lr_t^2)`` over outer steps ``0 .. stop-1`` of the :func:`linear_lr` schedule: how far Adam,
    which moves every coordinate by about ``lr_t`` a step whatever the gradient, drifts a pixel (or a standardised
    target) by pure noise. A distillation whose rows move no further than this has learned nothing visible."""
    n = min(stop, steps + 1)  # steps 0 .. n-1 decay linearly, lr_t = a + b t; later ones stay at lr * final
    a, b = lr, lr * (final - 1.0) / max(1, steps)
    ramp = n * a * a + a * b * n * (n - 1) + b * b * (n - 1) * n * (2 * n - 1) / 6  # closed form: O(1) per log line
    return float(np.sqrt(max(ramp, 0.0) + max(stop - n, 0) * (lr * final) ** 2))


def heldout_krr_loss(x_syn: torch.Tensor, y_syn: torch.Tensor, x_real: torch.Tensor, y_real: torch.Tensor,
                     models: int = 20, width: int = 16, seed: int = 0, batch: int = 1024) -> list[float]:
    """The KRR loss of a synthetic set (``x_syn`` normalised RGB, ``y_syn`` standardised) on real rows it never
    drew, under ``models`` freshly initialised pool ConvNets (seeded: the same networks for every set compared),
    one loss per network. Fresh networks leave out what a trained pool learned about X_s."""
    out = []
    for k in range(models):
        torch.manual_seed(seed * 1_000_003 + k)
        net = ConvNet(width, 3, 3, int(x_syn.shape[-1]), num_classes=int(y_syn.shape[1])).eval()
        with torch.no_grad():
            fs = net.features(x_syn).float()
            alpha, fs1 = krr_weights(fs, y_syn.float()), _ones(fs)
            err, n = 0.0, 0
            for i in range(0, len(x_real), batch):
                pred = (_ones(net.features(x_real[i:i + batch]).float()) @ fs1.T) @ alpha
                err += float(((pred - y_real[i:i + batch].float()) ** 2).sum())
                n += pred.numel()
        out.append(err / n)
    return out


# ---------------------------------------------------------------- the model pool
class ModelPool:
    """``n`` ConvNets with a linear head onto the target space, each trained one full-batch SGD step after each
    use and re-initialised after ``reset`` steps of its own (``reset == 0``: a fresh network at every use)."""

    def __init__(self, n: int, width: int, image_size: int, out_dim: int, reset: int, lr: float, seed: int,
                 device: torch.device):
        self.width, self.size, self.out_dim, self.reset, self.lr = width, image_size, out_dim, reset, lr
        self.device = device
        self.gen = torch.Generator().manual_seed(seed)
        self.models = [self._fresh() for _ in range(n)]
        self.opts = [self._sgd(m) for m in self.models]
        self.age = [int(torch.randint(0, max(1, reset), (1,), generator=self.gen)) for _ in range(n)]
        self.resets = 0

    def _fresh(self) -> ConvNet:
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=self.gen)))
        return ConvNet(self.width, 3, 3, self.size, num_classes=self.out_dim).to(self.device)

    def _sgd(self, m: ConvNet) -> torch.optim.Optimizer:
        return torch.optim.SGD(m.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-3)

    def get(self, i: int) -> ConvNet:
        """Model ``i`` (re-initialised first when it is due), in eval mode with its parameters frozen."""
        if self.reset == 0 or self.age[i] >= self.reset:
            self.models[i], self.age[i] = self._fresh(), 0
            self.opts[i] = self._sgd(self.models[i])
            self.resets += 1
        m = self.models[i].eval()
        m.requires_grad_(False)
        return m

    def train_step(self, i: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One full-batch SGD step of model ``i`` on ``mse(model(x), y)`` (x normalised, both detached); returns the
        loss as a tensor on the model's device (no host sync)."""
        if self.reset == 0:
            return torch.tensor(float("nan"))  # retired at its next use anyway
        m = self.models[i].train()
        m.requires_grad_(True)
        loss = F.mse_loss(m(x), y)
        self.opts[i].zero_grad(set_to_none=True)
        loss.backward()
        self.opts[i].step()
        self.age[i] += 1
        return loss.detach()


# ---------------------------------------------------------------- the Ray Train loop
def _real_batches(shard, batch: int, seed: int, rank: int, device, mean: torch.Tensor, scale: torch.Tensor,
                  augment: bool = False):
    """Endless (normalised image, standardised target) batches from this worker's shard, reshuffled every pass;
    ``augment``: each image padded-cropped and flipped (its target stays the clean image's)."""
    n, gen = 0, torch.Generator().manual_seed(seed * 7_001 + rank)
    while True:
        got = 0
        for b in shard.iter_torch_batches(batch_size=batch, drop_last=True,
                                          dtypes={"image": torch.uint8, "target": torch.float32},
                                          local_shuffle_buffer_size=SHUFFLE_BUFFER,
                                          local_shuffle_seed=seed * 100_003 + n * 1_009 + rank):
            got += 1
            x = to_float_nchw(b["image"].to(device))
            x = random_pad_crop_flip(x, gen) if augment else x
            yield normalize_pixels(x), (b["target"].to(device) - mean) * scale
        if got == 0:
            raise RuntimeError(f"no full real batch of {batch} rows on worker {rank}; lower distill.real_batch")
        n += 1


def distill_loop_per_worker(config: dict) -> dict:
    """Learn the synthetic set on this worker; checkpoints every ``checkpoint_every`` steps (rank 0 writes them).

    ``config``: x0 (M,C,S,S) floats in [0,1] (C = 3, or 1 for a grey X_s), y0 (M,d) standardised, target_mean,
    target_scale (d), steps, lr, lr_final, real_batch (per worker), pool (models on this worker: list by rank),
    pool_width, pool_steps, pool_lr, seed, fingerprint, checkpoint_every, log_every; optional real_augment,
    threads, use_gpu, amp, checkpoint_root, local_checkpoint_dir (in-process runs), log.

    Every history entry also says how far X_s and Y_s have moved from where they started (``x_drift``: mean
    absolute pixel change, of 255; ``y_drift``: mean absolute change in target standard deviations) beside the
    random-walk floor for the steps so far (``floor``, in the same units: :func:`random_walk_floor`).
    """
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    device = train_device(bool(config.get("use_gpu")), "distill.use_gpu")
    cuda_speed_habits(device)
    amp = config.get("amp", "auto")
    seed, steps = int(config["seed"]), int(config["steps"])
    synth = SyntheticSet(config["x0"], config["y0"])
    state, resume_dir = resume_state(ray.train.get_checkpoint(), config)
    start, history = 0, []
    if state is not None:
        synth.load_state_dict(state["model"])
        start, history = int(state["epoch"]) + 1, list(state.get("history", []))
    if world > 1:
        import ray.train.torch as rtt

        model = rtt.prepare_model(synth)
    else:
        model = synth.to(device)
    params = model.module if hasattr(model, "module") else model
    opt = torch.optim.AdamW([params.x, params.y], lr=float(config["lr"]), weight_decay=0.0)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        if rank == 0 and config.get("log", True):
            _say(f"[distill] resumed after step {start} from {resume_dir}")
    n_pool = int(config["pool"][rank])
    pool = ModelPool(n_pool, int(config["pool_width"]), int(params.x.shape[-1]), int(params.y.shape[1]),
                     int(config["pool_steps"]), float(config["pool_lr"]), seed * 7_919 + rank * 104_729 + start,
                     device)
    mean = torch.as_tensor(np.asarray(config["target_mean"], dtype=np.float32), device=device)
    scale = torch.as_tensor(np.asarray(config["target_scale"], dtype=np.float32), device=device)
    real = _real_batches(ray.train.get_dataset_shard("train"), int(config["real_batch"]), seed + start, rank, device,
                         mean, scale, bool(config.get("real_augment")))
    x0 = torch.as_tensor(np.asarray(config["x0"], dtype=np.float32), device=device)
    y0 = torch.as_tensor(np.asarray(config["y0"], dtype=np.float32), device=device)
    lr0, lr_end = float(config["lr"]), float(config["lr_final"])
    every, log_every = int(config["checkpoint_every"]), int(config["log_every"])
    extra = {"fingerprint": config.get("fingerprint"), "target_mean": mean.cpu(), "target_scale": scale.cpu()}
    t0, window, window_n = time.time(), torch.zeros((), dtype=torch.float64, device=device), 0
    for step in range(start, steps):
        xr, yr = next(real)
        i = step % n_pool
        net = pool.get(i)
        xs, ys = model()
        with autocast(amp, device):  # the features may run in bf16; the kernel ridge regression runs in fp32
            with torch.no_grad():
                fr = net.features(xr)
            fs = net.features(xs)
        loss = krr_loss(fr.float(), fs.float(), yr, ys)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        lr = linear_lr(float(config["lr"]), float(config["lr_final"]), step, steps)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        with torch.no_grad():
            params.x.clamp_(0.0, 1.0)  # stays an image: the Parquet stores it as PNG
        pool.train_step(i, normalize_pixels(params.rgb().detach()), params.y.detach())
        window += loss.detach().double()  # summed on the device; reduced once per log line, not per step
        window_n += 1
        last = step + 1 == steps
        if (step + 1) % log_every == 0 or last:
            total = reduce_sums([window], device, world)[0]
            dt = time.time() - t0
            floor = random_walk_floor(lr0, lr_end, steps, step + 1)
            with torch.no_grad():  # one host sync per log line, as for the loss
                drift = torch.stack([(params.x - x0).abs().mean() * 255.0, (params.y - y0).abs().mean()]).tolist()
            history.append({"step": step + 1, "loss": total / (world * window_n), "seconds": round(dt, 3),
                            "steps_per_s": round(window_n / max(dt, 1e-9), 3), "pool_resets": pool.resets,
                            "x_drift": round(drift[0], 4), "y_drift": round(drift[1], 5),
                            "floor": round(floor, 6), "floor_pixels": round(255.0 * floor, 4)})
            if rank == 0 and config.get("log", True):
                _say(f"[distill] step {step + 1}/{steps}  loss {history[-1]['loss']:.4f}  "
                     f"{history[-1]['steps_per_s']:.2f} steps/s  lr {lr:.2e}")
            t0, window, window_n = time.time(), torch.zeros((), dtype=torch.float64, device=device), 0
        if (step + 1) % every == 0 or last:
            metrics = {"step": step + 1, "loss": history[-1]["loss"] if history else float("nan")}
            report_checkpoint(config, rank, f"checkpoint_epoch_{step:06d}", metrics, params, opt, step, history, extra)
    return {"start_step": start, "history": history}


def _say(line: str) -> None:
    import sys

    sys.stdout.write(line + "\n")
    sys.stdout.flush()

