"""Self-describing checkpoints: weights plus the architecture and params that produced them (the folder of a
run, with resume and its one writer, is `run_folder`).

Written atomically with a digest of every tensor (a crash never leaves a torn file under the final name, and a
damaged one is recognised) and read with `torch.load(weights_only=True)`, so loading a checkpoint never
executes code from it.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from mnist_world.core.atomic import atomic_path
from mnist_world.model.network import Architecture, WorldModel, build_model

FORMAT = "mnist_world.checkpoint/1"
LAST, BEST = "last.pt", "best.pt"
PATTERNS = (LAST, BEST, "epoch_*.pt")  # the checkpoints of one run
REQUIRED = ("model", "architecture", "params", "epoch")  # what the train and evaluate stages rely on
# What to do about a checkpoint that cannot be trusted, wherever it was met.
REMEDY = "restore it with `dvc checkout --force models` or retrain with `python stages/train.py --fresh`"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, damaged or not one of ours; or a checkpoint folder that
    another process is writing."""


# --- One file ----------------------------------------------------------------------------------------------


def tensor_digest(payload: Any) -> str:
    """sha256 over every tensor of `payload` (name, dtype, shape, bytes) in a fixed order, skipping `digest`.

    torch.load reads a flipped byte inside a tensor without complaint; this digest catches it.
    """
    digest = hashlib.sha256()

    def visit(value: Any, name: str) -> None:
        if isinstance(value, torch.Tensor):
            flat = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{name}:{flat.dtype}:{tuple(value.shape)}".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
        elif isinstance(value, dict):
            for key, item in value.items():
                if not (name == "" and key == "digest"):
                    visit(item, f"{name}/{key}")
        elif isinstance(value, list | tuple):
            for index, item in enumerate(value):
                visit(item, f"{name}/{index}")

    visit(payload, "")
    return digest.hexdigest()


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write `payload` (which must hold `model` weights and `architecture`) atomically to `path`.

    The bytes are made in memory and then written and synced, so a full disk is reported as such (WriteError
    naming the file) rather than as a torch serialization failure, and the previous file stays as it was.
    """
    missing = {"model", "architecture"} - set(payload)
    if missing:
        raise ValueError(f"checkpoint payload lacks {sorted(missing)}")
    payload = {"format": FORMAT, **payload}
    payload["digest"] = tensor_digest(payload)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with atomic_path(path) as temporary, temporary.open("wb") as handle:
        handle.write(buffer.getbuffer())
        handle.flush()
        os.fsync(handle.fileno())


def _unreadable(path: Path, error: BaseException) -> str:
    """Why torch.load failed, in our words: never torch's advice to load the file with weights_only=False."""
    text = str(error)
    if isinstance(error, EOFError) or path.stat().st_size == 0:
        reason = "empty file (its write never finished)"
    elif isinstance(error, pickle.UnpicklingError) and "GLOBAL" in text:
        wanted = text.split("GLOBAL", 1)[1].split()[0]
        reason = (
            f"refused: loading it would run code ({wanted}); a file of unknown origin must not be "
            "loaded any other way"
        )
    elif isinstance(error, pickle.UnpicklingError):
        reason = "not a PyTorch checkpoint (unreadable contents)"
    elif isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM, errno.EIO):
        reason = f"cannot read it ({error.strerror})"
    else:  # torch reports a cut zip file as a RuntimeError or an OSError (EINVAL), depending on where
        reason = "truncated or damaged (not a complete PyTorch zip file)"
    return f"{path}: corrupt or unsafe checkpoint: {reason}; {REMEDY}"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely, with a one-line error naming the file for anything but a good one.

    A checkpoint that records a digest of its tensors is checked against it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found (run the train stage first)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated zip, foreign pickle, random bytes: all unreadable to us
        raise CheckpointError(_unreadable(path, error)) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint of this project (expected format {FORMAT})")
    if "digest" in payload and payload["digest"] != tensor_digest(payload):
        raise CheckpointError(
            f"{path}: damaged: its tensors do not match the digest written with them; {REMEDY}"
        )
    return payload


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load `path` and check that it can be trusted: readable, ours, intact, complete and with finite weights.

    Returns the payload; raises CheckpointError naming the file and what to do otherwise.
    """
    payload = load_checkpoint(path)
    missing = [key for key in REQUIRED if key not in payload]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint (no {', '.join(missing)}); {REMEDY}")
    _check_weights(path, payload["model"])
    return payload


def _check_weights(path: str | Path, weights: Any) -> None:
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path}: its weights are not a state dict; {REMEDY}")
    for name, tensor in weights.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not tensor.isfinite().all():
            raise CheckpointError(f"{path}: weight '{name}' holds NaN or infinite values; {REMEDY}")


def with_unknown_action(weights: dict[str, Any], model: WorldModel) -> dict[str, Any]:
    """`weights` with the model's (zero) unknown-action embedding where the checkpoint predates it: such a
    model was never shown an unknown action, and action guidance warns about it (`train.action_dropout`)."""
    if "unknown_action" in weights or not hasattr(model, "unknown_action"):
        return weights
    return {**weights, "unknown_action": torch.zeros_like(model.unknown_action)}


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[WorldModel, dict[str, Any]]:
    """Rebuild the model from the checkpoint alone (its stored architecture) and load its weights, which must
    be finite (a model with NaN weights would only score NaN)."""
    payload = load_checkpoint(path, map_location=device)
    _check_weights(path, payload.get("model"))
    try:
        # Checkpoints written before model.action_conditioning and model.mlp_conv existed embedded actions at
        # the input and had the plain MLP.
        stored = {"action_conditioning": "input", "mlp_conv": False, **payload["architecture"]}
        model = build_model(Architecture(**stored))
        model.load_state_dict(with_unknown_action(payload["model"], model))
    except (TypeError, ValueError, RuntimeError, KeyError) as error:  # ValueError: ConfigError
        first_line = str(error).strip().splitlines()[0]
        raise CheckpointError(
            f"{path}: weights do not match the stored architecture ({first_line})"
        ) from None
    return model.to(device).eval(), payload
