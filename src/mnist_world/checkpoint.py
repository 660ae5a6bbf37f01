"""Self-describing checkpoints: weights plus the architecture and params that produced them, and the folder
that holds them (one writer at a time, the previous run's checkpoints kept until the new run has its own).

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
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from mnist_world.model import Architecture, WorldModel, build_model
from mnist_world.store import atomic_path

FORMAT = "mnist_world.checkpoint/1"
LAST, BEST = "last.pt", "best.pt"
PATTERNS = (LAST, BEST, "epoch_*.pt")  # the checkpoints of one run
SET_ASIDE = ".previous-run"  # where a new run keeps the previous run's checkpoints until it has its own
LOCK = ".lock"  # holds the PID of the one process writing the folder
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


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[WorldModel, dict[str, Any]]:
    """Rebuild the model from the checkpoint alone (its stored architecture) and load its weights, which must
    be finite (a model with NaN weights would only score NaN)."""
    payload = load_checkpoint(path, map_location=device)
    _check_weights(path, payload.get("model"))
    try:
        model = build_model(Architecture(**payload["architecture"]))
        model.load_state_dict(payload["model"])
    except (TypeError, RuntimeError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0]
        raise CheckpointError(
            f"{path}: weights do not match the stored architecture ({first_line})"
        ) from None
    return model.to(device).eval(), payload


# --- The folder: the previous run's checkpoints, kept until the new run has its own -------------------------


def checkpoints_in(output_dir: str | Path) -> list[Path]:
    """The checkpoints of the run in `output_dir` (last.pt, best.pt, epoch_*.pt), sorted."""
    output_dir = Path(output_dir)
    return sorted({path for pattern in PATTERNS for path in output_dir.glob(pattern) if path.is_file()})


def set_aside(output_dir: str | Path) -> Path | None:
    """Move the checkpoints of `output_dir` into `output_dir/.previous-run/` before a new run starts.

    They stay there until the new run has written its first good checkpoint (`discard_set_aside`) or has
    failed before that (`restore_set_aside`). Returns the folder, or None when there was nothing to keep.
    """
    output_dir = Path(output_dir)
    recover_set_aside(output_dir)
    found = checkpoints_in(output_dir)
    if not found:
        return None
    folder = output_dir / SET_ASIDE
    folder.mkdir()
    for path in found:
        path.rename(folder / path.name)
    return folder


def restore_set_aside(output_dir: str | Path) -> list[Path]:
    """Put the set-aside checkpoints back in place of whatever the failed new run left; the paths restored.

    Nothing happens (and nothing is returned) when nothing was set aside, e.g. once the new run has written
    its first good checkpoint: that checkpoint is then the last good state.
    """
    output_dir = Path(output_dir)
    folder = output_dir / SET_ASIDE
    if not folder.is_dir():
        return []
    for path in checkpoints_in(output_dir):
        path.unlink()
    restored = []
    for path in sorted(folder.iterdir()):
        path.rename(output_dir / path.name)
        restored.append(output_dir / path.name)
    folder.rmdir()
    return restored


def discard_set_aside(output_dir: str | Path) -> None:
    """Delete the set-aside checkpoints: the new run has written a good checkpoint of its own."""
    folder = Path(output_dir) / SET_ASIDE
    if folder.exists():
        shutil.rmtree(folder)


def recover_set_aside(output_dir: str | Path) -> list[Path]:
    """After a run that was killed (kill -9, power loss) with checkpoints set aside: restore them when the
    folder holds no checkpoint of its own, else discard them. Returns the paths restored."""
    output_dir = Path(output_dir)
    if not (output_dir / SET_ASIDE).is_dir():
        return []
    if checkpoints_in(output_dir):
        discard_set_aside(output_dir)
        return []
    return restore_set_aside(output_dir)


def last_good_state(output_dir: str | Path) -> str:
    """Where the last good state of `output_dir` is, in words: `models/last.pt (epoch 3)`, or that there is
    none."""
    path = Path(output_dir) / LAST
    try:
        payload = verify_checkpoint(path)
    except CheckpointError:
        return f"no usable checkpoint in {output_dir}"
    return f"{path} (epoch {payload['epoch']})"


# --- One writer at a time ----------------------------------------------------------------------------------


class ModelsLock:
    """One writer at a time for a checkpoint folder: `output_dir/.lock`, locked with flock, holds its PID.

    The kernel drops the lock when its process dies, so a lock file left by a killed run (kill -9, power
    loss) is stale and simply taken over; `took_over` then holds that run's PID. Use as a context manager;
    the lock file goes when the lock is released.
    """

    def __init__(self, output_dir: str | Path) -> None:
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK
        self.took_over: int | None = None
        self._descriptor: int | None = None

    def owner(self) -> int | None:
        """The PID written in the lock file, or None when there is none (or it is unreadable)."""
        try:
            return int(self.path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def acquire(self) -> ModelsLock:
        import fcntl  # POSIX only: imported where a writer needs it, so readers work everywhere

        self.output_dir.mkdir(parents=True, exist_ok=True)
        while True:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(descriptor)
                owner = self.owner()
                who = f"PID {owner}" if owner else "another process"
                stop = f" (kill {owner})" if owner else ""
                raise CheckpointError(
                    f"{self.output_dir}: another training run ({who}) is writing here; wait for it to finish "
                    f"or stop it{stop}, then run again"
                ) from None
            # The previous holder may have removed the file between our open and our lock: lock a fresh one.
            try:
                current = os.stat(self.path).st_ino == os.fstat(descriptor).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(descriptor)
        previous = os.read(descriptor, 64).split()
        if previous and previous[0].isdigit() and int(previous[0]) != os.getpid():
            self.took_over = int(previous[0])  # its process died holding the lock
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        self._descriptor = descriptor
        return self

    def release(self) -> None:
        if self._descriptor is None:
            return
        self.path.unlink(missing_ok=True)  # while still locked: nobody takes a lock on a file about to go
        os.close(self._descriptor)
        self._descriptor = None

    def __enter__(self) -> ModelsLock:
        return self.acquire()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.release()
