"""Stage `actions`: data/raw.zarr -> data/actions.zarr (ego-centric actions) and the tracker's report.

Actions are normalised at the token resolution, read from the token store's attributes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from mnist_world import cli, config
from mnist_world.actions.ego import build_actions_store
from mnist_world.core.atomic import atomic_paths, check_writable, write_json
from mnist_world.core.store import integer_attribute


def main(
    params: cli.ParamsFile = cli.PARAMS,
    raw: Annotated[Path, typer.Option(help="Raw frame store to read.")] = Path("data/raw.zarr"),
    tokens: Annotated[Path, typer.Option(help="Token store whose frame size scales the actions.")] = Path(
        "data/tokens.zarr"
    ),
    output: Annotated[Path, typer.Option(help="Action store to write (replaced atomically).")] = Path(
        "data/actions.zarr"
    ),
    report: Annotated[Path, typer.Option(help="Tracking report (DVC metric).")] = Path(
        "reports/actions.json"
    ),
    progress: cli.Progress = True,
) -> None:
    """Actions from the true trajectories (generated data; the tracker is scored against them) or tracked.

    Reads params `actions` (the tracker's settings) and `data.sequences_per_shard`.
    """
    started = time.perf_counter()
    actions = config.load("actions", params)
    data = config.load("data", params)
    check_writable(output, report)
    frame_size = integer_attribute(tokens, "frame_size")
    with atomic_paths(output, report) as (store, summary_path):  # both replaced together, or neither
        summary = build_actions_store(
            raw, store, actions, frame_size, data.sequences_per_shard, progress=progress
        )
        write_json(summary_path, summary)
    line = f"{output}: actions from {summary['method']}"
    if summary["tracking_error_mean_px"] is not None:
        line += (
            f"; tracker error {summary['tracking_error_mean_px']:.3f} px mean, "
            f"{summary['within_half_px']:.1%} within 0.5 px "
            f"(at {summary['frame_size']}x{summary['frame_size']})"
        )
    typer.echo(f"{line} in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    cli.run(main)
