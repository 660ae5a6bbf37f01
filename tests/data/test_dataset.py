"""Splits, the lazy per-sequence dataset, whole-split loads and the token store's spec."""

from pathlib import Path

import numpy as np
import pytest
import torch

from mnist_world.core.store import StoreError, create_store, write_sequences
from mnist_world.data.dataset import geometry_of, load_split, split_range
from mnist_world.data.tokens import token_attributes


def make_stores(root: Path, count: int = 10, frames: int = 3, action_count: int | None = None) -> tuple:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 16, (count, frames, 8, 8), dtype=np.uint8)
    actions = rng.normal(size=(action_count or count, frames, 2)).astype(np.float32)
    with create_store(root / "tokens.zarr", token_attributes(16, 8, frames, "generate")) as group:
        write_sequences(group, "tokens", tokens, sequences_per_shard=4)
    with create_store(root / "actions.zarr", {"method": "ground_truth"}) as group:
        write_sequences(group, "actions", actions, sequences_per_shard=4)
    return root / "tokens.zarr", root / "actions.zarr", tokens, actions


def test_splits_are_consecutive_and_checked() -> None:
    assert split_range("train", 6, 3, 10) == range(0, 6)
    assert split_range("val", 6, 3, 10) == range(6, 9)
    assert split_range("train", 6, 3, 6) == range(0, 6)  # train does not need the validation sequences
    with pytest.raises(ValueError, match="holds 8 sequences but the val split needs 9"):
        split_range("val", 6, 3, 8)
    # test: the sequences after validation; it needs the store to hold all three splits, they only theirs
    assert split_range("test", 6, 3, 10, test_sequences=1) == range(9, 10)
    assert split_range("val", 6, 3, 9, test_sequences=5) == range(6, 9)
    assert split_range("test", 6, 3, 10) == range(9, 9)  # no test split asked for
    with pytest.raises(
        ValueError, match=r"holds 10 sequences but the test split needs 11 .*test_sequences=2"
    ):
        split_range("test", 6, 3, 10, test_sequences=2)
    with pytest.raises(ValueError, match="unknown split 'holdout'"):
        split_range("holdout", 6, 3, 10)


def test_load_split_reads_a_whole_split(tmp_path: Path) -> None:
    tokens_path, actions_path, tokens, actions = make_stores(tmp_path)
    split_tokens, split_actions = load_split(tokens_path, actions_path, "val", 6, 3)
    assert split_tokens.dtype == torch.uint8 and split_actions.dtype == torch.float32
    np.testing.assert_array_equal(split_tokens.numpy(), tokens[6:9])
    np.testing.assert_array_equal(split_actions.numpy(), actions[6:9])
    limited, _ = load_split(tokens_path, actions_path, "train", 6, 3, limit=2)
    np.testing.assert_array_equal(limited.numpy(), tokens[:2])
    vocabulary = geometry_of(tokens_path)
    assert (vocabulary.levels, vocabulary.mask_id, vocabulary.vocab_size) == (16, 16, 17)
    assert (vocabulary.frame_size, vocabulary.frames) == (8, 3)


def test_too_small_and_mismatched_stores_fail_clearly(tmp_path: Path) -> None:
    tokens_path, actions_path, _, _ = make_stores(tmp_path)
    with pytest.raises(ValueError, match="holds 10 sequences but the val split needs 12"):
        load_split(tokens_path, actions_path, "val", 8, 4)
    other = tmp_path / "other"
    other.mkdir()
    _, short_actions, _, _ = make_stores(other, action_count=9)
    with pytest.raises(StoreError, match=r"actions of shape \(9, 3, 2\) do not match the tokens"):
        load_split(tokens_path, short_actions, "train", 6, 3)


def test_the_vocabulary_needs_the_store_attributes(tmp_path: Path) -> None:
    with create_store(tmp_path / "t.zarr", {"levels": 16, "mask_id": 16}) as group:
        write_sequences(group, "tokens", np.zeros((1, 1, 2, 2), np.uint8), 1)
    with pytest.raises(StoreError, match="missing attribute 'frame_size'"):
        geometry_of(tmp_path / "t.zarr")


def test_loads_reject_non_finite_actions_and_tokens_beyond_the_levels(tmp_path: Path) -> None:
    tokens_path, actions_path, tokens, actions = make_stores(tmp_path)
    actions[7, 1, 0] = np.nan
    with create_store(actions_path, {"method": "ground_truth"}) as group:
        write_sequences(group, "actions", actions, sequences_per_shard=4)
    load_split(tokens_path, actions_path, "train", 6, 3)  # sequence 7 is not in the train split
    with pytest.raises(
        StoreError, match=r"actions\.zarr: sequence 7 holds a non-finite action at frame 1 \("
    ):
        load_split(tokens_path, actions_path, "val", 6, 3)

    tokens[3, 2, 7, 7] = 16  # the mask id, never a stored token
    with create_store(tokens_path, token_attributes(16, 8, 3, "generate")) as group:
        write_sequences(group, "tokens", tokens, sequences_per_shard=4)
    with pytest.raises(
        StoreError, match=r"tokens\.zarr: sequence 3 holds token 16, but the store has 16 levels"
    ):
        load_split(tokens_path, actions_path, "train", 6, 3)


def test_a_store_whose_shape_contradicts_its_attributes_is_named(tmp_path: Path) -> None:
    tokens_path, actions_path, tokens, _ = make_stores(tmp_path)
    with create_store(tokens_path, token_attributes(16, 4, 3, "generate")) as group:  # says 4x4, holds 8x8
        write_sequences(group, "tokens", tokens, sequences_per_shard=4)
    with pytest.raises(
        StoreError, match=r"tokens of shape \(10, 3, 8, 8\), but its attributes say 3 frames of 4x4"
    ):
        load_split(tokens_path, actions_path, "train", 6, 3)
