"""Frozen configuration objects, one per `params.yaml` section, validated by pydantic.

Each section is read once, checked key by key (unknown keys, missing keys, wrong types and out-of-range values
fail with one line naming the key) and then passed down; nothing else in the library reads `params.yaml`.
No field has a default: `params.yaml` is the one place a value lives.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

from pydantic import model_validator

from mnist_world.config.checks import (
    Boolean,
    ConfigError,
    Integer,
    Number,
    Pair,
    Text,
    build,
    require,
    section,
)
from mnist_world.config.params_file import read_params

DIGIT_SIZE = 28  # MNIST digits are 28x28 at the raw canvas resolution: the generator, the tracker and
# the canvas check depend on it


@section("data")
class DataConfig:
    """Where raw frames come from, how the generator draws them, and the train/validation/test split."""

    source: typing.Literal["generate", "url", "file"]
    num_sequences: Integer
    seed: Integer
    frames: Integer
    canvas: Integer
    digits: Integer
    speed: Number  # fraction of the free range (canvas - DIGIT_SIZE) moved per frame
    # bounce: every digit keeps its heading and bounces off the walls (Srivastava et al.); driven: the ego
    # digit (the most ink) also turns to a random heading with probability turn_probability each frame
    ego_motion: typing.Literal["bounce", "driven"]
    turn_probability: Number
    url: Text
    sha256: Text
    size_bytes: Integer
    path: Text
    train_sequences: Integer
    val_sequences: Integer
    test_sequences: Integer  # after validation; only the evaluate stage reads them
    sequences_per_shard: Integer

    @model_validator(mode="after")
    def _check_ranges(self) -> Any:
        require(self.num_sequences > 0, "data.num_sequences: must be positive")
        require(self.frames >= 2, "data.frames: must be at least 2")
        require(
            self.canvas > DIGIT_SIZE, f"data.canvas: must be larger than a {DIGIT_SIZE}x{DIGIT_SIZE} digit"
        )
        require(self.digits >= 1, "data.digits: must be at least 1")
        require(self.speed > 0, "data.speed: must be positive")
        require(0 <= self.turn_probability <= 1, "data.turn_probability: must be in [0, 1]")
        require(self.train_sequences > 0, "data.train_sequences: must be positive")
        require(self.val_sequences >= 0, "data.val_sequences: must not be negative")
        # The splits are checked against the sequences a store holds where they are read (split_range)
        require(self.test_sequences >= 0, "data.test_sequences: must not be negative")
        require(self.sequences_per_shard > 0, "data.sequences_per_shard: must be positive")
        return self


@section("tokens")
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
        require(self.frame_size > 0, "tokens.frame_size: must be positive")
        require(2 <= self.levels <= 255, "tokens.levels: must be in [2, 255] (uint8 tokens plus a mask id)")
        return self


@section("actions")
class ActionsConfig:
    """Ego-centric actions: from ground truth where the source has it, else by tracking."""

    threshold: Number  # ink level in [0, 1] above which a pixel belongs to a digit when tracking
    min_area: Integer  # connected components smaller than this (pixels, tracking resolution) are noise
    tracking_size: Integer  # resolution the tracker runs at (64: the raw canvas)

    @model_validator(mode="after")
    def _check_ranges(self) -> Any:
        require(0 < self.threshold < 1, "actions.threshold: must be in (0, 1)")
        require(self.min_area >= 1, "actions.min_area: must be at least 1")
        require(self.tracking_size > 0, "actions.tracking_size: must be positive")
        return self


@section("model")
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
    # input: a linear map of the action added to its frame's positions before the first layer (the recipe);
    # blocks: the action in token pixels through an MLP, added before the first layer and again, through a
    # linear map of its own, before every layer, so that deep layers read the command as directly as the first
    action_conditioning: typing.Literal["input", "blocks"]
    # a depthwise 3x3 convolution over each frame's positions on the MLP's hidden layer, started at zero
    # (PVTv2's ConvFFN); false: the plain MLP (the recipe)
    mlp_conv: Boolean

    @model_validator(mode="after")
    def _check_ranges(self) -> Any:
        require(self.layers >= 1, "model.layers: must be at least 1")
        require(self.patch_size >= 1, "model.patch_size: must be at least 1")
        require(self.heads >= 1, "model.heads: must be at least 1")
        require(
            self.embed_dim % self.heads == 0,
            f"model.embed_dim: {self.embed_dim} is not divisible by model.heads={self.heads}",
        )
        require(self.mlp_ratio > 0, "model.mlp_ratio: must be positive")
        require(0 <= self.dropout < 1, "model.dropout: must be in [0, 1)")
        return self


OBJECTIVES = ("future", "joint", "individual", "next")


@section("train")
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
    cut_past: Number  # share of `future` sequences given only 1..past_frames - 1 frames, the rest hidden
    mask_ratio: Pair
    objectives: dict[Text, Number]
    mask_schedule: typing.Literal["uniform", "cosine"]
    noise_eta: Number  # CoPilot4D: replace up to this share of the unmasked tokens with random ones
    frame_ratios: Number  # share of `future` sequences whose future frames each draw their own mask ratio
    action_dropout: Number  # share of training sequences whose actions are hidden (action guidance needs it)
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
        require(self.epochs >= 1, "train.epochs: must be at least 1")
        require(self.max_train_sequences >= 0, "train.max_train_sequences: must not be negative")
        require(self.sequences_per_epoch >= 0, "train.sequences_per_epoch: must not be negative")
        require(self.max_val_sequences >= 0, "train.max_val_sequences: must not be negative")
        require(self.batch_size >= 1, "train.batch_size: must be at least 1")
        require(self.lr > 0, "train.lr: must be positive")
        require(0 <= self.min_lr <= self.lr, "train.min_lr: must be in [0, train.lr]")
        require(self.weight_decay >= 0, "train.weight_decay: must not be negative")
        require(all(0 <= beta < 1 for beta in self.betas), "train.betas: each must be in [0, 1)")
        require(self.warmup_steps >= 0, "train.warmup_steps: must not be negative")
        require(self.log_every >= 1, "train.log_every: must be at least 1")
        require(self.point_sequences >= 0, "train.point_sequences: must not be negative")
        require(self.grad_clip > 0, "train.grad_clip: must be positive")
        require(self.past_frames >= 1, "train.past_frames: must be at least 1")
        require(0 <= self.cut_past <= 1, "train.cut_past: must be in [0, 1]")
        low, high = self.mask_ratio
        require(0 < low <= high <= 1, "train.mask_ratio: expected [low, high] with 0 < low <= high <= 1")
        unknown = sorted(set(self.objectives) - set(OBJECTIVES))
        require(
            not unknown,
            f"train.objectives.{unknown[0] if unknown else ''}: unknown objective "
            f"(known: {', '.join(OBJECTIVES)})",
        )
        require(
            all(w >= 0 for w in self.objectives.values()), "train.objectives: weights must not be negative"
        )
        require(
            abs(sum(self.objectives.values()) - 1.0) < 1e-6,
            f"train.objectives: weights must sum to 1, got {sum(self.objectives.values()):g}",
        )
        require(
            self.nproc == 1 or not self.objectives.get("next"),
            "train.objectives.next: needs train.nproc 1 (its two model passes a step are not synchronised "
            "across processes)",
        )
        require(0 <= self.noise_eta < 1, "train.noise_eta: must be in [0, 1)")
        require(0 <= self.frame_ratios <= 1, "train.frame_ratios: must be in [0, 1]")
        require(0 <= self.action_dropout < 1, "train.action_dropout: must be in [0, 1)")
        require(0 <= self.label_smoothing < 1, "train.label_smoothing: must be in [0, 1)")
        require(self.checkpoint_every >= 1, "train.checkpoint_every: must be at least 1")
        require(self.nproc >= 1, "train.nproc: must be at least 1")
        return self


@section("sample")
class SampleConfig:
    """Iterative unmasking: steps, order, temperature and classifier-free guidance (on the past, on the
    actions)."""

    steps: Integer
    mode: typing.Literal["joint", "autoregressive"]
    temperature: Number
    choice_temperature: Number  # scale of the Gumbel noise on the confidences (MaskGIT; CoPilot4D: 4.5)
    guidance: Number
    action_guidance: Number
    seed: Integer

    @model_validator(mode="after")
    def _check_ranges(self) -> Any:
        require(self.steps >= 1, "sample.steps: must be at least 1")
        require(self.temperature >= 0, "sample.temperature: must not be negative")
        require(self.choice_temperature >= 0, "sample.choice_temperature: must not be negative")
        require(self.guidance >= 0, "sample.guidance: must not be negative")
        require(self.action_guidance >= 0, "sample.action_guidance: must not be negative")
        return self


@section("eval")
class EvalConfig:
    """How much of the validation split is scored, and how many pictures are drawn."""

    sequences: Integer
    batch_size: Integer
    samples: Integer  # sampled futures per sequence: the first scored as `sampled`, all as best-of-N
    strips: Integer
    generations: Integer

    @model_validator(mode="after")
    def _check_ranges(self) -> Any:
        require(self.sequences >= 1, "eval.sequences: must be at least 1")
        require(self.batch_size >= 1, "eval.batch_size: must be at least 1")
        require(self.samples >= 1, "eval.samples: must be at least 1")
        require(self.strips >= 0, "eval.strips: must not be negative")
        require(self.generations >= 0, "eval.generations: must not be negative")
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
