"""scripts/digit_overlap.py: each digit's share of ink a dream covers, checked against pixel loops on small
arrays and, end to end on tiny stores and a random model, against the model's samples drawn by hand."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
import yaml
from conftest import from_params, params_section, tiny_architecture, write_validation_stores
from typer.testing import CliRunner

from mnist_world.actions.ego import actions_from_centres, ego_centres
from mnist_world.config import DataConfig, SampleConfig
from mnist_world.core.randomness import derived_seed
from mnist_world.core.store import create_store, write_sequences
from mnist_world.data.sources import generate_sequences, write_raw_store
from mnist_world.data.tokens import Vocabulary
from mnist_world.evaluation.evaluate import PREDICTION
from mnist_world.model.checkpoint import save_checkpoint
from mnist_world.model.network import build_model
from mnist_world.model.sampling import new_generator, predict_future

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "digit_overlap.py"
spec = importlib.util.spec_from_file_location("digit_overlap", SCRIPT)
overlap = importlib.util.module_from_spec(spec)
spec.loader.exec_module(overlap)

SIZE, FRAMES, LEVELS, PAST = 16, 6, 8, 3
DATA = from_params(
    DataConfig, num_sequences=12, frames=FRAMES, seed=5, train_sequences=4, val_sequences=4, test_sequences=4
)


def masks_by_hand(ink: np.ndarray, centres: np.ndarray, canvas: int) -> np.ndarray:
    """digit_masks pixel by pixel: a pixel is a digit's when it is ink and its centre lies inside that digit's
    box alone."""
    size = ink.shape[-1]
    out = np.zeros((*centres.shape[:3], size, size), dtype=bool)
    for n, t, d in np.ndindex(*centres.shape[:3]):
        for row in range(size):
            for column in range(size):
                cx, cy = (column + 0.5) * canvas / size, (row + 0.5) * canvas / size
                boxes = [abs(cx - x) < 14 and abs(cy - y) < 14 for x, y in centres[n, t]]
                out[n, t, d, row, column] = ink[n, t, row, column] and boxes[d] and sum(boxes) == 1
    return out


def test_a_copy_shifted_by_one_pixel_covers_five_sixths_and_a_vanished_digit_none():
    # Two digits on a 64-px canvas at 16x16: a box covers the 6 x 6 pixels whose centres fall inside it.
    centres = np.array([[[[20.0, 20.0], [48.0, 44.0]]]])  # (1 sequence, 1 frame, 2 digits, (x, y))
    truth = np.zeros((1, 1, 16, 16), dtype=bool)
    truth[0, 0, 2:8, 2:8] = True  # digit 0's box, all ink
    truth[0, 0, 8:14, 9:15] = True  # digit 1's box, all ink
    masks = overlap.digit_masks(truth, centres, 64)
    assert np.array_equal(masks, masks_by_hand(truth, centres, 64))
    assert masks.sum(axis=(-2, -1)).tolist() == [[[36, 36]]]

    shifted = np.roll(truth, 1, axis=-1)  # every ink pixel one to the right
    assert overlap.covered(shifted, masks) == pytest.approx(np.array([[[30 / 36, 30 / 36]]]))
    vanished = truth.copy()
    vanished[0, 0, 8:14, 9:15] = False  # the dream lost digit 1
    shares = overlap.covered(vanished, masks)
    assert shares[0, 0].tolist() == [1.0, 0.0]

    ego, other = overlap.ego_and_others(shares, np.array([[50.0, 80.0]]))  # digit 1 has the most ink
    assert (ego[0, 0], other[0, 0]) == (0.0, 1.0)
    empty = overlap.covered(np.zeros_like(truth), np.zeros_like(masks))
    assert np.isnan(empty).all()  # no ink of a digit in the truth: not counted, rather than 0 or 1


def test_ink_where_two_boxes_overlap_is_neither_digits():
    centres = np.array([[[[20.0, 20.0], [40.0, 40.0]]]])  # boxes of pixels 2..7 and 7..12: (7, 7) shared
    truth = np.zeros((1, 1, 16, 16), dtype=bool)
    truth[0, 0, 2:8, 2:8] = truth[0, 0, 7:13, 7:13] = True
    masks = overlap.digit_masks(truth, centres, 64)
    assert np.array_equal(masks, masks_by_hand(truth, centres, 64))
    assert not masks[0, 0, :, 7, 7].any() and masks.sum(axis=(-2, -1)).tolist() == [[[35, 35]]]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A raw store with its digit boxes, frames, tokens and actions of 12 generated sequences at 16x16, and a
    1-layer random model's checkpoint recording the split."""
    root = tmp_path_factory.mktemp("overlap")
    generated = generate_sequences(DATA, progress=False)
    write_raw_store(root / "raw.zarr", generated.frames, DATA, {}, generated, progress=False)
    frames, tokens = write_validation_stores(root, generated, DATA, SIZE, LEVELS)
    torch.manual_seed(0)
    arch = tiny_architecture(LEVELS, SIZE, FRAMES, action_conditioning="blocks")
    split = {"train_sequences": DATA.train_sequences, "val_sequences": DATA.val_sequences}
    save_checkpoint(root / "best.pt", {
        "model": build_model(arch).state_dict(),
        "architecture": dataclasses.asdict(arch),
        "params": {"train": {"past_frames": PAST, "action_dropout": 0.1}, "data": split},
    })  # fmt: skip
    params = {name: params_section(name) for name in ("data", "tokens", "sample", "eval")}
    params["data"].update(dataclasses.asdict(DATA))
    params["sample"].update(steps=3)
    params["eval"].update(batch_size=2)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root, generated, frames, tokens


