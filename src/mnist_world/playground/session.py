"""One browser tab's run: the frames given and dreamed so far, the actions that led to them, and the next
frame on request. A session holds its own dreamer, random generator and lock, so tabs never share state.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from mnist_world.evaluation.action_following import Tracker
from mnist_world.model.sampling import new_generator, warn_if_actions_never_hidden, warn_if_unguided
from mnist_world.playground.dreamer import Dreamer, SamplerSettings
from mnist_world.playground.protocol import StepRequest, encode_pixels, frame_message
from mnist_world.playground.world import PlaygroundError, World


def overlay_centres(tracker: Tracker, frames: np.ndarray) -> np.ndarray | None:
    """(T, 2) centres (x, y) of the ego digit in pixels of frames (T, H, W) in [0, 1], tracked through all of
    them at once (a session's overlay follows the given frames' track into each new frame: `LiveTrack`);
    None when no frame shows the ego digit apart from the others (then the tracker knows its motion at best,
    not where it is)."""
    track = tracker.track(frames[None])  # (1, T, H, W): the evaluation's tracking, for one sequence
    return track.centre[0] if track.reference[0] >= 0 else None


def belief_images(logits: torch.Tensor, intensities: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """What the model believes at every position, from its logits (H, W, levels): the expected image
    sum_k p(k) * intensities[k] (the point prediction, the mean of the belief) and the confidence, the
    probability of the likeliest level; both (H, W) in [0, 1]."""
    probabilities = logits.float().softmax(dim=-1)  # (H, W, levels)
    expected = probabilities @ intensities
    return expected.cpu().numpy(), probabilities.amax(dim=-1).cpu().numpy()


@dataclasses.dataclass(frozen=True)
class PlayedFrame:
    """What made one dreamed frame: all a replay needs, beside the run's start."""

    action: tuple[float, float]
    temperature: float
    truth: bool  # the dataset's own action was played and its true frame shown


