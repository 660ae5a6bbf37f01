"""Atomic writes of every artifact: built at a temporary path beside its destination and renamed into place
only when complete, several outputs (of one folder, or of several) replaced together; temporaries that killed
writers left are cleaned, and a failed write is one line. Ctrl-C and SIGTERM wait while outputs are being
swapped, and the process keeps a record of what it has put in place, so that an interrupt can say what is on
disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import re
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any


class WriteError(ValueError):
    """An output that could not be written: the disk is full, or the folder is read-only or not ours."""


# Errors of the file system rather than of the data: reported as "cannot write <destination>".
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


# `.<name>.partial-<pid>` (being written), `.<name>.previous-<pid>` (the version being replaced)
TEMPORARY = re.compile(r"^\.(.+)\.(partial|previous)-(\d+)$")
INTERRUPTS = (signal.SIGINT, signal.SIGTERM)
PENDING_IO_SECONDS = 30.0  # how long to wait for zarr's I/O thread to finish what an interrupted call started

_replaced: list[Path] = []  # the outputs this process has put in place, in order


def replaced() -> list[Path]:
    """The outputs this process has put in place so far (atomic_path(s) and replace_together), in order."""
    return list(_replaced)


def _record(path: Path) -> None:
    # A write into another write's temporary (a file of a folder being built, or a library's own atomic
    # write of the temporary that `atomic_paths` handed it) is not an output yet.
    if not any(TEMPORARY.match(part) for part in path.parts) and path not in _replaced:
        _replaced.append(path)


def _temporary(path: Path, kind: str = "partial") -> Path:
    """This process's `.<name>.partial-<pid>` (or `.previous-<pid>`) beside `path`."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def destination_of(path: str | Path) -> Path:
    """The output that a temporary (or a temporary's temporary) is written for; else `path` itself."""
    path = Path(path)
    while (match := TEMPORARY.match(path.name)) and match.group(2) == "partial":
        path = path.with_name(match.group(1))
    return path


