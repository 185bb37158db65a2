"""YAML config -> frozen dataclasses, validated with clear errors before any Ray work."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .config_distill import (AMP_MODES, DistillConfig, check_amp, check_cpus, check_distill,  # noqa: F401
                             check_gpu_fraction, distill_view)
from .errors import ConfigError

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
SOURCES = ("fashion-mnist", "images", "parquet", "webdataset")


@dataclass(frozen=True)
class DataConfig:
    """The unlabeled images D: where they come from and the size every model and the student see."""
    source: str = "fashion-mnist"  # fashion-mnist | images (a folder, any depth) | parquet | webdataset (.tar shards)
    path: Optional[str] = None   # the IDX folder (default the Debian package's), image folder, Parquet or shard folder
    image_size: int = 32         # the student's input size in pixels (teachers resize with their own preprocessing)
    limit: Optional[int] = None  # use only the first N images in file order (quick runs); null: all


@dataclass(frozen=True)
class ParticipantConfig:
    """One participant (``participants:`` lists K of them): a pretrained model, run as its own actor pool."""
    name: str = ""               # required: letters, digits, '-', '_'; unique (Participant_<name> in the dashboard)
    model: str = ""              # required: open_clip arch | local-dir:DIR | student:RUN | timm:NAME | hf:REPO_OR_DIR
    pretrained: Optional[str] = None   # open_clip / timm: a hub tag or a weights file; null for the other specs
    batch_size: int = 256        # images per embedding batch
    num_gpus: float = 0.0        # GPUs per actor (fractions allowed; 1 on a GPU cluster)
    num_cpus: float = 1.0        # CPUs per actor
    actors: int = 1              # actors in the pool (its minimum size when actors_max is set)
    actors_max: Optional[int] = None   # autoscale the pool up to this many actors; null: a fixed pool of `actors`
    accelerator_type: Optional[str] = None  # Ray accelerator type each actor needs, e.g. T4
    resources: Optional[dict] = None        # custom Ray resources per actor, {name: amount}
    node_labels: Optional[dict] = None   # Ray label selector for the pool's nodes, e.g. {gpu-type: A100}
    share: float = 1.0           # relative share of the images this participant owns; 0: it embeds only S
    amp: str = "auto"            # bf16 autocast when embedding: auto (bf16 on CUDA, off on the CPU) | bf16 | off
    decode_cpus: float = 1.0     # CPUs per task of the decode stage (image bytes -> uint8 at the model's input size)
    pool: str = "auto"           # the embedding of timm:/hf: models: auto | cls | pooled | mean (families.py)


@dataclass(frozen=True)
class SharedConfig:
    """The shared subset S that every participant embeds: |S| = max(min, ceil(fraction * N)) on average."""
    fraction: float = 0.0005     # share of the N images in S, in (0, 1]
    min: int = 16                # at least this many images in S (>= 2)
    heldout: float = 0.2         # part of S left out of a second fit, for the held-out R² in the manifest


ALIGN_SELECT = ("fixed", "loo")
SCORE_METHODS = ("uniformity", "coverage")


@dataclass(frozen=True)
class ScoreConfig:
    """How the best participant, the alignment target, is chosen on S."""
    method: str = "uniformity"   # uniformity: lowest value wins (the paper's); coverage: the space that
                                 # linearly predicts every other participant's best on S (align.coverage)


@dataclass(frozen=True)
class AlignConfig:
    """The closed-form ridge maps (with bias) from every participant's space into the best one's."""
    ridge: float = 1.0e-3        # ridge, relative to the mean squared norm of the centred source features
    enabled: bool = True         # false: no maps; targets are cut / zero-padded to the best one's width (ablation)
    select: str = "fixed"        # fixed: align.ridge as given; loo: per participant, by leave-one-out on S


@dataclass(frozen=True)
class StudentConfig:
    """The student that Ray Train fits to the optimized set's targets."""
    arch: str = "resnet18"       # a timm architecture (ResNets get a small-image stem at <= 64 px), convnet3_w16..128
    epochs: int = 10             # passes over the training rows
    batch_size: int = 256        # rows per worker per step
    lr: float = 1.0e-3           # AdamW learning rate
    weight_decay: float = 0.01   # AdamW weight decay
    workers: int = 2             # Ray Train workers (DDP); 0: the loop runs in the driver's process
    use_gpu: bool = False        # one GPU per worker (nccl); needs workers >= 1
    whiten: bool = False         # whiten the targets (PCA) instead of standardising each dimension
    phi_s: bool = False          # PHI-S instead: a rotation and one scale give every dimension unit variance
    limit: Optional[int] = None  # train on a seeded subset of this many rows (>= 2); null: every row
    cpus_per_worker: Optional[float] = None  # CPUs per worker; null: the most that lets every worker fit
    data: str = "optimized"      # what the student regresses: RUN/optimized, or a distilled set (distilled/krr-st)
    augment: bool | str = True   # RELA's augmentations on every batch; weak: crop and flip only; false: none (KRR-ST)
    init: Optional[str] = None   # warm start: a student folder (RUN/student) whose weights start training
    amp: str = "auto"            # bf16 autocast in training: auto (bf16 on CUDA, off on the CPU) | bf16 | off
    loss: str = "cos"            # per target: cos (1 - cos) | cos+smooth-l1 (0.9 (1 - cos) + 0.1 smooth-L1, RADIO's) | mse
    heads: str = "aligned"       # aligned: one head on the aligned targets | per-participant: one head per teacher on
                                 # its own (standardised) embedding, D(k) trains head k, S every head | both


