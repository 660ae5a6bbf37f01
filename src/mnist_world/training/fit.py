"""A training run: the data checked, the learner built or resumed, then epochs (`training_epoch`) with
validation of the point prediction's error, curves, self-describing checkpoints and exact resume after an
interruption, in one process or under DDP.

`fit` is the entry point of the train stage and the GPU script: stores and params in, checkpoints out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mnist_world.config import DataConfig, ModelConfig, TrainConfig, as_dict
from mnist_world.core.devices import autocast_dtype, keep_freed_memory, resolve_device
from mnist_world.core.randomness import derived_seed, rng_state
from mnist_world.data.dataset import load_split
from mnist_world.data.tokens import Vocabulary
from mnist_world.model.checkpoint import BEST, LAST, load_checkpoint, verify_checkpoint
from mnist_world.model.network import Architecture
from mnist_world.training.distributed import Process, close_process, init_process
from mnist_world.training.epoch import DROPOUT, DivergenceError, Sequences, steps_per_epoch, train_epoch
from mnist_world.training.learner import Learner
from mnist_world.training.log import TrainingLog
from mnist_world.training.run_folder import (
    last_good_state,
    restore_set_aside,
    save_epoch,
    start_or_resume,
    stopped_state,
)
from mnist_world.training.validation import Validation


def run_params(model: ModelConfig, train: TrainConfig, data: DataConfig) -> dict[str, Any]:
    """The params a checkpoint records and a resume must match: model, train and the data split."""
    return {
        "model": as_dict(model),
        "train": as_dict(train),
        "data": {"train_sequences": data.train_sequences, "val_sequences": data.val_sequences},
    }


def data_fingerprint(*splits: Sequences) -> str:
    """A digest of the training and validation data, so a resume never continues on different data."""
    digest = hashlib.sha256()
    for split in splits:
        for tensor in split:
            digest.update(str((tuple(tensor.shape), str(tensor.dtype))).encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def limit(split: Sequences, count: int) -> Sequences:
    tokens, actions = split
    return Sequences(tokens[:count], actions[:count]) if count else Sequences(tokens, actions)


def check_data(split: Sequences, arch: Architecture, name: str, minimum: int) -> None:
    tokens, actions = split
    expected = (arch.frames, arch.frame_size, arch.frame_size)
    if tokens.ndim != 4 or tuple(tokens.shape[1:]) != expected:
        raise ValueError(
            f"{name} tokens: expected (N, {', '.join(map(str, expected))}), got {tuple(tokens.shape)}"
        )
    if tuple(actions.shape) != (tokens.shape[0], arch.frames, arch.action_dim):
        raise ValueError(
            f"{name} actions: expected ({tokens.shape[0]}, {arch.frames}, 2), got {tuple(actions.shape)}"
        )
    if tokens.shape[0] < minimum:
        raise ValueError(f"{name} split: {tokens.shape[0]} sequences, need at least {minimum}")
    if tokens.numel() and int(tokens.max()) >= arch.levels:
        raise ValueError(f"{name} tokens: ids up to {int(tokens.max())}, the model has {arch.levels} levels")


# --- The run --------------------------------------------------------------------------------------------


def train(
    config: TrainConfig,
    arch: Architecture,
    train_data: tuple[Tensor, Tensor],
    val_data: tuple[Tensor, Tensor],
    output_dir: str | Path = "models",
    reports_dir: str | Path | None = "reports/train",
    params: dict[str, Any] | None = None,
    progress: bool = True,
    fresh: bool = False,
    echo: Callable[[str], None] = print,
    deadline: float | None = None,
    vocabulary: Vocabulary | None = None,
) -> dict[str, Any]:
    """Train (or resume training) a WorldModel; write checkpoints to `output_dir` and the curves to
    `reports_dir` (None: no logs). Returns the last epoch's metrics plus `best_val_loss` and `epoch`.

    train_data / val_data: (tokens uint8 (N, T, H, W), actions float32 (N, T, 2)), cut here to
    train.max_train_sequences / max_val_sequences. `params` (see `run_params`) is recorded in every
    checkpoint; `last.pt` is resumed only when its params, architecture and data all match, and never when
    `fresh`. `deadline` (a `time.monotonic()` value) ends training cleanly after the first epoch that passes
    it. `vocabulary` decodes tokens for the point prediction's error (bin centres when None). Under torchrun
    (WORLD_SIZE > 1) every process calls this; rank 0 alone writes files.
    """
    keep_freed_memory()
    process = init_process(config.device)
    vocabulary = vocabulary or Vocabulary.uniform(arch.levels, arch.frame_size, arch.frames)
    try:
        run = _Run(config, arch, process, echo, vocabulary)
        splits = Sequences(*train_data), Sequences(*val_data)
        return run.train(*splits, Path(output_dir), reports_dir, params or {}, progress, fresh, deadline)
    finally:
        close_process(process)


@dataclasses.dataclass
class _Run:
    """One call of `train`: its settings, and the steps from the data to the last checkpoint."""

    config: TrainConfig
    arch: Architecture
    process: Process
    echo: Callable[[str], None]
    vocabulary: Vocabulary

    def say(self, message: str) -> None:
        if self.process.is_main:
            self.echo(message)

    def train(
        self,
        train_split: Sequences,
        val_split: Sequences,
        output_dir: Path,
        reports_dir: str | Path | None,
        params: dict[str, Any],
        progress: bool,
        fresh: bool,
        deadline: float | None,
    ) -> dict[str, Any]:
        """Check the data, build or resume the learner, run the epochs. On a failure before this run's first
        checkpoint the previous run's checkpoints and curves come back; the error says where the last good
        state is."""
        config, arch, process = self.config, self.arch, self.process
        device = resolve_device(config.device, process.local_rank)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 work autocast leaves
        train_split = limit(train_split, config.max_train_sequences)
        val_split = limit(val_split, config.max_val_sequences)
        check_data(train_split, arch, "train", minimum=process.world_size)
        check_data(val_split, arch, "validation", minimum=1)
        if not 0 < config.past_frames < arch.frames:
            raise ValueError(f"train.past_frames={config.past_frames} must be in [1, {arch.frames - 1}]")
        expected = {
            "architecture": dataclasses.asdict(arch),
            "params": params,
            "data_fingerprint": data_fingerprint(train_split, val_split),
            "vocabulary": dataclasses.asdict(self.vocabulary),
        }
        total_steps = config.epochs * steps_per_epoch(train_split.tokens.shape[0], config, process)
        learner = Learner.build(arch, config, total_steps, device)
        # Dropout draws from the global generator: give each rank its own stream (a resume restores it).
        torch.manual_seed(derived_seed(config.seed, DROPOUT, process.rank))
        try:
            start_or_resume(learner, output_dir, expected, fresh, process, self.say)
            # The splits are small (10,000 x 20 x 32 x 32 uint8 = 205 MB at most): keep them on the device.
            splits = (
                Sequences(*(tensor.to(device) for tensor in split)) for split in (train_split, val_split)
            )
            return self.epochs(learner, expected, *splits, output_dir, reports_dir, progress, deadline)
        except BaseException as error:
            if not process.is_main:
                raise
            restored = restore_set_aside(output_dir)
            if restored:  # failed before its first checkpoint: the previous run's stand
                self.say(f"{output_dir}: the previous run's checkpoints are back in place")
            if reports_dir and (output_dir / LAST).exists():  # the curves as the last checkpoint left them
                payload = load_checkpoint(output_dir / LAST)
                summary = {"best_val_loss": payload["best_val_loss"], "epoch": payload["epoch"]}
                TrainingLog(reports_dir, payload["curve"]).write(summary)
            if isinstance(error, DivergenceError):
                raise DivergenceError(
                    f"{error}; the last good state is {last_good_state(output_dir)}"
                ) from None
            if not isinstance(error, Exception):  # Ctrl-C or SIGTERM: the one line says what is on disk
                error.add_note(stopped_state(output_dir, bool(restored)))
            raise

    def epochs(
        self,
        learner: Learner,
        expected: dict[str, Any],
        train_split: Sequences,
        val_split: Sequences,
        output_dir: Path,
        reports_dir: str | Path | None,
        progress: bool,
        deadline: float | None,
    ) -> dict[str, Any]:
        """The epochs still to run: train, validate, checkpoint and log each; stop at the deadline."""
        config, process = self.config, self.process
        device = train_split.tokens.device
        amp = autocast_dtype(config.precision, device)
        intensities = torch.tensor(self.vocabulary.intensities, dtype=torch.float32)
        validation = Validation.build(val_split, config, self.arch, intensities)
        evaluator, net = _networks(learner.model, config, process, device)
        log = TrainingLog(reports_dir, learner.curve) if reports_dir and process.is_main else None

        def on_log(row: dict[str, Any]) -> None:
            learner.curve.append(row)
            if log is not None:
                log.add(row)
                log.write()

        if learner.epoch >= config.epochs:
            verify_checkpoint(output_dir / BEST)  # what evaluation trusts (last.pt was checked on resume)
            self.say(
                f"{output_dir / LAST}: training already finished ({learner.epoch} epochs); logs rewritten"
            )
        elif log is not None:
            log.write()
        for epoch in range(learner.epoch + 1, config.epochs + 1):
            started = time.perf_counter()
            loss = train_epoch(net, learner, train_split, config, epoch, process, amp, progress, on_log)
            scores = validation.score(evaluator, config, process, amp)
            if not math.isfinite(scores["val_loss"]):
                raise DivergenceError(f"non-finite validation loss after epoch {epoch}: nothing checkpointed")
            record = {"epoch": epoch, "step": learner.step, "loss": loss, **scores}
            record["seconds"] = time.perf_counter() - started
            improved = scores["val_loss"] < learner.best_val_loss
            learner.epoch, learner.history = epoch, [*learner.history, record]
            learner.best_val_loss = min(scores["val_loss"], learner.best_val_loss)
            on_log({"step": learner.step, **scores})
            rng = process.gather(rng_state())
            if process.is_main:
                save_epoch(output_dir, learner.payload(expected, rng), improved, config)
                shown = ", ".join(f"{name} {value:.4f}" for name, value in scores.items())
                self.say(
                    f"epoch {epoch}/{config.epochs}: loss {loss:.4f}, {shown}, {record['seconds']:.1f} s"
                    + (" (best)" if improved else "")
                )
            process.barrier()
            out_of_time = deadline is not None and time.monotonic() > deadline
            if process.main_decides(out_of_time, device) and epoch < config.epochs:
                self.say(
                    f"time budget reached after epoch {epoch}/{config.epochs}: stopping with its checkpoints"
                )
                break
        last = learner.history[-1] if learner.history else {}
        if log is not None:
            log.end({"best_val_loss": learner.best_val_loss, "epoch": learner.epoch})
        return {**last, "best_val_loss": learner.best_val_loss, "epoch": learner.epoch}


def _networks(
    model: torch.nn.Module, config: TrainConfig, process: Process, device: torch.device
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The model as validation calls it (compiled if `train.compile`) and as training calls it (that, wrapped
    in DistributedDataParallel when there are several processes)."""
    evaluator = torch.compile(model) if config.compile else model
    if process.world_size == 1:
        return evaluator, evaluator
    ids = [device.index] if device.type == "cuda" else None
    return evaluator, torch.nn.parallel.DistributedDataParallel(evaluator, device_ids=ids)


def fit(
    model_config: ModelConfig,
    config: TrainConfig,
    data: DataConfig,
    tokens_path: str | Path,
    actions_path: str | Path,
    output_dir: str | Path = "models",
    reports_dir: str | Path | None = "reports/train",
    **options: Any,
) -> dict[str, Any]:
    """Train on the stores: the vocabulary and frame geometry from the token store, the architecture from
    `model_config`, the splits from `data`; `options` go to `train` (progress, fresh, echo, deadline)."""
    vocabulary = Vocabulary.from_store(tokens_path)
    arch = Architecture.from_config(model_config, vocabulary.levels, vocabulary.frame_size, vocabulary.frames)
    sizes = (data.train_sequences, data.val_sequences)
    train_data = load_split(tokens_path, actions_path, "train", *sizes, config.max_train_sequences)
    val_data = load_split(tokens_path, actions_path, "val", *sizes, config.max_val_sequences)
    params = run_params(model_config, config, data)
    return train(
        config, arch, train_data, val_data, output_dir, reports_dir, params, vocabulary=vocabulary, **options
    )
