"""The training curves through DVCLive: `metrics.json` (the latest value of each metric, plus the run's
summary) and one `plots/metrics/<name>.tsv` per metric (columns `step` and the metric), which the train
stage declares as its metrics and plots for `dvc exp show`, `dvc metrics diff` and `dvc plots show`.

A resumed run starts the files afresh and logs its checkpoint's curve again, so they hold exactly what the
checkpoint does: DVCLive's own `resume=True` continues after the last row in the files, which may be rows
that a killed run logged after its last checkpoint and that the resumed run will log again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mnist_world.core.atomic import interrupts_held


class TrainingLogError(RuntimeError):
    """DVCLive could not start where the curves go."""


class TrainingLog:
    """Rows of {"step": n, <metric>: value, ...}, each row any subset of the metrics, logged through a
    DVCLive `Live` on `folder`. DVCLive writes files only: the stage declares them (no dvc.yaml of its own)
    and `dvc exp run` records the experiment (no experiment saved by DVCLive)."""

    def __init__(self, folder: str | Path, rows: Iterable[Mapping[str, Any]] = ()) -> None:
        self.folder = Path(folder)
        try:
            # Whole or not at all: the first log imports DVC (hundreds of modules), which an interrupt would
            # leave half-initialised for the clean-up that logs the curves again.
            with interrupts_held():
                # Imported here: DVCLive imports DVC, which the GPU machine does not have (it logs no curves).
                from dvclive import Live

                # resume=False: DVCLive removes the files of an earlier run; `rows` are logged again below.
                self.live = Live(dir=str(self.folder), resume=False, save_dvc_exp=False, dvcyaml=None)
        except Exception as error:  # DVCLive reads the git repository around the working directory
            empty = "empty git repo" in str(error).lower()  # a git repository without commits
            advice = "; make a first commit and run again" if empty else ""
            raise TrainingLogError(f"{self.folder}: DVCLive could not start: {error}{advice}") from None
        for row in rows:  # row by row, as the run wrote them: the same files, byte for byte
            self.add(row)
            self.live.make_summary()

    def add(self, row: Mapping[str, Any]) -> None:
        """Append one row to the curves (written at once); metrics.json follows at the next `write`."""
        self.live.step = int(row["step"])
        for name, value in row.items():
            if name != "step":
                self.live.log_metric(name, float(value))

    def write(self, summary: Mapping[str, Any] | None = None) -> None:
        """Write metrics.json: the latest value of each metric and the step, plus `summary`'s entries."""
        self.live.summary.update(summary or {})
        self.live.make_summary()

    def end(self, summary: Mapping[str, Any]) -> None:
        """The run is over: write metrics.json with `summary` and end DVCLive's run."""
        self.live.summary.update(summary)
        self.live.end()
