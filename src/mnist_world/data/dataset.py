"""Token and action sequences for training and evaluation: the split ranges, and whole-split loads (a
split of 10,000 sequences at 16x16 is 50 MB of uint8: it stays in memory, on the GPU where there is one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch

from mnist_world.core.store import SequenceArray, StoreError, open_array, repair_advice
from mnist_world.data.tokens import Vocabulary

Split = Literal["train", "val", "test"]
SPLITS = ("train", "val", "test")


def geometry_of(tokens_path: str | Path) -> Vocabulary:
    """The token store's vocabulary for its levels and shapes alone: loading needs no decoding, so bin
    centres stand in for the measured bin means (which stores made outside the pipeline may lack)."""
    return Vocabulary.from_store(tokens_path, "centre")


def split_range(
    split: str, train_sequences: int, val_sequences: int, total: int, test_sequences: int = 0
) -> range:
    """Sequence indices of a split: train = the first `train_sequences`, val = the `val_sequences` next,
    test = the `test_sequences` after those. Each split needs the store to hold it and the ones before it
    only, so the test split can grow without moving the others."""
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}' (known: {', '.join(SPLITS)})")
    sizes = {"train": train_sequences, "val": val_sequences, "test": test_sequences}
    ends = np.cumsum(list(sizes.values())).tolist()
    stop = ends[SPLITS.index(split)]
    start = stop - sizes[split]
    if total < stop:
        raise ValueError(
            f"the store holds {total} sequences but the {split} split needs {stop} "
            f"(data.train_sequences={train_sequences}, data.val_sequences={val_sequences}"
            + (f", data.test_sequences={test_sequences})" if split == "test" else ")")
        )
    return range(start, stop)


def open_pair(tokens_path: str | Path, actions_path: str | Path) -> tuple[SequenceArray, SequenceArray]:
    """The token array (N, T, H, W) uint8 and the action array (N, T, 2) float32, checked to match each
    other and the token store's attributes."""
    tokens = open_array(tokens_path, "tokens", ndim=4, dtype=np.uint8)
    actions = open_array(actions_path, "actions", ndim=3, dtype=np.float32)
    geometry = geometry_of(tokens_path)
    if tokens.shape[1:] != (geometry.frames, geometry.frame_size, geometry.frame_size):
        raise StoreError(
            f"{tokens_path}: tokens of shape {tokens.shape}, but its attributes say {geometry.frames} frames "
            f"of {geometry.frame_size}x{geometry.frame_size}{repair_advice(tokens_path)}"
        )
    if actions.shape[2] != 2 or actions.shape[:2] != tokens.shape[:2]:
        raise StoreError(
            f"{actions_path}: actions of shape {actions.shape} do not match the tokens of {tokens_path}, "
            f"shape {tokens.shape} (expected ({tokens.shape[0]}, {tokens.shape[1]}, 2))"
        )
    return tokens, actions


def check_values(
    tokens: np.ndarray, actions: np.ndarray, levels: int, first: int, tokens_path: Path, actions_path: Path
) -> None:
    """Raise StoreError naming the store and the first bad sequence when a token id is not below `levels` or
    an action is not finite. `tokens` (N, T, H, W) and `actions` (N, T, 2) hold sequences first, first+1...

    One vectorised pass over each array: far cheaper than the training it protects.
    """
    bad_tokens = np.flatnonzero(tokens.reshape(len(tokens), -1).max(axis=1, initial=0) >= levels)
    if bad_tokens.size:
        row = int(bad_tokens[0])
        raise StoreError(
            f"{tokens_path}: sequence {first + row} holds token {int(tokens[row].max())}, but the store has "
            f"{levels} levels (ids 0-{levels - 1}){repair_advice(tokens_path)}"
        )
    finite = np.isfinite(actions).reshape(len(actions), -1).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        frame = int(np.flatnonzero(~np.isfinite(actions[row]).all(axis=-1))[0])
        raise StoreError(
            f"{actions_path}: sequence {first + row} holds a non-finite action at frame {frame} "
            f"({actions[row, frame].tolist()}){repair_advice(actions_path)}"
        )


def _rows(total: int, split: str, train_sequences: int, val_sequences: int, limit: int) -> range:
    """The split's indices, cut to the first `limit` (0: all of them; more than the split: all of them)."""
    if limit < 0:
        raise ValueError(f"limit must not be negative, got {limit}")
    rows = split_range(split, train_sequences, val_sequences, total)
    return rows[:limit] if limit else rows


def load_split(
    tokens_path: str | Path,
    actions_path: str | Path,
    split: Split,
    train_sequences: int,
    val_sequences: int,
    limit: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split in one read: tokens uint8 (N, T, H, W) and actions float32 (N, T, 2), on the CPU.

    Kept as uint8 (a quarter of int64) so the split fits on a GPU; cast batches with `.long()` there. Token
    ids at or above the store's levels and non-finite actions fail here, naming the store and sequence.
    """
    tokens, actions = open_pair(tokens_path, actions_path)
    rows = _rows(tokens.shape[0], split, train_sequences, val_sequences, limit)
    window = slice(rows.start, rows.stop)
    split_tokens, split_actions = np.ascontiguousarray(tokens[window]), np.ascontiguousarray(actions[window])
    levels = geometry_of(tokens_path).levels
    check_values(split_tokens, split_actions, levels, rows.start, Path(tokens_path), Path(actions_path))
    return torch.from_numpy(split_tokens), torch.from_numpy(split_actions)
