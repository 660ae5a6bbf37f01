"""What training optimises and how one step goes: the model with AdamW (weight matrices decayed), the LR
schedule (linear warm-up, cosine decay), everything a checkpoint must hold to continue exactly, and the step
itself, which the training loop, the learning curves and the throughput benchmark share.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
from typing import Any

import torch
from torch import Tensor

from mnist_world.config import TrainConfig
from mnist_world.core.devices import autocast, describe_machine
from mnist_world.core.randomness import set_rng_state
from mnist_world.model.masking import (
    MaskedBatch,
    causal_mask,
    hide_actions,
    make_batch,
    masked_cross_entropy,
)
from mnist_world.model.network import Architecture, WorldModel


def configure_optimizer(model: WorldModel, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW that decays the weight matrices only (nanoGPT's rule): biases, norms, the position embeddings
    and the relative position bias, whose size says nothing about overfitting, are left undecayed."""
    decayed, undecayed = [], []
    for name, parameter in model.named_parameters():
        is_matrix = parameter.dim() >= 2 and not name.endswith(("_position", "spatial_bias.table"))
        (decayed if is_matrix else undecayed).append(parameter)
    groups = [
        {"params": decayed, "weight_decay": config.weight_decay},
        {"params": undecayed, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


def lr_factor(step: int, config: TrainConfig, total_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based) as a multiple of train.lr: linear warm-up over
    train.warmup_steps, then a cosine decay that reaches train.min_lr when all `total_steps` are done."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    decay_steps = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    floor = config.min_lr / config.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclasses.dataclass
class Learner:
    """The model and everything a checkpoint must hold to continue training it exactly."""

    model: WorldModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    best_val_loss: float = math.inf
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # one record per epoch
    curve: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # the logged rows, by step

    @classmethod
    def build(
        cls, arch: Architecture, config: TrainConfig, total_steps: int, device: torch.device
    ) -> Learner:
        torch.manual_seed(config.seed)  # identical initial weights on every rank
        model = WorldModel(arch).to(device)
        optimizer = configure_optimizer(model, config)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, config, total_steps)
        )
        return cls(model, optimizer, scheduler)

    def payload(self, expected: dict[str, Any], rng: list[dict[str, Any]]) -> dict[str, Any]:
        device = next(self.model.parameters()).device
        provenance = {  # where and when this checkpoint was made, and the run's wall time so far
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": describe_machine(device),
            "wall_seconds": sum(record.get("seconds", 0.0) for record in self.history),
        }
        return {
            "model": self.model.state_dict(),
            **expected,  # architecture, params, data_fingerprint, vocabulary
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,  # one entry per rank
            "epoch": self.epoch,
            "step": self.step,
            "best_val_loss": self.best_val_loss,
            "history": self.history,
            "curve": self.curve,
            "metrics": self.history[-1],  # this epoch's (in best.pt: the best epoch's)
            "provenance": provenance,
        }

    def restore(self, payload: dict[str, Any], rank: int) -> None:
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        set_rng_state(payload["rng"][rank])
        self.epoch, self.step = payload["epoch"], payload["step"]
        self.best_val_loss = payload["best_val_loss"]
        self.history, self.curve = list(payload["history"]), list(payload["curve"])


def batch_logits(net: torch.nn.Module, batch: MaskedBatch, tokens: Tensor, actions: Tensor) -> Tensor:
    """The logits (B, T - first, H, W, levels) of `batch.inputs`, made of tokens (B, T, H, W) under actions
    (B, T, 2); for an objective with a clean context (`next`), its frames' keys and values first, which the
    hidden frames then attend to."""
    cache, start = None, None
    if batch.context:
        clean = causal_mask(batch.context, device=tokens.device)
        _, cache = net(tokens[:, : batch.context], actions[:, : batch.context], clean)
        start = batch.first
    logits, _ = net(
        batch.inputs, actions[:, batch.first :], batch.temporal_mask, cache=cache, start_frame=start
    )
    return logits


def train_step(
    net: torch.nn.Module,
    learner: Learner,
    tokens: Tensor,
    actions: Tensor,
    objective: str,
    config: TrainConfig,
    masks: torch.Generator,
    amp: torch.dtype | None,
) -> Tensor:
    """One optimizer step on a batch of tokens (B, T, H, W) int64 and actions (B, T, 2); returns the loss
    (detached, on the device: reading it would make a GPU wait)."""
    batch = make_batch(objective, tokens, config, learner.model.arch.levels, masks)
    actions = hide_actions(actions, config.action_dropout, masks)
    with autocast(tokens.device, amp):
        logits = batch_logits(net, batch, tokens, actions)
    targets = tokens[:, batch.first :]
    loss, _, _ = masked_cross_entropy(logits, targets, batch.loss_mask, config.label_smoothing)
    learner.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(learner.model.parameters(), config.grad_clip)
    learner.optimizer.step()
    learner.scheduler.step()
    learner.step += 1
    return loss.detach()
