"""Playground latency: the time from a step request to its frame, and the frames per second it allows, through
the playground's own session (dreaming the frame, decoding it, tracking the ego digit for the overlay).

    python benchmarks/playground_latency.py [--checkpoint models/best.pt] [--patch-sizes 1,4] [--steps 20]
                                            [--frames 24] [--threads 1,2] [--params params.yaml]

Without --checkpoint it times the default model's shape (128 dims, 2 layers, 4 heads, the stores' 32x32
tokens and 20 frames, 10 given) with random weights, once per patch size: the cost of a frame does not depend
on what the weights have learned. Each run dreams --frames frames one at a time under changing actions, so
the context fills the model's frames and slides, as it does on the page. The stores must exist (`dvc repro
actions`); the steps default to params.yaml's sample.steps, the playground's default.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path
from typing import Annotated

import torch
import typer

from mnist_world import config
from mnist_world.model import Architecture, build_model
from mnist_world.playground.dreamer import SamplerSettings
from mnist_world.playground.protocol import StepRequest
from mnist_world.playground.session import Session, Tracker
from mnist_world.playground.world import PlaygroundError, ValidationData, World, load_world

TARGET_S = 0.5  # the playground's promise: the next frame within half a second
PAST = 10
MOVES = [(0.11, 0.0), (0.11, 0.0), (0.0, 0.0), (0.0, -0.11), (-0.08, 0.08)]


def untrained(data: ValidationData, patch_size: int) -> World:
    """The default model's shape with random weights at `patch_size`."""
    fields = {field.name for field in dataclasses.fields(Architecture)}
    if patch_size != 1 and "patch_size" not in fields:
        raise PlaygroundError(f"patch_size={patch_size}: this model has no patch tokens")
    shape = dataclasses.asdict(config.ModelConfig()) | {"patch_size": patch_size}
    geometry = {"levels": data.vocabulary.levels, "frame_size": data.frame_size, "frames": data.length}
    arch = Architecture(**geometry, **{key: value for key, value in shape.items() if key in fields})
    torch.manual_seed(0)
    name = f"untrained, patch_size={patch_size}"
    return World(build_model(arch).eval(), data, PAST, name, torch.device("cpu"))


def timed_run(world: World, sequence: int, settings: SamplerSettings, tracker: Tracker, frames: int) -> dict:
    """Latencies of `frames` steps after two warm-up steps: whole step (what the page waits for) and the
    model's share of it."""
    session = Session(world, sequence, seed=0, settings=settings, tracker=tracker)
    whole, model = [], []
    for index in range(frames + 2):
        request = StepRequest(
            "bench", len(session.frames), MOVES[index % len(MOVES)], settings.temperature, False
        )
        started = time.perf_counter()
        message = session.step(request)
        if index >= 2:
            whole.append(time.perf_counter() - started)
            model.append(message["generation_ms"] / 1000)
    return {"whole": whole, "model": model}


def describe(seconds: list[float]) -> str:
    ordered = sorted(seconds)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return f"median {statistics.median(seconds):.3f} s, p90 {p90:.3f} s, max {ordered[-1]:.3f} s"


def main(
    checkpoint: Annotated[
        Path | None, typer.Option(help="Time this checkpoint instead of random weights.")
    ] = None,
    patch_sizes: Annotated[str, typer.Option(help="Patch sizes of the random-weight default model.")] = "1,4",
    steps: Annotated[int | None, typer.Option(help="Unmasking iterations per frame [sample.steps].")] = None,
    frames: Annotated[int, typer.Option(help="Frames timed per run (after two warm-up frames).")] = 24,
    threads: Annotated[str, typer.Option(help="torch CPU thread counts to try, comma-separated.")] = "1,2",
    params: Annotated[
        Path, typer.Option(help="Params file: data, tokens, actions and sample are read.")
    ] = Path("params.yaml"),
    tokens: Annotated[Path, typer.Option(help="Token store.")] = Path("data/tokens.zarr"),
    frames_store: Annotated[Path, typer.Option("--frames-store", help="Frame store.")] = Path(
        "data/frames.zarr"
    ),
    actions: Annotated[Path, typer.Option(help="Action store.")] = Path("data/actions.zarr"),
) -> None:
    """Print per-frame latency and frames per second for each model and thread count."""
    data_config, token_config = config.load("data", params), config.load("tokens", params)
    tracking, sample = config.load("actions", params), config.load("sample", params)
    settings = SamplerSettings(steps=steps or sample.steps, temperature=sample.temperature, guidance=0.0)
    try:
        data = ValidationData(
            tokens,
            frames_store,
            actions,
            data_config.train_sequences,
            data_config.val_sequences,
            token_config.decode,
        )
        worlds = (
            [load_world(checkpoint, data)]
            if checkpoint
            else [untrained(data, int(size)) for size in patch_sizes.split(",")]
        )
    except PlaygroundError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    tracker = Tracker(tracking.threshold, tracking.min_area, data_config.digits)
    typer.echo(
        f"{settings.steps} unmasking steps per frame, {frames} frames per run, "
        f"{data.frame_size}x{data.frame_size} tokens, window {data.length} frames sliding to {PAST}"
    )
    typer.echo(
        "| model | parameters | threads | per frame (page waits) | model share | frames/s | within 0.5 s |"
    )
    typer.echo("| --- | --- | --- | --- | --- | --- | --- |")
    for world in worlds:
        parameters = sum(p.numel() for p in world.model.parameters())
        for count in (int(value) for value in threads.split(",")):
            torch.set_num_threads(count)
            run = timed_run(world, data.rows.start, settings, tracker, frames)
            within = sum(seconds <= TARGET_S for seconds in run["whole"]) / len(run["whole"])
            typer.echo(
                f"| {world.checkpoint} | {parameters / 1e6:.2f}M | {count} | {describe(run['whole'])} | "
                f"{statistics.median(run['model']):.3f} s | {len(run['whole']) / sum(run['whole']):.1f} | "
                f"{within:.0%} |"
            )


if __name__ == "__main__":
    typer.run(main)
