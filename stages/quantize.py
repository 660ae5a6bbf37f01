"""Stage `quantize`: data/frames.zarr -> data/tokens.zarr (uniform bins, each level's mean intensity over the
training split) and the quantization floor."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from mnist_world import cli, config
from mnist_world.core.atomic import atomic_paths, check_writable, write_json
from mnist_world.data.tokens import build_token_store


def main(
    params: cli.ParamsFile = cli.PARAMS,
    frames: Annotated[Path, typer.Option(help="Frame store to read.")] = Path("data/frames.zarr"),
    output: Annotated[Path, typer.Option(help="Token store to write (replaced atomically).")] = Path(
        "data/tokens.zarr"
    ),
    report: Annotated[Path, typer.Option(help="Quantization floor (DVC metric).")] = Path(
        "reports/quantize.json"
    ),
    progress: cli.Progress = True,
) -> None:
    """Quantize the frames into tokens.levels uniform bins; report the error of the decoded tokens.

    Reads params `tokens.levels` and `data` (sequences_per_shard, train_sequences: the bins' means).
    """
    started = time.perf_counter()
    tokens = config.load("tokens", params)
    data = config.load("data", params)
    check_writable(output, report)
    with atomic_paths(output, report) as (store, summary_path):  # both replaced together, or neither
        floor = build_token_store(
            frames, store, tokens.levels, data.sequences_per_shard, data.train_sequences, progress=progress
        )
        write_json(summary_path, floor)
    mean, centre = floor["quantization"]["mean"], floor["quantization"]["centre"]
    typer.echo(
        f"{output}: {tokens.levels} levels, quantization floor MSE {mean['mse']:.3g} decoding to bin means "
        f"({centre['mse']:.3g} to bin centres) in {time.perf_counter() - started:.1f} s"
    )


if __name__ == "__main__":
    cli.run(main)
