"""Sharded zarr 3 stores of per-sequence arrays, and atomic writes of every artifact.

A store holds arrays whose first axis is the sequence: one chunk per sequence (cheap random reads) and one
shard per block of sequences (a handful of files for DVC to hash). Every artifact is built at a temporary
path beside its destination and renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.codecs


class StoreError(ValueError):
    """A store that is missing, lacks an array or an attribute, or holds one of an unexpected shape."""


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write into; move it onto `path` only if the block succeeds.

    On an exception (or Ctrl-C) the temporary is removed and whatever stood at `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.partial-{os.getpid()}")
    _remove(temporary)
    try:
        yield temporary
    except BaseException:
        _remove(temporary)
        raise
    if path.is_dir() and not path.is_symlink():
        # os.replace cannot replace a non-empty directory: move the old one aside first.
        previous = path.with_name(f".{path.name}.previous-{os.getpid()}")
        _remove(previous)
        path.rename(previous)
        temporary.rename(path)
        shutil.rmtree(previous)
    else:
        os.replace(temporary, path)


def write_json(path: str | Path, payload: Any) -> None:
    """Write `payload` as indented JSON, atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def create_store(path: str | Path, attributes: dict[str, Any] | None = None) -> Iterator[zarr.Group]:
    """Yield a new, empty zarr group that becomes `path` when the block completes without error."""
    with atomic_path(path) as temporary:
        group = zarr.open_group(temporary, mode="w", zarr_format=3)
        if attributes:
            group.attrs.update(attributes)
        yield group


# Records smaller than this share one chunk per shard: zarr spends about a millisecond per chunk, which for
# 10,000 tiny records (actions, centres) would cost seconds to save bytes nobody reads one at a time.
SMALL_RECORD_BYTES = 4096


def bulk_io(sequences_per_shard: int) -> contextlib.AbstractContextManager:
    """zarr settings for reading and writing whole shards: about twice as fast as the defaults.

    Chunks go through the codecs a shard at a time rather than one by one, and every chunk is written
    without first being compared with the fill value (a full-size comparison per chunk).
    """
    return zarr.config.set(
        {"array.write_empty_chunks": True, "codec_pipeline.batch_size": max(1, sequences_per_shard)}
    )


def create_sequence_array(
    group: zarr.Group, name: str, shape: tuple[int, ...], dtype: Any, sequences_per_shard: int
) -> zarr.Array:
    """An array of per-sequence records: one chunk per sequence, one shard per block of sequences.

    Records under SMALL_RECORD_BYTES (actions, ground-truth centres) use one chunk per shard instead.
    """
    shard = (max(1, min(sequences_per_shard, shape[0])), *shape[1:])
    record_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
    chunk = shard if record_bytes < SMALL_RECORD_BYTES else (1, *shape[1:])
    # Frames and tokens are mostly zeros: plain zstd at level 1 packs them ~50x and is the fastest of the
    # codecs measured (blosc with bit- or byte-shuffle was slower and larger on these images).
    return group.create_array(
        name,
        shape=shape,
        dtype=dtype,
        chunks=chunk,
        shards=shard,
        compressors=zarr.codecs.ZstdCodec(level=1),
        fill_value=0,
    )


def write_sequences(group: zarr.Group, name: str, data: np.ndarray, sequences_per_shard: int) -> zarr.Array:
    """Create a per-sequence array and fill it from `data`, one shard at a time."""
    array = create_sequence_array(group, name, data.shape, data.dtype, sequences_per_shard)
    write_blocks(
        array,
        ((start, data[start : start + array.shards[0]]) for start in range(0, len(data), array.shards[0])),
    )
    return array


def write_blocks(array: zarr.Array, blocks: Iterable[tuple[int, np.ndarray]]) -> None:
    """Write (start, block) pairs of sequences into `array`; blocks should be whole shards for speed."""
    with bulk_io(array.shards[0]):
        for start, block in blocks:
            array[start : start + len(block)] = block


def open_store(path: str | Path) -> zarr.Group:
    """Open an existing store read-only, with a one-line error naming the path when it is not one."""
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path}: store not found (run the stage that produces it first)")
    try:
        return zarr.open_group(path, mode="r", zarr_format=3)
    except Exception as error:  # zarr raises several types for a damaged or foreign store
        raise StoreError(f"{path}: not a readable zarr 3 store ({error})") from None


def open_array(path: str | Path, name: str, ndim: int | None = None, dtype: Any | None = None) -> zarr.Array:
    """Open array `name` of the store at `path`, checking its rank and dtype when asked to."""
    group = open_store(path)
    if name not in group:
        raise StoreError(
            f"{path}: no array '{name}' in the store (has: {', '.join(sorted(group)) or 'nothing'})"
        )
    array = group[name]
    if not isinstance(array, zarr.Array):
        raise StoreError(f"{path}/{name}: expected an array, found a group")
    if ndim is not None and array.ndim != ndim:
        raise StoreError(f"{path}/{name}: expected {ndim} dimensions, got shape {array.shape}")
    if dtype is not None and array.dtype != np.dtype(dtype):
        raise StoreError(f"{path}/{name}: expected dtype {np.dtype(dtype)}, got {array.dtype}")
    return array


def attribute(path: str | Path, key: str) -> Any:
    """Read one attribute of the store's root group, with an error naming it when it is absent."""
    attributes = open_store(path).attrs
    if key not in attributes:
        raise StoreError(f"{path}: missing attribute '{key}'")
    return attributes[key]
