"""Playground latency: the time from a step request to its frame, and the frames per second it allows, through
the playground's own session (dreaming the frame, decoding it, tracking the ego digit for the overlay).

    python benchmarks/playground_latency.py [--checkpoint models/best.pt] [--patch-sizes 1,4] [--steps 20]
                                            [--frames 24] [--threads 1,2] [--params params.yaml]
    python benchmarks/playground_latency.py --arrows --checkpoint models/best.pt [--sequences 16] [--hold 5]

Without --checkpoint it times the model shape of params.yaml's `model` section (128 dims, 2 layers, 4 heads)
on the stores' tokens and frames (20 frames, 10 given) with random weights, once per patch size (which
replaces the section's): the cost of a frame does not depend on what the weights have learned. Each run
dreams --frames frames one at a time under changing actions, so the context fills the model's frames and
slides, as it does on the page; every frame is decoded and the ego digit tracked for the overlay, with the
tracker settings the action store records. The stores must exist (`dvc repro actions`); the steps and the
temperature come from params.yaml's `sample` section, the playground's defaults.

With --arrows it times nothing and measures instead how far the ego digit moves per arrow press: for
--sequences validation sequences spread over the split, each arrow (and "still", no key) is held for --hold
frames after the given past, one arrow step being the page's default (the data's median move), and the
overlay's tracker (`LiveTrack`: the given frames tracked whole, then each new frame searched as it comes)
follows the ego digit's centre through the given and dreamed frames. Per frame it
reports the move along the commanded axis, its ratio to the commanded step, the same net of "still" on the
same sequence (what the arrow adds to the digit's own motion), and the perpendicular drift, in pixels of the
tokens. The true frames under the dataset's own actions are the tracker's reference.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer

from mnist_world import config
from mnist_world.model.network import Architecture, build_model
from mnist_world.playground.dreamer import SamplerSettings
from mnist_world.playground.protocol import StepRequest
from mnist_world.playground.session import Session
from mnist_world.playground.world import PlaygroundError, ValidationData, World, load_world

TARGET_S = 0.5  # the playground's promise: the next frame within half a second
PAST = 10
MOVES = [(0.11, 0.0), (0.11, 0.0), (0.0, 0.0), (0.0, -0.11), (-0.08, 0.08)]
# The page's arrow keys as unit directions (x, y); y grows downward.
ARROWS = {"right": (1.0, 0.0), "left": (-1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}


def untrained(data: ValidationData, model: config.ModelConfig, patch_size: int) -> World:
    """The params' model shape with random weights at `patch_size`."""
    model = dataclasses.replace(model, patch_size=patch_size)
    arch = Architecture.from_config(model, data.vocabulary.levels, data.frame_size, data.length)
    torch.manual_seed(0)
    name = f"untrained, patch_size={patch_size}"
    return World(build_model(arch).eval(), data, PAST, name, torch.device("cpu"))


def timed_run(world: World, sequence: int, settings: SamplerSettings, frames: int) -> dict:
    """Latencies of `frames` steps after two warm-up steps: whole step (what the page waits for) and the
    model's share of it."""
    session = Session(world, sequence, seed=0, settings=settings, overlay=True)
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


def held_moves(
    world: World,
    sequence: int,
    settings: SamplerSettings,
    action: tuple[float, float],
    hold: int,
) -> np.ndarray | None:
    """The ego digit's tracked moves (hold, 2) in pixels, (dx, dy) per frame, while `action` is held for
    `hold` frames after the given past; None when no frame shows the ego digit apart from the others."""
    session = Session(world, sequence, seed=0, settings=settings, overlay=True)
    if session.live is None:
        return None
    for _ in range(hold):
        session.step(StepRequest("arrows", len(session.frames), action, settings.temperature, False))
    return np.diff(np.stack(session.live.centres[-(hold + 1) :]), axis=0)  # the overlay the page draws


