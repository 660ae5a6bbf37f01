"""Frozen configuration objects, one per `params.yaml` section, validated by pydantic.

Each section is read once, checked key by key (unknown keys, missing keys, wrong types and out-of-range values
fail with one line naming the key) and then passed down; nothing else in the library reads `params.yaml`.
No field has a default: `params.yaml` is the one place a value lives.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from pathlib import Path
from typing import Annotated, Any, TypeVar

import pydantic
import yaml
from pydantic import BeforeValidator, ConfigDict, Field, Strict, model_validator
from pydantic_core import PydanticCustomError

C = TypeVar("C")


DIGIT_SIZE = 28  # MNIST digits are 28x28 at the raw canvas resolution: the generator, the tracker and
# the canvas check depend on it


class ConfigError(ValueError):
    """A params section that is missing, has an unknown key, or a value of the wrong type or range."""


# --- Field types: what YAML gives, checked without surprising conversions -----------------------------------


def _yaml_number(value: Any) -> Any:
    # YAML 1.1 reads `3e-4` (no dot) as a string: a number to a user, so numeric strings become floats.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value  # rejected below, with the original value in the message
    return value


def _pair(value: Any) -> Any:
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise PydanticCustomError("pair", "expected a list of 2 numbers")
    return value


Integer = Annotated[int, Strict()]  # no bools, no 2.5, no "2"
Boolean = Annotated[bool, Strict()]  # no "yes", no 1
Text = Annotated[str, Strict()]
Number = Annotated[float, Strict(), Field(allow_inf_nan=False), BeforeValidator(_yaml_number)]  # ints too
Pair = Annotated[tuple[Number, Number], BeforeValidator(_pair)]

_MESSAGES = {  # pydantic error type -> the words of our one-line message
    "int_type": "expected an integer",
    "bool_type": "expected true or false",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "finite_number": "expected a finite number",
    "string_type": "expected a string",
    "dict_type": "expected a mapping",
}


def _describe(cls: type, section: str, error: pydantic.ValidationError) -> str:
    """The first problem of a validation error as one line naming the key: `train.lr: expected ...`."""
    fields = {field.name: field for field in dataclasses.fields(cls)}
    # Unknown keys first: a misspelt key explains the other complaints.
    problems = sorted(error.errors(), key=lambda item: item["type"] != "unexpected_keyword_argument")
    problem = problems[0]
    where = ".".join([section, *map(str, problem["loc"])])
    kind, value = problem["type"], problem.get("input")
    if kind == "value_error" and isinstance(problem.get("ctx", {}).get("error"), ConfigError):
        return str(problem["ctx"]["error"])  # a range rule: its message already names the key
    if kind == "unexpected_keyword_argument":
        return f"{where}: unknown key (known keys: {', '.join(sorted(fields))})"
    if kind in ("missing", "missing_argument"):
        return f"{where}: missing"
    if kind == "literal_error":
        allowed = typing.get_args(typing.get_type_hints(cls)[problem["loc"][0]])
        return f"{where}: expected one of {', '.join(map(repr, allowed))}, got {value!r}"
    words = _MESSAGES.get(kind, problem["msg"][:1].lower() + problem["msg"][1:])
    return f"{where}: {words}, got {value!r}"


def _section(name: str) -> typing.Callable[[type[C]], type[C]]:
    """Make `cls` a frozen pydantic dataclass for params section `name` that rejects unknown keys, and whose
    construction (from params or from code, `dataclasses.replace` included) fails with a ConfigError."""

    def decorate(cls: type[C]) -> type[C]:
        cls.SECTION = name  # type: ignore[attr-defined]
        validated = pydantic.dataclasses.dataclass(frozen=True, config=ConfigDict(extra="forbid"))(cls)
        init = validated.__init__

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            try:
                init(self, *args, **kwargs)
            except pydantic.ValidationError as error:
                raise ConfigError(_describe(validated, name, error)) from None

        validated.__init__ = __init__  # type: ignore[method-assign]
        return validated

    return decorate


def build(cls: type[C], section: str, values: dict[str, Any] | None) -> C:
    """Build the config class `cls` from a params mapping, rejecting unknown keys, wrong types and ranges."""
    if not isinstance(values, dict):
        raise ConfigError(f"params section '{section}' must be a mapping, got {values!r}")
    known = {field.name for field in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted((str(key) for key in values if key not in known), key=str)
    if unknown:  # also catches keys that are not strings, which no keyword argument can carry
        raise ConfigError(f"{section}.{unknown[0]}: unknown key (known keys: {', '.join(sorted(known))})")
    try:
        return pydantic.TypeAdapter(cls).validate_python(values)
    except pydantic.ValidationError as error:
        raise ConfigError(_describe(cls, section, error)) from None


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@_section("data")
class DataConfig:
    """Where raw frames come from, how the generator draws them, and the train/validation split."""

    source: typing.Literal["generate", "url", "file"]
    num_sequences: Integer
    seed: Integer
    frames: Integer
    canvas: Integer
    digits: Integer
    speed: Number  # fraction of the free range (canvas - DIGIT_SIZE) moved per frame
    url: Text
    sha256: Text
    size_bytes: Integer
    path: Text
    train_sequences: Integer
    val_sequences: Integer
    sequences_per_shard: Integer

    @model_validator(mode="after")
    def _check_ranges(self) -> Any:
        _require(self.num_sequences > 0, "data.num_sequences: must be positive")
        _require(self.frames >= 2, "data.frames: must be at least 2")
        _require(
            self.canvas > DIGIT_SIZE, f"data.canvas: must be larger than a {DIGIT_SIZE}x{DIGIT_SIZE} digit"
        )
        _require(self.digits >= 1, "data.digits: must be at least 1")
        _require(self.speed > 0, "data.speed: must be positive")
        _require(self.train_sequences > 0, "data.train_sequences: must be positive")
        _require(self.val_sequences >= 0, "data.val_sequences: must not be negative")
        _require(self.sequences_per_shard > 0, "data.sequences_per_shard: must be positive")
        return self


@_section("tokens")
class TokensConfig:
    """Downsampling of the raw frames and their uniform quantization into discrete tokens."""

    frame_size: Integer
    levels: Integer
    downsample: typing.Literal["area", "bilinear"]
    # How tokens become pixels: `mean` (each level's mean intensity over the training split, measured by the
    # quantize stage) or `centre` (the recipe's bin centres, (token + 0.5) / levels)
    decode: typing.Literal["mean", "centre"]

    @model_validator(mode="after")
    def _check_ranges(self) -> Any:
        _require(self.frame_size > 0, "tokens.frame_size: must be positive")
        _require(2 <= self.levels <= 255, "tokens.levels: must be in [2, 255] (uint8 tokens plus a mask id)")
        return self


@_section("actions")
class ActionsConfig:
    """Ego-centric actions: from ground truth where the source has it, else by tracking."""

    threshold: Number  # ink level in [0, 1] above which a pixel belongs to a digit when tracking
    min_area: Integer  # connected components smaller than this (pixels, tracking resolution) are noise
    tracking_size: Integer  # resolution the tracker runs at (64: the raw canvas)

    @model_validator(mode="after")
    def _check_ranges(self) -> Any:
        _require(0 < self.threshold < 1, "actions.threshold: must be in (0, 1)")
        _require(self.min_area >= 1, "actions.min_area: must be at least 1")
        _require(self.tracking_size > 0, "actions.tracking_size: must be positive")
        return self


@_section("model")
class ModelConfig:
    """Transformer hyper-parameters; frame size, levels and frame count come from the token store."""

    layers: Integer
    embed_dim: Integer
    heads: Integer
    mlp_ratio: Number
    dropout: Number
    patch_size: Integer  # p x p tokens per transformer position (1: one token per position, the recipe)
    spatial_bias: Boolean  # a learned bias per head and (dy, dx) offset in spatial attention (Swin's)
    # factorised: attention within each frame, then across frames at each position (the recipe);
    # joint: one attention over every position of every frame (causal in time), a single hop for motion
    attention: typing.Literal["factorised", "joint"]

    @model_validator(mode="after")
    def _check_ranges(self) -> Any:
        _require(self.layers >= 1, "model.layers: must be at least 1")
        _require(self.patch_size >= 1, "model.patch_size: must be at least 1")
        _require(self.heads >= 1, "model.heads: must be at least 1")
        _require(
            self.embed_dim % self.heads == 0,
            f"model.embed_dim: {self.embed_dim} is not divisible by model.heads={self.heads}",
        )
        _require(self.mlp_ratio > 0, "model.mlp_ratio: must be positive")
        _require(0 <= self.dropout < 1, "model.dropout: must be in [0, 1)")
        return self


OBJECTIVES = ("future", "joint", "individual")


@_section("train")
class TrainConfig:
    """The training loop, its objectives and its budget."""

    epochs: Integer
    max_train_sequences: Integer  # use only the first N of the train split (0: all of it)
    sequences_per_epoch: Integer  # a fresh random draw of this many training sequences per epoch (0: all)
    max_val_sequences: Integer  # validate on only the first N of the validation split (0: all of it)
    batch_size: Integer
    lr: Number
    min_lr: Number
    weight_decay: Number
    betas: Pair  # AdamW's; CoPilot4D: (0.9, 0.95)
    warmup_steps: Integer  # linear LR warm-up from 0 before the cosine decay; CoPilot4D: 2000
    grad_clip: Number
    past_frames: Integer
    mask_ratio: Pair
    objectives: dict[Text, Number]
    mask_schedule: typing.Literal["uniform", "cosine"]
    noise_eta: Number  # CoPilot4D: replace up to this share of the unmasked tokens with random ones
    label_smoothing: Number
    checkpoint_every: Integer
    log_every: Integer  # training steps between logged loss values
    point_sequences: Integer  # validation sequences whose point prediction is scored after every epoch
    device: typing.Literal["auto", "cpu", "cuda", "mps"]
    # auto: bf16 autocast where the device computes bf16 natively (CUDA, CPUs with AVX512-BF16/AMX), else fp32
    precision: typing.Literal["auto", "bf16", "fp32"]
    compile: Boolean
    nproc: Integer
    seed: Integer

    @model_validator(mode="after")
    def _check_ranges(self) -> Any:
        _require(self.epochs >= 1, "train.epochs: must be at least 1")
        _require(self.max_train_sequences >= 0, "train.max_train_sequences: must not be negative")
        _require(self.sequences_per_epoch >= 0, "train.sequences_per_epoch: must not be negative")
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
        return self


@_section("sample")
class SampleConfig:
    """Iterative unmasking: steps, order, temperature and classifier-free guidance."""

    steps: Integer
    mode: typing.Literal["joint", "autoregressive"]
    temperature: Number
    guidance: Number
    seed: Integer

    @model_validator(mode="after")
    def _check_ranges(self) -> Any:
        _require(self.steps >= 1, "sample.steps: must be at least 1")
        _require(self.temperature >= 0, "sample.temperature: must not be negative")
        _require(self.guidance >= 0, "sample.guidance: must not be negative")
        return self


@_section("eval")
class EvalConfig:
    """How much of the validation split is scored, and how many pictures are drawn."""

    sequences: Integer
    batch_size: Integer
    samples: Integer  # sampled futures per sequence: the first scored as `sampled`, all as best-of-N
    strips: Integer
    generations: Integer

    @model_validator(mode="after")
    def _check_ranges(self) -> Any:
        _require(self.sequences >= 1, "eval.sequences: must be at least 1")
        _require(self.batch_size >= 1, "eval.batch_size: must be at least 1")
        _require(self.samples >= 1, "eval.samples: must be at least 1")
        _require(self.strips >= 0, "eval.strips: must not be negative")
        _require(self.generations >= 0, "eval.generations: must not be negative")
        return self


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "tokens": TokensConfig,
    "actions": ActionsConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "sample": SampleConfig,
    "eval": EvalConfig,
}


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error, not a silent override."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(path: Path, error: yaml.YAMLError) -> str:
    """A YAML error as one line: where (line, column) and what, without PyYAML's multi-line excerpt."""
    mark = getattr(error, "problem_mark", None)
    where = f"{path}: line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    if "'\\t'" in problem:
        problem += " (indent with spaces: YAML forbids tabs)"
    return f"{where}: not valid YAML: {problem}; fix the file"


def read_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read the raw params file, with a one-line error when it is missing, not YAML or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        params = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as error:
        raise ConfigError(_yaml_problem(path, error)) from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not a text file (byte {error.start} is not UTF-8)") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the params file ({error.strerror})") from None
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
