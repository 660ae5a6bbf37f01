"""Frozen configuration objects, one per `params.yaml` section.

Each section is read once, checked key by key (unknown keys and wrong types fail with a message naming
the key) and then passed down; nothing else in the library reads `params.yaml`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A params section that is missing, has an unknown key, or a value of the wrong type or range."""


def _check_type(section: str, key: str, value: Any, annotation: Any) -> Any:
    """Return `value` converted to `annotation` where that is lossless, else raise ConfigError."""
    where = f"{section}.{key}"
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(section, key, value, option)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {annotation}, got {value!r}")
    if origin is typing.Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"{where}: expected one of {', '.join(map(repr, allowed))}, got {value!r}")
        return value
    if origin is tuple:
        item_type = typing.get_args(annotation)[0]
        length = len(typing.get_args(annotation))
        if not isinstance(value, list | tuple) or len(value) != length:
            raise ConfigError(f"{where}: expected a list of {length} numbers, got {value!r}")
        return tuple(_check_type(section, key, item, item_type) for item in value)
    if origin is dict:
        key_type, value_type = typing.get_args(annotation)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {
            _check_type(section, f"{key}.{k}", k, key_type): _check_type(section, f"{key}.{k}", v, value_type)
            for k, v in value.items()
        }
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        # YAML reads `3e-4` as a string (YAML 1.1), so accept numeric strings as well as ints.
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {annotation!r} for {where}")


