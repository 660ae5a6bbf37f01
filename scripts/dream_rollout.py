"""A long dream as the playground dreams it: does the world keep its digits, and do held arrows steer the ego
digit?

From the given frames of validation sequences, `frames` frames are dreamed one at a time with the context
sliding (the playground's `Dreamer` and the params' sampler), under arrows held `hold` frames each, turning
right, down, left, up in turn; an arrow step is the playground's (the validation split's median move). Two
numbers per sequence:
- ink kept: the last dreamed frame's ink (sum of its pixels) over the mean ink of the given frames;
- arrow following: per hold, the ego digit's tracked displacement along the held arrow over the commanded
  distance (1: moved as commanded; 0: did not move that way), where the tracker finds the digit at both ends
  of the hold (the evaluation's tracker, the ink-in-its-box presence test); a hold where it is lost counts 0.

    python scripts/dream_rollout.py models/best.pt --sequences 16
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer

from mnist_world import config
from mnist_world.evaluation.action_following import PRESENCE, Tracker, box_ink
from mnist_world.model.sampling import new_generator
from mnist_world.playground.dreamer import Dreamer, SamplerSettings
from mnist_world.playground.world import ValidationData, World, load_world

ARROWS = np.array([(1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0)])  # right, down, left, up (x, y)


def commands(frames: int, hold: int, step: float) -> np.ndarray:
    """(frames, 2) actions: each arrow of ARROWS held `hold` frames, in turn, `step` action units a frame."""
    return np.stack([ARROWS[(index // hold) % len(ARROWS)] * step for index in range(frames)])


def dream(
    world: World, sequence: int, actions: np.ndarray, settings: SamplerSettings, seed: int
) -> np.ndarray:
    """Pixels (P + F, H, W): the sequence's P given frames, then F dreamed under `actions` (F, 2)."""
    given = world.data.sequence(sequence)
    past = world.past_frames
    tokens = torch.from_numpy(given.tokens[:past]).to(world.device)
    dreamer = Dreamer(world.model, tokens, torch.from_numpy(given.actions[:past]).to(world.device), keep=past)
    generator = new_generator(seed, world.device)
    dreamed = [dreamer.next_frame(torch.from_numpy(action), settings, generator) for action in actions]
    return world.data.to_pixels(np.concatenate([given.tokens[:past], torch.stack(dreamed).cpu().numpy()]))


def arrow_following(
    tracker: Tracker, frames: np.ndarray, actions: np.ndarray, hold: int, past: int
) -> list[float]:
    """Per hold, the ego digit's displacement along the arrow over the commanded distance (0 where lost):
    frames (P + F, H, W) in [0, 1], the first `past` given; actions (F, 2) of the dreamed ones."""
    size = frames.shape[-1]
    track = tracker.track(frames[None])
    if track.reference[0] < 0:  # the digits never stand apart: the ego digit is unknown
        return [0.0] * (len(actions) // hold)
    centre = track.centre[0]  # (T, 2) pixels
    ink = box_ink(frames[None], track.centre, tracker.box(size))[0]  # (T,)
    found = ink >= PRESENCE * np.median(ink[:past])
    scores = []
    for start in range(0, len(actions) - hold + 1, hold):
        first, last = past + start - 1, past + start + hold - 1  # the frame before the hold, its last frame
        commanded = actions[start : start + hold].sum(axis=0) * size / 2  # pixels
        moved = centre[last] - centre[first]
        along = float(moved @ commanded / (commanded @ commanded))
        scores.append(along if found[first] and found[last] else 0.0)
    return scores


def main(
    checkpoint: Path,
    params: Annotated[Path, typer.Option(help="The sampler and the split.")] = Path("params.yaml"),
    sequences: Annotated[int, typer.Option(help="Validation sequences dreamed, from the first.")] = 16,
    frames: Annotated[int, typer.Option(help="Frames dreamed per sequence.")] = 60,
    hold: Annotated[int, typer.Option(help="Frames each arrow is held.")] = 5,
    output: Annotated[Path | None, typer.Option(help="JSON file for the figures.")] = None,
    tokens: Annotated[Path, typer.Option(help="Token store.")] = Path("data/tokens.zarr"),
    frames_store: Annotated[Path, typer.Option("--frames-store", help="Frames store.")] = Path(
        "data/frames.zarr"
    ),
    actions: Annotated[Path, typer.Option(help="Action store.")] = Path("data/actions.zarr"),
) -> None:
    torch.set_num_threads(1)
    data_config, tokens_config, sample = (config.load(name, params) for name in ("data", "tokens", "sample"))
    data = ValidationData(
        tokens,
        frames_store,
        actions,
        data_config.train_sequences,
        data_config.val_sequences,
        tokens_config.decode,
    )
    world = load_world(checkpoint, data)
    settings = SamplerSettings.from_config(sample)
    arrows = commands(frames, hold, data.typical_step).astype(np.float32)
    kept, following = [], []
    for sequence in range(data.rows.start, data.rows.start + sequences):
        pixels = dream(world, sequence, arrows, settings, seed=sample.seed + sequence)
        kept.append(float(pixels[-1].sum() / pixels[: world.past_frames].sum(axis=(1, 2)).mean()))
        following.append(arrow_following(data.tracker, pixels, arrows, hold, world.past_frames))
    result = {
        "checkpoint": str(checkpoint),
        "sequences": sequences,
        "frames": frames,
        "hold": hold,
        "ink_kept_last_frame": {"median": float(np.median(kept)), "mean": float(np.mean(kept))},
        "ink_kept_per_sequence": kept,
        "arrow_following": {
            "mean": float(np.mean(following)),
            "median_per_hold": float(np.median(following)),
            "share_at_least_half": float(np.mean(np.asarray(following) >= 0.5)),
        },
    }
    typer.echo(json.dumps({key: value for key, value in result.items() if key != "ink_kept_per_sequence"}))
    if output is not None:
        output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    typer.run(main)
