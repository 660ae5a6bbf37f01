"""Training objectives: which tokens are hidden, how frames attend, and the loss on what was hidden.

Temporal masks are boolean (T_query, T_key) matrices, True where a frame may attend to another; the model
takes them as given. Token masks are boolean (B, T, H, W), True where the input token is hidden.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from mnist_world.config import OBJECTIVES, TrainConfig

# --- Temporal attention masks ---------------------------------------------------------------------------


def causal_mask(frames: int, past: int = 0, device: torch.device | str | None = None) -> Tensor:
    """(frames, past + frames): frame i (at time past + i) sees every frame up to and including itself."""
    query_time = torch.arange(past, past + frames, device=device)[:, None]
    key_time = torch.arange(past + frames, device=device)[None, :]
    return key_time <= query_time


def padded_causal_mask(lengths: Tensor, padded: int, frames: int = 1) -> Tensor:
    """(B, frames, padded + frames): `causal_mask` for sequences whose caches hold `lengths` (B,) frames each,
    padded to `padded`: frame i of sequence b sees the first lengths[b] cached frames (the padding never) and
    its own frames up to and including itself, at the cache's end."""
    cached = torch.arange(padded, device=lengths.device) < lengths[:, None]  # (B, padded)
    own = causal_mask(frames, device=lengths.device)  # (frames, frames)
    return torch.cat([cached[:, None, :].expand(-1, frames, -1), own.expand(len(lengths), -1, -1)], dim=2)


def identity_mask(frames: int, device: torch.device | str | None = None) -> Tensor:
    """(frames, frames): each frame sees only itself."""
    return torch.eye(frames, dtype=torch.bool, device=device)


def next_frame_mask(frames: int, past: int, device: torch.device | str | None = None) -> Tensor:
    """(frames - past, frames - 1 + frames - past): each of the hidden frames after `past` given ones, read
    after the clean frames 0..frames - 2, sees the clean frames before it and itself, as frame-by-frame
    sampling decodes it (the `next` objective)."""
    hidden = torch.arange(past, frames, device=device)[:, None]  # (F, 1) the hidden frames' times
    clean = torch.arange(frames - 1, device=device)[None, :] < hidden  # (F, T - 1)
    return torch.cat([clean, identity_mask(frames - past, device=device)], dim=1)


def full_mask(frames: int, past: int = 0, device: torch.device | str | None = None) -> Tensor:
    """(frames, past + frames): bidirectional attention across all frames."""
    return torch.ones(frames, past + frames, dtype=torch.bool, device=device)


# --- Mask ratios -----------------------------------------------------------------------------------------


def mask_ratios(shape: tuple[int, ...], config: TrainConfig, generator: torch.Generator) -> Tensor:
    """Share of tokens to hide, one per entry of `shape`: r ~ U(mask_ratio), or cos(u pi / 2), u ~ U(0, 1)."""
    uniform = torch.rand(shape, generator=generator, device=generator.device)
    if config.mask_schedule == "cosine":
        return torch.cos(uniform * (math.pi / 2))
    low, high = config.mask_ratio
    return low + (high - low) * uniform


# --- Objectives ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MaskedBatch:
    """One objective applied to a batch: what the model sees, where it is scored, how frames attend."""

    inputs: Tensor  # (B, T', H, W) int64 ids of frames first..T-1, mask id where hidden, random where noised
    loss_mask: Tensor  # (B, T', H, W) bool: hidden or noised tokens, the ones the loss is taken on
    temporal_mask: Tensor  # (T', context + T') bool
    first: int = 0  # the frame `inputs` start at: T' = T - first
    context: int = 0  # clean frames 0..context - 1 the model reads first, their keys/values attended to