class Session:
    """A run from a validation sequence's given frames onward; `step` is called under `lock`."""

    def __init__(
        self,
        world: World,
        sequence: int,
        seed: int,
        settings: SamplerSettings,
        keep: int | None = None,
        overlay: bool = False,
    ) -> None:
        # overlay: track the ego digit with the action store's tracker settings, for the page's marker
        self.world, self.seed, self.settings = world, seed, settings
        self.lock = threading.Lock()
        self.sequence = world.data.sequence(sequence)
        past = world.past_frames
        self.keep = past if keep is None else keep
        if not 1 <= self.keep < world.arch.frames:
            raise PlaygroundError(f"keep={self.keep} must be in [1, {world.arch.frames - 1}]")
        given = torch.from_numpy(self.sequence.tokens[:past]).to(world.device)
        actions = torch.from_numpy(self.sequence.actions[:past]).to(world.device)
        self.dreamer = Dreamer(world.model, given, actions, self.keep, world.batcher)
        self.generator = new_generator(seed, world.device)
        self.frames: list[np.ndarray] = list(world.data.to_pixels(self.sequence.tokens[:past]))  # (H, W) each
        # The overlay's ego digit, found in the given frames and followed into each dreamed one.
        self.live = world.data.tracker.live(np.stack(self.frames)) if overlay else None
        self.played: list[PlayedFrame] = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the note goes to the page instead
            notes = [
                warn_if_unguided(settings.guidance, world.objectives),
                warn_if_actions_never_hidden(settings.action_guidance, world.action_dropout),
            ]
        self.notes = [note for note in notes if note]
        levels = np.arange(world.arch.levels)
        self.intensities = torch.from_numpy(world.data.to_pixels(levels)).to(world.device)  # (levels,)

    @property
    def truth_left(self) -> int:
        """True future frames of the sequence not yet played."""
        return max(0, self.world.data.length - len(self.frames))

    def _centre(self, frame: np.ndarray) -> np.ndarray | None:
        """The ego digit's centre in a newly dreamed frame (H, W), for the page's overlay."""
        if self.live is None:
            return None
        return self.live.add(self.world.data.tracker.pixels(frame))

    def start_message(self) -> dict[str, Any]:
        """The run's given frames and what the page needs to know to continue it."""
        centres = None if self.live is None else self.live.centres
        past = self.world.past_frames
        return {
            "sequence": self.sequence.index,
            "seed": self.seed,
            "checkpoint": self.world.checkpoint,
            "steps": self.settings.steps,
            "guidance": self.settings.guidance,
            "action_guidance": self.settings.action_guidance,
            "window": self.world.arch.frames,
            "keep": self.keep,
            "frame_size": self.world.data.frame_size,
            "truth_left": self.truth_left,
            "notes": self.notes,
            "frames": [
                frame_message(
                    t,
                    self.frames[t],
                    self.sequence.actions[t],
                    None if centres is None else centres[t],
                    given=True,
                    truth=self.sequence.frames[t],
                )
                for t in range(past)
            ],
        }

    def _iteration_message(
        self, index: int, iteration: int, logits: torch.Tensor, tokens: torch.Tensor
    ) -> dict[str, Any]:
        """One unmasking iteration of frame `index`: the tokens kept so far (hidden ones drawn black and
        marked in `hidden`) and what the model believed at every position as it chose them."""
        hidden = (tokens == self.world.arch.mask_id).cpu().numpy()
        kept = self.world.data.to_pixels(np.where(hidden, 0, tokens.cpu().numpy()))
        expected, confidence = belief_images(logits, self.intensities)
        return {
            "frame": index,
            "iteration": iteration,
            "iterations": self.settings.steps,
            "pixels": encode_pixels(np.where(hidden, 0.0, kept)),
            "hidden": encode_pixels(hidden.astype(np.float32)),
            "expected": encode_pixels(expected),
            "confidence": encode_pixels(confidence),
        }

    def step(
        self, request: StepRequest, on_iteration: Callable[[dict[str, Any]], None] | None = None
    ) -> dict[str, Any]:
        """Dream the next frame: the message for the page, with how long the model took. With
        `request.belief` it holds the model's belief about the frame before any token was chosen (expected
        image, confidence); with `request.unmasking` every iteration's message, each also given to
        `on_iteration` as soon as it is made."""
        index = len(self.frames)
        if request.frame != index:
            raise PlaygroundError(
                f"frame {request.frame} asked, but the run is at frame {index}: a stale or repeated request"
            )
        action = request.action
        if request.truth:
            if self.truth_left == 0:
                raise PlaygroundError(
                    f"sequence {self.sequence.index} has no true frame {index} "
                    f"(it has {self.world.data.length})"
                )
            action = tuple(float(value) for value in self.sequence.actions[index])
        settings = dataclasses.replace(self.settings, temperature=request.temperature)
        iterations: list[dict[str, Any]] = []
        first_logits: list[torch.Tensor] = []

        def watch(iteration: int, logits: torch.Tensor, tokens: torch.Tensor) -> None:
            if iteration == 1:
                first_logits.append(logits)
            if request.unmasking:
                iterations.append(self._iteration_message(index, iteration, logits, tokens))
                if on_iteration is not None:
                    on_iteration(iterations[-1])

        watching = request.belief or request.unmasking
        started = time.perf_counter()
        tokens = self.dreamer.next_frame(
            torch.tensor(action, device=self.world.device),
            settings,
            self.generator,
            watch if watching else None,
        )
        frame = self.world.data.to_pixels(tokens.cpu().numpy())
        elapsed = time.perf_counter() - started
        self.frames.append(frame)
        self.played.append(PlayedFrame(action, request.temperature, request.truth))
        message = frame_message(
            index,
            frame,
            action,
            self._centre(frame),
            given=False,
            truth=self.sequence.frames[index] if request.truth else None,
        )
        message.update(
            context=self.dreamer.context_frames,
            truth_left=self.truth_left,
            generation_ms=round(elapsed * 1000, 1),
        )
        if request.belief:
            expected, confidence = belief_images(first_logits[0], self.intensities)
            message["belief"] = {"expected": encode_pixels(expected), "confidence": encode_pixels(confidence)}
        if request.unmasking:
            message["unmasking"] = iterations
        return message
