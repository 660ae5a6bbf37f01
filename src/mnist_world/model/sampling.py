"""Iterative unmasking (MaskGIT / CoPilot4D): future prediction and unconditional generation of token frames.

The model is any callable with `WorldModel.forward`'s signature; this module knows nothing of training. The
past frames never change while the future is decoded, so they are encoded once into a key/value cache.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Generator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mnist_world.config import SampleConfig
from mnist_world.model.masking import causal_mask, identity_mask, padded_causal_mask
from mnist_world.model.network import FrameCache, extend_cache

# model(tokens (B, T, H, W), actions (B, T, 2), temporal_mask, cache=, start_frame=)
#   -> (logits (B, T, H, W, V), these frames' keys/values), as WorldModel.forward
Model = Callable[..., tuple[Tensor, FrameCache]]
# Called after every iteration with (index of the first frame being decoded, among the future frames;
# iteration 1..K; the current state of the frames being decoded (B, F', H, W), mask id where still hidden).
StepCallback = Callable[[int, int, Tensor], None]


# --- Small helpers ---------------------------------------------------------------------------------------


def log(t: Tensor, eps: float = 1e-20) -> Tensor:
    return torch.log(t.clamp(min=eps))


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """Standard Gumbel noise drawn from `generator`, on the generator's device."""
    uniform = torch.rand(shape, generator=generator, device=generator.device)
    return -log(-log(uniform))


def cosine_schedule(progress: float) -> float:
    """gamma(u) = cos(u pi / 2): the share of tokens still masked after a fraction `u` of the iterations."""
    return math.cos(progress * math.pi / 2)


def masked_count(step: int, steps: int, total: int) -> int:
    """Tokens still masked after iteration `step` (1..steps) of `steps`: ceil(gamma(step / steps) * total).

    `total` is every token being decoded (all future frames at once in joint mode), not one frame's: the
    original sampler used one frame's count for ten frames. cos(pi / 2) is 6e-17, not 0, so the last
    iteration is pinned to 0 rather than left to leave one token masked.
    """
    if step >= steps:
        return 0
    return math.ceil(cosine_schedule(step / steps) * total)