def make_batch(
    objective: str, tokens: Tensor, config: TrainConfig, levels: int, generator: torch.Generator
) -> MaskedBatch:
    """Hide tokens of `tokens` (B, T, H, W) as `objective` asks; random draws come from `generator`.

    future: the first `config.past_frames` frames are given (for a `config.cut_past` share of the sequences
        only the first 1..past_frames - 1, drawn uniformly); each later token is hidden with probability r,
        one r per sequence, or one per frame for a `config.frame_ratios` share of the sequences; causal
        attention (frame t sees frames <= t).
    joint: tokens of every frame hidden with one r per sequence; bidirectional attention.
    individual: one r per sequence and frame; each frame sees only itself (what classifier-free guidance
        needs: the model's prediction of a frame without context).
    next: the frames after `config.past_frames` are hidden, one r per sequence and frame, each seeing the
        clean frames before it and itself (`next_frame_mask`): every future frame trained as frame-by-frame
        sampling decodes it, after a context of true frames. `inputs` holds the hidden frames alone
        (`first` = past_frames); the model reads the clean frames 0..T-2 first (`context`).
    Every sequence (every frame, for `individual`) hides at least one token, so a ratio near 0 from the
    cosine schedule never leaves a sample without a loss.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective '{objective}' (known: {', '.join(OBJECTIVES)})")
    batch, frames = tokens.shape[:2]
    device = tokens.device
    if objective in ("future", "next") and not 0 < config.past_frames < frames:
        raise ValueError(f"train.past_frames={config.past_frames} must be in [1, {frames - 1}]")
    if objective == "next":
        return _next_frames(tokens, config, levels, generator)
    if objective == "future":
        ratio_shape, region_dims = (batch, 1, 1, 1), (1, 2, 3)
        temporal_mask = causal_mask(frames, device=device)
    elif objective == "joint":
        ratio_shape, region_dims = (batch, 1, 1, 1), (1, 2, 3)
        temporal_mask = full_mask(frames, device=device)
    else:
        ratio_shape, region_dims = (batch, frames, 1, 1), (2, 3)
        temporal_mask = identity_mask(frames, device=device)

    ratio = mask_ratios(ratio_shape, config, generator)
    if objective == "future" and config.frame_ratios > 0:
        # Diffusion forcing's independent noise levels: these sequences' frames each draw their own ratio, so
        # the model also meets what frame-by-frame sampling feeds it, a (nearly) decoded frame before a
        # hidden one; the other sequences keep one ratio for their whole future (CoPilot4D).
        own = mask_ratios((batch, frames, 1, 1), config, generator)
        chosen = torch.rand((batch, 1, 1, 1), generator=generator, device=device) < config.frame_ratios
        ratio = torch.where(chosen, own, ratio)  # (B, T, 1, 1) or (B, 1, 1, 1)
    draw = torch.rand(tokens.shape, generator=generator, device=device)  # (B, T, H, W)
    if objective == "future":
        given = torch.full((batch, 1), config.past_frames, device=device)  # (B, 1) frames given
        if config.cut_past > 0 and config.past_frames > 1:  # more frames trained: those after a shorter past
            cut = torch.rand((batch, 1), generator=generator, device=device) < config.cut_past
            shorter = torch.randint(1, config.past_frames, (batch, 1), generator=generator, device=device)
            given = torch.where(cut, shorter, given)
        past = torch.arange(frames, device=device) < given  # (B, T)
        draw[past] = 2.0  # above any ratio: the given past is never hidden (nor the minimum)
    hidden = hide(draw, ratio, region_dims)
    inputs = tokens.masked_fill(hidden, levels)  # levels is the mask id
    loss_mask = hidden

    if config.noise_eta > 0:  # the given past is never noised
        inputs, loss_mask = noise_visible(inputs, hidden, draw <= 1.0, ratio_shape, config, levels, generator)
    return MaskedBatch(inputs=inputs, loss_mask=loss_mask, temporal_mask=temporal_mask)


def hide(draw: Tensor, ratio: Tensor, region_dims: tuple[int, ...]) -> Tensor:
    """The tokens whose uniform `draw` falls below their region's `ratio`, and the smallest draw of each
    region (over `region_dims`) always: at least one scored token per region."""
    return (draw < ratio) | (draw == draw.amin(dim=region_dims, keepdim=True))


def noise_visible(
    inputs: Tensor,
    hidden: Tensor,
    allowed: Tensor | bool,
    ratio_shape: tuple[int, ...],
    config: TrainConfig,
    levels: int,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """CoPilot4D's noising: up to `config.noise_eta` of the visible (`allowed`) tokens of each region (one
    ratio per entry of `ratio_shape`) replaced with random levels, so the model also learns to doubt what it
    sees (as it must at sampling time). Returns the inputs and the loss mask, the noised tokens joining it."""
    device = inputs.device
    noise_ratio = config.noise_eta * torch.rand(ratio_shape, generator=generator, device=device)
    noise_draw = torch.rand(inputs.shape, generator=generator, device=device)
    noised = ~hidden & (noise_draw < noise_ratio) & allowed
    random_levels = torch.randint(0, levels, inputs.shape, generator=generator, device=device)
    return torch.where(noised, random_levels, inputs), hidden | noised


def _next_frames(tokens: Tensor, config: TrainConfig, levels: int, generator: torch.Generator) -> MaskedBatch:
    """The `next` objective's batch: the frames after the past, each hidden (and noised) on its own."""
    frames, past = tokens.shape[1], config.past_frames
    future = tokens[:, past:]  # (B, F, H, W)
    ratio_shape = (future.shape[0], future.shape[1], 1, 1)
    ratio = mask_ratios(ratio_shape, config, generator)
    draw = torch.rand(future.shape, generator=generator, device=tokens.device)
    hidden = hide(draw, ratio, (2, 3))
    inputs, loss_mask = future.masked_fill(hidden, levels), hidden
    if config.noise_eta > 0:
        inputs, loss_mask = noise_visible(inputs, hidden, True, ratio_shape, config, levels, generator)
    mask = next_frame_mask(frames, past, device=tokens.device)
    return MaskedBatch(inputs, loss_mask, mask, first=past, context=frames - 1)


