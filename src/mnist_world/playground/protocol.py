"""The page's conversation with the server, as JSON: what a request may hold and what a frame looks like.

A request is checked here, where it enters, so the session logic can trust it. Frames travel as base64 of
uint8 grey levels, row by row: 1 KiB for a 32x32 frame, drawn by the page without any smoothing.
"""

from __future__ import annotations

import base64
import dataclasses
import math
from typing import Any

import numpy as np

from mnist_world.playground.world import PlaygroundError

MAX_ACTION = 1.0  # an action is a displacement over half the frame: beyond 1 the digit leaves the frame


@dataclasses.dataclass(frozen=True)
class RestartRequest:
    """Start (or start again) a run: a new session when `session` is None or unknown."""

    session: str | None
    sequence: int | None  # None: the server's default
    seed: int | None
    checkpoint: str | None


@dataclasses.dataclass(frozen=True)
class StepRequest:
    """Dream frame number `frame` (counted from the run's first given frame) of `session`."""

    session: str
    frame: int
    action: tuple[float, float]  # (dx, dy): the ego digit's move over (W / 2, H / 2); y grows downward
    temperature: float
    truth: bool  # play the dataset's own action instead, and show its true frame beside the dream


def _field(body: dict[str, Any], name: str, kind: type, optional: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        if optional:
            return None
        raise PlaygroundError(f"request lacks '{name}'")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise PlaygroundError(
            f"'{name}' must be {'a number' if kind is float else kind.__name__}, got {value!r}"
        )
    if kind is float and not math.isfinite(value):
        raise PlaygroundError(f"'{name}' must be finite, got {value!r}")
    return value


def _mapping(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise PlaygroundError(f"expected a JSON object, got {type(body).__name__}")
    return body


def parse_restart(body: Any) -> RestartRequest:
    body = _mapping(body)
    checkpoint = _field(body, "checkpoint", str, optional=True)
    if checkpoint is not None and not checkpoint.strip():
        checkpoint = None  # an emptied field on the page means the server's default
    return RestartRequest(
        session=_field(body, "session", str, optional=True),
        sequence=_field(body, "sequence", int, optional=True),
        seed=_field(body, "seed", int, optional=True),
        checkpoint=checkpoint.strip() if checkpoint else None,
    )


def parse_step(body: Any) -> StepRequest:
    body = _mapping(body)
    action = body.get("action")
    if not (isinstance(action, list) and len(action) == 2):
        raise PlaygroundError(f"'action' must be [dx, dy], got {action!r}")
    dx, dy = (_field({"action": value}, "action", float) for value in action)
    if max(abs(dx), abs(dy)) > MAX_ACTION:
        raise PlaygroundError(f"'action' {[dx, dy]} moves the digit more than half the frame")
    temperature = _field(body, "temperature", float)
    if temperature < 0:
        raise PlaygroundError(f"'temperature' must not be negative, got {temperature}")
    frame = _field(body, "frame", int)
    truth = body.get("truth", False)
    if not isinstance(truth, bool):
        raise PlaygroundError(f"'truth' must be true or false, got {truth!r}")
    return StepRequest(_field(body, "session", str), frame, (dx, dy), temperature, truth)


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