def build(cls: type[C], section: str, values: dict[str, Any] | None) -> C:
    """Build the frozen dataclass `cls` from a params mapping, rejecting unknown keys and wrong types."""
    if not isinstance(values, dict):
        raise ConfigError(f"params section '{section}' must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{section}.{unknown[0]}: unknown key (known keys: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, field in fields.items():
        if name in values:
            kwargs[name] = _check_type(section, name, values[name], hints[name])
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{section}.{name}: missing")
    return cls(**kwargs)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where raw frames come from, how the generator draws them, and the train/validation split."""

    source: typing.Literal["generate", "url", "file"] = "generate"
    num_sequences: int = 10000
    seed: int = 0
    frames: int = 20
    canvas: int = 64
    digits: int = 2
    speed: float = 0.1  # fraction of the free range (canvas - 28) moved per frame
    url: str = "http://www.cs.toronto.edu/~nitish/unsupervised_video/mnist_test_seq.npy"
    sha256: str = "c2a3e8d3939c001ab77bf543f130157424efa486bb4d0974d2cebb773b13f8b3"
    size_bytes: int = 819200096
    path: str = "data/mnist_test_seq.npy"
    train_sequences: int = 2000
    val_sequences: int = 500
    sequences_per_shard: int = 1000

    def __post_init__(self) -> None:
        _require(self.num_sequences > 0, "data.num_sequences: must be positive")
        _require(self.frames >= 2, "data.frames: must be at least 2")
        _require(self.canvas > 28, "data.canvas: must be larger than a 28x28 digit")
        _require(self.digits >= 1, "data.digits: must be at least 1")
        _require(self.speed > 0, "data.speed: must be positive")
        _require(self.train_sequences > 0, "data.train_sequences: must be positive")
        _require(self.val_sequences >= 0, "data.val_sequences: must not be negative")
        _require(self.sequences_per_shard > 0, "data.sequences_per_shard: must be positive")


@dataclasses.dataclass(frozen=True)
class TokensConfig:
    """Downsampling of the raw frames and their uniform quantization into discrete tokens."""

    frame_size: int = 32
    levels: int = 16
    downsample: typing.Literal["area", "bilinear"] = "area"
    # How tokens become pixels: `mean` (each level's mean intensity over the training split, measured by the
    # quantize stage) or `centre` (the recipe's bin centres, (token + 0.5) / levels)
    decode: typing.Literal["mean", "centre"] = "mean"

    def __post_init__(self) -> None:
        _require(self.frame_size > 0, "tokens.frame_size: must be positive")
        _require(2 <= self.levels <= 255, "tokens.levels: must be in [2, 255] (uint8 tokens plus a mask id)")


@dataclasses.dataclass(frozen=True)
class ActionsConfig:
    """Ego-centric actions: from ground truth where the source has it, else by tracking."""

    threshold: float = 0.2  # ink level in [0, 1] above which a pixel belongs to a digit when tracking
    min_area: int = 4  # connected components smaller than this (pixels, tracking resolution) are noise
    tracking_size: int = 64  # resolution the tracker runs at (the raw canvas by default)

    def __post_init__(self) -> None:
        _require(0 < self.threshold < 1, "actions.threshold: must be in (0, 1)")
        _require(self.min_area >= 1, "actions.min_area: must be at least 1")
        _require(self.tracking_size > 0, "actions.tracking_size: must be positive")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Transformer hyper-parameters; frame size, levels and frame count come from the token store."""

    layers: int = 2
    embed_dim: int = 128
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    patch_size: int = 1  # p x p tokens per transformer position (1: one token per position, the recipe)

    def __post_init__(self) -> None:
        _require(self.layers >= 1, "model.layers: must be at least 1")
        _require(self.patch_size >= 1, "model.patch_size: must be at least 1")
        _require(self.heads >= 1, "model.heads: must be at least 1")
        _require(
            self.embed_dim % self.heads == 0,
            f"model.embed_dim: {self.embed_dim} is not divisible by model.heads={self.heads}",
        )
        _require(self.mlp_ratio > 0, "model.mlp_ratio: must be positive")
        _require(0 <= self.dropout < 1, "model.dropout: must be in [0, 1)")


OBJECTIVES = ("future", "joint", "individual")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training loop, its objectives and its budget."""

    epochs: int = 2
    max_train_sequences: int = 0  # use only the first N of the train split (0: all of it)
    max_val_sequences: int = 0  # validate on only the first N of the validation split (0: all of it)
    batch_size: int = 4
    lr: float = 3e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW's; CoPilot4D: (0.9, 0.95)
    warmup_steps: int = 0  # linear LR warm-up from 0 before the cosine decay; CoPilot4D: 2000
    grad_clip: float = 1.0
    past_frames: int = 10
    mask_ratio: tuple[float, float] = (0.5, 1.0)
    objectives: dict[str, float] = dataclasses.field(default_factory=lambda: {"future": 1.0})
    mask_schedule: typing.Literal["uniform", "cosine"] = "uniform"
    noise_eta: float = 0.0  # CoPilot4D: replace up to this share of the unmasked tokens with random ones
    label_smoothing: float = 0.0
    checkpoint_every: int = 10
    log_every: int = 10  # training steps between logged loss values
    point_sequences: int = 16  # validation sequences whose point prediction is scored after every epoch
    device: typing.Literal["auto", "cpu", "cuda", "mps"] = "auto"
    # auto: bf16 autocast where the device computes bf16 natively (CUDA, CPUs with AVX512-BF16/AMX), else fp32
    precision: typing.Literal["auto", "bf16", "fp32"] = "auto"
    compile: bool = False
    nproc: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, "train.epochs: must be at least 1")
        _require(self.max_train_sequences >= 0, "train.max_train_sequences: must not be negative")
        _require(self.max_val_sequences >= 0, "train.max_val_sequences: must not be negative")
        _require(self.batch_size >= 1, "train.batch_size: must be at least 1")
        _require(self.lr > 0, "train.lr: must be positive")
        _require(0 <= self.min_lr <= self.lr, "train.min_lr: must be in [0, train.lr]")
        _require(self.weight_decay >= 0, "train.weight_decay: must not be negative")
        _require(all(0 <= beta < 1 for beta in self.betas), "train.betas: each must be in [0, 1)")
        _require(self.warmup_steps >= 0, "train.warmup_steps: must not be negative")
        _require(self.log_every >= 1, "train.log_every: must be at least 1")
        _require(self.point_sequences >= 0, "train.point_sequences: must not be negative")
        _require(self.grad_clip > 0, "train.grad_clip: must be positive")
        _require(self.past_frames >= 1, "train.past_frames: must be at least 1")
        low, high = self.mask_ratio
        _require(0 < low <= high <= 1, "train.mask_ratio: expected [low, high] with 0 < low <= high <= 1")
        unknown = sorted(set(self.objectives) - set(OBJECTIVES))
        _require(
            not unknown,
            f"train.objectives.{unknown[0] if unknown else ''}: unknown objective "
            f"(known: {', '.join(OBJECTIVES)})",
        )
        _require(
            all(w >= 0 for w in self.objectives.values()), "train.objectives: weights must not be negative"
        )
        _require(
            abs(sum(self.objectives.values()) - 1.0) < 1e-6,
            f"train.objectives: weights must sum to 1, got {sum(self.objectives.values()):g}",
        )
        _require(0 <= self.noise_eta < 1, "train.noise_eta: must be in [0, 1)")
        _require(0 <= self.label_smoothing < 1, "train.label_smoothing: must be in [0, 1)")
        _require(self.checkpoint_every >= 1, "train.checkpoint_every: must be at least 1")
        _require(self.nproc >= 1, "train.nproc: must be at least 1")


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """Iterative unmasking: steps, order, temperature and classifier-free guidance."""

    steps: int = 20
    mode: typing.Literal["joint", "autoregressive"] = "joint"
    temperature: float = 1.0
    guidance: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.steps >= 1, "sample.steps: must be at least 1")
        _require(self.temperature >= 0, "sample.temperature: must not be negative")
        _require(self.guidance >= 0, "sample.guidance: must not be negative")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """How much of the validation split is scored, and how many pictures are drawn."""

    sequences: int = 64
    batch_size: int = 8
    samples: int = 4  # sampled futures per sequence: the first is scored as `sampled`, all of them as best-of-N
    strips: int = 4
    generations: int = 2

    def __post_init__(self) -> None:
        _require(self.sequences >= 1, "eval.sequences: must be at least 1")
        _require(self.batch_size >= 1, "eval.batch_size: must be at least 1")
        _require(self.samples >= 1, "eval.samples: must be at least 1")
        _require(self.strips >= 0, "eval.strips: must not be negative")
        _require(self.generations >= 0, "eval.generations: must not be negative")


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "tokens": TokensConfig,
    "actions": ActionsConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "sample": SampleConfig,
    "eval": EvalConfig,
}


def read_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read the raw params file, with a one-line error when it is missing or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    with path.open() as handle:
        params = yaml.safe_load(handle)
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(params).__name__}")
    return params


def load(section: str, path: str | Path = "params.yaml") -> Any:
    """Load and validate one section of `params.yaml` into its config object."""
    if section not in SECTIONS:
        raise ConfigError(f"unknown params section '{section}' (known: {', '.join(SECTIONS)})")
    params = read_params(path)
    if section not in params:
        raise ConfigError(f"{path}: missing section '{section}'")
    return build(SECTIONS[section], section, params[section])


def as_dict(config: Any) -> dict[str, Any]:
    """A config object as plain JSON-friendly values (tuples become lists), for artifact metadata."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return {k: plain(v) for k, v in dataclasses.asdict(config).items()}
