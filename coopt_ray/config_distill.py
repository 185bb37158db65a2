"""The ``distill:`` section of the YAML schema: KRR-ST (unlabeled, on RUN/optimized) and M-DATM (labeled)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from .errors import ConfigError

DISTILL_METHODS = ("krr-st", "mdatm")
COMMON_KEYS = ("method", "workers", "use_gpu", "cpus_per_worker", "checkpoint_every", "log_every")
AMP_MODES = ("auto", "bf16", "off")   # auto: bf16 autocast on CUDA, none on the CPU (CPU results do not move)
KRR_KEYS = ("size", "steps", "lr", "lr_final", "real_batch", "pool_size", "pool_width", "pool_steps", "pool_lr")
KRR_LATER_DEFAULTS = {"real_augment": False, "channels": 3}  # in krr-st's view only when changed (fingerprints stay)
CHANNELS = (1, 3, "auto")


@dataclass(frozen=True)
class DistillConfig:
    """KRR-ST (Lee et al., ICLR 2024) on RUN/optimized; defaults are the paper's except ``steps`` (160,000).
    M-DATM (Zhou et al. 2024) on labeled images; defaults are DATM's CIFAR-10 IPC 10 ones, range (0, 20)."""
    method: str = "krr-st"       # krr-st (unlabeled, on RUN/optimized) | mdatm (labeled images)
    size: int = 1000             # M synthetic rows, initialised from M real rows of RUN/optimized
    steps: int = 2000            # outer steps
    lr: float = 1.0e-4           # AdamW on the synthetic images and targets (weight decay 0)
    lr_final: float = 1.0e-3     # LinearLR end factor over ``steps``
    real_batch: int = 1024       # real rows per step (split over the workers)
    pool_size: int = 10          # ConvNets in the model pool (split over the workers)
    pool_width: int = 128        # ConvNet widths width-2width-4width (the paper's 128-256-512)
    pool_steps: int = 1000       # a pool model is re-initialised after this many SGD steps of its own
    pool_lr: float = 0.1         # the pool models' full-batch SGD on (X_s, Y_s)
    real_augment: bool = False   # random crop (4 px zero padding) and horizontal flip of each real batch, as released
    channels: int | str = 3      # X_s channels: 3 | 1 (one grey plane, shown to the pool as RGB) | auto (1 when every
                                 # starting row is grey)
    workers: int = 1             # Ray Train workers (krr-st); 0 = in-process
    use_gpu: bool = False        # krr-st: per Ray Train worker; mdatm: one GPU per expert / matching task
    cpus_per_worker: Optional[float] = None  # mdatm: CPUs per expert / scorer task (default 1)
    gpu_fraction: float = 0.25   # mdatm with use_gpu: the GPU share of each expert and scorer task (small nets: 4 per
                                 # GPU run at once); the matching task takes a whole GPU
    amp: str = "auto"            # krr-st: bf16 autocast for the pool models' features (auto: on CUDA only) | bf16 | off
    checkpoint_every: int = 100  # outer steps (mdatm: iterations) between checkpoints
    log_every: int = 20          # outer steps (mdatm: iterations) between progress lines
    # ---- M-DATM (method: mdatm): labeled images -> ipc images per class, hard labels in class order
    ipc: int = 10                # synthetic images per class
    labeled_path: Optional[str] = None   # a labeled folder / Parquet; default the Fashion-MNIST train split
    labeled_limit: Optional[int] = None  # a seeded random subset of the labeled images
    experts: int = 10            # E expert trajectories, one Ray task each
    expert_epochs: Optional[int] = None  # default T+ + expert_steps, the last epoch matching can reach
    expert_lr: float = 0.01      # the experts' SGD (no momentum); also the synthetic step size's start
    expert_batch: int = 256      # the experts' batch size
    width: int = 128             # the ConvNet-3 of the experts, the matching and the scorer
    syn_steps: int = 80          # N unrolled student steps per iteration
    expert_steps: int = 2        # M expert epochs the N steps must cover
    range: tuple = (0, 20)       # [T-, T+]: start epochs (M-DATM's narrow range); a YAML list becomes a tuple
    range_start: Optional[int] = None    # T, the start bound U's first value (default the middle of range)
    range_grow: Optional[int] = None     # iterations over which U grows from T to T+ (default iterations // 2)
    iterations: int = 5000       # matching iterations (raising it continues a finished run)
    lr_img: float = 100.0        # SGD (momentum 0.5) on the synthetic images
    lr_lr: float = 1.0e-5        # SGD (momentum 0.5) on the synthetic step size
    batch_syn: Optional[int] = None      # synthetic images per unrolled step (default all of them)
    eval_runs: int = 3           # the scorer: fresh ConvNet-3s trained on the synthetic set, averaged
    eval_epochs: int = 1000      # the scorer's epochs (lr / 10 at half)

    def __post_init__(self):
        if isinstance(self.range, list):  # keep the config hashable, as a frozen dataclass should be
            object.__setattr__(self, "range", tuple(self.range))


def distill_view(d: DistillConfig) -> dict:
    """The keys the configured method reads (krr-st's view is the section as it was before mdatm existed, so
    existing runs keep their fingerprints)."""
    full = dataclasses.asdict(d)
    if d.method == "krr-st":
        return {**{k: full[k] for k in COMMON_KEYS + KRR_KEYS},
                **{k: full[k] for k, v in KRR_LATER_DEFAULTS.items() if full[k] != v}}
    return {k: v for k, v in full.items()
            if k not in KRR_KEYS + tuple(KRR_LATER_DEFAULTS) + ("gpu_fraction", "amp")}  # amp: krr-st only


