"""Stage `evaluate`: score a checkpoint on the validation split; write reports/eval (metrics, pictures)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated

import typer

from mnist_world import config
from mnist_world.checkpoint import CheckpointError
from mnist_world.devices import resolve_device
from mnist_world.evaluation import evaluate
from mnist_world.store import StoreError


def main(
    params: Annotated[
        Path, typer.Option(help="Params file: sample, eval, data and actions are read.")
    ] = Path("params.yaml"),
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint to score.")] = Path("models/best.pt"),
    tokens: Annotated[Path, typer.Option(help="Token store.")] = Path("data/tokens.zarr"),
    frames: Annotated[Path, typer.Option(help="Continuous frames store (the metrics' truth).")] = Path(
        "data/frames.zarr"
    ),
    actions: Annotated[Path, typer.Option(help="Actions store.")] = Path("data/actions.zarr"),
    output: Annotated[Path, typer.Option(help="Report folder.")] = Path("reports/eval"),
    device: Annotated[str, typer.Option(help="auto (cuda, then mps, then cpu) or a torch device.")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Predict the future of validation sequences, score it against the frames and the trivial baselines,
    measure action following (true and mirrored actions) and draw strips, GIFs and unconditional samples."""
    try:
        sample, evaluation = config.load("sample", params), config.load("eval", params)
        data, tracking = config.load("data", params), config.load("actions", params)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = evaluate(
                checkpoint, tokens, frames, actions, sample, evaluation, data, output,
                device=resolve_device(device), tracking=tracking, progress=progress,
            )  # fmt: skip
    except (config.ConfigError, CheckpointError, StoreError, ValueError, OSError, RuntimeError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    for warning in caught:
        typer.echo(f"warning: {warning.message}", err=True)
    model, copy = result["model"], result["copy_last"]
    typer.echo(
        f"{output}: {result['sequences']} sequences, model MSE {model['mse']:.5f} SSIM {model['ssim']:.4f} | "
        f"copy-last MSE {copy['mse']:.5f} SSIM {copy['ssim']:.4f} | "
        f"beats copy-last: {result['model_vs_copy_last']['beats']}"
    )


if __name__ == "__main__":
    typer.run(main)
