"""One training epoch: this rank's batches of the epoch's draw, one objective per batch, the loss logged
every few steps, and a stop on every rank together at the first non-finite loss.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from tqdm import tqdm

from mnist_world.config import TrainConfig
from mnist_world.core.randomness import derived_seed
from mnist_world.model.masking import choose_objectives
from mnist_world.training.distributed import Process
from mnist_world.training.learner import Learner, train_step

NO_BAD_STEP = 2**62  # "no non-finite loss yet": above any step, so a MIN across ranks finds the first bad one
# Each random stream has its own seed, derived from (train.seed, stream, epoch, rank...), so that none
# depends on how much another consumed: a resumed run redraws exactly what it would have drawn.
SHUFFLE, OBJECTIVES, MASKS, DROPOUT = range(4)  # validation.VALIDATION_STREAM is 4


class DivergenceError(RuntimeError):
    """The loss became NaN or infinite; training stops before such weights reach a checkpoint."""


class Sequences(NamedTuple):
    """A split held in memory: tokens uint8 (N, T, H, W) and actions float32 (N, T, 2)."""

    tokens: Tensor
    actions: Tensor


def epoch_batches(
    count: int, config: TrainConfig, epoch: int, process: Process, device: torch.device
) -> list[Tensor]:
    """This rank's batches of sequence indices for `epoch`, on `device`: all `count` sequences, or a fresh
    random draw of train.sequences_per_epoch of them (more epochs, each on data it has seen less).

    The permutation is seeded by (seed, epoch) alone, so a resumed run sees the same order; each rank takes
    every world_size-th index of an equal share, so all ranks run the same number of steps.
    """
    generator = torch.Generator().manual_seed(derived_seed(config.seed, SHUFFLE, epoch))
    order = torch.randperm(count, generator=generator)[: epoch_size(count, config)]
    usable = len(order) // process.world_size * process.world_size
    return list(order[:usable][process.rank :: process.world_size].to(device).split(config.batch_size))


def epoch_size(count: int, config: TrainConfig) -> int:
    """Training sequences per epoch, of the `count` in the split."""
    return min(count, config.sequences_per_epoch) if config.sequences_per_epoch else count


def steps_per_epoch(count: int, config: TrainConfig, process: Process) -> int:
    return math.ceil(epoch_size(count, config) // process.world_size / config.batch_size)


def train_epoch(
    net: torch.nn.Module,
    learner: Learner,
    data: Sequences,
    config: TrainConfig,
    epoch: int,
    process: Process,
    amp: torch.dtype | None,
    progress: bool,
    on_log: Callable[[dict[str, Any]], None],
) -> float:
    """One pass over this rank's share of the data; returns the mean batch loss. Every train.log_every
    steps `on_log` receives {"step", "loss" (mean over those steps and ranks), "lr"}."""
    device = data.tokens.device
    batches = epoch_batches(data.tokens.shape[0], config, epoch, process, device)
    objectives = choose_objectives(
        config, len(batches), torch.Generator().manual_seed(derived_seed(config.seed, OBJECTIVES, epoch))
    )
    masks = torch.Generator(device=device).manual_seed(derived_seed(config.seed, MASKS, epoch, process.rank))
    loss_sum, window_sum = torch.zeros((), device=device), torch.zeros((), device=device)
    window_start = 0
    first_bad_step = torch.full((), NO_BAD_STEP, dtype=torch.int64, device=device)
    bar = tqdm(
        total=len(batches),
        desc=f"epoch {epoch}/{config.epochs}",
        unit="batch",
        disable=not (progress and process.is_main),
        dynamic_ncols=True,
        leave=True,
    )
    started = time.perf_counter()
    for step, (indices, objective) in enumerate(zip(batches, objectives, strict=True), start=1):
        lr = learner.scheduler.get_last_lr()[0]
        loss = train_step(
            net, learner, data.tokens[indices].long(), data.actions[indices], objective, config, masks, amp
        )
        loss_sum += loss
        window_sum += loss
        first_bad_step = torch.where(torch.isfinite(loss) | (first_bad_step < step), first_bad_step, step)
        # A GPU must not wait for the host: losses stay on the device until a log line needs them.
        if learner.step % config.log_every == 0 or step == len(batches):
            stop_if_diverged(first_bad_step, epoch, process)
            mean = process.sum(window_sum).item() / ((step - window_start) * process.world_size)
            on_log({"step": learner.step, "loss": mean, "lr": lr})
            window_sum.zero_()
            window_start = step
            rate = step * config.batch_size * process.world_size / max(time.perf_counter() - started, 1e-9)
            bar.set_postfix(loss=f"{mean:.4f}", seq_per_s=f"{rate:.2f}", refresh=False)
            bar.update(step - bar.n)
    bar.close()
    return process.sum(loss_sum).item() / (len(batches) * process.world_size)


def stop_if_diverged(first_bad_step: Tensor, epoch: int, process: Process) -> None:
    """Raise (on every rank together, so none waits forever in an all-reduce) at the first non-finite loss."""
    step = int(process.minimum(first_bad_step).item())
    if step != NO_BAD_STEP:
        raise DivergenceError(
            f"non-finite training loss at epoch {epoch}, step {step}: stopped without checkpointing these "
            f"weights (lower train.lr, or check the data for infinite actions)"
        )
