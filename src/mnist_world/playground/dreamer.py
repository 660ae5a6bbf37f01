"""Live autoregressive dreaming: the next frame under an action known only now, one frame at a time.

Composes the sampler's public pieces (`Context`, `unmasking`, `guide`): the frames so far stay in the model's
key/value cache, so each unmasking iteration runs the model on the new frame alone. The model has a fixed
number of temporal positions; when the context fills them it slides: the newest `keep` frames are encoded
afresh at positions 0..keep-1 (a frame's keys carry its position, so cached keys cannot simply shift).

A frame's dreaming is a coroutine (`Dreamer.dream`) that yields its model calls. Alone, each call runs on its
own (`dream_alone`). Sessions dreaming at the same time hand their frames to a `CallBatcher`, whose worker
threads run them: each unmasking iteration of the frames being dreamed, and the decoded frames joining their
contexts, is one call (`ContextBatch`) instead of one small call per session competing for the cores, with
nothing handed between threads in between. Each session still samples with its own generator and
settings; only the model calls are shared. A lone session's call is its own, so its frames equal a replay's
exactly; beside others its logits equal its own call's up to float rounding (a token at a near-tie may then
differ from the replay's).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
import weakref
from collections.abc import Callable, Generator
from typing import Any

import torch
from torch import Tensor

from mnist_world.config import SampleConfig
from mnist_world.model.sampling import Context, ContextBatch, advance, unmasking

# model(tokens (B, T, H, W), actions (B, T, 2), temporal_mask, cache=, start_frame=) -> (logits, keys and
# values), with `.arch`: a WorldModel, or the test's double.
Model = Callable[..., Any]

# Called after each unmasking iteration with (iteration 1..K, the logits (H, W, V) the iteration sampled from,
# the frame's token ids (H, W) after it, the mask id where still hidden): what the model believed, and what it
# kept.
IterationCallback = Callable[[int, Tensor, Tensor], None]


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """How each frame is unmasked: the params' `sample` section (`from_config`), every field given, so that
    no second set of defaults can drift from the params'."""

    steps: int
    temperature: float
    guidance: float
    choice_temperature: float  # sampling.unmask's
    action_guidance: float

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


GATHER_S = 0.05  # how long a new round waits for the frames of the sessions stepping before it starts anyway
STEPPING_S = 1.0  # a session seated or asking for a frame within this long is stepping: rounds wait for it
IDLE_S = 30.0  # a worker thread with no frame to dream for this long ends (the next frame starts another)


@dataclasses.dataclass(frozen=True)
class Call:
    """A model call that dreaming a frame asks for: the logits of `tokens`, the frame being unmasked, after
    `context`; or with `append` the context extended by `tokens`, the decoded frame."""

    context: Context
    tokens: Tensor
    append: bool = False

    def run(self, model: Model) -> Tensor | Context:
        """The call on its own."""
        if self.append:
            return self.context.append(model, self.tokens)
        return self.context.logits(model, self.tokens)


# Dreaming one frame with its model calls left to the caller: yields each `Call`, is sent its result, and
# returns the frame's token ids (H, W).
Dreaming = Generator[Call, Any, Tensor]


def dream_alone(dreaming: Dreaming, model: Model) -> Tensor:
    """Run `dreaming` to its frame, each of its calls on its own."""
    try:
        call = next(dreaming)
        while True:
            call = dreaming.send(call.run(model))
    except StopIteration as finished:
        return finished.value


@dataclasses.dataclass(eq=False)
class _Job:
    dreaming: Dreaming
    watched: queue.SimpleQueue | None = None  # its iterations, then None once it is done
    call: Call | None = None  # the call it waits for
    frame: Tensor | None = None
    error: BaseException | None = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)

    def advance(self, result: Tensor | Context | None) -> None:
        """Send the result of its call (None to start it): it asks for its next call, or ends."""
        try:
            self.call = next(self.dreaming) if result is None else self.dreaming.send(result)
        except StopIteration as finished:
            self.finish(frame=finished.value)
        except BaseException as error:  # its own (a bad setting, its context failing to slide): its alone
            self.finish(error=error)

    def finish(self, frame: Tensor | None = None, error: BaseException | None = None) -> None:
        self.frame, self.error, self.call = frame, error, None
        self.done.set()
        if self.watched is not None:
            self.watched.put(None)


