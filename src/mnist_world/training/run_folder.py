"""The folder of a training run: resuming from its last checkpoint, saving an epoch's checkpoints, keeping the
previous run's checkpoints until the new run has its own, and one writer at a time.

The lock and the set-aside checkpoints live beside the folder (`.models.lock`, `.models.previous-run/`), not
in it: the folder is a DVC output, and DVC hashes whatever it holds when a stage ends.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from mnist_world.config import TrainConfig
from mnist_world.model.checkpoint import (
    BEST,
    LAST,
    PATTERNS,
    CheckpointError,
    save_checkpoint,
    verify_checkpoint,
)
from mnist_world.training.distributed import Process
from mnist_world.training.learner import Learner


def _beside(output_dir: str | Path, suffix: str) -> Path:
    output_dir = Path(output_dir)
    if output_dir.name in ("", ".."):  # `.` or `..`: name it
        output_dir = output_dir.resolve()
    return output_dir.with_name(f".{output_dir.name}.{suffix}")


def set_aside_folder(output_dir: str | Path) -> Path:
    """Where a new run keeps the previous run's checkpoints until it has its own: `.models.previous-run`."""
    return _beside(output_dir, "previous-run")


def lock_file(output_dir: str | Path) -> Path:
    """The file that holds the PID of the one process writing `output_dir`: `.models.lock`."""
    return _beside(output_dir, "lock")


