"""Pixel metrics of predicted frames against the continuous ground truth (per frame, per horizon, overall),
the trivial baselines beside them, and whether the predicted ego digit follows the commanded actions.

Pixel metrics compare frames in [0, 1] of shape (N, F, H, W) and return one value per frame (N, F):
- `mse`: mean squared error over a frame's pixels.
- `mse_sum`: squared error summed over a frame's pixels, as public Moving MNIST tables (OpenSTL) report MSE
  (theirs over 64x64 frames, ours over the token resolution: context, not a target).
- `psnr`: 10 log10(1 / mse) per frame (data_range 1), averaged afterwards as OpenSTL does; an exact frame
  scores 100 dB (mse floored at 1e-10) rather than infinity.
- `ssim`: scikit-image `structural_similarity(data_range=1, win_size=7)` (uniform 7x7 window), mean over
  the valid area. 7 is scikit-image's default: on a 32x32 frame it spans half a digit's 14 px box, local
  enough to judge strokes, and leaves a 26x26 valid area. The original's global SSIM is a different
  quantity and not comparable.

Action following (`action_following`): the tracker finds the ego digit (most ink) in every frame of the
past ground truth followed by the predicted future; its per-frame displacement d_t = c_t - c_{t-1} (pixels at
the token resolution) is compared with the commanded one a_t * (W/2, H/2):
- `error_px`: mean over sequences and future frames of |d_t - a_t (W/2, H/2)|;
- `cosine`: per sequence, the cosine between the whole predicted trajectory of displacements (F x 2, one
  vector) and the commanded one, averaged over sequences: 1 follows the command exactly in direction,
  0 ignores it, -1 goes the opposite way;
- `follows`: the share of sequences whose cosine is positive;
- `tracked`: the share of sequences where the ego digit could be identified (the means above are over
  these).
The counterfactual reruns the sampler on the same past with the future actions mirrored (-dx, -dy): a model
that uses its actions makes the digit follow the mirrored command (positive cosine with it), one that only
extrapolates the past keeps going the original way (negative cosine). `cosine_to_factual` compares the two
predictions directly, commands aside: the cosine between the counterfactual and the factual predicted
trajectories, near -1 when the mirrored actions send the digit back, near 1 when the actions are ignored.
Two references sit beside the model: the same measurement on the true future frames (`ground_truth_*`, the
tracker's own floor: it moves whole pixels at 32x32, about 0.5 px per frame) and a digit that stands still
(`still_error_px`, what an action-blind, motionless answer scores).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
from skimage.metrics import structural_similarity

from mnist_world.tokens import dequantize
from mnist_world.tracking import DIGIT_SIZE, track_ego

SSIM_WINDOW = 7
PSNR_FLOOR_MSE = 1e-10  # an exact frame scores 10 log10(1e10) = 100 dB

# --- Pixel metrics, one value per frame ------------------------------------------------------------------


def _squared_error(prediction: np.ndarray, target: np.ndarray) -> np.ndarray:
    difference = prediction.astype(np.float64) - target.astype(np.float64)
    return difference * difference  # (N, F, H, W)


def mse(prediction: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(N, F): mean squared error over each frame's pixels."""
    return _squared_error(prediction, target).mean(axis=(-2, -1))


