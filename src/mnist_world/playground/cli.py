"""`mnist-world`: the playground's commands. `play` serves the page; `replay` turns a recording back into
its frames. Defaults come from params.yaml (split, decoding and sampling), the tracker's settings from the
action store, as in the stages.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, NoReturn

import numpy as np
import torch
import typer
from PIL import Image, ImageSequence

from mnist_world import config
from mnist_world.core.devices import resolve_device
from mnist_world.playground.dreamer import SamplerSettings
from mnist_world.playground.recording import Recording, animation_gif, replay
from mnist_world.playground.server import Playground, PlaySettings, make_server
from mnist_world.playground.world import ValidationData, load_world

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False)

Checkpoint = Annotated[Path, typer.Option(help="The checkpoint to play.")]
Tokens = Annotated[Path, typer.Option(help="Token store.")]
Frames = Annotated[Path, typer.Option(help="Frame store (the continuous truth).")]
Actions = Annotated[Path, typer.Option(help="Action store (the true moves).")]
Params = Annotated[Path, typer.Option(help="Params file: data, tokens and sample are read.")]
Device = Annotated[str, typer.Option(help="cpu, cuda, mps or auto (cuda, then mps, then cpu).")]
# One thread by default: on a busy 2-core CPU two threads per frame wait on each other (a patch-4 frame took
# 0.13 s on one thread, 0.9 s on two; benchmarks/playground_latency.py), and tabs then dream side by side.
# Replay uses the same count, since another thread count may round differently and sample other tokens.
Threads = Annotated[int, typer.Option(min=1, help="torch CPU threads (play and replay must agree).")]
Sections = tuple[config.DataConfig, config.TokensConfig, config.SampleConfig]


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _params(path: Path) -> Sections:
    try:
        return tuple(config.load(section, path) for section in ("data", "tokens", "sample"))
    except config.ConfigError as error:
        _fail(str(error))


@app.command()
def play(
    checkpoint: Checkpoint = Path("models/best.pt"),
    tokens: Tokens = Path("data/tokens.zarr"),
    frames: Frames = Path("data/frames.zarr"),
    actions: Actions = Path("data/actions.zarr"),
    params: Params = Path("params.yaml"),
    sequence: Annotated[
        int | None, typer.Option(help="First validation sequence shown [default: the first].")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed [default: sample.seed].")] = None,
    steps: Annotated[
        int | None, typer.Option(min=1, help="Unmasking iterations per frame [sample.steps].")
    ] = None,
    temperature: Annotated[
        float | None, typer.Option(min=0, help="Initial temperature [sample.temperature].")
    ] = None,
    guidance: Annotated[float | None, typer.Option(min=0, help="Guidance weight [sample.guidance].")] = None,
    keep: Annotated[
        int | None, typer.Option(min=1, help="Frames kept when the context slides [past frames].")
    ] = None,
    step_px: Annotated[
        float | None, typer.Option(min=0, help="Pixels per arrow step [the data's median].")
    ] = None,
    device: Device = "cpu",
    threads: Threads = 1,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: a free one).")] = 0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every request and frame.")] = False,
) -> None:
    """Serve the playground page: steer the ego digit with the arrow keys while the model dreams."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(threads)
    data, token_config, sample = _params(params)
    try:
        sampler = SamplerSettings(
            steps=sample.steps if steps is None else steps,
            temperature=sample.temperature if temperature is None else temperature,
            guidance=sample.guidance if guidance is None else guidance,
            choice_temperature=sample.choice_temperature,
        )
        resolved = str(resolve_device(device))
    except ValueError as error:
        _fail(str(error))
    settings = PlaySettings(
        checkpoint=str(checkpoint),
        tokens=str(tokens),
        frames=str(frames),
        actions=str(actions),
        train_sequences=data.train_sequences,
        val_sequences=data.val_sequences,
        decode=token_config.decode,
        sequence=sequence,
        seed=sample.seed if seed is None else seed,
        sampler=sampler,
        keep=keep,
        step_px=step_px,
        device=resolved,
    )
    _serve(Playground(settings), host, port)


def _serve(playground: Playground, host: str, port: int) -> None:
    """Serve until Ctrl-C."""
    server = make_server(playground, host, port)
    typer.echo(f"mnist-world playground on {server.url} (Ctrl-C stops it)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        typer.echo("stopped")
    finally:
        server.server_close()


def gif_frames(path: Path) -> np.ndarray:
    """Every frame of a GIF as RGB (N, H, W, 3) uint8."""
    with Image.open(path) as image:
        return np.stack([np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(image)])


@app.command("replay")
def replay_command(
    recording: Annotated[Path, typer.Argument(help="Actions JSON downloaded from the page.")],
    output: Annotated[Path, typer.Option(help="Where the replayed GIF goes.")] = Path("replay.gif"),
    compare: Annotated[
        Path | None, typer.Option(help="A GIF from the page: exit 1 unless it matches.")
    ] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="[default: the recording's checkpoint]")] = None,
    tokens: Tokens = Path("data/tokens.zarr"),
    frames: Frames = Path("data/frames.zarr"),
    actions: Actions = Path("data/actions.zarr"),
    params: Params = Path("params.yaml"),
    device: Device = "cpu",
    threads: Threads = 1,
) -> None:
    """Play a recording's actions again from its start: the same seed gives the same frames."""
    torch.set_num_threads(threads)
    data, token_config, _ = _params(params)
    try:
        played = Recording.from_json(json.loads(recording.read_text()))
        stores = ValidationData(
            tokens, frames, actions, data.train_sequences, data.val_sequences, token_config.decode
        )
        world = load_world(checkpoint or played.checkpoint, stores, resolve_device(device))
        session = replay(played, world)
    except (OSError, ValueError) as error:  # PlaygroundError and JSON errors are ValueErrors
        _fail(str(error))
    output.write_bytes(animation_gif(session))
    typer.echo(f"{output}: {len(session.played)} frames dreamed after {world.past_frames} given")
    if compare is not None:
        same = np.array_equal(gif_frames(output), gif_frames(compare))
        typer.echo(f"{'same frames as' if same else 'frames differ from'} {compare}")
        if not same:
            raise typer.Exit(1)


if __name__ == "__main__":
    app()