def expert_epochs(d: DistillConfig) -> int:
    """The epochs each expert trains: ``expert_epochs``, or T+ + M."""
    return d.expert_epochs if d.expert_epochs is not None else d.range[1] + d.expert_steps


def check_distill(d: DistillConfig) -> None:
    """Reject bad ``distill:`` values with the key's name."""
    if d.method not in DISTILL_METHODS:
        raise ConfigError(f"'distill.method' must be one of {', '.join(DISTILL_METHODS)}, got {d.method!r}")
    for k in ("checkpoint_every", "log_every"):
        if getattr(d, k) < 1:
            raise ConfigError(f"'distill.{k}' must be >= 1, got {getattr(d, k)}")
    if d.cpus_per_worker is not None and (isinstance(d.cpus_per_worker, bool)
                                          or not isinstance(d.cpus_per_worker, (int, float)) or d.cpus_per_worker <= 0):
        raise ConfigError(f"'distill.cpus_per_worker' must be a number > 0, got {d.cpus_per_worker!r}")
    if d.workers < 0:
        raise ConfigError(f"'distill.workers' must be >= 0, got {d.workers}")
    check_gpu_fraction("distill.gpu_fraction", d.gpu_fraction)
    check_amp("distill.amp", d.amp)
    (_check_krr if d.method == "krr-st" else _check_mdatm)(d)


def check_gpu_fraction(key: str, v) -> None:
    """A task's GPU share: in (0, 1] (Ray takes fractions of one GPU, or whole GPUs)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
        raise ConfigError(f"'{key}' must be a number in (0, 1] (a share of one GPU), got {v!r}")


def check_cpus(key: str, v) -> None:
    """A task's or worker's CPUs: a number > 0 (null: the stage's default)."""
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
        raise ConfigError(f"'{key}' must be a number > 0, got {v!r}")


def check_amp(key: str, v) -> None:
    if v not in AMP_MODES:
        raise ConfigError(f"'{key}' must be one of {', '.join(AMP_MODES)}, got {v!r}")


def _check_krr(d: DistillConfig) -> None:
    for k in ("size", "steps", "real_batch", "pool_size", "pool_width"):
        if getattr(d, k) < 1:
            raise ConfigError(f"'distill.{k}' must be >= 1, got {getattr(d, k)}")
    if d.size < 2:
        raise ConfigError(f"'distill.size' must be >= 2, got {d.size}")
    if d.pool_steps < 0:
        raise ConfigError(f"'distill.pool_steps' must be >= 0 (0: a fresh network every step), got {d.pool_steps}")
    for k in ("lr", "pool_lr"):
        if getattr(d, k) <= 0:
            raise ConfigError(f"'distill.{k}' must be > 0, got {getattr(d, k)}")
    if not 0 < d.lr_final <= 1:
        raise ConfigError(f"'distill.lr_final' must be in (0, 1], got {d.lr_final}")
    if not isinstance(d.real_augment, bool):
        raise ConfigError(f"'distill.real_augment' must be true or false, got {d.real_augment!r}")
    if isinstance(d.channels, bool) or d.channels not in CHANNELS:
        raise ConfigError(f"'distill.channels' must be 1, 3 or auto, got {d.channels!r}")
    if d.use_gpu and d.workers == 0:
        raise ConfigError("'distill.use_gpu' needs Ray Train workers (distill.workers >= 1): with workers: 0 the "
                          "loop runs in the driver, which Ray gave no GPU")
    if d.pool_size < max(1, d.workers) or d.real_batch < max(1, d.workers):
        raise ConfigError(f"'distill.pool_size' and 'distill.real_batch' must be >= distill.workers ({d.workers}): "
                          f"every worker owns pool models and real rows, got {d.pool_size} and {d.real_batch}")


def _check_mdatm(d: DistillConfig) -> None:
    for k in ("ipc", "experts", "expert_batch", "width", "syn_steps", "expert_steps", "iterations", "eval_epochs"):
        if getattr(d, k) < 1:
            raise ConfigError(f"'distill.{k}' must be >= 1, got {getattr(d, k)}")
    if d.eval_runs < 0:
        raise ConfigError(f"'distill.eval_runs' must be >= 0 (0: no scoring), got {d.eval_runs}")
    for k in ("expert_lr", "lr_img", "lr_lr"):
        if getattr(d, k) <= 0:
            raise ConfigError(f"'distill.{k}' must be > 0, got {getattr(d, k)}")
    r = d.range
    if (not isinstance(r, (list, tuple)) or len(r) != 2 or not all(isinstance(v, int) and not isinstance(v, bool)
                                                                    for v in r) or not 0 <= r[0] <= r[1]):
        raise ConfigError(f"'distill.range' must be [T-, T+], two integers with 0 <= T- <= T+, got {r!r}")
    if d.range_start is not None and not r[0] <= d.range_start <= r[1]:
        raise ConfigError(f"'distill.range_start' must lie in distill.range {list(r)}, got {d.range_start}")
    if d.range_grow is not None and d.range_grow < 0:
        raise ConfigError(f"'distill.range_grow' must be >= 0 (0: the whole range at once), got {d.range_grow}")
    if d.expert_epochs is not None and d.expert_epochs < r[1] + d.expert_steps:
        raise ConfigError(f"'distill.expert_epochs' ({d.expert_epochs}) must be >= T+ + expert_steps "
                          f"({r[1]} + {d.expert_steps}): matching reads the experts' epoch T+ + M")
    if d.batch_syn is not None and d.batch_syn < 1:
        raise ConfigError(f"'distill.batch_syn' must be >= 1, got {d.batch_syn}")
    for k in ("labeled_limit",):
        v = getattr(d, k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"'distill.{k}' must be a positive integer, got {v!r}")
