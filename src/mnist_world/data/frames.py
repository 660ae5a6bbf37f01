"""Raw frames to the token resolution: area or bilinear downsampling, and `frames.zarr` (continuous frames in
[0, 1], what the tokens are made from and what metrics compare predictions against).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mnist_world.config import TokensConfig
from mnist_world.core.store import (
    StoreError,
    attribute,
    create_sequence_array,
    create_store,
    in_bulk,
    open_array,
    write_blocks,
)

DOWNSAMPLE_METHODS = ("area", "bilinear")


def area_weights(source: int, size: int) -> np.ndarray:
    """(size, source) float64: row i holds the share of output pixel i covered by each input pixel.

    Output pixel i spans [i, i + 1) * source / size in input coordinates; its value is the mean of the
    input over that span, so the weights are the overlap lengths divided by the span. Rows sum to 1.
    """
    edges = np.arange(size + 1) * (source / size)  # output pixel edges in input coordinates
    left = np.arange(source)[None, :]  # input pixel j spans [j, j + 1)
    overlap = np.minimum(edges[1:, None], left + 1) - np.maximum(edges[:-1, None], left)
    return np.clip(overlap, 0.0, None) / (source / size)


def bilinear_weights(source: int, size: int) -> np.ndarray:
    """(size, source) float64: linear interpolation at pixel centres, as skimage `resize(order=1)`.

    Output pixel i samples input coordinate (i + 0.5) * source / size - 0.5 (centres aligned, scikit-image's
    `grid_mode`); coordinates beyond the first or last centre take the edge pixel (`mode="edge"`).
    """
    coordinate = np.clip((np.arange(size) + 0.5) * (source / size) - 0.5, 0, source - 1)
    low = np.floor(coordinate).astype(np.int64)
    high = np.minimum(low + 1, source - 1)
    fraction = coordinate - low
    weights = np.zeros((size, source))
    np.add.at(weights, (np.arange(size), low), 1 - fraction)
    np.add.at(weights, (np.arange(size), high), fraction)
    return weights


def downsample(frames: np.ndarray, size: int, method: str = "area") -> np.ndarray:
    """uint8 frames (..., S0, S0) in 0..255 -> float32 (..., size, size) in [0, 1].

    `area`: the exact mean of the input over each output pixel's footprint (for an integer factor a
    reshape-mean; otherwise fractional overlaps weight the input pixels at the footprint's edges).
    `bilinear`: linear interpolation at pixel centres, equal to skimage `resize(order=1, mode="edge",
    anti_aliasing=False)`: a plain bilinear resize like the original's, aliasing included.
    Both are separable, so a non-integer factor is two small matrix products over all frames at once.
    """
    if method not in DOWNSAMPLE_METHODS:
        raise ValueError(f"unknown downsample method '{method}' (known: {', '.join(DOWNSAMPLE_METHODS)})")
    source = frames.shape[-1]
    if frames.shape[-2] != source:
        raise ValueError(f"expected square frames, got shape {frames.shape}")
    lead = frames.shape[:-2]
    if method == "area" and source % size == 0:
        factor = source // size
        # Exact integer block sums, rows then columns, from strided views: ten times faster than a
        # reshape-mean, which numpy reduces through float buffers.
        accumulator = np.uint16 if factor * factor * 255 < 2**16 else np.uint32
        rows = frames[..., 0::factor, :].astype(accumulator)  # (..., size, S0)
        for offset in range(1, factor):
            rows += frames[..., offset::factor, :]
        total = rows[..., 0::factor].copy()  # (..., size, size)
        for offset in range(1, factor):
            total += rows[..., offset::factor]
        out = total.astype(np.float32)
        out *= np.float32(1.0 / (255 * factor * factor))
        return out
    weights = (area_weights if method == "area" else bilinear_weights)(source, size)
    weights = weights.astype(np.float32)
    flat = frames.reshape(-1, source, source).astype(np.float32) * np.float32(1 / 255)  # (F, S0, S0)
    out = weights @ flat @ weights.T  # rows then columns: (size, S0) @ (F, S0, S0) @ (S0, size)
    return np.clip(out, 0.0, 1.0).reshape(*lead, size, size)


# --- The store ---------------------------------------------------------------------------------------------


def _blocks(count: int, size: int, desc: str, progress: bool) -> Any:
    return tqdm(range(0, count, size), desc=desc, unit="block", disable=not progress)


@in_bulk
def build_frames_store(
    raw_path: str | Path,
    output: str | Path,
    config: TokensConfig,
    sequences_per_shard: int,
    progress: bool = True,
) -> dict[str, Any]:
    """Downsample the raw store's uint8 `frames` (N, T, S0, S0) to `output`'s float32 `frames` (N, T, S, S).

    Works a shard of sequences at a time, so memory stays bounded whatever N. Returns the attributes written.
    """
    raw = open_array(raw_path, "frames", ndim=4, dtype=np.uint8)
    count, length, height, width = raw.shape
    if height != width:
        raise StoreError(f"{raw_path}/frames: expected square frames, got {height}x{width}")
    attributes = {
        "frame_size": config.frame_size,
        "method": config.downsample,
        "canvas": height,
        "frames": length,
        "source": attribute(raw_path, "source"),
        "range": [0.0, 1.0],
    }
    with create_store(output, attributes) as group:
        shape = (count, length, config.frame_size, config.frame_size)
        frames = create_sequence_array(group, "frames", shape, np.float32, sequences_per_shard)
        step = frames.shards[0]  # whole shards per write: no read-modify-write
        for first in _blocks(count, step, "downsample", progress):
            block = downsample(raw[first : first + step], config.frame_size, config.downsample)
            write_blocks(frames, [(first, block)])
    return attributes
