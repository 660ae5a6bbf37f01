"""Stage `downsample`: data/raw.zarr -> data/frames.zarr, float32 frames in [0, 1] at the token resolution."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from mnist_world import cli, config
from mnist_world.core.atomic import check_writable
from mnist_world.data.frames import build_frames_store


def main(
    params: cli.ParamsFile = cli.PARAMS,
    raw: Annotated[Path, typer.Option(help="Raw frame store to read.")] = Path("data/raw.zarr"),
    output: Annotated[Path, typer.Option(help="Frame store to write (replaced atomically).")] = Path(
        "data/frames.zarr"
    ),
    progress: cli.Progress = True,
) -> None:
    """Downsample the raw uint8 frames to tokens.frame_size with tokens.downsample (area or bilinear).

    Reads params `tokens` (frame_size, downsample) and `data.sequences_per_shard`.
    """
    started = time.perf_counter()
    tokens = config.load("tokens", params)
    data = config.load("data", params)
    check_writable(output)
    attributes = build_frames_store(raw, output, tokens, data.sequences_per_shard, progress=progress)
    size = attributes["frame_size"]
    typer.echo(
        f"{output}: {attributes['canvas']}x{attributes['canvas']} -> {size}x{size} frames "
        f"({attributes['method']}) in {time.perf_counter() - started:.1f} s"
    )


if __name__ == "__main__":
    cli.run(main)
