"""What every playground session shares: the model rebuilt from a checkpoint and the validation sequences of
the stores, checked against each other once, when the checkpoint is loaded.

Every failure here is a `PlaygroundError` with one line that names the file: the server shows it on the page
and in its log and keeps running.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import torch

from mnist_world.core.store import StoreError
from mnist_world.data.dataset import split_range
from mnist_world.evaluation.stores import ValidationStores
from mnist_world.model.checkpoint import CheckpointError, load_model
from mnist_world.model.network import Architecture
from mnist_world.playground.dreamer import CallBatcher, Model


class PlaygroundError(ValueError):
    """Input the playground cannot use (a sequence, a checkpoint, a store, a request): one line to show."""


@dataclasses.dataclass(frozen=True)
class Sequence:
    """One validation sequence as the playground uses it."""

    index: int  # the sequence's row in the stores
    tokens: np.ndarray  # int64 (T, H, W)
    frames: np.ndarray  # float32 (T, H, W) in [0, 1]: the continuous truth
    actions: np.ndarray  # float32 (T, 2): the ego digit's true moves


class ValidationData(ValidationStores):
    """The validation split of the token, frame and action stores (see `ValidationStores`), one sequence at a
    time, and how tokens become pixels."""

    def __init__(
        self,
        tokens_path: str | Path,
        frames_path: str | Path,
        actions_path: str | Path,
        train_sequences: int,
        val_sequences: int,
        decode: str,
    ) -> None:
        try:
            super().__init__(tokens_path, frames_path, actions_path, decode)
            self.rows = split_range("val", train_sequences, val_sequences, self.tokens.shape[0])
        except (StoreError, ValueError) as error:
            raise PlaygroundError(str(error)) from None

    @property
    def length(self) -> int:
        """Frames per sequence."""
        return self.tokens.shape[1]

    @property
    def frame_size(self) -> int:
        return self.tokens.shape[-1]

    def sequence(self, index: int) -> Sequence:
        """The validation sequence at row `index` of the stores; an error naming the valid rows otherwise."""
        if index not in self.rows:
            raise PlaygroundError(
                f"sequence {index} is not a validation sequence "
                f"(valid: {self.rows.start}..{self.rows.stop - 1})"
            )
        return Sequence(
            index=index,
            tokens=np.asarray(self.tokens[index], dtype=np.int64),
            frames=np.asarray(self.frames[index], dtype=np.float32),
            actions=np.asarray(self.actions[index], dtype=np.float32),
        )

    def to_pixels(self, tokens: np.ndarray) -> np.ndarray:
        """Token frames (..., H, W) -> float32 pixels in [0, 1]: the one place the playground decodes."""
        return self.vocabulary.decode(tokens)

    @functools.cached_property
    def typical_step(self) -> float:
        """The median distance the ego digit moves per frame over the validation split, in action units: the
        size of one arrow-key step, so that steering moves the digit about as fast as the data does."""
        moves = np.asarray(self.actions[self.rows.start : self.rows.stop], dtype=np.float64)[:, 1:]
        speeds = np.linalg.norm(moves, axis=-1)
        moving = speeds[speeds > 0]
        return (
            float(np.median(moving)) if moving.size else 2.0 / self.frame_size
        )  # one pixel if nothing moves


@dataclasses.dataclass(frozen=True)
class World:
    """A model and the data it is played on, checked to fit each other."""

    model: Model
    data: ValidationData
    past_frames: int  # frames given before the dreaming starts: the checkpoint's train.past_frames
    checkpoint: str
    device: torch.device
    objectives: dict[str, float] | None = None  # what the checkpoint was trained on (guidance needs one)
    action_dropout: float = 0.0  # its share of sequences trained without actions (action guidance needs it)
    batcher: CallBatcher | None = None  # shares the model calls of the sessions dreaming at once

    @property
    def arch(self) -> Architecture:
        return self.model.arch


def check_fit(arch: Architecture, data: ValidationData, past_frames: int, checkpoint: str) -> None:
    """Raise when the checkpoint's model cannot play the stores' sequences."""
    vocabulary = data.vocabulary
    if (vocabulary.levels, data.frame_size) != (arch.levels, arch.frame_size):
        raise PlaygroundError(
            f"{checkpoint}: the model takes {arch.levels} levels of "
            f"{arch.frame_size}x{arch.frame_size} tokens, "
            f"but {data.tokens_path} holds {vocabulary.levels} levels of {data.frame_size}x{data.frame_size}"
        )
    if not 0 < past_frames < min(arch.frames, data.length):
        raise PlaygroundError(
            f"{checkpoint}: train.past_frames={past_frames} leaves no frame to dream in the model's "
            f"{arch.frames} frames and the stores' {data.length}"
        )


def load_world(
    checkpoint: str | Path, data: ValidationData, device: str | torch.device = "cpu", workers: int = 1
) -> World:
    """The checkpoint's model on `device`, checked against `data`; its sessions' frames dreamed by `workers`
    threads (`CallBatcher`)."""
    device = torch.device(device)
    try:
        model, payload = load_model(checkpoint, device)
    except CheckpointError as error:
        raise PlaygroundError(str(error)) from None
    train = payload.get("params", {}).get("train", {})
    if "past_frames" not in train:
        raise PlaygroundError(f"{checkpoint}: the checkpoint's params lack train.past_frames")
    past = int(train["past_frames"])
    check_fit(model.arch, data, past, str(checkpoint))
    dropout = float(train.get("action_dropout", 0.0))
    objectives = train.get("objectives")
    batcher = CallBatcher(model, workers)
    return World(model, data, past, str(checkpoint), device, objectives, dropout, batcher)
