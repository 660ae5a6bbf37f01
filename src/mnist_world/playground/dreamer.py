"""Live autoregressive dreaming: the next frame under an action known only now, one frame at a time.

Composes the sampler's public pieces (`Context`, `unmask`, `guide`): the frames so far stay in the model's
key/value cache, so each unmasking iteration runs the model on the new frame alone. The model has a fixed
number of temporal positions; when the context fills them it slides: the newest `keep` frames are encoded
afresh at positions 0..keep-1 (a frame's keys carry its position, so cached keys cannot simply shift).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from mnist_world.config import SampleConfig
from mnist_world.model.sampling import Context, unmask
from mnist_world.playground.world import Model

# Called after each unmasking iteration with (iteration 1..K, the logits (H, W, V) the iteration sampled from,
# the frame's token ids (H, W) after it, the mask id where still hidden): what the model believed, and what it
# kept.
IterationCallback = Callable[[int, Tensor, Tensor], None]


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """How each frame is unmasked."""

    steps: int = 20
    temperature: float = 1.0
    guidance: float = 0.0
    choice_temperature: float = 1.0  # sampling.unmask's
    action_guidance: float = 0.0

    @classmethod
    def from_config(cls, sample: SampleConfig, **changes: float) -> SamplerSettings:
        """The params' `sample` section as the playground dreams with it (always frame by frame), `changes`
        (steps, temperature, guidance, action_guidance) on top."""
        values = {
            "steps": sample.steps,
            "temperature": sample.temperature,
            "guidance": sample.guidance,
            "choice_temperature": sample.choice_temperature,
            "action_guidance": sample.action_guidance,
        }
        return cls(**{**values, **changes})

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.temperature < 0:
            raise ValueError(f"temperature must not be negative, got {self.temperature}")
        if self.guidance < 0:
            raise ValueError(f"guidance must not be negative, got {self.guidance}")
        if self.action_guidance < 0:
            raise ValueError(f"action guidance must not be negative, got {self.action_guidance}")
        if self.choice_temperature < 0:
            raise ValueError(f"choice temperature must not be negative, got {self.choice_temperature}")


class Dreamer:
    """The frames dreamed so far (within the model's window) and the next one on demand."""

    def __init__(self, model: Model, tokens: Tensor, actions: Tensor, keep: int) -> None:
        """Start after the given frames: tokens (C, H, W) ids and their actions (C, 2), on the model's device;
        `keep` frames stay in the context when it slides (1 <= keep < the model's frames)."""
        self.model = model
        self.window = model.arch.frames
        if not 1 <= keep < self.window:
            raise ValueError(f"keep must be in [1, {self.window - 1}] for a model of {self.window} frames")
        if not 1 <= tokens.shape[0] < self.window:
            raise ValueError(f"start with 1 to {self.window - 1} frames, got {tokens.shape[0]}")
        self.keep = keep
        self.context = Context.encode(model, tokens[None].long(), actions[None].float())

    @property
    def context_frames(self) -> int:
        """Frames the next one attends to."""
        return self.context.frames

    @torch.no_grad()
    def next_frame(
        self,
        action: Tensor,
        settings: SamplerSettings,
        generator: torch.Generator,
        on_iteration: IterationCallback | None = None,
    ) -> Tensor:
        """Token ids (H, W) of the frame after the context, with the ego digit moved by `action` (2,).
        Watching the iterations draws no random numbers: the frame is the same with or without it."""
        twinned = settings.action_guidance > 0  # the context held twice, the second time without actions
        kept = self.keep if self.context.frames == self.window else self.context.frames
        if kept != self.context.frames or self.context.twinned != twinned:
            self.context = Context.encode(self.model, *self.context.latest(kept), twinned=twinned)
        context = self.context.with_next_action(action.view(1, 2))  # the new frame's action too

        latest: list[Tensor] = []  # the logits of the iteration in progress, for `on_iteration`

        def logits_of(tokens: Tensor) -> Tensor:
            logits = context.guided_logits(self.model, tokens, settings.guidance, settings.action_guidance)
            latest[:] = [logits]
            return logits

        def on_step(step: int, tokens: Tensor) -> None:
            on_iteration(step, latest[0][0, 0], tokens[0, 0])  # type: ignore[misc]

        height, width = context.tokens.shape[2:]
        mask_id = self.model.arch.mask_id
        blank = torch.full((1, 1, height, width), mask_id, dtype=torch.long, device=action.device)
        frame = unmask(
            logits_of, blank, mask_id, settings.steps, settings.temperature, generator,
            None if on_iteration is None else on_step, choice_temperature=settings.choice_temperature,
        )  # fmt: skip
        self.context = context.append(self.model, frame)
        return frame[0, 0]
