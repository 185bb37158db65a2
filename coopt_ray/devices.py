"""The device rules, held once (DESIGN.md §6): CUDA only when a stage's config asked for a GPU, and then CUDA or a
one-line error; the CPU, explicitly, otherwise; collectives on the loop's device; bf16 autocast; CUDA speed habits.

Zero-GPU Ray workers may still see ``CUDA_VISIBLE_DEVICES`` (Ray 2.60), so "not asked" never looks at CUDA at all.
``COOPT_SIMULATED_GPUS=1`` is for clusters whose GPUs are only declared to Ray (``ray start --num-gpus=1`` on a
CPU machine, ``ray.cluster_utils.Cluster`` in tests): a stage that asked for a GPU then runs on the CPU, on purpose.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Optional, Sequence

import torch

from .config import AMP_MODES, ConfigError

SIMULATED_ENV = "COOPT_SIMULATED_GPUS"


class DeviceError(ConfigError):
    """A stage asked for a GPU and cannot have one; the message names the config key and why (exit 2)."""


def simulated_gpus() -> bool:
    """Whether GPUs are declared to Ray without being real (a test or development cluster)."""
    return os.environ.get(SIMULATED_ENV, "").strip().lower() in ("1", "true", "yes")


def cuda_problem() -> Optional[str]:
    """Why CUDA cannot be used in this process, or None when it can (initialises CUDA: call only when asked)."""
    if not torch.backends.cuda.is_built():
        return f"CUDA not usable: this torch build ({torch.__version__}) has no CUDA support"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        torch.cuda.init()  # raises with the reason: no driver, a driver older than this torch needs, no device
    except Exception as e:  # noqa: BLE001 - any failure to initialise is the reason to report
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if "no cuda gpus are available" in msg.lower():
            return f"no CUDA device visible (CUDA_VISIBLE_DEVICES={visible!r})"
        return f"CUDA not usable: {msg}"
    if torch.cuda.device_count() == 0:
        return f"no CUDA device visible (CUDA_VISIBLE_DEVICES={visible!r})"
    return None


def stage_device(asked_gpu: bool, key: str) -> torch.device:
    """The device a stage runs on: ``cpu`` when ``key`` asked no GPU (CUDA is never touched), else ``cuda`` or a
    :class:`DeviceError` naming ``key`` (never a silent CPU run)."""
    if not asked_gpu:
        return torch.device("cpu")
    problem = cuda_problem()
    if problem is None:
        return torch.device("cuda", torch.cuda.current_device())
    if simulated_gpus():
        return torch.device("cpu")
    raise DeviceError(f"'{key}' asks for a GPU, but {problem}")


def train_device(asked_gpu: bool, key: str) -> torch.device:
    """:func:`stage_device` inside a Ray Train loop: with a GPU, the one Ray Train gave this worker."""
    dev = stage_device(asked_gpu, key)
    if dev.type != "cuda":
        return dev
    import ray.train.torch as rtt

    return rtt.get_device()


def reduce_sums(values: Sequence, device: torch.device, world: int = 1) -> list[float]:
    """Sum ``values`` (floats or 0-d tensors) over the workers: one float64 tensor on the loop's ``device``
    (nccl reduces only CUDA tensors), one all_reduce, one copy back. Returns plain floats."""
    tot = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values])
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tot)
    return [float(v) for v in tot.cpu()]


def amp_dtype(mode: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for ``mode`` (``auto``: bf16 on CUDA, none on the CPU, so CPU results do not move)."""
    if mode not in AMP_MODES:
        raise ValueError(f"amp mode must be one of {', '.join(AMP_MODES)}, got {mode!r}")
    if mode == "bf16" or (mode == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast(mode: str, device: torch.device):
    """A context that runs its block under bf16 autocast on ``device`` when ``mode`` says so (works on the CPU)."""
    dtype = amp_dtype(mode, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def cuda_speed_habits(device: torch.device) -> None:
    """cudnn autotuning and TF32 matmuls on CUDA (fixed input shapes: the autotuner's pick is reused); a no-op on
    the CPU."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def channels_last(device: torch.device) -> Optional[torch.memory_format]:
    """The memory format conv nets run fastest in on ``device`` (channels_last on CUDA, None: leave as is)."""
    return torch.channels_last if device.type == "cuda" else None


# ---------------------------------------------------------------- on the cluster (Ray)
def device_error_in(e: BaseException) -> Optional[BaseException]:
    """The DeviceError a Ray Train failure carries (a worker's, or in the cause chain), if any."""
    todo, seen = [e], set()
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, DeviceError):
            return x
        todo += [x.__cause__, x.__context__, *(getattr(x, "worker_failures", None) or {}).values()]
    return None


_CUDA_CHECKED: set = set()


def _cuda_probe(key: str) -> Optional[str]:
    try:
        return str(stage_device(True, key))
    except DeviceError as e:
        return "error: " + str(e)


def check_cuda_usable(key: str, num_gpus: float, log: Callable = print, timeout_s: float = 120.0) -> None:
    """One tiny task holding ``num_gpus`` of a GPU checks that CUDA really works there (a driver too old for this
    torch, a GPU declared but absent) before a stage starts its work; a DeviceError naming ``key`` otherwise.
    Checked once per Ray session; a GPU busy past ``timeout_s`` is logged and the stage goes on."""
    import ray

    session = ray.get_runtime_context().get_job_id()
    if not num_gpus or session in _CUDA_CHECKED:
        return
    ref = ray.remote(_cuda_probe).options(name="coopt_cuda_check", num_cpus=0, num_gpus=num_gpus).remote(key)
    ready, _ = ray.wait([ref], timeout=timeout_s)
    if not ready:
        ray.cancel(ref, force=True)
        log(f"[cluster] warning: no GPU free for the CUDA check within {timeout_s:.0f}s; going on without it")
        return
    got = ray.get(ready[0])
    if got.startswith("error: "):
        raise DeviceError(got[len("error: "):] + " (on a GPU node of the cluster)")
    _CUDA_CHECKED.add(session)
    if got == "cpu":
        log(f"[cluster] the cluster's GPUs are simulated ({SIMULATED_ENV}=1 on its nodes): stages that ask for a GPU "
            "run on the CPU")
    else:
        log(f"[cluster] CUDA works on the cluster's GPUs ({got}, checked for '{key}')")
