"""Stage `quantize`: data/frames.zarr -> data/tokens.zarr (uniform bins) and the quantization floor."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from mnist_world import config
from mnist_world.store import StoreError, write_json
from mnist_world.tokens import build_token_store


def main(
    params: Annotated[Path, typer.Option(help="Params file; `tokens` and `data` are read.")] = Path(
        "params.yaml"
    ),
    frames: Annotated[Path, typer.Option(help="Frame store to read.")] = Path("data/frames.zarr"),
    output: Annotated[Path, typer.Option(help="Token store to write (replaced atomically).")] = Path(
        "data/tokens.zarr"
    ),
    report: Annotated[Path, typer.Option(help="Quantization floor (DVC metric).")] = Path(
        "reports/quantize.json"
    ),
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Quantize the frames into tokens.levels uniform bins; report the error of the decoded tokens."""
    started = time.perf_counter()
    try:
        tokens = config.load("tokens", params)
        data = config.load("data", params)
        floor = build_token_store(frames, output, tokens.levels, data.sequences_per_shard, progress=progress)
        write_json(report, floor)
    except (config.ConfigError, StoreError, ValueError, OSError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    psnr = floor["quantization_psnr"]
    typer.echo(
        f"{output}: {tokens.levels} levels, quantization floor MSE {floor['quantization_mse']:.3g} "
        f"(PSNR {'exact' if psnr is None else f'{psnr:.2f} dB'}) in {time.perf_counter() - started:.1f} s"
    )


if __name__ == "__main__":
    typer.run(main)