def hide_actions(actions: Tensor, share: float, generator: torch.Generator) -> Tensor:
    """`actions` (B, T, 2) with every action of a sequence unknown (NaN) with probability `share`: the model
    also learns to dream without them, which classifier-free guidance on the actions contrasts with. Draws
    nothing when `share` is 0."""
    if share == 0:
        return actions
    hidden = torch.rand((actions.shape[0], 1, 1), generator=generator, device=generator.device) < share
    return actions.masked_fill(hidden, math.nan)


def choose_objectives(config: TrainConfig, count: int, generator: torch.Generator) -> list[str]:
    """`count` objectives drawn independently by their weights (one per batch)."""
    names = sorted(config.objectives)  # sorted: the draw must not depend on the order of params.yaml
    weights = torch.tensor([config.objectives[name] for name in names], dtype=torch.float64)
    picks = torch.multinomial(weights, count, replacement=True, generator=generator)
    return [names[i] for i in picks.tolist()]


# --- The loss --------------------------------------------------------------------------------------------


def masked_cross_entropy(
    logits: Tensor, targets: Tensor, loss_mask: Tensor, label_smoothing: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Mean cross-entropy over the positions of `loss_mask`, the correct argmax count there, and the count.

    logits (B, T, H, W, V), targets (B, T, H, W) ids, loss_mask (B, T, H, W) bool. Weighting every position
    instead of indexing the masked ones keeps shapes static: no host-device sync on a GPU.
    """
    per_token = F.cross_entropy(
        rearrange(logits.float(), "b t h w v -> (b t h w) v"),
        targets.reshape(-1),
        reduction="none",
        label_smoothing=label_smoothing,
    )
    weights = loss_mask.reshape(-1).to(per_token.dtype)
    count = weights.sum()
    loss = (per_token * weights).sum() / count.clamp(min=1)
    correct = ((logits.argmax(dim=-1) == targets) & loss_mask).sum()
    return loss, correct, count