def test_the_script_scores_the_evaluate_stages_first_sample_digit_by_digit(inputs, tmp_path):
    root, generated, frames, tokens = inputs
    app = typer.Typer()
    app.command()(overlap.main)
    stores = [f"--{name}={root / name}.zarr" for name in ("raw", "tokens", "frames", "actions")]
    arguments = [str(root / "best.pt"), f"--params={root / 'params.yaml'}", "--sequences=3"]
    result = CliRunner().invoke(app, [*arguments, *stores, f"--output={tmp_path / 'overlap.json'}"])
    assert result.exit_code == 0, result.output
    figures = json.loads((tmp_path / "overlap.json").read_text())
    assert (figures["split"], figures["first_sequence"], figures["sequences"]) == ("val", 4, 3)

    # By hand: the evaluate stage's first sample (its seed per batch of eval.batch_size 2), pixel loops.
    stored = torch.load(root / "best.pt", weights_only=False)
    model = build_model(stored["architecture"])
    model.load_state_dict(stored["model"])
    model.eval()  # the tiny model's dropout off, as the script's `load_model` leaves it
    sample = from_params(SampleConfig, steps=3)
    vocabulary = Vocabulary.from_store(root / "tokens.zarr", "mean")
    store_actions = actions_from_centres(
        ego_centres(generated.centers, generated.ink) * (SIZE / DATA.canvas), SIZE
    )
    ego_shares, other_shares = [], []
    for first, stop in ((4, 6), (6, 7)):
        generator = new_generator(derived_seed(sample.seed, first, PREDICTION, 0), "cpu")
        past = torch.from_numpy(tokens[first:stop, :PAST].astype(np.int64))
        future = predict_future(
            model,
            past,
            torch.from_numpy(store_actions[first:stop]),
            sample,
            mask_id=LEVELS,
            generator=generator,
        )
        dream = vocabulary.decode(future.numpy()) > 0.3
        truth = frames[first:stop, PAST:] > 0.3
        masks = masks_by_hand(truth, generated.centers[first:stop, PAST:], DATA.canvas)
        for n in range(stop - first):
            ego = int(np.argmax(generated.ink[first + n]))
            for t in range(FRAMES - PAST):
                share = [
                    (masks[n, t, d] & dream[n, t]).sum() / max(masks[n, t, d].sum(), 1) for d in range(2)
                ]
                present = [masks[n, t, d].any() for d in range(2)]
                ego_shares.append(share[ego] if present[ego] else np.nan)
                other_shares.append(share[1 - ego] if present[1 - ego] else np.nan)
    by_horizon = lambda values: np.nanmean(np.reshape(values, (3, FRAMES - PAST)), axis=0)  # noqa: E731
    assert figures["sampled_ego"] == pytest.approx(by_horizon(ego_shares).tolist())
    assert figures["sampled_other"] == pytest.approx(by_horizon(other_shares).tolist())
    assert set(figures) >= {f"{name}_{digit}" for name in overlap.ANSWERS for digit in ("ego", "other")}


def test_data_without_digit_boxes_is_refused_in_one_line(inputs, tmp_path):
    root = inputs[0]
    with create_store(tmp_path / "raw.zarr", {"has_ground_truth": False}) as group:
        write_sequences(group, "frames", np.zeros((12, FRAMES, 64, 64), np.uint8), sequences_per_shard=4)
    command = [sys.executable, str(SCRIPT), str(root / "best.pt"), f"--params={root / 'params.yaml'}"]
    result = subprocess.run([*command, f"--raw={tmp_path / 'raw.zarr'}"], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'raw.zarr'}: no digit boxes recorded (only generated data has them: data.source "
        "generate)"
    ]