def _nested_writers(name: str, target: str) -> list[int]:
    """The pids in `name` when it is a temporary of a temporary (of ...) of `target`, outermost first; else
    []. `..tokens.zarr.partial-7.partial-7` is what a library's own atomic write leaves when it writes the
    temporary `.tokens.zarr.partial-7` that `atomic_paths` handed it."""
    pids = []
    while match := TEMPORARY.match(name):
        pids.append(int(match.group(3)))
        name = match.group(1)
        if name == target:
            return pids if len(pids) > 1 else []
    return []


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM back for the block and deliver them right after it, so that an interrupt never
    lands between two renames of one replacement, or inside an import (which would leave a package
    half-initialised for the clean-up that follows). Only the main thread can do this; elsewhere the block
    runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    previous = {signum: signal.signal(signum, hold) for signum in INTERRUPTS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(received):
            signal.raise_signal(signum)  # the stage's handler runs now, after the renames


def finish_pending_io(timeout: float = PENDING_IO_SECONDS) -> None:
    """Wait until zarr's I/O thread has finished the tasks an interrupted or failed call left running.

    zarr 3 runs its reads and writes as tasks on an event loop in a thread of its own. When the main thread
    stops waiting (an exception, Ctrl-C), those tasks go on: a write may add a file to a temporary after it
    was removed, and tasks still pending at exit are destroyed there, each with a message of asyncio's.
    zarr has no public call for this, so the loop is looked up where zarr keeps it (`zarr.core.sync.loop`);
    when zarr is not loaded, or that changes, there is nothing to wait for.
    """
    sync = sys.modules.get("zarr.core.sync")
    loops = getattr(sync, "loop", None)
    loop = loops[0] if isinstance(loops, list) and loops else None
    if not isinstance(loop, asyncio.AbstractEventLoop) or loop.is_closed() or not loop.is_running():
        return

    async def drain() -> None:
        # Finished tasks may start others (a shard's chunks): wait until none is left.
        while others := [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]:
            await asyncio.wait(others)
            for task in others:
                if not task.cancelled():
                    task.exception()  # retrieved: asyncio does not report it again at exit

    with contextlib.suppress(Exception):
        asyncio.run_coroutine_threadsafe(drain(), loop).result(timeout)


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
    `path` aside without putting the new one in its place: that previous version is put back. A writer killed
    while swapping the entries of the folder `path` (`replace_together`) had them all written: the swap is
    finished, so the folder holds all of that run's outputs. Returns the paths removed or restored.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    stale: dict[tuple[str, int], Path] = {}
    handled = []
    for sibling in path.parent.iterdir():
        match = TEMPORARY.match(sibling.name)
        if match and match.group(1) == path.name and not process_alive(int(match.group(3))):
            stale[match.group(2), int(match.group(3))] = sibling
        elif (nested := _nested_writers(sibling.name, path.name)) and not any(map(process_alive, nested)):
            _remove(sibling)  # a library's write into a killed writer's temporary: never a version of `path`
            handled.append(sibling)
    for pid in sorted({pid for kind, pid in stale if kind == "partial"}):
        staging, previous = stale[("partial", pid)], stale.get(("previous", pid))
        if previous is not None and path.is_dir() and previous.is_dir() and staging.is_dir():
            _swap_entries(staging, path, previous)  # the entries left to move, as the killed writer would
            for kind in ("partial", "previous"):
                finished = stale.pop((kind, pid))
                _remove(finished)
                handled.append(finished)
    # Newest first: of several set-aside versions, the most recent is the one to restore.
    for (kind, _), sibling in sorted(stale.items(), key=lambda item: item[1].lstat().st_mtime, reverse=True):
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


def _prepare(path: Path) -> bool:
    """Make `path`'s folder and clear its temporaries (a killed writer's, this process's own); whether its
    output existed, for the message of a failed write."""
    existed = destination_of(path).exists()
    temporary = _temporary(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temporaries(path)
        for leftover in (temporary, _temporary(path, "previous")):
            _remove(leftover)
    except OSError as error:
        if _is_write_error(error, temporary):
            raise WriteError(write_failure(destination_of(path), error, existed)) from None
        raise
    return existed


def _swap_in(paths: tuple[Path, ...], temporaries: tuple[Path, ...]) -> list[Path]:
    """Rename each temporary onto its path; returns the old directories, set aside first (os.replace cannot
    replace a non-empty directory), for the caller to remove. Only a kill -9 inside the second loop leaves
    some outputs new and others old."""
    set_aside = []
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            previous = _temporary(path, "previous")
            path.rename(previous)
            set_aside.append(previous)
    for path, temporary in zip(paths, temporaries, strict=True):
        os.replace(temporary, path)
    return set_aside


@contextlib.contextmanager
def atomic_paths(*paths: str | Path) -> Iterator[tuple[Path, ...]]:
    """Yield a temporary sibling of each of `paths` to write into; only when the block succeeds are they all
    renamed onto `paths`, in one run of renames with Ctrl-C and SIGTERM held back, so that an interrupt
    leaves all the old outputs or all the new ones (a kill -9 inside those renames can still leave a mix).

    On an exception (or Ctrl-C) every temporary is removed and `paths` are untouched; a full disk or a
    read-only folder raises WriteError naming the output. Temporaries that killed writers left are cleaned
    first. A temporary may be handed to a function that writes it atomically itself (`write_json`,
    `create_store`): its own temporary of the temporary is not recorded as an output.
    """
    destinations = tuple(map(Path, paths))
    if len(set(destinations)) < len(destinations):
        raise ValueError(f"atomic_paths: an output is named twice in {', '.join(map(str, paths))}")
    existed = [_prepare(path) for path in destinations]
    temporaries = tuple(map(_temporary, destinations))
    try:
        yield temporaries
        for path, temporary in zip(destinations, temporaries, strict=True):
            if not (temporary.exists() or temporary.is_symlink()):
                raise ValueError(f"{destination_of(path)}: nothing was written to its temporary {temporary}")
    except BaseException as error:
        finish_pending_io()  # no write of the block may land after the temporaries are removed
        for temporary in temporaries:
            with contextlib.suppress(OSError):
                _remove(temporary)
        for path, temporary, old in zip(destinations, temporaries, existed, strict=True):
            if _is_write_error(error, temporary):
                raise WriteError(write_failure(destination_of(path), error, old)) from None  # type: ignore[arg-type]
        raise
    with interrupts_held():
        set_aside = _swap_in(destinations, temporaries)
        for path in destinations:
            _record(path)
        # Inside the hold: an interrupt here would leave a `.previous-<pid>` behind.
        for previous in set_aside:
            shutil.rmtree(previous)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write into; move it onto `path` only if the block succeeds.

    On an exception (or Ctrl-C) the temporary is removed and whatever stood at `path` is left untouched; a
    full disk or a read-only folder raises WriteError naming `path`. Temporaries that killed writers left
    beside `path` are cleaned first. `atomic_paths` with one path.
    """
    with atomic_paths(path) as (temporary,):
        yield temporary


def _swap_entries(staging: Path, folder: Path, previous: Path) -> list[Path]:
    """Move every entry of `staging` into `folder`, the entry it replaces into `previous` first; the paths."""
    previous.mkdir(exist_ok=True)
    moved = []
    for entry in sorted(staging.iterdir()):
        target = folder / entry.name
        if target.exists() or target.is_symlink():
            target.rename(previous / entry.name)
        entry.rename(target)
        moved.append(target)
    return moved


@contextlib.contextmanager
def replace_together(folder: str | Path) -> Iterator[Path]:
    """Yield an empty folder beside `folder` to write a stage's outputs into, under their final names; when
    the block succeeds, they replace their namesakes in `folder` together. Entries of `folder` that the block
    did not write stay as they are.

    The outputs are all written before the first of them is moved, and the moves (two renames an output) run
    with Ctrl-C and SIGTERM held back, so an interrupt leaves all the old outputs or all the new ones; after a
    kill -9 inside those moves, the next writer of `folder` finishes them (`clean_stale_temporaries`). On an
    exception the temporary folder goes and `folder` is untouched; a full disk or a read-only folder raises
    WriteError naming `folder`.
    """
    folder = Path(folder)
    existed = folder.exists()
    staging, previous = _temporary(folder), _temporary(folder, "previous")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        clean_stale_temporaries(folder)
        for leftover in (staging, previous):
            _remove(leftover)
        staging.mkdir()
    except OSError as error:
        if _is_write_error(error, staging):
            raise WriteError(write_failure(folder, error, existed)) from None
        raise
    try:
        yield staging
    except BaseException as error:
        finish_pending_io()
        with contextlib.suppress(OSError):
            _remove(staging)
        if _is_write_error(error, staging):
            raise WriteError(write_failure(folder, error, existed)) from None  # type: ignore[arg-type]
        raise
    with interrupts_held():
        for path in _swap_entries(staging, folder, previous):
            _record(path)
        shutil.rmtree(previous)
        staging.rmdir()


def write_json(path: str | Path, payload: Any) -> None:
    """Write `payload` as indented JSON, atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
