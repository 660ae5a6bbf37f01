"""A played run kept for later: its actions as JSON, its frames as a GIF, and the replay that turns the
first back into the second (same checkpoint, sequence, seed and actions: the same frames).
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import numpy as np

from mnist_world.evaluation import pictures
from mnist_world.playground.dreamer import SamplerSettings
from mnist_world.playground.protocol import StepRequest, parse_step
from mnist_world.playground.session import PlayedFrame, Session
from mnist_world.playground.world import PlaygroundError, World

FORMAT = "mnist_world.playground.recording/1"
SCALE = 4  # GIF enlargement, nearest neighbour: 32x32 frames become 128x128
FRAME_MS = 250


@dataclasses.dataclass(frozen=True)
class Recording:
    """Everything that decides a run's frames, given the stores."""

    checkpoint: str
    sequence: int
    seed: int
    steps: int
    guidance: float
    choice_temperature: float
    keep: int
    frames: tuple[PlayedFrame, ...]

    @classmethod
    def of(cls, session: Session) -> Recording:
        return cls(
            checkpoint=session.world.checkpoint,
            sequence=session.sequence.index,
            seed=session.seed,
            steps=session.settings.steps,
            guidance=session.settings.guidance,
            choice_temperature=session.settings.choice_temperature,
            keep=session.keep,
            frames=tuple(session.played),
        )

    def to_json(self) -> dict[str, Any]:
        payload = dataclasses.asdict(self)
        payload["frames"] = [
            {"action": list(frame.action), "temperature": frame.temperature, "truth": frame.truth}
            for frame in self.frames
        ]
        return {"format": FORMAT, **payload}

    @classmethod
    def from_json(cls, payload: Any) -> Recording:
        """A recording from its JSON form, with a one-line error for anything else."""
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise PlaygroundError(f"not a playground recording (expected format {FORMAT})")
        try:
            frames = payload["frames"]
            played = []
            for index, frame in enumerate(frames):
                request = parse_step({"session": "replay", "frame": index, **frame})
                played.append(PlayedFrame(request.action, request.temperature, request.truth))
            return cls(
                checkpoint=str(payload["checkpoint"]),
                sequence=int(payload["sequence"]),
                seed=int(payload["seed"]),
                steps=int(payload["steps"]),
                guidance=float(payload["guidance"]),
                choice_temperature=float(payload.get("choice_temperature", 1.0)),  # older recordings: 1
                keep=int(payload["keep"]),
                frames=tuple(played),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise PlaygroundError(f"a damaged playground recording ({error})") from None


def replay(recording: Recording, world: World) -> Session:
    """Play the recorded actions again from the recorded start: the session holds the same frames."""
    settings = SamplerSettings(
        steps=recording.steps, guidance=recording.guidance, choice_temperature=recording.choice_temperature
    )
    session = Session(world, recording.sequence, recording.seed, settings, keep=recording.keep)
    for frame in recording.frames:
        request = StepRequest("replay", len(session.frames), frame.action, frame.temperature, frame.truth)
        session.step(request)
    return session


def animation_gif(session: Session) -> bytes:
    """The run as a looping GIF: the dream (given frames, then dreamed ones) and, when the true future was
    shown, the truth beside it (black where it was not shown)."""
    past = session.world.past_frames
    dream = np.stack(session.frames)  # (T, H, W)
    panels = [("dream", dream)]
    if any(frame.truth for frame in session.played):
        truth = np.zeros_like(dream)
        truth[:past] = session.sequence.frames[:past]
        for offset, frame in enumerate(session.played):
            if frame.truth:
                truth[past + offset] = session.sequence.frames[past + offset]
        panels.append(("truth", truth))
    buffer = io.BytesIO()
    pictures.save_gif(pictures.animation(panels, past, SCALE), buffer, frame_ms=FRAME_MS)
    return buffer.getvalue()
