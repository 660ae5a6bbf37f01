"""Sharded stores and atomic writes: a failure never leaves a half artifact or loses the old one."""

from pathlib import Path

import numpy as np
import pytest

from mnist_world.store import StoreError, atomic_path, create_store, open_array, write_json, write_sequences


def test_sequences_round_trip_in_shards(tmp_path: Path) -> None:
    data = np.random.default_rng(0).integers(0, 255, (10, 3, 40, 40), dtype=np.uint8)
    with create_store(tmp_path / "s.zarr", {"levels": 16}) as group:
        write_sequences(group, "frames", data, sequences_per_shard=4)
    array = open_array(tmp_path / "s.zarr", "frames", ndim=4, dtype=np.uint8)
    assert array.chunks == (1, 3, 40, 40) and array.shards == (4, 3, 40, 40)
    np.testing.assert_array_equal(array[:], data)
    # Three shards (4 + 4 + 2 sequences), not ten chunk files.
    assert len(list((tmp_path / "s.zarr/frames/c").iterdir())) == 3


def test_small_records_share_a_chunk_per_shard(tmp_path: Path) -> None:
    actions = np.random.default_rng(0).normal(size=(10, 20, 2)).astype(np.float32)
    with create_store(tmp_path / "a.zarr") as group:
        write_sequences(group, "actions", actions, sequences_per_shard=4)
    array = open_array(tmp_path / "a.zarr", "actions")
    assert array.chunks == array.shards == (4, 20, 2)
    np.testing.assert_array_equal(array[3], actions[3])


def test_a_failed_write_keeps_the_previous_store(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    with create_store(path) as group:
        write_sequences(group, "frames", np.ones((2, 2), np.uint8), 2)
    with pytest.raises(RuntimeError), create_store(path) as group:
        write_sequences(group, "frames", np.zeros((2, 2), np.uint8), 2)
        raise RuntimeError("interrupted")
    np.testing.assert_array_equal(open_array(path, "frames")[:], 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]


def test_a_failed_file_write_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "out.json") as temporary:
        temporary.write_text("{")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    write_json(tmp_path / "out.json", {"a": 1})
    assert (tmp_path / "out.json").read_text().startswith("{")


def test_missing_store_and_array_are_named(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="absent.zarr: store not found"):
        open_array(tmp_path / "absent.zarr", "frames")
    with create_store(tmp_path / "s.zarr") as group:
        write_sequences(group, "frames", np.ones((2, 2), np.uint8), 2)
    with pytest.raises(StoreError, match="no array 'tokens'"):
        open_array(tmp_path / "s.zarr", "tokens")
    with pytest.raises(StoreError, match="expected 4 dimensions"):
        open_array(tmp_path / "s.zarr", "frames", ndim=4)
