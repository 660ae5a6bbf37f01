"""Stage `train`: fit the world model on the token and action stores; resume after an interruption."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from mnist_world import cli, config
from mnist_world.core.atomic import check_writable
from mnist_world.training.distributed import Cluster, inside_torchrun, launch_distributed
from mnist_world.training.fit import fit
from mnist_world.training.run_folder import ModelsLock, recover_set_aside


def main(
    params: cli.ParamsFile = cli.PARAMS,
    tokens: Annotated[Path, typer.Option(help="Token store.")] = Path("data/tokens.zarr"),
    actions: Annotated[Path, typer.Option(help="Action store.")] = Path("data/actions.zarr"),
    output: Annotated[Path, typer.Option(help="Checkpoint folder (last.pt, best.pt, epoch_*.pt).")] = Path(
        "models"
    ),
    reports: Annotated[Path, typer.Option(help="Training curves: metrics.json and plots.")] = Path(
        "reports/train"
    ),
    fresh: Annotated[bool, typer.Option(help="Ignore and remove existing checkpoints.")] = False,
    progress: cli.Progress = True,
) -> None:
    """Train with the `train` params, continuing from OUTPUT/last.pt when it comes from the same run.

    Reads params `model`, `train` and `data`. One process at a time writes OUTPUT (`.models.lock` beside
    it holds its PID). With train.nproc > 1 the command re-launches itself under torchrun
    (DistributedDataParallel); the launcher holds the lock for its ranks. With MNIST_WORLD_NODES > 1 every
    node runs this command (see docs/scaling.md) and rank 0, wherever torchrun places it, holds the lock and
    writes OUTPUT.
    """
    model_config, train_config = config.load("model", params), config.load("train", params)
    data_config = config.load("data", params)
    check_writable(output / "last.pt", reports / "metrics.json")

    def run() -> dict:
        return fit(
            model_config, train_config, data_config, tokens, actions, output, reports,
            progress=progress, fresh=fresh,
        )  # fmt: skip

    @contextlib.contextmanager
    def writing() -> Iterator[None]:
        with ModelsLock(output) as lock:
            if lock.took_over:
                typer.echo(f"{lock.path}: taken over from PID {lock.took_over}, which no longer runs")
            for path in recover_set_aside(output):
                typer.echo(f"{path}: put back (a killed run had set it aside)")
            yield

    cluster = Cluster.from_environment()
    if inside_torchrun():
        if cluster.distributed and os.environ["RANK"] == "0":  # across nodes only rank 0 knows it writes
            with writing():
                summary = run()
        else:
            summary = run()  # a rank: the launcher holds the lock
    elif cluster.distributed:
        raise typer.Exit(launch_distributed(train_config.nproc, __file__, sys.argv[1:], cluster))
    else:
        with writing():
            if train_config.nproc > 1:
                raise typer.Exit(launch_distributed(train_config.nproc, __file__, sys.argv[1:]))
            summary = run()
    if os.environ.get("RANK", "0") == "0":
        typer.echo(f"{output}: {summary['epoch']} epochs, best val_loss {summary['best_val_loss']:.4f}")


if __name__ == "__main__":
    cli.run(main)
