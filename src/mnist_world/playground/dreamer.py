"""Live autoregressive dreaming: the next frame under an action known only now, one frame at a time.

Composes the sampler's public pieces (`Context`, `unmask`, `guide`): the frames so far stay in the model's
key/value cache, so each unmasking iteration runs the model on the new frame alone. The model has a fixed
number of temporal positions; when the context fills them it slides: the newest `keep` frames are encoded
afresh at positions 0..keep-1 (a frame's keys carry its position, so cached keys cannot simply shift).

Sessions dreaming at the same time share their model calls (`CallBatcher`): every unmasking iteration of
the frames being dreamed, and the decoded frames joining their contexts, run as one batch (`ContextBatch`)
instead of one small call per session competing for the cores. Each session still samples with its own
generator and settings; only the model calls are shared. A session asks and waits; the first asker that
finds every dreaming session waiting (or has waited `GATHER_S`) runs the batch for all of them on its own
thread. A lone session's call is its own, so its frames equal a replay's exactly; beside others its logits
equal its own call's up to float rounding (a token at a near-tie may then differ from the replay's).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from mnist_world.config import SampleConfig
from mnist_world.model.sampling import Context, ContextBatch, unmask

# model(tokens (B, T, H, W), actions (B, T, 2), temporal_mask, cache=, start_frame=) -> (logits, keys and
# values), with `.arch`: a WorldModel, or the test's double.
Model = Callable[..., Any]

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


GATHER_S = 0.05  # how long a request waits for the other dreaming sessions' before their batch runs anyway


@dataclasses.dataclass(eq=False)
class _Request:
    context: Context
    tokens: Tensor
    append: bool  # the context extended by the decoded `tokens`, rather than their logits
    result: Tensor | Context | None = None
    error: BaseException | None = None
    done: bool = False


class CallBatcher:
    """The model calls of every session dreaming a frame, batched: each unmasking iteration's logits, and the
    decoded frame's keys/values as it joins the context."""

    def __init__(self, model: Model, gather_s: float = GATHER_S) -> None:
        self.model = model
        self.gather_s = gather_s
        self._condition = threading.Condition()
        self._waiting: list[_Request] = []
        self._dreaming = 0  # sessions inside `dreaming()`: each will call until its frame is appended
        self._running = False
        self._joined: ContextBatch | None = None  # the last batch's contexts, kept while they stay the same

    @contextlib.contextmanager
    def dreaming(self) -> Iterator[None]:
        """Around one frame's unmasking and append: the batch waits for this session's requests."""
        with self._condition:
            self._dreaming += 1
        try:
            yield
        finally:
            with self._condition:
                self._dreaming -= 1
                self._condition.notify_all()

    def logits(self, context: Context, tokens: Tensor) -> Tensor:
        """`context.logits(model, tokens)`, computed in one call with the other waiting sessions'."""
        return self._call(_Request(context, tokens, append=False))  # type: ignore[return-value]

    def append(self, context: Context, tokens: Tensor) -> Context:
        """`context.append(model, tokens)`, computed in one call with the other waiting sessions'."""
        return self._call(_Request(context, tokens, append=True))  # type: ignore[return-value]

    def _call(self, request: _Request) -> Tensor | Context:
        """Wait until `request` is answered: by a batch another session runs, or by one this session runs
        when every dreaming session waits (or it has waited `gather_s`)."""
        deadline = time.monotonic() + self.gather_s
        with self._condition:
            self._waiting.append(request)
            self._condition.notify_all()
        while not request.done:
            with self._condition:
                batch = None
                while not request.done and batch is None:
                    late = time.monotonic() >= deadline
                    if not self._running and (late or len(self._waiting) >= self._dreaming):
                        batch, self._running = self._take(), True
                    else:
                        self._condition.wait(None if late else deadline - time.monotonic())
            if batch is not None:
                try:
                    self._run(batch)
                finally:
                    with self._condition:
                        self._running = False
                        self._condition.notify_all()
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    def _take(self) -> list[_Request]:
        """The waiting requests of the oldest one's kind (logits or append), which one call answers."""
        kind = self._waiting[0].append
        batch = [request for request in self._waiting if request.append == kind]
        self._waiting = [request for request in self._waiting if request.append != kind]
        return batch

    def _run(self, batch: list[_Request]) -> None:
        """Answer every request (or give it the error) in one model call; a lone request in its own."""
        batch.sort(key=lambda request: id(request.context))  # the same order while the contexts stay
        append = batch[0].append
        try:
            with torch.no_grad():
                if len(batch) == 1:
                    context, tokens = batch[0].context, batch[0].tokens
                    results = [
                        context.append(self.model, tokens) if append else context.logits(self.model, tokens)
                    ]
                else:
                    contexts = tuple(request.context for request in batch)
                    joined = self._joined  # it holds its contexts, so their ids are theirs alone
                    if joined is None or list(map(id, joined.contexts)) != list(map(id, contexts)):
                        joined = self._joined = ContextBatch.join(contexts)
                    tokens = [request.tokens for request in batch]
                    results = (
                        joined.append(self.model, tokens) if append else joined.logits(self.model, tokens)
                    )
        except BaseException as error:  # every session of the batch gets it, none waits for ever
            for request in batch:
                request.error, request.done = error, True
            if not isinstance(error, Exception):
                raise
            return
        for request, result in zip(batch, results, strict=True):
            request.result, request.done = result, True


class Dreamer:
    """The frames dreamed so far (within the model's window) and the next one on demand."""

    def __init__(
        self, model: Model, tokens: Tensor, actions: Tensor, keep: int, batcher: CallBatcher | None = None
    ) -> None:
        """Start after the given frames: tokens (C, H, W) ids and their actions (C, 2), on the model's device;
        `keep` frames stay in the context when it slides (1 <= keep < the model's frames). With a `batcher`,
        the model calls of each unmasking iteration are shared with the other sessions dreaming then."""
        if batcher is not None and batcher.model is not model:
            raise ValueError("the batcher shares another model's calls than the one dreaming")
        self.model = model
        self.batcher = batcher
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
            shared = None if self.batcher is None else self.batcher.logits(context, tokens)
            logits = context.guided_logits(
                self.model, tokens, settings.guidance, settings.action_guidance, shared
            )
            latest[:] = [logits]
            return logits

        def on_step(step: int, tokens: Tensor) -> None:
            on_iteration(step, latest[0][0, 0], tokens[0, 0])  # type: ignore[misc]

        height, width = context.tokens.shape[2:]
        mask_id = self.model.arch.mask_id
        blank = torch.full((1, 1, height, width), mask_id, dtype=torch.long, device=action.device)
        with contextlib.nullcontext() if self.batcher is None else self.batcher.dreaming():
            frame = unmask(
                logits_of, blank, mask_id, settings.steps, settings.temperature, generator,
                None if on_iteration is None else on_step, choice_temperature=settings.choice_temperature,
            )  # fmt: skip
            if self.batcher is None:
                self.context = context.append(self.model, frame)
            else:
                self.context = self.batcher.append(context, frame)
        return frame[0, 0]
