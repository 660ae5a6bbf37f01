"""The training curves through DVCLive: the files DVC reads, and a resume that holds exactly the checkpoint's
rows whatever a killed run left behind."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from mnist_world.training.log import TrainingLog

ROWS = [
    {"step": 10, "loss": 2.5, "lr": 1e-4},
    {"step": 20, "loss": 1.75, "lr": 2e-4},
    {"step": 20, "val_loss": 1.5, "val_point_vs_blank": 0.9},
    {"step": 30, "loss": 1.25, "lr": 3e-4},
]


def curve(folder: Path, name: str) -> list[tuple[int, float]]:
    with (folder / "plots" / "metrics" / f"{name}.tsv").open() as handle:
        return [(int(row["step"]), float(row[name])) for row in csv.DictReader(handle, delimiter="\t")]


def test_rows_become_one_curve_per_metric_and_a_summary(tmp_path: Path) -> None:
    log = TrainingLog(tmp_path)
    for row in ROWS:
        log.add(row)
    log.end({"best_val_loss": 1.5, "epoch": 1})
    assert curve(tmp_path, "loss") == [(10, 2.5), (20, 1.75), (30, 1.25)]
    assert curve(tmp_path, "val_loss") == [(20, 1.5)]
    assert sorted(path.name for path in (tmp_path / "plots" / "metrics").iterdir()) == [
        "loss.tsv", "lr.tsv", "val_loss.tsv", "val_point_vs_blank.tsv"
    ]  # fmt: skip
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary == {
        "loss": 1.25, "lr": 3e-4, "val_loss": 1.5, "val_point_vs_blank": 0.9, "step": 30,
        "best_val_loss": 1.5, "epoch": 1,
    }  # fmt: skip
    assert not (tmp_path / "dvc.yaml").exists()  # the stage declares the files in the project's dvc.yaml


def test_a_resumed_log_holds_the_checkpoint_rows_then_continues(tmp_path: Path) -> None:
    """A killed run logged rows 10..30 but checkpointed after step 20: the resumed run's log starts from the
    checkpoint's rows (no row 30 twice), then continues."""
    killed = TrainingLog(tmp_path)
    for row in ROWS:
        killed.add(row)
    killed.write()
    checkpointed = ROWS[:3]

    resumed = TrainingLog(tmp_path, checkpointed)
    assert curve(tmp_path, "loss") == [(10, 2.5), (20, 1.75)]
    assert json.loads((tmp_path / "metrics.json").read_text())["step"] == 20
    resumed.add({"step": 30, "loss": 1.0, "lr": 3e-4})
    resumed.write({"epoch": 1})
    assert curve(tmp_path, "loss") == [(10, 2.5), (20, 1.75), (30, 1.0)]
    assert curve(tmp_path, "val_loss") == [(20, 1.5)]
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["loss"] == 1.0 and summary["step"] == 30 and summary["epoch"] == 1


def test_a_new_run_removes_the_curves_of_the_previous_one(tmp_path: Path) -> None:
    old = TrainingLog(tmp_path)
    old.add({"step": 10, "loss": 2.0, "accuracy": 0.5})
    old.write()
    TrainingLog(tmp_path).write()
    assert not (tmp_path / "plots" / "metrics" / "accuracy.tsv").exists()
    assert "loss" not in json.loads((tmp_path / "metrics.json").read_text())


def test_logging_the_rows_again_gives_the_same_files(tmp_path: Path) -> None:
    """How a failed run puts back the curves of its last checkpoint: byte for byte what the run wrote."""
    run = TrainingLog(tmp_path)
    for row in ROWS:  # as training logs: a row, then metrics.json
        run.add(row)
        run.write()
    run.end({"best_val_loss": 1.5, "epoch": 1})
    written = {path: path.read_bytes() for path in sorted(tmp_path.rglob("*")) if path.is_file()}
    TrainingLog(tmp_path, ROWS).write({"best_val_loss": 1.5, "epoch": 1})
    assert {path: path.read_bytes() for path in sorted(tmp_path.rglob("*")) if path.is_file()} == written