def mse_sum(prediction: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(N, F): squared error summed over each frame's pixels (the OpenSTL convention)."""
    return _squared_error(prediction, target).sum(axis=(-2, -1))


def psnr(prediction: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(N, F): peak signal-to-noise ratio of each frame in dB, data_range 1."""
    return 10.0 * np.log10(1.0 / np.maximum(mse(prediction, target), PSNR_FLOOR_MSE))


def ssim(prediction: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(N, F): scikit-image SSIM of each frame (data_range 1, 7x7 uniform window), mean over the valid area.

    All frames go through one call as the channels of a stack; the full SSIM map then gives each frame's
    mean over the area the window fits in, which is exactly what a per-frame call returns.
    """
    lead = prediction.shape[:-2]
    height, width = prediction.shape[-2:]
    stack = prediction.reshape(-1, height, width).astype(np.float64)  # (M, H, W)
    reference = target.reshape(-1, height, width).astype(np.float64)
    if len(stack) == 1:  # a single channel is not a stack to scikit-image
        _, full = structural_similarity(
            stack[0], reference[0], data_range=1.0, win_size=SSIM_WINDOW, full=True
        )
        full = full[None]
    else:
        _, full = structural_similarity(
            stack, reference, data_range=1.0, win_size=SSIM_WINDOW, channel_axis=0, full=True
        )  # (M, H, W)
    pad = (SSIM_WINDOW - 1) // 2
    return full[:, pad : height - pad, pad : width - pad].mean(axis=(1, 2)).reshape(lead)


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "mse": mse,
    "mse_sum": mse_sum,
    "psnr": psnr,
    "ssim": ssim,
}


def frame_metrics(
    prediction: np.ndarray, target: np.ndarray, names: Iterable[str] = tuple(METRICS)
) -> dict[str, np.ndarray]:
    """The named metrics of every frame: {name: (N, F)}. Unknown names fail before anything is computed."""
    names = list(names)
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric '{unknown[0]}' (known: {', '.join(METRICS)})")
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {prediction.shape} and target {target.shape} differ in shape")
    return {name: METRICS[name](prediction, target) for name in names}


# --- Baselines --------------------------------------------------------------------------------------------


def baselines(past_frames: np.ndarray, future_tokens: np.ndarray, levels: int) -> dict[str, np.ndarray]:
    """The trivial answers, each (N, F, H, W) in [0, 1], scored like the model.

    quantization: the true future tokens decoded (the floor of any token model); copy_last: the last past
    frame (continuous) held still; blank: an empty frame.
    """
    count, frames = future_tokens.shape[:2]
    last = past_frames[:, -1:].astype(np.float32)  # (N, 1, H, W)
    return {
        "quantization": dequantize(future_tokens, levels),
        "copy_last": np.broadcast_to(last, (count, frames, *last.shape[2:])),
        "blank": np.zeros(future_tokens.shape, dtype=np.float32),
    }


def summarize(per_frame: Mapping[str, Mapping[str, np.ndarray]]) -> tuple[dict, list[dict]]:
    """Per-frame values {method: {metric: (N, F)}} -> (overall {method: {metric: mean}}, per-horizon rows).

    Rows are {"horizon": h, "<method>_<metric>": mean over sequences at horizon h}, h = 1..F.
    """
    overall = {
        method: {name: float(values.mean()) for name, values in metrics.items()}
        for method, metrics in per_frame.items()
    }
    frames = next(iter(next(iter(per_frame.values())).values())).shape[1]
    rows = []
    for horizon in range(frames):
        row: dict[str, float | int] = {"horizon": horizon + 1}
        for name in next(iter(per_frame.values())):
            for method, metrics in per_frame.items():
                row[f"{method}_{name}"] = float(metrics[name][:, horizon].mean())
        rows.append(row)
    return overall, rows


def versus(model: Mapping[str, float], baseline: Mapping[str, float]) -> dict[str, float | bool]:
    """How the model compares with a baseline: MSE ratio (< 1: better), SSIM gain (> 0: better), a flag."""
    ratio = model["mse"] / baseline["mse"] if baseline["mse"] > 0 else float("inf")
    return {
        "mse_ratio": ratio,
        "ssim_gain": model["ssim"] - baseline["ssim"],
        "beats": bool(ratio < 1 and model["ssim"] > baseline["ssim"]),
    }


# --- Action following --------------------------------------------------------------------------------------


def ego_displacements(
    frames: np.ndarray, threshold: float, min_area: int, digits: int, canvas: int
) -> tuple[np.ndarray, np.ndarray]:
    """Track the ego digit through frames (N, T, H, W) in [0, 1] and return its displacement per frame.

    Returns (displacement (N, T - 1, 2) in pixels of `frames`, (x, y) from frame t - 1 to t; tracked (N,):
    the tracker found a frame where the digits stand apart, so the ego digit is known). `canvas` is the raw
    resolution the 28x28 digits were drawn at, which fixes their box size at this one. The tracker's own
    "found" flag is not returned: at the token resolution a digit's shape changes with its sub-pixel
    phase, so its exact-fit test fails on most true frames too.
    """
    pixels = np.rint(np.clip(frames, 0.0, 1.0) * 255).astype(np.uint8)
    box = DIGIT_SIZE * frames.shape[-1] / canvas
    track = track_ego(pixels, threshold=threshold, min_area=min_area, digits=digits, box=box)
    return np.diff(track.centre, axis=1), track.reference >= 0


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
