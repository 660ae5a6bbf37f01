"""How every stage fails: one line on stderr that names the thing and what to do, and a non-zero exit.

`run(main)` replaces `typer.run(main)` in the stages. Set MNIST_WORLD_DEBUG=1 to get the traceback instead.
Of the project this module imports only `core.atomic` (which every stage writes its outputs with), to say
after an interrupt which outputs this run had already put in place.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer

from mnist_world.core.atomic import finish_pending_io, replaced

DEBUG = "MNIST_WORLD_DEBUG"
HINT = f"{DEBUG}=1 shows the traceback"
REDELIVERY_SECONDS = 0.1  # after an interrupt was dropped inside a finalizer (`_unraisable`)
MAX_LENGTH = 600  # characters of an error message; beyond that it is a dump, not a message
ADVICE = {  # errno of an OSError nobody translated -> what to do
    errno.ENOSPC: "the disk is full: free some space and run again",
    errno.EDQUOT: "the disk quota is exhausted: free some space and run again",
    errno.EROFS: "the file system is read-only: write somewhere writable",
    errno.EACCES: "check the permissions",
    errno.EPERM: "check the permissions",
    errno.ENOENT: "check the path",
}


# The options every stage has (the params sections a stage reads are named in its help).
PARAMS = Path("params.yaml")
ParamsFile = Annotated[Path, typer.Option("--params", help="Params file.")]
Progress = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")]


class Terminated(BaseException):
    """SIGTERM (a `kill`, a scheduler's time limit): unwinds like Ctrl-C, so temporaries are cleaned."""


def debugging() -> bool:
    return os.environ.get(DEBUG, "").strip().lower() not in ("", "0", "false", "no")


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_LENGTH else text[: MAX_LENGTH - 3] + "..."


def _listed(paths: list[Path]) -> str:
    """`reports/eval/{metrics.json, per_horizon.csv}, data/tokens.zarr`: paths grouped by folder."""
    folders: dict[Path, list[str]] = {}
    for path in paths:
        folders.setdefault(path.parent, []).append(path.name)
    return ", ".join(
        str(folder / names[0]) if len(names) == 1 else f"{folder}/{{{', '.join(sorted(names))}}}"
        for folder, names in folders.items()
    )


def what_is_left(error: BaseException) -> str:
    """What an interrupted run leaves on disk, in words: what the code it stopped noted on the interrupt, or
    else which outputs it had already put in place (each complete: they are replaced whole)."""
    notes = getattr(error, "__notes__", None)
    if notes:
        return "; ".join(notes)
    done = replaced()
    if not done:
        return "outputs are as they were before this run: run again to redo it"
    return f"this run had put {_listed(done)} in place, complete; any other output is as it was before it"


def describe(error: BaseException) -> str:
    """`error` as one line. The project's errors (and ValueError, which its checks raise) already name their
    subject and say what to do; OSErrors get their file and advice; anything else is flagged as unexpected;
    an interrupt says what it leaves."""
    kind = type(error)
    if isinstance(error, KeyboardInterrupt):
        return _one_line(f"interrupted (Ctrl-C); {what_is_left(error)}")
    if isinstance(error, Terminated):
        return _one_line(f"stopped by SIGTERM; {what_is_left(error)}")
    if kind.__module__.startswith("mnist_world") or kind is ValueError:
        return _one_line(str(error) or kind.__name__)
    if isinstance(error, OSError):
        reason = error.strerror or str(error) or kind.__name__
        subject = f"{error.filename}: " if error.filename is not None else ""
        advice = ADVICE.get(error.errno or 0)
        return _one_line(f"{subject}{reason}" + (f"; {advice}" if advice else ""))
    if isinstance(error, MemoryError):
        return "out of memory: use fewer sequences or a smaller batch (train.batch_size, eval.batch_size)"
    return _one_line(f"unexpected {kind.__name__}: {error} ({HINT})")


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Turn any error of the block into `error: <one line>` on stderr and exit status 1 (130 for Ctrl-C,
    143 for SIGTERM); with MNIST_WORLD_DEBUG=1 the error propagates with its traceback."""
    try:
        yield
    except (typer.Exit, typer.Abort, SystemExit):
        raise
    except BaseException as error:
        # A failed or interrupted read or write may have left zarr's I/O thread busy: let it finish, or its
        # tasks are destroyed unfinished at exit, each with lines of asyncio's after ours. An interrupt can
        # also land between making a zarr coroutine and handing it to that thread: freed unawaited with the
        # traceback, it would warn after our line (the error line already says the call did not finish).
        warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
        finish_pending_io()
        if debugging():
            raise
        typer.echo(f"error: {describe(error)}", err=True)
        code = 130 if isinstance(error, KeyboardInterrupt) else 143 if isinstance(error, Terminated) else 1
        raise typer.Exit(code) from None


def _stop(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated()


def _unraisable(hook: sys.UnraisableHookArgs) -> None:
    """An interrupt whose handler ran inside a finalizer or a weakref callback (the garbage collector runs
    them between any two lines), where Python prints the exception with its traceback and drops it: send the
    signal again a moment later, from another thread, so that it is raised in the stage's own code once the
    callback and this hook have returned (raised here, Python would print and drop it again)."""
    if isinstance(hook.exc_value, KeyboardInterrupt | Terminated):
        signum = signal.SIGINT if isinstance(hook.exc_value, KeyboardInterrupt) else signal.SIGTERM
        threading.Timer(REDELIVERY_SECONDS, os.kill, (os.getpid(), signum)).start()
        return
    sys.__unraisablehook__(hook)


def _warning_line(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> str:
    return f"warning: {_one_line(str(message))}\n"


def command(main: Callable[..., Any]) -> Callable[..., Any]:
    """`main` with `one_line_errors` around it, keeping its signature for typer."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with one_line_errors():
            return main(*args, **kwargs)

    return wrapper


def run(main: Callable[..., Any]) -> None:
    """Run a stage's typer command: warnings in one line each, SIGTERM unwinding like Ctrl-C, and every
    error reported by `one_line_errors`."""
    if not debugging():
        warnings.formatwarning = _warning_line
    if sys.platform != "win32":
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        sys.unraisablehook = _unraisable
    try:
        typer.run(command(main))
    finally:
        # The stage has finished or said why not: a signal while the interpreter shuts down would raise
        # inside an exit callback (torch's, zarr's) and print a traceback after the stage's last line.
        if sys.platform != "win32":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