# --- Resume ------------------------------------------------------------------------------------------------


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def run_differences(payload: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """'key: stored -> now' for each entry of `expected` (params, architecture, data) that differs."""
    stored = _flatten({key: payload[key] for key in expected if key in payload}, "")
    wanted = _flatten(expected, "")
    return [
        f"{key}: {stored.get(key, '<missing>')!r} -> {wanted.get(key, '<missing>')!r}"
        for key in sorted(set(stored) | set(wanted))
        if stored.get(key, "<missing>") != wanted.get(key, "<missing>")
    ]


def temporaries(output_dir: Path) -> list[Path]:
    """The temporaries a killed checkpoint writer left in `output_dir` (see `atomic.atomic_path`); under the
    folder's lock nobody else is writing them."""
    patterns = (".*.partial-*", ".*.previous-*")
    return sorted({path for pattern in patterns for path in output_dir.glob(pattern)})


def find_resumable(
    output_dir: Path, expected: dict[str, Any], echo: Callable[[str], None]
) -> dict[str, Any] | None:
    """The payload of `output_dir/last.pt` when it was written by this same run, else None (saying why).

    A corrupt or truncated last.pt raises CheckpointError rather than being silently thrown away.
    """
    path = output_dir / LAST
    if not path.exists():
        return None
    payload = verify_checkpoint(path)
    differences = run_differences(payload, expected)
    if differences:
        shown = "; ".join(differences[:8]) + (
            f"; and {len(differences) - 8} more" if len(differences) > 8 else ""
        )
        echo(f"{path}: written by a different run ({shown}); starting afresh")
        return None
    return payload


def start_or_resume(
    learner: Learner,
    output_dir: Path,
    expected: dict[str, Any],
    fresh: bool,
    process: Process,
    say: Callable[[str], None],
) -> None:
    """Restore `learner` from output_dir/last.pt when it belongs to this run; else set the previous run's
    checkpoints aside (`set_aside_folder`) until this run has written a good one of its own."""
    output_dir.mkdir(parents=True, exist_ok=True)
    resumed = None if fresh else find_resumable(output_dir, expected, say)
    process.barrier()  # every rank has read last.pt before rank 0 may move it
    if process.is_main:
        for path in temporaries(output_dir):
            path.unlink()
        kept = None if resumed is not None else set_aside(output_dir)
        if kept is not None:
            say(f"{output_dir}: the previous run's checkpoints are kept in {kept} until this run has its own")
    if resumed is not None:
        learner.restore(resumed, process.rank)
        say(f"{output_dir / LAST}: resuming after epoch {learner.epoch}")
    process.barrier()


def save_epoch(output_dir: Path, payload: dict[str, Any], improved: bool, config: TrainConfig) -> None:
    epoch = payload["epoch"]
    if improved:
        save_checkpoint(output_dir / BEST, payload)
    if epoch % config.checkpoint_every == 0:
        save_checkpoint(output_dir / f"epoch_{epoch:03d}.pt", payload)
    # last.pt goes last: it is the resume point, so what it vouches for is on disk before it.
    save_checkpoint(output_dir / LAST, payload)
    discard_set_aside(output_dir)  # this run has a good checkpoint: the previous run's may go


# --- The folder: the previous run's checkpoints, kept until the new run has its own -------------------------


def checkpoints_in(output_dir: str | Path) -> list[Path]:
    """The checkpoints of the run in `output_dir` (last.pt, best.pt, epoch_*.pt), sorted."""
    output_dir = Path(output_dir)
    return sorted({path for pattern in PATTERNS for path in output_dir.glob(pattern) if path.is_file()})


def set_aside(output_dir: str | Path) -> Path | None:
    """Move the checkpoints of `output_dir` into `.<output_dir>.previous-run/` beside it before a new run.

    They stay there until the new run has written its first good checkpoint (`discard_set_aside`) or has
    failed before that (`restore_set_aside`). Returns the folder, or None when there was nothing to keep.
    """
    output_dir = Path(output_dir)
    recover_set_aside(output_dir)
    found = checkpoints_in(output_dir)
    if not found:
        return None
    folder = set_aside_folder(output_dir)
    folder.mkdir()
    for path in found:
        path.rename(folder / path.name)
    return folder


def restore_set_aside(output_dir: str | Path) -> list[Path]:
    """Put the set-aside checkpoints back in place of whatever the failed new run left; the paths restored.

    Nothing happens (and nothing is returned) when nothing was set aside, e.g. once the new run has written
    its first good checkpoint: that checkpoint is then the last good state.
    """
    output_dir = Path(output_dir)
    folder = set_aside_folder(output_dir)
    if not folder.is_dir():
        return []
    for path in checkpoints_in(output_dir):
        path.unlink()
    restored = []
    for path in sorted(folder.iterdir()):
        path.rename(output_dir / path.name)
        restored.append(output_dir / path.name)
    folder.rmdir()
    return restored


def discard_set_aside(output_dir: str | Path) -> None:
    """Delete the set-aside checkpoints: the new run has written a good checkpoint of its own."""
    folder = set_aside_folder(output_dir)
    if folder.exists():
        shutil.rmtree(folder)


def recover_set_aside(output_dir: str | Path) -> list[Path]:
    """After a run that was killed (kill -9, power loss) with checkpoints set aside: restore them when the
    folder holds no checkpoint of its own, else discard them. Returns the paths restored."""
    output_dir = Path(output_dir)
    if not set_aside_folder(output_dir).is_dir():
        return []
    if checkpoints_in(output_dir):
        discard_set_aside(output_dir)
        return []
    return restore_set_aside(output_dir)


def last_good_state(output_dir: str | Path) -> str:
    """Where the last good state of `output_dir` is, in words: `models/last.pt (epoch 3)`, or that there is
    none."""
    path = Path(output_dir) / LAST
    try:
        payload = verify_checkpoint(path)
    except CheckpointError:
        return f"no usable checkpoint in {output_dir}"
    return f"{path} (epoch {payload['epoch']})"


def stopped_state(output_dir: str | Path, restored: bool) -> str:
    """What a run stopped by Ctrl-C or SIGTERM leaves, in words, for the one line that reports the stop:
    `training stopped after epoch 3: models/last.pt resumes it ...`, or that the folder is as it was."""
    output_dir = Path(output_dir)
    if restored:
        return (
            "training stopped before this run's first checkpoint: the previous run's checkpoints are back "
            f"in {output_dir} ({last_good_state(output_dir)})"
        )
    try:
        epoch = verify_checkpoint(output_dir / LAST)["epoch"]
    except CheckpointError:
        return f"training stopped before its first checkpoint: {last_good_state(output_dir)}"
    return (
        f"training stopped after epoch {epoch}: {output_dir / LAST} holds it and the curves go up to it; run "
        "again with the same params to resume"
    )


# --- One writer at a time ----------------------------------------------------------------------------------


class ModelsLock:
    """One writer at a time for a checkpoint folder: `lock_file(output_dir)`, locked with flock, has its PID.

    The kernel drops the lock when its process dies, so a lock file left by a killed run (kill -9, power
    loss) is stale and simply taken over; `took_over` then holds that run's PID. Use as a context manager;
    the lock file goes when the lock is released.
    """

    def __init__(self, output_dir: str | Path) -> None:
        self.output_dir = Path(output_dir)
        self.path = lock_file(self.output_dir)
        self.took_over: int | None = None
        self._descriptor: int | None = None

    def owner(self) -> int | None:
        """The PID written in the lock file, or None when there is none (or it is unreadable)."""
        try:
            return int(self.path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def acquire(self) -> ModelsLock:
        import fcntl  # POSIX only: imported where a writer needs it, so readers work everywhere

        self.output_dir.mkdir(parents=True, exist_ok=True)
        while True:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(descriptor)
                owner = self.owner()
                who = f"PID {owner}" if owner else "another process"
                stop = f" (kill {owner})" if owner else ""
                raise CheckpointError(
                    f"{self.output_dir}: another training run ({who}) is writing here; wait for it to finish "
                    f"or stop it{stop}, then run again"
                ) from None
            # The previous holder may have removed the file between our open and our lock: lock a fresh one.
            try:
                current = os.stat(self.path).st_ino == os.fstat(descriptor).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(descriptor)
        previous = os.read(descriptor, 64).split()
        if previous and previous[0].isdigit() and int(previous[0]) != os.getpid():
            self.took_over = int(previous[0])  # its process died holding the lock
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        self._descriptor = descriptor
        return self

    def release(self) -> None:
        if self._descriptor is None:
            return
        self.path.unlink(missing_ok=True)  # while still locked: nobody takes a lock on a file about to go
        os.close(self._descriptor)
        self._descriptor = None

    def __enter__(self) -> ModelsLock:
        return self.acquire()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.release()
