"""What every training epoch is scored on: the future objective's loss and accuracy on fixed masks of the
validation split, and the point prediction's error against a blank frame's on its first sequences.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from mnist_world.config import TrainConfig
from mnist_world.core.devices import autocast
from mnist_world.core.randomness import derived_seed
from mnist_world.model.masking import MaskedBatch, make_batch, masked_cross_entropy
from mnist_world.model.network import Architecture
from mnist_world.model.sampling import point_prediction
from mnist_world.training.distributed import Process

VALIDATION_STREAM = 4  # the random stream of the validation masks (see training's streams)


@dataclasses.dataclass(frozen=True)
class Validation:
    """What every epoch is scored on: fixed masks of the future objective over the validation split, and the
    point prediction of the first train.point_sequences sequences against their decoded true tokens."""

    data: tuple[Tensor, Tensor]  # tokens uint8 (N, T, H, W), actions float32 (N, T, 2), on the device
    masked: MaskedBatch
    intensities: Tensor  # (levels,) the pixel value of each level

    @classmethod
    def build(
        cls, data: tuple[Tensor, Tensor], config: TrainConfig, arch: Architecture, intensities: Tensor
    ) -> Validation:
        tokens = data[0]
        generator = torch.Generator(device=tokens.device).manual_seed(
            derived_seed(config.seed, VALIDATION_STREAM)
        )
        # The plain future objective (the whole past given, one ratio per sequence, no noise) whatever the
        # training mixes in, so that every run's val_loss measures the same task.
        plain = dataclasses.replace(config, noise_eta=0.0, frame_ratios=0.0, cut_past=0.0)
        masked = make_batch("future", tokens, plain, arch.levels, generator)
        return cls(data, masked, intensities.to(tokens.device))

    @torch.no_grad()
    def score(
        self, model: torch.nn.Module, config: TrainConfig, process: Process, amp: torch.dtype | None
    ) -> dict[str, float]:
        """val_loss (future objective, no label smoothing: a true NLL), val_accuracy on the hidden tokens, and
        val_point_mse and its ratio to the blank frame's, val_point_vs_blank (< 1: better than blank)."""
        tokens_all, actions_all = self.data
        device = tokens_all.device
        totals = torch.zeros(5, dtype=torch.float64, device=device)  # loss sum, correct, count, point, blank
        indices = torch.arange(process.rank, tokens_all.shape[0], process.world_size, device=device)
        points = min(config.point_sequences, tokens_all.shape[0])
        model.eval()
        for chunk in indices.split(config.batch_size):
            tokens = tokens_all[chunk].long()
            with autocast(device, amp):
                logits, _ = model(
                    self.masked.inputs[chunk].long(), actions_all[chunk], self.masked.temporal_mask
                )
            loss, correct, count = masked_cross_entropy(logits, tokens, self.masked.loss_mask[chunk])
            totals[:3] += torch.stack([loss.double() * count, correct.double(), count.double()])
            scored = chunk[chunk < points]
            if len(scored):
                past = tokens_all[scored, : config.past_frames]
                with autocast(device, amp):
                    point = point_prediction(
                        model, past, actions_all[scored], self.intensities, model.arch.mask_id
                    )
                truth = self.intensities[tokens_all[scored, config.past_frames :].long()]
                totals[3] += ((point.float() - truth) ** 2).mean(dim=(2, 3)).sum().double()
                totals[4] += (truth**2).mean(dim=(2, 3)).sum().double()
        model.train()
        loss_sum, correct, count, point_error, blank_error = process.sum(totals).tolist()
        frames = max(points * (tokens_all.shape[1] - config.past_frames), 1)
        scores = {"val_loss": loss_sum / max(count, 1), "val_accuracy": correct / max(count, 1)}
        if points:
            scores["val_point_mse"] = point_error / frames
            scores["val_point_vs_blank"] = point_error / blank_error if blank_error > 0 else math.inf
        return scores
