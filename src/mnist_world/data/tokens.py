"""Frames to model tokens: uniform quantization, the vocabulary that says what tokens mean (levels, mask id,
the pixel value each level decodes to), and `tokens.zarr` (uint8 token ids whose attributes carry that
vocabulary) with its quantization floor.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mnist_world.core.metrics import psnr_from_mse
from mnist_world.core.store import (
    StoreError,
    attribute,
    create_sequence_array,
    create_store,
    in_bulk,
    integer_attribute,
    open_array,
    write_blocks,
)

DECODE_RULES = ("mean", "centre")


# --- Quantization ------------------------------------------------------------------------------------------


def quantize(frames: np.ndarray, levels: int) -> np.ndarray:
    """Frames in [0, 1] -> uint8 tokens with uniform bins: token = min(floor(x * levels), levels - 1).

    Bin k holds [k / levels, (k + 1) / levels); 1.0 joins the top bin. (The original's floor(x / 255 * 15)
    gave every bin 1/15 except the top one, which held only the value 255.)
    """
    scaled = np.asarray(frames, dtype=np.float32) * np.float32(levels)
    np.clip(scaled, 0, levels - 1, out=scaled)
    return scaled.astype(np.uint8)  # truncation is the floor of a non-negative value


def bin_centres(levels: int) -> np.ndarray:
    """(levels,) float64: the centre (k + 0.5) / levels of each uniform bin, the recipe's decoding."""
    return (np.arange(levels) + 0.5) / levels


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """What the tokens of a store mean: their levels, the mask id, their geometry and the pixel value each
    level decodes to. Read from the token store's attributes and passed to whatever turns tokens into pixels.
    """

    levels: int  # token ids 0..levels-1
    frame_size: int  # tokens per side of a frame
    frames: int  # frames per sequence
    intensities: tuple[float, ...]  # (levels,) the pixel value in [0, 1] each level decodes to
    decode_rule: str = "mean"

    @property
    def mask_id(self) -> int:
        return self.levels  # the id of a hidden token, one past the levels

    @property
    def vocab_size(self) -> int:
        return self.levels + 1

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """uint8/int tokens (...) -> float32 pixels (...) in [0, 1]."""
        return np.asarray(self.intensities, dtype=np.float32)[np.asarray(tokens, dtype=np.intp)]

    @classmethod
    def uniform(cls, levels: int, frame_size: int, frames: int) -> Vocabulary:
        """Bin centres: the decoding that needs no measurement (for stores made outside the pipeline)."""
        return cls(levels, frame_size, frames, tuple(bin_centres(levels).tolist()), "centre")

    @classmethod
    def from_store(cls, path: str | Path, decode: str = "mean") -> Vocabulary:
        """The vocabulary of the token store at `path`, decoding by `decode` (`mean` or `centre`)."""
        if decode not in DECODE_RULES:
            raise ValueError(f"tokens.decode: unknown rule '{decode}' (known: {', '.join(DECODE_RULES)})")
        levels, frame_size, frames, mask_id, vocab_size = (
            integer_attribute(path, name)
            for name in ("levels", "frame_size", "frames", "mask_id", "vocab_size")
        )
        if mask_id != levels or vocab_size != levels + 1:
            raise StoreError(
                f"{path}: inconsistent token attributes; expected mask_id = levels = vocab_size - 1"
            )
        if decode == "centre":
            return cls.uniform(levels, frame_size, frames)
        try:
            means = attribute(path, "bin_means")
        except StoreError:
            raise StoreError(
                f"{path}: no 'bin_means' attribute (a store written before decoding from the data): "
                f"re-run `dvc repro quantize`, or set tokens.decode=centre"
            ) from None
        if len(means) != levels:
            raise StoreError(f"{path}: 'bin_means' holds {len(means)} values for {levels} levels")
        return cls(levels, frame_size, frames, tuple(float(m) for m in means), "mean")


# --- Stores ------------------------------------------------------------------------------------------------


def _blocks(count: int, size: int, desc: str, progress: bool) -> Any:
    return tqdm(range(0, count, size), desc=desc, unit="block", disable=not progress)


