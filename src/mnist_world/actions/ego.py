"""Ego-centric actions: the ego digit's displacement per frame, normalised at the token resolution.

Generated data carries the true trajectories; the canonical file does not, so its actions come from the
tracker. On generated data the tracker runs as well and is scored against the truth.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
from skimage.transform import resize
from tqdm import tqdm

from mnist_world.actions.tracking import Track, track_ego
from mnist_world.config import DIGIT_SIZE, ActionsConfig
from mnist_world.core.store import (
    SequenceArray,
    StoreError,
    attribute,
    create_sequence_array,
    create_store,
    in_bulk,
    open_array,
    write_blocks,
)
from mnist_world.data.sources import EGO_RULE, ego_digit

NORMALISATION = (
    "action[t] = (centre[t] - centre[t-1]) / (frame_size / 2), the ego digit's centre (x, y) in pixels at "
    "the token resolution; action[0] = action[1]"
)
MAX_TRACKING_SIZE = 64  # the tracker packs a frame row into one 64-bit word


def ego_centres(centers: np.ndarray, ink: np.ndarray) -> np.ndarray:
    """The ego digit's centre per frame: centers (N, T, D, 2) and ink (N, D) -> (N, T, 2)."""
    ego = ego_digit(ink)  # (N,)
    return centers[np.arange(len(ego)), :, ego]


def actions_from_centres(centres: np.ndarray, frame_size: int) -> np.ndarray:
    """float32 (N, T, 2) actions from centres (N, T, 2) in token pixels: steps over (W / 2, H / 2)."""
    steps = np.diff(centres.astype(np.float64), axis=1) / (frame_size / 2)  # (N, T-1, 2)
    # Frame 0 has no predecessor: it repeats frame 1's action, as in the recipe.
    return np.concatenate([steps[:, :1], steps], axis=1).astype(np.float32)


def track_block(frames: np.ndarray, config: ActionsConfig, digits: int) -> Track:
    """Track the ego digit through raw uint8 frames (B, T, S, S); the track's centres are in canvas pixels."""
    canvas = frames.shape[-1]
    size = config.tracking_size
    if size != canvas:
        frames = _resize(frames, size)
    track = track_ego(frames, config.threshold, config.min_area, digits, box=DIGIT_SIZE * size / canvas)
    return dataclasses.replace(track, centre=track.centre * (canvas / size))


def _resize(frames: np.ndarray, size: int) -> np.ndarray:
    """uint8 frames (..., S, S) -> uint8 (..., size, size): block means for a whole factor, else smoothed."""
    source = frames.shape[-1]
    lead = frames.shape[:-2]
    if size < source and source % size == 0:
        factor = source // size
        blocks = frames.reshape(*lead, size, factor, size, factor)
        return np.rint(blocks.mean(axis=(-3, -1))).astype(np.uint8)
    flat = frames.reshape(-1, source, source)
    out = [resize(f, (size, size), anti_aliasing=size < source, preserve_range=True) for f in flat]
    return np.rint(np.stack(out)).astype(np.uint8).reshape(*lead, size, size)


def step_errors(tracked: np.ndarray, true: np.ndarray) -> np.ndarray:
    """(N, T-1): distance between the tracked and the true step of every frame after the first."""
    return np.linalg.norm(np.diff(tracked, axis=1) - np.diff(true, axis=1), axis=-1)


