"""Stage `train`: fit the world model on the token and action stores; resume after an interruption."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from mnist_world import config
from mnist_world.checkpoint import CheckpointError
from mnist_world.dataset import TokenSpec, load_split
from mnist_world.model import Architecture
from mnist_world.store import StoreError
from mnist_world.training import DivergenceError, inside_torchrun, launch_distributed, run_params, train


def main(
    params: Annotated[Path, typer.Option(help="Params file; `model`, `train` and `data` are read.")] = Path(
        "params.yaml"
    ),
    tokens: Annotated[Path, typer.Option(help="Token store.")] = Path("data/tokens.zarr"),
    actions: Annotated[Path, typer.Option(help="Action store.")] = Path("data/actions.zarr"),
    output: Annotated[Path, typer.Option(help="Checkpoint folder (last.pt, best.pt, epoch_*.pt).")] = Path(
        "models"
    ),
    reports: Annotated[Path, typer.Option(help="DVCLive folder: metrics.json and plots.")] = Path(
        "reports/train"
    ),
    fresh: Annotated[bool, typer.Option(help="Ignore and remove existing checkpoints.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Train with the `train` params, continuing from OUTPUT/last.pt when it comes from the same run.

    With train.nproc > 1 the command re-launches itself under torchrun (DistributedDataParallel).
    """
    try:
        model_config, train_config = config.load("model", params), config.load("train", params)
        data_config = config.load("data", params)
        if train_config.nproc > 1 and not inside_torchrun():
            raise typer.Exit(launch_distributed(train_config.nproc, __file__, sys.argv[1:]))
        spec = TokenSpec.from_store(tokens)
        arch = Architecture.from_config(model_config, spec.levels, spec.frame_size, spec.frames)
        sizes = (data_config.train_sequences, data_config.val_sequences)
        train_data = load_split(tokens, actions, "train", *sizes, train_config.max_train_sequences)
        val_data = load_split(tokens, actions, "val", *sizes, train_config.max_val_sequences)
        run = run_params(model_config, train_config, data_config)
        summary = train(train_config, arch, train_data, val_data, output, reports, run, progress, fresh)
    except (config.ConfigError, StoreError, CheckpointError, DivergenceError, ValueError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    if os.environ.get("RANK", "0") == "0":
        typer.echo(f"{output}: {summary['epoch']} epochs, best val_loss {summary['best_val_loss']:.4f}")


if __name__ == "__main__":
    typer.run(main)
