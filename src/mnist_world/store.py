"""Sharded zarr 3 stores of per-sequence arrays, and atomic writes of every artifact.

A store holds arrays whose first axis is the sequence: one chunk per sequence (cheap random reads) and one
shard per block of sequences (a handful of files for DVC to hash). Every artifact is built at a temporary
path beside its destination and renamed into place only when complete; a failed read or write names the
store, shard or file involved.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.codecs


class StoreError(ValueError):
    """A store that is missing or damaged, lacks an array or an attribute, or holds one of the wrong shape."""


class WriteError(StoreError):
    """An output that could not be written: the disk is full, or the folder is read-only or not ours."""


# Errors of the file system rather than of the data: reported as "cannot write <destination>".
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (one we may not signal runs too)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporaries that writers of `path` killed mid-write (kill -9, power loss) left beside it.

    Only those of processes that no longer run are touched. A killed writer may also have moved the previous
    `path` aside without putting the new one in its place: that previous version is put back. Returns the
    paths removed or restored.
    """
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(partial|previous)-(\d+)$")
    if not path.parent.is_dir():
        return []
    stale = []
    for sibling in path.parent.iterdir():
        match = pattern.match(sibling.name)
        if match and not process_alive(int(match.group(2))):
            stale.append((match.group(1), sibling))
    handled = []
    # Newest first: of several set-aside versions, the most recent is the one to restore.
    for kind, sibling in sorted(stale, key=lambda item: item[1].lstat().st_mtime, reverse=True):
        if kind == "previous" and not path.exists() and not path.is_symlink():
            sibling.rename(path)
        else:
            _remove(sibling)
        handled.append(sibling)
    return handled


def _free_space(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB"
    except OSError:
        return "unknown"


def write_failure(path: Path, error: OSError, existed: bool) -> str:
    """One line saying why `path` could not be written and what to do, and that nothing was lost."""
    folder = path.parent
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        reason, advice = f"the disk is full ({_free_space(folder)} free in {folder})", "free some space"
    elif error.errno == errno.EROFS:
        reason, advice = f"{folder} is on a read-only file system", f"make {folder} writable"
    elif error.errno in (errno.EACCES, errno.EPERM):
        reason, advice = f"no permission to write in {folder}", f"make {folder} writable"
    elif error.errno == errno.EFBIG:
        reason, advice = "file too large for the file system or the process's limit (ulimit -f)", "raise it"
    else:
        reason, advice = error.strerror or str(error), "fix the cause"
    kept = f"the previous {path.name} is untouched" if existed else "nothing was written"
    return f"{path}: cannot write it: {reason}; {advice} and run again ({kept})"


def _is_write_error(error: BaseException, temporary: Path) -> bool:
    if not isinstance(error, OSError) or error.errno not in WRITE_ERRNOS:
        return False
    # A read of some input inside the block (a permission problem of its own) keeps its own message.
    if error.filename is None:
        return True
    name = os.fspath(error.filename)
    return name.startswith(os.fspath(temporary)) or name == os.fspath(temporary.parent)


def check_writable(*paths: str | Path) -> None:
    """Fail early, before any work, when an output could not be written because its folder (or the nearest
    one that exists) is read-only or not ours. Creates nothing; a full disk shows only while writing."""
    for path in map(Path, paths):
        folder = path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if os.access(folder, os.W_OK | os.X_OK):
            continue
        read_only = hasattr(os, "statvfs") and os.statvfs(folder).f_flag & os.ST_RDONLY
        code = errno.EROFS if read_only else errno.EACCES
        raise WriteError(write_failure(path, OSError(code, os.strerror(code)), path.exists()))


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write into; move it onto `path` only if the block succeeds.

    On an exception (or Ctrl-C) the temporary is removed and whatever stood at `path` is left untouched; a
    full disk or a read-only folder raises WriteError naming `path`. Temporaries that killed writers left
    beside `path` are cleaned first.
    """
    path = Path(path)
    existed = path.exists()
    temporary = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temporaries(path)
        _remove(temporary)
    except OSError as error:
        if _is_write_error(error, temporary):
            raise WriteError(write_failure(path, error, existed)) from None
        raise
    try:
        yield temporary
    except BaseException as error:
        with contextlib.suppress(OSError):
            _remove(temporary)
        if _is_write_error(error, temporary):
            raise WriteError(write_failure(path, error, existed)) from None  # type: ignore[arg-type]
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
