"""What several test files share: configs built from the repository's params.yaml with a test's own
values on top, tiny architectures, and one torch thread for tiny models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

from mnist_world import config
from mnist_world.config import ModelConfig
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


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread; on a busy 2-core machine every parallel region would wait for a
    descheduled thread (40x slower steps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
