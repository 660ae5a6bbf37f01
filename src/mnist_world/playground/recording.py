"""A played run kept for later: its actions as JSON, its frames as a GIF, and the replay that turns the
first back into the second (same checkpoint, sequence, seed and actions: the same frames).
"""

from __future__ import annotations

import dataclasses
import io
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field, Strict, ValidationError

from mnist_world.evaluation import pictures
from mnist_world.playground.dreamer import SamplerSettings
from mnist_world.playground.protocol import (
    MAX_NAME,
    MAX_SEED,
    MAX_SEQUENCE,
    MAX_TEMPERATURE,
    Coordinate,
    Int,
    Message,
    Number,
    StepRequest,
    describe,
)
from mnist_world.playground.session import PlayedFrame, Session
from mnist_world.playground.world import PlaygroundError, World

FORMAT = "mnist_world.playground.recording/1"
SCALE = 4  # GIF enlargement, nearest neighbour: 32x32 frames become 128x128
FRAME_MS = 250
MAX_FRAMES = 100_000  # frames of one recording: hours of play; a replay dreams every one of them
MAX_STEPS = 10_000  # unmasking iterations per frame


class RecordedFrame(Message):
    action: Annotated[list[Coordinate], Field(min_length=2, max_length=2)]
    temperature: Annotated[Number, Field(ge=0, le=MAX_TEMPERATURE)]
    truth: Annotated[bool, Strict()] = False


class RecordingFile(Message):
    """A recording's JSON, every number bounded: a replay refuses what it could only coerce or overflow."""

    format: Literal["mnist_world.playground.recording/1"]
    checkpoint: Annotated[str, Field(min_length=1, max_length=MAX_NAME)]
    sequence: Annotated[Int, Field(ge=0, le=MAX_SEQUENCE)]
    seed: Annotated[Int, Field(ge=0, le=MAX_SEED)]
    steps: Annotated[Int, Field(ge=1, le=MAX_STEPS)]
    guidance: Annotated[Number, Field(ge=0, le=MAX_TEMPERATURE)]
    choice_temperature: Annotated[Number, Field(ge=0, le=MAX_TEMPERATURE)] = 1.0  # older recordings: 1
    action_guidance: Annotated[Number, Field(ge=0, le=MAX_TEMPERATURE)] = 0.0  # older recordings: none
    keep: Annotated[Int, Field(ge=1, le=MAX_STEPS)]
    frames: Annotated[list[RecordedFrame], Field(max_length=MAX_FRAMES)]


@dataclasses.dataclass(frozen=True)
class Recording:
    """Everything that decides a run's frames, given the stores."""

    checkpoint: str
    sequence: int
    seed: int
    steps: int
    guidance: float
    choice_temperature: float
    action_guidance: float
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
            action_guidance=session.settings.action_guidance,
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
        """A recording from its JSON form, with a one-line error naming the field for anything else."""
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise PlaygroundError(f"not a playground recording (expected format {FORMAT})")
        try:
            checked = RecordingFile.model_validate(payload)
        except ValidationError as error:
            raise PlaygroundError(f"a damaged playground recording: {describe(error)}") from None
        frames = tuple(
            PlayedFrame((frame.action[0], frame.action[1]), frame.temperature, frame.truth)
            for frame in checked.frames
        )
        values = checked.model_dump(exclude={"format", "frames"})
        return cls(**values, frames=frames)


def replay(recording: Recording, world: World) -> Session:
    """Play the recorded actions again from the recorded start: the session holds the same frames."""
    settings = SamplerSettings(
        steps=recording.steps,
        # the session's first; `Session.step` dreams each frame again at its own recorded temperature
        temperature=recording.frames[0].temperature if recording.frames else 1.0,
        guidance=recording.guidance,
        choice_temperature=recording.choice_temperature,
        action_guidance=recording.action_guidance,
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
