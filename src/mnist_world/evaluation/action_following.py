"""Whether a predicted ego digit follows the commanded actions, measured by tracking it in the frames.

Action following (`action_following`): the tracker finds the ego digit (most ink) in every frame of the
past ground truth followed by the predicted future; its per-frame displacement d_t = c_t - c_{t-1} (pixels at
the token resolution) is compared with the commanded one a_t * (W/2, H/2):
- `error_px`: mean over sequences and future frames of |d_t - a_t (W/2, H/2)|;
- `cosine`: per sequence, the cosine between the whole predicted trajectory of displacements (F x 2, one
  vector) and the commanded one, averaged over sequences: 1 follows the command exactly in direction,
  0 ignores it, -1 goes the opposite way;
- `follows`: the share of sequences whose cosine is positive;
- `found`: the share of future frames where the ego digit is there: its box (28 px at the canvas,
  centred where the tracker puts it) holds at least PRESENCE of the ink it held in the past frames (median).
  A frame where it is not found is a miss: nothing moved into or out of it (zero displacement), so the frame
  adds nothing to the cosine's dot product while the commanded trajectory's norm still counts it, and its
  error is the whole commanded step. Without this, a vanished digit scores well: through an empty frame the
  tracker carries its own constant-velocity prediction forward, which agrees with the command;
- `tracked`: the share of sequences where the ego digit could be identified (the means above are over
  these).
The counterfactual reruns the sampler on the same past with the future actions mirrored (-dx, -dy): a model
that uses its actions makes the digit follow the mirrored command (positive cosine with it), one that only
extrapolates the past keeps going the original way (negative cosine). `cosine_to_factual` compares the two
predictions directly, commands aside: the cosine between the counterfactual and the factual predicted
trajectories, near -1 when the mirrored actions send the digit back, near 1 when the actions are ignored.
Three references sit beside the model: the same measurement on the true future frames (`ground_truth_*`,
the tracker's own floor: it moves whole pixels at 32x32, about 0.5 px per frame), a digit that stands still
(`still_error_px`, what an action-blind, motionless answer scores) and a blank future through the same code
(`blank_*`: every frame a miss, cosine 0).

The presence test is ours, not the tracker's `found` flag: at the token resolution a digit's shape changes
with its sub-pixel phase, so the tracker's exact-fit test fails on most true frames (85% at 16x16); the ink in
the digit's box does not (the true frames' `found` is near 1), and a faded or vanished digit leaves it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from mnist_world.actions.tracking import LiveTrack, Track, track_ego
from mnist_world.config import DIGIT_SIZE

PRESENCE = 0.5  # the ego digit is found where its box holds at least this share of its past ink


@dataclasses.dataclass(frozen=True)
class Tracker:
    """The tracker's settings as the action store records them, and the raw resolution of the digits."""

    threshold: float
    min_area: int
    digits: int
    canvas: int

    @classmethod
    def from_attributes(cls, attributes: dict[str, Any]) -> Tracker:
        """From the action store's attributes: `tracking` {threshold, min_area, digits} and `canvas`."""
        tracking = attributes["tracking"]
        return cls(
            float(tracking["threshold"]),
            int(tracking["min_area"]),
            int(tracking["digits"]),
            int(attributes["canvas"]),
        )

    def box(self, frame_size: int) -> float:
        """The digits' box side in pixels of frames `frame_size` wide (the canvas fixes it)."""
        return DIGIT_SIZE * frame_size / self.canvas

    @staticmethod
    def pixels(frames: np.ndarray) -> np.ndarray:
        """Frames in [0, 1] as the tracker reads them: uint8."""
        return np.rint(np.clip(frames, 0.0, 1.0) * 255).astype(np.uint8)

    def track(self, frames: np.ndarray) -> Track:
        """The ego digit tracked through frames (N, T, H, W) in [0, 1] at any resolution: the canvas fixes
        the digits' box size at this one."""
        box = self.box(frames.shape[-1])
        return track_ego(self.pixels(frames), self.threshold, self.min_area, self.digits, box=box)

    def live(self, frames: np.ndarray) -> LiveTrack | None:
        """The ego digit of one sequence's frames (T, H, W) in [0, 1], to follow through frames added one at a
        time (`LiveTrack.add`, given `pixels`); None when no frame shows it apart from the other digits."""
        box = self.box(frames.shape[-1])
        return LiveTrack.start(self.pixels(frames), self.threshold, self.min_area, self.digits, box=box)


def box_ink(frames: np.ndarray, centre: np.ndarray, box: float) -> np.ndarray:
    """(N, T): the ink (sum of pixel values) of frames (N, T, H, W) within the box of side `box` centred at
    centre (N, T, 2) (x, y; pixel i spans [i, i + 1))."""
    height, width = frames.shape[-2:]
    inside_x = np.abs(np.arange(width) + 0.5 - centre[..., 0:1]) < box / 2  # (N, T, W)
    inside_y = np.abs(np.arange(height) + 0.5 - centre[..., 1:2]) < box / 2  # (N, T, H)
    return np.einsum("nthw,nth,ntw->nt", frames.astype(np.float64), inside_y, inside_x)


