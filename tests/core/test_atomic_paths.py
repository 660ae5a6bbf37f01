import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mnist_world.core import atomic
from mnist_world.core.atomic import (
    WriteError,
    atomic_path,
    atomic_paths,
    clean_stale_temporaries,
    replaced,
    write_json,
)


class Stopped(BaseException):
    """What a stage's SIGTERM handler raises (cli.Terminated), without importing the CLI."""


@pytest.fixture(autouse=True)
def python_handles_interrupts():
    """Python's own SIGINT handler (a background job ignores SIGINT) and a SIGTERM that raises."""

    def stop(signum, frame):
        raise Stopped()

    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
        signal.SIGTERM: signal.signal(signal.SIGTERM, stop),
    }
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)


@pytest.fixture
def outputs(tmp_path: Path) -> tuple[Path, Path]:
    """An old store (a folder of one file) in data/ and an old report (a file) in reports/."""
    store, report = tmp_path / "data" / "tokens.zarr", tmp_path / "reports" / "quantize.json"
    store.mkdir(parents=True)
    (store / "zarr.json").write_text("old")
    report.parent.mkdir()
    report.write_text(json.dumps("old"))
    return store, report


def state(store: Path, report: Path) -> tuple[str, str]:
    return (store / "zarr.json").read_text(), json.loads(report.read_text())


def temporaries(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if atomic.TEMPORARY.match(path.name)]


def write_new(store: Path, report: Path) -> None:
    """What a stage does with the temporaries: hand them to functions that write atomically themselves."""
    with atomic_path(store) as folder:
        folder.mkdir()
        (folder / "zarr.json").write_text("new")
    write_json(report, "new")


def test_success_replaces_every_output_and_records_only_them(tmp_path, outputs):
    store, report = outputs
    before = len(replaced())
    with atomic_paths(store, report) as (new_store, new_report):
        assert new_store == store.with_name(f".tokens.zarr.partial-{os.getpid()}")
        assert new_report == report.with_name(f".quantize.json.partial-{os.getpid()}")
        write_new(new_store, new_report)
        assert replaced()[before:] == []  # the nested atomic writes of the temporaries are not outputs
    assert state(store, report) == ("new", "new")
    assert replaced()[before:] == [store, report]
    assert temporaries(tmp_path) == []


def test_new_outputs_and_folders_are_created(tmp_path):
    store, report = tmp_path / "a" / "tokens.zarr", tmp_path / "b" / "c" / "quantize.json"
    with atomic_paths(store, report) as (new_store, new_report):
        write_new(new_store, new_report)
    assert state(store, report) == ("new", "new")
    assert temporaries(tmp_path) == []


def test_an_exception_leaves_every_old_output_and_no_temporary(tmp_path, outputs):
    store, report = outputs
    before = len(replaced())
    with pytest.raises(RuntimeError, match="boom"), atomic_paths(store, report) as (new_store, new_report):
        write_new(new_store, new_report)
        raise RuntimeError("boom")
    assert state(store, report) == ("old", "old")
    assert temporaries(tmp_path) == [] and replaced()[before:] == []


def test_an_output_left_unwritten_changes_nothing(tmp_path, outputs):
    store, report = outputs
    unwritten = pytest.raises(ValueError, match="quantize.json: nothing was written")
    with unwritten, atomic_paths(store, report) as (new_store, _):
        new_store.mkdir()
    assert state(store, report) == ("old", "old") and temporaries(tmp_path) == []


def test_a_full_disk_names_the_output_not_its_temporary(tmp_path, outputs):
    store, report = outputs
    with pytest.raises(WriteError) as caught, atomic_paths(store, report) as (_, new_report):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(new_report))
    assert str(caught.value).startswith(f"{report}: cannot write it: the disk is full")
    assert "the previous quantize.json is untouched" in str(caught.value)
    # The same from a library's own atomic write of the temporary (write_json inside the block).
    full = pytest.raises(WriteError)
    with full as caught, atomic_paths(store, report) as (_, new_report), atomic_path(new_report) as nested:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(nested))
    assert str(caught.value).startswith(f"{report}: cannot write it: the disk is full")
    assert state(store, report) == ("old", "old") and temporaries(tmp_path) == []


def test_an_output_named_twice_is_refused(tmp_path):
    with pytest.raises(ValueError, match="named twice"), atomic_paths(tmp_path / "a", tmp_path / "a"):
        pass


def dead_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    return int(child.stdout)


def test_stale_nested_temporaries_of_a_dead_writer_are_cleaned(tmp_path, outputs):
    store, report = outputs
    pid = dead_pid()
    left = [
        store.with_name(f".tokens.zarr.partial-{pid}"),  # the outer temporary
        store.with_name(f"..tokens.zarr.partial-{pid}.partial-{pid}"),  # create_store's, inside the stage's
        report.with_name(f"..quantize.json.partial-{pid}.partial-{pid}"),  # write_json's
    ]
    left[0].mkdir()
    left[1].mkdir()
    (left[1] / "zarr.json").write_text("half")
    left[2].write_text("half")
    alive = store.with_name(f"..tokens.zarr.partial-{os.getpid()}.partial-{os.getpid()}")
    alive.mkdir()  # a running writer's: kept
    assert sorted(clean_stale_temporaries(store)) == sorted(left[:2])
    assert clean_stale_temporaries(report) == [left[2]]
    assert temporaries(tmp_path) == [alive]
    alive.rmdir()
    with atomic_paths(store, report) as (new_store, new_report):
        write_new(new_store, new_report)
    assert state(store, report) == ("new", "new") and temporaries(tmp_path) == []


@pytest.mark.parametrize("sent", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupt_during_the_renames_comes_after_all_of_them(tmp_path, outputs, monkeypatch, sent):
    """The signal is raised at the first rename onto an output; it is delivered once every output is new
    and recorded, and the set-aside old folder is gone."""
    store, report = outputs
    before = len(replaced())
    rename = os.replace
    seen: list[str] = []

    def replace_and_interrupt(source, target):
        if not seen:
            signal.raise_signal(sent)  # held: it must not stop the renames
        rename(source, target)
        seen.append(Path(target).name)

    monkeypatch.setattr(atomic.os, "replace", replace_and_interrupt)
    expected = KeyboardInterrupt if sent == signal.SIGINT else Stopped
    with pytest.raises(expected), atomic_paths(store, report) as (new_store, new_report):
        new_store.mkdir()
        (new_store / "zarr.json").write_text("new")
        new_report.write_text(json.dumps("new"))
    monkeypatch.undo()
    assert seen == ["tokens.zarr", "quantize.json"]
    assert state(store, report) == ("new", "new")
    assert replaced()[before:] == [store, report]
    assert temporaries(tmp_path) == []


def test_an_interrupt_while_writing_leaves_every_old_output(tmp_path, outputs):
    store, report = outputs
    with pytest.raises(KeyboardInterrupt), atomic_paths(store, report) as (new_store, new_report):
        write_new(new_store, new_report)
        signal.raise_signal(signal.SIGINT)
    assert state(store, report) == ("old", "old") and temporaries(tmp_path) == []