def token_attributes(levels: int, frame_size: int, frames: int, source: str) -> dict[str, Any]:
    """What a reader needs to use a token store: vocabulary, mask id, geometry and the source."""
    return {
        "levels": levels,
        "mask_id": levels,
        "vocab_size": levels + 1,
        "frame_size": frame_size,
        "frames": frames,
        "source": source,
    }


class LevelStatistics:
    """Per token level: count, sum and sum of squares of the intensities it stands for.

    Enough to give the squared error of any decoding (value v_k per level) without a second pass:
    sum over bin k of (x - v_k)^2 = S2_k - 2 v_k S1_k + n_k v_k^2.
    """

    def __init__(self, levels: int) -> None:
        self.count, self.total, self.squares = (np.zeros(levels) for _ in range(3))

    def add(self, frames: np.ndarray, tokens: np.ndarray) -> None:
        flat_tokens, flat_frames = tokens.reshape(-1), frames.reshape(-1).astype(np.float64)
        levels = len(self.count)
        self.count += np.bincount(flat_tokens, minlength=levels)
        self.total += np.bincount(flat_tokens, weights=flat_frames, minlength=levels)
        self.squares += np.bincount(flat_tokens, weights=flat_frames * flat_frames, minlength=levels)

    def means(self, fallback: np.ndarray) -> np.ndarray:
        """Each level's mean intensity; `fallback` for a level no pixel fell into."""
        return np.where(self.count > 0, self.total / np.maximum(self.count, 1), fallback)

    def mse(self, values: np.ndarray) -> float:
        """Mean squared error over every counted pixel when level k decodes to values[k]."""
        error = self.squares - 2 * values * self.total + self.count * values * values
        return float(max(error.sum(), 0.0) / max(self.count.sum(), 1))


@in_bulk
def build_token_store(
    frames_path: str | Path,
    output: str | Path,
    levels: int,
    sequences_per_shard: int,
    train_sequences: int,
    progress: bool = True,
) -> dict[str, Any]:
    """Quantize the frames store into `output`'s uint8 `tokens` (N, T, S, S); return the quantization floor.

    The store's `bin_means` attribute is each level's mean intensity over the first `train_sequences`
    sequences (the training split), what `Vocabulary.from_store(decode="mean")` decodes to. The floor is the
    error of the decoded tokens against the continuous frames over every frame, under both decodings: the
    best any token-level model can score in pixel space.
    """
    frames = open_array(frames_path, "frames", ndim=4, dtype=np.float32)
    count, length, height, width = frames.shape
    if not 0 < train_sequences <= count:
        raise StoreError(
            f"{frames_path}: {count} sequences, but data.train_sequences={train_sequences} "
            f"must be in [1, {count}]"
        )
    attributes = token_attributes(levels, height, length, attribute(frames_path, "source"))
    everything, training = LevelStatistics(levels), LevelStatistics(levels)
    with create_store(output, attributes) as group:
        tokens = create_sequence_array(group, "tokens", frames.shape, np.uint8, sequences_per_shard)
        step = tokens.shards[0]
        for first in _blocks(count, step, "quantize", progress):
            block = frames[first : first + step]
            block_tokens = quantize(block, levels)
            write_blocks(tokens, [(first, block_tokens)])
            everything.add(block, block_tokens)
            inside = max(0, min(len(block), train_sequences - first))  # rows of this block in the split
            training.add(block[:inside], block_tokens[:inside])
        centres = bin_centres(levels)
        means = training.means(fallback=centres)
        group.attrs["bin_means"] = means.tolist()
    floors = {
        rule: {
            "mse": (mse := everything.mse(values)),
            "psnr": float(psnr_from_mse(mse)),
            # OpenSTL-style: squared error summed over a frame's pixels, averaged over frames.
            "mse_per_frame_sum": mse * height * width,
        }
        for rule, values in (("mean", means), ("centre", centres))
    }
    return {
        "quantization": floors,
        "bin_means": means.tolist(),
        "levels": levels,
        "frame_size": height,
        "sequences": count,
        "train_sequences": train_sequences,
    }
