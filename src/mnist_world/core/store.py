"""Sharded zarr 3 stores of per-sequence arrays: written atomically (see `atomic`), read with errors that name
the store, the shard and the sequences involved.

A store holds arrays whose first axis is the sequence: one chunk per sequence (cheap random reads) and one
shard per block of sequences (a handful of files for DVC to hash).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np
import zarr
import zarr.codecs

from mnist_world.core.atomic import atomic_path

P = ParamSpec("P")
R = TypeVar("R")


class StoreError(ValueError):
    """A store that is missing or damaged, lacks an array or an attribute, or holds one of the wrong shape."""


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


def in_bulk(build: Callable[P, R]) -> Callable[P, R]:
    """Run a store builder under `bulk_io`, sized by its own `sequences_per_shard` argument."""
    signature = inspect.signature(build)

    @functools.wraps(build)
    def builder(*args: P.args, **kwargs: P.kwargs) -> R:
        with bulk_io(signature.bind(*args, **kwargs).arguments["sequences_per_shard"]):
            return build(*args, **kwargs)

    return builder


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
        # zstd's content checksum: a damaged chunk fails to decode instead of decoding to garbage.
        compressors=zarr.codecs.ZstdCodec(level=1, checksum=True),
        fill_value=0,
        # Every shard is written, even an all-zero one, so a missing shard file always means damage.
        config={"write_empty_chunks": True},
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
        raise StoreError(
            f"{path}: not a readable zarr 3 store ({_first_line(error)}){repair_advice(path)}"
        ) from None


def repair_advice(path: str | Path) -> str:
    """What to do about a damaged store, whichever stage wrote it."""
    return f"; restore it with `dvc checkout --force {path}` or rebuild it with `dvc repro`"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    # zarr's checksum error goes on to print the raw digests: the first sentence is the useful part.
    text = text.splitlines()[0].split(". Stored:")[0] if text else type(error).__name__
    return text[:200]


class SequenceArray:
    """A read-only zarr array of per-sequence records whose failed reads name the store and the shard.

    Everything but indexing is the zarr array's own (`shape`, `dtype`, `shards`...). A damaged chunk or shard
    index raises StoreError naming the shard file and its sequences, never zarr's bare codec error.
    """

    def __init__(self, array: zarr.Array, store: Path, name: str) -> None:
        self.array, self.store, self.name = array, store, name

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self.array, attribute)

    def __len__(self) -> int:
        return self.array.shape[0]

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        return np.asarray(self[...], dtype=dtype)

    def __getitem__(self, selection: Any) -> Any:
        try:
            return self.array[selection]
        except (IndexError, MemoryError, KeyboardInterrupt):
            raise
        except Exception as error:
            raise StoreError(self._damage(selection, error)) from None

    def shard_file(self, index: int) -> str:
        """The path, inside the store, of shard `index` along the sequence axis: `tokens/c/1/0/0/0`."""
        return f"{self.name}/{self.array.metadata.encode_chunk_key((index,) + (0,) * (self.array.ndim - 1))}"

    def _damage(self, selection: Any, error: Exception) -> str:
        """Find the first unreadable shard of `selection` (one shard at a time) and describe it."""
        first = selection[0] if isinstance(selection, tuple) and selection else selection
        count = self.array.shape[0]
        if isinstance(first, slice):
            rows = range(count)[first]
        elif isinstance(first, int | np.integer):
            rows = range(count)[int(first) : int(first) + 1 or None]
        else:
            rows = range(count)
        size = (self.array.shards or self.array.chunks)[0]
        for index in range(min(rows, default=0) // size, max(rows, default=-1) // size + 1):
            try:
                self.array[index * size : (index + 1) * size]
            except Exception as shard_error:
                last = min((index + 1) * size, count) - 1
                return (
                    f"{self.store}: shard {self.shard_file(index)} (sequences {index * size}-{last}) is "
                    f"damaged ({_first_line(shard_error)}){repair_advice(self.store)}"
                )
        return f"{self.store}/{self.name}: cannot be read ({_first_line(error)}){repair_advice(self.store)}"


def open_array(
    path: str | Path, name: str, ndim: int | None = None, dtype: Any | None = None
) -> SequenceArray:
    """Open array `name` of the store at `path`, checking its rank, its dtype when asked to, and that none of
    its shard files is missing (zarr would read a missing shard as zeros)."""
    path = Path(path)
    group = open_store(path)
    try:
        present = name in group
        array = group[name] if present else None
    except Exception as error:
        raise StoreError(
            f"{path}/{name}: unreadable array metadata ({_first_line(error)}){repair_advice(path)}"
        ) from None
    if array is None:
        raise StoreError(
            f"{path}: no array '{name}' in the store (has: {', '.join(sorted(group)) or 'nothing'})"
        )
    if not isinstance(array, zarr.Array):
        raise StoreError(f"{path}/{name}: expected an array, found a group")
    if ndim is not None and array.ndim != ndim:
        raise StoreError(f"{path}/{name}: expected {ndim} dimensions, got shape {array.shape}")
    if dtype is not None and array.dtype != np.dtype(dtype):
        raise StoreError(f"{path}/{name}: expected dtype {np.dtype(dtype)}, got {array.dtype}")
    sequences = SequenceArray(array, path, name)
    _check_shards_present(sequences)
    return sequences


def _check_shards_present(sequences: SequenceArray) -> None:
    array = sequences.array
    grid = [
        math.ceil(length / size)
        for length, size in zip(array.shape, array.shards or array.chunks, strict=True)
    ]
    if array.ndim == 0 or any(count != 1 for count in grid[1:]):
        return  # not a per-sequence layout: nothing to say about its files
    for index in range(grid[0]):
        if not (sequences.store / sequences.shard_file(index)).is_file():
            size = (array.shards or array.chunks)[0]
            last = min((index + 1) * size, array.shape[0]) - 1
            raise StoreError(
                f"{sequences.store}: shard {sequences.shard_file(index)} (sequences {index * size}-{last}) "
                f"is missing{repair_advice(sequences.store)}"
            )


def attribute(path: str | Path, key: str) -> Any:
    """Read one attribute of the store's root group, with an error naming it when it is absent."""
    attributes = open_store(path).attrs
    if key not in attributes:
        raise StoreError(f"{path}: missing attribute '{key}'")
    return attributes[key]


def integer_attribute(path: str | Path, key: str) -> int:
    """An attribute that must be a whole number (levels, frame size...), with an error naming it if not."""
    value = attribute(path, key)
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise StoreError(
            f"{path}: attribute '{key}' should be an integer, got {value!r}{repair_advice(path)}"
        )
    return int(value)