@in_bulk
def build_actions_store(
    raw_path: str | Path,
    output: str | Path,
    config: ActionsConfig,
    frame_size: int,
    sequences_per_shard: int,
    progress: bool = True,
) -> dict[str, Any]:
    """Write `output`'s float32 `actions` (N, T, 2) from the raw store; return the tracking report.

    From the true trajectories when the raw store has them (then the tracker is scored against them),
    else from the tracker. The report: `method`; the tracker's step error against the truth per frame
    after the first, in pixels at the token resolution `frame_size` (`tracking_error_mean_px`,
    `tracking_error_p95_px`, `within_half_px`: share within 0.5 px; None without ground truth);
    `ego_mismatch_sequences` (the tracker followed another digit); `lost_frames` (the ego's mask fit nowhere
    or in two places, or its digits never stood apart: the position there is a guess) and
    `never_apart_sequences`.
    """
    if config.tracking_size > MAX_TRACKING_SIZE:
        raise ValueError(
            f"actions.tracking_size: {config.tracking_size} is larger than {MAX_TRACKING_SIZE}, the widest "
            "frame the tracker handles"
        )
    frames, truth = _open_raw(raw_path)
    count, length, _, width = frames.shape
    digits = int(attribute(raw_path, "digits"))
    to_tokens = frame_size / width  # canvas pixels -> token pixels
    attributes = _store_attributes(raw_path, config, frame_size, frames.shape, truth is not None, digits)
    errors, mismatched = [], 0
    lost = never_apart = 0
    with create_store(output, attributes) as group:
        actions = create_sequence_array(group, "actions", (count, length, 2), np.float32, sequences_per_shard)
        step = actions.shards[0]
        for first in tqdm(range(0, count, step), desc="actions", unit="block", disable=not progress):
            last = min(first + step, count)
            track = track_block(frames[first:last], config, digits)
            tracked = track.centre * to_tokens  # (B, T, 2) token pixels
            lost += int(track.lost.sum())
            never_apart += int((track.reference < 0).sum())
            centres = tracked
            if truth:
                block_centers = truth[0][first:last] * to_tokens  # (B, T, D, 2)
                block_ink = truth[1][first:last]
                centres = ego_centres(block_centers, block_ink)
                errors.append(step_errors(tracked, centres))
                mismatched += _count_mismatched(tracked, block_centers, block_ink)
            write_blocks(actions, [(first, actions_from_centres(centres, frame_size))])
    report = _report(attributes["method"], frame_size, count, length, lost, never_apart)
    if truth:
        report |= _tracker_scores(np.concatenate(errors).ravel(), mismatched)
    return report


def _store_attributes(
    raw_path: str | Path,
    config: ActionsConfig,
    frame_size: int,
    shape: tuple[int, ...],
    ground_truth: bool,
    digits: int,
) -> dict[str, Any]:
    """What the action store records of itself: how the actions were made, their scale, and the tracker's
    settings (which evaluation and the playground track with)."""
    return {
        "method": "ground_truth" if ground_truth else "tracking",
        "frame_size": frame_size,
        "frames": shape[1],
        "canvas": shape[-1],
        "normalisation": NORMALISATION,
        "ego": EGO_RULE,
        "source": attribute(raw_path, "source"),
        "tracking": {
            "threshold": config.threshold,
            "min_area": config.min_area,
            "size": config.tracking_size,
            "digits": digits,
        },
    }


def _open_raw(raw_path: str | Path) -> tuple[SequenceArray, tuple[SequenceArray, SequenceArray] | None]:
    """The raw store's square frames, and its ground truth (centers, ink) if it has one, checked to match."""
    frames = open_array(raw_path, "frames", ndim=4, dtype=np.uint8)
    count, length, height, width = frames.shape
    if height != width:
        raise StoreError(f"{raw_path}/frames: expected square frames, got {height}x{width}")
    if not attribute(raw_path, "has_ground_truth"):
        return frames, None
    centers = open_array(raw_path, "centers", ndim=4, dtype=np.float32)
    ink = open_array(raw_path, "ink", ndim=2, dtype=np.float32)
    if centers.shape[:2] != (count, length) or ink.shape[0] != count:
        raise StoreError(
            f"{raw_path}: ground truth of shape centers {centers.shape}, ink {ink.shape} does not match "
            f"frames {frames.shape}"
        )
    return frames, (centers, ink)


def _report(method: str, frame_size: int, count: int, length: int, lost: int, never_apart: int) -> dict:
    """The tracking report without ground truth: the tracker's scores stay None."""
    return {
        "method": method,
        "frame_size": frame_size,
        "sequences": count,
        "tracking_error_mean_px": None,
        "tracking_error_p95_px": None,
        "within_half_px": None,
        "ego_mismatch_sequences": None,
        "lost_frames": lost,
        "lost_frame_share": lost / (count * length),
        "never_apart_sequences": never_apart,
    }


def _tracker_scores(error: np.ndarray, mismatched: int) -> dict[str, Any]:
    """The tracker's step errors (pixels at the token resolution) against the ground truth, summarised."""
    return {
        "tracking_error_mean_px": float(error.mean()),
        "tracking_error_p95_px": float(np.quantile(error, 0.95)),
        "within_half_px": float((error <= 0.5).mean()),
        "ego_mismatch_sequences": mismatched,
    }


def _count_mismatched(tracked: np.ndarray, centers: np.ndarray, ink: np.ndarray) -> int:
    """Sequences whose tracked path follows another digit's steps more closely than the ego's."""
    errors = np.stack(
        [step_errors(tracked, centers[:, :, d]).mean(axis=1) for d in range(centers.shape[2])], axis=1
    )  # (B, D)
    ego = errors[np.arange(len(errors)), ego_digit(ink)]
    return int((errors.min(axis=1) < ego - 1e-9).sum())
