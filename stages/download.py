"""Stage `download`: produce data/raw.zarr from the `data` params (generate, download, or a local file)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from mnist_world import cli, config
from mnist_world.core.atomic import check_writable
from mnist_world.core.store import open_array
from mnist_world.data.sources import build_raw_store


def main(
    params: cli.ParamsFile = cli.PARAMS,
    output: Annotated[Path, typer.Option(help="Raw frame store to write (replaced atomically).")] = Path(
        "data/raw.zarr"
    ),
    progress: cli.Progress = True,
) -> None:
    """Write the raw Moving MNIST frames, uint8 (sequence, time, H, W), to a zarr store.

    Reads params `data`.
    data.source=generate: bouncing MNIST drawn from real digits, with ground-truth trajectories.
    data.source=url: the canonical file, downloaded to data.path (resumable, checksummed), converted.
    data.source=file: a local time-first .npy file at data.path, converted.
    """
    started = time.perf_counter()
    data = config.load("data", params)
    check_writable(output)
    build_raw_store(data, output, progress=progress)
    count, length, height, width = open_array(output, "frames", ndim=4).shape
    typer.echo(
        f"{output}: {count} sequences of {length} frames {height}x{width} from '{data.source}' "
        f"in {time.perf_counter() - started:.1f} s"
    )


if __name__ == "__main__":
    cli.run(main)
