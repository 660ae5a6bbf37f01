"""A sweep's results as a table and a chart: `dvc exp show --csv` read into pandas, one row per experiment,
the chosen params and metrics as columns, and each metric drawn against the swept param.

    dvc exp run --queue -S 'model.layers=1,2' && dvc queue start -j 2
    python scripts/sweep.py model.layers point.mse sampled.mse --output reports/sweep

(the second once `dvc queue status` shows nothing queued or running) writes reports/sweep/sweep.csv and
reports/sweep/sweep.png. `--csv FILE` reads a saved `dvc exp show --csv` instead of running it. A name
matches a column of that name or one that ends in `:name` (DVC prefixes a column with its file when two
files share a name); it must match exactly one.
"""

from __future__ import annotations

import io
import subprocess
from pathlib import Path
from typing import Annotated

import pandas as pd
import typer

from mnist_world import cli
from mnist_world.core.atomic import atomic_path


def experiments(shown: str) -> pd.DataFrame:
    """The experiments of `dvc exp show --csv` output: its rows with an experiment name."""
    table = pd.read_csv(io.StringIO(shown))
    named = table[table["Experiment"].notna() & (table["typ"] != "workspace")]
    return named.set_index("Experiment")


def column(table: pd.DataFrame, name: str) -> str:
    matches = [label for label in table.columns if label == name or label.endswith(f":{name}")]
    if len(matches) != 1:
        found = "none" if not matches else ", ".join(matches)
        raise ValueError(f"{name}: expected one column of `dvc exp show` named so, found {found}")
    return matches[0]


def sweep_table(shown: str, param: str, metrics: list[str]) -> pd.DataFrame:
    """One row per experiment, sorted by `param`: the param and the metrics, under their given names."""
    table = experiments(shown)
    if table.empty:
        raise ValueError("`dvc exp show` lists no experiments: run the sweep first")
    names = [param, *metrics]
    chosen = table[[column(table, name) for name in names]].set_axis(names, axis=1)
    return chosen.apply(pd.to_numeric, errors="coerce").sort_values(param)


def draw(table: pd.DataFrame, param: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [name for name in table.columns if name != param]
    figure, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2), squeeze=False)
    for axis, metric in zip(axes[0], metrics, strict=True):
        axis.plot(table[param], table[metric], marker="o")
        for experiment, row in table.iterrows():
            axis.annotate(str(experiment), (row[param], row[metric]), fontsize=7, alpha=0.7)
        axis.set(xlabel=param, ylabel=metric, title=metric)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=120, format="png")
    plt.close(figure)


def main(
    param: Annotated[str, typer.Argument(help="The swept param, e.g. model.layers.")],
    metrics: Annotated[list[str], typer.Argument(help="Metrics to tabulate and draw, e.g. point.mse.")],
    output: Annotated[Path, typer.Option(help="Folder for sweep.csv and sweep.png.")] = Path("reports/sweep"),
    csv: Annotated[Path | None, typer.Option(help="A saved `dvc exp show --csv` (default: run it).")] = None,
) -> None:
    """Tabulate and draw the experiments of this repository (or of a saved `dvc exp show --csv`)."""
    if csv is not None:
        shown = csv.read_text()
    else:
        result = subprocess.run(["dvc", "exp", "show", "--csv"], capture_output=True, text=True)
        if result.returncode:
            raise ValueError(f"dvc exp show failed: {result.stderr.strip().splitlines()[-1]}")
        shown = result.stdout
    table = sweep_table(shown, param, metrics)
    output.mkdir(parents=True, exist_ok=True)
    with atomic_path(output / "sweep.csv") as temporary:
        table.to_csv(temporary)
    draw(table, param, output / "sweep.png")
    typer.echo(table.to_string())
    typer.echo(f"{output / 'sweep.csv'}, {output / 'sweep.png'}: {len(table)} experiments")


if __name__ == "__main__":
    cli.run(main)