class CallBatcher:
    """Dreams the frames of every session on worker threads, with their model calls batched: each pass of a
    worker over its sessions' frames runs one call for all that wait for logits and one for all whose
    decoded frame joins its context (`ContextBatch`), then sends each its result, and each samples with its
    own generator.

    A session keeps its worker (`seat`), the one with the fewest sessions when it started. On its worker, a
    frame's calls run back to back with nothing to hand over between them. A worker dreams in rounds: a
    round starts once every session stepping (seated or asking for a frame within `STEPPING_S`) has asked
    for its frame, or `gather_s` after the first, and frames arriving later wait for the next round, so that
    pages stepping together keep dreaming together, and pages that fell out of step (one a little late for
    a round) come back together at the next. Workers compute side by side, each with the creator's torch
    threads: one worker per CPU at one thread each uses the cores better than one worker with a thread per
    CPU, whose threads sit idle through the small operations and the sampling between calls.
    """

    def __init__(self, model: Model, workers: int = 1, gather_s: float = GATHER_S) -> None:
        if workers < 1:
            raise ValueError(f"a batcher needs at least one worker, got {workers}")
        self.model = model
        self.gather_s = gather_s
        self.threads = torch.get_num_threads()  # the creator's: what a replay of a lone session uses
        self.workers = [Worker(self) for _ in range(workers)]
        self._lock = threading.Lock()

    def seat(self, owner: object) -> Worker:
        """The worker that dreams `owner`'s frames for as long as `owner` lives: the one with the fewest
        sessions seated."""
        with self._lock:  # chosen and seated at once: two sessions starting together go to different workers
            worker = min(self.workers, key=lambda worker: worker.seated)
            worker.stepped(id(owner))
        weakref.finalize(owner, worker.leave, id(owner))
        return worker


class Worker:
    """One thread of a `CallBatcher`, dreaming the frames of the sessions seated on it."""

    def __init__(self, batcher: CallBatcher) -> None:
        self.batcher = batcher
        self._condition = threading.Condition()
        self._arrived: list[_Job] = []
        self._active: list[_Job] = []  # the frames it is dreaming (its thread's alone)
        self._thread: threading.Thread | None = None
        self._stepped: dict[int, float] = {}  # id of each session seated: when it was seated or last asked
        self._joined: ContextBatch | None = None  # the last call's contexts, kept while they stay the same

    @property
    def seated(self) -> int:
        """Sessions whose frames it dreams."""
        return len(self._stepped)

    def stepped(self, key: int) -> None:
        """Session `key` was seated, or asked for a frame, now."""
        with self._condition:
            self._stepped[key] = time.monotonic()

    def leave(self, key: int) -> None:
        """Session `key` is gone."""
        with self._condition:
            self._stepped.pop(key, None)

    def run(
        self,
        dreaming: Dreaming,
        watched: queue.SimpleQueue | None = None,
        on_iteration: IterationCallback | None = None,
        owner: object | None = None,
    ) -> Tensor:
        """The frame `dreaming` returns, its calls shared with the other frames being dreamed here; its
        error, if it (or a call it shared) failed. The iterations `dreaming` puts in `watched` are given to
        `on_iteration` on the caller's thread, so that a slow watcher holds up no other session's frame.
        `owner`, the session asking, is one the rounds wait for while it keeps stepping."""
        job = _Job(dreaming, watched)
        if owner is not None:
            self.stepped(id(owner))
        with self._condition:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="dreaming", daemon=True)
                self._thread.start()
            self._arrived.append(job)
            self._condition.notify_all()
        try:
            if watched is not None and on_iteration is not None:
                while (iteration := watched.get()) is not None:
                    on_iteration(*iteration)
        finally:
            job.done.wait()
        if job.error is not None:
            raise job.error
        assert job.frame is not None
        return job.frame

    def _serve(self) -> None:
        torch.set_num_threads(self.batcher.threads)
        try:
            while self._start_round():
                while self._active:  # one pass: every frame's call answered
                    with torch.no_grad():
                        for append in (False, True):
                            group = [job for job in self._active if job.call and job.call.append == append]
                            if group:
                                self._answer(group)
                    self._active = [job for job in self._active if not job.done.is_set()]
        except BaseException as error:  # its own failure: no frame waits for ever, the next starts a thread
            with self._condition:
                self._thread = None
                for job in self._active + self._arrived:
                    if not job.done.is_set():
                        job.finish(error=error)
                self._active, self._arrived = [], []
            raise

    def _start_round(self) -> bool:
        """Take the frames that arrived, once every session stepping has asked (or `gather_s` after the
        first); False, the thread ending, after `IDLE_S` with none. Frames arriving later wait for the next
        round: one that joined mid-way would finish out of step with the others, its decoded frame then
        joining its context in a call of its own, and the contexts joined again for every pass after. Waiting
        for the sessions stepping, not for as many frames as the last round had, is what brings pages that
        fell out of step back together: two rounds of two would otherwise stay two rounds of two."""
        with self._condition:
            if not self._condition.wait_for(lambda: self._arrived, timeout=IDLE_S):
                self._thread = None  # under the condition: the next `run` starts another
                return False
            now = time.monotonic()
            expected = sum(now - when <= STEPPING_S for when in self._stepped.values())
            deadline = now + self.batcher.gather_s
            while len(self._arrived) < expected and (left := deadline - time.monotonic()) > 0:
                self._condition.wait(left)
            self._active, self._arrived = self._arrived, []
        with torch.no_grad():
            for job in self._active:
                job.advance(None)
        return True

    def _answer(self, group: list[_Job]) -> None:
        """Run the calls of `group` (all logits, or all appends) as one and send each job its result; if the
        call fails, every job of the group gets the error."""
        calls: list[Call] = [job.call for job in group]  # type: ignore[misc]
        model = self.batcher.model
        try:
            if len(calls) == 1:  # a lone session's call is its own: its frames equal a replay's
                results = [calls[0].run(model)]
            else:
                contexts = tuple(call.context for call in calls)
                joined = self._joined  # it holds its contexts, so their ids are theirs alone
                if joined is None or list(map(id, joined.contexts)) != list(map(id, contexts)):
                    joined = self._joined = ContextBatch.join(contexts)
                tokens = [call.tokens for call in calls]
                results = (joined.append if calls[0].append else joined.logits)(model, tokens)
        except BaseException as error:  # every session of the call gets it, none waits for ever
            for job in group:
                job.dreaming.close()
                job.finish(error=error)
            return
        for job, result in zip(group, results, strict=True):
            job.advance(result)


