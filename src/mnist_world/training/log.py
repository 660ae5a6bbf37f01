"""The training curves as DVC reads them: `metrics.json` (the latest value of each metric) and one
`plots/metrics/<name>.tsv` per metric (columns `step` and the metric), the files DVCLive writes, written
here with the plain libraries so that a resumed run can rewrite them exactly from its checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mnist_world.core.atomic import atomic_path, write_json


class TrainingLog:
    """Rows of {"step": n, <metric>: value, ...}; each row may carry any subset of the metrics."""

    def __init__(self, folder: str | Path, rows: Iterable[Mapping[str, Any]] = ()) -> None:
        self.folder = Path(folder)
        self.rows: list[dict[str, Any]] = [dict(row) for row in rows]

    def add(self, row: Mapping[str, Any]) -> None:
        self.rows.append(dict(row))

    def series(self) -> dict[str, list[tuple[int, float]]]:
        """{metric: [(step, value), ...]} in the order logged."""
        found: dict[str, list[tuple[int, float]]] = {}
        for row in self.rows:
            for name, value in row.items():
                if name != "step":
                    found.setdefault(name, []).append((int(row["step"]), value))
        return found

    def write(self, summary: Mapping[str, Any] | None = None) -> None:
        """Rewrite every file from the rows, atomically; `summary` adds entries to metrics.json."""
        series = self.series()
        latest = {name: points[-1][1] for name, points in series.items()}
        if self.rows:
            latest["step"] = int(self.rows[-1]["step"])
        write_json(self.folder / "metrics.json", {**latest, **(summary or {})})
        plots = self.folder / "plots" / "metrics"
        plots.mkdir(parents=True, exist_ok=True)
        for name, points in series.items():
            with atomic_path(plots / f"{name}.tsv") as temporary:
                lines = [f"step\t{name}"] + [f"{step}\t{_number(value)}" for step, value in points]
                temporary.write_text("\n".join(lines) + "\n")


def _number(value: float) -> str:
    return repr(float(value)) if math.isfinite(value) else str(value)
