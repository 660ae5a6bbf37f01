"""Sharded stores and atomic writes: a failure never leaves a half artifact or loses the old one."""

import errno
import os
from pathlib import Path

import numpy as np
import pytest

from mnist_world.core.atomic import (
    WriteError,
    atomic_path,
    check_writable,
    clean_stale_temporaries,
    write_json,
)
from mnist_world.core.store import StoreError, create_store, integer_attribute, open_array, write_sequences


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


def test_temporaries_of_dead_writers_are_cleaned_and_a_moved_aside_store_is_put_back(tmp_path: Path) -> None:
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)  # a process that has exited
    path = tmp_path / "s.zarr"
    with create_store(path) as group:
        write_sequences(group, "frames", np.ones((2, 2), np.uint8), 2)
    stale = tmp_path / f".s.zarr.partial-{dead_pid}"
    stale.mkdir()
    live = tmp_path / f".s.zarr.partial-{os.getpid()}"  # a writer that still runs: never touched
    live.mkdir()
    assert clean_stale_temporaries(path) == [stale] and live.exists() and not stale.exists()
    live.rmdir()

    # A writer killed between its two renames: the old store stands aside, the new one is unfinished.
    path.rename(tmp_path / f".s.zarr.previous-{dead_pid}")
    (tmp_path / f".s.zarr.partial-{dead_pid}").mkdir()
    with create_store(tmp_path / "other.zarr") as group:  # any write beside it cleans what the dead left
        write_sequences(group, "frames", np.zeros((2, 2), np.uint8), 2)
    assert clean_stale_temporaries(path)
    np.testing.assert_array_equal(open_array(path, "frames")[:], 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.zarr", "s.zarr"]


def test_a_write_error_names_the_destination_and_keeps_the_old_file(tmp_path: Path) -> None:
    write_json(tmp_path / "out.json", {"a": 1})
    with pytest.raises(WriteError) as caught, atomic_path(tmp_path / "out.json") as temporary:
        temporary.write_text("{")
        raise OSError(errno.ENOSPC, "No space left on device")
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'out.json'}: cannot write it: the disk is full (")
    assert message.endswith("free some space and run again (the previous out.json is untouched)")
    assert (tmp_path / "out.json").read_text().startswith('{\n  "a": 1')
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    with pytest.raises(OSError, match="an input"), atomic_path(tmp_path / "out.json"):
        raise OSError(errno.EACCES, "an input", "/elsewhere/input.npy")  # not ours to rename: kept as is


def test_check_writable_creates_nothing(tmp_path: Path) -> None:
    check_writable(tmp_path / "a" / "b" / "c.json", tmp_path / "d.zarr")
    assert list(tmp_path.iterdir()) == []


def test_damaged_and_missing_shards_are_named(tmp_path: Path) -> None:
    data = np.random.default_rng(0).integers(0, 16, (10, 3, 8, 8), dtype=np.uint8)
    data[4:8] = 0  # an all-zero shard is written like any other, so a missing file always means damage
    with create_store(tmp_path / "t.zarr") as group:
        write_sequences(group, "tokens", data, sequences_per_shard=4)
    shard = tmp_path / "t.zarr/tokens/c/1/0/0/0"
    assert shard.is_file()
    content = bytearray(shard.read_bytes())
    content[30] ^= 0x01
    shard.write_bytes(bytes(content))
    tokens = open_array(tmp_path / "t.zarr", "tokens")
    np.testing.assert_array_equal(tokens[0:4], data[0:4])  # the other shards still read
    with pytest.raises(StoreError, match=r"t\.zarr: shard tokens/c/1/0/0/0 \(sequences 4-7\) is damaged \("):
        tokens[5]
    with pytest.raises(StoreError, match=r"shard tokens/c/1/0/0/0 \(sequences 4-7\) is damaged"):
        np.asarray(tokens)
    shard.unlink()
    with pytest.raises(
        StoreError, match=r"shard tokens/c/1/0/0/0 \(sequences 4-7\) is missing; restore it with"
    ):
        open_array(tmp_path / "t.zarr", "tokens")


def test_integer_attributes_are_checked(tmp_path: Path) -> None:
    with create_store(tmp_path / "t.zarr", {"levels": 16, "frame_size": "8", "mask": 16.0}):
        pass
    assert integer_attribute(tmp_path / "t.zarr", "levels") == 16
    assert integer_attribute(tmp_path / "t.zarr", "mask") == 16
    with pytest.raises(StoreError, match="attribute 'frame_size' should be an integer, got '8'"):
        integer_attribute(tmp_path / "t.zarr", "frame_size")
