"""What several test files share: configs built from the repository's params.yaml with a test's own
values on top, tiny architectures, the validation stores of generated sequences, and one torch thread for tiny
models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import torch

from mnist_world import config
from mnist_world.actions.ego import actions_from_centres, ego_centres
from mnist_world.config import DataConfig, ModelConfig
from mnist_world.core.store import create_store, write_sequences
from mnist_world.data.frames import downsample
from mnist_world.data.sources import GeneratedSequences
from mnist_world.data.tokens import quantize, token_attributes
from mnist_world.model.network import Architecture

ROOT = Path(__file__).resolve().parents[1]
C = TypeVar("C")


def params_section(section: str, **overrides: Any) -> dict[str, Any]:
    """The repository's params.yaml section `section` as a mapping, with `overrides` replacing its keys."""
    return {**config.read_params(ROOT / "params.yaml")[section], **overrides}


def from_params(cls: type[C], **overrides: Any) -> C:
    """The config `cls` (DataConfig, TrainConfig...) of the repository's params.yaml, with `overrides`."""
    section = cls.SECTION  # type: ignore[attr-defined]
    return config.build(cls, section, params_section(section, **overrides))


TINY_MODEL = {
    "layers": 1,
    "embed_dim": 16,
    "heads": 2,
    "dropout": 0.1,
    "patch_size": 1,
    "spatial_bias": False,
    "attention": "factorised",
}


def tiny_architecture(levels: int, frame_size: int, frames: int, **model: Any) -> Architecture:
    """A one-layer, 16-wide, factorised model of this geometry, with `model` values on top."""
    model_config = from_params(ModelConfig, **{**TINY_MODEL, **model})
    return Architecture.from_config(model_config, levels=levels, frame_size=frame_size, frames=frames)


TRACKING = {"threshold": 0.2, "min_area": 4, "size": 64, "digits": 2}


def write_validation_stores(
    root: Path, generated: GeneratedSequences, data: DataConfig, size: int, levels: int
) -> tuple[np.ndarray, np.ndarray]:
    """frames.zarr, tokens.zarr (each level's mean over the training split) and actions.zarr (from the true
    ego centres) of `generated` at size x size under `root`, in shards of 4 sequences; returns the frames
    (N, T, size, size) in [0, 1] and the tokens."""
    frames = downsample(generated.frames, size)
    tokens = quantize(frames, levels)
    train = slice(0, data.train_sequences)
    means = [float(frames[train][tokens[train] == level].mean()) for level in range(levels)]
    centres = ego_centres(generated.centers, generated.ink) * (size / data.canvas)
    stores = {
        "frames": (
            frames,
            {"frame_size": size, "canvas": data.canvas, "frames": data.frames, "source": "generate"},
        ),
        "tokens": (
            tokens,
            {**token_attributes(levels, size, data.frames, "generate"), "bin_means": means},
        ),
        "actions": (
            actions_from_centres(centres, size),
            {"frame_size": size, "canvas": data.canvas, "tracking": TRACKING},
        ),
    }
    for name, (array, attributes) in stores.items():
        with create_store(root / f"{name}.zarr", attributes) as group:
            write_sequences(group, name, array, sequences_per_shard=4)
    return frames, tokens


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread; on a busy 2-core machine every parallel region would wait for a
    descheduled thread (40x slower steps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
