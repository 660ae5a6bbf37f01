"""Stage `evaluate`: score a checkpoint on the test split; write reports/eval (metrics, pictures)."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer

from mnist_world import cli, config
from mnist_world.core.atomic import check_writable
from mnist_world.core.devices import resolve_device
from mnist_world.evaluation.evaluate import evaluate


class Split(enum.StrEnum):
    test = "test"
    val = "val"


def main(
    params: cli.ParamsFile = cli.PARAMS,
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint to score.")] = Path("models/best.pt"),
    tokens: Annotated[Path, typer.Option(help="Token store.")] = Path("data/tokens.zarr"),
    frames: Annotated[Path, typer.Option(help="Continuous frames store (the metrics' truth).")] = Path(
        "data/frames.zarr"
    ),
    actions: Annotated[Path, typer.Option(help="Actions store.")] = Path("data/actions.zarr"),
    output: Annotated[Path, typer.Option(help="Report folder.")] = Path("reports/eval"),
    device: Annotated[str, typer.Option(help="auto (cuda, then mps, then cpu) or a torch device.")] = "auto",
    split: Annotated[
        Split, typer.Option(help="test, or val: what tuning reads, leaving the test split unseen.")
    ] = Split.test,
    progress: cli.Progress = True,
) -> None:
    """Predict the future of test sequences (point prediction, sampled futures, the best of them), score it
    against the frames and the trivial baselines, measure action following (true and mirrored actions) and
    draw strips, GIFs and unconditional samples.

    Reads params `sample`, `eval`, `tokens.decode` and `data.test_sequences` (the test split follows the
    checkpoint's training and validation splits). `--split val` scores the first validation sequences
    instead: a setting is tuned on those, so the test split stays unseen.
    """
    sample, evaluation = config.load("sample", params), config.load("eval", params)
    decode = config.load("tokens", params).decode
    test_sequences = config.load("data", params).test_sequences
    check_writable(output / "metrics.json")
    result = evaluate(
        checkpoint, tokens, frames, actions, sample, evaluation, output, test_sequences=test_sequences,
        decode=decode, device=resolve_device(device), progress=progress, split=split.value,
    )  # fmt: skip
    shown = " | ".join(
        f"{method} MSE {result[method]['mse']:.5f} SSIM {result[method]['ssim']:.3f} "
        f"IoU {result[method]['iou']:.3f} ink {result[method]['ink_ratio']:.2f}"
        for method in ("point", "sampled", "best_of_n", "blank", "copy_last", "blurred_last")
        if method in result
    )
    typer.echo(f"{output}: {result['sequences']} {result['split']} sequences: {shown}")


if __name__ == "__main__":
    cli.run(main)