def sample_tokens(logits: Tensor, temperature: float, generator: torch.Generator) -> Tensor:
    """One token per position drawn from softmax(logits / temperature) (Gumbel-max); argmax at 0."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    return (logits / temperature + gumbel_noise(logits.shape, generator)).argmax(dim=-1)


def guide(conditional: Tensor, unconditional: Tensor, weight: float) -> Tensor:
    """Classifier-free guidance: push the logits away from what the frame alone (no context) predicts."""
    return conditional + weight * (conditional - unconditional)


def warn_if_actions_never_hidden(action_guidance: float, action_dropout: float | None) -> str | None:
    """Warn (and return the message) when action guidance is asked of a model that never saw an unknown
    action (its `train.action_dropout` 0, or None: a checkpoint from before it): its action-free logits are
    untrained."""
    if action_guidance <= 0 or (action_dropout or 0.0) > 0:
        return None
    message = (
        f"sample.action_guidance={action_guidance:g} but the checkpoint was trained with every action shown "
        f"(train.action_dropout=0): its logits without actions are untrained"
    )
    warnings.warn(message, stacklevel=2)
    return message


def warn_if_unguided(guidance: float, objectives: Mapping[str, float] | None) -> str | None:
    """Warn (and return the message) when guidance is asked of a model never trained on single frames.

    The unconditional logits come from the identity temporal mask, which only the `individual` objective
    trains; without it they are noise and guidance amplifies noise.
    """
    if guidance <= 0 or (objectives and objectives.get("individual", 0.0) > 0):
        return None
    message = (
        f"sample.guidance={guidance:g} but the checkpoint was trained without the 'individual' objective "
        f"(train.objectives={dict(objectives or {})}): its unconditional logits are untrained"
    )
    warnings.warn(message, stacklevel=2)
    return message


# --- The frames decoded against --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Context:
    """The frames already fixed (the past, then any decoded ones) that the next frames attend to.

    Cached: their temporal keys/values are computed once and each decoding pass runs on the new frames alone.
    Uncached: every pass runs the model on context plus new frames and keeps the new frames' logits: the
    reference the cache must match, and the baseline of the caching benchmark.
    Twinned (for action guidance): every sequence is held twice, the second time with every action unknown
    (NaN), in one batch of 2B rows; the methods take and give the B sequences' frames and the 2B rows' logits.
    """

    tokens: Tensor  # (R, C, H, W) fixed frames, C = 0 for unconditional generation; R = B, or 2B if twinned
    actions: Tensor  # (R, T, 2) actions of every frame, context and frames to decode
    cached: bool
    cache: FrameCache | None = None  # per-layer keys/values of `tokens`; None when uncached or C = 0
    twinned: bool = False

    @property
    def frames(self) -> int:
        return self.tokens.shape[1]

    @classmethod
    def encode(
        cls, model: Model, past: Tensor, actions: Tensor, cached: bool = True, twinned: bool = False
    ) -> Context:
        """Context of the past frames (B, P, H, W) under actions (B, T, 2) of all T frames."""
        if twinned:
            past = torch.cat([past, past])  # (2B, P, H, W)
            actions = torch.cat([actions, torch.full_like(actions, math.nan)])  # (2B, T, 2)
        frames = past.shape[1]
        cache = None
        if cached and frames > 0:
            _, cache = model(past, actions[:, :frames], causal_mask(frames, device=past.device))
        return cls(tokens=past, actions=actions, cached=cached, cache=cache, twinned=twinned)

    def rows(self, tokens: Tensor) -> Tensor:
        """The B sequences' `tokens` (B, ...) as the context's rows (R, ...)."""
        return torch.cat([tokens, tokens]) if self.twinned else tokens

    def latest(self, count: int) -> tuple[Tensor, Tensor]:
        """The newest `count` frames of the B sequences (B, count, H, W) and their actions (B, count, 2)."""
        batch = self.tokens.shape[0] // (2 if self.twinned else 1)
        frames = self.frames
        return self.tokens[:batch, frames - count : frames], self.actions[:batch, frames - count : frames]

    def with_next_action(self, action: Tensor) -> Context:
        """The context with the next frame's action (B, 2) after its frames' (the twin's unknown)."""
        action = self.rows(action.float())[:, None, :]  # (R, 1, 2)
        if self.twinned:
            action[action.shape[0] // 2 :] = math.nan
        return dataclasses.replace(self, actions=torch.cat([self.actions[:, : self.frames], action], dim=1))

    def logits(self, model: Model, tokens: Tensor) -> Tensor:
        """(R, F, H, W, V) logits of `tokens` (B, F, H, W), the F frames right after the context, causally."""
        context, frames = self.frames, tokens.shape[1]
        tokens = self.rows(tokens)
        if self.cached or context == 0:
            mask = causal_mask(frames, past=context, device=tokens.device)
            logits, _ = model(tokens, self.actions[:, context : context + frames], mask, cache=self.cache)
            return logits
        whole = torch.cat([self.tokens, tokens], dim=1)  # (R, C + F, H, W)
        mask = causal_mask(context + frames, device=tokens.device)
        logits, _ = model(whole, self.actions[:, : context + frames], mask)
        return logits[:, context:]

    def unconditional_logits(self, model: Model, tokens: Tensor) -> Tensor:
        """(R, F, H, W, V) logits of each frame of `tokens` (B, F, H, W) seeing only itself, no context."""
        context, frames = self.frames, tokens.shape[1]
        mask = identity_mask(frames, device=tokens.device)
        actions = self.actions[:, context : context + frames]
        logits, _ = model(self.rows(tokens), actions, mask, start_frame=context)
        return logits

    def guided_logits(
        self,
        model: Model,
        tokens: Tensor,
        guidance: float,
        action_guidance: float,
        logits: Tensor | None = None,
    ) -> Tensor:
        """(B, F, H, W, V) logits of `tokens` (B, F, H, W) as the sampler draws from them: guided away from
        the frames alone (`guidance`) and, when twinned, from the twin without actions (`action_guidance`).
        `logits`: this context's `logits` of `tokens` when already computed (by a `ContextBatch`)."""
        logits = self.logits(model, tokens) if logits is None else logits
        if guidance != 0:
            logits = guide(logits, self.unconditional_logits(model, tokens), guidance)
        if self.twinned:
            with_actions, without_actions = logits.chunk(2)
            logits = guide(with_actions, without_actions, action_guidance)
        return logits

    def append(self, model: Model, tokens: Tensor) -> Context:
        """The context extended with the decoded frames `tokens` (B, F, H, W)."""
        context, frames = self.frames, tokens.shape[1]
        rows = self.rows(tokens)
        new = None
        if self.cached:
            mask = causal_mask(frames, past=context, device=tokens.device)
            _, new = model(rows, self.actions[:, context : context + frames], mask, cache=self.cache)
        return self.extended(rows, new)

    def extended(self, rows: Tensor, new: FrameCache | None) -> Context:
        """The context followed by the frames `rows` (R, F, H, W), whose keys/values are `new` when cached."""
        cache = self.cache if new is None else extend_cache(self.cache, new)
        return dataclasses.replace(self, tokens=torch.cat([self.tokens, rows], dim=1), cache=cache)


@dataclasses.dataclass(frozen=True)
class ContextBatch:
    """Several cached contexts decoded in one model call: their caches padded to the longest and joined once,
    each row attending to its own frames only, at its own time. Its logits equal the contexts' own up to float
    rounding (other matrix shapes)."""

    contexts: tuple[Context, ...]
    cache: FrameCache  # per layer, keys and values (R N, heads, P, head_dim): every context's rows, padded
    lengths: Tensor  # (R,) the frames each row's context holds
    counts: tuple[int, ...]  # each context's rows

    @classmethod
    def join(cls, contexts: Sequence[Context]) -> ContextBatch:
        """The batch of `contexts` (each cached, of at least one frame), in their order."""
        if not all(context.cache for context in contexts):
            raise ValueError("a context batch needs cached contexts of at least one frame")
        caches: list[FrameCache] = [context.cache for context in contexts]  # type: ignore[misc]
        longest = max(context.frames for context in contexts)

        def joined(layer: int, part: int) -> Tensor:  # each (R_i N, heads, C_i, d) -> (R N, heads, P, d)
            pieces = [cache[layer][part] for cache in caches]
            return torch.cat([F.pad(piece, (0, 0, 0, longest - piece.shape[2])) for piece in pieces])

        counts = tuple(context.tokens.shape[0] for context in contexts)
        lengths = torch.tensor([context.frames for context in contexts], device=contexts[0].tokens.device)
        return cls(
            contexts=tuple(contexts),
            cache=[(joined(layer, 0), joined(layer, 1)) for layer in range(len(caches[0]))],
            lengths=lengths.repeat_interleave(torch.tensor(counts, device=lengths.device)),
            counts=counts,
        )

    def logits(self, model: Model, tokens: Sequence[Tensor]) -> list[Tensor]:
        """Each context's `logits` of its next frames `tokens[i]` (B_i, F, H, W), the same F for all."""
        logits, _ = self._run(model, tokens)
        return list(logits.split(self.counts))

    def append(self, model: Model, tokens: Sequence[Tensor]) -> list[Context]:
        """Each context `append`ed with its decoded frames `tokens[i]` (B_i, F, H, W), the same F for all."""
        _, new = self._run(model, tokens)
        positions = new[0][0].shape[0] // sum(self.counts)  # the cache's rows are (row, position) pairs
        sizes = [count * positions for count in self.counts]
        parts = [(keys.split(sizes), values.split(sizes)) for keys, values in new]  # per layer
        return [
            context.extended(context.rows(frames), [(keys[i], values[i]) for keys, values in parts])
            for i, (context, frames) in enumerate(zip(self.contexts, tokens, strict=True))
        ]

    def _run(self, model: Model, tokens: Sequence[Tensor]) -> tuple[Tensor, FrameCache]:
        """The model on every context's next frames `tokens[i]` (B_i, F, H, W) in one call."""
        frames = tokens[0].shape[1]
        rows = torch.cat(
            [context.rows(new) for context, new in zip(self.contexts, tokens, strict=True)]
        )  # (R, F, H, W)
        actions = torch.cat([context.actions[:, context.frames :][:, :frames] for context in self.contexts])
        mask = padded_causal_mask(self.lengths, self.cache[0][0].shape[2], frames)  # (R, F, P + F)
        return model(rows, actions, mask, cache=self.cache, start_frame=self.lengths)


# --- Iterative unmasking ---------------------------------------------------------------------------------


# The unmasking loop as a coroutine: it yields the tokens whose logits it needs next, is sent those logits,
# and returns the tokens with no mask left (see `unmasking`).
Unmasking = Generator[Tensor, Tensor, Tensor]


def unmasking(
    tokens: Tensor,
    mask_id: int,
    steps: int,
    temperature: float,
    generator: torch.Generator,
    *,
    choice_temperature: float,
) -> Unmasking:
    """Fill every `mask_id` of `tokens` (B, F, H, W) in `steps` iterations, the model calls left to the
    caller: each iteration yields the tokens so far (B, F, H, W), the mask id where still hidden, and is sent
    their logits (B, F, H, W, V); after the last it returns them with no mask left. `unmask` drives it with
    a function; the playground drives several at once, their model calls batched.

    Each iteration samples a token at every hidden position, scores it by its log-probability plus Gumbel
    noise scaled by `choice_temperature` and annealed by (1 - k/K) (MaskGIT's choice temperature), keeps the
    most confident and hides the rest again, so that after iteration k exactly `masked_count(k, K, N)`
    tokens stay hidden (N: the hidden tokens at the start, the same for every sequence). A kept token is
    never hidden again: its confidence is +inf.
    """
    if steps < 1:
        raise ValueError(f"unmasking needs at least one iteration, got steps={steps}")
    shape = tokens.shape
    flat = tokens.flatten(1)  # (B, M)
    masked = flat == mask_id  # (B, M)
    total = int(masked[0].sum())
    if not bool((masked.sum(dim=1) == total).all()):
        raise ValueError("every sequence must start with the same number of masked tokens")
    for step in range(1, steps + 1):
        logits = (yield flat.view(shape)).float().flatten(1, -2)  # (B, M, V)
        sampled = sample_tokens(logits, temperature, generator)  # (B, M)
        log_prob = logits.log_softmax(dim=-1).gather(-1, sampled[..., None])[..., 0]  # (B, M)
        noise = choice_temperature * (1 - step / steps) * gumbel_noise(log_prob.shape, generator)
        confidence = log_prob + noise
        confidence = confidence.masked_fill(~masked, math.inf)
        flat = torch.where(masked, sampled, flat)
        # The least confident stay hidden; all of them are among the tokens hidden so far, since
        # the count never grows and every kept token scores +inf.
        hidden = confidence.topk(masked_count(step, steps, total), dim=1, largest=False).indices  # (B, n)
        masked = torch.zeros_like(masked).scatter_(1, hidden, True)
        flat = flat.masked_fill(masked, mask_id)
    return flat.view(shape)


def advance(iterations: Unmasking, logits: Tensor) -> tuple[Tensor, bool]:
    """Send `iterations` the logits it asked for: the tokens after that iteration, and whether it was the
    last (no mask left)."""
    try:
        return iterations.send(logits), False
    except StopIteration as finished:
        return finished.value, True


def unmask(
    logits_of: Callable[[Tensor], Tensor],
    tokens: Tensor,
    mask_id: int,
    steps: int,
    temperature: float,
    generator: torch.Generator,
    on_step: Callable[[int, Tensor], None] | None = None,
    *,
    choice_temperature: float,
) -> Tensor:
    """`unmasking` with `logits_of(tokens)` giving each iteration's logits; `on_step(k, tokens)` after
    iteration k. Returns `tokens` (B, F, H, W) with no mask left."""
    iterations = unmasking(
        tokens, mask_id, steps, temperature, generator, choice_temperature=choice_temperature
    )
    tokens, last, step = next(iterations), False, 0
    while not last:
        tokens, last = advance(iterations, logits_of(tokens))
        step += 1
        if on_step is not None:
            on_step(step, tokens)
    return tokens


def new_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator on `device` seeded with `seed`: same seed, same device, same samples."""
    return torch.Generator(device=device).manual_seed(seed)


@torch.no_grad()
def predict_future(
    model: Model,
    past: Tensor,
    actions: Tensor,
    config: SampleConfig,
    *,
    mask_id: int,
    generator: torch.Generator,
    cached: bool = True,
    on_step: StepCallback | None = None,
) -> Tensor:
    """Future token frames (B, T - P, H, W) after the past tokens (B, P, H, W), P >= 0, under the true actions
    of all T frames (B, T, 2), past ones included (the original zeroed them).

    joint: all T - P frames together under the causal temporal mask, K iterations over all their tokens.
    autoregressive: one frame at a time, K iterations each, each decoded frame then joining the context.
    """
    past, actions = past.long(), actions.float()
    batch, frames = actions.shape[:2]
    future = frames - past.shape[1]
    if future < 1:
        raise ValueError(f"nothing to decode: {past.shape[1]} past frames of {frames}")
    height, width = past.shape[2:]  # an empty past (B, 0, H, W) still says the frame size
    context = Context.encode(model, past, actions, cached, twinned=config.action_guidance > 0)

    def decode_frames(first: int, count: int) -> Tensor:
        def logits_of(tokens: Tensor) -> Tensor:
            return context.guided_logits(model, tokens, config.guidance, config.action_guidance)

        callback = None if on_step is None else (lambda step, tokens: on_step(first, step, tokens))
        blank = torch.full((batch, count, height, width), mask_id, dtype=torch.long, device=actions.device)
        return unmask(
            logits_of, blank, mask_id, config.steps, config.temperature, generator, callback,
            choice_temperature=config.choice_temperature,
        )  # fmt: skip

    if config.mode == "joint":
        return decode_frames(0, future)
    for frame in range(future):
        context = context.append(model, decode_frames(frame, 1))
    return context.latest(future)[0]


@torch.no_grad()
def point_prediction(
    model: Model, past: Tensor, actions: Tensor, intensities: Tensor, mask_id: int
) -> Tensor:
    """The model's expected pixel value of every future token (B, T - P, H, W), in one pass.

    Every future token is hidden and the model's distribution p(level) at each is turned into
    sum_k p(k) * intensities[k]: the mean of the model's belief, which minimises the expected squared error
    under that belief (the point prediction deterministic predictors are scored on). past (B, P, H, W) ids,
    actions (B, T, 2), intensities (levels,) the pixel value of each level.
    """
    batch, frames = actions.shape[:2]
    future = torch.full(
        (batch, frames - past.shape[1], *past.shape[2:]), mask_id, dtype=torch.long, device=past.device
    )
    tokens = torch.cat([past.long(), future], dim=1)  # (B, T, H, W)
    logits, _ = model(tokens, actions.float(), causal_mask(frames, device=past.device))
    probabilities = logits[:, past.shape[1] :].float().softmax(dim=-1)  # (B, F, H, W, levels)
    return probabilities @ intensities.to(probabilities)


@torch.no_grad()
def generate(
    model: Model,
    actions: Tensor,
    config: SampleConfig,
    *,
    frame_size: int,
    mask_id: int,
    generator: torch.Generator,
    on_step: StepCallback | None = None,
) -> Tensor:
    """Unconditional generation: every frame of (B, T, H, W) decoded from nothing under actions (B, T, 2),
    causally, in `config.mode` like future prediction."""
    empty = torch.empty(
        (actions.shape[0], 0, frame_size, frame_size), dtype=torch.long, device=actions.device
    )
    return predict_future(
        model, empty, actions, config, mask_id=mask_id, generator=generator, on_step=on_step
    )