STUDENT_DATA = ("optimized", "distilled/krr-st")
STUDENT_LOSSES = ("cos", "cos+smooth-l1", "mse")
STUDENT_HEADS = ("aligned", "per-participant", "both")
# student keys added after runs existed, with the value that means "as before": left out of fingerprints at it
STUDENT_LATER_DEFAULTS = {"init": None, "amp": "auto", "loss": "cos", "phi_s": False, "heads": "aligned"}


def student_view(d: dict) -> dict:
    """A student section's dict without the keys of ``STUDENT_LATER_DEFAULTS`` that sit at those values."""
    return {k: v for k, v in d.items() if k not in STUDENT_LATER_DEFAULTS or v != STUDENT_LATER_DEFAULTS[k]}
ROUND_JOINS = ("extra", "replace", "relabel")


@dataclass(frozen=True)
class RoundsConfig:
    """Continual rounds (``coopt run --rounds R``): round r's student joins round r + 1's participants."""
    count: int = 1               # R; more than 1 (or --rounds) puts each round in RUN/rounds/<r>/
    join: str = "extra"          # extra: K + 1 shards; replace: takes the worst-uniformity participant's place;
                                 # relabel: the student owns every image, the first round's participants embed only S
    warm_start: bool = False     # round r + 1's student starts from round r's weights


@dataclass(frozen=True)
class EvalConfig:
    """The linear probe that scores the student, every teacher and a random-init student."""
    probe_epochs: int = 100      # epochs of the linear classifier on the frozen features
    probe_limit: Optional[int] = None  # labeled images the probe trains on (Fashion-MNIST: public train[0:N])
    test_limit: Optional[int] = None   # test images (Fashion-MNIST: t10k[0:N]); null: all
    probe_path: Optional[str] = None   # labeled probe-train images (class folders or Parquet with label); other sources
    test_path: Optional[str] = None    # labeled test images, the same form; without both the probe is skipped
    gpu_fraction: float = 0.25   # the GPU share of each probe task whose model asked for a GPU (4 probes per GPU)
    num_cpus: float = 1.0        # CPUs per probe task; a waiting probe reuses a finished one's worker (imports once)


