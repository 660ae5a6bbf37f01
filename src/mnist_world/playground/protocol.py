"""The page's conversation with the server, as JSON: what a request may hold and what a frame looks like.

A request is checked here, where it enters (pydantic models with bounds on every number), so the session logic
can trust it. Frames travel as base64 of uint8 grey levels, row by row: 1 KiB for a 32x32 frame, drawn by the
page without any smoothing.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError

from mnist_world.playground.world import PlaygroundError

MAX_ACTION = 1.0  # an action is a displacement over half the frame: beyond 1 the digit leaves the frame
MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds; JSON numbers beyond are refused, not wrapped
MAX_SEQUENCE = 2**31 - 1
MAX_FRAME = 1_000_000  # frames of one run: hours of play at the page's fastest speed
MAX_TEMPERATURE = 100.0
MAX_NAME = 512  # characters of a session id or a checkpoint's name
MAX_DEPTH = 8  # nesting of a request's JSON: the deepest request nests 2

Int = Annotated[int, Strict()]  # strict: true, 2.5 and "3" are refused, not coerced
Number = Annotated[float, Field(allow_inf_nan=False), Strict()]  # an int is a number too; NaN and inf are not
Name = Annotated[str, Strict(), Field(max_length=MAX_NAME)]
Coordinate = Annotated[Number, Field(ge=-MAX_ACTION, le=MAX_ACTION)]


@dataclasses.dataclass(frozen=True)
class RestartRequest:
    """Start (or start again) a run: a new session when `session` is None or unknown."""

    session: str | None
    sequence: int | None  # None: the server's default
    seed: int | None
    checkpoint: str | None  # one of the checkpoints the server offers; None: its default


@dataclasses.dataclass(frozen=True)
class StepRequest:
    """Dream frame number `frame` (counted from the run's first given frame) of `session`."""

    session: str
    frame: int
    action: tuple[float, float]  # (dx, dy): the ego digit's move over (W / 2, H / 2); y grows downward
    temperature: float
    truth: bool  # play the dataset's own action instead, and show its true frame beside the dream
    belief: bool = False  # send the model's belief about the frame: its expected image and confidence
    unmasking: bool = False  # send every unmasking iteration of the frame


class Message(BaseModel):
    """A request's JSON object: unknown keys are refused (a misspelt key must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class RestartBody(Message):
    session: Name | None = None
    sequence: Annotated[Int, Field(ge=0, le=MAX_SEQUENCE)] | None = None
    seed: Annotated[Int, Field(ge=0, le=MAX_SEED)] | None = None
    checkpoint: Name | None = None

    def request(self) -> RestartRequest:
        checkpoint = (self.checkpoint or "").strip() or None  # an emptied field means the server's default
        return RestartRequest(self.session, self.sequence, self.seed, checkpoint)


class StepBody(Message):
    session: Name
    frame: Annotated[Int, Field(ge=0, le=MAX_FRAME)]
    action: Annotated[list[Coordinate], Field(min_length=2, max_length=2)]
    temperature: Annotated[Number, Field(ge=0, le=MAX_TEMPERATURE)]
    truth: Annotated[bool, Strict()] = False
    belief: Annotated[bool, Strict()] = False
    unmasking: Annotated[bool, Strict()] = False

    def request(self) -> StepRequest:
        dx, dy = self.action
        return StepRequest(
            self.session, self.frame, (dx, dy), self.temperature, self.truth, self.belief, self.unmasking
        )


STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"')


def _no_constant(name: str) -> Any:
    raise PlaygroundError(f"{name} is not a JSON number")


def read_json(raw: bytes, max_depth: int = MAX_DEPTH) -> Any:
    """A request's or a file's bytes as JSON, refusing what Python's reader would take but a number check
    should never see (NaN, Infinity) and nesting deeper than `max_depth`, with one line each."""
    brackets = np.frombuffer(STRINGS.sub(b'""', raw), dtype=np.uint8)
    opening = np.isin(brackets, np.frombuffer(b"[{", dtype=np.uint8)).astype(np.int64)
    closing = np.isin(brackets, np.frombuffer(b"]}", dtype=np.uint8)).astype(np.int64)
    depth = int(np.cumsum(opening - closing).max(initial=0))
    if depth > max_depth:
        raise PlaygroundError(f"the JSON nests {depth} levels deep (at most {max_depth})")
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except PlaygroundError:
        raise
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise PlaygroundError(f"not JSON: {str(error).splitlines()[0]}") from None


# --- The live connection's commands (page -> server) ------------------------------------------------------


class RestartCommand(RestartBody):
    op: Literal["restart"]


class PlayCommand(Message):
    """Play (frames pushed at `fps`) or pause."""

    op: Literal["play", "pause"]


class StepCommand(Message):
    """One frame now, under the current controls (while paused)."""

    op: Literal["step"]


class ControlCommand(Message):
    """The controls every next frame is dreamed under: the held arrows' action, and what to show."""

    op: Literal["controls"]
    action: Annotated[list[Coordinate], Field(min_length=2, max_length=2)]
    temperature: Annotated[Number, Field(ge=0, le=MAX_TEMPERATURE)]
    truth: Annotated[bool, Strict()] = False
    belief: Annotated[bool, Strict()] = False
    unmasking: Annotated[bool, Strict()] = False
    fps: Annotated[Number, Field(ge=0.5, le=30)] = 4.0


Command = Annotated[RestartCommand | PlayCommand | StepCommand | ControlCommand, Field(discriminator="op")]


class CommandMessage(BaseModel):
    command: Command


def describe(error: ValidationError) -> str:
    """The first problem of a validation error as one line: the field, what it must be, what it was."""
    first = error.errors()[0]
    location = first["loc"][2:] if first["loc"][:1] == ("command",) else first["loc"]  # past the tag
    where = ".".join(str(part) for part in location) or "request"
    given = repr(first.get("input"))
    given = given if len(given) <= 40 else given[:37] + "..."
    if first["type"] == "extra_forbidden":
        return f"unknown field '{where}'"
    if first["type"] == "missing":
        return f"'{where}' is missing"
    if first["type"] in ("union_tag_invalid", "union_tag_not_found"):
        return "unknown command: 'op' must be one of restart, play, pause, step, controls"
    message = first["msg"].removeprefix("Input ")
    return f"'{where}' {message[0].lower() + message[1:]}, got {given}"


def validate(model: type[Message], body: Any) -> Any:
    """`body` checked as a `model`, or a PlaygroundError with one line."""
    if not isinstance(body, dict):
        raise PlaygroundError(f"expected a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as error:
        raise PlaygroundError(describe(error)) from None


def parse_restart(body: Any) -> RestartRequest:
    return validate(RestartBody, body).request()


def parse_step(body: Any) -> StepRequest:
    return validate(StepBody, body).request()


def parse_command(body: Any) -> RestartCommand | PlayCommand | StepCommand | ControlCommand:
    if not isinstance(body, dict):
        raise PlaygroundError(f"expected a JSON object, got {type(body).__name__}")
    try:
        return CommandMessage.model_validate({"command": body}).command
    except ValidationError as error:
        raise PlaygroundError(describe(error)) from None


# --- Frames (server -> page) -------------------------------------------------------------------------------


def encode_pixels(frame: np.ndarray) -> str:
    """A frame (H, W) in [0, 1] as base64 of its uint8 grey levels, row by row."""
    grey = np.rint(np.clip(frame, 0.0, 1.0) * 255).astype(np.uint8)
    return base64.b64encode(grey.tobytes()).decode("ascii")


def decode_pixels(text: str, size: int) -> np.ndarray:
    """The inverse of `encode_pixels`: uint8 (size, size)."""
    return np.frombuffer(base64.b64decode(text), dtype=np.uint8).reshape(size, size)


def frame_message(
    frame: int,
    pixels: np.ndarray,
    action: tuple[float, float] | np.ndarray,
    centre: np.ndarray | None,
    given: bool,
    truth: np.ndarray | None = None,
) -> dict[str, Any]:
    """One frame for the page: its number, grey levels, the action that led to it, the ego digit's tracked
    centre (x, y) in pixels (None when the tracker cannot tell), whether it was given or dreamed, and the true
    frame at the same time when the page asked for it."""
    return {
        "frame": frame,
        "pixels": encode_pixels(pixels),
        "action": [float(value) for value in action],
        "centre": None if centre is None else [float(value) for value in centre],
        "given": given,
        "truth": None if truth is None else encode_pixels(truth),
    }
