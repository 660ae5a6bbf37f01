"""One browser tab's run: the frames given and dreamed so far, the actions that led to them, and the next
frame on request. A session holds its own dreamer, random generator and lock, so tabs never share state.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import warnings
from typing import Any

import numpy as np
import torch

from mnist_world.evaluation.action_following import Tracker
from mnist_world.model.sampling import new_generator, warn_if_unguided
from mnist_world.playground.dreamer import Dreamer, SamplerSettings
from mnist_world.playground.protocol import StepRequest, frame_message
from mnist_world.playground.world import PlaygroundError, World


def overlay_centres(tracker: Tracker, frames: np.ndarray) -> np.ndarray | None:
    """(T, 2) centres (x, y) of the ego digit in pixels of frames (T, H, W) in [0, 1], for the page's overlay;
    None when no frame shows the ego digit apart from the others (then the tracker knows its motion at best,
    not where it is)."""
    track = tracker.track(frames[None])  # (1, T, H, W): the evaluation's tracking, for one sequence
    return track.centre[0] if track.reference[0] >= 0 else None


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
        self.world, self.seed, self.settings, self.overlay = world, seed, settings, overlay
        self.lock = threading.Lock()
        self.sequence = world.data.sequence(sequence)
        past = world.past_frames
        self.keep = past if keep is None else keep
        if not 1 <= self.keep < world.arch.frames:
            raise PlaygroundError(f"keep={self.keep} must be in [1, {world.arch.frames - 1}]")
        given = torch.from_numpy(self.sequence.tokens[:past]).to(world.device)
        actions = torch.from_numpy(self.sequence.actions[:past]).to(world.device)
        self.dreamer = Dreamer(world.model, given, actions, self.keep)
        self.generator = new_generator(seed, world.device)
        self.frames: list[np.ndarray] = list(world.data.to_pixels(self.sequence.tokens[:past]))  # (H, W) each
        self.played: list[PlayedFrame] = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the note goes to the page instead
            note = warn_if_unguided(settings.guidance, world.objectives)
        self.notes = [note] if note else []

    @property
    def truth_left(self) -> int:
        """True future frames of the sequence not yet played."""
        return max(0, self.world.data.length - len(self.frames))

    def _centres(self) -> np.ndarray | None:
        """The ego digit's centres in the newest frames (as many as the model sees at once)."""
        if not self.overlay:
            return None
        return overlay_centres(self.world.data.tracker, np.stack(self.frames[-self.world.arch.frames :]))

    def start_message(self) -> dict[str, Any]:
        """The run's given frames and what the page needs to know to continue it."""
        centres = self._centres()
        past = self.world.past_frames
        return {
            "sequence": self.sequence.index,
            "seed": self.seed,
            "checkpoint": self.world.checkpoint,
            "steps": self.settings.steps,
            "guidance": self.settings.guidance,
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

    def step(self, request: StepRequest) -> dict[str, Any]:
        """Dream the next frame: the message for the page, with how long the model took."""
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
        started = time.perf_counter()
        tokens = self.dreamer.next_frame(
            torch.tensor(action, device=self.world.device), settings, self.generator
        )
        frame = self.world.data.to_pixels(tokens.cpu().numpy())
        elapsed = time.perf_counter() - started
        self.frames.append(frame)
        self.played.append(PlayedFrame(action, request.temperature, request.truth))
        centres = self._centres()
        message = frame_message(
            index,
            frame,
            action,
            None if centres is None else centres[-1],
            given=False,
            truth=self.sequence.frames[index] if request.truth else None,
        )
        message.update(
            context=self.dreamer.context_frames,
            truth_left=self.truth_left,
            generation_ms=round(elapsed * 1000, 1),
        )
        return message