class Dreamer:
    """The frames dreamed so far (within the model's window) and the next one on demand."""

    def __init__(
        self, model: Model, tokens: Tensor, actions: Tensor, keep: int, batcher: CallBatcher | None = None
    ) -> None:
        """Start after the given frames: tokens (C, H, W) ids and their actions (C, 2), on the model's device;
        `keep` frames stay in the context when it slides (1 <= keep < the model's frames). With a `batcher`,
        each frame is dreamed on one of its worker threads, the model calls shared with the other sessions
        dreaming there."""
        if batcher is not None and batcher.model is not model:
            raise ValueError("the batcher shares another model's calls than the one dreaming")
        self.model = model
        self.window = model.arch.frames
        if not 1 <= keep < self.window:
            raise ValueError(f"keep must be in [1, {self.window - 1}] for a model of {self.window} frames")
        if not 1 <= tokens.shape[0] < self.window:
            raise ValueError(f"start with 1 to {self.window - 1} frames, got {tokens.shape[0]}")
        self.keep = keep
        self.context = Context.encode(model, tokens[None].long(), actions[None].float())
        self.worker = None if batcher is None else batcher.seat(self)

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
        Watching the iterations draws no random numbers: the frame is the same with or without it. If the
        frame fails (or its watcher does), the context stays as it was."""
        if self.worker is None:
            return dream_alone(self.dream(action, settings, generator, on_iteration), self.model)
        watched: queue.SimpleQueue = queue.SimpleQueue()  # the iterations, from the worker to this thread

        def watch(step: int, logits: Tensor, tokens: Tensor) -> None:
            watched.put((step, logits, tokens))

        dreaming = self.dream(action, settings, generator, None if on_iteration is None else watch)
        before = self.context
        try:
            return self.worker.run(dreaming, watched, on_iteration, owner=self)
        except BaseException:
            self.context = before  # its worker may have finished the frame: it never happened
            raise

    @torch.no_grad()
    def dream(
        self,
        action: Tensor,
        settings: SamplerSettings,
        generator: torch.Generator,
        on_iteration: IterationCallback | None = None,
    ) -> Dreaming:
        """`next_frame` with its model calls left to the caller (`dream_alone`, or a `CallBatcher`): each
        unmasking iteration's logits, then the decoded frame joining the context. When the context slides,
        its newest frames are encoded afresh here, on the caller's thread."""
        twinned = settings.action_guidance > 0  # the context held twice, the second time without actions
        kept = self.keep if self.context.frames == self.window else self.context.frames
        if kept != self.context.frames or self.context.twinned != twinned:
            self.context = Context.encode(self.model, *self.context.latest(kept), twinned=twinned)
        context = self.context.with_next_action(action.view(1, 2))  # the new frame's action too

        height, width = context.tokens.shape[2:]
        mask_id = self.model.arch.mask_id
        blank = torch.full((1, 1, height, width), mask_id, dtype=torch.long, device=action.device)
        iterations = unmasking(
            blank, mask_id, settings.steps, settings.temperature, generator,
            choice_temperature=settings.choice_temperature,
        )  # fmt: skip
        tokens, last, step = next(iterations), False, 0
        while not last:
            shared = yield Call(context, tokens)
            logits = context.guided_logits(
                self.model, tokens, settings.guidance, settings.action_guidance, shared
            )
            tokens, last = advance(iterations, logits)
            step += 1
            if on_iteration is not None:
                on_iteration(step, logits[0, 0], tokens[0, 0])
        self.context = yield Call(context, tokens, append=True)
        return tokens[0, 0]
