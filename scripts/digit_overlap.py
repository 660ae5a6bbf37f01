"""Which digit a dream loses: per horizon, the share of each digit's true ink that a dream covers, for the ego
digit (the one the actions steer) and the other digits (which bounce, so only the past says where they go).

The dreams are the evaluate stage's: its first sample under the true actions and that sample's twin under
mirrored ones (the same draws; `evaluate.predict`), its point prediction, and copy-last. A digit's ink is
the true frame's ink mask (pixels above the ink IoU's threshold) within the digit's 28x28 box and no other's,
from the box centres the raw store records for generated data (ink where boxes overlap is no digit's); the
ego digit is the one with the most ink, as the action store picks it. Covered: the share of a digit's
ink pixels that are ink in the dream too (a recall; the ink IoU also counts the dream's ink elsewhere).

    python scripts/digit_overlap.py models/best.pt --split val --sequences 128

prints one row per horizon and, with `--output`, writes the figures as JSON.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Annotated

import numpy as np
import pandas as pd
import typer

from mnist_world import cli, config
from mnist_world.config import DIGIT_SIZE
from mnist_world.core.atomic import write_json
from mnist_world.core.metrics import INK_THRESHOLD, baselines
from mnist_world.core.store import StoreError, open_array, open_store
from mnist_world.data.sources import ego_digit
from mnist_world.evaluation.evaluate import Run, Stores, predict
from mnist_world.model.checkpoint import load_model

ANSWERS = ("sampled", "mirrored", "point", "copy_last")


def digit_masks(ink: np.ndarray, centres: np.ndarray, canvas: int) -> np.ndarray:
    """(N, F, D, H, W) each digit's own ink: the ink mask `ink` (N, F, H, W) within the digit's 28x28 box and
    outside every other digit's, the box centres (N, F, D, 2) being (x, y) canvas pixels; a pixel of the H x W
    frame is in a box when its centre is. Ink where boxes overlap belongs to no digit: whose it is, and so
    which digit a dream placed there, cannot be told."""
    size = ink.shape[-1]
    middle = (np.arange(size) + 0.5) * canvas / size  # pixel centres in canvas pixels
    half = DIGIT_SIZE / 2
    inside_x = np.abs(middle - centres[..., 0:1]) < half  # (N, F, D, W)
    inside_y = np.abs(middle - centres[..., 1:2]) < half  # (N, F, D, H)
    boxes = inside_y[..., :, None] & inside_x[..., None, :]  # (N, F, D, H, W)
    alone = boxes & (boxes.sum(axis=2, keepdims=True) == 1)
    return ink[:, :, None] & alone


def covered(predicted: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(N, F, D) the share of each digit's ink pixels (masks (N, F, D, H, W)) that the ink mask `predicted`
    (N, F, H, W) also holds; NaN where a digit has no ink pixel in the frame."""
    hits = (masks & predicted[:, :, None]).sum(axis=(-2, -1))
    total = masks.sum(axis=(-2, -1))
    return np.where(total > 0, hits / np.maximum(total, 1), np.nan)


def ego_and_others(shares: np.ndarray, ink: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The shares (N, F, D) of each sequence's ego digit (the most `ink`, (N, D)) and the mean of the other
    digits', each (N, F)."""
    ego = ego_digit(ink)  # (N,)
    rows = np.arange(len(ego))
    others = np.ones(shares.shape, dtype=bool)
    others[rows, :, ego] = False
    with warnings.catch_warnings():  # a frame where no other digit has ink of its own: NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        other = np.nanmean(np.where(others, shares, np.nan), axis=2)
    return shares[rows, :, ego], other


def main(
    checkpoint: Path,
    params: Annotated[Path, typer.Option(help="The sampler, eval.batch_size and the split sizes.")] = Path(
        "params.yaml"
    ),
    split: Annotated[str, typer.Option(help="test, or val (what tuning reads).")] = "val",
    sequences: Annotated[int, typer.Option(help="Sequences scored, from the split's first.")] = 128,
    output: Annotated[Path | None, typer.Option(help="JSON file for the figures.")] = None,
    raw: Annotated[Path, typer.Option(help="Raw store (its digit box centres and ink).")] = Path(
        "data/raw.zarr"
    ),
    tokens: Annotated[Path, typer.Option(help="Token store.")] = Path("data/tokens.zarr"),
    frames: Annotated[Path, typer.Option(help="Frames store.")] = Path("data/frames.zarr"),
    actions: Annotated[Path, typer.Option(help="Action store.")] = Path("data/actions.zarr"),
) -> None:
    data, tokens_config, sample, evaluation = (
        config.load(name, params) for name in ("data", "tokens", "sample", "eval")
    )
    recorded = dict(open_store(raw).attrs)
    if not recorded.get("has_ground_truth"):
        raise StoreError(
            f"{raw}: no digit boxes recorded (only generated data has them: data.source generate)"
        )
    centres_store = open_array(raw, "centers", ndim=4, dtype=np.float32)  # (N, T, D, 2)
    ink_store = open_array(raw, "ink", ndim=2, dtype=np.float32)  # (N, D)
    canvas = int(recorded["canvas"])
    model, payload = load_model(checkpoint, "cpu")
    stores = Stores(tokens, frames, actions, model, tokens_config.decode)
    evaluation = dataclasses.replace(evaluation, sequences=sequences, samples=1)
    run = Run.from_checkpoint(
        checkpoint, payload, *stores.tokens.shape[:2], evaluation, data.test_sequences, split
    )
    shares: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {name: [] for name in ANSWERS}
    for start in range(0, run.count, evaluation.batch_size):
        first = run.first + start
        rows = slice(first, run.first + min(start + evaluation.batch_size, run.count))
        token_rows, truth = stores.tokens[rows], stores.frames[rows]
        futures = predict(model, token_rows[:, : run.past], stores.actions[rows], sample, 1, first, stores)
        copy_last = baselines(truth[:, : run.past], token_rows[:, run.past :], stores.vocabulary.decode)
        answers = {
            "sampled": futures.samples[0],
            "mirrored": futures.mirrored,
            "point": futures.point,
            "copy_last": copy_last["copy_last"],
        }
        masks = digit_masks(truth[:, run.past :] > INK_THRESHOLD, centres_store[rows][:, run.past :], canvas)
        for name, future in answers.items():
            shares[name].append(ego_and_others(covered(future > INK_THRESHOLD, masks), ink_store[rows]))
    table = pd.DataFrame({"horizon": np.arange(1, stores.tokens.shape[1] - run.past + 1)})
    for name, parts in shares.items():
        ego = np.concatenate([part[0] for part in parts])  # (N, F)
        other = np.concatenate([part[1] for part in parts])
        table[f"{name}_ego"] = np.nanmean(ego, axis=0)
        table[f"{name}_other"] = np.nanmean(other, axis=0)
    typer.echo(f"{run.count} {run.split} sequences from {run.first}: share of each digit's ink covered")
    typer.echo(table.to_string(index=False, float_format="%.3f"))
    if output is not None:
        result = {"checkpoint": str(checkpoint), "split": run.split, "first_sequence": run.first}
        write_json(output, result | {"sequences": run.count, **table.to_dict("list")})


if __name__ == "__main__":
    cli.run(main)