def true_moves(world: World, sequence: int, hold: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The ego digit's tracked moves (hold, 2) on the true frames after the given past, and the dataset's
    actions for them in pixels; None when the tracker cannot tell the ego digit apart."""
    data, past = world.data, world.past_frames
    truth = data.sequence(sequence)
    pixels = data.to_pixels(truth.tokens[: past + hold])  # what the model was given, continued truly
    live = data.tracker.live(pixels[:past])  # followed frame by frame, as the page's overlay is
    if live is None:
        return None
    centres = [live.add(data.tracker.pixels(frame)) for frame in pixels[past:]]
    moves = np.diff(np.stack([live.centres[past - 1], *centres]), axis=0)
    return moves, truth.actions[past : past + hold] * data.frame_size / 2


def arrow_table(world: World, settings: SamplerSettings, sequences: int, hold: int) -> None:
    """Print the ego digit's move per frame along and across each held arrow, against the commanded step."""
    data = world.data
    half = data.frame_size / 2  # an action is a move over half the frame
    step = data.typical_step  # the page's default arrow step, in action units
    rows = data.rows[:: max(1, len(data.rows) // sequences)][:sequences]
    keys: dict[str, tuple[float, float]] = {"still": (0.0, 0.0), **ARROWS}
    moves: dict[str, dict[int, np.ndarray]] = {key: {} for key in keys}
    for sequence in rows:
        for key, (ux, uy) in keys.items():
            found = held_moves(world, sequence, settings, (step * ux, step * uy), hold)
            if found is not None:
                moves[key][sequence] = found
    typer.echo(
        f"{world.checkpoint}: {len(rows)} validation sequences ({rows.start}..{rows[-1]}), each key held "
        f"{hold} frames after {world.past_frames} given, seed 0, temperature {settings.temperature}, "
        f"{settings.steps} steps; {data.frame_size}x{data.frame_size} pixels, one arrow step "
        f"{step * half:.2f} px; moves per frame, in pixels"
    )
    typer.echo(
        "| key | command | along the command | along / command | along, net of still | net / command "
        "| perpendicular drift (mean abs) | mean move (dx, dy) | sequences tracked |"
    )
    typer.echo("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    still = moves["still"]
    for key, direction in keys.items():
        tracked = moves[key]
        if not tracked:
            typer.echo(f"| {key} | | | | | | | | 0 |")
            continue
        stacked = np.stack(list(tracked.values()))  # (S, hold, 2)
        mean = stacked.reshape(-1, 2).mean(axis=0)
        speed = np.linalg.norm(stacked, axis=-1).mean()
        if key == "still":
            typer.echo(
                f"| still | 0 | | | | | {speed:.2f} (mean speed) | ({mean[0]:+.2f}, {mean[1]:+.2f}) "
                f"| {len(tracked)} |"
            )
            continue
        unit = np.array(direction)
        along = stacked @ unit
        across = np.abs(stacked @ np.array([-unit[1], unit[0]]))
        paired = [sequence for sequence in tracked if sequence in still]
        net = np.mean([(tracked[s] - still[s]) @ unit for s in paired]) if paired else float("nan")
        command = step * half
        typer.echo(
            f"| {key} | {command:.2f} | {along.mean():+.2f} | {along.mean() / command:+.2f} | {net:+.2f} "
            f"| {net / command:+.2f} | {across.mean():.2f} | ({mean[0]:+.2f}, {mean[1]:+.2f}) "
            f"| {len(tracked)} |"
        )
    along, across, commands = [], [], []
    for sequence in rows:
        found = true_moves(world, sequence, hold)
        if found is None:
            continue
        moved, commanded = found
        length = np.linalg.norm(commanded, axis=-1)
        unit = commanded / np.where(length > 0, length, 1.0)[:, None]
        keep = length > 0
        along.append((moved * unit).sum(axis=-1)[keep])
        across.append(np.abs(moved[:, 0] * unit[:, 1] - moved[:, 1] * unit[:, 0])[keep])
        commands.append(length[keep])
    if commands:
        along_all, command_all = np.concatenate(along), np.concatenate(commands)
        typer.echo(
            f"| true frames, the dataset's actions | {command_all.mean():.2f} | {along_all.mean():+.2f} | "
            f"{along_all.mean() / command_all.mean():+.2f} | | | {np.concatenate(across).mean():.2f} | | "
            f"{len(commands)} |"
        )


def describe(seconds: list[float]) -> str:
    ordered = sorted(seconds)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return f"median {statistics.median(seconds):.3f} s, p90 {p90:.3f} s, max {ordered[-1]:.3f} s"


def main(
    checkpoint: Annotated[
        Path | None, typer.Option(help="Time this checkpoint instead of random weights.")
    ] = None,
    patch_sizes: Annotated[str, typer.Option(help="Patch sizes of the random-weight model.")] = "1,4",
    steps: Annotated[
        int | None, typer.Option(help="Unmasking iterations per frame (default: sample.steps).")
    ] = None,
    frames: Annotated[int, typer.Option(help="Frames timed per run (after two warm-up frames).")] = 24,
    threads: Annotated[str, typer.Option(help="torch CPU thread counts to try, comma-separated.")] = "1,2",
    params: Annotated[
        Path, typer.Option(help="Params file: data, tokens, model and sample are read.")
    ] = Path("params.yaml"),
    tokens: Annotated[Path, typer.Option(help="Token store.")] = Path("data/tokens.zarr"),
    frames_store: Annotated[Path, typer.Option("--frames-store", help="Frame store.")] = Path(
        "data/frames.zarr"
    ),
    actions: Annotated[Path, typer.Option(help="Action store.")] = Path("data/actions.zarr"),
    arrows: Annotated[
        bool,
        typer.Option(
            "--arrows", help="Measure the ego digit's move per arrow press instead (needs --checkpoint)."
        ),
    ] = False,
    sequences: Annotated[
        int, typer.Option(min=1, help="--arrows: validation sequences, spread over the split.")
    ] = 16,
    hold: Annotated[
        int, typer.Option(min=1, help="--arrows: frames each key is held after the given past.")
    ] = 5,
) -> None:
    """Print per-frame latency and frames per second for each model and thread count; with --arrows, how far
    the ego digit moves per arrow press."""
    if arrows and checkpoint is None:
        typer.echo("error: --arrows measures a trained model: give --checkpoint", err=True)
        raise typer.Exit(1)
    data_config, token_config = config.load("data", params), config.load("tokens", params)
    model_config, sample = config.load("model", params), config.load("sample", params)
    settings = SamplerSettings.from_config(sample, steps=steps or sample.steps, guidance=0.0)
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
            else [untrained(data, model_config, int(size)) for size in patch_sizes.split(",")]
        )
    except PlaygroundError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    if arrows:
        torch.set_num_threads(int(threads.split(",")[0]))
        arrow_table(worlds[0], settings, sequences, min(hold, data.length - worlds[0].past_frames))
        return
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
            run = timed_run(world, data.rows.start, settings, frames)
            within = sum(seconds <= TARGET_S for seconds in run["whole"]) / len(run["whole"])
            typer.echo(
                f"| {world.checkpoint} | {parameters / 1e6:.2f}M | {count} | {describe(run['whole'])} | "
                f"{statistics.median(run['model']):.3f} s | {len(run['whole']) / sum(run['whole']):.1f} | "
                f"{within:.0%} |"
            )


if __name__ == "__main__":
    typer.run(main)