def ego_displacements(
    frames: np.ndarray, tracker: Tracker, past: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Track the ego digit through frames (N, T, H, W) in [0, 1] whose first `past` are the given truth.

    Returns (displacement (N, T - 1, 2) in pixels of `frames`, (x, y) from frame t - 1 to t, zero unless the
    digit is found in both frames; tracked (N,): the tracker found a frame where the digits stand apart, so
    the ego digit is known; found (N, T): the digit's box holds at least PRESENCE of the median ink it held
    in the past frames, see the module doc).
    """
    track = tracker.track(frames)
    ink = box_ink(frames, track.centre, tracker.box(frames.shape[-1]))  # (N, T)
    reference = np.median(ink[:, :past], axis=1, keepdims=True)  # (N, 1)
    found = (ink >= PRESENCE * reference) & (reference > 0)
    both = found[:, 1:] & found[:, :-1]  # (N, T - 1)
    displacement = np.where(both[..., None], np.diff(track.centre, axis=1), 0.0)
    return displacement, track.reference >= 0, found


def action_following(displacement: np.ndarray, actions: np.ndarray, frame_size: int) -> dict[str, np.ndarray]:
    """Per sequence, how displacements (N, F, 2) in pixels follow actions (N, F, 2) (see the module doc).

    Returns {"error_px": (N,) mean distance per frame, "cosine": (N,), "follows": (N,) bool}.
    """
    commanded = actions.astype(np.float64) * (frame_size / 2)  # (N, F, 2) pixels
    error = np.linalg.norm(displacement - commanded, axis=-1).mean(axis=1)
    cosine = trajectory_cosine(displacement, commanded)
    return {"error_px": error, "cosine": cosine, "follows": cosine > 0}


def trajectory_cosine(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """(N,): cosine between two trajectories of displacements (N, F, 2), each taken as one 2F vector; 0 where
    either does not move at all."""
    dot = (first * second).sum(axis=(1, 2))
    norms = np.linalg.norm(first, axis=(1, 2)) * np.linalg.norm(second, axis=(1, 2))
    return np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 0.0)


def mirror(actions: np.ndarray, past_frames: int) -> np.ndarray:
    """Actions (..., T, 2) with the future ones (t >= past_frames) negated: the counterfactual command."""
    mirrored = np.array(actions, copy=True)
    mirrored[..., past_frames:, :] *= -1
    return mirrored


def follow_actions(
    truth: np.ndarray,
    predicted: np.ndarray,
    counterfactual: np.ndarray,
    commanded: np.ndarray,
    past: int,
    tracker: Tracker,
) -> dict[str, np.ndarray]:
    """Per-sequence action following of a batch: {"<run>.<score>": (B,)} for the runs model (true actions),
    counterfactual (mirrored actions), ground_truth (the true future frames) and blank (an empty future),
    plus `still.error_px`. `<run>.found` is each sequence's share of future frames with the ego digit found.

    truth (B, T, H, W) frames; predicted, counterfactual (B, F, H, W); commanded (B, T, 2) actions.
    """
    frame_size = truth.shape[-1]
    runs = {
        "model": (predicted, commanded),
        "counterfactual": (counterfactual, mirror(commanded, past)),
        "ground_truth": (truth[:, past:], commanded),
        "blank": (np.zeros_like(truth[:, past:]), commanded),
    }
    scores, moved = {}, {}
    for run, (future, command) in runs.items():
        sequence = np.concatenate([truth[:, :past], future], axis=1)  # the past is given in every run
        displacement, tracked, found = ego_displacements(sequence, tracker, past)
        moved[run] = displacement[:, past - 1 :]  # (B, F, 2): into each future frame
        following = action_following(moved[run], command[:, past:], frame_size)
        scores.update({f"{run}.{name}": values for name, values in following.items()})
        scores[f"{run}.tracked"] = tracked
        scores[f"{run}.found"] = found[:, past:].mean(axis=1)
    # Still: a digit that does not move, the action-blind answer.
    still = np.zeros_like(moved["model"])
    scores["still.error_px"] = action_following(still, commanded[:, past:], frame_size)["error_px"]
    scores["counterfactual.cosine_to_factual"] = trajectory_cosine(moved["counterfactual"], moved["model"])
    return scores


def summarize_following(values: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Means over the sequences the tracker could follow, per run, plus the share it could follow; the
    ground truth's and the blank future's beside the model's."""

    def run(name: str) -> dict[str, float]:
        tracked = values[f"{name}.tracked"]
        if not tracked.any():
            return {"tracked": 0.0}
        return {
            "error_px": float(values[f"{name}.error_px"][tracked].mean()),
            "cosine": float(values[f"{name}.cosine"][tracked].mean()),
            "follows": float(values[f"{name}.follows"][tracked].mean()),
            "found": float(values[f"{name}.found"][tracked].mean()),
            "tracked": float(tracked.mean()),
        }

    factual, counterfactual, truth = run("model"), run("counterfactual"), run("ground_truth")
    blank = run("blank")
    both = values["model.tracked"] & values["counterfactual.tracked"]
    if both.any():
        counterfactual["cosine_to_factual"] = float(values["counterfactual.cosine_to_factual"][both].mean())
    # The tracker's own floor: the same measurement on the true future frames.
    factual["ground_truth_error_px"] = truth.get("error_px")
    factual["ground_truth_cosine"] = truth.get("cosine")
    factual["ground_truth_found"] = truth.get("found")
    # A blank future through the same code: what a model that lets its digits vanish scores.
    factual.update({f"blank_{name}": blank.get(name) for name in ("error_px", "cosine", "follows", "found")})
    factual["still_error_px"] = float(values["still.error_px"].mean())
    return {"action_following": factual, "counterfactual": counterfactual}