@dataclass(frozen=True)
class Config:
    """The whole config file; its top-level keys."""
    seed: int = 0                # seeds the split, S, the student's subset and initialisation, the probe
    zoo_dir: str = "zoo"         # where relative local-dir: models resolve (`--zoo` overrides it)
    max_error_fraction: float = 0.05  # stop the run past this share of unreadable images (--max-error-fraction)
    data: DataConfig = field(default_factory=DataConfig)
    participants: tuple = ()
    shared: SharedConfig = field(default_factory=SharedConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    rounds: RoundsConfig = field(default_factory=RoundsConfig)

    def to_dict(self) -> dict:
        """Plain-dict form, suitable for YAML/JSON."""
        d = dataclasses.asdict(self)
        d["participants"] = [dataclasses.asdict(p) for p in self.participants]
        d["distill"]["range"] = list(self.distill.range)
        return d

    def fingerprint_view(self) -> dict:
        """``to_dict`` without keys added later that sit at their defaults, so older runs' fingerprints hold."""
        d = self.to_dict()
        for p in d["participants"]:
            if p.get("share") == 1.0:
                p.pop("share")
            if p.get("amp") == "auto":
                p.pop("amp")
            p.pop("decode_cpus", None)  # where decoding runs, not what it computes
            if p.get("pool") == "auto":
                p.pop("pool")
        d["student"] = student_view(d["student"])
        d["eval"] = {k: v for k, v in d["eval"].items() if k not in ("gpu_fraction", "num_cpus")}  # where, not what
        d["distill"] = distill_view(self.distill)
        return d

    def fingerprint(self, *sections: str) -> str:
        """Stable hash of the given top-level sections (all when none given)."""
        d = self.fingerprint_view()
        if sections:
            d = {k: d[k] for k in sections}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _build(cls, raw: Any, where: str):
    """Build dataclass ``cls`` from ``raw``, rejecting unknown keys and wrong types."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown key '{key}' (allowed: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in raw.items():
        key = f"{where}.{name}" if where else name
        default = getattr(cls(), name) if name not in ("participants",) else ()
        kwargs[name] = _check_type(key, value, default)
    return cls(**kwargs)


# switches that also take a named middle setting; counts that also take a named setting
BOOL_OR, INT_OR = {"student.augment": ("weak",)}, {"distill.channels": ("auto",)}


def _check_type(key: str, value: Any, default: Any) -> Any:
    if value is None or default is None or isinstance(default, (dict, tuple)):
        return value
    if isinstance(default, bool):
        named = BOOL_OR.get(key, ())
        if isinstance(value, bool) or value in named:
            return value
        choices = ["true", "false", *named]
        raise ConfigError(f"'{key}' must be {', '.join(choices[:-1])} or {choices[-1]}, got {value!r}")
    if isinstance(default, int) and not isinstance(default, bool):
        if (isinstance(value, bool) or not isinstance(value, int)) and value not in INT_OR.get(key, ()):
            raise ConfigError(f"'{key}' must be an integer{''.join(' or ' + n for n in INT_OR.get(key, ()))}, "
                              f"got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{key}' must be a number, got {value!r}")
        return float(value)
    if isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"'{key}' must be a string, got {value!r}")
    return value


def parse_config(raw: Any, base_dir: str | os.PathLike = ".") -> Config:
    """Turn a parsed YAML mapping into a validated :class:`Config` (no file-system checks)."""
    if not isinstance(raw, dict):
        raise ConfigError("config: expected a YAML mapping at the top level")
    raw = dict(raw)
    sub = {
        "data": DataConfig,
        "shared": SharedConfig,
        "score": ScoreConfig,
        "align": AlignConfig,
        "student": StudentConfig,
        "distill": DistillConfig,
        "eval": EvalConfig,
        "rounds": RoundsConfig,
    }
    parts_raw = raw.pop("participants", None)
    built = {k: _build(c, raw.pop(k, None), k) for k, c in sub.items()}
    top = _build(Config, raw, "")
    if not isinstance(parts_raw, list) or not parts_raw:
        raise ConfigError("'participants' must list at least one participant (K = 0)")
    parts = tuple(_build(ParticipantConfig, p, f"participants[{i}]") for i, p in enumerate(parts_raw))
    cfg = dataclasses.replace(top, participants=parts, **built)
    _check_values(cfg)
    return cfg


def _check_values(cfg: Config) -> None:
    if cfg.data.source not in SOURCES:
        raise ConfigError(f"'data.source' must be one of {', '.join(SOURCES)}, got {cfg.data.source!r}")
    if cfg.data.source != "fashion-mnist" and not cfg.data.path:
        raise ConfigError(f"'data.path' is required for data.source={cfg.data.source}")
    if cfg.data.image_size < 8:
        raise ConfigError(f"'data.image_size' must be >= 8, got {cfg.data.image_size}")
    if cfg.data.limit is not None and cfg.data.limit < 1:
        raise ConfigError(f"'data.limit' must be a positive integer, got {cfg.data.limit}")
    if not 0 < cfg.shared.fraction <= 1:
        raise ConfigError(f"'shared.fraction' must be in (0, 1], got {cfg.shared.fraction}")
    if cfg.shared.min < 2:
        raise ConfigError(f"'shared.min' must be >= 2, got {cfg.shared.min}")
    if not 0 <= cfg.shared.heldout < 1:
        raise ConfigError(f"'shared.heldout' must be in [0, 1), got {cfg.shared.heldout}")
    if cfg.align.ridge < 0:
        raise ConfigError(f"'align.ridge' must be >= 0, got {cfg.align.ridge}")
    if cfg.align.select not in ALIGN_SELECT:
        raise ConfigError(f"'align.select' must be one of {', '.join(ALIGN_SELECT)}, got {cfg.align.select!r}")
    if cfg.score.method not in SCORE_METHODS:
        raise ConfigError(f"'score.method' must be one of {', '.join(SCORE_METHODS)}, got {cfg.score.method!r}")
    if not 0 <= cfg.max_error_fraction <= 1:
        raise ConfigError(f"'max_error_fraction' must be in [0, 1], got {cfg.max_error_fraction}")
    names = [p.name for p in cfg.participants]
    for i, p in enumerate(cfg.participants):
        key = f"participants[{i}]"
        if not p.name or not p.name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"'{key}.name' must be a non-empty name of letters, digits, '-' or '_', got {p.name!r}")
        if names.count(p.name) > 1:
            raise ConfigError(f"'{key}.name' duplicates participant name {p.name!r}")
        if not p.model:
            raise ConfigError(f"'{key}.model' is required")
        if p.batch_size < 1:
            raise ConfigError(f"'{key}.batch_size' must be >= 1, got {p.batch_size}")
        if p.num_cpus <= 0:
            raise ConfigError(f"'{key}.num_cpus' must be > 0, got {p.num_cpus}")
        if p.num_gpus < 0:
            raise ConfigError(f"'{key}.num_gpus' must be >= 0, got {p.num_gpus}")
        if p.actors < 1:
            raise ConfigError(f"'{key}.actors' must be >= 1, got {p.actors}")
        for opt in ("resources", "node_labels"):
            val = getattr(p, opt)
            if val is not None and (not isinstance(val, dict) or not all(isinstance(k, str) and k for k in val)):
                raise ConfigError(f"'{key}.{opt}' must be a mapping of names to values, got {val!r}")
        if p.node_labels and not all(isinstance(v, str) and v.strip() for v in p.node_labels.values()):
            raise ConfigError(f"'{key}.node_labels' values must be non-empty strings, got {p.node_labels!r}")
        if p.resources and not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
                                   for v in p.resources.values()):
            raise ConfigError(f"'{key}.resources' values must be numbers >= 0, got {p.resources!r}")
        if p.actors_max is not None and p.actors_max < p.actors:
            raise ConfigError(f"'{key}.actors_max' must be >= actors ({p.actors}), got {p.actors_max}")
        if p.share < 0:
            raise ConfigError(f"'{key}.share' must be >= 0, got {p.share}")
        check_amp(f"{key}.amp", p.amp)
        check_cpus(f"{key}.decode_cpus", p.decode_cpus)
        _check_pool(key, p)
    if not any(p.share > 0 for p in cfg.participants):
        raise ConfigError("'participants[*].share': at least one participant must own images (share > 0)")
    s = cfg.student
    for k in ("epochs", "batch_size"):
        if getattr(s, k) < 1:
            raise ConfigError(f"'student.{k}' must be >= 1, got {getattr(s, k)}")
    if s.workers < 0:
        raise ConfigError(f"'student.workers' must be >= 0, got {s.workers}")
    if s.lr <= 0:
        raise ConfigError(f"'student.lr' must be > 0, got {s.lr}")
    check_cpus("student.cpus_per_worker", s.cpus_per_worker)
    if s.limit is not None and (isinstance(s.limit, bool) or not isinstance(s.limit, int) or s.limit < 2):
        raise ConfigError(f"'student.limit' must be an integer >= 2, got {s.limit!r}")
    check_amp("student.amp", s.amp)
    if s.whiten and s.phi_s:
        raise ConfigError("'student.whiten' and 'student.phi_s' are two ways to standardise the targets: set one")
    if s.loss not in STUDENT_LOSSES:
        raise ConfigError(f"'student.loss' must be one of {', '.join(STUDENT_LOSSES)}, got {s.loss!r}")
    if s.use_gpu and s.workers == 0:
        raise ConfigError("'student.use_gpu' needs Ray Train workers (student.workers >= 1): with workers: 0 the "
                          "loop runs in the driver, which Ray gave no GPU")
    if s.data not in STUDENT_DATA:
        raise ConfigError(f"'student.data' must be one of {', '.join(STUDENT_DATA)}, got {s.data!r}")
    if s.heads not in STUDENT_HEADS:
        raise ConfigError(f"'student.heads' must be one of {', '.join(STUDENT_HEADS)}, got {s.heads!r}")
    if s.heads != "aligned" and s.data != "optimized":
        raise ConfigError(f"'student.heads: {s.heads}' needs each participant's own targets, which only "
                          f"RUN/optimized has: use student.data: optimized, or student.heads: aligned with {s.data}")
    check_distill(cfg.distill)
    r = cfg.rounds
    if r.count < 1:
        raise ConfigError(f"'rounds.count' must be >= 1, got {r.count}")
    if r.join not in ROUND_JOINS:
        raise ConfigError(f"'rounds.join' must be one of {', '.join(ROUND_JOINS)}, got {r.join!r}")
    if cfg.eval.probe_epochs < 1:
        raise ConfigError(f"'eval.probe_epochs' must be >= 1, got {cfg.eval.probe_epochs}")
    check_gpu_fraction("eval.gpu_fraction", cfg.eval.gpu_fraction)
    check_cpus("eval.num_cpus", cfg.eval.num_cpus)


POOLS = ("auto", "cls", "pooled", "mean")


def _check_pool(key: str, p: ParticipantConfig) -> None:
    if p.pool not in POOLS:
        raise ConfigError(f"'{key}.pool' must be one of {', '.join(POOLS)}, got {p.pool!r}")
    if p.pool not in ("auto", "pooled") and not p.model.startswith(("timm:", "hf:")):
        raise ConfigError(f"'{key}.pool': {p.pool} needs a timm: or hf: model; {p.model} embeds with its own "
                          "encode_image (pool: auto)")


def load_config(path: str | os.PathLike, overrides: Optional[dict] = None) -> Config:
    """Read, parse and validate a config file, resolving relative paths against its folder."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}".splitlines()[0]) from e
    if overrides:
        raw = _deep_update(dict(raw or {}), overrides)
    return parse_config(raw)


def _deep_update(base: dict, upd: dict) -> dict:
    for k, v in upd.items():
        base[k] = _deep_update(dict(base[k]), v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base


def zoo_path(cfg: Config) -> Path:
    """Absolute zoo directory (relative paths resolve against the current directory)."""
    return Path(cfg.zoo_dir).expanduser().resolve()


def resolve_model(cfg: Config, model: str) -> str:
    """Resolve a relative ``local-dir:`` path against the zoo directory."""
    if model.startswith("local-dir:"):
        p = Path(model[len("local-dir:"):]).expanduser()
        if not p.is_absolute():
            cand = zoo_path(cfg) / p
            if not cand.exists() and p.parts and p.parts[0] == Path(cfg.zoo_dir).name:
                cand = Path(p).resolve()
            p = cand
        return f"local-dir:{p}"
    return model
