"""Atomic writes of every artifact: built at a temporary path beside its destination and renamed into place
only when complete; temporaries that killed writers left are cleaned, and a failed write is one line.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class WriteError(ValueError):
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
