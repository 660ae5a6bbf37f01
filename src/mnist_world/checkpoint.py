"""Self-describing checkpoints: weights plus the architecture and params that produced them.

Written atomically (a crash never leaves a torn file under the final name) and read with
`torch.load(weights_only=True)`, so loading a checkpoint never executes code from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mnist_world.model import Architecture, WorldModel, build_model
from mnist_world.store import atomic_path

FORMAT = "mnist_world.checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, truncated, or not one of ours."""


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write `payload` (which must hold `model` weights and `architecture`) atomically to `path`."""
    missing = {"model", "architecture"} - set(payload)
    if missing:
        raise ValueError(f"checkpoint payload lacks {sorted(missing)}")
    with atomic_path(path) as temporary:
        torch.save({"format": FORMAT, **payload}, temporary)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely, with a one-line error naming the file for anything but a good one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found (run the train stage first)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated zip, foreign pickle, random bytes: all unreadable to us
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: corrupt or unreadable checkpoint ({reason})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint of this project (expected format {FORMAT})")
    return payload


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[WorldModel, dict[str, Any]]:
    """Rebuild the model from the checkpoint alone (its stored architecture) and load its weights."""
    payload = load_checkpoint(path, map_location=device)
    try:
        model = build_model(Architecture(**payload["architecture"]))
        model.load_state_dict(payload["model"])
    except (TypeError, RuntimeError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0]
        raise CheckpointError(
            f"{path}: weights do not match the stored architecture ({first_line})"
        ) from None
    return model.to(device).eval(), payload
