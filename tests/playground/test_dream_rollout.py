"""scripts/dream_rollout.py: held arrows are scored by how far the tracked ego digit moves along them, a digit
that vanishes scores nothing, and the script dreams and reports on a real (tiny) checkpoint."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import from_params, tiny_architecture

from mnist_world.actions.ego import build_actions_store
from mnist_world.config import ActionsConfig, DataConfig, SampleConfig, TokensConfig, build
from mnist_world.data.frames import build_frames_store
from mnist_world.data.sources import build_raw_store
from mnist_world.data.tokens import build_token_store
from mnist_world.evaluation.action_following import Tracker
from mnist_world.model.checkpoint import save_checkpoint
from mnist_world.model.network import build_model
from mnist_world.playground.dreamer import SamplerSettings

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "dream_rollout.py"
spec = importlib.util.spec_from_file_location("dream_rollout", SCRIPT)
rollout = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rollout)

TRACKER = Tracker(threshold=0.2, min_area=2, digits=1, canvas=64)  # a 7 px box at 16x16
PAST, HOLD = 4, 5


def moving_square(steps: np.ndarray, vanish_from: int | None = None) -> np.ndarray:
    """Frames (1 + len(steps), 16, 16): a 5x5 square starting at (6, 6), moved by whole-pixel steps (x, y)."""
    position = np.array([6, 6])
    frames = np.zeros((1 + len(steps), 16, 16), dtype=np.float32)
    for index in range(len(frames)):
        if index:
            position = position + steps[index - 1]
        if vanish_from is None or index < vanish_from:
            x, y = position
            frames[index, y : y + 5, x : x + 5] = 1.0
    return frames


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """Tiny generated stores (8x8 tokens, 4 validation sequences) and an untrained checkpoint."""
    root = tmp_path_factory.mktemp("rollout")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(
        num_sequences=14, train_sequences=8, val_sequences=4, test_sequences=2, sequences_per_shard=4
    )
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    data = build(DataConfig, "data", params["data"])
    build_raw_store(data, root / "raw.zarr", progress=False)
    build_frames_store(root / "raw.zarr", root / "frames.zarr", from_params(TokensConfig, frame_size=8), 4)
    build_token_store(root / "frames.zarr", root / "tokens.zarr", 16, 4, train_sequences=8)
    build_actions_store(root / "raw.zarr", root / "actions.zarr", from_params(ActionsConfig), 8, 4)
    arch = tiny_architecture(levels=16, frame_size=8, frames=20)
    payload = {
        "model": build_model(arch).state_dict(),
        "architecture": dataclasses.asdict(arch),
        "params": {"train": {"past_frames": 10}},
    }
    save_checkpoint(root / "best.pt", payload)
    return root


def test_commands_hold_each_arrow_in_turn() -> None:
    actions = rollout.commands(12, 3, 0.25)
    assert actions.tolist()[:7] == [[0.25, 0]] * 3 + [[0, 0.25]] * 3 + [[-0.25, 0]]


def test_a_digit_that_moves_as_commanded_scores_one_and_a_half_move_one_half() -> None:
    actions = np.array([[0.125, 0.0]] * HOLD + [[0.0, 0.125]] * HOLD, dtype=np.float32)  # 1 px a frame at 16
    exact = np.array([[0, 0]] * (PAST - 1) + [[1, 0]] * HOLD + [[0, 1]] * HOLD)
    assert rollout.arrow_following(TRACKER, moving_square(exact), actions, HOLD, PAST) == pytest.approx(
        [1, 1]
    )
    half = np.array([[0, 0]] * (PAST - 1) + [[1, 0], [0, 0]] * 2 + [[1, 0]] + [[0, 1], [0, 0]] * 2 + [[0, 0]])
    scores = rollout.arrow_following(TRACKER, moving_square(half), actions, HOLD, PAST)
    assert scores == pytest.approx([3 / 5, 2 / 5])
    backwards = np.array([[0, 0]] * (PAST - 1) + [[-1, 0]] * HOLD + [[0, -1]] * HOLD)
    assert rollout.arrow_following(TRACKER, moving_square(backwards), actions, HOLD, PAST) == pytest.approx(
        [-1, -1]
    )


def test_a_digit_that_vanishes_scores_nothing() -> None:
    actions = np.array([[0.125, 0.0]] * HOLD * 2, dtype=np.float32)
    steps = np.array([[0, 0]] * (PAST - 1) + [[1, 0]] * HOLD * 2)
    scores = rollout.arrow_following(
        TRACKER, moving_square(steps, vanish_from=PAST + HOLD - 1), actions, HOLD, PAST
    )
    assert scores == [0.0, 0.0]  # the first hold ends on an empty frame, the second is empty throughout


def test_the_script_dreams_and_reports(tiny_run: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "best.pt", "--sequences", "1", "--frames", "10", "--hold", "5",
         "--output", "rollout.json", "--tokens", "tokens.zarr", "--frames-store", "frames.zarr",
         "--actions", "actions.zarr"],
        cwd=tiny_run, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((tiny_run / "rollout.json").read_text())
    assert report["frames"] == 10 and len(report["ink_kept_per_sequence"]) == 1
    assert report["ink_kept_last_frame"]["median"] >= 0
    assert set(report["arrow_following"]) == {"mean", "median_per_hold", "share_at_least_half"}


def test_the_playground_dreams_with_the_params_sampler() -> None:
    """Every sampler setting of params.yaml reaches the playground (a dropped one would fall to a default)."""
    sample = from_params(
        SampleConfig, steps=7, temperature=0.9, guidance=0.5, choice_temperature=123.0, action_guidance=2.5
    )
    settings = SamplerSettings.from_config(sample)
    assert (settings.steps, settings.temperature, settings.guidance) == (7, 0.9, 0.5)
    assert (settings.choice_temperature, settings.action_guidance) == (123.0, 2.5)
    assert SamplerSettings.from_config(sample, steps=3).steps == 3
