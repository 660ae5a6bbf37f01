"""`mnist-world`: the playground's commands. `play` serves the page; `replay` turns a recording back into
its frames; `screenshot` pictures a running page. Defaults come from params.yaml (split, decoding and
sampling), the tracker's settings from the action store, as in the stages.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Annotated, NoReturn

import numpy as np
import torch
import typer
from PIL import Image, ImageSequence

from mnist_world import config
from mnist_world.core.devices import resolve_device
from mnist_world.playground.dreamer import SamplerSettings
from mnist_world.playground.protocol import read_json
from mnist_world.playground.recording import Recording, animation_gif, replay
from mnist_world.playground.server import Playground, PlaySettings, is_loopback, make_server
from mnist_world.playground.world import PlaygroundError, ValidationData, load_world

# Plain help text: the options name their defaults in brackets, which rich markup would drop as tags.
app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False, rich_markup_mode=None)

Checkpoint = Annotated[Path, typer.Option(help="The checkpoint to play.")]
Tokens = Annotated[Path, typer.Option(help="Token store.")]
Frames = Annotated[Path, typer.Option(help="Frame store (the continuous truth).")]
Actions = Annotated[Path, typer.Option(help="Action store (the true moves).")]
Params = Annotated[Path, typer.Option(help="Params file: data, tokens and sample are read.")]
Device = Annotated[str, typer.Option(help="cpu, cuda, mps or auto (cuda, then mps, then cpu).")]
# One thread by default: on a busy 2-core CPU two threads per frame wait on each other (a patch-4 frame took
# 0.13 s on one thread, 0.9 s on two; benchmarks/playground_latency.py); the cores are used by one dreaming
# worker each (`--workers`), side by side.
# Replay uses the same count, since another thread count may round differently and sample other tokens.
Threads = Annotated[int, typer.Option(min=1, help="torch CPU threads (play and replay must agree).")]
MAX_RECORDING_BYTES = 64 * 1024 * 1024  # a recording's frames at their bound take about 8 MB
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
    checkpoint: Annotated[
        list[Path] | None,
        typer.Option(help="A checkpoint the page may play; repeat for more, the first is the default."),
    ] = None,
    models: Annotated[
        Path, typer.Option(help="Every *.pt in this folder is offered too (a page chooses, never a path).")
    ] = Path("models"),
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
    action_guidance: Annotated[
        float | None, typer.Option(min=0, help="Guidance weight on the actions [sample.action_guidance].")
    ] = None,
    keep: Annotated[
        int | None, typer.Option(min=1, help="Frames kept when the context slides [past frames].")
    ] = None,
    step_px: Annotated[
        float | None, typer.Option(min=0, help="Pixels per arrow step [the data's median].")
    ] = None,
    device: Device = "cpu",
    threads: Threads = 1,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1, help="Threads dreaming the pages' frames [on a CPU: its cores // --threads; else 1]."
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (not loopback: reachable by others).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: a free one).")] = 0,
    allow_host: Annotated[
        list[str] | None,
        typer.Option(help="A name the page is reached by besides the address (Host header); repeatable."),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every request and frame.")] = False,
) -> None:
    """Serve the playground page: steer the ego digit with the arrow keys while the model dreams."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(threads)
    data, token_config, sample = _params(params)
    try:
        given = {"steps": steps, "temperature": temperature, "guidance": guidance}
        given["action_guidance"] = action_guidance
        sampler = SamplerSettings.from_config(sample, **{k: v for k, v in given.items() if v is not None})
        resolved = str(resolve_device(device))
    except ValueError as error:
        _fail(str(error))
    if workers is None:
        workers = max(1, len(os.sched_getaffinity(0)) // threads) if resolved == "cpu" else 1
    checkpoints = [str(path) for path in checkpoint or [Path("models/best.pt")]]
    settings = PlaySettings(
        checkpoint=checkpoints[0],
        checkpoints=tuple(checkpoints[1:]),
        models=str(models),
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
        workers=workers,
    )
    if not is_loopback(host):
        typer.echo(
            f"warning: listening on {host}, not loopback: anyone who can reach this machine can play, and "
            "load any checkpoint it offers",
            err=True,
        )
    _serve(Playground(settings), host, port, tuple(allow_host or ()))


def _serve(playground: Playground, host: str, port: int, allowed_hosts: tuple[str, ...]) -> None:
    """Serve until Ctrl-C."""
    try:
        server = make_server(playground, host, port, allowed_hosts=allowed_hosts)
    except OSError as error:
        _fail(f"cannot listen on {host}:{port}: {error.strerror or error}")
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
        if recording.stat().st_size > MAX_RECORDING_BYTES:
            _fail(f"{recording}: {recording.stat().st_size} bytes is larger than any recording")
        played = Recording.from_json(read_json(recording.read_bytes()))
    except OSError as error:
        _fail(f"{recording}: {error.strerror or error}")
    except PlaygroundError as error:
        _fail(f"{recording}: {error}")
    chosen = checkpoint or Path(played.checkpoint)
    typer.echo(f"checkpoint: {chosen} ({'--checkpoint' if checkpoint else 'named by the recording'})")
    if not chosen.is_file():
        hint = "" if checkpoint else " (pass --checkpoint where it is)"
        _fail(f"{recording}: the checkpoint {chosen} does not exist{hint}")
    try:
        stores = ValidationData(
            tokens, frames, actions, data.train_sequences, data.val_sequences, token_config.decode
        )
        world = load_world(chosen, stores, resolve_device(device))
        session = replay(played, world)
    except (OSError, ValueError) as error:  # PlaygroundError is a ValueError
        _fail(str(error))
    output.write_bytes(animation_gif(session))
    typer.echo(f"{output}: {len(session.played)} frames dreamed after {world.past_frames} given")
    if compare is not None:
        same = np.array_equal(gif_frames(output), gif_frames(compare))
        typer.echo(f"{'same frames as' if same else 'frames differ from'} {compare}")
        if not same:
            raise typer.Exit(1)


KEYS = ("ArrowLeft", "ArrowRight", "ArrowUp", "ArrowDown")


@app.command()
def screenshot(
    url: Annotated[str, typer.Argument(help="The page, as `mnist-world play` printed it.")],
    output: Annotated[Path, typer.Argument(help="Where the PNG goes.")],
    frames: Annotated[int, typer.Option(min=1, help="Dreamed frames before the picture.")] = 4,
    hold: Annotated[str | None, typer.Option(help="A key held while dreaming (ArrowRight...).")] = None,
    truth: Annotated[bool, typer.Option(help="Show the true future beside the dream.")] = True,
    iteration: Annotated[int, typer.Option(min=1, help="The unmasking iteration shown in large.")] = 4,
    chromium: Annotated[str, typer.Option(help="The browser to drive.")] = "chromium",
    width: int = 1500,
) -> None:
    """A picture of a running playground (docs/playground.png): Chromium steps the page paused, frame by
    frame, with every view on. Needs the dev extra (Playwright), and drives Debian's chromium."""
    from playwright.sync_api import sync_playwright  # the dev extra: only this command needs it

    executable = shutil.which(chromium)
    if executable is None:
        raise typer.BadParameter(f"no {chromium} on the PATH (apt-get install chromium)")
    if hold is not None and hold not in KEYS:
        raise typer.BadParameter(f"--hold {hold}: one of {', '.join(KEYS)}")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": width, "height": 900})
        page.goto(url.rstrip("/") + "/?paused")
        page.wait_for_function("window.playground.session", timeout=60_000)
        boxes = ["#show-expected", "#show-confidence", "#show-unmasking", *(["#show-truth"] if truth else [])]
        for box in boxes:
            page.check(box)
        given = page.evaluate("window.playground.frames.length")
        if hold:
            page.keyboard.down(hold)
        for count in range(given + 1, given + frames + 1):
            page.click("#step")
            page.wait_for_function(f"window.playground.frames.length >= {count}", timeout=60_000)
        if hold:
            page.keyboard.up(hold)
        page.fill("#iteration", str(iteration))
        page.screenshot(path=str(output), full_page=True)
        error = page.evaluate("window.playground.error")
        browser.close()
    typer.echo(f"{output}: {frames} frames dreamed{'; the page says: ' + error if error else ''}")


if __name__ == "__main__":
    app()
