"""The recipe's own model and optimiser (RECIPE.md), whatever params.yaml's defaults: what the GPU script
trains and the throughput benchmark times. Everything else (data, sampling, scoring) comes from params.yaml.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from mnist_world import config
from mnist_world.config import ModelConfig, TrainConfig

MODEL = {
    "layers": 2,
    "embed_dim": 128,
    "heads": 4,
    "mlp_ratio": 4.0,
    "dropout": 0.1,
    "patch_size": 1,
    "spatial_bias": False,
    "attention": "factorised",
}
FULL_MODEL = {**MODEL, "layers": 6, "embed_dim": 384}  # the 14.6M model
TRAIN = {
    "max_train_sequences": 0,  # whole splits
    "max_val_sequences": 0,
    "batch_size": 4,
    "lr": 3e-4,
    "min_lr": 1e-6,
    "weight_decay": 0.01,
    "betas": (0.9, 0.999),
    "warmup_steps": 0,
    "grad_clip": 1.0,
    "past_frames": 10,
    "mask_ratio": (0.5, 1.0),
    "mask_schedule": "uniform",
    "objectives": {"future": 1.0},
    "noise_eta": 0.0,
    "label_smoothing": 0.0,
}
FULL_OBJECTIVES = {"future": 0.5, "joint": 0.4, "individual": 0.1}


def model_config(params: str | Path = "params.yaml", full: bool = False, **changes: Any) -> ModelConfig:
    """The recipe's model (`full`: the 14.6M one), with `changes` on top."""
    recipe = FULL_MODEL if full else MODEL
    return dataclasses.replace(config.load("model", params), **{**recipe, **changes})


def train_config(params: str | Path = "params.yaml", full: bool = False, **changes: Any) -> TrainConfig:
    """The recipe's optimiser and objective (`full`: its three objectives), with `changes` on top."""
    recipe = {**TRAIN, **({"objectives": FULL_OBJECTIVES} if full else {})}
    return dataclasses.replace(config.load("train", params), **{**recipe, **changes})
